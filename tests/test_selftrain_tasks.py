"""Self-training for every task: multi-label pseudo-labels are label sets at the tuned thresholds, kept by their
smallest margin; regression pseudo-labels are the predicted values; text pairs are read from the unlabelled file
when it has the pair column, refused naming the file and column otherwise; (slow) one round end to end."""

from __future__ import annotations

import csv
import json
import random

import numpy as np
import pytest
from conftest import headline_rows, tiny_train_args, write_csv

from budgetune.config import resolve
from budgetune.errors import DataError
from budgetune.recipes import pseudo_labels, selftrain

NAMES = ["World", "Sports", "Business", "Sci/Tech"]


def logit(p):
    p = np.asarray(p, dtype=np.float64)
    return np.log(p / (1 - p))


def test_multi_label_confidence_is_the_smallest_margin_from_the_thresholds():
    probs = np.array([[0.95, 0.05], [0.9, 0.4], [0.6, 0.01]])
    t = [0.5, 0.2]
    # (p - t) / (1 - t) above the threshold, (t - p) / t below: row 0: 0.45/0.5 = 0.9, 0.15/0.2 = 0.75 -> 0.75;
    # row 1: 0.8, 0.2/0.8 = 0.25 -> 0.25; row 2: 0.1/0.5 = 0.2, 0.19/0.2 = 0.95 -> 0.2
    np.testing.assert_allclose(pseudo_labels.multi_label_confidence(probs, t), [0.75, 0.25, 0.2])


def test_multi_label_pseudo_labels_are_sets_at_the_tuned_thresholds_kept_by_confidence():
    probs = np.array([[0.99, 0.995, 0.001], [0.99, 0.5, 0.001], [0.001, 0.001, 0.999], [0.001, 0.995, 0.999]])
    shares = pseudo_labels.labelled_shares("multi_label", [[1, 1, 0], [0, 0, 1], [1, 0, 1]], 3)
    np.testing.assert_allclose(shares, [2 / 3, 1 / 3, 2 / 3, 0])  # per label, then empty sets
    rows, sets, conf = pseudo_labels.select_label_sets(logit(probs), [0.5, 0.9, 0.5], 0.9, shares, 10)
    # row 0: label 1 is (0.995 - 0.9) / 0.1 = 0.95 sure; row 1: label 1 (0.9 - 0.5) / 0.9 = 0.44, not confident
    assert rows.tolist() == [0, 2, 3] and sets.tolist() == [[1, 1, 0], [0, 0, 1], [0, 1, 1]]
    assert conf[1] < 0.9 <= conf[0]


def test_the_cap_is_per_label_on_its_share_of_positives_and_empty_sets_need_labelled_empty_sets():
    # 4 rows with label 0 alone, 4 with labels 0 and 1 (less and less sure of label 1); label 1's labelled share of
    # positives is 0.25: 8 kept -> at most 3 with label 1; 7 -> 2; 6 -> 2: the two surest of label 1 stay
    probs = np.array([[0.999, 0.001]] * 4 + [[0.999, 0.999], [0.999, 0.995], [0.999, 0.99], [0.999, 0.98]])
    rows, sets, _ = pseudo_labels.select_label_sets(logit(probs), None, 0.9, np.array([1.0, 0.25, 0.0]), 1.5)
    assert rows.tolist() == [0, 1, 2, 3, 4, 5] and np.asarray(sets)[:, 1].sum() == 2
    empty = np.array([[0.001, 0.001]] * 3)
    rows, _, _ = pseudo_labels.select_label_sets(logit(empty), None, 0.9, np.array([0.5, 0.5, 0.0]), 1.5)
    assert len(rows) == 0  # no labelled row has an empty set: an empty pseudo-label set is dropped
    rows, _, _ = pseudo_labels.select_label_sets(logit(empty), None, 0.9, np.array([0.5, 0.5, 1.0]), 1.5)
    assert len(rows) == 3


