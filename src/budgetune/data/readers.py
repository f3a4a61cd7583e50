"""Loading, validation, splitting and tokenization of text-classification data (batching: batching.py)."""

from __future__ import annotations

import codecs
import csv
import hashlib
import io
import json
import math
import os
import re
import sys
import weakref
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import datasets
import numpy as np

from budgetune.data import labels as label_cells
from budgetune.data.pickles import arrow_checked, load_pickle
from budgetune.errors import DataError
from budgetune.textcheck import lone_surrogate

AG_NEWS_LABELS = ["World", "Sports", "Business", "Sci/Tech"]
BUILTIN = "builtin:headlines"
TEXT_COLUMNS = ("text", "sentence", "content", "review")
LABEL_COLUMNS = ("label", "labels", "class", "Class Index")
REGRESSION_COLUMNS = ("score", "target")  # also looked for under --task regression
EXTENSIONS = (".csv", ".tsv", ".jsonl", ".json", ".parquet", ".pkl", ".pickle")
_INT = label_cells.INT_LABEL  # longer digit strings are names
_LINE_BREAK = re.compile(r"\r\n|\r|\n")
# A single text may be several MB (the tokenizer truncates later); the default limit is 128 KiB.
# min(): the limit is a C long, which is 32 bits on Windows.
csv.field_size_limit(min(sys.maxsize, 2**31 - 1))



@dataclass
class TextTable:
    """Texts with optional labels: integers indexing label_names (single_label), 0/1 rows over label_names
    (multi_label) or floats (regression, label_names: the target column)."""

    texts: list[str]
    labels: list | None
    label_names: list[str] | None
    source: str
    ids: list[str] | None = None  # the rows' own IDs (predict --id_column), when asked for
    text_pairs: list[str] | None = None  # the second text of each row (--text_pair_column_name)

    def part(self, start: int, stop: int | None) -> TextTable:
        """Rows start..stop-1 (stop None: to the end), every column cut alike."""
        cut = [None if xs is None else xs[start:stop] for xs in (self.labels, self.ids, self.text_pairs)]
        return TextTable(self.texts[start:stop], cut[0], self.label_names, self.source, cut[1], cut[2])

    def first(self, n: int | None) -> TextTable:
        """The first n rows (all when n is None)."""
        return self if n is None else self.part(0, n)


def builtin_path() -> Path:
    return Path(__file__).resolve().parents[1] / "resources" / "headlines.csv"


def _split_file(folder: Path, split: str) -> Path | None:
    return next((folder / f"{split}{e}" for e in EXTENSIONS if (folder / f"{split}{e}").is_file()), None)


def has_split(source: str, split: str, dataset_config_name: str | None = None) -> bool:
    """Whether source has this split; single files have none, and an unreachable Hub answers False."""
    path = builtin_path() if source == BUILTIN else Path(source)
    if path.is_dir():
        return _split_file(path, split) is not None
    if path.exists() or source == BUILTIN or path.suffix.lower() in EXTENSIONS:
        return False
    try:
        return split in datasets.get_dataset_split_names(source, dataset_config_name)
    except Exception:  # offline or unknown dataset: load_table will report it properly
        return False


def load_table(source: str, *, split: str = "train", text_column: str | None = None,
               label_column: str | None = None, label_names: list[str] | None = None,
               require_labels: bool = True, dataset_config_name: str | None = None,
               max_samples: int | None = None, id_column: str | None = None, task: str = "single_label",
               text_pair_column: str | None = None, label_delimiter: str | None = None,
               read_labels: bool = True) -> TextTable:
    """Load BUILTIN, a local file or folder, or a Hub dataset; validates every row, then keeps max_samples.

    task: how the label column reads (budgetune.tasks); text_pair_column: a second text per row; read_labels
    False: a label column is not read at all (texts to predict or pseudo-label: their labels are never used)."""
    path = builtin_path() if source == BUILTIN else Path(source).expanduser()
    if source == BUILTIN and label_names is None and task == "single_label":  # AG News label ids
        label_names = AG_NEWS_LABELS
    if path.is_dir():
        found = _split_file(path, split)
        if found is None:
            names = ", ".join(f"{split}{e}" for e in EXTENSIONS)
            raise DataError(f"{path}: no {split} file in this folder (looked for {names})")
        path = found
    if path.is_file():
        name, (columns, classes) = str(path), _read_file(path, split)
    elif source == BUILTIN or path.suffix.lower() in EXTENSIONS or source.startswith((".", "/", "~")):
        raise DataError(f"{path}: no such file or folder")
    else:
        name, (columns, classes) = source, _read_hub(source, split, dataset_config_name)
    label = LabelSpec(label_column, label_names, task, label_delimiter)
    table = _to_table(name, columns, classes, text_column, label, require_labels, read_labels)
    if text_pair_column is not None:
        table.text_pairs = text_pairs(name, columns, text_pair_column)
    if id_column is not None:
        table.ids = [_id_value(name, f"row {i + 1}", id_column, v)
                     for i, v in enumerate(columns[_pick(name, columns, id_column, (), "ID", "id_column")])]
    return table.first(max_samples)


