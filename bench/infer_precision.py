"""`budgetune predict`'s path in fp32, bf16 and int8 side by side, one process, the same texts: texts/s (tokenization
included) and accuracy on the run's validation split and on shifted_dev.csv per precision; int8 twice, by each
backend `--precision int8` can use (torch's dynamic quantization, and onnxruntime's where installed).

    python bench/infer_precision.py RUN [--texts 1024] [--repeats 3] [--threads 2] [--shifted FILE] [--out FILE]

RUN: a trained run folder (e.g. `budgetune train --config configs/minilm_agnews.yaml --max_train_samples 3200`).
The speed texts are the first --texts rows of the run's validation split (AG News: real lengths). The precisions
take turns going first over --repeats repeats; the table gives medians and the ratio to fp32, with every repeat's
figure, since the machine may be shared. Accuracy is measured once per precision on the whole validation split and
on --shifted (measure only: nothing is chosen on it), with the share of texts given fp32's class. The bundle's own
record (`inference_precision`, written when the run finished) is printed beside it. onnxruntime's int8 graph is
built on first use and cached (~/.cache/budgetune/onnx-int8); the time of its load, build included, is printed.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
SHIFTED = ROOT.parent / "shared" / "data" / "nyu_dlsp25_proj2" / "shifted_dev.csv"
PRECISIONS = ("fp32", "bf16", "int8 (torch)", "int8 (onnxruntime)")


def load_all(run: str) -> tuple[dict, dict[str, float]]:
    """({precision: (accelerator, model, tokenizer, info)}, {precision: load seconds}): each precision's model,
    loaded as predict loads it; int8 once per backend (precisions.prepare's backend; onnxruntime's where it is
    installed)."""
    from budgetune.hardware.devices import release_accelerator
    from budgetune.inference import precisions
    from budgetune.inference.loading import load_for_inference
    from budgetune.inference.onnx_graph import missing_module

    out, seconds = {}, {}
    for name in PRECISIONS:
        if name == "int8 (onnxruntime)" and missing_module() is not None:
            continue
        release_accelerator()  # each load makes its own accelerator (its own autocast)
        start = time.perf_counter()
        if name.startswith("int8"):  # fp32's accelerator (no autocast, as int8's), the model made int8 by backend
            accelerator, model, tokenizer, info = load_for_inference(run, precision="fp32")
            backend = name.split("(")[1].rstrip(")")
            model = precisions.prepare(model, precisions.named("int8", "bench"), tokenizer, backend)
            out[name] = (accelerator, model, tokenizer, info)
        else:
            out[name] = load_for_inference(run, precision=name)
        seconds[name] = time.perf_counter() - start
    return out, seconds


def logits(loaded, table, batch_size: int = 256) -> np.ndarray:
    from budgetune.inference.runner import table_logits

    accelerator, model, tokenizer, info = loaded
    return table_logits(model, tokenizer, table, accelerator, batch_size, info["max_seq_length"], desc="bench")


def timed(models: dict, table, repeats: int) -> dict[str, list[float]]:
    """texts/s per precision per repeat, the order rotated each repeat."""
    names = list(models)
    speeds: dict[str, list[float]] = {n: [] for n in names}
    for n in names:  # warm-up: kernels chosen, tokenization cached
        logits(models[n], table)
    for r in range(repeats):
        for n in names[r % len(names):] + names[:r % len(names)]:
            t = time.perf_counter()
            logits(models[n], table)
            speeds[n].append(len(table.texts) / (time.perf_counter() - t))
    return speeds


def accuracy(models: dict, table) -> dict[str, tuple[float, float]]:
    """{precision: (accuracy, share of texts given fp32's class)}."""
    labels = np.asarray(table.labels)
    preds = {n: logits(m, table).argmax(-1) for n, m in models.items()}
    return {n: (float(np.mean(p == labels)), float(np.mean(p == preds["fp32"]))) for n, p in preds.items()}


def main() -> None:
    import torch

    from budgetune.config import resolve
    from budgetune.data import readers
    from budgetune.data.splits import load_splits
    from budgetune.inference.loading import bundle_info
    from budgetune.inference.precision_choice import capability

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run")
    ap.add_argument("--texts", type=int, default=1024)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--shifted", default=str(SHIFTED))
    ap.add_argument("--out", help="also write the report (Markdown) here")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    names = bundle_info(a.run)["label_names"]
    val = load_splits(resolve(str(Path(a.run) / "config.yaml"), [])).validation
    speed_table = readers.TextTable(val.texts[:a.texts], None, None, "speed")
    shifted = readers.load_table(a.shifted, label_names=names) if Path(a.shifted).is_file() else None
    models, load_s = load_all(a.run)
    speeds = timed(models, speed_table, a.repeats)
    acc_val = accuracy(models, val)
    acc_shift = accuracy(models, shifted) if shifted is not None else {}
    base = statistics.median(speeds["fp32"])
    lines = [f"run {a.run}; {capability('cpu')} (set to {a.threads}); torch {torch.__version__}",
             f"speed: {len(speed_table.texts)} validation texts, predict's path (tokenize + length-sorted batches of "
             f"256, 2,048-token cap), medians of {a.repeats}, order rotated",
             f"accuracy: validation {len(val.texts)} rows"
             + (f", {Path(a.shifted).name} {len(shifted.texts)} rows" if shifted is not None else "")
             + "; agree: the share of texts given fp32's class",
             "load (s, int8 by onnxruntime: its graph built or read from the cache): "
             + ", ".join(f"{n} {s:.1f}" for n, s in load_s.items()), "",
             "| precision | texts/s (median) | x fp32 | per repeat | validation acc. (agree) "
             "| shifted_dev acc. (agree) |",
             "| --- | ---: | ---: | --- | ---: | ---: |"]
    for n in models:
        med = statistics.median(speeds[n])
        per = ", ".join(f"{s:.1f}" for s in speeds[n])
        shift = f"{acc_shift[n][0]:.2%} ({acc_shift[n][1]:.2%})" if n in acc_shift else "n/a"
        lines.append(f"| {n} | {med:.1f} | {med / base:.2f} | {per} | {acc_val[n][0]:.2%} ({acc_val[n][1]:.2%}) | "
                     f"{shift} |")
    lines += ["", "per-repeat ratios to fp32: " + "; ".join(
        f"{n} " + ", ".join(f"{s / f:.2f}" for s, f in zip(speeds[n], speeds["fp32"])) for n in models if n != "fp32")]
    record = bundle_info(a.run).get("inference_precision")
    lines += ["", "bundle's record (written when the run finished): "
              + (json.dumps(record) if record else "none (trained before the record existed)")]
    text = "\n".join(lines) + "\n"
    print(text)
    if a.out:
        Path(a.out).write_text(text, encoding="utf-8")


if __name__ == "__main__":
    main()
