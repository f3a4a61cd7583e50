"""The `predict` verb: a Kaggle-style submission (ID,Label) for unlabelled texts, streamed in chunks."""

from __future__ import annotations

import contextlib
import csv
from pathlib import Path

from budgetune import artifacts
from budgetune import data as data_lib
from budgetune.errors import AdapterError
from budgetune.inference import table_logits
from budgetune.loading import load_for_inference


def predict(run: str | Path, input_file: str, output: str, *, text_column: str | None = None,
            label_format: str = "int", batch_size: int = 256,
            cache_dir: str | None = None) -> Path:
    """Write a Kaggle submission `ID,Label`: IDs are the input rows' positions 0..n-1, in input order."""
    if label_format not in ("int", "name"):
        raise AdapterError(f"--label_format must be int or name, got {label_format!r}")
    accelerator, model, tokenizer, info = load_for_inference(run)
    names = info["label_names"]
    n = 0
    # Chunk by chunk (a big file streams): memory stays bounded by the chunk, whatever the file's size.
    # Every process computes (the batches are sharded); only the main one writes.
    with contextlib.ExitStack() as stack:
        w = None
        if accelerator.is_main_process:
            f = stack.enter_context(open(stack.enter_context(artifacts.atomic_path(output)), "w", newline="",
                                         encoding="utf-8"))
            w = csv.writer(f, lineterminator="\n")
            w.writerow(["ID", "Label"])
        for texts in data_lib.iter_texts(input_file, text_column=text_column):
            table = data_lib.TextTable(texts, None, None, str(input_file))
            logits = table_logits(model, tokenizer, table, accelerator, batch_size, info["max_seq_length"], cache_dir)
            if w is not None:
                w.writerows([i, names[p] if label_format == "name" else int(p)]
                            for i, p in enumerate(logits.argmax(-1), n))
            n += len(texts)
    if accelerator.is_main_process:
        print(f"wrote {n} predictions to {output}")
    return Path(output)
