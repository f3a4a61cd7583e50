"""budgetune serve's answer per task (serve/answers.py) on given logits, against budgetune.tasks and predict's cells:
quick, no model."""

from __future__ import annotations

import json

import numpy as np
import pytest

pytest.importorskip("fastapi")

from budgetune import tasks  # noqa: E402
from budgetune.inference.predict import answers  # noqa: E402
from budgetune.serve.answers import answer  # noqa: E402

LOGITS = np.array([[2.0, -1.0, 0.1, 9.0], [-3.0, 0.4, -0.2, 9.0]], dtype=np.float32)  # column 3: another adapter's


def test_multi_label_answers_the_label_sets_at_the_given_thresholds():
    names = ["a", "b", "c"]
    r = answer(tasks.MULTI_LABEL, "tags", names, LOGITS, [False, True], 100, [0.5, 0.55, 0.5])
    body = r.model_dump()
    assert body["task"] == "multi_label" and body["thresholds"] == [0.5, 0.55, 0.5] and body["truncated_texts"] == 1
    # row 2: sigmoid(0.4) = 0.599 >= 0.55 (b), sigmoid(-0.2) = 0.45 < 0.5 (c)
    assert [p["labels"] for p in body["predictions"]] == [["a", "c"], ["b"]]
    assert [p["labels"] for p in body["predictions"]] == [json.loads(c) for c in answers(
        tasks.MULTI_LABEL, LOGITS[:, :3], names, "name", [0.5, 0.55, 0.5])]
    np.testing.assert_allclose([p["probabilities"] for p in body["predictions"]], 1 / (1 + np.exp(-LOGITS[:, :3])))
    none = answer(tasks.MULTI_LABEL, "tags", names, LOGITS, [False, False], 100, [0.95, 0.95, 0.95])
    assert [p["labels"] for p in none.model_dump()["predictions"]] == [[], []]


def test_regression_answers_each_target_by_name():
    body = answer(tasks.REGRESSION, "va", ["valence", "arousal"], LOGITS, [False, False], 100).model_dump()
    assert body["task"] == "regression" and body["targets"] == ["valence", "arousal"]
    assert [p["values"] for p in body["predictions"]] == [{"valence": 2.0, "arousal": -1.0},
                                                           {"valence": -3.0, "arousal": pytest.approx(0.4)}]


def test_single_label_answers_as_ever():
    body = answer(tasks.SINGLE_LABEL, "news", ["x", "y", "z"], LOGITS, [False, False], 100).model_dump()
    assert set(body) == {"adapter", "labels", "predictions", "max_chars", "truncated_texts"}
    assert [p["label"] for p in body["predictions"]] == ["x", "y"]
    assert set(body["predictions"][0]) == {"label", "label_id", "probabilities", "truncated"}
