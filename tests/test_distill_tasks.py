"""Distillation for every task: the soft-target loss per task against a hand computation, the teacher checks and
the teacher-logit cache key, and (slow) tiny multi-label, regression and text-pair runs through the real CLI; and
self-training's refusal of the tasks and text pairs it does not handle yet."""

from __future__ import annotations

import json
import random
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from conftest import headline_rows, run_cli, tiny_train_args, write_csv

from budgetune import tasks
from budgetune.config import resolve
from budgetune.errors import AdapterError
from budgetune.recipes import distill
from budgetune.recipes.soft_targets import kd_loss, teacher_targets

NAN = float("nan")


class Fixed(torch.nn.Module):
    """A 'model' whose logits are given: the loss alone is under test."""

    def __init__(self, logits: np.ndarray):
        super().__init__()
        self.logits = torch.tensor(logits, dtype=torch.float32)

    def forward(self, **inputs):
        return SimpleNamespace(logits=self.logits)


def bce(z: np.ndarray, p: np.ndarray) -> np.ndarray:
    """Binary cross-entropy of logits z against probabilities p, elementwise, in float64."""
    s = 1 / (1 + np.exp(-z))
    return -(p * np.log(s) + (1 - p) * np.log(1 - s))


def hand_loss(task: str, z, labels, teachers, idx, alpha: float, t: float) -> float:
    """The documented loss row by row: 1/N sum_i [alpha x HARD_i (0 unlabelled) + (1 - alpha) x SOFT_i]."""
    z, y = np.asarray(z, np.float64), np.asarray(labels, np.float64).reshape(len(z), -1)
    rows = []
    for i in range(len(z)):
        labelled = not np.isnan(y[i]).any()
        if task == tasks.MULTI_LABEL:
            p = np.mean([1 / (1 + np.exp(-tz[idx[i]] / t)) for tz in teachers], axis=0)
            hard, soft = (bce(z[i], y[i]).mean() if labelled else 0.0), t * t * bce(z[i] / t, p).mean()
        else:
            v = np.mean([tz[idx[i]] for tz in teachers], axis=0)
            hard, soft = (((z[i] - y[i]) ** 2).mean() if labelled else 0.0), ((z[i] - v) ** 2).mean()
        rows.append(alpha * hard + (1 - alpha) * soft)
    return float(np.mean(rows))


CASES = {  # task: (student logits [4 rows], labels (NaN: unlabelled), teachers' logits [10 rows])
    "multi_label": ([[2.0, -1.0, 0.3], [-0.5, 1.5, -2.0], [0.1, 0.2, -0.3], [-1.0, -1.0, 3.0]],
                    [[1, 0, 1], [NAN] * 3, [0, 1, 0], [NAN] * 3], 3),
    "regression": ([[0.5, -1.0], [1.5, 2.0], [-0.2, 0.0], [3.0, 1.0]],
                   [[0.0, -1.5], [NAN, NAN], [1.0, 0.5], [2.5, NAN]], 2),
    "regression, one target": ([[0.5], [1.5], [-0.2], [3.0]], [0.0, NAN, 1.0, 2.5], 1),
}


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("alpha", [0.0, 0.3, 1.0])
def test_the_soft_target_loss_of_each_task_is_the_documented_one(case, alpha):
    task = tasks.MULTI_LABEL if case == "multi_label" else tasks.REGRESSION
    z, labels, width = CASES[case]
    teachers = [np.random.default_rng(s).normal(size=(10, width)).astype(np.float32) for s in (1, 2)]
    idx = [9, 3, 0, 7]
    targets = torch.from_numpy(teacher_targets(task, teachers, 2.0))
    batch = {"input_ids": torch.zeros(4, 3, dtype=torch.long), "labels": torch.tensor(labels, dtype=torch.float32),
             "idx": torch.tensor(idx)}
    got = kd_loss(targets, alpha, 2.0, task)(Fixed(np.asarray(z)), dict(batch))
    assert float(got) == pytest.approx(hand_loss(task, z, labels, teachers, idx, alpha, 2.0), rel=1e-5)


@pytest.mark.parametrize("task, labels", [(tasks.MULTI_LABEL, [[1.0, 0.0], [0.0, 1.0]]),
                                          (tasks.REGRESSION, [[0.5, 1.0], [-1.0, 2.0]])])
