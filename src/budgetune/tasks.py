"""What a task means, beyond one label per text: single-label (softmax over classes), multi-label (one sigmoid per
label) and regression (one value per target). The one place that knows each task's transformers problem_type,
loss, metrics, validation metric names, outputs (classes, label sets with per-label thresholds, values) and the
tuning of multi-label thresholds on validation. Every verb asks here.

Public API:
- TASKS, SINGLE_LABEL, MULTI_LABEL, REGRESSION; METRICS[task] (the metric names metric_for_best_model accepts),
  DEFAULT_METRIC[task], SCALE_METRIC[task] (what the adapter scale is chosen on: a fraction, higher is better)
- problem_type(task); check_task(task); check_metric(task, metric, flag)
- prefixed(task, m): the task's metrics as {"eval_" + name: value} (best-model metrics, logs, callbacks)
- loss(task, logits, labels) (torch, what training minimises: cross-entropy, BCE with logits, MSE)
- task_metrics(task, logits, labels, label_names, thresholds=None) -> dict with every METRICS[task] key, "n" ...
- tune_thresholds(logits, labels) -> one threshold per label (multi-label)
- predictions(task, logits, thresholds=None): class indices, a 0/1 label matrix, or values
- probabilities(task, logits): softmax, sigmoid, or None for regression
- metrics_text(task, m, title); headline(task, m): the report, and the one line a summary prints
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from budgetune.errors import ConfigError

if TYPE_CHECKING:
    import torch

# torch and sklearn load where they are used: config checks task and metric names through this module, and a
# config must not cost torch's import time.

SINGLE_LABEL, MULTI_LABEL, REGRESSION = "single_label", "multi_label", "regression"
TASKS = (SINGLE_LABEL, MULTI_LABEL, REGRESSION)
METRICS: dict[str, tuple[str, ...]] = {
    SINGLE_LABEL: ("accuracy", "macro_f1", "loss"),
    MULTI_LABEL: ("micro_f1", "macro_f1", "subset_accuracy", "loss"),
    REGRESSION: ("mse", "mae", "pearson", "spearman", "loss"),
}
DEFAULT_METRIC = {SINGLE_LABEL: "accuracy", MULTI_LABEL: "micro_f1", REGRESSION: "mse"}
SCALE_METRIC = {SINGLE_LABEL: "accuracy", MULTI_LABEL: "micro_f1", REGRESSION: "pearson"}
DEFAULT_THRESHOLD = 0.5
THRESHOLD_GRID = tuple(round(0.05 * k, 2) for k in range(1, 20))  # 0.05 .. 0.95
_PROBLEM_TYPES = {SINGLE_LABEL: "single_label_classification", MULTI_LABEL: "multi_label_classification",
                  REGRESSION: "regression"}


def check_task(task: str, flag: str = "--task") -> str:
    if task not in TASKS:
        raise ConfigError(f"{flag} must be one of {', '.join(TASKS)}, got {task!r}")
    return task


def target_columns(task: str, label_column: str | None) -> list[str] | None:
    """Regression's target columns from --label_column_name ("a,b": two targets); None when not named (or another
    task)."""
    if task != REGRESSION or not label_column:
        return None
    return [c.strip() for c in label_column.split(",") if c.strip()]


def problem_type(task: str) -> str:
    """transformers' `problem_type` for the task (the loss its sequence-classification models compute)."""
    return _PROBLEM_TYPES[check_task(task)]


def check_metric(task: str, metric: str, flag: str = "--metric_for_best_model") -> None:
    """Refuse a metric the task does not have, naming the task it belongs to."""
    if metric in METRICS[check_task(task)]:
        return
    owners = [t for t, names in METRICS.items() if metric in names]
    whose = f" is a {' and '.join(owners)} metric;" if owners else " is unknown;"
    raise ConfigError(f"{flag} {metric!r}{whose} with --task {task} choose one of {', '.join(METRICS[task])}")


def prefixed(task: str, m: dict, prefix: str = "eval_") -> dict:
    """The task's metrics of `m` as {prefix + name: value}, in METRICS order (single-label: eval_accuracy,
    eval_macro_f1, eval_loss)."""
    return {f"{prefix}{k}": m[k] for k in METRICS[task]}


