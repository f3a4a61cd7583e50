"""The training loss a run's options choose: --class_weights and --label_smoothing_factor on the cross-entropy,
--class_weights as BCE's pos_weight for multi-label."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from budgetune.adalora import lean_step
from budgetune.errors import ConfigError


def class_weights(spec: str | list[float] | None, labels, label_names: Sequence[str]) -> list[float] | None:
    """The weights --class_weights resolves to on the training labels, one per label (None when off).

    `labels`: a vector of class indices (single-label; rows below 0, unlabelled, are left out) or a 0/1 matrix of
    rows x labels (multi-label). `balanced`: sklearn's compute_class_weight for a vector, n / (n_classes x count);
    for a matrix each label's negatives / positives, BCEWithLogitsLoss's `pos_weight` (so that a label's positives
    weigh as much as its negatives). A list must hold one weight > 0 per label.
    """
    if spec is None:
        return None
    n = len(label_names)
    if spec != "balanced":
        weights = [float(w) for w in spec]  # type: ignore[union-attr]
        if len(weights) != n:
            raise ConfigError(f"--class_weights: {len(weights)} weight(s) for {n} labels ({', '.join(label_names)}); "
                              "give one per label, in label order, or `balanced`")
        return weights
    y = np.asarray(labels)
    if y.ndim == 2:
        positives = y.sum(axis=0)
        empty = [label_names[i] for i in np.flatnonzero((positives == 0) | (positives == len(y)))]
        if empty:
            raise ConfigError(f"--class_weights balanced: label {empty[0]!r} is on no training row or on every one; "
                              "give the weights as a list")
        return [float(w) for w in (len(y) - positives) / positives]
    from sklearn.utils.class_weight import compute_class_weight

    y = y[y >= 0]
    missing = [label_names[i] for i in range(n) if not np.any(y == i)]
    if missing:
        raise ConfigError(f"--class_weights balanced: class {missing[0]!r} has no training row; give the weights as a "
                          "list")
    return [float(w) for w in compute_class_weight("balanced", classes=np.arange(n), y=y)]


def cross_entropy_loss(weights: list[float] | None, smoothing: float):
    """loss_fn(model, batch) for train(): the mean cross-entropy of the batch's labelled rows with per-class
    `weights` (torch's weighted mean: divided by the weights of the rows' classes) and label smoothing, plus
    AdaLoRA's orthogonal regulariser, as the model's own loss adds it. None when neither is set: the model's own
    loss, unchanged."""
    if weights is None and not smoothing:
        return None
    table = None if weights is None else torch.tensor(weights, dtype=torch.float32)

    def criterion(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        w = None if table is None else table.to(logits.device)
        return F.cross_entropy(logits, labels.view(-1), weight=w, label_smoothing=smoothing)

    return on_logits(criterion)


def bce_loss(pos_weight: list[float] | None):
    """loss_fn(model, batch) for a multi-label run with --class_weights: the mean binary cross-entropy of every
    (row, label) with each label's positives weighted by `pos_weight` (BCEWithLogitsLoss's), plus AdaLoRA's
    orthogonal regulariser. None without weights: the model's own loss (the same BCE, unweighted)."""
    if pos_weight is None:
        return None
    table = torch.tensor(pos_weight, dtype=torch.float32)

    def criterion(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return F.binary_cross_entropy_with_logits(logits, labels.to(logits.dtype), pos_weight=table.to(logits.device))

    return on_logits(criterion)


def on_logits(criterion):
    """loss_fn(model, batch) for train(): `criterion(logits, labels)` on the model's fp32 logits for the batch, plus
    AdaLoRA's orthogonal regulariser, as the model's own loss adds it."""

    def loss_fn(model, batch: dict) -> torch.Tensor:
        out = model(**{k: v for k, v in batch.items() if k not in ("idx", "labels")})
        loss = criterion(out.logits.float(), batch["labels"])
        penalty = lean_step.orth_penalty(model)
        return loss if penalty is None else loss + penalty

    return loss_fn
