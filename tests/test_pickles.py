"""Tests for budgetune.pickles: real data pickles load, code-running pickles are refused before running."""

from __future__ import annotations

import os
import pathlib
import pickle
import re

import datasets
import pandas as pd
import pytest

from budgetune.data import AG_NEWS_LABELS, DataError, load_table
from budgetune.pickles import UnsafePickleError, load_pickle

TEXTS = ["Oil prices climb", "Cup final, 3-1", 'Chip "ships"']


class TouchViaSystem:
    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


class TouchViaPath:
    def __init__(self, marker):
        self.marker = pathlib.Path(marker)

    def __reduce__(self):
        return pathlib.Path.touch, (self.marker,)


@pytest.mark.parametrize("maker, culprit", [(TouchViaSystem, "posix.system"), (TouchViaPath, "pathlib")])
def test_malicious_pickle_is_refused_before_running(tmp_path, maker, culprit):
    marker = tmp_path / "pwned"
    p = tmp_path / "test_unlabelled.pkl"
    # wrap it in a DataFrame-looking dict so the payload is not the first thing the unpickler sees
    p.write_bytes(pickle.dumps({"text": TEXTS, "x": maker(marker)}))
    with pytest.raises(UnsafePickleError) as info:
        load_table(str(p), require_labels=False)
    assert re.fullmatch(re.escape(f"{p}: refusing to unpickle '") + re.escape(culprit) + r"[\w.]*" +
                        re.escape("': only pandas DataFrames and Hugging Face Datasets are accepted"), str(info.value))
    assert isinstance(info.value, DataError) and not marker.exists()


@pytest.mark.parametrize("payload", [(eval, ("1",)), (getattr, ("x", "upper")), (__import__, ("os",))])
def test_generic_callables_refused(tmp_path, payload):
    class Evil:
        def __reduce__(self):
            return payload

    p = tmp_path / "e.pkl"
    p.write_bytes(pickle.dumps(Evil()))
    with pytest.raises(UnsafePickleError, match="refusing to unpickle 'builtins."):
        load_pickle(p)


@pytest.mark.parametrize("protocol", [0, 2, 4, 5])
def test_dataset_pickles_load(tmp_path, protocol):
    p = tmp_path / "test_unlabelled.pkl"
    p.write_bytes(pickle.dumps(datasets.Dataset.from_dict({"text": TEXTS}), protocol=protocol))
    table = load_table(str(p), require_labels=False)
    assert table.texts == TEXTS and table.labels is None
    feats = datasets.Features({"text": datasets.Value("string"), "label": datasets.ClassLabel(names=AG_NEWS_LABELS)})
    ds = datasets.Dataset.from_dict({"text": TEXTS, "label": [2, 1, 3]}, features=feats, split="test")
    p.write_bytes(pickle.dumps(ds, protocol=protocol))
    table = load_table(str(p))
    assert table.labels == [2, 1, 3] and table.label_names == AG_NEWS_LABELS


def test_dataset_dict_and_dataframe(tmp_path):
    dd = datasets.DatasetDict({"train": datasets.Dataset.from_dict({"text": ["a"], "label": [0]}),
                               "test": datasets.Dataset.from_dict({"text": TEXTS})})
    p = tmp_path / "dd.pickle"
    p.write_bytes(pickle.dumps(dd))
    assert load_table(str(p), split="test", require_labels=False).texts == TEXTS
    with pytest.raises(DataError, match=re.escape(f"{p}: no split 'validation' (splits: train, test)")):
        load_table(str(p), split="validation")
    df = pd.DataFrame({"text": TEXTS, "label": pd.Categorical(["b", "a", "b"])})
    q = tmp_path / "df.pkl"
    df.to_pickle(q)
    table = load_table(str(q))
    assert table.texts == TEXTS and table.labels == [1, 0, 1] and table.label_names == ["a", "b"]


def test_not_a_data_object_or_not_a_pickle(tmp_path):
    p = tmp_path / "l.pkl"
    p.write_bytes(pickle.dumps([1, 2]))
    with pytest.raises(DataError, match=re.escape(f"{p}: expected a pandas DataFrame or a Hugging Face Dataset, "
                                                  "found list")):
        load_table(str(p))
    p.write_bytes(b"not a pickle at all")
    with pytest.raises(DataError, match=re.escape(f"{p}: not a readable pickle (")):
        load_pickle(p)
