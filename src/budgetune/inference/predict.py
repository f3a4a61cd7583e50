"""A Kaggle-style submission (ID,Label) for unlabelled texts, streamed in chunks."""

from __future__ import annotations

import contextlib
import csv
import json
import sys
from pathlib import Path

import numpy as np

from budgetune import fileio, tasks
from budgetune.data import readers as data_lib
from budgetune.errors import AdapterError, ConfigError, DataError
from budgetune.inference.loading import bundle_task, bundle_thresholds, load_for_inference
from budgetune.inference.runner import require_finite, table_logits

BLANK_SHOWN = 10  # row numbers listed in the warning about empty texts


def predict(run: str | Path, input_file: str, output: str, *, text_column: str | None = None,
            label_format: str = "int", batch_size: int = 256, cache_dir: str | None = None,
            adapter_scale: float | None = None, probabilities: bool = False, id_column: str | None = None,
            text_pair_column: str | None = None, precision: str = "auto") -> Path:
    """Write a Kaggle submission `ID,Label` in input order: IDs are the rows' positions 0..n-1, or the values of
    the input's `id_column`. Label: the class (single_label), the set of labels as a JSON array (multi_label, at
    the bundle's thresholds), or the value (regression).

    adapter_scale: None applies the bundle's recorded default (1 when it has none). probabilities: one more column
    per class (per label), named by its label, with the softmax (sigmoid) probability. text_pair_column: the
    input's second text column (default: the bundle's). precision: auto, fp32, bf16 or int8
    (inference.precisions).
    """
    if label_format not in ("int", "name"):
        raise AdapterError(f"--label_format must be int or name, got {label_format!r}")
    check_output(input_file, output)
    accelerator, model, tokenizer, info = load_for_inference(run, adapter_scale=adapter_scale, precision=precision,
                                                             cache_dir=cache_dir)
    names, task = info["label_names"], bundle_task(info)
    if task == tasks.REGRESSION and (probabilities or label_format == "name"):
        flag = "--probabilities" if probabilities else "--label_format name"
        raise AdapterError(f"{flag}: {run} is a regression model; it predicts values, not classes")
    pair_column = text_pair_column or info.get("text_pair_column_name")
    n, blank, first_blank = 0, 0, []  # rows with empty text: how many, and the first few
    id_rows: dict[str, int] = {}  # --id_column: each ID's row (1 = the first data row), to refuse a repeat
    # Chunk by chunk (a big file streams): memory stays bounded by the chunk, whatever the file's size.
    # Every process computes (the batches are sharded); only the main one writes.
    with contextlib.ExitStack() as stack:
        w = None
        if accelerator.is_main_process:
            f = stack.enter_context(open(stack.enter_context(fileio.atomic_path(output)), "w", newline="",
                                         encoding="utf-8"))
            w = csv.writer(f, lineterminator="\n")
            w.writerow(["ID", "Label"] + (list(names) if probabilities else []))
        for table in data_lib.iter_tables(input_file, text_column=text_column, id_column=id_column, task=task,
                                          text_pair_column=pair_column, label_delimiter=info.get("label_delimiter")):
            texts, ids = table.texts, table.ids
            if ids is not None:
                check_unique_ids(input_file, id_column, ids, n, id_rows)
            rows = [n + i + 1 for i, t in enumerate(texts) if not t.strip()]
            blank, first_blank = blank + len(rows), (first_blank + rows)[:BLANK_SHOWN]
            logits = table_logits(model, tokenizer, table, accelerator, batch_size, info["max_seq_length"], cache_dir)
            require_finite(logits, input_file, info["precision"]["precision"], first_row=n + 1)
            if w is not None:
                labels = answers(task, logits, names, label_format, bundle_thresholds(info))
                probs = tasks.probabilities(task, logits) if probabilities else np.zeros((len(logits), 0))
                w.writerows([i, label, *(f"{q:.6f}" for q in row)]
                            for i, label, row in zip(ids or range(n, n + len(logits)), labels, probs))
            n += len(texts)
    if accelerator.is_main_process:
        warn_blank(input_file, blank, first_blank)
        print(f"wrote {n} predictions to {output} (adapter scale {info['applied_adapter_scale']:g})")
    return Path(output)


def check_output(input_file: str, output: str) -> None:
    """Refuse an --output that would replace the input's texts, or that is a folder, before any model loads."""
    out = Path(output)
    if out.is_dir():
        raise ConfigError(f"--output {output} is a folder; give the path of the submission file to write")
    if out.exists() and Path(input_file).exists() and out.resolve() == Path(input_file).resolve():
        raise ConfigError(f"--output {output} is the --input file: the submission would replace the texts; choose "
                          "another path")


def check_unique_ids(input_file: str, id_column: str, ids: list[str], start: int, seen: dict[str, int]) -> None:
    """Refuse an ID that repeats one of an earlier row (a submission keys its rows by ID), naming both rows."""
    for i, row_id in enumerate(ids, start + 1):
        first = seen.setdefault(row_id, i)
        if first != i:
            raise DataError(f"{input_file}, row {i}: ID {row_id!r} (column {id_column!r}, --id_column) repeats row "
                            f"{first}'s; a submission needs one row per ID")


def answers(task: str, logits: np.ndarray, names: list[str], label_format: str, thresholds=None) -> list:
    """The Label cell of each row: the class (its index or name), the label set as a JSON array (of indices or
    names), or the value (regression; several targets: a JSON array)."""
    preds = tasks.predictions(task, logits, thresholds)
    if task == tasks.SINGLE_LABEL:
        return [names[p] if label_format == "name" else int(p) for p in preds]
    if task == tasks.MULTI_LABEL:
        return [json.dumps([names[k] if label_format == "name" else k for k in np.flatnonzero(row).tolist()],
                           ensure_ascii=False) for row in preds]
    return [f"{row[0]:.7g}" if len(row) == 1 else json.dumps([float(f"{v:.7g}") for v in row]) for row in preds]


def warn_blank(input_file: str, count: int, first: list[int]) -> None:
    """One warning for the rows whose text is empty or whitespace: they are predicted (from no words: the model's
    prior), and kept so that every ID keeps its row. `first`: the first rows' numbers (1 = the first data row)."""
    if count:
        listed = ", ".join(map(str, first)) + (", ..." if count > len(first) else "")
        print(f"budgetune: warning: {input_file}: {count} row{'s' if count > 1 else ''} with empty or "
              f"whitespace-only text (row{'s' if count > 1 else ''} {listed}), predicted from no text at all and "
              "kept in the submission", file=sys.stderr)


