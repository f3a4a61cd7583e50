"""Self-training's pseudo-labels for each task: which unlabelled texts are kept, with which label, and the CSV of them.

- single-label: the top class; confidence = its probability; kept where it reaches the threshold, no class above
  cap_factor x its labelled share of the kept rows (the most confident rows of a class kept first).
- multi-label: the label set at the bundle's tuned per-label thresholds t_j (tasks.predictions); confidence = the
  smallest over labels of the probability's distance from the threshold as a share of the room on its side:
  (p_j - t_j) / (1 - t_j) where p_j >= t_j, (t_j - p_j) / t_j below (0: on the threshold, 1: at 1 or 0); kept
  where it reaches the threshold; no label positive in more than cap_factor x its labelled share of positives among
  the kept rows, and empty sets likewise capped at cap_factor x the labelled share of empty sets (so an empty set is
  kept only if the labelled data has empty sets).
- regression: the predicted value(s); there is no probability, so every text is kept (threshold and cap unused).
"""

from __future__ import annotations

import csv
import io
import json
from dataclasses import dataclass

import numpy as np

from budgetune import tasks


@dataclass
class Pseudo:
    """One round's pseudo-labelled rows: row indices, labels (class ids, 0/1 rows, or values), how many texts were
    confident, and the CSV written to the round's folder."""

    rows: np.ndarray
    labels: np.ndarray
    confident: int
    csv: str


def labelled_shares(task: str, labels: list, n_labels: int) -> np.ndarray | None:
    """Each class's share of the labelled rows (single-label); each label's share of positives, then the share of
    empty sets, as the last entry (multi-label); None (regression)."""
    if task == tasks.SINGLE_LABEL:
        return np.bincount(np.asarray(labels, dtype=np.int64), minlength=n_labels) / max(1, len(labels))
    if task == tasks.MULTI_LABEL:
        y = tasks.targets(labels, n_labels) > 0.5
        return np.append(y.mean(0), (~y.any(1)).mean()) if len(y) else np.zeros(n_labels + 1)
    return None


def capped(groups: np.ndarray, conf: np.ndarray, candidates: np.ndarray, shares: np.ndarray,
           cap_factor: float) -> np.ndarray:
    """The candidate rows kept under the cap: group g (a boolean column of `groups`) holds at most
    floor(cap_factor x shares[g] x kept) of the kept rows; a group over its cap loses its least confident rows.
    The cap depends on the total kept, which the cap lowers: shrink to the fixed point."""
    keep = candidates[np.argsort(-conf[candidates], kind="stable")]
    while True:
        cap = np.floor(cap_factor * shares * len(keep) + 1e-9).astype(int)
        drop = np.zeros(len(keep), dtype=bool)
        for g in range(groups.shape[1]):
            members = np.flatnonzero(groups[keep, g])
            drop[members[cap[g]:]] = True
        if not drop.any():
            return np.sort(keep).astype(np.int64)
        keep = keep[~drop]


def select_confident(probs: np.ndarray, threshold: float, shares: np.ndarray,
                     cap_factor: float) -> tuple[np.ndarray, np.ndarray]:
    """Single-label: (row indices, labels) of the pseudo-labels kept: top probability >= threshold, the most
    confident first, and no class holding more than cap_factor x its labelled share of the kept rows."""
    conf, pred = probs.max(-1), probs.argmax(-1)
    onehot = pred[:, None] == np.arange(probs.shape[1])[None, :]
    rows = capped(onehot, conf, np.flatnonzero(conf >= threshold), shares, cap_factor)
    return rows, pred[rows]


def multi_label_confidence(probs: np.ndarray, thresholds) -> np.ndarray:
    """Per row: min over labels of (p - t) / (1 - t) where p >= t, (t - p) / t below; t the label's threshold."""
    t = tasks.thresholds_of(thresholds, probs.shape[-1])
    return np.where(probs >= t, (probs - t) / (1 - t), (t - probs) / t).min(-1)


