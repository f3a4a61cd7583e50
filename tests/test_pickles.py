"""Tests for budgetune.data.pickles: real data pickles load, code-running pickles are refused before running."""

from __future__ import annotations

import io
import os
import pathlib
import pickle
import re
import struct
import subprocess
import sys

import datasets
import numpy as np
import pandas as pd
import pyarrow as pa
import pytest
from datasets.table import InMemoryTable
from pandas.core.internals.blocks import Block

import budgetune
from budgetune.data.pickles import UnsafePickleError, load_pickle
from budgetune.data.readers import AG_NEWS_LABELS, DataError, load_table

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


# ------------------------------------------------------------------- pickles that would crash the process
# Each is loaded in a subprocess: on code that lets it through, the interpreter dies (SIGSEGV or SIGABRT), which
# fails that test without ending the test run.

LOAD = ("import sys\nfrom budgetune.data.readers import DataError, load_table\ntry:\n"
        "    load_table(sys.argv[1], require_labels=False)\nexcept DataError as e:\n"
        "    print(f'error: {e}', file=sys.stderr)\n    sys.exit(2)\n")


def load_in_subprocess(path: pathlib.Path) -> subprocess.CompletedProcess:
    src = str(pathlib.Path(budgetune.__file__).parents[1])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([src, os.environ.get("PYTHONPATH", "")])}
    return subprocess.run([sys.executable, "-c", LOAD, str(path)], env=env, capture_output=True, text=True,
                          timeout=120)


def frame_with_arrow(data: tuple) -> bytes:
    """A DataFrame of two Arrow strings pickled as pandas does, the strings' pickled layout replaced by `data`:
    (type, length, null count, offset, buffers, children, dictionary), which pyarrow.lib._restore_array takes."""
    class Crafted(pickle.Pickler):
        def reducer_override(self, obj):
            if isinstance(obj, pa.Array) and obj.to_pylist() == ["ab", "cd"]:  # not the column names' array
                return pa.lib._restore_array, (data,)
            return NotImplemented

    buf = io.BytesIO()
    Crafted(buf, protocol=5).dump(pd.DataFrame({"text": pd.array(["ab", "cd"], dtype="string[pyarrow]")}))
    return buf.getvalue()


def offsets(*values: int) -> pa.Buffer:
    return pa.py_buffer(struct.pack(f"<{len(values)}q", *values))


ARROW = "the pickle holds an invalid Arrow array"
ABCD = pa.py_buffer(b"abcd")
HOSTILE_ARROW = {  # name: (the strings' pickled layout, the error after "PATH: ")
    "offsets_past_data": ((pa.large_string(), 2, 0, 0, [None, offsets(0, 2, 1 << 40), ABCD], [], None),
                          f"{ARROW} (Length spanned by binary offsets (1099511627776) larger than values array "
                          "(size 4))"),
    "missing_buffers": ((pa.large_string(), 2, 0, 0, [None], [], None),
                        f"{ARROW} (Type's expected number of buffers (3) did not match the passed number (1).)"),
    "negative_offset": ((pa.large_string(), 2, 0, -(1 << 40), [None, offsets(0, 2, 4), ABCD], [], None),
                        f"{ARROW} (impossible array header (type DataType(large_string), length 2, offset "
                        "-1099511627776, null count 0))"),
    "list_without_child": ((pa.list_(pa.int64()), 2, 0, 0, [None, pa.py_buffer(bytes(12))], [], None),
                           f"{ARROW} (the child arrays do not match the type list<item: int64>)"),
    "dictionary_without_values": ((pa.dictionary(pa.int32(), pa.large_string()), 2, 0, 0,
                                   [None, pa.py_buffer(bytes(8))], [], None),
                                  f"{ARROW} (a dictionary<values=large_string, indices=int32, ordered=0> array "
                                  "without its dictionary)"),
    "dictionary_index_out_of_range": ((pa.dictionary(pa.int32(), pa.large_string()), 2, 0, 0,
                                       [None, pa.py_buffer(struct.pack("<2i", 0, 1 << 30))], [],
                                       (pa.large_string(), 1, 0, 0, [None, offsets(0, 2), ABCD], [], None)),
                                      f"{ARROW} (Index 1073741824 out of bounds)"),
}


@pytest.mark.parametrize("case", sorted(HOSTILE_ARROW))
def test_crafted_arrow_array_is_an_error_not_a_crash(tmp_path, case):
    layout, message = HOSTILE_ARROW[case]
    p = tmp_path / "test_unlabelled.pkl"
    p.write_bytes(frame_with_arrow(layout))
    proc = load_in_subprocess(p)
    assert (proc.returncode, proc.stderr) == (2, f"error: {p}: {message}\n")


