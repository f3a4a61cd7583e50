"""Use a saved adapter: evaluate it on labelled data, or write a Kaggle submission for unlabelled texts."""

from __future__ import annotations

import contextlib
import csv
import json
from pathlib import Path

from budgetune import artifacts, methods
from budgetune import data as data_lib
from budgetune.evaluate import (
    classification_metrics,
    cross_entropy,
    inference_loader,
    make_accelerator,
    metrics_text,
    predict_logits,
    token_cap,
)


class AdapterError(RuntimeError):
    """A run folder or adapter folder that cannot be used; the message names it."""


def adapter_dir(run_or_adapter: str | Path) -> Path:
    """A run folder -> its best adapter; an adapter folder -> itself."""
    p = Path(run_or_adapter)
    for cand in (p, p / "adapter"):
        if (cand / "adapter_config.json").is_file() and (cand / artifacts.BUNDLE_FILE).is_file():
            return cand
    raise AdapterError(f"{p}: no adapter here (expected adapter_config.json and {artifacts.BUNDLE_FILE}, "
                       "in the folder or in its adapter/ subfolder)")


def load_model(run_or_adapter: str | Path):
    """(peft model in eval mode, tokenizer, bundle info) through plain transformers + peft, as a user would."""
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    folder = adapter_dir(run_or_adapter)
    info = json.loads((folder / artifacts.BUNDLE_FILE).read_text())
    names = info["label_names"]
    base = AutoModelForSequenceClassification.from_pretrained(
        methods.resolve_model_path(info["base_model_name_or_path"]), num_labels=len(names),
        id2label=dict(enumerate(names)), label2id={n: i for i, n in enumerate(names)})
    methods.apply_head(base, info["head"])
    model = PeftModel.from_pretrained(base, folder).eval()
    methods.merge_for_inference(model)
    methods.first_token_last_layer(model)
    return model, AutoTokenizer.from_pretrained(folder), info


def _logits(run: str | Path, table: data_lib.TextTable, batch_size: int, cache_dir: str | None, loaded=None):
    accelerator, (model, tokenizer, info) = loaded or _load(run)
    with accelerator.main_process_first():
        ds = data_lib.tokenize(table, tokenizer, info["max_seq_length"], cache_dir)
    pad = 8 if accelerator.device.type == "cuda" else None
    loader = accelerator.prepare(inference_loader(ds, tokenizer, batch_size, pad,
                                                 max_tokens=token_cap(accelerator.device)))
    return predict_logits(model, loader, accelerator, len(ds), desc="predict"), info, accelerator


def _load(run: str | Path):
    from budgetune.train import mixed_precision

    accelerator = make_accelerator(mixed_precision=mixed_precision("auto"))  # bf16 on a GPU that has it
    model, tokenizer, info = load_model(run)
    # evaluation_mode: placed on the device, not wrapped in DDP (nothing trains; DDP refuses frozen models)
    return accelerator, (accelerator.prepare_model(model, evaluation_mode=True), tokenizer, info)


def evaluate(run: str | Path, data_file: str, *, split: str = "test", text_column: str | None = None,
             label_column: str | None = None, batch_size: int = 256, output: str | None = None,
             cache_dir: str | None = None) -> dict:
    """Accuracy, macro-F1, per-class scores and confusion matrix of the saved adapter on a labelled file."""
    names = json.loads((adapter_dir(run) / artifacts.BUNDLE_FILE).read_text())["label_names"]
    table = data_lib.load_table(data_file, split=split, text_column=text_column, label_column=label_column,
                                label_names=names)
    logits, info, acc = _logits(run, table, batch_size, cache_dir)
    m = classification_metrics(table.labels, logits.argmax(-1), names)
    m["loss"] = cross_entropy(logits, table.labels)
    m["data_file"] = str(data_file)
    if acc.is_main_process:
        stem = Path(output) if output else Path(run) / f"evaluation-{Path(data_file).stem}"
        artifacts.atomic_write_json(stem.with_suffix(".json"), m)
        artifacts.atomic_write_text(stem.with_suffix(".txt"), metrics_text(m, f"{data_file}"))
        print(metrics_text(m, f"{data_file}"), end="")
    return m


def predict(run: str | Path, input_file: str, output: str, *, text_column: str | None = None,
            label_format: str = "int", batch_size: int = 256,
            cache_dir: str | None = None) -> Path:
    """Write a Kaggle submission `ID,Label`: IDs are the input rows' positions 0..n-1, in input order."""
    if label_format not in ("int", "name"):
        raise AdapterError(f"--label_format must be int or name, got {label_format!r}")
    loaded = _load(run)
    accelerator, (_, _, info) = loaded
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
            logits, _, _ = _logits(run, table, batch_size, cache_dir, loaded)
            if w is not None:
                w.writerows([i, names[p] if label_format == "name" else int(p)]
                            for i, p in enumerate(logits.argmax(-1), n))
            n += len(texts)
    if accelerator.is_main_process:
        print(f"wrote {n} predictions to {output}")
    return Path(output)
