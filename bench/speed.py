"""Speed: the seed's pipeline against budgetune's, side by side in one process, same model, same AG News texts.

    python bench/speed.py                                  # packaged MiniLM on CPU; a few minutes on 2 cores
    python bench/speed.py --train-steps 20 --warmup-steps 3 --infer-texts 1024 --repeats 3
    python bench/speed.py --device cuda --model /path/to/roberta-base   # + budgetune+graphs (--graphs auto)
    python bench/speed.py --graphs tape --train-steps 2 --warmup-steps 3   # graphs' plumbing on CPU (slow)

seed       transformers' Trainer (batch 32, fp32, random sampler, no eval, no saving) on peft's AdaLoRA model
           (init_r 8, target_r 4, alpha 16, dropout 0.1, query+value), texts padded to max_length; inference:
           batches of 64 tokenized and padded to max_length in the loop, torch.no_grad, argmax.
budgetune  budgetune.training.train.train(cfg) itself (AdaLoRA with the same numbers; dynamic padding, length-grouped
           batches, SDPA, mixed_precision auto: bf16 on a GPU and on a CPU with native bf16 matrix instructions,
           else fp32; BUDGETUNE_MIXED_PRECISION=fp32 forces fp32); inference: predict's path,
           data.tokenize + inference_loader (batch 256 as `budgetune predict`, length-sorted, on CPU capped at 2048
           padded tokens) + predict_logits, adapters merged, last layer for the first token only.
budgetune+graphs  training only: the same budgetune config with --cuda_graphs true --pad_to_buckets 6 (the step
           captured per batch shape in a CUDA graph and replayed). --graphs auto: run on cuda, skipped on CPU;
           off: skipped; tape: on CPU with graph_tape.TapeBackend, a plumbing dry-run whose speed means nothing.

Training throughput is timed from the start of training step W+1 to the start of step W+N+1 (W warmup steps, N
measured steps): for the seed by a forward pre-hook on the model, for budgetune by wrapping budgetune.training.train.
train_step (a replayed graph does not run the model's Python forward, so a hook would not see it); model loading,
tokenization, evaluation and checkpoints are outside the window, and every pipeline is stopped there. A step that
captures a graph (first sight of a batch shape) inside the window is taken out of it, time and rows, between two
device synchronizations, and the window grows by one step (it always times N steps); the captures, replays and eager steps of the window are counted and printed. Inference is
timed from the texts to the predicted labels, tokenization included, for both. The pipelines take turns going
first over --repeats repeats; medians and their ratios (with ms per step) are reported, with the padding overhead
(padded / real tokens) and floors: the FLOPs the real tokens need divided by each matmul rate measured on this
machine at the start of every repeat (fp32, bf16, and int8 x int8 -> int32 for inference), in samples/s; "x slower
than floor" is against the floor of the precision the pipeline computes in (the seed fp32, budgetune what
mixed_precision auto picks), and the report's first lines name the machine's bf16/int8 instructions and its rates.
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))  # test scaffolding (tiny models, graph_tape)

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_DATA = ROOT.parent / "shared" / "data" / "ag_news" / "train.csv"
PACKAGED = "packaged:all-MiniLM-L6-v2"


TORCH_DTYPES: dict = {}  # filled by main(): "fp32" -> torch.float32, ... (torch is imported lazily)


class StopBench(Exception):
    """Raised by the timing hook once the measured window is over: the pipeline stops right there."""


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--train-steps", type=int, default=2, help="measured training steps of batch 32 (default 2)")
    p.add_argument("--warmup-steps", type=int, default=1, help="training steps before the window (default 1)")
    p.add_argument("--infer-texts", type=int, default=512, help="texts budgetune classifies per run (default 512)")
    p.add_argument("--seed-infer-texts", type=int, default=128,
                   help="the first K of those the seed classifies (default 128; 0: all): every text costs the seed "
                        "the same, being padded to max_length, so fewer texts time it as well")
    p.add_argument("--repeats", type=int, default=3, help="times the two pipelines alternate (default 3)")
    p.add_argument("--model", default=PACKAGED, help="model folder (default: the packaged MiniLM)")
    p.add_argument("--max-seq-length", type=int, default=256, help="truncation; the seed pads to it (default 256)")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"], help="default cpu")
    p.add_argument("--data", default=str(DEFAULT_DATA), help="AG News CSV (label,text)")
    p.add_argument("--pool", type=int, default=4000,
                   help="training rows both pipelines sample from (default 4000: several length-grouping "
                        "mega-batches of 1600, as in a real run)")
    p.add_argument("--mm-size", type=int, default=None, help="matrix size for the matmul rate (2048 CPU, 8192 GPU)")
    p.add_argument("--graphs", choices=["auto", "off", "tape"], default="auto",
                   help="the budgetune+graphs training pipeline (--cuda_graphs true --pad_to_buckets 6): auto = on "
                        "cuda only (default), off = never, tape = on CPU through graph_tape.TapeBackend (a plumbing "
                        "dry-run: slow, its speed means nothing)")
    p.add_argument("--only", choices=["seed", "budgetune", "graphs"], help="run one pipeline (for profiling)")
    a = p.parse_args(argv)
    if a.train_steps < 1 or a.warmup_steps < 0 or a.infer_texts < 1 or a.repeats < 1:
        p.error("--train-steps, --infer-texts and --repeats must be >= 1, --warmup-steps >= 0")
    if a.graphs == "tape" and a.device != "cpu":
        p.error("--graphs tape runs on CPU only (graph_tape stands in for CUDA graphs there)")
    return a


# ----------------------------------------------------------------------------------------------------------------
# Timing and token counting


class StepTimer:
    """Timestamps of the starts of training steps W+1 .. W+N+1, and the batches of the window.

    `tick` is called at the start of every training step: as a forward pre-hook (the seed's Trainer) or from a
    wrapper of budgetune.training.train.train_step (budgetune_train's `timed_step`, which also sees replays). A step taken
    out of the window (a graph capture) is `tick`ed with count=False, its time (between two synchronizations) is
    added to `excluded_s` by the caller, and the window grows by one step: it always counts N steps."""

    def __init__(self, warmup: int, steps: int, device):
        self.warmup, self.steps, self.device = warmup, steps, device
        self.calls, self.stamps, self.masks, self.padded, self.rows = 0, [], [], 0, 0
        self.excluded_s, self.excluded_steps = 0.0, []  # window indices (0-based) of steps not counted

    def __call__(self, module, args, kwargs):
        if module.training:
            self.tick(kwargs.get("input_ids"), kwargs.get("attention_mask"))
        return None

    def next_in_window(self) -> bool:
        """Whether the next step to be ticked falls in the window (as it stands now)."""
        return 1 <= self.calls + 1 - self.warmup <= self.steps + len(self.excluded_steps)

    def tick(self, ids, mask, count: bool = True) -> None:
        import torch

        self.calls += 1
        k = self.calls - self.warmup  # 1 = first measured step
        if k < 1:
            return
        last = k == self.steps + len(self.excluded_steps) + 1  # the start of the first step after the window
        if self.device.type == "cuda" and (k == 1 or last):
            torch.cuda.synchronize()
        self.stamps.append(time.perf_counter())
        if last:
            raise StopBench
        if not count:
            self.excluded_steps.append(k - 1)
            return
        self.padded += ids.numel()
        self.rows += ids.shape[0]
        self.masks.append(mask)

    def result(self) -> dict:
        if len(self.stamps) != self.steps + len(self.excluded_steps) + 1:
            raise RuntimeError(f"the training loop ended after {self.calls} steps, before the measured window")
        counted = self.steps
        seconds = self.stamps[-1] - self.stamps[0] - self.excluded_s
        real = sum(int(m.sum()) for m in self.masks)
        step_s = [b - a for i, (a, b) in enumerate(zip(self.stamps, self.stamps[1:])) if i not in self.excluded_steps]
        return {"seconds": seconds, "samples": self.rows, "padded": self.padded, "real": real, "steps": counted,
                "step_s": step_s, "lengths": [int(x) for m in self.masks for x in m.sum(-1).tolist()]}


class TokenCounter:
    """A forward pre-hook for inference: padded tokens and attention masks of every batch."""

    def __init__(self):
        self.padded, self.masks = 0, []

    def __call__(self, module, args, kwargs):
        self.padded += kwargs["input_ids"].numel()
        self.masks.append(kwargs["attention_mask"])

    def result(self, seconds: float) -> dict:
        lengths = [int(x) for m in self.masks for x in m.sum(-1).tolist()]
        return {"seconds": seconds, "padded": self.padded, "real": sum(lengths), "lengths": lengths}


FLOOR_DTYPES = ("fp32", "bf16", "int8")  # the matmul rates measured for the floors; int8 is inference only


def matmul_rate(device, dtype: str, n: int, reps: int = 5) -> float | None:
    """Best FLOP/s of an n x n matmul in `dtype` (fp32, bf16, fp16; int8: int8 x int8 -> int32 through
    torch._int_mm, the path of VNNI / AMX-INT8 / int8 tensor cores) over `reps` tries after two untimed ones; None
    where this torch cannot run it."""
    import torch

    if dtype == "int8":
        mm = getattr(torch, "_int_mm", None)
        a, b = (torch.randint(-64, 64, (n, n), device=device, dtype=torch.int8) for _ in range(2))
    else:
        mm = torch.mm
        a, b = (torch.randn(n, n, device=device, dtype=TORCH_DTYPES[dtype]) for _ in range(2))
    try:
        for _ in range(2):
            mm(a, b)
    except (RuntimeError, TypeError, NotImplementedError):  # TypeError: no torch._int_mm in this torch
        return None
    best = float("inf")
    for _ in range(reps):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        mm(a, b)
        if device.type == "cuda":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t)
    return 2 * n**3 / best


def matmul_rates(device, n: int, extra: str | None = None) -> dict[str, float | None]:
    """{dtype: FLOP/s} for the floors (FLOOR_DTYPES, plus `extra`: the precision budgetune computes in)."""
    names = FLOOR_DTYPES + ((extra,) if extra and extra not in FLOOR_DTYPES else ())
    return {name: matmul_rate(device, name, n) for name in names}


def machine_line(device, rates: dict[str, float | None], mm_n: int, repeats: int) -> str:
    """The machine's capability, which every floor is against: its matmul rates and (CPU) matrix instructions."""
    from budgetune.hardware.devices import cpu_capabilities

    def rate(name):
        r = rates.get(name)
        return "not measured (this torch cannot)" if r is None else f"{r / 1e9:.1f} G{'OP' if name == 'int8' else 'FLOP'}/s"

    parts = [f"{name} {rate(name)}" for name in rates]
    if rates.get("fp32"):
        parts += [f"({name} / fp32 {rates[name] / rates['fp32']:.1f}x)" for name in rates
                  if name != "fp32" and rates.get(name)]
    line = (f"matmul rates (best of 5 {mm_n}x{mm_n} before each repeat, median of {repeats}; int8 = int8 x int8 "
            f"-> int32, torch._int_mm): " + ", ".join(parts))
    if device.type == "cpu":
        caps = cpu_capabilities()
        found = [k for k in ("amx_bf16", "amx_int8", "avx512_bf16", "avx512_vnni", "avx_vnni") if caps.get(k)]
        line += f"; CPU matrix instructions (torch.cpu.get_capabilities): {', '.join(found) or 'none of AMX, AVX512-BF16, VNNI'}"
    return line


def model_shape(model) -> dict:
    """Non-embedding parameters (encoder + head + adapters), hidden size and layers, for the FLOP count."""
    import torch

    total = sum(p.numel() for p in model.parameters())
    emb = sum(p.numel() for m in model.modules() if isinstance(m, torch.nn.Embedding) for p in m.parameters())
    cfg = model.config
    return {"non_embedding": total - emb, "hidden": cfg.hidden_size, "layers": cfg.num_hidden_layers}


def forward_flops(lengths, shape: dict) -> float:
    """Forward FLOPs of sequences of these real lengths: 2*N per token + attention 4*n^2*d per layer."""
    n_ne, d, layers = shape["non_embedding"], shape["hidden"], shape["layers"]
    return float(sum(2 * n_ne * n + 4 * n * n * d * layers for n in lengths))


# ----------------------------------------------------------------------------------------------------------------
# The two pipelines


def reset_accelerate() -> None:
    """The Trainer (fp32) and budgetune (mixed_precision auto) each build an Accelerator; its state is a
    singleton."""
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()


def adalora_config(total_step: int, tinit: int, tfinal: int):
    from peft import AdaLoraConfig, TaskType

    return AdaLoraConfig(task_type=TaskType.SEQ_CLS, init_r=8, target_r=4, lora_alpha=16, lora_dropout=0.1,
                         target_modules=["query", "value"], tinit=tinit, tfinal=tfinal, deltaT=10,
                         total_step=total_step)


def seed_model(model_path: str, n_labels: int, total_step: int, tinit: int, tfinal: int):
    from peft import get_peft_model
    from transformers import AutoModelForSequenceClassification

    base = AutoModelForSequenceClassification.from_pretrained(model_path, num_labels=n_labels)
    return get_peft_model(base, adalora_config(total_step, tinit, tfinal))


def seed_train(a, model_path, tokenizer, train_ds, n_labels, device, workdir) -> dict:
    """transformers' Trainer as the seed ran it: max_length padding, random sampler, fp32, no eval, no saving."""
    from transformers import Trainer, TrainingArguments

    reset_accelerate()
    total = a.warmup_steps + a.train_steps + 1
    model = seed_model(model_path, n_labels, total, 0, 1)
    timer = StepTimer(a.warmup_steps, a.train_steps, device)
    handle = model.register_forward_pre_hook(timer, with_kwargs=True)
    args = TrainingArguments(output_dir=str(workdir / "seed"), per_device_train_batch_size=32, max_steps=total,
                             learning_rate=2e-4, eval_strategy="no", save_strategy="no", report_to="none",
                             seed=42, use_cpu=device.type == "cpu", dataloader_pin_memory=device.type == "cuda",
                             disable_tqdm=True)
    trainer = Trainer(model=model, args=args, train_dataset=train_ds)
    try:
        trainer.train()
    except StopBench:
        pass
    handle.remove()
    return timer.result()


def seed_infer(model, tokenizer, texts, max_len, device) -> tuple[float, object, TokenCounter]:
    """The seed's loop: batches of 64 padded to max_length, torch.no_grad, argmax."""
    import torch

    counter = TokenCounter()
    handle = model.register_forward_pre_hook(counter, with_kwargs=True)
    model.eval()
    t0 = time.perf_counter()
    preds = []
    with torch.no_grad():
        for i in range(0, len(texts), 64):
            enc = tokenizer(texts[i:i + 64], padding="max_length", truncation=True, max_length=max_len,
                            return_tensors="pt").to(device)
            preds.append(model(**enc).logits.argmax(-1).cpu())
    preds = torch.cat(preds).numpy()
    seconds = time.perf_counter() - t0
    handle.remove()
    return seconds, preds, counter


GRAPH_BUCKETS = 6  # --pad_to_buckets of the budgetune+graphs pipeline: at most 6 full-batch shapes, 6 captures


def budgetune_steps(a) -> int:
    """--max_steps of both budgetune pipelines (the same config but for the graphs): the window, plus room for the
    window to grow by a step per capture inside it."""
    return a.warmup_steps + a.train_steps + 1 + GRAPH_BUCKETS


def budgetune_cfg(a, data_csv: Path, out: Path, cache: Path, max_steps: int, graphs: bool = False):
    from budgetune.config import build_config
    from budgetune.data.readers import AG_NEWS_LABELS

    return build_config({
        "model": {"model_name_or_path": a.model},
        "data": {"dataset_name": str(data_csv), "label_names": AG_NEWS_LABELS, "max_seq_length": a.max_seq_length,
                 "validation_split_percentage": 1, "cache_dir": str(cache),
                 "pad_to_buckets": GRAPH_BUCKETS if graphs else 0},
        "method": {"method": "adalora", "rank": 8, "target_r": 4, "lora_alpha": 16, "lora_dropout": 0.1,
                   "target_modules": ["query", "value"], "tinit": 0, "tfinal": 1, "deltaT": 10},
        "budget": {"max_trainable_params": None},
        "train": {"per_device_train_batch_size": 32, "max_steps": max_steps, "learning_rate": 2e-4,
                  "weight_decay": 0.0, "warmup_ratio": 0.0, "seed": 42, "cuda_graphs": graphs},
        "output": {"output_dir": str(out), "overwrite_output_dir": True},
    }, "bench")


def budgetune_train(a, data_csv, workdir, device, run: int, graphs: bool = False) -> dict:
    """budgetune.training.train.train(cfg) itself, timed by wrapping train.train_step (replays included) and stopped there.

    graphs: --cuda_graphs true --pad_to_buckets 6, on CUDA (or graph_tape's CPU stand-in under --graphs tape). The
    result then says what the window ran: replayed steps, eager steps, captures (taken out of the window), and why
    the run fell back to eager if it did."""
    import gc

    import graph_tape
    import torch

    from budgetune.training import graphs as graphs_lib
    from budgetune.training import train as train_lib

    reset_accelerate()
    timer = StepTimer(a.warmup_steps, a.train_steps, device)
    name = f"budgetune{'-graphs' if graphs else ''}-{run}"
    cfg = budgetune_cfg(a, data_csv, workdir / name, workdir / "cache", budgetune_steps(a), graphs)
    info = {"fallback": None, "capture_failures": [], "step_graphs": None,
            "window": {"replayed": 0, "eager": 0, "captures": 0, "captures_timed": 0}}
    real_step, real_wanted = train_lib.train_step, train_lib.graphs_wanted
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    def graphs_wanted(cfg, accelerator, custom_loss):
        wanted = real_wanted(cfg, accelerator, custom_loss)
        if not wanted and cfg.train.cuda_graphs:  # graphs_wanted has printed the reason too
            info["fallback"] = (graphs_lib.unsupported(cfg, accelerator, custom_loss)
                                or "train.graphs_wanted said no")
        return wanted

    def timed_step(run_, batch, steps_done):
        g = run_.graphs
        if g is not None and info["step_graphs"] is not g:  # keep the run's StepGraphs and its capture failures
            info["step_graphs"], say = g, g.say

            def say_and_keep(msg):  # a capture that failed: that shape trains eagerly
                info["capture_failures"].append(msg)
                say(msg)

            g.say = say_and_keep
        key = graphs_lib.shape_key(batch)
        full = g is not None and (g.full_batch is None or batch["input_ids"].shape[0] == g.full_batch)
        capture = full and key not in g.graphs  # first sight of this shape: StepGraphs.step captures it
        in_window = timer.next_in_window()
        timer.tick(batch["input_ids"], batch["attention_mask"], count=not (capture and in_window))
        replays = g.replays if g is not None else 0
        before = g.graphs.get(key) if g is not None else None
        if capture and in_window:  # the capture's warm-up steps and capture: outside the timed window
            sync()
            t0 = time.perf_counter()
            out = real_step(run_, batch, steps_done)
            sync()
            timer.excluded_s += time.perf_counter() - t0
            info["window"]["captures"] += 1
            return out
        out = real_step(run_, batch, steps_done)
        if in_window:
            info["window"]["replayed" if g is not None and g.replays > replays else "eager"] += 1
            if full and not capture and g.graphs.get(key) is not before:  # re-captured (graphs.clear()): timed
                info["window"]["captures_timed"] += 1
        return out

    saved_backend = graphs_lib.BACKEND
    if graphs and a.graphs == "tape":
        graphs_lib.BACKEND = graph_tape.TapeBackend()
    train_lib.train_step, train_lib.graphs_wanted = timed_step, graphs_wanted
    try:
        train_lib.train(cfg)
    except StopBench:
        pass
    finally:
        train_lib.train_step, train_lib.graphs_wanted = real_step, real_wanted
        graphs_lib.BACKEND = saved_backend
    result = timer.result()
    if graphs:
        g = info.pop("step_graphs")
        shapes = g.graphs if g is not None else {}
        result["graphs"] = {**info, "captured": sum(v is not None for v in shapes.values()),
                            "failed_shapes": sum(v is None for v in shapes.values()),
                            "replays": g.replays if g is not None else 0}
        del g, shapes
    info.clear()
    gc.collect()  # the graphs and their memory pool go with the run
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return result


def budgetune_infer(template, tokenizer, texts, max_len, device) -> tuple[float, object, TokenCounter]:
    """predict's path: data.tokenize + inference_loader (predict's batch and token cap) + predict_logits."""
    from accelerate import Accelerator

    from budgetune.data import readers as data_lib
    from budgetune.hardware.devices import resolve_precision, token_cap
    from budgetune.inference.runner import inference_loader, predict_logits
    from budgetune.modeling import fast_forward, methods

    reset_accelerate()
    accelerator = Accelerator(mixed_precision=resolve_precision("auto", device.type).mixed_precision,
                              cpu=device.type == "cpu")
    model = copy.deepcopy(template).eval()
    methods.merge_for_inference(model)  # as predict.load_model does
    fast_forward.first_token_last_layer(model)
    model = accelerator.prepare_model(model, evaluation_mode=True)  # = loading: not timed
    counter = TokenCounter()
    model.register_forward_pre_hook(counter, with_kwargs=True)
    on_gpu = device.type == "cuda"
    t0 = time.perf_counter()
    ds = data_lib.tokenize(data_lib.TextTable(list(texts), None, None, "bench"), tokenizer, max_len, None)
    loader = accelerator.prepare_data_loader(inference_loader(ds, tokenizer, 256, 8 if on_gpu else None, 0, on_gpu,
                                                              token_cap(device)))
    preds = predict_logits(model, loader, accelerator, len(ds), desc="predict").argmax(-1)
    seconds = time.perf_counter() - t0
    return seconds, preds, counter


# ----------------------------------------------------------------------------------------------------------------


def med(xs):
    return statistics.median(xs) if xs else float("nan")


def main(argv=None) -> int:
    a = parse_args(argv)
    if a.device == "cpu":
        os.environ["CUDA_VISIBLE_DEVICES"] = ""  # before torch touches CUDA: accelerate and Trainer stay on CPU
    for k in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE"):
        os.environ.setdefault(k, "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "true")
    data_path = Path(a.data)
    if not data_path.is_file():
        print(f"skipped: {data_path} not found (AG News train.csv with columns label,text comes from "
              "../shared/data/ag_news; pass --data FILE)")
        return 0

    import datasets
    import numpy as np
    import torch
    import transformers
    from transformers import AutoTokenizer

    from budgetune.data import readers as data_lib
    from budgetune.hardware.devices import resolve_precision
    from budgetune.modeling import backbone, methods

    datasets.disable_progress_bars()
    transformers.logging.set_verbosity_error()
    device = torch.device(a.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("error: --device cuda but torch sees no CUDA device", file=sys.stderr)
        return 2
    model_path = backbone.resolve_model_path(a.model)
    tokenizer = AutoTokenizer.from_pretrained(model_path)

    table = data_lib.load_table(str(data_path))
    names = table.label_names or data_lib.AG_NEWS_LABELS
    rng = np.random.default_rng(0)
    order = rng.permutation(len(table.texts))
    need_train = (a.warmup_steps + a.train_steps + 1 + GRAPH_BUCKETS) * 32 * 2
    n_pool = min(max(a.pool, need_train), len(order) - a.infer_texts)
    if n_pool < need_train or a.infer_texts > len(order) // 2:
        print(f"error: {data_path} has {len(order)} rows: too few for these sizes", file=sys.stderr)
        return 2
    pool = [int(i) for i in order[:n_pool]]
    infer_idx = [int(i) for i in order[n_pool:n_pool + a.infer_texts]]
    infer_texts = [table.texts[i] for i in infer_idx]

    work = Path(tempfile.mkdtemp(prefix="budgetune-speed-"))
    import csv

    data_csv = work / "train.csv"
    with open(data_csv, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["label", "text"])
        w.writerows((table.labels[i], table.texts[i]) for i in pool)

    # The seed tokenized everything up front, padded to max_length.
    seed_ds = datasets.Dataset.from_dict({"text": [table.texts[i] for i in pool],
                                          "labels": [table.labels[i] for i in pool]})
    seed_ds = seed_ds.map(lambda b: tokenizer(b["text"], padding="max_length", truncation=True,
                                              max_length=a.max_seq_length),
                          batched=True, remove_columns=["text"])

    # Inference models: the same weights in both, so the predictions can be compared.
    torch.manual_seed(0)
    total = a.warmup_steps + a.train_steps + 1
    seed_inf = seed_model(model_path, len(names), total, 0, 1).to(device).eval()
    cfg = budgetune_cfg(a, data_csv, work / "unused", work / "cache", total)
    base, missing = backbone.load_base(cfg, names)
    bt_inf = methods.wrap(cfg, base, total, missing)
    got = bt_inf.load_state_dict(seed_inf.state_dict(), strict=False)
    same_weights = not got.missing_keys and not got.unexpected_keys
    bt_inf.eval()
    shape = model_shape(seed_inf)

    mm_n = a.mm_size or (8192 if device.type == "cuda" else 2048)
    TORCH_DTYPES.update(fp32=torch.float32, bf16=torch.bfloat16, fp16=torch.float16)
    bt_precision = resolve_precision("auto", device.type)  # budgetune_cfg leaves mixed_precision at auto
    bt_dtype = bt_precision.name
    print(f"model {a.model} ({shape['non_embedding'] / 1e6:.1f}M non-embedding parameters, hidden {shape['hidden']}, "
          f"{shape['layers']} layers) on {device} ({torch.get_num_threads()} threads); torch {torch.__version__}, "
          f"transformers {transformers.__version__}; training pool {n_pool} rows, inference {a.infer_texts} texts; "
          f"budgetune {bt_precision.line()}; seed fp32", flush=True)

    # untimed warmup of both inference paths (lazy initialisation of kernels and thread pools)
    seed_infer(seed_inf, tokenizer, infer_texts[:16], a.max_seq_length, device)
    budgetune_infer(bt_inf, tokenizer, infer_texts[:16], a.max_seq_length, device)
    n_seed_inf = min(a.seed_infer_texts or a.infer_texts, a.infer_texts)

    graphs_on = a.graphs == "tape" or (a.graphs == "auto" and device.type == "cuda")
    if a.only == "graphs" and not graphs_on:
        print(f"error: --only graphs but the graphs pipeline is off (--graphs {a.graphs} on {device.type})",
              file=sys.stderr)
        return 2
    if graphs_on:
        print(f"budgetune+graphs: the budgetune config with --cuda_graphs true --pad_to_buckets {GRAPH_BUCKETS}"
              + (" -- TAPE DRY-RUN: graph_tape.TapeBackend replays the recorded operators on CPU; this checks the "
                 "plumbing only, its speed says nothing about CUDA graphs" if a.graphs == "tape" else ""), flush=True)
    else:
        print(f"budgetune+graphs: skipped (--graphs {a.graphs} on {device.type}; --graphs tape: a CPU dry-run)",
              flush=True)
    pipelines = [w for w in ("seed", "budgetune", "graphs")
                 if (w != "graphs" or graphs_on) and (not a.only or w == a.only)]

    R: dict[str, list] = {k: [] for k in ("seed_train", "bt_train", "gr_train", "seed_inf", "bt_inf", "rates")}
    agree = None
    for r in range(a.repeats):
        R["rates"].append(matmul_rates(device, mm_n, bt_dtype))
        order = pipelines[r % len(pipelines):] + pipelines[:r % len(pipelines)]  # each goes first in turn
        for which in order:
            # the matmul rate right before each phase: the machine may be shared, and its load changes
            dtype = "fp32" if which == "seed" else bt_dtype
            if which == "seed":
                rate = matmul_rate(device, dtype, mm_n)
                R["seed_train"].append({**seed_train(a, model_path, tokenizer, seed_ds, len(names), device, work),
                                        "rate": rate})
                rate = matmul_rate(device, dtype, mm_n)
                s, seed_preds, cnt = seed_infer(seed_inf, tokenizer, infer_texts[:n_seed_inf], a.max_seq_length,
                                                device)
                R["seed_inf"].append({**cnt.result(s), "rate": rate})
            elif which == "budgetune":
                rate = matmul_rate(device, dtype, mm_n)
                R["bt_train"].append({**budgetune_train(a, data_csv, work, device, r), "rate": rate})
                rate = matmul_rate(device, dtype, mm_n)
                s, bt_preds, cnt = budgetune_infer(bt_inf, tokenizer, infer_texts, a.max_seq_length, device)
                R["bt_inf"].append({**cnt.result(s), "rate": rate})
            else:
                rate = matmul_rate(device, dtype, mm_n)
                x = {**budgetune_train(a, data_csv, work, device, r, graphs=True), "rate": rate}
                R["gr_train"].append(x)
                print(graphs_line(x, a), flush=True)
        if R["seed_inf"] and R["bt_inf"] and same_weights:
            agree = float((np.asarray(seed_preds) == np.asarray(bt_preds)[:n_seed_inf]).mean())
        line = [f"repeat {r + 1}/{a.repeats}: matmul " + ", ".join(
            f"{k} {v / 1e9:.1f}" for k, v in R["rates"][-1].items() if v) + " G(FL)OP/s"]
        for key in ("seed_train", "bt_train", "gr_train"):
            if R[key]:
                x = R[key][-1]
                line.append(f"{train_label(key, R, a)} train {x['samples'] / x['seconds']:.2f}/s")
        for key, label in (("seed_inf", "seed infer"), ("bt_inf", "budgetune infer")):
            if R[key]:
                line.append(f"{label} {len(R[key][-1]['lengths']) / R[key][-1]['seconds']:.1f}/s")
        print(", ".join(line), flush=True)

    report(a, R, shape, agree, same_weights, bt_dtype, mm_n, device)
    return 0


def graphs_line(x: dict, a) -> str:
    """What a budgetune+graphs run did: its window's replays, eager steps and captures, and any fallback."""
    g, w = x["graphs"], x["graphs"]["window"]
    tape = " (tape, CPU dry-run)" if a.graphs == "tape" else ""
    line = (f"graphs{tape}: {g['captured']} shape(s) captured, {g['failed_shapes']} failed, {g['replays']} replays "
            f"in the run; timed window of {a.train_steps} steps: {w['replayed']} replayed, {w['eager']} eager; "
            f"{w['captures']} capture(s) inside the window taken out of the timing (the window grew by as many)")
    if w["captures_timed"]:
        line += (f"\n*** {w['captures_timed']} re-capture(s) inside the window (StepGraphs dropped its graphs) were "
                 "timed: the budgetune+graphs row includes them ***")
    if g["fallback"]:
        line += f"\n*** GRAPHS FELL BACK TO EAGER: {g['fallback']} -- the budgetune+graphs row is eager numbers ***"
    for msg in g["capture_failures"]:
        line += f"\n*** capture failed: {msg} ***"
    if w["replayed"] == 0 and not g["fallback"]:
        line += "\n*** NO REPLAYED STEP IN THE MEASURED WINDOW: the budgetune+graphs row is eager numbers ***"
    return line


def train_label(key: str, R, a) -> str:
    """The row name of a training pipeline; budgetune+graphs says when its window was not (all) replayed."""
    if key == "seed_train":
        return "seed"
    if key == "bt_train":
        return "budgetune"
    name = "budgetune+graphs" + (" (tape, CPU dry-run)" if a.graphs == "tape" else "")
    runs = R[key]
    replayed = sum(x["graphs"]["window"]["replayed"] for x in runs)
    counted = sum(x["graphs"]["window"]["replayed"] + x["graphs"]["window"]["eager"] for x in runs)
    if replayed == 0:
        return name + " [EAGER FALLBACK, no replays]"
    if replayed < counted:
        return name + f" [partly eager: {replayed} of {counted} timed steps replayed]"
    return name


def machine_rates(R) -> dict[str, float | None]:
    """Each dtype's matmul rate, median over the repeats (None where this torch could not run it)."""
    names = list(R["rates"][0]) if R["rates"] else list(FLOOR_DTYPES)
    return {n: med(xs) if (xs := [r[n] for r in R["rates"] if r.get(n)]) else None for n in names}


def floor_rows(a, R, shape, bt_dtype: str, rates: dict) -> list[dict]:
    """A row per pipeline and task: samples/s (median), ms/step, padding, precision, and floors in samples/s
    against each measured rate (int8 for inference only: nothing trains in int8)."""
    rows = []
    specs = (("seed_train", "train", "fp32"), ("bt_train", "train", bt_dtype), ("gr_train", "train", bt_dtype),
             ("seed_inf", "infer", "fp32"), ("bt_inf", "infer", bt_dtype))
    for key, task, precision in specs:
        if not (runs := R[key]):
            continue
        x = runs[0]  # the same batches and texts every repeat (fixed seeds)
        if task == "train":
            sps, n, flops = med([y["samples"] / y["seconds"] for y in runs]), x["samples"], 2 * forward_flops(
                x["lengths"], shape)
            name, ms = train_label(key, R, a), 1000 * x["samples"] / x["steps"] / sps
        else:
            sps, n, flops = med([len(y["lengths"]) / y["seconds"] for y in runs]), len(x["lengths"]), forward_flops(
                x["lengths"], shape)
            name, ms = ("seed" if key == "seed_inf" else "budgetune"), None
        floors = {d: n * r / flops for d, r in rates.items() if r and (task == "infer" or d != "int8")}
        rows.append({"key": key, "name": name, "task": task, "precision": precision, "sps": sps, "ms": ms,
                     "pad": x["padded"] / x["real"], "floors": floors})
    return rows


def report(a, R, shape, agree, same_weights, bt_dtype: str, mm_n, device) -> None:
    rates = machine_rates(R)
    rows = floor_rows(a, R, shape, bt_dtype, rates)
    print()
    print(machine_line(device, rates, mm_n, a.repeats))
    print("floor at a dtype = samples whose real (unpadded) tokens' FLOPs that dtype's matmul rate computes in a "
          "second; forward FLOPs per text of n tokens = "
          f"2*N*n + 4*n^2*d*L (N = {shape['non_embedding'] / 1e6:.2f}M non-embedding parameters, d = "
          f"{shape['hidden']}, L = {shape['layers']}); training = 2 x forward (the frozen base needs the "
          "activations' gradients, about one forward, but no weight gradients; the adapters' are negligible)")
    report_notes(a, R, agree, same_weights)
    print()
    cols = [d for d, r in rates.items() if r]
    print(f"| pipeline | task | precision | samples/s (median of {a.repeats}) | ms/step | padded/real tokens | "
          + " | ".join(f"floor samples/s at {d}" for d in cols) + " | x slower than the floor at its precision |")
    print("|---|---|---|---|---|---|" + "---|" * (len(cols) + 1))
    for row in rows:
        ms_text = f"{row['ms']:.1f}" if row["ms"] is not None else ""
        floors = " | ".join(f"{row['floors'][d]:.1f}" if d in row["floors"] else "n/a" for d in cols)
        own = row["floors"].get(row["precision"])
        slower = f"{own / row['sps']:.1f} ({row['precision']})" if own else "n/a"
        print(f"| {row['name']} | {row['task']} | {row['precision']} | {row['sps']:.2f} | {ms_text} | "
              f"{row['pad']:.2f} | {floors} | {slower} |")
    report_ratios(R, rows, bt_dtype, filler=" |" * (len(cols) + 4))


def report_notes(a, R, agree, same_weights) -> None:
    """What was run: texts, agreement of the predictions, steps, graphs."""
    if R["seed_inf"] and R["bt_inf"]:
        print(f"inference: budgetune classified {len(R['bt_inf'][0]['lengths'])} texts per run, the seed the first "
              f"{len(R['seed_inf'][0]['lengths'])} of them (its cost per text is the same for every text)")
    if agree is not None:
        print(f"inference predictions of the two pipelines agree on {agree:.2%} of the texts (same weights)")
    elif not same_weights:
        print("note: the two inference models' parameter names differ; predictions were not compared")
    for key in ("seed_train", "bt_train", "gr_train"):
        if R[key]:
            x = R[key][0]
            print(f"{train_label(key, R, a)} train: {x['steps']} timed steps of {x['samples'] // x['steps']} rows "
                  f"per repeat, median step {med([med(y['step_s']) for y in R[key]]):.3f}s")
    for i, x in enumerate(R["gr_train"]):
        print(f"repeat {i + 1}: {graphs_line(x, a)}")
    if R["gr_train"] and a.graphs == "tape":
        print("graphs: TAPE DRY-RUN on CPU -- the budgetune+graphs numbers check the plumbing, not CUDA graphs' speed")


def report_ratios(R, rows, bt_dtype: str, filler: str) -> None:
    """The pipelines' speed ratios per repeat; load-normalized (by the matmul rate measured right before each
    phase) where both compute in one precision."""
    by = {(r["key"], r["task"]): (r["name"], r["sps"]) for r in rows}
    pairs = [("bt", "seed", "train"), ("gr", "bt", "train"), ("gr", "seed", "train"), ("bt", "seed", "infer")]
    for num, den, task in pairs:
        kn, kd = _key(num, task), _key(den, task)
        if (kn, task) not in by or (kd, task) not in by:
            continue
        ratios = [b / s for b, s in zip(_sps(R, num, task), _sps(R, den, task))]
        label = f"{by[(kn, task)][0]} / {by[(kd, task)][0]}"
        print(f"| {label} | {task} | {by[(kn, task)][1] / by[(kd, task)][1]:.2f}x "
              f"(per repeat: {', '.join(f'{x:.2f}' for x in ratios)}) |{filler}")
        if bt_dtype == "fp32" or den != "seed":  # one precision: the ratio per unit of machine speed next to each
            norm = [r * x["rate"] / y["rate"] for r, x, y in zip(ratios, R[kd], R[kn])]
            print(f"| {label}, load-normalized | {task} | {med(norm):.2f}x (per repeat: "
                  f"{', '.join(f'{x:.2f}' for x in norm)}) |{filler}")


def _key(who, task):
    return f"{who}_{'train' if task == 'train' else 'inf'}"


def _sps(R, who, task):
    key = _key(who, task)
    if task == "train":
        return [x["samples"] / x["seconds"] for x in R[key]]
    return [len(x["lengths"]) / x["seconds"] for x in R[key]]


if __name__ == "__main__":
    sys.exit(main())