def test_every_row_labelled_and_alpha_one_is_the_models_own_loss(task, labels):
    z = np.array([[0.3, -1.2], [2.0, 0.7]])
    targets = torch.zeros(2, 2)
    batch = {"input_ids": torch.zeros(2, 3, dtype=torch.long), "labels": torch.tensor(labels), "idx": torch.arange(2)}
    own = tasks.loss(task, torch.tensor(z, dtype=torch.float32), torch.tensor(labels))
    assert torch.equal(kd_loss(targets, 1.0, 2.0, task)(Fixed(z), dict(batch)), own)


@pytest.mark.parametrize("task, labels, names", [
    (tasks.MULTI_LABEL, [[1, 0, 1], [0, 1, 0]], ["a", "b", "c"]),
    (tasks.REGRESSION, [0.5, 1.5], ["score"]),
    (tasks.REGRESSION, [[0.5, 1.0], [1.5, 2.0]], ["v", "w"]),
])
def test_an_unlabelled_rows_label_reaches_the_loss_as_nan(tiny_roberta, task, labels, names):
    """The placeholder survives tokenization and collation, so kd_loss leaves the row out of the gold-label term."""
    from transformers import AutoTokenizer

    from budgetune.data import readers, unlabeled
    from budgetune.data.batching import make_collator
    from budgetune.recipes.soft_targets import placeholder

    tok = AutoTokenizer.from_pretrained(tiny_roberta)
    table = unlabeled.with_unlabeled(readers.TextTable(["a cat", "a dog"], labels, names, "mem"), ["a bird"],
                                     [placeholder(task, len(names))])
    ds = readers.tokenize(table, tok, 16, None)
    got = make_collator(tok, None)([ds[i] for i in range(3)])["labels"]
    assert got.dtype == torch.float32 and torch.isnan(got[2]).all() and not torch.isnan(got[:2]).any()
    assert got[:2].tolist() == labels


def test_the_teacher_cache_keys_on_the_task_and_the_text_pairs():
    texts = ["a cat sat", "the dog ran"]
    keys = {distill.texts_digest(texts, 48, task) for task in tasks.TASKS}
    keys.add(distill.texts_digest(texts, 48, tasks.SINGLE_LABEL, ["x", "y"]))
    keys.add(distill.texts_digest(texts, 48, tasks.SINGLE_LABEL, ["x", "z"]))
    assert len(keys) == 5


def student(*flags: str):
    return resolve(None, ["--output_dir", "unused", *flags])


@pytest.mark.parametrize("info, flags, message", [
    ({"task": "multi_label", "label_names": ["a", "b"]}, [],
     r"--teacher T: it is a --task multi_label model but the student trains --task single_label"),
    ({"task": "multi_label", "label_names": ["b", "a"]}, ["--task", "multi_label"],
     r"--teacher T: its labels are \['b', 'a'\] but the training data's are \['a', 'b'\]"),
    ({"task": "regression", "label_names": ["score"]}, ["--task", "regression"],
     r"--teacher T: it predicts 1 target\(s\) \['score'\] but the student trains on 2"),
    ({"task": "single_label", "label_names": ["a", "b"], "text_pair_column_name": "q2"}, [],
     r"--teacher T: it reads text pairs \(--text_pair_column_name q2\) but the student reads single texts"),
    ({"label_names": ["a", "b"]}, ["--text_pair_column_name", "q2"],
     r"--teacher T: it reads single texts but the student reads text pairs"),
])
def test_a_teacher_of_another_task_labels_targets_or_pairs_is_refused_naming_it(info, flags, message):
    names = ["v", "w"] if "regression" in flags else ["a", "b"]
    with pytest.raises(AdapterError, match=message):
        distill.check_same_task("T", info, student(*flags), names)


def test_a_teacher_of_the_same_task_passes_and_regression_target_names_may_differ():
    distill.check_same_task("T", {"task": "multi_label", "label_names": ["a", "b"]}, student("--task", "multi_label"),
                            ["a", "b"])
    distill.check_same_task("T", {"task": "regression", "label_names": ["score"]}, student("--task", "regression"),
                            ["rating"])
    distill.check_same_task("T", {"label_names": ["a"], "text_pair_column_name": "q2"},
                            student("--text_pair_column_name", "question2"), ["a"])


# ---------------------------------------------------------------------------------------------- slow: real runs