def text_pairs(src: str, columns: dict[str, list], column: str) -> list[str]:
    """The second text of every row; a missing or empty one is refused naming the row and column."""
    values = columns[_pick(src, columns, column, (), "text pair", "text_pair_column_name")]
    for i, t in enumerate(values):
        if not isinstance(t, str) or not t.strip():
            what = ("missing" if _missing(t) else f"not a string ({type(t).__name__})") if not isinstance(t, str) \
                else "empty"
            raise DataError(f"{src}, row {i + 1}, column {column!r}: the text pair is {what}; with "
                            "--text_pair_column_name every row needs its second text")
        check_text(src, f"row {i + 1}, column {column!r}", t)
    return list(values)


@dataclass
class LabelSpec:
    """How to read the label column: which one, the declared names, the task, multi_label's delimiter."""

    column: str | None
    names: list[str] | None
    task: str = "single_label"
    delimiter: str | None = None


def _id_value(src: str, where: str, column: str, value: object) -> str:
    """An ID as written in the submission: integers without a decimal point, anything else as text."""
    if _missing(value) or (isinstance(value, str) and not value.strip()):
        raise DataError(f"{src}, {where}: empty {column!r} (--id_column)")
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    check_text(src, f"{where}, {column!r} (--id_column)", str(value))
    return str(value)


Columns = tuple[dict[str, list], dict[str, list[str]]]  # column values, ClassLabel names by column


def _read_hub(source: str, split: str, config: str | None) -> Columns:
    try:
        ds = datasets.load_dataset(source, config, split=split)
    except (ConnectionError, TimeoutError) as e:  # datasets raises ConnectionError both offline and unreachable
        raise DataError(
            f"{source}: could not download the dataset from the Hugging Face Hub ({e}); to use a local copy, "
            "pass --dataset_name path/to/train.csv, or a folder with train.csv/test.csv") from e
    except Exception as e:  # unknown name, bad config or split: the user needs the reason, not a traceback
        raise DataError(f"{source}: not a local file or folder, and not loadable from the Hugging Face Hub "
                        f"({type(e).__name__}: {e})") from e
    return _from_dataset(ds)


def _class_names(features: datasets.Features) -> dict[str, list[str]]:
    """ClassLabel names by column; a list of ClassLabels (multi-label on the Hub) under `column[]`."""
    names = {c: f.names for c, f in features.items() if isinstance(f, datasets.ClassLabel)}
    names.update({f"{c}[]": f.feature.names for c, f in features.items()
                  if isinstance(getattr(f, "feature", None), datasets.ClassLabel)})
    return names


def _from_dataset(ds: datasets.Dataset) -> Columns:
    return {c: list(ds[c]) for c in ds.column_names}, _class_names(ds.features)


def _read_file(path: Path, split: str) -> Columns:
    if path.stat().st_size == 0:
        raise DataError(f"{path}: the file is empty")
    suffix = path.suffix.lower()
    if suffix in (".pkl", ".pickle"):
        return _read_pickle(path, split)
    if suffix == ".parquet":
        return _read_parquet(path)
    if suffix not in (".csv", ".tsv", ".json", ".jsonl"):
        raise DataError(f"{path}: unsupported file type {suffix!r} (use {', '.join(EXTENSIONS)})")
    text = _decode(path)
    if not text.strip():
        raise DataError(f"{path}: the file is empty")
    if suffix in (".json", ".jsonl"):
        return (_read_json if suffix == ".json" else _read_jsonl)(path, text), {}
    return _read_csv(path, text, "\t" if suffix == ".tsv" else ",")


