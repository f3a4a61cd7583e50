"""bench/task_sets.py (issue 24, part 4): the pair, multi-label and class-skew sets built from AG-like rows keep
their train and test headlines apart, label what their headlines are, skew and balance as documented, and are
the same files for the same seed."""

from __future__ import annotations

import csv
import importlib.util
import json
import re
from collections import Counter
from pathlib import Path

import pytest
from conftest import ROOT

NAMES = ["World", "Sports", "Business", "Sci/Tech"]
ROWS_PER_TOPIC = 300


@pytest.fixture(scope="module")
def task_sets():
    spec = importlib.util.spec_from_file_location("bench_task_sets", ROOT / "bench" / "task_sets.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture()
def ag_like(tmp_path: Path) -> Path:
    """An AG-News-shaped CSV (label,text; labels 0..3): each text carries its id (hNNNN) and its topic id, plus a
    duplicate of the first row under another topic (dropped: h0000 stays World) and a blank text."""
    path = tmp_path / "ag.csv"
    rows = [(c, text_of(f"h{c * ROWS_PER_TOPIC + i:04d}")) for i in range(ROWS_PER_TOPIC) for c in range(4)]
    rows += [(3, rows[0][1]), (1, "  ")]
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["label", "text"])
        w.writerows(rows)
    return path


def topic_of(hid: str) -> int:
    return int(hid[1:]) // ROWS_PER_TOPIC


def text_of(hid: str) -> str:
    return f"{hid} story t{topic_of(hid)} about topic {topic_of(hid)}. Details follow here."


def build(task_sets, source: Path, out: Path, *extra: str) -> dict:
    argv = ["--source", str(source), "--out", str(out), "--train-size", "200", "--validation-size", "40",
            "--test-size", "120", *extra]
    assert task_sets.main(argv) == 0
    return json.loads((out / "manifest.json").read_text(encoding="utf-8"))


def read(out: Path, name: str, split: str) -> list[dict]:
    with open(out / name / f"{split}.csv", encoding="utf-8", newline="") as f:
        return list(csv.DictReader(f))


def headlines(row: dict) -> list[str]:
    return re.findall(r"\bh\d{4}\b", row["text"] + " " + row.get("text_pair", ""))


def test_train_and_test_headlines_are_disjoint_and_none_is_used_twice_in_a_set(task_sets, ag_like, tmp_path):
    manifest = build(task_sets, ag_like, tmp_path / "sets")
    assert manifest["rows_read"] == 4 * ROWS_PER_TOPIC  # the duplicate and the blank text dropped
    for name in ("pairs", "multilabel", "skewed"):
        used = {split: [h for r in read(tmp_path / "sets", name, split) for h in headlines(r)]
                for split in ("train", "validation", "test")}
        everything = used["train"] + used["validation"] + used["test"]
        assert len(everything) == len(set(everything)), f"{name}: a headline is used twice"
        assert not set(used["train"] + used["validation"]) & set(used["test"]), name
    skewed = read(tmp_path / "sets", "skewed", "train") + read(tmp_path / "sets", "skewed", "test")
    assert all(NAMES[topic_of(headlines(r)[0])] == r["label"] for r in skewed)


