"""Prediction input streams in chunks: the same texts as the whole-file loader, the same errors, bounded memory."""

from __future__ import annotations

import csv
import json
import re

import pytest

from budgetune.data import batching
from budgetune.data import readers as data_lib


@pytest.fixture
def streaming(monkeypatch):
    monkeypatch.setattr(data_lib, "STREAM_BYTES", 0)
    monkeypatch.setattr(data_lib, "CHUNK_ROWS", 3)


def write_csv(path, rows, header=("id", "text")):
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        if header:
            w.writerow(header)
        w.writerows(rows)


def test_csv_streams_in_chunks_with_the_same_texts(tmp_path, streaming):
    texts = [f"text {i}, with \"quotes\"\nand a newline" if i % 3 == 0 else f"plain {i}" for i in range(10)]
    path = tmp_path / "big.csv"
    write_csv(path, [(i, t) for i, t in enumerate(texts)])
    chunks = list(data_lib.iter_texts(str(path)))
    assert [len(c) for c in chunks] == [3, 3, 3, 1]
    assert sum(chunks, []) == texts == data_lib.load_table(str(path), require_labels=False).texts


def test_headerless_ag_news_and_jsonl_stream(tmp_path, streaming):
    ag = tmp_path / "ag.csv"
    write_csv(ag, [("3", "Stocks up", "Markets rose."), ("2", "Cup final", "A late goal.")], header=None)
    assert sum(data_lib.iter_texts(str(ag)), []) == ["Stocks up Markets rose.", "Cup final A late goal."]
    jl = tmp_path / "t.jsonl"
    jl.write_text("".join(json.dumps({"text": f"t{i}"}) + "\n" for i in range(5)))
    assert list(data_lib.iter_texts(str(jl))) == [["t0", "t1", "t2"], ["t3", "t4"]]


def test_streaming_errors_name_the_line(tmp_path, streaming):
    bad = tmp_path / "bad.csv"
    bad.write_text("id,text\n0,fine\n1,two,fields too many\n")
    with pytest.raises(data_lib.DataError, match=r"bad\.csv, line 3: expected 2 fields, found 3$"):
        list(data_lib.iter_texts(str(bad)))
    nul = tmp_path / "nul.csv"
    nul.write_text("id,text\n0,ok\n1,has \x00 nul\n")
    with pytest.raises(data_lib.DataError, match=r"nul\.csv, line 3: contains a NUL byte$"):
        list(data_lib.iter_texts(str(nul)))
    nocol = tmp_path / "nocol.csv"
    nocol.write_text("id,body\n0,ok\n")
    with pytest.raises(data_lib.DataError, match=r"no text column found \(columns: id, body\); set --text_column_name"):
        list(data_lib.iter_texts(str(nocol)))
    latin = tmp_path / "latin.csv"
    latin.write_bytes(b"id,text\n0,caf\xe9\n")
    with pytest.raises(data_lib.DataError, match=r"latin\.csv: not UTF-8 text \(invalid byte 0xe9 at offset 13, "
                                                  r"line 2\)$"):
        list(data_lib.iter_texts(str(latin)))


def test_streaming_invalid_utf8_past_the_first_megabyte_names_offset_and_line(tmp_path, streaming):
    """The byte is found by reading in chunks; a character split across two chunks is not an error."""
    head = b"id,text\n" + b"".join(b"%d,\xc3\xbc\n" % i for i in range(300_000))  # "ü": two bytes each
    assert head[2**20 - 1] == 0xC3  # a "ü" straddles the first 1 MiB read
    p = tmp_path / "big.csv"
    p.write_bytes(head + b"7,caf\xe9\n")
    at = len(head) + 5
    with pytest.raises(data_lib.DataError) as info:
        list(data_lib.iter_texts(str(p)))
    assert str(info.value) == f"{p}: not UTF-8 text (invalid byte 0xe9 at offset {at}, line 300002)"