def test_regression_pseudo_labels_are_every_texts_predicted_value():
    logits = np.array([[1.5], [-0.25], [3.0]])
    p = pseudo_labels.pseudo_label("regression", logits, None, ["a", "b", "c"], None, ["score"], None, 0.9, 1.5)
    assert p.rows.tolist() == [0, 1, 2] and pseudo_labels.train_labels("regression", p) == [1.5, -0.25, 3.0]
    assert list(csv.reader(p.csv.splitlines())) == [["text", "score"], ["a", "1.500000"], ["b", "-0.250000"],
                                                    ["c", "3.000000"]]
    assert pseudo_labels.same_csv(p.csv, p.csv.replace("1.500000", "1.500040"))  # another thread count
    assert not pseudo_labels.same_csv(p.csv, p.csv.replace("1.500000", "1.600000"))


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """Multi-label (a third of the rows two headlines joined, both topics), regression (a score from the topic),
    pairs (same topic or not), and unlabelled texts: halves of headlines, and pairs of halves."""
    rows, rng, folder = headline_rows(), random.Random(0), tmp_path_factory.mktemp("selftrain-tasks")
    multi, reg, pairs = [], [], []
    for i, (label, text) in enumerate(rows):
        other_label, other = rows[rng.randrange(len(rows))]
        both = i % 3 == 0
        multi.append([f"{text} {other}" if both else text,
                      json.dumps(sorted({NAMES[label], NAMES[other_label]}) if both else [NAMES[label]])])
        reg.append([text, label * 1.5 + 0.25])
        pairs.append([text, other, int(label == other_label)])
    halves = sorted({" ".join(t.split()[: len(t.split()) // 2]) for _, t in rows})[:60]
    return {"multi": write_csv(folder / "multi.csv", ["text", "labels"], multi),
            "reg": write_csv(folder / "reg.csv", ["text", "score"], reg),
            "pairs": write_csv(folder / "pairs.csv", ["text", "text_b", "label"], pairs),
            "unlabelled": write_csv(folder / "unlabelled.csv", ["text"], [[h] for h in halves]),
            "unlabelled_pairs": write_csv(folder / "unlabelled_pairs.csv", ["text", "text_b"],
                                          [[a, b] for a, b in zip(halves[:30], halves[30:])])}


def test_text_pairs_need_the_pair_column_in_the_unlabelled_file(files, tmp_path):
    cfg = resolve(None, tiny_train_args("m", files["pairs"], tmp_path / "run", "lora",
                                        text_pair_column_name="text_b")[1:])
    with pytest.raises(DataError, match=rf"--unlabeled_file {files['unlabelled']}: with --text_pair_column_name "
                                        r"text_b the unlabelled file needs that column too.*text_b"):
        selftrain.unlabelled_pairs(cfg, str(files["unlabelled"]), None)
    pairs = selftrain.unlabelled_pairs(cfg, str(files["unlabelled_pairs"]), None)
    assert len(pairs) == 30 and all(k == selftrain.pair_key(*v) for k, v in pairs.items())


def one_round(tiny_roberta, data, out, unlabelled, threshold=0.001, cap_factor=1.5, **flags):
    """One self-training round of a tiny model (never sure of itself: a low threshold keeps some of its answers)."""
    args = tiny_train_args(tiny_roberta, data, out, "lora", num_train_epochs=4, learning_rate=2e-2,
                           robust_tolerance=5, **flags)
    return selftrain.self_train(resolve(None, args[1:]), str(unlabelled), rounds=1, threshold=threshold,
                                cap_factor=cap_factor)


@pytest.mark.slow
def test_multi_label_self_trains_one_round_on_label_sets(tiny_roberta, files, tmp_path):
    record = one_round(tiny_roberta, files["multi"], tmp_path / "run", files["unlabelled"], cap_factor=4,
                       task="multi_label")
    assert record["task"] == "multi_label" and record["metric_for_best_model"] == "micro_f1"
    r1 = record["rounds"][1]
    assert r1["trained"] and r1["pseudo_labels"] > 0 and "eval_micro_f1" in r1 and len(r1["pseudo_per_class"]) == 4
    with open(tmp_path / "run" / "round-1" / "pseudo_labels.csv", encoding="utf-8") as f:
        kept = list(csv.DictReader(f))
    assert len(kept) == r1["pseudo_labels"]
    assert all(set(json.loads(r["labels"])) <= set(NAMES) and json.loads(r["labels"]) for r in kept)
    assert all(float(r["confidence"]) >= 0.001 for r in kept)
    info = json.loads((tmp_path / "run" / "adapter" / "budgetune.json").read_text())
    assert info["task"] == "multi_label" and set(info["thresholds"]) == set(NAMES)
    again = one_round(tiny_roberta, files["multi"], tmp_path / "run", files["unlabelled"], cap_factor=4,
                       task="multi_label")
    assert [r["reused"] for r in again["rounds"]] == [True, True]  # same config and pseudo-labels: reused


@pytest.mark.slow
def test_regression_self_trains_one_round_on_predicted_values(tiny_roberta, files, tmp_path):
    record = one_round(tiny_roberta, files["reg"], tmp_path / "run", files["unlabelled"], task="regression")
    assert record["metric_for_best_model"] == "mse" and record["threshold"] is None
    r1 = record["rounds"][1]
    assert r1["pseudo_labels"] == record["unlabeled"]["kept"] and r1["pseudo_per_class"] is None
    assert record["best_round"] == int(np.argmin([r["eval_mse"] for r in record["rounds"]]))  # lower is better
    with open(tmp_path / "run" / "round-1" / "pseudo_labels.csv", encoding="utf-8") as f:
        kept = list(csv.DictReader(f))
    assert len(kept) == r1["pseudo_labels"] and all(np.isfinite(float(r["score"])) for r in kept)
    assert (tmp_path / "run" / "plots" / "rounds.png").is_file()
    again = one_round(tiny_roberta, files["reg"], tmp_path / "run", files["unlabelled"], task="regression")
    assert [r["reused"] for r in again["rounds"]] == [True, True]  # the same values (to 1e-4): reused


@pytest.mark.slow
def test_text_pairs_self_train_on_true_pairs(tiny_roberta, files, tmp_path):
    record = one_round(tiny_roberta, files["pairs"], tmp_path / "run", files["unlabelled_pairs"], threshold=0.3,
                       text_pair_column_name="text_b")
    r1 = record["rounds"][1]
    assert r1["trained"] and r1["pseudo_labels"] > 0
    with open(tmp_path / "run" / "round-1" / "pseudo_labels.csv", encoding="utf-8") as f:
        kept = list(csv.DictReader(f))
    assert kept and all(r["text_pair"] for r in kept)
