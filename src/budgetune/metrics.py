"""Classification metrics (from sklearn.metrics), their plain-text report, which of two values of a metric is
better, and the softmax every probability comes from."""

from __future__ import annotations

import numpy as np
import torch
from sklearn.metrics import accuracy_score, confusion_matrix, f1_score, precision_recall_fscore_support


def cross_entropy(logits: np.ndarray, labels) -> float:
    """Mean cross-entropy of logits against integer labels."""
    t = torch.from_numpy(np.asarray(logits, dtype=np.float32))
    return float(torch.nn.functional.cross_entropy(t, torch.as_tensor(np.asarray(labels), dtype=torch.long)))


def softmax(logits: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    """Probabilities over the last axis of `logits` / temperature, computed in float64."""
    z = np.asarray(logits, dtype=np.float64) / temperature
    e = np.exp(z - z.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


LOWER_IS_BETTER = ("loss", "mse", "mae")  # errors; every other metric (accuracy, F1, correlations) is a score


def lower_is_better(metric: str) -> bool:
    """Whether a smaller value of the validation metric (metric_for_best_model: loss, mse, mae) is better."""
    return metric in LOWER_IS_BETTER


def improves(value: float, best: float | None, metric: str) -> bool:
    """Whether `value` beats `best` (None: nothing yet) on `metric`: lower for loss, higher otherwise; a tie does not."""
    return best is None or (value < best if lower_is_better(metric) else value > best)


def classification_metrics(labels, preds, label_names: list[str]) -> dict:
    """Accuracy, macro-F1, per-class precision/recall/F1/support and the confusion matrix (rows: true)."""
    labels, preds = np.asarray(labels), np.asarray(preds)
    ids = list(range(len(label_names)))
    p, r, f, s = precision_recall_fscore_support(labels, preds, labels=ids, zero_division=0)
    per_class = {name: {"precision": float(p[i]), "recall": float(r[i]), "f1": float(f[i]), "support": int(s[i])}
                 for i, name in enumerate(label_names)}
    return {"accuracy": float(accuracy_score(labels, preds)) if len(labels) else 0.0,
            "macro_f1": macro_f1(labels, preds, ids),
            "n": int(len(labels)), "label_names": list(label_names), "per_class": per_class,
            "confusion_matrix": confusion_matrix(labels, preds, labels=ids).tolist()}


def macro_f1(labels, preds, ids: list[int] | None = None) -> float:
    """The mean F1 over the classes (labels) that occur in the truth or the predictions, as scikit-learn's default
    does: one that is in neither has no F1 and is left out (scoring it 0 took a perfect model on a file without one
    class to 67 %); one that is in the truth but never predicted counts 0."""
    if not len(labels):
        return 0.0
    return float(f1_score(labels, preds, labels=ids, average="macro", zero_division=np.nan))


def metrics_text(m: dict, title: str = "evaluation") -> str:
    """The metrics as a plain-text report."""
    names = m["label_names"]
    width = max(10, *(len(n) for n in names))
    lines = [f"{title}: {m['n']} examples", f"accuracy  {m['accuracy']:.4f}", f"macro-F1  {m['macro_f1']:.4f}", "",
             f"{'class':<{width}}  precision  recall  f1      support"]
    for n in names:
        c = m["per_class"][n]
        lines.append(f"{n:<{width}}  {c['precision']:.4f}     {c['recall']:.4f}  {c['f1']:.4f}  {c['support']}")
    lines += ["", "confusion matrix (rows: true, columns: predicted)",
              " " * (width + 2) + " ".join(f"{n[:8]:>8}" for n in names)]
    for n, row in zip(names, m["confusion_matrix"]):
        lines.append(f"{n:<{width}}  " + " ".join(f"{v:>8}" for v in row))
    return "\n".join(lines) + "\n"


def paired_comparison(labels, preds_a, preds_b, *, n_boot: int = 10_000, seed: int = 0, level: float = 0.95) -> dict:
    """Model A against model B on the same rows: accuracy difference (points), a paired bootstrap confidence interval
    for it, and McNemar's exact test on the rows where exactly one model is right.

    The bootstrap resamples rows (each row keeps both models' answers), so the interval reflects that A and B are
    scored on the same texts. A row's difference is +1 (only A right), -1 (only B right) or 0; a resample's mean
    depends only on how many of each it draws, so the resamples are drawn as multinomial counts (exact, cheap).
    """
    from scipy.stats import binomtest

    labels, a, b = np.asarray(labels), np.asarray(preds_a), np.asarray(preds_b)
    if not len(labels) == len(a) == len(b) or len(labels) == 0:
        raise ValueError(f"paired_comparison needs the same non-empty rows: {len(labels)}, {len(a)}, {len(b)}")
    right_a, right_b = a == labels, b == labels
    only_a, only_b = int(np.sum(right_a & ~right_b)), int(np.sum(~right_a & right_b))
    n = len(labels)
    draws = np.random.default_rng(seed).multinomial(n, [only_a / n, only_b / n, 1 - (only_a + only_b) / n], n_boot)
    boot = 100.0 * (draws[:, 0] - draws[:, 1]) / n
    low, high = np.quantile(boot, [(1 - level) / 2, (1 + level) / 2])
    p = 1.0 if only_a + only_b == 0 else float(binomtest(only_a, only_a + only_b, 0.5).pvalue)
    return {"rows": n, "accuracy_a": float(right_a.mean()), "accuracy_b": float(right_b.mean()),
            "difference_points": 100.0 * (only_a - only_b) / n, "ci_low_points": float(low),
            "ci_high_points": float(high), "level": level, "n_boot": n_boot, "seed": seed,
            "only_a_right": only_a, "only_b_right": only_b, "mcnemar_p": p}


def comparison_text(c: dict, name_a: str, name_b: str, data_file: str) -> str:
    """The comparison in a few lines a user can quote."""
    return (f"{data_file}: {c['rows']} rows, A = {name_a}, B = {name_b}\n"
            f"  accuracy A {c['accuracy_a']:.2%}, B {c['accuracy_b']:.2%}; A - B = {c['difference_points']:+.2f} "
            f"points, {c['level']:.0%} paired bootstrap interval [{c['ci_low_points']:+.2f}, "
            f"{c['ci_high_points']:+.2f}] ({c['n_boot']:,} resamples of the rows, seed {c['seed']})\n"
            f"  rows only A gets right: {c['only_a_right']}, only B: {c['only_b_right']}; McNemar exact test "
            f"p {shown_p(c['mcnemar_p'])}\n")


def shown_p(p: float) -> str:
    """A p-value as text; one below the smallest double (it comes back as 0.0) is not shown as exactly 0."""
    return "< 1e-300" if p == 0 else f"= {p:.4g}"