def _decode(path: Path) -> str:
    data = path.read_bytes()
    skip = 3 if data.startswith(b"\xef\xbb\xbf") else 0  # a UTF-8 BOM would otherwise glue onto the first header
    try:
        text = data[skip:].decode("utf-8")
    except UnicodeDecodeError as e:
        at = e.start + skip
        raise _not_utf8(path, data[at], at, data.count(b"\n", 0, at) + 1) from None
    nul = text.find("\x00")
    if nul >= 0:
        line = text.count("\n", 0, nul) + 1
        raise DataError(f"{path}, line {line}: contains a NUL byte")
    return text


def _not_utf8(path: Path, byte: int, offset: int, line: int) -> DataError:
    return DataError(f"{path}: not UTF-8 text (invalid byte 0x{byte:02x} at offset {offset}, line {line})")


def _find_bad_utf8(path: Path) -> DataError:
    """The error for a file that failed to decode while streaming: its first invalid byte, read in chunks."""
    decoder, done, lines = codecs.getincrementaldecoder("utf-8")(), 0, 1
    with open(path, "rb") as f:
        while chunk := f.read(2**20):
            try:
                decoder.decode(chunk)
            except UnicodeDecodeError as e:  # e.object: the bytes the decoder held back, then this chunk
                at = done - (len(e.object) - len(chunk)) + e.start
                return _not_utf8(path, e.object[e.start], at, lines + e.object.count(b"\n", 0, e.start))
            done, lines = done + len(chunk), lines + chunk.count(b"\n")
    return DataError(f"{path}: not UTF-8 text (it ends inside a character)")


def check_text(src: str, where: str, value: object) -> None:
    """Refuse a string (or any key or string nested in a parsed JSON value) that is not Unicode text: a lone UTF-16
    surrogate (from a JSON escape such as "\\ud800", or a pickled str) cannot be encoded, so the tokenizer, a
    submission or a JSON file would fail on it later."""
    found = lone_surrogate(value)
    if found is not None:
        t, i = found.text, found.index
        raise DataError(f"{src}, {where}: {t[max(0, i - 20):i + 20]!r} holds a lone UTF-16 surrogate ({t[i]!r}, "
                        f"character {i + 1}), which is not Unicode text")


def _parse_json(path: Path, text: str, line: int | None = None) -> object:
    """json.loads, its failures as DataErrors naming the file and line (`line`: a JSONL record's)."""
    at = "" if line is None else f", line {line}"
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise DataError(f"{path}, line {line or e.lineno}: invalid JSON ({e.msg}, column {e.colno})") from None
    except RecursionError:
        raise DataError(f"{path}{at}: invalid JSON (nested more deeply than Python's JSON parser allows)") from None
    except ValueError as e:  # an integer of more than sys.get_int_max_str_digits() digits
        raise DataError(f"{path}{at}: invalid JSON ({str(e).split(':')[0]})") from None


def _read_csv(path: Path, text: str, delimiter: str) -> Columns:
    # strict=True turns stray quotes into errors instead of silently merged fields; newline="" keeps \r\n in fields.
    reader = csv.reader(io.StringIO(text, newline=""), delimiter=delimiter, strict=True)
    rows: list[list[str]] = []
    starts: list[int] = []
    last = 0
    try:
        for row in reader:
            if row:  # blank lines come back as []
                rows.append(row)
                starts.append(last + 1)
            last = reader.line_num
    except csv.Error as e:
        kind = "CSV" if delimiter == "," else "TSV"
        raise DataError(f"{path}, line {last + 1}: malformed {kind} ({e})") from None
    # The original AG News CSV has no header: its first row is data (class 1..4, title, description).
    if delimiter == "," and len(rows[0]) == 3 and rows[0][0].strip() in ("1", "2", "3", "4"):
        return _ag_news(path, rows, starts)
    header, body = rows[0], rows[1:]
    check_header(path, header, starts[0])
    if not body:
        raise DataError(f"{path}: no data rows")
    for row, line in zip(body, starts[1:]):
        if len(row) != len(header):
            raise DataError(f"{path}, line {line}: expected {len(header)} fields, found {len(row)}")
    if [h.lower() for h in header] == ["class index", "title", "description"]:  # Kaggle's AG News layout
        return _ag_news(path, body, starts[1:])
    return {h: [r[j] for r in body] for j, h in enumerate(header)}, {}


def check_header(path: Path, header: list[str], line: int) -> None:
    """Refuse a header that names one column twice: which of the two a reader took would be arbitrary."""
    seen = set()
    for name in header:
        if name in seen:
            raise DataError(f"{path}, line {line}: the header names the column {name!r} twice; rename one of them")
        seen.add(name)


