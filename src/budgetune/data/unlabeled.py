"""Unlabelled target texts for distillation and self-training: loaded, checked, and kept apart from held-out data.

A text that also appears in the validation or test data (exactly, or after normalisation) is dropped: learning
from the teacher's or the model's own answer on a held-out text would leak it into selection or into the report.
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Iterable
from dataclasses import dataclass, field

from budgetune.data import readers as data_lib
from budgetune.errors import DataError

UNLABELED = -100  # the label of an unlabelled row: cross-entropy (torch and transformers) ignores it

_NON_WORD = re.compile(r"[\W_]+", re.UNICODE)


def normalise(text: str) -> str:
    """Case, accents' composition, punctuation and spacing folded: "Stocks  rally!" == "stocks rally"."""
    folded = unicodedata.normalize("NFKC", text).casefold()
    return " ".join(_NON_WORD.sub(" ", folded).split())


@dataclass
class Dedup:
    """What was dropped from the unlabelled texts, and why (counts)."""

    read: int
    kept: list[str]
    exact_heldout: int = 0
    normalised_heldout: int = 0
    labelled: int = 0
    repeated: int = 0
    empty: int = 0
    sources: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return {"read": self.read, "kept": len(self.kept), "dropped_exact_validation_or_test": self.exact_heldout,
                "dropped_normalised_validation_or_test": self.normalised_heldout,
                "dropped_in_labelled_training_data": self.labelled, "dropped_repeated": self.repeated,
                "dropped_empty": self.empty, "held_out_sources": self.sources}

    def summary(self, path: str) -> str:
        return (f"{path}: {self.read} unlabelled texts, {len(self.kept)} kept; dropped {self.exact_heldout} exact and "
                f"{self.normalised_heldout} normalised duplicates of validation/test texts, {self.labelled} already "
                f"in the labelled training data, {self.repeated} repeats, {self.empty} empty")


def load_texts(path: str, text_column: str | None = None, flag: str = "--unlabeled_file") -> list[str]:
    """The texts of an unlabelled file (any format load_table reads; a label column, if any, is ignored)."""
    try:
        table = data_lib.load_table(path, split="train", text_column=text_column, require_labels=False,
                                    read_labels=False)
    except DataError as e:
        raise DataError(f"{flag}: {e}") from None
    if not table.texts:
        raise DataError(f"{flag}: {path}: no texts")
    return table.texts


def drop_heldout(texts: Iterable[str], heldout: list[data_lib.TextTable],
                 labelled: data_lib.TextTable | None = None) -> Dedup:
    """Drop texts found in held-out tables (exact, then normalised), in the labelled data, repeats and blanks."""
    texts = list(texts)
    exact = {t for table in heldout for t in table.texts}
    norm = {normalise(t) for t in exact}
    train_norm = {normalise(t) for t in labelled.texts} if labelled is not None else set()
    out = Dedup(read=len(texts), kept=[], sources=[t.source for t in heldout])
    seen: set[str] = set()
    for t in texts:
        n = normalise(t)
        if not n:
            out.empty += 1
        elif t in exact:
            out.exact_heldout += 1
        elif n in norm:
            out.normalised_heldout += 1
        elif n in train_norm:  # it has a gold label already; a second, guessed one could only disagree
            out.labelled += 1
        elif n in seen:
            out.repeated += 1
        else:
            seen.add(n)
            out.kept.append(t)
    return out


def heldout_tables(validation: data_lib.TextTable, test: data_lib.TextTable | None) -> list[data_lib.TextTable]:
    return [validation] + ([test] if test is not None else [])


def load_unlabeled(path: str, validation: data_lib.TextTable, test: data_lib.TextTable | None,
                   labelled: data_lib.TextTable, text_column: str | None = None,
                   flag: str = "--unlabeled_file") -> Dedup:
    """Read the unlabelled file and drop what must not be learnt from; an error if nothing is left."""
    texts = load_texts(path, text_column, flag)
    found = drop_heldout(texts, heldout_tables(validation, test), labelled)
    if not found.kept:
        raise DataError(f"{flag}: {path}: no text left after dropping validation/test duplicates "
                        f"({found.summary(path)})")
    return found


def with_unlabeled(train: data_lib.TextTable, texts: list[str], labels: list | None = None,
                   text_pairs: list[str] | None = None) -> data_lib.TextTable:
    """The training table followed by `texts` (and their `text_pairs`, where the table has pairs), labelled `labels`
    or UNLABELED; rows 0..n-1 stay the labelled ones."""
    extra = labels if labels is not None else [UNLABELED] * len(texts)
    if (train.text_pairs is None) != (text_pairs is None):
        raise ValueError("the training table and the added texts must both have text pairs, or neither")
    pairs = None if text_pairs is None else list(train.text_pairs) + list(text_pairs)
    return data_lib.TextTable(list(train.texts) + list(texts), list(train.labels or []) + list(extra),
                              train.label_names, train.source, text_pairs=pairs)