def test_pairs_are_balanced_two_headlines_labelled_by_their_topics(task_sets, ag_like, tmp_path):
    build(task_sets, ag_like, tmp_path / "sets")
    for split, n in (("train", 200), ("validation", 40), ("test", 120)):
        rows = read(tmp_path / "sets", "pairs", split)
        assert Counter(r["label"] for r in rows) == {"same_topic": n // 2, "different_topic": n // 2}
        for r in rows:
            a, b = headlines({"text": r["text"]}), headlines({"text": r["text_pair"]})
            assert len(a) == len(b) == 1 and a != b
            assert r["label"] == ("same_topic" if topic_of(a[0]) == topic_of(b[0]) else "different_topic")
        for side in ("text", "text_pair"):  # each topic as common on either side: no side gives the label away
            seen = Counter(topic_of(headlines({"text": r[side]})[0]) for r in rows)
            assert max(seen.values()) - min(seen.values()) <= 4, (split, side, seen)


def test_multilabel_sets_are_the_topics_of_the_joined_headlines(task_sets, ag_like, tmp_path):
    build(task_sets, ag_like, tmp_path / "sets", "--single-fraction", "0.25")
    rows = read(tmp_path / "sets", "multilabel", "train")
    kinds = Counter()
    for r in rows:
        hs = headlines(r)
        labels = json.loads(r["label"])
        assert labels == [NAMES[c] for c in sorted({topic_of(h) for h in hs})]  # a set, in label order
        assert r["text"] == " ".join(text_of(h) for h in hs)  # whole headlines joined by one space
        kinds[(len(hs), len(labels))] += 1
    assert kinds[(1, 1)] == 50  # 25 % of 200 rows hold one headline
    assert kinds[(2, 1)] > 0 and kinds[(2, 2)] > kinds[(2, 1)]  # same-topic pairs exist, two topics are commoner
    assert set(kinds) == {(1, 1), (2, 1), (2, 2)}


def test_skewed_cuts_three_topics_to_the_fraction_and_keeps_test_balanced(task_sets, ag_like, tmp_path):
    build(task_sets, ag_like, tmp_path / "sets", "--full-class", "Sports", "--skew-fraction", "0.05")
    train = Counter(r["label"] for r in read(tmp_path / "sets", "skewed", "train"))
    assert train == {"Sports": 174, "World": 9, "Business": 9, "Sci/Tech": 9}  # 200 / 1.15 = 174; 5 % of it: 9
    assert Counter(r["label"] for r in read(tmp_path / "sets", "skewed", "test")) == {n: 30 for n in NAMES}
    assert task_sets.skew_counts(4000, 4, 2, 0.05) == {0: 174, 1: 174, 2: 3478, 3: 174}


def test_the_same_seed_writes_the_same_files_and_another_seed_others(task_sets, ag_like, tmp_path):
    build(task_sets, ag_like, tmp_path / "a", "--seed", "3")
    build(task_sets, ag_like, tmp_path / "b", "--seed", "3")
    build(task_sets, ag_like, tmp_path / "c", "--seed", "4")
    files = sorted(p.relative_to(tmp_path / "a") for p in (tmp_path / "a").rglob("*.csv"))
    assert len(files) == 9
    for f in files:
        assert (tmp_path / "a" / f).read_bytes() == (tmp_path / "b" / f).read_bytes(), f
    assert all((tmp_path / "a" / f).read_bytes() != (tmp_path / "c" / f).read_bytes() for f in files)


@pytest.mark.parametrize(("extra", "message"), [
    (["--label-column", "topic"], "no column 'topic' (--label-column)"),
    (["--full-class", "Weather"], "--full-class 'Weather' is not one of the topics"),
    (["--train-size", "5000"], "the train pool has run out of rows of topic"),
    (["--skew-fraction", "1.5"], "--skew-fraction must be between 0 and 1"),
])
def test_bad_input_names_the_option_or_column(task_sets, ag_like, tmp_path, capsys, extra, message):
    with pytest.raises(SystemExit) as e:
        task_sets.main(["--source", str(ag_like), "--out", str(tmp_path / "x"), *extra])
    assert e.value.code == 2
    assert message in capsys.readouterr().err


@pytest.fixture(scope="module")
def task_baselines():
    spec = importlib.util.spec_from_file_location("bench_task_baselines", ROOT / "bench" / "task_baselines.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_thresholds_are_tuned_per_label_on_validation(task_baselines):
    import numpy as np

    y = np.array([[1, 0], [1, 0], [0, 1], [0, 1], [0, 0]])
    prob = np.array([[0.30, 0.60], [0.35, 0.55], [0.10, 0.90], [0.12, 0.95], [0.11, 0.58]])
    # label 0: positives at 0.30, 0.35, negatives <= 0.12 -> 0.15 is the lowest perfect cut; label 1: 0.65
    assert task_baselines.tune_thresholds(y, prob).tolist() == [0.15, 0.65]


def test_baselines_score_every_set_on_its_test_file(task_sets, task_baselines, ag_like, tmp_path):
    build(task_sets, ag_like, tmp_path / "sets")
    assert task_baselines.main(["--data", str(tmp_path / "sets"), "--out", str(tmp_path / "r.md")]) == 0
    report = (tmp_path / "r.md").read_text(encoding="utf-8")
    rows = [line.split(" | ") for line in report.splitlines() if line.startswith("| pairs") or
            line.startswith("| multilabel") or line.startswith("| skewed")]
    assert [r[0] for r in rows] == ["| pairs"] * 3 + ["| multilabel"] * 2 + ["| skewed"] * 2
    # The synthetic topics are spelled out in every text ("t2 about topic 2"): a working baseline is perfect on
    # single-label test rows, whatever the skew, and on the exact multi-label sets.
    skewed = [r for r in rows if r[0] == "| skewed"]
    assert all(r[3] == "1.0000" and r[4] == "1.0000" for r in skewed), skewed
    assert all(r[-1].strip(" |") == "1.0000" for r in rows if r[0] == "| multilabel"), rows
    assert "test 120 rows" in report and "seed 0" in report