def _ag_news(path: Path, rows: list[list[str]], starts: list[int]) -> Columns:
    for row, line in zip(rows, starts):
        if len(row) != 3:
            raise DataError(f"{path}, line {line}: expected 3 fields, found {len(row)}")
        if row[0].strip() not in ("1", "2", "3", "4"):
            raise DataError(f"{path}, line {line}: AG News class index {row[0]!r} is not one of 1..4")
    return {"text": [f"{r[1]} {r[2]}" for r in rows], "label": [int(r[0]) - 1 for r in rows]}, {"label": AG_NEWS_LABELS}


STREAM_BYTES = 4 * 2**20  # larger CSV/TSV/JSONL inputs to predict stream in chunks instead of loading whole
CHUNK_ROWS = 20_000


def iter_texts(source: str, *, text_column: str | None = None, chunk_rows: int | None = None) -> Iterator[list[str]]:
    """Unlabelled texts in chunks: big CSV/TSV/JSONL files stream (validated row by row); others load whole."""
    for texts, _ in iter_rows(source, text_column=text_column, chunk_rows=chunk_rows):
        yield texts


def iter_tables(source: str, *, text_column: str | None = None, id_column: str | None = None,
                chunk_rows: int | None = None, task: str = "single_label", text_pair_column: str | None = None,
                label_delimiter: str | None = None) -> Iterator[TextTable]:
    """Unlabelled rows in chunks as TextTables (their IDs in `ids`): streamed like iter_rows, except that rows with
    a text pair (text_pair_column) load whole. A label column, if the file has one, is not read."""
    if text_pair_column is None and task == "single_label":
        for texts, ids in iter_rows(source, text_column=text_column, id_column=id_column, chunk_rows=chunk_rows):
            yield TextTable(texts, None, None, str(source), ids)
        return
    table = load_table(source, split="test", text_column=text_column, require_labels=False, id_column=id_column,
                       task=task, text_pair_column=text_pair_column, label_delimiter=label_delimiter,
                       read_labels=False)
    size = chunk_rows or CHUNK_ROWS
    for start in range(0, len(table.texts), size):
        yield table.part(start, start + size)


def iter_rows(source: str, *, text_column: str | None = None, id_column: str | None = None,
              chunk_rows: int | None = None) -> Iterator[tuple[list[str], list[str] | None]]:
    """(texts, their IDs from id_column or None) in chunks, streamed like iter_texts."""
    chunk_rows = chunk_rows or CHUNK_ROWS
    path = Path(source).expanduser()
    suffix = path.suffix.lower()
    if not path.is_file() or suffix not in (".csv", ".tsv", ".jsonl") or path.stat().st_size < STREAM_BYTES:
        table = load_table(source, split="test", text_column=text_column, require_labels=False, id_column=id_column,
                           read_labels=False)
        yield table.texts, table.ids
        return
    with open(path, encoding="utf-8-sig", newline="") as f:  # -sig: a BOM would glue onto the first header
        texts: list[str] = []
        ids: list[str] = []
        try:
            rows = _stream_jsonl(path, f, text_column, id_column) if suffix == ".jsonl" else _stream_csv(
                path, f, text_column, "\t" if suffix == ".tsv" else ",", id_column)
            for text, row_id in rows:
                texts.append(text)
                ids.append(row_id)
                if len(texts) == chunk_rows:
                    yield texts, ids if id_column else None
                    texts, ids = [], []
        except UnicodeDecodeError:
            raise _find_bad_utf8(path) from None
    if texts:
        yield texts, ids if id_column else None


def _stream_csv(path: Path, f, text_column: str | None, delimiter: str,
                id_column: str | None = None) -> Iterator[tuple[str, str | None]]:
    reader = csv.reader(f, delimiter=delimiter, strict=True)
    header, col, id_col, ag_news, last = None, 0, None, False, 0  # last: the file line the previous record ended on
    try:
        for row in reader:
            line, last = last + 1, reader.line_num  # the record's first line, as the whole-file reader names it
            if not row:
                continue
            if any("\x00" in v for v in row):
                raise DataError(f"{path}, line {line}: contains a NUL byte")
            if header is None:
                if delimiter == "," and len(row) == 3 and row[0].strip() in ("1", "2", "3", "4"):
                    header, ag_news = ["class index", "title", "description"], True  # headerless AG News
                else:
                    header = row
                    check_header(path, header, line)
                    if [h.lower() for h in header] == ["class index", "title", "description"]:
                        ag_news = True
                        continue
                    col = header.index(_pick(str(path), dict.fromkeys(header), text_column, TEXT_COLUMNS, "text",
                                             "text_column_name"))
                    if id_column is not None:
                        id_col = header.index(_pick(str(path), dict.fromkeys(header), id_column, (), "ID", "id_column"))
                    continue
                if id_column is not None:
                    raise DataError(f"{path}: the headerless AG News layout has no {id_column!r} column (--id_column)")
            if len(row) != len(header):
                raise DataError(f"{path}, line {line}: expected {len(header)} fields, found {len(row)}")
            row_id = None if id_col is None else _id_value(str(path), f"line {line}", id_column, row[id_col])
            yield (f"{row[1]} {row[2]}" if ag_news else row[col]), row_id
    except csv.Error as e:
        raise DataError(f"{path}, line {last + 1}: malformed {'CSV' if delimiter == ',' else 'TSV'} ({e})") from None


