"""The one copy of "is this metric better" and of softmax that training, search, self-training, predict, serve
and distil share (budgetune.metrics)."""

from __future__ import annotations

import numpy as np
import torch

from budgetune.metrics import improves, lower_is_better, softmax


def test_a_lower_loss_and_a_higher_accuracy_improve():
    assert lower_is_better("loss") and not lower_is_better("accuracy") and not lower_is_better("macro_f1")
    assert improves(0.5, None, "loss") and improves(0.5, None, "accuracy")  # the first value is the best so far
    assert improves(0.3, 0.4, "loss") and not improves(0.5, 0.4, "loss")
    assert improves(0.9, 0.8, "accuracy") and not improves(0.7, 0.8, "macro_f1")
    assert not improves(0.8, 0.8, "accuracy") and not improves(0.4, 0.4, "loss")  # a tie keeps the earlier one


def test_softmax_is_torchs_in_float64_at_any_temperature():
    logits = np.array([[1.0, 2.0, 3.0], [1000.0, 0.0, -1000.0]], dtype=np.float32)
    for t in (1.0, 2.0, 0.5):
        expected = torch.softmax(torch.from_numpy(logits).double() / t, -1).numpy()
        got = softmax(logits, t)
        assert got.dtype == np.float64 and np.allclose(got, expected, rtol=0, atol=1e-15)
    assert np.allclose(softmax(logits).sum(-1), 1.0)
