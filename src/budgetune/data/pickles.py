"""Restricted unpickling of pandas DataFrames and Hugging Face Datasets (e.g. a competition's test_unlabelled.pkl)."""

from __future__ import annotations

import functools
import os
import pickle
from pathlib import Path

import numpy as np
import pyarrow as pa

from budgetune.errors import DataError, UnsafePickleError

# Every global that pickles of a DataFrame, Dataset (with ClassLabel, List, split info) or DatasetDict request,
# recorded with pandas 3.1, numpy 2.4, pyarrow 26 and datasets 5.2 at protocols 0-5, plus the older module
# paths of the same classes (numpy 1.x, pandas 1.x/2.x) so files written by older installs still load.
# Each entry rebuilds data only; none can run code, import modules, open files or fetch attributes.
_ALLOWED: frozenset[tuple[str, str]] = frozenset({
    # protocol 0-2 plumbing: object reconstruction and bytes
    ("copyreg", "_reconstructor"), ("copy_reg", "_reconstructor"), ("_codecs", "encode"),
    *((m, n) for m in ("builtins", "__builtin__") for n in ("object", "dict", "list", "slice", "bytearray")),
    # numpy
    ("numpy", "dtype"), ("numpy", "ndarray"),
    *((f"numpy.{c}.{m}", n) for c in ("_core", "core")
      for m, n in (("multiarray", "_reconstruct"), ("multiarray", "scalar"), ("numeric", "_frombuffer"))),
    # pandas (public paths used by pandas 3, internal paths used by pandas 1.x/2.x)
    *(("pandas", n) for n in ("DataFrame", "Index", "RangeIndex", "StringDtype", "Categorical",
                              "CategoricalDtype", "NA", "ArrowDtype")),
    ("pandas.arrays", "ArrowStringArray"), ("pandas.arrays", "StringArray"),
    ("pandas._libs.internals", "_unpickle_block"), ("pandas._libs.arrays", "__pyx_unpickle_NDArrayBacked"),
    ("pandas._libs.missing", "NA"), ("pandas.core.indexes.base", "_new_Index"),
    ("pandas.core.internals.managers", "BlockManager"), ("pandas.core.internals.blocks", "new_block"),
    ("pandas.core.frame", "DataFrame"), ("pandas.core.indexes.base", "Index"),
    ("pandas.core.indexes.range", "RangeIndex"), ("pandas.core.arrays.categorical", "Categorical"),
    ("pandas.core.dtypes.dtypes", "CategoricalDtype"), ("pandas.core.arrays.string_", "StringDtype"),
    ("pandas.core.arrays.string_", "StringArray"), ("pandas.core.arrays.string_arrow", "ArrowStringArray"),
    # pyarrow: tables, arrays, buffers and type constructors
    *(("pyarrow.lib", n) for n in ("_reconstruct_table", "_restore_array", "chunked_array", "field", "schema",
                                   "py_buffer", "type_for_alias", "list_", "large_list", "struct",
                                   "dictionary", "string", "large_string")),
    # datasets
    ("datasets.arrow_dataset", "Dataset"), ("datasets.dataset_dict", "DatasetDict"),
    ("datasets.info", "DatasetInfo"), ("datasets.table", "InMemoryTable"),
    ("datasets.table", "ConcatenationTable"), ("datasets.splits", "NamedSplit"),
    ("datasets.splits", "SplitDict"), ("datasets.splits", "SplitInfo"), ("datasets.utils.version", "Version"),
    *(("datasets.features.features", n) for n in ("Features", "Value", "ClassLabel", "List", "LargeList",
                                                  "Sequence")),
})



def arrow_checked(obj, what: str):
    """An Arrow array, chunked array or table after a full validation (offsets, indices, UTF-8), else a DataError
    beginning with `what`: Arrow reads whatever the offsets say, so an unchecked one can crash the process."""
    try:
        obj.validate(full=True)
    except pa.ArrowException as e:
        raise DataError(f"{what} ({e})") from None
    return obj


def _rebuild_array(data) -> pa.Array:
    """An Arrow array from the tuple pyarrow pickles it as, through constructors that check its layout first.

    pyarrow's own `_restore_array` hands the tuple to C++ as is: a child, buffer or dictionary that does not fit
    the type aborts the process, and a negative offset passes even a full validation.
    """
    dtype, length, null_count, offset, buffers, children, dictionary = data
    if not (isinstance(dtype, pa.DataType) and all(isinstance(n, int) for n in (length, null_count, offset))
            and 0 <= length and 0 <= offset and -1 <= null_count <= length):
        raise ValueError(f"impossible array header (type {dtype!r}, length {length!r}, offset {offset!r}, "
                         f"null count {null_count!r})")
    if not all(b is None or isinstance(b, pa.Buffer) for b in buffers):
        raise ValueError("a buffer is not an Arrow buffer")
    kids = [_rebuild_array(c) for c in children]
    if [k.type for k in kids] != [dtype.field(i).type for i in range(dtype.num_fields)]:
        raise ValueError(f"the child arrays do not match the type {dtype}")
    if isinstance(dtype, pa.DictionaryType):
        if dictionary is None:
            raise ValueError(f"a {dtype} array without its dictionary")
        indices = pa.Array.from_buffers(dtype.index_type, length, buffers, null_count, offset)
        return pa.DictionaryArray.from_arrays(indices, _rebuild_array(dictionary), ordered=dtype.ordered, safe=True)
    if dictionary is not None:
        raise ValueError(f"a dictionary for a {dtype} array")
    return pa.Array.from_buffers(dtype, length, buffers, null_count, offset, kids)


