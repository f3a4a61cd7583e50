"""Comparing two runs on the same rows (issue 23, item 5): the paired statistics, and `budgetune evaluate --compare`
through the real command line."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from conftest import headline_rows, run_cli, tiny_train_args

from budgetune.metrics import comparison_text, paired_comparison


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



def test_a_p_value_below_the_smallest_double_is_not_shown_as_zero():
    c = paired_comparison(np.zeros(1296, dtype=int), np.r_[np.zeros(1274), np.ones(22)].astype(int),
                          np.r_[np.ones(1274), np.zeros(22)].astype(int), n_boot=100)
    assert c["mcnemar_p"] == 0.0  # scipy's exact value underflows
    text = comparison_text(c, "a", "b", "data.csv")
    assert "McNemar exact test p < 1e-300" in text and "p = 0\n" not in text


def test_compare_reads_each_runs_text_pairs(tmp_path, monkeypatch):
    """A pair run is scored on its pairs, a single-text run on the first text alone, on the same rows; an explicit
    text pair column applies to both."""
    from budgetune.inference import evaluate as evaluate_lib

    data = tmp_path / "pairs.csv"
    data.write_text("text,text_b,label\nrates rise,banks follow,1\ncup final,rain falls,0\n", encoding="utf-8")
    infos = {"pair": {"label_names": ["0", "1"], "task": "single_label", "text_pair_column_name": "text_b",
                      "max_seq_length": 16},
             "single": {"label_names": ["0", "1"], "task": "single_label", "max_seq_length": 16}}
    seen = []

    class Main:
        is_main_process = True

    def fake_load(run, **kwargs):
        return Main(), object(), None, {**infos[run], "applied_adapter_scale": 1.0,
                                        "precision": {"precision": "fp32"}}

    def fake_logits(model, tokenizer, table, *args):
        seen.append(table.text_pairs)
        return np.array([[0.0, 1.0], [1.0, 0.0]], dtype=np.float32)

    monkeypatch.setattr(evaluate_lib, "bundle_info", lambda run: infos[run])
    monkeypatch.setattr(evaluate_lib, "load_for_inference", fake_load)
    monkeypatch.setattr(evaluate_lib, "table_logits", fake_logits)
    report = evaluate_lib.compare("pair", "single", str(data), output=str(tmp_path / "c"))
    assert seen == [["banks follow", "rain falls"], None]
    assert report["comparison"]["accuracy_a"] == 1.0
    assert "A = pair (adapter scale 1, fp32)" in (tmp_path / "c.txt").read_text()
    seen.clear()
    evaluate_lib.compare("pair", "single", str(data), output=str(tmp_path / "c"), text_pair_column="text_b")
    assert seen == [["banks follow", "rain falls"]] * 2


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