def _stream_jsonl(path: Path, f, text_column: str | None,
                  id_column: str | None = None) -> Iterator[tuple[str, str | None]]:
    key = None
    for n, raw in enumerate(f, 1):
        if not raw.strip():
            continue
        if "\x00" in raw:
            raise DataError(f"{path}, line {n}: contains a NUL byte")
        rec = _parse_json(path, raw, n)
        check_text(str(path), f"line {n}", rec)
        if not isinstance(rec, dict):
            raise DataError(f"{path}, line {n}: expected a JSON object, found {type(rec).__name__}")
        key = key or _pick(str(path), rec, text_column, TEXT_COLUMNS, "text", "text_column_name")
        if not isinstance(rec.get(key), str):
            raise DataError(f"{path}, line {n}: {key!r} is not a string")
        if id_column is not None and id_column not in rec:
            raise DataError(f"{path}, line {n}: no {id_column!r} (--id_column)")
        yield rec[key], None if id_column is None else _id_value(str(path), f"line {n}", id_column, rec[id_column])


def _records(path: Path, records: list, where: Callable[[int], str]) -> dict[str, list]:
    if not records:
        raise DataError(f"{path}: no data rows")
    keys: dict[str, None] = {}
    for i, rec in enumerate(records):
        if not isinstance(rec, dict):
            raise DataError(f"{path}, {where(i)}: expected a JSON object, found {type(rec).__name__}")
        check_text(str(path), where(i), rec)
        keys.update(dict.fromkeys(rec))
    return {k: [rec.get(k) for rec in records] for k in keys}


def _read_json(path: Path, text: str) -> dict[str, list]:
    obj = _parse_json(path, text)
    if isinstance(obj, dict) and obj and all(isinstance(v, list) for v in obj.values()):  # {"text": [...], ...}
        if len({len(v) for v in obj.values()}) > 1:
            raise DataError(f"{path}: the columns have different lengths")
        obj = [dict(zip(obj, vals)) for vals in zip(*obj.values())]
    if not isinstance(obj, list):
        raise DataError(f"{path}: expected a JSON array of records, found {type(obj).__name__}")
    return _records(path, obj, lambda i: f"row {i + 1}")


def _read_jsonl(path: Path, text: str) -> dict[str, list]:
    records, lines = [], []
    # Lines end at \n, \r\n or \r only: JSON strings may hold U+2028 and the other breaks splitlines() knows.
    for n, line in enumerate(_LINE_BREAK.split(text), 1):
        if line.strip():
            records.append(_parse_json(path, line, n))
            lines.append(n)
    return _records(path, records, lambda i: f"line {lines[i]}")


def _read_parquet(path: Path) -> Columns:
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except Exception as e:  # pyarrow raises several types for corrupt files
        raise DataError(f"{path}: not a readable Parquet file ({e})") from None
    if table.num_rows == 0:
        raise DataError(f"{path}: no data rows")
    arrow_checked(table, f"{path}: invalid data in the Parquet file")  # e.g. strings that are not UTF-8
    try:  # files written by `datasets` carry their features, ClassLabel names included
        names = _class_names(datasets.Features.from_arrow_schema(table.schema))
    except Exception:
        names = {}
    return table.to_pydict(), names


def _read_pickle(path: Path, split: str) -> Columns:
    obj = load_pickle(path)
    try:
        return _pickle_columns(path, obj, split)
    except DataError:
        raise
    except Exception as e:  # what the allow-list lets through is data, but it may still be inconsistent
        raise DataError(f"{path}: the pickled {type(obj).__name__} cannot be read ({type(e).__name__}: {e})") from None