def _restore_array(data, *, path: str) -> pa.Array:
    """What the pickle's `pyarrow.lib._restore_array` call gets instead: the array rebuilt checked, or a DataError."""
    what = f"{path}: the pickle holds an invalid Arrow array"
    try:
        array = _rebuild_array(data)
    except (pa.ArrowException, ValueError, TypeError, RecursionError) as e:
        raise DataError(f"{what} ({e})") from None
    return arrow_checked(array, what)


def _check_dtype_state(dtype: np.dtype, state, path: str) -> None:
    """A numpy dtype's pickled state may set its byte order and (datetimes) its unit, nothing else: fields, a
    sub-array, another item size or other flags make numpy read outside the buffers it is later given."""
    fresh = dtype.__reduce__()[2]
    if not (isinstance(state, tuple) and len(state) == len(fresh) and state[0] == fresh[0]
            and state[1] in ("<", ">", "|", "=") and state[2:8] == fresh[2:8]):
        raise UnsafePickleError(f"{path}: refusing to unpickle a numpy dtype with fields, a sub-array or an altered "
                                f"size or flags (state {str(state)[:200]}): only plain column types are accepted")


class _RestrictedUnpickler(pickle._Unpickler):
    """pickle's Python unpickler (its BUILD can be checked, which the C one's cannot) with an allow-list."""

    dispatch = dict(pickle._Unpickler.dispatch)

    def __init__(self, file, path: str):
        super().__init__(file)
        self.path = path

    def find_class(self, module: str, name: str):
        if (module, name) == ("datasets.table", "MemoryMappedTable"):
            # It names an Arrow cache file on the machine that made the pickle; here it would read a local path.
            raise UnsafePickleError(
                f"{self.path}: refusing to unpickle 'datasets.table.MemoryMappedTable': the Dataset points at a "
                "cache file on another machine; save it after `dataset = Dataset.from_dict(dataset.to_dict())`, "
                "or as CSV/Parquet")
        if (module, name) not in _ALLOWED:
            raise UnsafePickleError(f"{self.path}: refusing to unpickle '{module}.{name}': only pandas DataFrames "
                                    "and Hugging Face Datasets are accepted")
        if (module, name) == ("pyarrow.lib", "_restore_array"):
            return functools.partial(_restore_array, path=self.path)
        try:
            return super().find_class(module, name)
        except (ImportError, AttributeError) as e:  # written by a version whose internals have since moved
            raise DataError(f"{self.path}: the pickle needs '{module}.{name}', which the installed versions lack "
                            f"({e}); re-save it as CSV or Parquet") from None

    def load_build(self) -> None:
        if isinstance(self.stack[-2], np.dtype):
            _check_dtype_state(self.stack[-2], self.stack[-1], self.path)
        super().load_build()

    dispatch[pickle.BUILD[0]] = load_build


def _check_frame(frame, path: str) -> None:
    """pandas reads a frame's blocks at the columns their placements name, and a categorical's categories at its
    codes, without bounds checks: a placement or code out of range would read outside its arrays."""
    import pandas as pd

    blocks = frame._mgr.blocks
    placed = [np.asarray(b.mgr_locs.as_array) for b in blocks]
    if not np.array_equal(np.sort(np.concatenate(placed or [np.zeros(0, np.intp)])), np.arange(frame.shape[1])):
        raise DataError(f"{path}: the pickled DataFrame's blocks do not place each of its {frame.shape[1]} columns "
                        f"exactly once (placements {[p.tolist()[:10] for p in placed][:10]})")
    for block in blocks:
        values = block.values
        if isinstance(values, pd.Categorical) and len(values):
            codes = np.asarray(values.codes)
            if codes.min() < -1 or codes.max() >= len(values.categories):
                raise DataError(f"{path}: a pickled categorical column has codes outside its "
                                f"{len(values.categories)} categories (from {codes.min()} to {codes.max()})")


def load_pickle(path: str | os.PathLike) -> object:
    """Unpickle only allow-listed data classes; the caller still has to check the type of what comes back."""
    import pandas as pd

    path = Path(path)
    with open(path, "rb") as f:
        try:
            obj = _RestrictedUnpickler(f, str(path)).load()
            if isinstance(obj, pd.DataFrame):
                _check_frame(obj, str(path))
            return obj
        except DataError:
            raise
        except Exception as e:  # truncated or corrupt pickles raise many types (EOFError, UnpicklingError, ...)
            raise DataError(f"{path}: not a readable pickle ({type(e).__name__}: {e})") from None