def select_label_sets(logits: np.ndarray, thresholds, threshold: float, shares: np.ndarray,
                      cap_factor: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Multi-label: (row indices, 0/1 label rows, every row's confidence) of the pseudo-labels kept (module
    docstring); `shares` from labelled_shares (per label, then empty sets)."""
    sets = tasks.predictions(tasks.MULTI_LABEL, logits, thresholds)
    conf = multi_label_confidence(tasks.sigmoid(logits), thresholds)
    groups = np.concatenate([sets > 0, ~(sets > 0).any(1, keepdims=True)], axis=1)
    rows = capped(groups, conf, np.flatnonzero(conf >= threshold), shares, cap_factor)
    return rows, sets[rows], conf


def pseudo_label(task: str, logits: np.ndarray, thresholds, texts: list[str], pairs: list[str] | None,
                 names: list[str], shares, threshold: float, cap_factor: float) -> Pseudo:
    """The round's pseudo-labels from the labelling model's logits on the unlabelled texts."""
    if task == tasks.REGRESSION:
        values = tasks.predictions(task, logits)
        rows = np.arange(len(texts), dtype=np.int64)
        return Pseudo(rows, values, len(texts), pseudo_csv(task, texts, pairs, rows, values, None, names))
    if task == tasks.MULTI_LABEL:
        rows, sets, conf = select_label_sets(logits, thresholds, threshold, shares, cap_factor)
        return Pseudo(rows, sets, int((conf >= threshold).sum()),
                      pseudo_csv(task, texts, pairs, rows, sets, conf, names))
    probs = tasks.probabilities(task, logits)
    rows, labels = select_confident(probs, threshold, shares, cap_factor)
    return Pseudo(rows, labels, int((probs.max(-1) >= threshold).sum()),
                  pseudo_csv(task, texts, pairs, rows, labels, probs, names))


def train_labels(task: str, pseudo: Pseudo) -> list:
    """The pseudo-labels as the training table holds labels (class ids, 0/1 lists, a float or a list of floats)."""
    if task == tasks.REGRESSION and pseudo.labels.shape[1] == 1:
        return pseudo.labels[:, 0].tolist()
    return pseudo.labels.tolist()


def per_label_counts(task: str, pseudo: Pseudo | None, n_labels: int) -> list[int] | None:
    """How many pseudo-labels each class (label) got; None for regression."""
    if task == tasks.REGRESSION:
        return None
    if pseudo is None:
        return [0] * n_labels
    if task == tasks.MULTI_LABEL:
        return np.asarray(pseudo.labels, dtype=np.int64).reshape(-1, n_labels).sum(0).tolist()
    return np.bincount(pseudo.labels, minlength=n_labels).tolist()


def pseudo_csv(task: str, texts: list[str], pairs: list[str] | None, rows: np.ndarray, labels: np.ndarray,
               scores: np.ndarray | None, names: list[str]) -> str:
    """The round's pseudo-labelled rows, for inspection: text (text_pair), then single-label: label id, name,
    probability; multi-label: the label names (JSON), confidence; regression: one column per target."""
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    lead = ["text"] + (["text_pair"] if pairs is not None else [])
    if task == tasks.SINGLE_LABEL:
        w.writerow(lead + ["label", "label_name", "probability"])
    else:
        w.writerow(lead + (["labels", "confidence"] if task == tasks.MULTI_LABEL else list(names)))
    for i, y in zip(rows, labels):
        head = [texts[i]] + ([pairs[i]] if pairs is not None else [])
        if task == tasks.SINGLE_LABEL:
            w.writerow(head + [int(y), names[y], f"{scores[i, y]:.6f}"])
        elif task == tasks.MULTI_LABEL:
            w.writerow(head + [json.dumps([n for n, v in zip(names, y) if v]), f"{scores[i]:.6f}"])
        else:
            w.writerow(head + [f"{v:.6f}" for v in y])
    return buf.getvalue()


def same_cell(a: str, b: str) -> bool:
    """Equal cells; numbers equal to 1e-4 (another thread count may change the last digit)."""
    if a == b:
        return True
    try:
        return abs(float(a) - float(b)) <= 1e-4
    except ValueError:
        return False


def same_csv(old_text: str, new_text: str) -> bool:
    """The same rows and labels (cell by cell, numbers to 1e-4)."""
    old = list(csv.reader(io.StringIO(old_text)))
    new = list(csv.reader(io.StringIO(new_text)))
    return len(old) == len(new) and old[:1] == new[:1] and all(
        len(a) == len(b) and all(same_cell(x, y) for x, y in zip(a, b)) for a, b in zip(old[1:], new[1:]))
