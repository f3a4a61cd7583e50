"""Restricted unpickling of pandas DataFrames and Hugging Face Datasets (e.g. a competition's test_unlabelled.pkl)."""

from __future__ import annotations

import os
import pickle
from pathlib import Path

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



class _RestrictedUnpickler(pickle.Unpickler):
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
        try:
            return super().find_class(module, name)
        except (ImportError, AttributeError) as e:  # written by a version whose internals have since moved
            raise DataError(f"{self.path}: the pickle needs '{module}.{name}', which the installed versions lack "
                            f"({e}); re-save it as CSV or Parquet") from None


def load_pickle(path: str | os.PathLike) -> object:
    """Unpickle only allow-listed data classes; the caller still has to check the type of what comes back."""
    path = Path(path)
    with open(path, "rb") as f:
        try:
            return _RestrictedUnpickler(f, str(path)).load()
        except DataError:
            raise
        except Exception as e:  # truncated or corrupt pickles raise many types (EOFError, UnpicklingError, ...)
            raise DataError(f"{path}: not a readable pickle ({type(e).__name__}: {e})") from None
