"""budgetune.tasks: each task's loss, metrics, outputs and multi-label thresholds, against sklearn/scipy/torch."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from budgetune import tasks
from budgetune.errors import ConfigError


def test_multi_label_metrics_are_sklearns():
    from sklearn.metrics import accuracy_score, f1_score

    logits = np.array([[2.0, -1.0, 0.3], [-2.0, 1.0, -0.2], [1.0, 1.0, 1.0], [-1.0, -1.0, -1.0]])
    labels = [[1, 0, 1], [0, 1, 0], [1, 0, 1], [0, 0, 0]]
    m = tasks.task_metrics(tasks.MULTI_LABEL, logits, labels, ["a", "b", "c"])
    pred = (logits > 0).astype(int)  # sigmoid >= 0.5
    assert m["micro_f1"] == pytest.approx(f1_score(labels, pred, average="micro"))
    assert m["macro_f1"] == pytest.approx(f1_score(labels, pred, average="macro"))
    assert m["subset_accuracy"] == pytest.approx(accuracy_score(labels, pred)) == 0.75
    bce = torch.nn.BCEWithLogitsLoss()(torch.tensor(logits, dtype=torch.float32), torch.tensor(labels, dtype=torch.float32))
    assert m["loss"] == pytest.approx(float(bce), rel=1e-6)
    assert m["thresholds"] == [0.5, 0.5, 0.5]
    assert "micro_f1" in tasks.metrics_text(tasks.MULTI_LABEL, m)


def test_regression_metrics_are_scipys_and_sklearns():
    from scipy.stats import pearsonr, spearmanr

    y = np.array([0.0, 1.0, 2.5, 4.0, 3.0])
    pred = np.array([[0.2], [0.8], [2.0], [4.5], [2.0]])
    m = tasks.task_metrics(tasks.REGRESSION, pred, y.tolist(), ["score"])
    assert m["mse"] == pytest.approx(np.mean((y - pred[:, 0]) ** 2)) == pytest.approx(m["loss"], rel=1e-6)
    assert m["mae"] == pytest.approx(np.mean(np.abs(y - pred[:, 0])))
    assert m["pearson"] == pytest.approx(pearsonr(y, pred[:, 0])[0])
    assert m["spearman"] == pytest.approx(spearmanr(y, pred[:, 0])[0])
    const = tasks.task_metrics(tasks.REGRESSION, np.ones((5, 1)), y.tolist(), ["score"])
    assert const["pearson"] == 0.0  # undefined for a constant prediction: 0, never NaN (it selects a model)


def test_the_training_loss_is_transformers_problem_types():
    """tasks.loss is what a transformers model computes for its problem_type (what training minimises)."""
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    for task, labels in [(tasks.MULTI_LABEL, torch.tensor([[1.0, 0.0, 1.0], [0.0, 1.0, 0.0]])),
                         (tasks.REGRESSION, torch.tensor([0.5, -1.5]))]:
        n = labels.shape[-1] if labels.dim() == 2 else 1
        cfg = BertConfig(vocab_size=50, hidden_size=8, num_hidden_layers=1, num_attention_heads=2,
                         intermediate_size=16, num_labels=n, problem_type=tasks.problem_type(task))
        model = BertForSequenceClassification(cfg).eval()
        with torch.no_grad():
            out = model(input_ids=torch.tensor([[1, 2, 3], [4, 5, 6]]), labels=labels)
        assert float(tasks.loss(task, out.logits, labels)) == pytest.approx(float(out.loss), rel=1e-6)
        assert tasks.eval_loss(task, out.logits.detach().numpy(), labels.numpy()) == pytest.approx(float(out.loss),
                                                                                                      rel=1e-5)


def test_thresholds_are_tuned_per_label():
    # label 0: positives have probability ~0.3, negatives ~0.1 -> a threshold between them; label 1: never positive
    logits = np.log(np.array([[0.3, 0.2], [0.32, 0.6], [0.1, 0.1], [0.12, 0.3]]) /
                    (1 - np.array([[0.3, 0.2], [0.32, 0.6], [0.1, 0.1], [0.12, 0.3]])))
    labels = [[1, 0], [1, 0], [0, 0], [0, 0]]
    t = tasks.tune_thresholds(logits, labels)
    assert 0.12 < t[0] <= 0.3 and t[1] == 0.5
    assert tasks.predictions(tasks.MULTI_LABEL, logits, t)[:, 0].tolist() == [1, 1, 0, 0]
    assert tasks.predictions(tasks.MULTI_LABEL, logits)[:, 0].tolist() == [0, 0, 0, 0]  # at 0.5: none


def test_a_metric_of_another_task_is_refused_naming_its_task():
    tasks.check_metric(tasks.REGRESSION, "pearson")
    with pytest.raises(ConfigError, match=r"'micro_f1' is a multi_label metric; with --task regression choose one"):
        tasks.check_metric(tasks.REGRESSION, "micro_f1")
    with pytest.raises(ConfigError, match="'acc' is unknown"):
        tasks.check_metric(tasks.SINGLE_LABEL, "acc")
    with pytest.raises(ConfigError, match="--task must be one of"):
        tasks.problem_type("ranking")


def test_macro_f1_leaves_out_a_class_that_is_nowhere_in_the_rows():
    """scikit-learn's rule: a class absent from truth and predictions has no F1 (scoring it 0 made a perfect model
    67 %); one in the truth that is never predicted counts 0."""
    from budgetune.metrics import classification_metrics

    assert classification_metrics([0, 0, 1, 1], [0, 0, 1, 1], ["a", "b", "c"])["macro_f1"] == 1.0
    assert classification_metrics([0, 0, 1, 1], [0, 0, 0, 0], ["a", "b", "c"])["macro_f1"] == pytest.approx(1 / 3)
    y = np.array([[1, 0, 0], [0, 1, 0]])
    assert tasks.multi_label_metrics(y, y, ["a", "b", "c"])["macro_f1"] == 1.0


def test_a_tuned_threshold_has_the_best_f1_not_a_near_one_closer_to_one_half():
    probs = np.full((100_000, 1), 0.9)
    probs[0] = 0.4  # every row is positive: 0.40 gets them all, 0.50 misses one (F1 0.999995, within isclose's 1e-5)
    logits = np.log(probs / (1 - probs))
    assert tasks.tune_thresholds(logits, np.ones((100_000, 1), dtype=int)) == [pytest.approx(0.4)]


def test_multi_label_names_read_integers_as_names_and_cap_the_classes():
    from budgetune.data.labels import multi_labels
    from budgetune.errors import DataError

    rows, names = multi_labels("f.csv", ['[1, "a"]', '["1"]'], "label", None, None)
    assert names == ["1", "a"] and rows == [[1, 1], [1, 0]]  # the integer 1 is the label "1", as the string is
    with pytest.raises(DataError, match="label 200000 would make the labels 0..200000"):
        multi_labels("f.csv", ["[200000]", "[1]"], "label", None, None)
    # an item is an integer by the single-label rule: "+-5" is a name, not int() raising a traceback
    rows, names = multi_labels("f.csv", ['["+-5", "1"]', '["2"]'], "label", None, None)
    assert names == ["+-5", "1", "2"] and rows == [[1, 1, 0], [0, 0, 1]]


@pytest.mark.parametrize("thresholds, message", [
    ({"a": 50}, r"thresholds\['a'\] must be a probability in \[0, 1\], got 50"),
    ({"a": "0.5"}, r"thresholds\['a'\] must be a probability in \[0, 1\], got '0.5'"),
    ({"A": 0.4}, r"thresholds\['A'\]: not one of the bundle's label_names \['a', 'b'\]"),
    ([0.5, 0.5], r"thresholds must map label names to probabilities, got list"),
])
def test_a_bundles_bad_thresholds_are_refused_naming_the_file(tmp_path, thresholds, message):
    """A hand-edited threshold of 50 (for 0.5) made every label negative, a misspelt name fell back to 0.5."""
    from budgetune.errors import AdapterError
    from budgetune.inference.loading import bundle_info

    (tmp_path / "adapter_config.json").write_text("{}")
    (tmp_path / "budgetune.json").write_text(json.dumps({"task": "multi_label", "label_names": ["a", "b"],
                                                         "thresholds": thresholds}))
    with pytest.raises(AdapterError, match=rf"budgetune.json: {message}"):
        bundle_info(tmp_path)
    (tmp_path / "budgetune.json").write_text(json.dumps({"label_names": ["a", "b"], "thresholds": {"a": 0.3}}))
    assert bundle_info(tmp_path)["thresholds"] == {"a": 0.3}
