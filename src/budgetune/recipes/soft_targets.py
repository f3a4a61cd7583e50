"""Distillation's soft targets and loss, per task (budgetune.tasks).

The teachers' targets (`teacher_targets`): single-label, the log of their averaged softmax at temperature T;
multi-label, their averaged sigmoid probabilities at T (sigmoid(z / T) per label); regression, their averaged values.

The loss (`kd_loss`), per row i of a batch of N rows, averaged over all N rows (labelled or not):

    loss = 1/N sum_i [alpha x HARD_i + (1 - alpha) x SOFT_i] + orth_reg_weight x R

| task | HARD_i (0 for an unlabelled row) | SOFT_i |
| --- | --- | --- |
| single_label | cross-entropy on the gold class | T^2 x KL(teacher_T || student_T) |
| multi_label | BCE with logits, mean over labels | T^2 x BCE(sigmoid(z_i / T), teacher probabilities), mean over labels |
| regression | squared error, mean over targets | squared error to the teachers' values, mean over targets (no T) |

HARD is tasks.loss row by row; with alpha = 1 and every row labelled the loss is tasks.loss of the batch (the model's
own loss), so such a run equals ordinary training. R: AdaLoRA's orthogonal regulariser, at its configured weight.
An unlabelled row's label is UNLABELED (single-label) or NaN (multi-label, regression): `placeholder`.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from budgetune import tasks
from budgetune.adalora import lean_step
from budgetune.data import unlabeled
from budgetune.metrics import softmax


def ensemble_log_probs(logits: list[np.ndarray], temperature: float) -> np.ndarray:
    """log of the teachers' averaged probabilities at temperature T (averaging probabilities, not logits)."""
    probs = np.mean([softmax(z, temperature) for z in logits], axis=0)
    return np.log(np.clip(probs, 1e-12, None)).astype(np.float32)


def teacher_targets(task: str, logits: list[np.ndarray], temperature: float) -> np.ndarray:
    """What the student learns from the teachers' logits: log-probabilities at T (single-label), per-label
    probabilities sigmoid(z / T) (multi-label) or values (regression), averaged over the teachers."""
    if task == tasks.SINGLE_LABEL:
        return ensemble_log_probs(logits, temperature)
    if task == tasks.MULTI_LABEL:
        return np.mean([tasks.sigmoid(np.asarray(z) / temperature) for z in logits], axis=0).astype(np.float32)
    return np.mean([np.asarray(z, dtype=np.float64) for z in logits], axis=0).astype(np.float32)


def placeholder(task: str, width: int):
    """The label of an unlabelled row: UNLABELED (ignored by cross-entropy), or a row of NaN (one NaN for a
    single regression target)."""
    if task == tasks.SINGLE_LABEL:
        return unlabeled.UNLABELED
    return float("nan") if task == tasks.REGRESSION and width == 1 else [float("nan")] * width


def kd_loss(targets: torch.Tensor, alpha: float, temperature: float, task: str = tasks.SINGLE_LABEL):
    """loss_fn(model, batch) for train(): rows are looked up in `targets` (teacher_targets) by the batch's `idx`.

    Defined per row and averaged over all N rows of the batch, labelled or not (see the module docstring):

        loss = 1/N sum_i [alpha x HARD_i + (1 - alpha) x SOFT_i] + orth_reg_weight x R

    Single-label: CE_i on row i's gold label (0 for an unlabelled row) and T^2 x KL(teacher_T || student_T). R:
    AdaLoRA's orthogonal regulariser (absent for other methods), at its configured weight on every batch, whatever
    alpha and whether or not the batch has a labelled row. A labelled row weighs the same in a batch of labelled rows
    as among unlabelled ones. With alpha = 1 and every row labelled it is the model's own loss (transformers' mean
    cross-entropy, BCE or MSE, plus AdaLoRA's regulariser), so such a run equals ordinary training.
    """
    soft = single_label_terms(targets, alpha, temperature) if task == tasks.SINGLE_LABEL else \
        task_terms(targets, alpha, temperature, task)

    def loss_fn(model, batch: dict) -> torch.Tensor:
        out = model(**{k: v for k, v in batch.items() if k not in ("idx", "labels")})
        terms = soft(out.logits, batch)
        if (penalty := lean_step.orth_penalty(model)) is not None:
            terms.append(penalty)
        return sum(terms[1:], terms[0]) if terms else out.logits.sum() * 0.0

    return loss_fn


def single_label_terms(teacher_log_probs: torch.Tensor, alpha: float, temperature: float):
    """terms(logits, batch): alpha x 1/N sum CE_i and (1 - alpha) x T^2 x 1/N sum KL_i."""
    t2 = temperature * temperature

    def terms(logits: torch.Tensor, batch: dict) -> list[torch.Tensor]:
        rows, labels, out = logits.shape[0], batch.get("labels"), []
        if alpha > 0 and labels is not None:  # unlabelled rows (ignored) add 0 to the sum
            ce = F.cross_entropy(logits, labels.view(-1), ignore_index=unlabeled.UNLABELED, reduction="sum")
            out.append(alpha * ce / rows)
        if alpha < 1:
            log_q = F.log_softmax(logits.float() / temperature, dim=-1)
            log_p = teacher_log_probs[batch["idx"].to(teacher_log_probs.device)].to(log_q.device)
            out.append((1 - alpha) * t2 * F.kl_div(log_q, log_p, reduction="sum", log_target=True) / rows)
        return out

    return terms


def task_terms(targets: torch.Tensor, alpha: float, temperature: float, task: str):
    """terms(logits, batch) for multi-label and regression: alpha x 1/N sum HARD_i (tasks.loss over the labelled
    rows, a NaN label marking an unlabelled row) and (1 - alpha) x SOFT (BCE at T, x T^2; or MSE)."""
    scale = temperature * temperature if task == tasks.MULTI_LABEL else 1.0

    def terms(logits: torch.Tensor, batch: dict) -> list[torch.Tensor]:
        rows, labels, out = logits.shape[0], batch.get("labels"), []
        if alpha > 0 and labels is not None:
            y = labels.to(logits.dtype).reshape(logits.shape)
            known = ~torch.isnan(y).any(-1)
            if bool(known.all()):  # every row labelled: tasks.loss of the batch itself (the model's own loss)
                out.append(alpha * tasks.loss(task, logits, y))
            elif bool(known.any()):  # a mean over the labelled rows' entries, times their share of the N rows
                out.append(alpha * tasks.loss(task, logits[known], y[known]) * (int(known.sum()) / rows))
        if alpha < 1:
            z = logits.float()
            t = targets[batch["idx"].to(targets.device)].to(z.device).reshape(z.shape)
            soft = (F.binary_cross_entropy_with_logits(z / temperature, t) if task == tasks.MULTI_LABEL
                    else F.mse_loss(z, t))
            out.append((1 - alpha) * scale * soft)
        return out

    return terms
