"""`budgetune predict`'s path in fp32, bf16 and int8 side by side, one process, the same texts: texts/s (tokenization
included) and accuracy on the run's validation split and on shifted_dev.csv per precision.

    python bench/infer_precision.py RUN [--texts 1024] [--repeats 3] [--threads 2] [--shifted FILE] [--out FILE]

RUN: a trained run folder (e.g. `budgetune train --config configs/minilm_agnews.yaml --max_train_samples 3200`).
The speed texts are the first --texts rows of the run's validation split (AG News: real lengths). The precisions
take turns going first over --repeats repeats; the table gives medians and the ratio to fp32, with every repeat's
figure, since the machine may be shared. Accuracy is measured once per precision on the whole validation split and
on --shifted (measure only: nothing is chosen on it). The bundle's own record (`inference_precision`, written when
the run finished) is printed beside it.
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
PRECISIONS = ("fp32", "bf16", "int8")


def load_all(run: str) -> dict:
    """{precision: (accelerator, model, tokenizer, info)}: each precision's model, loaded as predict loads it."""
    from budgetune.hardware.devices import release_accelerator
    from budgetune.inference.loading import load_for_inference

    out = {}
    for name in PRECISIONS:
        release_accelerator()  # each load makes its own accelerator (its own autocast)
        out[name] = load_for_inference(run, precision=name)
    return out


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


def accuracy(models: dict, table) -> dict[str, float]:
    labels = np.asarray(table.labels)
    return {n: float(np.mean(logits(m, table).argmax(-1) == labels)) for n, m in models.items()}


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
    models = load_all(a.run)
    speeds = timed(models, speed_table, a.repeats)
    acc_val = accuracy(models, val)
    acc_shift = accuracy(models, shifted) if shifted is not None else {}
    base = statistics.median(speeds["fp32"])
    lines = [f"run {a.run}; {capability('cpu')} (set to {a.threads}); torch {torch.__version__}",
             f"speed: {len(speed_table.texts)} validation texts, predict's path (tokenize + length-sorted batches of "
             f"256, 2,048-token cap), medians of {a.repeats}, order rotated",
             f"accuracy: validation {len(val.texts)} rows"
             + (f", {Path(a.shifted).name} {len(shifted.texts)} rows" if shifted is not None else ""), "",
             "| precision | texts/s (median) | x fp32 | per repeat | validation acc. | shifted_dev acc. |",
             "| --- | ---: | ---: | --- | ---: | ---: |"]
    for n in models:
        med = statistics.median(speeds[n])
        per = ", ".join(f"{s:.1f}" for s in speeds[n])
        shift = f"{acc_shift[n]:.2%}" if n in acc_shift else "n/a"
        lines.append(f"| {n} | {med:.1f} | {med / base:.2f} | {per} | {acc_val[n]:.2%} | {shift} |")
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
