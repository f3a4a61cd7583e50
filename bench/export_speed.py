"""ONNX Runtime (fp32 and int8) against budgetune's own inference, side by side in one process, on a trained run.

    budgetune train --config configs/minilm_agnews.yaml --max_train_samples 3200 --max_eval_samples 1000 \\
        --mixed_precision auto --output_dir runs/minilm3200
    python bench/export_speed.py runs/minilm3200                  # 1,024 AG News texts, 3 repeats
    python bench/export_speed.py runs/minilm3200 --texts 2048 --repeats 5 --threads 2

Exports RUN with `budgetune export --format onnx --quantize int8` into a temporary folder, then times, alternating
the variants in every repeat (medians), each from the texts to the logits (tokenization included), at the same
thread count:
- budgetune fp32 and budgetune auto (bf16 where the CPU has bf16 instructions): `loading.load_for_inference` +
  `runner.table_logits`, what `budgetune predict` does per chunk;
- onnxruntime fp32 (model.onnx) and int8 (model_int8.onnx): the exported tokenizer, then the same length-sorted
  batches as budgetune's (`batching.SortedBatchSampler`, the CPU token cap), padded per batch.
Texts: N random rows of the AG News CSV (the run may have trained on some of them: accuracy there is for comparing
the precisions with each other) and, where present, the held-out shifted_dev.csv.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"
AG_NEWS = SHARED / "ag_news" / "train.csv"
SHIFTED = SHARED / "nyu_dlsp25_proj2" / "shifted_dev.csv"


def ort_variant(path: Path, folder: Path, threads: int, max_seq_length: int, batch_size: int, cap: int | None):
    """texts -> logits with onnxruntime: tokenized, length-sorted batches as budgetune's, padded per batch."""
    import numpy as np
    from transformers import AutoTokenizer

    from budgetune.data import batching
    from budgetune.inference.onnx_graph import session as ort_session

    session = ort_session(path, threads)
    names = [i.name for i in session.get_inputs()]
    tokenizer = AutoTokenizer.from_pretrained(folder)

    def run(texts: list[str]) -> np.ndarray:
        enc = tokenizer(texts, truncation=True, max_length=max_seq_length)
        lengths = [len(ids) for ids in enc["input_ids"]]
        out = np.zeros((len(texts), 0), dtype=np.float32)
        for batch in batching.SortedBatchSampler(lengths, batch_size, max_tokens=cap):
            padded = tokenizer.pad({n: [enc[n][i] for i in batch] for n in names}, return_tensors="np")
            logits = session.run(None, {n: padded[n].astype(np.int64) for n in names})[0]
            if out.shape[1] == 0:
                out = np.zeros((len(texts), logits.shape[1]), dtype=np.float32)
            out[batch] = logits
        return out

    return run


