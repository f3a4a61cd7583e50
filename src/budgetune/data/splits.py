"""The tables a run trains and validates on: loaded from the config, validation carved (stratified, seeded)."""

from __future__ import annotations

import sys
from dataclasses import dataclass

import numpy as np

from budgetune import fileio, tasks
from budgetune.config import Config
from budgetune.data import readers as data_lib
from budgetune.hardware.devices import is_main_process
from budgetune.metrics import classification_metrics, cross_entropy


@dataclass
class Splits:
    train: data_lib.TextTable
    validation: data_lib.TextTable
    test: data_lib.TextTable | None
    label_names: list[str]  # regression: the target column
    validation_source: str = "the validation split"  # where the validation rows come from, in words
    task: str = "single_label"  # budgetune.tasks: how labels and logits are read


def load_splits(cfg: Config) -> Splits:
    """Train/validation(/test) tables; validation is carved from train (stratified, seeded) when the data has none."""
    d = cfg.data
    kw = {"text_column": d.text_column_name, "label_column": d.label_column_name, "label_names": d.label_names,
          "dataset_config_name": d.dataset_config_name, "task": d.task, "text_pair_column": d.text_pair_column_name,
          "label_delimiter": d.label_delimiter}
    train = data_lib.load_table(d.dataset_name, split="train", **kw)
    names = train.label_names
    kw["label_names"] = names if d.task != "regression" else None
    if d.validation_file:
        val, source = data_lib.load_table(d.validation_file, split="validation", **kw), d.validation_file
    elif data_lib.has_split(d.dataset_name, "validation", d.dataset_config_name):
        val = data_lib.load_table(d.dataset_name, split="validation", **kw)
        source = f"the validation split of {d.dataset_name}"
    else:  # never the test split: it must not choose the model
        train, val = data_lib.train_validation_split(train, d.validation_split_percentage / 100, cfg.train.seed)
        source = f"{d.validation_split_percentage:g}% held out of the training data"
    test = None
    if d.test_file:
        test = data_lib.load_table(d.test_file, split="test", **kw)
    elif data_lib.has_split(d.dataset_name, "test", d.dataset_config_name):  # reported only, never selects
        test = found_test_split(d.dataset_name, kw)
    train, val = train.first(d.max_train_samples or None), val.first(d.max_eval_samples or None)
    note_repeats(train, val)
    return Splits(train, val, test, names, source, d.task)


def note_repeats(train: data_lib.TextTable, val: data_lib.TextTable) -> None:
    """Say how many validation rows repeat a training text exactly (and its text pair): a held-out split is by row,
    so where a dataset holds duplicates, those rows are scored on texts the model trained on (one process says it)."""
    def keys(t: data_lib.TextTable):
        return zip(t.texts, t.text_pairs) if t.text_pairs is not None else t.texts

    seen = set(keys(train))
    n = sum(k in seen for k in keys(val))
    if n and is_main_process():
        print(f"note: {n} of {len(val.texts)} validation rows ({n / len(val.texts):.1%}) repeat a training text "
              "exactly; validation scores them too (deduplicate the data to leave them out)", file=sys.stderr)


def found_test_split(dataset: str, kw: dict) -> data_lib.TextTable | None:
    """The dataset's own test split when it has labels; a Kaggle-style test.csv without them (or the Hub's -1
    labels) is left for `predict`, with a note, instead of stopping the run."""
    test = data_lib.load_table(dataset, split="test", require_labels=False, **kw)
    if test.labels is None:
        print(f"note: the test split of {dataset} has no labels, so it is not scored; predict it with `budgetune "
              "predict RUN --input FILE`", file=sys.stderr)
        return None
    return test


def cache_dir(cfg: Config) -> str:
    return cfg.data.cache_dir or str(fileio.user_cache())


def scores(logits: np.ndarray, splits: Splits, thresholds=None) -> dict:
    """Validation metrics of the task (single-label: accuracy, macro-F1, per class, confusion matrix) and the loss
    of logits; multi-label at `thresholds` (None: 0.5 for every label)."""
    if splits.task != tasks.SINGLE_LABEL:
        return tasks.task_metrics(splits.task, logits, splits.validation.labels, splits.label_names, thresholds)
    m = classification_metrics(splits.validation.labels, logits.argmax(-1), splits.label_names)
    m["loss"] = cross_entropy(logits, splits.validation.labels)
    return m
