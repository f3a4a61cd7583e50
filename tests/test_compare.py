"""Comparing two runs on the same rows (issue 23, item 5): the paired statistics, and `budgetune evaluate --compare`
through the real command line."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from conftest import headline_rows, run_cli, tiny_train_args

from budgetune.metrics import paired_comparison


def mcnemar_by_hand(only_a: int, only_b: int) -> float:
    """Two-sided exact binomial test at 1/2 on the discordant rows, summed here."""
    n, k = only_a + only_b, max(only_a, only_b)
    return min(1.0, 2 * sum(math.comb(n, i) for i in range(k, n + 1)) / 2 ** n)


def test_paired_comparison_counts_the_discordant_rows():
    labels = np.zeros(40, dtype=int)
    a = np.ones(40, dtype=int)
    b = np.ones(40, dtype=int)
    a[:10] = 0  # only A right on 10 rows
    b[10:15] = 0  # only B right on 5 rows
    a[15:30] = b[15:30] = 0  # both right on 15
    c = paired_comparison(labels, a, b, n_boot=20_000)
    assert (c["only_a_right"], c["only_b_right"], c["rows"]) == (10, 5, 40)
    assert c["accuracy_a"] == 25 / 40 and c["accuracy_b"] == 20 / 40
    assert c["difference_points"] == pytest.approx(12.5)
    assert c["mcnemar_p"] == pytest.approx(mcnemar_by_hand(10, 5))
    assert c["ci_low_points"] < 12.5 < c["ci_high_points"]
    # the bootstrap is the rows' own: its interval matches the normal approximation of a mean of per-row
    # differences (+1 on 10 rows, -1 on 5, 0 on 25) to within a few percent
    d = np.array([1] * 10 + [-1] * 5 + [0] * 25)
    half = 100 * 1.96 * d.std() / math.sqrt(len(d))
    assert (c["ci_high_points"] - c["ci_low_points"]) / 2 == pytest.approx(half, rel=0.08)


def test_identical_models_differ_by_nothing():
    labels = np.array([0, 1, 2, 3, 0, 1])
    preds = np.array([0, 1, 2, 0, 0, 2])
    c = paired_comparison(labels, preds, preds)
    assert (c["difference_points"], c["ci_low_points"], c["ci_high_points"], c["mcnemar_p"]) == (0, 0, 0, 1.0)


def test_rows_must_pair():
    with pytest.raises(ValueError, match="same non-empty rows"):
        paired_comparison([0, 1], [0, 1], [0])


@pytest.fixture(scope="module")
def two_runs(tiny_roberta, tmp_path_factory):
    """Two tiny runs with the same labels that answer differently: A trained on every class of the headlines, B
    only on Business and Sci/Tech rows (it never learns to say World or Sports)."""
    import csv

    root = tmp_path_factory.mktemp("compare")
    rows = headline_rows()
    names = "World,Sports,Business,Sci/Tech"
    for name, part in (("all.csv", rows), ("two.csv", [r for r in rows if r[0] in (2, 3)])):
        with open(root / name, "w", newline="", encoding="utf-8") as f:
            csv.writer(f).writerows([("label", "text"), *part])
    for run, data in (("a", "all.csv"), ("b", "two.csv")):
        run_cli(*tiny_train_args(tiny_roberta, root / data, root / run, "lora", num_train_epochs=2,
                                 target_modules="query,value,dense", learning_rate=0.02, label_names=names,
                                 robust_tolerance="null"))
    data = root / "data.csv"
    with open(data, "w", newline="", encoding="utf-8") as f:
        csv.writer(f).writerows([("label", "text"), *rows[:120]])
    return root / "a", root / "b", data


def test_evaluate_compare_pairs_the_two_runs_own_evaluations(two_runs, tmp_path):
    run, other, data = two_runs
    ev_a, ev_b = tmp_path / "a", tmp_path / "b"
    run_cli("evaluate", str(run), "--data_file", str(data), "--output", str(ev_a))
    run_cli("evaluate", str(other), "--data_file", str(data), "--output", str(ev_b))
    a, b = (json.loads(p.with_suffix(".json").read_text()) for p in (ev_a, ev_b))
    proc = run_cli("evaluate", str(run), "--data_file", str(data), "--compare", str(other))
    report = json.loads((run / "evaluation-compare-data.json").read_text())
    c = report["comparison"]
    assert (c["accuracy_a"], c["accuracy_b"]) == (a["accuracy"], b["accuracy"])
    assert report["a"]["confusion_matrix"] == a["confusion_matrix"]
    assert report["b"]["confusion_matrix"] == b["confusion_matrix"]
    assert c["difference_points"] == pytest.approx(100 * (a["accuracy"] - b["accuracy"]))
    assert c["only_a_right"] - c["only_b_right"] == round(120 * (a["accuracy"] - b["accuracy"]))
    assert c["ci_low_points"] <= c["difference_points"] <= c["ci_high_points"]
    assert c["only_a_right"] + c["only_b_right"] > 0, "the two runs should answer differently on some rows"
    assert "McNemar exact test" in proc.stdout and (run / "evaluation-compare-data.txt").is_file()


def test_compare_takes_one_file_and_the_runs_own_scales(two_runs):
    run, other, data = two_runs
    proc = run_cli("evaluate", str(run), "--data_file", str(data), "--data_file", str(data), "--compare",
                   str(other), check=False)
    assert proc.returncode == 2 and "--compare takes one --data_file" in proc.stderr
    assert "Traceback" not in proc.stderr