def loss(task: str, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """The training loss (mean over the batch), as transformers computes it for the task's problem_type."""
    import torch

    if task == MULTI_LABEL:
        return torch.nn.functional.binary_cross_entropy_with_logits(logits, labels.to(logits.dtype))
    if task == REGRESSION:
        return torch.nn.functional.mse_loss(logits, labels.to(logits.dtype).reshape(logits.shape))
    return torch.nn.functional.cross_entropy(logits, labels)


def sigmoid(logits: np.ndarray) -> np.ndarray:
    """Per-label probabilities, computed in float64."""
    z = np.asarray(logits, dtype=np.float64)
    return 1.0 / (1.0 + np.exp(-z))


def probabilities(task: str, logits: np.ndarray) -> np.ndarray | None:
    """Softmax over classes (single-label), one sigmoid per label (multi-label), None for regression."""
    if task == SINGLE_LABEL:
        from budgetune.metrics import softmax

        return softmax(logits)
    return sigmoid(logits) if task == MULTI_LABEL else None


def thresholds_of(thresholds, n_labels: int) -> np.ndarray:
    """The per-label thresholds as an array (None: 0.5 for every label)."""
    if thresholds is None:
        return np.full(n_labels, DEFAULT_THRESHOLD)
    out = np.asarray(thresholds, dtype=np.float64)
    if out.shape != (n_labels,):
        raise ValueError(f"{len(out)} thresholds for {n_labels} labels")
    return out


def predictions(task: str, logits: np.ndarray, thresholds=None) -> np.ndarray:
    """Class indices (single-label), a 0/1 matrix [rows, labels] (multi-label: probability >= the label's
    threshold), or the values [rows, targets] (regression)."""
    logits = np.asarray(logits)
    if task == MULTI_LABEL:
        return (sigmoid(logits) >= thresholds_of(thresholds, logits.shape[-1])).astype(np.int64)
    if task == REGRESSION:
        return logits.astype(np.float64)
    return logits.argmax(-1)


def targets(labels, width: int) -> np.ndarray:
    """Regression targets (or multi-hot labels) as a [rows, width] float64 array."""
    return np.asarray(labels, dtype=np.float64).reshape(-1, width)


def tune_thresholds(logits: np.ndarray, labels) -> list[float]:
    """One threshold per label: of THRESHOLD_GRID, the one with the best F1 of that label on these rows (ties: the
    one nearest 0.5); 0.5 for a label with no positive row here (its F1 cannot choose)."""
    probs = sigmoid(logits)
    y = targets(labels, probs.shape[-1]) > 0.5
    grid = np.asarray(THRESHOLD_GRID)
    pred = probs[None, :, :] >= grid[:, None, None]  # [grid, rows, labels]
    tp = (pred & y[None]).sum(1)
    fp = (pred & ~y[None]).sum(1)
    fn = (~pred & y[None]).sum(1)
    f1 = np.where(tp > 0, 2 * tp / np.maximum(2 * tp + fp + fn, 1), 0.0)  # [grid, labels]
    out = []
    for j in range(probs.shape[-1]):
        if not y[:, j].any():
            out.append(DEFAULT_THRESHOLD)
            continue
        best = f1[:, j].max()
        ties = grid[f1[:, j] >= best - 1e-12]  # equal F1 only (isclose took a slightly worse one near 0.5)
        out.append(float(ties[np.argmin(np.abs(ties - DEFAULT_THRESHOLD))]))
    return out


def eval_loss(task: str, logits: np.ndarray, labels) -> float:
    """The mean training loss of logits against labels (cross-entropy, BCE with logits, or MSE)."""
    import torch

    from budgetune.metrics import cross_entropy

    if task == SINGLE_LABEL:
        return cross_entropy(logits, labels)
    t = torch.from_numpy(np.asarray(logits, dtype=np.float32))
    return float(loss(task, t, torch.from_numpy(targets(labels, t.shape[-1]).astype(np.float32))))


def task_metrics(task: str, logits: np.ndarray, labels, label_names: list[str], thresholds=None) -> dict:
    """Every metric of METRICS[task] (loss included), `n`, `label_names` and the per-label (per-target) figures."""
    if task == MULTI_LABEL:
        m = multi_label_metrics(labels, predictions(task, logits, thresholds), label_names)
        m["thresholds"] = thresholds_of(thresholds, len(label_names)).tolist()
    elif task == REGRESSION:
        m = regression_metrics(labels, predictions(task, logits), label_names)
    else:
        from budgetune.metrics import classification_metrics

        m = classification_metrics(labels, predictions(task, logits), label_names)
    m["loss"] = eval_loss(task, logits, labels) if len(logits) else 0.0
    return m


def multi_label_metrics(labels, preds: np.ndarray, label_names: list[str]) -> dict:
    """Micro- and macro-F1, subset accuracy (every label of a row right) and per-label scores (sklearn.metrics)."""
    from sklearn.metrics import accuracy_score, f1_score, precision_recall_fscore_support

    from budgetune.metrics import macro_f1

    y = targets(labels, len(label_names)).astype(np.int64)
    preds = np.asarray(preds, dtype=np.int64).reshape(y.shape)
    p, r, f, s = precision_recall_fscore_support(y, preds, average=None, zero_division=0)
    per_label = {name: {"precision": float(p[i]), "recall": float(r[i]), "f1": float(f[i]), "support": int(s[i])}
                 for i, name in enumerate(label_names)}
    n = len(y)
    return {"micro_f1": float(f1_score(y, preds, average="micro", zero_division=0)) if n else 0.0,
            "macro_f1": macro_f1(y, preds),
            "subset_accuracy": float(accuracy_score(y, preds)) if n else 0.0,
            "n": n, "label_names": list(label_names), "per_label": per_label}


def correlation(kind: str, a: np.ndarray, b: np.ndarray) -> float:
    """Pearson or Spearman correlation; 0 where it is undefined (fewer than two rows, or a constant column)."""
    from scipy.stats import pearsonr, spearmanr

    if len(a) < 2 or np.ptp(a) == 0 or np.ptp(b) == 0:
        return 0.0
    value = (pearsonr if kind == "pearson" else spearmanr)(a, b)[0]
    return float(value) if np.isfinite(value) else 0.0


def regression_metrics(labels, values: np.ndarray, target_names: list[str]) -> dict:
    """MSE, MAE (sklearn.metrics), Pearson and Spearman (scipy.stats), each the mean over targets, and per target."""
    from sklearn.metrics import mean_absolute_error, mean_squared_error

    y = targets(labels, len(target_names))
    values = np.asarray(values, dtype=np.float64).reshape(y.shape)
    per_target = {}
    for j, name in enumerate(target_names):
        a, b = y[:, j], values[:, j]
        per_target[name] = {"mse": float(mean_squared_error(a, b)) if len(a) else 0.0,
                            "mae": float(mean_absolute_error(a, b)) if len(a) else 0.0,
                            "pearson": correlation("pearson", a, b), "spearman": correlation("spearman", a, b)}
    mean = {k: float(np.mean([t[k] for t in per_target.values()])) for k in ("mse", "mae", "pearson", "spearman")}
    return {**mean, "n": int(len(y)), "label_names": list(target_names), "per_target": per_target}


def metrics_text(task: str, m: dict, title: str = "evaluation") -> str:
    """The metrics as a plain-text report (single-label: metrics.metrics_text's, unchanged)."""
    if task == SINGLE_LABEL:
        from budgetune.metrics import metrics_text

        return metrics_text(m, title)
    lines = [f"{title}: {m['n']} examples"]
    lines += [f"{k:<16}{m[k]:.4f}" for k in METRICS[task]]
    width = max(10, *(len(n) for n in m["label_names"]))
    if task == MULTI_LABEL:
        lines += ["", f"{'label':<{width}}  threshold  precision  recall  f1      support"]
        for name, t in zip(m["label_names"], m["thresholds"]):
            c = m["per_label"][name]
            lines.append(f"{name:<{width}}  {t:<9.2f}  {c['precision']:.4f}     {c['recall']:.4f}  {c['f1']:.4f}  "
                         f"{c['support']}")
    elif len(m["label_names"]) > 1:
        lines += ["", f"{'target':<{width}}  mse         mae         pearson  spearman"]
        for name in m["label_names"]:
            c = m["per_target"][name]
            lines.append(f"{name:<{width}}  {c['mse']:<10.4g}  {c['mae']:<10.4g}  {c['pearson']:.4f}   "
                         f"{c['spearman']:.4f}")
    return "\n".join(lines) + "\n"


def headline(task: str, m: dict) -> str:
    """The task's main figures in a few words: 'accuracy 91.00% (macro-F1 90.50%)' and the like."""
    if task == MULTI_LABEL:
        return (f"micro-F1 {m['micro_f1']:.2%} (macro-F1 {m['macro_f1']:.2%}, subset accuracy "
                f"{m['subset_accuracy']:.2%})")
    if task == REGRESSION:
        return f"MSE {m['mse']:.4g} (MAE {m['mae']:.4g}, Pearson {m['pearson']:.4f}, Spearman {m['spearman']:.4f})"
    return f"accuracy {m['accuracy']:.2%} (macro-F1 {m['macro_f1']:.2%})"