def test_streaming_jsonl_hostile_lines(tmp_path, streaming):
    p = tmp_path / "t.jsonl"
    p.write_bytes(b'{"text": "ok"}\n{"text": "bad \\ud800"}\n')
    with pytest.raises(data_lib.DataError, match=re.escape(f"{p}, line 2: 'bad \\ud800' holds a lone UTF-16 "
                                                           "surrogate ('\\ud800', character 5)")):
        list(data_lib.iter_texts(str(p)))
    p.write_bytes(b'{"text": "ok"}\n{"text": ' + b"[" * 100_000 + b"]" * 100_000 + b"}\n")
    with pytest.raises(data_lib.DataError, match=re.escape(f"{p}, line 2: invalid JSON (nested more deeply")):
        list(data_lib.iter_texts(str(p)))
    p.write_bytes(b'{"text": "ok", "id": "a\\udc00"}\n')
    with pytest.raises(data_lib.DataError, match=re.escape(f"{p}, line 1: 'a\\udc00' holds a lone UTF-16")):
        list(data_lib.iter_rows(str(p), id_column="id"))


def test_streaming_csv_with_a_byte_order_mark(tmp_path, streaming):
    p = tmp_path / "bom.csv"
    p.write_bytes(b"\xef\xbb\xbfid,text\nx1,first\nx2,second\n")
    assert list(data_lib.iter_rows(str(p), id_column="id")) == [(["first", "second"], ["x1", "x2"])]


def test_small_files_load_whole(tmp_path):
    path = tmp_path / "small.csv"
    write_csv(path, [(i, f"t{i}") for i in range(5)])
    assert list(data_lib.iter_texts(str(path))) == [[f"t{i}" for i in range(5)]]


def test_sorted_batches_keep_padding_low_in_the_long_tail():
    import numpy as np

    lengths = np.clip(np.random.default_rng(0).lognormal(3.9, 0.35, 2000).astype(int), 5, 128).tolist()
    fixed = [list(range(i, min(i + 128, 2000))) for i in range(0, 2000, 128)]  # what fixed-size batches would do
    order = sorted(range(2000), key=lambda i: -lengths[i])
    fixed = [[order[i] for i in b] for b in fixed]
    batches = list(batching.SortedBatchSampler(lengths, 128))
    assert sorted(i for b in batches for i in b) == list(range(2000))
    assert all(1 <= len(b) <= 128 for b in batches)
    pad, real = batching.padding_stats(lengths, batches)
    pad_fixed, _ = batching.padding_stats(lengths, fixed)
    assert (pad + real) / real < 1.1 and pad < pad_fixed / 1.5


def test_an_output_that_is_the_input_or_a_folder_is_refused_before_any_model_loads(tmp_path):
    from budgetune.errors import ConfigError
    from budgetune.inference.predict import predict

    texts = tmp_path / "texts.csv"
    write_csv(texts, [(0, "keep me")])
    before = texts.read_bytes()
    with pytest.raises(ConfigError, match=re.escape(f"--output {tmp_path}/./texts.csv is the --input file")):
        predict(tmp_path / "no-run", str(texts), f"{tmp_path}/./texts.csv")  # another spelling of the same file
    with pytest.raises(ConfigError, match=re.escape(f"--output {tmp_path} is a folder")):
        predict(tmp_path / "no-run", str(texts), str(tmp_path))
    assert texts.read_bytes() == before


def test_a_repeated_id_is_refused_naming_both_rows():
    from budgetune.inference.predict import check_unique_ids

    seen: dict[str, int] = {}
    check_unique_ids("in.csv", "id", ["a", "b", "c"], 0, seen)  # the first chunk: rows 1-3
    with pytest.raises(data_lib.DataError, match=re.escape("in.csv, row 5: ID 'b' (column 'id', --id_column) "
                                                           "repeats row 2's")):
        check_unique_ids("in.csv", "id", ["d", "b"], 3, seen)  # the next chunk: rows 4-5
