"""Label cells of the tasks beyond one class per row: multi-label sets (a JSON array per cell, or names joined by a
delimiter) turned into 0/1 rows over the label names, and regression targets turned into floats; every refusal
names the file, the row and the column."""

from __future__ import annotations

import json
import math
import re

from budgetune.errors import DataError
from budgetune.textcheck import lone_surrogate

MAX_CLASSES = 100_000  # integer labels name the classes 0..max: a stray 10**11 would otherwise make 10**11 names

INT_LIMIT = 18  # digits: a longer integer is a name (as for single labels)
INT_LABEL = re.compile(rf"[+-]?\d{{1,{INT_LIMIT}}}")  # a label cell read as an integer, single- or multi-label


def missing(v: object) -> bool:
    return v is None or (isinstance(v, float) and math.isnan(v))


def _where(src: str, row: int, column: str) -> str:
    return f"{src}, row {row + 1}, column {column!r}"


def _cell_items(src: str, row: int, column: str, v: object, delimiter: str | None) -> list:
    """The labels of one multi-label cell, as written (names or integer indices)."""
    if hasattr(v, "tolist"):  # numpy arrays and scalars from Parquet or pickled frames
        v = v.tolist()
    if missing(v):
        raise DataError(f"{_where(src, row, column)}: labels are missing (an empty set is written [] or, with "
                        "--label_delimiter, as an empty cell)")
    if isinstance(v, str) and delimiter is not None:
        return [p.strip() for p in v.split(delimiter) if p.strip()]
    if isinstance(v, str):
        try:
            parsed = json.loads(v) if v.strip() else None
        except (json.JSONDecodeError, RecursionError, ValueError):
            parsed = None
        v = parsed if isinstance(parsed, list) else v
    if not isinstance(v, list):
        raise DataError(f"{_where(src, row, column)}: --task multi_label needs a list of labels per cell: a JSON "
                        "array such as [\"sports\", \"politics\"], or names joined by a delimiter named with "
                        f"--label_delimiter (e.g. --label_delimiter ';'); found {str(v)[:60]!r}")
    for item in v:
        if isinstance(item, bool) or not isinstance(item, (str, int)):
            raise DataError(f"{_where(src, row, column)}: a label must be a name or an integer index, found "
                            f"{type(item).__name__} {str(item)[:60]!r}")
        if isinstance(item, str) and (found := lone_surrogate(item)) is not None:
            raise DataError(f"{_where(src, row, column)}: a label holds a lone UTF-16 surrogate "
                            f"({found.describe()}), which is not Unicode text")
    return [item.strip() if isinstance(item, str) else item for item in v]


def index_names(top: int, where: str, noun: str) -> list[str]:
    """The names "0".."top" of integer labels whose largest is `top`, refused past MAX_CLASSES (`where`: the file
    and row or column; `noun`: classes or labels, as the message says)."""
    if top >= MAX_CLASSES:
        raise DataError(f"{where}: label {str(top)[:30]} would make the {noun} 0..{str(top)[:30]} (at most "
                        f"{MAX_CLASSES} are supported); set --label_names, or write the labels as names")
    return [str(k) for k in range(max(top, 0) + 1)]


def _is_index(item) -> bool:
    return isinstance(item, int) or INT_LABEL.fullmatch(item) is not None


def multi_labels(src: str, raw: list, column: str, names: list[str] | None,
                 delimiter: str | None) -> tuple[list[list[int]], list[str]]:
    """(0/1 rows over the label names, the names). Names come from `names` (--label_names, a ClassLabel) or, when
    absent, from the data: sorted names, or 0..max when every label is an integer. A label outside a declared set is
    refused naming the row and column; an integer indexes the names."""
    cells = [_cell_items(src, i, column, v, delimiter) for i, v in enumerate(raw)]
    if names is None:
        items = [item for cell in cells for item in cell]
        if items and all(_is_index(x) for x in items):
            names = index_names(max(int(x) for x in items), f"{src}, column {column!r}", "labels")
        else:
            names = sorted({str(x) for x in items})
        if not names:
            raise DataError(f"{src}, column {column!r}: no row has a label; set --label_names")
    index = {n: k for k, n in enumerate(names)}
    rows = []
    for i, cell in enumerate(cells):
        row = [0] * len(names)
        for item in cell:
            k = index.get(str(item))  # a label that is a name is that label, an integer item too (as single-label)
            if k is None and _is_index(item) and 0 <= int(item) < len(names):
                k = int(item)
            if k is None:
                shown = ", ".join(names[:20]) + (", ..." if len(names) > 20 else "")
                raise DataError(f"{_where(src, i, column)}: label {item!r} is not one of the labels ({shown}); "
                                "declare every label with --label_names")
            row[k] = 1
        rows.append(row)
    return rows, list(names)


def regression_targets(src: str, raw: list, column: str) -> list[float]:
    """The target of every row as a float; a missing, non-numeric or non-finite value is refused naming it."""
    out = []
    for i, v in enumerate(raw):
        if hasattr(v, "item") and not isinstance(v, (str, bytes)):
            v = v.item()  # numpy scalars
        value = None
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            value = float(v)
        elif isinstance(v, str):
            try:
                value = float(v.strip())
            except ValueError:
                value = None
        if missing(v) or (isinstance(v, str) and not v.strip()):
            raise DataError(f"{_where(src, i, column)}: the regression target is missing")
        if value is None or not math.isfinite(value):
            raise DataError(f"{_where(src, i, column)}: --task regression needs a number, found {str(v)[:60]!r}")
        out.append(value)
    return out