def _pickle_columns(path: Path, obj: object, split: str) -> Columns:
    import pandas as pd

    if isinstance(obj, datasets.DatasetDict):
        if split not in obj:
            raise DataError(f"{path}: no split {split!r} (splits: {', '.join(obj)})")
        obj = obj[split]
    if isinstance(obj, datasets.Dataset):
        if obj.num_rows == 0:
            raise DataError(f"{path}: no data rows")
        return _from_dataset(obj)
    if isinstance(obj, pd.DataFrame):
        if len(obj) == 0:
            raise DataError(f"{path}: no data rows")
        return {str(c): obj[c].tolist() for c in obj.columns}, {}
    raise DataError(f"{path}: expected a pandas DataFrame or a Hugging Face Dataset, found {type(obj).__name__}")


def _pick(src: str, columns: dict, wanted: str | None, defaults: tuple[str, ...], kind: str, flag: str) -> str:
    listed = ", ".join(map(str, columns))
    if wanted is not None:
        if wanted not in columns:
            raise DataError(f"{src}: no {kind} column {wanted!r} (columns: {listed}); set --{flag}")
        return wanted
    found = next((c for c in defaults if c in columns), None)
    if found is None:
        raise DataError(f"{src}: no {kind} column found (columns: {listed}); set --{flag}")
    return found


def _missing(v: object) -> bool:
    return v is None or (isinstance(v, float) and math.isnan(v))


def _to_table(src: str, columns: dict[str, list], classes: dict[str, list[str]], text_column: str | None,
              spec: LabelSpec, require_labels: bool, read_labels: bool = True) -> TextTable:
    tcol = _pick(src, columns, text_column, TEXT_COLUMNS, "text", "text_column_name")
    texts = columns[tcol]
    for i, t in enumerate(texts):
        if not isinstance(t, str):
            what = "missing" if _missing(t) else f"not a string ({type(t).__name__})"
            raise DataError(f"{src}, row {i + 1}: text is {what} (column {tcol!r})")
        check_text(src, f"row {i + 1}, column {tcol!r}", t)
    if not read_labels:
        return TextTable(list(texts), None, None, src)
    label_column, label_names = spec.column, spec.names
    if spec.task == "regression" and label_column and "," in label_column:
        return _several_targets(src, columns, texts, label_column, require_labels)
    defaults = LABEL_COLUMNS + (REGRESSION_COLUMNS if spec.task == "regression" else ())
    if label_column is None and not require_labels and not any(c in columns for c in defaults):
        names = label_names or next((v for k, v in classes.items() if not k.endswith("[]")), None)
        return TextTable(list(texts), None, None if names is None else list(names), src)
    lcol = _pick(src, columns, label_column, defaults, "label", "label_column_name")
    raw, names = columns[lcol], list(label_names) if label_names is not None else classes.get(lcol)
    # Hub test splits mark "no label" with -1; for prediction treat such a column as absent.
    if not require_labels and all(_missing(v) or v in (-1, "-1", "") for v in raw):
        return TextTable(list(texts), None, names, src)
    if spec.task == "multi_label":
        feature_names = names if names is not None else classes.get(f"{lcol}[]")  # Sequence(ClassLabel) on the Hub
        labels, names = label_cells.multi_labels(src, raw, lcol, feature_names, spec.delimiter)
        return TextTable(list(texts), labels, names, src)
    if spec.task == "regression":
        return TextTable(list(texts), label_cells.regression_targets(src, raw, lcol), [lcol], src)
    labels, names = _labels(src, raw, names)
    return TextTable(list(texts), labels, names, src)


def _several_targets(src: str, columns: dict[str, list], texts: list, label_column: str,
                     require_labels: bool) -> TextTable:
    """Regression on several target columns (--label_column_name a,b): a row of floats per text."""
    names = [c.strip() for c in label_column.split(",") if c.strip()]
    if not require_labels and not all(c in columns for c in names):
        return TextTable(list(texts), None, names, src)
    values = [label_cells.regression_targets(src, columns[_pick(src, columns, c, (), "target", "label_column_name")], c)
              for c in names]
    return TextTable(list(texts), [list(row) for row in zip(*values)], names, src)


def _label_set(names: list[str]) -> str:
    shown = ", ".join(names[:20]) + (", ..." if len(names) > 20 else "")
    return f"0..{len(names) - 1} ({shown})"