def budgetune_variants(run_dir: str, batch_size: int):
    """texts -> logits with budgetune's own inference (load_for_inference + table_logits), in fp32 and in the
    precision `auto` picks here. accelerate allows one precision per process: the fp32 accelerator runs both, the
    second inside the CPU autocast accelerate itself applies for bf16."""
    import contextlib

    import torch

    from budgetune.data import readers as data_lib
    from budgetune.hardware.devices import resolve_precision
    from budgetune.inference.loading import load_for_inference

    os.environ.pop("BUDGETUNE_MIXED_PRECISION", None)
    auto = resolve_precision("auto")
    os.environ["BUDGETUNE_MIXED_PRECISION"] = "fp32"
    accelerator, model, tokenizer, info = load_for_inference(run_dir)
    os.environ.pop("BUDGETUNE_MIXED_PRECISION", None)

    def variant(dtype):
        def run(texts: list[str]):
            from budgetune.inference.runner import table_logits

            table = data_lib.TextTable(texts, None, None, "bench")
            with torch.autocast("cpu", dtype=dtype) if dtype else contextlib.nullcontext():
                return table_logits(model, tokenizer, table, accelerator, batch_size, info["max_seq_length"],
                                    desc="bench")
        return run

    dtypes = {"bf16": torch.bfloat16, "fp16": torch.float16}
    return variant(None), variant(dtypes.get(auto.mixed_precision)), auto.name, info


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run", help="a trained run folder (MiniLM on AG News: see above)")
    p.add_argument("--texts", type=int, default=1024, help="AG News texts, random rows (seed 0) of --data (default 1024)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=2, help="torch and onnxruntime intra-op threads (default 2)")
    p.add_argument("--batch_size", type=int, default=256, help="texts per batch (budgetune's default)")
    p.add_argument("--data", default=str(AG_NEWS))
    a = p.parse_args(argv)
    os.environ["CUDA_VISIBLE_DEVICES"] = ""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TQDM_DISABLE", "1")  # no progress bars between the tables
    if not Path(a.data).is_file():
        print(f"skipped: {a.data} not found")
        return 0

    import datasets
    import numpy as np
    import torch
    import transformers

    from budgetune.data import readers as data_lib
    from budgetune.hardware.devices import CPU_BATCH_TOKENS, cpu_capabilities
    from budgetune.inference.export_onnx import export_onnx

    datasets.disable_progress_bars()
    transformers.logging.set_verbosity_error()
    torch.set_num_threads(a.threads)
    sets = {}
    table = data_lib.load_table(a.data)
    pick = np.random.default_rng(0).permutation(len(table.texts))[:a.texts]
    sets[f"AG News {a.texts} random rows"] = ([table.texts[i] for i in pick], [table.labels[i] for i in pick])
    if SHIFTED.is_file():
        shifted = data_lib.load_table(str(SHIFTED))
        sets[f"shifted_dev {len(shifted.texts)}"] = (shifted.texts, shifted.labels)
    folder = Path(tempfile.mkdtemp(prefix="export-speed-")) / "onnx"
    t = time.perf_counter()
    export_onnx(a.run, folder, quantize="int8")
    export_s = time.perf_counter() - t
    fp32, auto, auto_name, info = budgetune_variants(a.run, a.batch_size)
    ort = {kind: ort_variant(folder / f"model{suffix}.onnx", folder, a.threads, info["max_seq_length"], a.batch_size,
                             CPU_BATCH_TOKENS) for kind, suffix in (("fp32", ""), ("int8", "_int8"))}
    variants = {"budgetune fp32": fp32, f"budgetune auto ({auto_name})": auto,
                "onnxruntime fp32": ort["fp32"], "onnxruntime int8": ort["int8"]}
    caps = cpu_capabilities()
    found = [k for k in ("amx_bf16", "amx_int8", "avx512_bf16", "avx512_vnni", "avx_vnni") if caps.get(k)]
    import onnxruntime

    print(f"run {a.run} ({info['method']}, {info['base_model_name_or_path']}, max_seq_length {info['max_seq_length']}); "
          f"{a.threads} threads; torch {torch.__version__}, onnxruntime {onnxruntime.__version__}; CPU matrix "
          f"instructions: {', '.join(found) or 'none of AMX, AVX512-BF16, VNNI'}; export (with int8) {export_s:.1f} s")
    print(f"model.onnx {(folder / 'model.onnx').stat().st_size / 1e6:.1f} MB, model_int8.onnx "
          f"{(folder / 'model_int8.onnx').stat().st_size / 1e6:.1f} MB; medians of {a.repeats} repeats, variants "
          "alternating")
    for name, (texts, labels) in sets.items():
        logits = {k: fn(texts) for k, fn in variants.items()}  # untimed warm-up; its logits for the accuracy
        seconds = {k: [] for k in variants}
        for _ in range(a.repeats):
            for k, fn in variants.items():
                t = time.perf_counter()
                fn(texts)
                seconds[k].append(time.perf_counter() - t)
        ref = logits["budgetune fp32"]
        base = statistics.median(seconds["budgetune fp32"])
        print(f"\n{name} texts")
        print("| variant | texts/s | vs budgetune fp32 | accuracy | same class as fp32 | max abs logit diff | "
              "per repeat (s) |")
        print("|---|---|---|---|---|---|---|")
        for k, xs in seconds.items():
            m = statistics.median(xs)
            acc = float((logits[k].argmax(-1) == np.asarray(labels)).mean())
            same = float((logits[k].argmax(-1) == ref.argmax(-1)).mean())
            print(f"| {k} | {len(texts) / m:.1f} | {base / m:.2f}x | {acc:.2%} | {same:.2%} | "
                  f"{float(np.abs(logits[k] - ref).max()):.2g} | {', '.join(f'{x:.2f}' for x in xs)} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