def test_arrow_pickles_from_the_same_layouts_still_load(tmp_path):
    """The checked rebuild takes what pyarrow itself pickles: nested, dictionary, view and sliced arrays."""
    table = pa.table({"text": pa.array(["a", None, "ccc", "dd"]).slice(1),
                      "tags": pa.array([["x"], [], None, ["y", "z"]], pa.list_(pa.string())).slice(1),
                      "kind": pa.array(["p", "q", "p", "p"]).dictionary_encode().slice(1),
                      "view": pa.array(["a", "long enough to be out of line", None, "b"], pa.string_view()).slice(1),
                      "pair": pa.array([{"a": 1, "b": "x"}, None, {"a": 3, "b": None}, {"a": 4, "b": "y"}]).slice(1)})
    p = tmp_path / "d.pkl"
    p.write_bytes(pickle.dumps(InMemoryTable(table)))  # a Dataset would cast the dictionary column to strings
    assert load_pickle(p).table.equals(table)


def _dtype_with_field_past_its_end() -> np.dtype:
    d = np.dtype("V8", False, True)
    d.__setstate__((3, "|", None, ("a",), {"a": (np.dtype("<i8"), 1 << 30)}, 8, 1, 16))
    return d


def _frame_with_block_placed_at(column: int) -> bytes:
    class Crafted(pickle.Pickler):
        def reducer_override(self, obj):
            if isinstance(obj, Block) and obj.values.dtype.kind == "i":
                return obj.__reduce__()[0], (obj.values, slice(column, column + 1, 1), obj.ndim)
            return NotImplemented

    buf = io.BytesIO()
    Crafted(buf, protocol=5).dump(pd.DataFrame({"text": ["ab", "cd"], "label": [0, 1]}))
    return buf.getvalue()


def _categorical_with_code(code: int) -> bytes:
    cat = pd.Categorical([10, 20])
    return pickle.dumps(pd.DataFrame({"text": ["ab", "cd"],
                                      "label": cat._from_backing_data(np.array([0, code], dtype=np.int64))}))


HOSTILE_PANDAS = {  # name: (pickle bytes, the error after "PATH: ")
    "numpy_dtype_field_past_its_end": (
        lambda: pickle.dumps(pd.DataFrame({"text": ["ab", "cd"], "label": pd.array(
            list(np.zeros(2, dtype=_dtype_with_field_past_its_end())), dtype=object)})),
        "refusing to unpickle a numpy dtype with fields, a sub-array or an altered size or flags (state (3, '|', "
        "None, ('a',), {'a': (dtype('int64'), 1073741824)}, 8, 1, 16)): only plain column types are accepted"),
    "block_placed_past_the_columns": (
        lambda: _frame_with_block_placed_at(1 << 20),
        "the pickled DataFrame's blocks do not place each of its 2 columns exactly once (placements [[0], "
        "[1048576]])"),
    "categorical_code_past_the_categories": (
        lambda: _categorical_with_code(1 << 40),
        "a pickled categorical column has codes outside its 2 categories (from 0 to 1099511627776)"),
}


@pytest.mark.parametrize("case", sorted(HOSTILE_PANDAS))
def test_crafted_frame_is_an_error_not_a_crash(tmp_path, case):
    make, message = HOSTILE_PANDAS[case]
    p = tmp_path / "test_unlabelled.pkl"
    p.write_bytes(make())
    proc = load_in_subprocess(p)
    assert (proc.returncode, proc.stderr) == (2, f"error: {p}: {message}\n")


def test_inconsistent_dataset_state_is_a_data_error(tmp_path):
    """What the allow-list lets through is data, but its parts may not fit together: an error, not a traceback."""
    ds = datasets.Dataset.from_dict({"text": TEXTS})
    ds.__dict__["_data"] = {"text": TEXTS}  # a Dataset whose table is a plain dict
    p = tmp_path / "d.pkl"
    p.write_bytes(pickle.dumps(ds))
    with pytest.raises(DataError, match=re.escape(f"{p}: the pickled Dataset cannot be read (AttributeError: ")):
        load_table(str(p), require_labels=False)


def test_surrogate_text_in_a_pickle_names_the_row(tmp_path):
    p = tmp_path / "s.pkl"
    pd.DataFrame({"text": ["fine", "bad \ud800"]}, dtype=object).to_pickle(p)
    with pytest.raises(DataError) as info:
        load_table(str(p), require_labels=False)
    assert str(info.value) == (f"{p}, row 2, column 'text': 'bad \\ud800' holds a lone UTF-16 surrogate ('\\ud800', "
                               "character 5), which is not Unicode text")