def _labels(src: str, raw: list, names: list[str] | None) -> tuple[list[int], list[str]]:
    """A label that is a name (an integer cell too: 1 is the class named "1") is that class; else an integer, or
    one written as a string, is a 0-based index."""
    vals: list[int | str] = []
    for i, v in enumerate(raw):
        if _missing(v) or (isinstance(v, str) and not v.strip()):
            raise DataError(f"{src}, row {i + 1}: label is missing")
        check_text(src, f"row {i + 1}, label", v)
        if not isinstance(v, (int, float, str)):
            v = v.item() if hasattr(v, "item") else v  # numpy scalars from pickled frames
            v = v if isinstance(v, (int, float, str)) else str(v)
        if isinstance(v, float):
            if not v.is_integer():
                raise DataError(f"{src}, row {i + 1}: label {v} is not an integer")
            v = int(v)
        vals.append(v.strip() if isinstance(v, str) else v)
    if names is None:
        names = _inferred_names(src, vals)
    index = {n: k for k, n in enumerate(names)}
    out = []
    for i, v in enumerate(vals):
        k = index.get(str(v))
        if k is None and (isinstance(v, int) or _INT.fullmatch(v)):
            k = int(v)
            if not 0 <= k < len(names):
                raise DataError(f"{src}, row {i + 1}: label {v} is not one of {_label_set(names)}")
        if k is None:
            raise DataError(f"{src}, row {i + 1}: label {v!r} is not one of {', '.join(names)}")
        out.append(k)
    return out, names


def _inferred_names(src: str, vals: list[int | str]) -> list[str]:
    """Class names when none are given: integer labels name the classes 0..max (a warning names classes with no
    rows, e.g. labels 1..5 make a class 0), other labels their sorted set."""
    if not all(isinstance(v, int) or _INT.fullmatch(v) for v in vals):
        return sorted({str(v) for v in vals})
    ints = [int(v) for v in vals]
    top = max(ints)
    names = label_cells.index_names(top, f"{src}, row {ints.index(top) + 1}", "classes")
    empty = sorted(set(range(max(top, 0) + 1)) - set(ints))
    if empty:
        shown = ", ".join(map(str, empty[:10])) + (", ..." if len(empty) > 10 else "")
        print(f"warning: {src}: integer labels make the classes 0..{top}, and {len(empty)} of them have no rows "
              f"({shown}): the model still gets an output for each; set --label_names to the classes you have "
              "(labels that are names are read as those names)", file=sys.stderr)
    return names


def train_validation_split(table: TextTable, fraction: float, seed: int) -> tuple[TextTable, TextTable]:
    """Stratified seeded split; a class with one example stays in train, so validation may miss classes."""
    n = len(table.texts)
    rng = np.random.default_rng(seed)
    stratified = table.labels is not None and all(isinstance(v, (int, np.integer)) for v in table.labels)
    groups = [np.arange(n)] if not stratified else [
        np.flatnonzero(np.asarray(table.labels) == c) for c in sorted(set(table.labels))]
    val_parts = []
    for idx in groups:
        k = int(round(len(idx) * fraction))
        if len(idx) >= 2:  # both sides keep every class that can be split
            k = min(max(k, 1), len(idx) - 1)
        else:
            k = 0
        val_parts.append(rng.permutation(idx)[:k])
    val = np.sort(np.concatenate(val_parts)) if val_parts else np.array([], dtype=int)
    if len(val) == 0:
        raise DataError(f"{table.source}: a validation fraction of {fraction} leaves the validation split "
                        f"empty ({n} rows); raise it or give a validation file")
    is_val = np.zeros(n, dtype=bool)
    is_val[val] = True

    def take(mask: np.ndarray) -> TextTable:
        rows = np.flatnonzero(mask).tolist()
        labels = None if table.labels is None else [table.labels[i] for i in rows]
        pairs = None if table.text_pairs is None else [table.text_pairs[i] for i in rows]
        return TextTable([table.texts[i] for i in rows], labels, table.label_names, table.source, text_pairs=pairs)

    return take(~is_val), take(is_val)


def hash_texts(h, texts: list[str]) -> None:
    """Feed texts into hash `h`, each length-prefixed, so ["ab", "c"] and ["a", "bc"] differ."""
    for t in texts:
        b = t.encode("utf-8", "surrogatepass")
        h.update(len(b).to_bytes(8, "little") + b)