NAMES = ["World", "Sports", "Business", "Sci/Tech"]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """Multi-label (a third of the rows two headlines joined, both topics), regression (a score from the topic; and
    shifted by +10 for a teacher that disagrees with the gold scores) and
    pair (same topic or not) files from the headlines, and unlabelled texts (halves of headlines)."""
    rows, rng, folder = headline_rows(), random.Random(0), tmp_path_factory.mktemp("distill-tasks")
    multi, reg, shifted, pairs = [], [], [], []
    for i, (label, text) in enumerate(rows):
        other_label, other = rows[rng.randrange(len(rows))]
        if i % 2 == 0:
            other_label, other = next(r for r in rng.sample(rows, 40) + rows if r[0] == label)
        both = i % 3 == 0
        multi.append([f"{text} {other}" if both else text,
                      json.dumps(sorted({NAMES[label], NAMES[other_label]}) if both else [NAMES[label]])])
        reg.append([text, label * 1.5 + 0.25])
        shifted.append([text, label * 1.5 + 10.25])
        pairs.append([text, other, int(label == other_label)])
    halves = sorted({" ".join(t.split()[: len(t.split()) // 2]) for _, t in rows})[:60]
    return {"multi": write_csv(folder / "multi.csv", ["text", "labels"], multi),
            "reg": write_csv(folder / "reg.csv", ["text", "score"], reg),
            "reg_shifted": write_csv(folder / "reg_shifted.csv", ["text", "score"], shifted),
            "pairs": write_csv(folder / "pairs.csv", ["text", "text_b", "label"], pairs),
            "unlabelled": write_csv(folder / "unlabelled.csv", ["text"], [[h] for h in halves])}


def teach_and_distill(tiny_roberta, data, root, *extra: str, **flags):
    """A LoRA teacher trained by `budgetune train`, then a student distilled from it by `budgetune distill`."""
    recipe = {"num_train_epochs": 4, "learning_rate": 2e-2, "robust_tolerance": 5, **flags}
    run_cli(*tiny_train_args(tiny_roberta, data, root / "teacher", "lora", **recipe))
    args = tiny_train_args(tiny_roberta, data, root / "student", "lora", **{**recipe, "seed": 3})[1:]
    return run_cli("distill", "--teacher", str(root / "teacher"), *extra, *args)


def bundle(run):
    return json.loads((run / "adapter" / "budgetune.json").read_text())


@pytest.mark.slow
def test_multi_label_distills_with_bce_on_teacher_probabilities(tiny_roberta, files, tmp_path):
    teach_and_distill(tiny_roberta, files["multi"], tmp_path, "--unlabeled_file", str(files["unlabelled"]),
                      "--alpha", "0.5", task="multi_label")
    info, record = bundle(tmp_path / "student"), json.loads((tmp_path / "student" / "distill.json").read_text())
    assert info["task"] == "multi_label" and info["label_names"] == sorted(NAMES) and "eval_micro_f1" in info["metrics"]
    assert set(info["thresholds"]) == set(NAMES) and all(0 < t < 1 for t in info["thresholds"].values())
    assert record["task"] == "multi_label" and record["unlabeled"]["kept"] > 0
    assert set(record["teachers"][0]["teacher_on_gold"]) == {"micro_f1"}
    cached = np.load(record["teachers"][0]["cache_file"])
    assert cached.shape == (record["labelled_rows"] + record["unlabeled"]["kept"], 4)
    card = (tmp_path / "student" / "adapter" / "README.md").read_text()
    assert "binary cross-entropy on the teachers' sigmoid probabilities, T = 2.0" in card
    # a regression student may not learn from this multi-label teacher
    args = tiny_train_args(tiny_roberta, files["reg"], tmp_path / "x", "lora", task="regression")[1:]
    refused = run_cli("distill", "--teacher", str(tmp_path / "teacher"), *args, check=False)
    assert refused.returncode == 2 and f"--teacher {tmp_path / 'teacher'}: it is a --task multi_label" in refused.stderr


@pytest.mark.slow
def test_regression_distills_toward_the_teachers_values(tiny_roberta, files, tmp_path):
    """The teacher learnt scores shifted by +10; a student distilled at alpha 0 on the gold scores follows the
    teacher's values, not the gold ones."""
    from budgetune.data import readers
    from budgetune.inference.loading import load_for_inference
    from budgetune.inference.runner import table_logits

    recipe = {"task": "regression", "num_train_epochs": 4, "learning_rate": 2e-2, "robust_tolerance": 5}
    run_cli(*tiny_train_args(tiny_roberta, files["reg_shifted"], tmp_path / "teacher", "lora", **recipe))
    args = tiny_train_args(tiny_roberta, files["reg"], tmp_path / "student", "lora", **{**recipe, "seed": 3})[1:]
    run_cli("distill", "--teacher", str(tmp_path / "teacher"), "--alpha", "0", *args)
    info, record = bundle(tmp_path / "student"), json.loads((tmp_path / "student" / "distill.json").read_text())
    assert info["task"] == "regression" and "eval_mse" in info["metrics"] and record["task"] == "regression"
    assert "squared error to the teachers' values" in (tmp_path / "student" / "adapter" / "README.md").read_text()
    table = readers.load_table(str(files["reg"]), task="regression")
    values = {}
    for who in ("teacher", "student"):
        accelerator, model, tok, meta = load_for_inference(tmp_path / who / "adapter")
        values[who] = table_logits(model, tok, table, accelerator, 64, meta["max_seq_length"])[:, 0]
    gold = np.asarray(table.labels)
    assert values["teacher"].mean() > gold.mean() + 5  # the teacher learnt the shift
    to_teacher = np.mean((values["student"] - values["teacher"]) ** 2)
    assert to_teacher < 0.1 * np.mean((values["student"] - gold) ** 2), to_teacher


@pytest.mark.slow
def test_text_pairs_reach_the_teacher_as_true_pairs(tiny_roberta, files, tmp_path):
    from budgetune.data import readers
    from budgetune.data import splits as splits_lib
    from budgetune.inference.loading import load_for_inference
    from budgetune.inference.runner import table_logits

    teach_and_distill(tiny_roberta, files["pairs"], tmp_path, text_pair_column_name="text_b", num_train_epochs=2)
    record = json.loads((tmp_path / "student" / "distill.json").read_text())
    assert bundle(tmp_path / "student")["text_pair_column_name"] == "text_b"
    train = splits_lib.load_splits(resolve(str(tmp_path / "student" / "config.yaml"), [])).train
    assert train.text_pairs is not None and len(train.texts) == record["labelled_rows"]
    accelerator, model, tok, meta = load_for_inference(tmp_path / "teacher" / "adapter")
    on_pairs = table_logits(model, tok, train, accelerator, 64, meta["max_seq_length"])
    single = readers.TextTable(train.texts, None, meta["label_names"], "single")
    on_texts = table_logits(model, tok, single, accelerator, 64, meta["max_seq_length"])
    cached = np.load(record["teachers"][0]["cache_file"])
    np.testing.assert_allclose(cached, on_pairs, atol=1e-4)  # the teacher read (text, text_pair), not the text alone
    assert not np.allclose(cached, on_texts, atol=1e-4)
    args = tiny_train_args(tiny_roberta, files["pairs"], tmp_path / "x", "lora")[1:]
    refused = run_cli("distill", "--teacher", str(tmp_path / "teacher"), *args, check=False)
    assert refused.returncode == 2 and "it reads text pairs (--text_pair_column_name text_b)" in refused.stderr


def test_unlabelled_texts_with_text_pairs_are_refused_naming_the_flag(tmp_path):
    from budgetune.errors import ConfigError

    cfg = resolve(None, ["--text_pair_column_name", "q2", "--output_dir", str(tmp_path / "run")])
    with pytest.raises(ConfigError, match=r"--unlabeled_file u.csv: unlabelled texts cannot be used with "
                                          r"--text_pair_column_name"):
        distill.distill(cfg, ["teacher"], unlabeled_file="u.csv")
    assert not (tmp_path / "run").exists()


def test_a_regression_teacher_with_other_target_names_is_warned_about(capsys):
    from budgetune.config import resolve
    from budgetune.recipes.distill import check_same_task

    cfg = resolve(None, ["--task", "regression"])
    info = {"task": "regression", "label_names": ["valence", "arousal"]}
    check_same_task("runs/t", info, cfg, ["arousal", "valence"])
    assert "warning: teacher runs/t predicts the targets ['valence', 'arousal']" in capsys.readouterr().err
    check_same_task("runs/t", info, cfg, ["valence", "arousal"])
    assert capsys.readouterr().err == ""


def test_the_teacher_cache_keys_int8_on_its_backend(monkeypatch):
    """onnxruntime's int8 and torch's give different logits: installing or removing onnxruntime must not reuse the
    other's cached logits."""
    from budgetune.inference import precisions

    def key(backend: str, precision: str) -> str:
        monkeypatch.setattr(precisions, "int8_backend", lambda: (backend, "in words"))
        return distill.cache_path("c", "t" * 24, "x" * 24, precision).name

    assert key("onnxruntime", "int8") != key("torch", "int8")
    assert key("onnxruntime", "bf16") == key("torch", "bf16")
