"""The `evaluate` verb: metrics of a saved adapter on labelled files."""

from __future__ import annotations

from pathlib import Path

from budgetune import artifacts
from budgetune import data as data_lib
from budgetune.inference import table_logits
from budgetune.loading import bundle_info, load_for_inference
from budgetune.metrics import classification_metrics, cross_entropy, metrics_text


def evaluate(run: str | Path, data_file: str, *, split: str = "test", text_column: str | None = None,
             label_column: str | None = None, batch_size: int = 256, output: str | None = None,
             cache_dir: str | None = None) -> dict:
    """Accuracy, macro-F1, per-class scores and confusion matrix of the saved adapter on a labelled file."""
    names = bundle_info(run)["label_names"]
    table = data_lib.load_table(data_file, split=split, text_column=text_column, label_column=label_column,
                                label_names=names)
    accelerator, model, tokenizer, info = load_for_inference(run)
    logits = table_logits(model, tokenizer, table, accelerator, batch_size, info["max_seq_length"], cache_dir)
    m = classification_metrics(table.labels, logits.argmax(-1), names)
    m["loss"] = cross_entropy(logits, table.labels)
    m["data_file"] = str(data_file)
    if accelerator.is_main_process:
        stem = Path(output) if output else Path(run) / f"evaluation-{Path(data_file).stem}"
        artifacts.atomic_write_json(stem.with_suffix(".json"), m)
        artifacts.atomic_write_text(stem.with_suffix(".txt"), metrics_text(m, f"{data_file}"))
        print(metrics_text(m, f"{data_file}"), end="")
    return m