PER_CALL_STATE = ("truncation", "padding")  # what the last call left in a fast tokenizer's state, not its identity
_TOKENIZER_FINGERPRINTS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def tokenizer_fingerprint(tokenizer) -> str:
    """A hash of what the tokenizer does to a text, not of its name: vocabulary, merges, normaliser, pre- and
    post-processing, added and special tokens, the inputs it returns and its truncation side. Two revisions of one Hub
    id, or a folder whose files changed, differ. Computed once per tokenizer object (it is not cheap)."""
    known = _TOKENIZER_FINGERPRINTS.get(tokenizer)
    if known is not None and known[0] == len(tokenizer):
        return known[1]
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:  # a fast tokenizer: its whole pipeline, as tokenizers serialises it
        state = {k: v for k, v in json.loads(backend.to_str()).items() if k not in PER_CALL_STATE}
    else:
        state = {"vocab": sorted(tokenizer.get_vocab().items()),
                 "init": sorted((k, repr(v)) for k, v in tokenizer.init_kwargs.items()
                                if k != "name_or_path" and not k.endswith("_file"))}
    state.update(type=type(tokenizer).__name__, inputs=list(tokenizer.model_input_names),
                 truncation_side=getattr(tokenizer, "truncation_side", "right"),
                 special=repr(sorted(tokenizer.special_tokens_map.items())))
    digest = hashlib.sha256(json.dumps(state, sort_keys=True, default=repr).encode()).hexdigest()
    _TOKENIZER_FINGERPRINTS[tokenizer] = (len(tokenizer), digest)
    return digest


def _cache_key(table: TextTable, tokenizer, max_seq_length: int) -> str:
    h = hashlib.sha256()
    h.update(json.dumps([tokenizer_fingerprint(tokenizer), max_seq_length, "budgetune-tokenize-v2"]).encode())
    hash_texts(h, table.texts)
    if table.text_pairs is not None:
        h.update(b"text_pairs")
        hash_texts(h, table.text_pairs)
    labels = None if table.labels is None else np.asarray(table.labels)
    if labels is not None and (labels.ndim > 1 or labels.dtype.kind == "f"):  # multi-label rows, regression values
        h.update(b"labels-" + str(labels.shape).encode() + labels.astype(np.float64).tobytes())
    else:
        h.update(b"labels" + (b"none" if labels is None else labels.astype(np.int64).tobytes()))
    return h.hexdigest()


MODEL_INPUTS = ("input_ids", "attention_mask", "token_type_ids")


def encode(tokenizer, texts: list[str], max_seq_length: int,
           text_pairs: list[str] | None = None) -> dict[str, list[list[int]]]:
    """The model inputs of each text, truncated to max_seq_length and not padded: how training, predict and serve
    tokenize. With text_pairs, each row is a true pair (the tokenizer's separators and token types), the longer of
    the two truncated first."""
    if text_pairs is not None:
        enc = tokenizer(texts, text_pairs, truncation="longest_first", max_length=max_seq_length, padding=False)
        return {k: enc[k] for k in MODEL_INPUTS if k in enc}
    enc = tokenizer(texts, truncation=True, max_length=max_seq_length, padding=False)
    return {k: enc[k] for k in MODEL_INPUTS if k in enc}


def tokenize(table: TextTable, tokenizer, max_seq_length: int,
             cache_dir: str | os.PathLike | None) -> datasets.Dataset:
    """Truncate without padding; with cache_dir the result is a memory-mapped Arrow file reused by content hash."""
    path, key = None, _cache_key(table, tokenizer, max_seq_length)
    if cache_dir is not None:
        path = Path(cache_dir) / f"tokenized-{key}.arrow"
        if path.is_file():
            return datasets.Dataset.from_file(str(path))
        path.parent.mkdir(parents=True, exist_ok=True)
    columns: dict[str, list] = {"text": table.texts, "idx": list(range(len(table.texts)))}
    if table.labels is not None:
        columns["labels"] = table.labels
    if table.text_pairs is not None:
        columns["text_pair"] = table.text_pairs
    ds = datasets.Dataset.from_dict(columns)

    def encode_batch(batch: dict) -> dict:
        out = encode(tokenizer, batch["text"], max_seq_length, batch.get("text_pair"))
        out["length"] = [len(ids) for ids in out["input_ids"]]
        return out

    # datasets writes to a temp file and renames it, so an interrupted run leaves no half-written cache hit.
    # Our key as the fingerprint: datasets would otherwise hash `encode` by pickling the tokenizer (~0.3 s a call).
    drop = ["text"] + (["text_pair"] if table.text_pairs is not None else [])
    return ds.map(encode_batch, batched=True, batch_size=1000, remove_columns=drop, desc="Tokenizing",
                  cache_file_name=None if path is None else str(path), load_from_cache_file=False,
                  new_fingerprint=key)
