"""Render PNG plots of a run folder's metrics.jsonl and evaluation.json."""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Iterable
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure

from budgetune import fileio
from budgetune.training.runlog import read_metrics

_LAYER_RE = re.compile(r"layer\.(\d+)\.")


def _series(events: Iterable[dict], kind: str, key: str) -> tuple[list[float], list[float]]:
    """(steps, values) for events of `kind` that carry a numeric `step` and `key`; others are skipped."""
    xs, ys = [], []
    for ev in events:
        step, val = ev.get("step"), ev.get(key)
        if ev.get("event") == kind and _is_num(step) and _is_num(val):
            xs.append(step)
            ys.append(val)
    return xs, ys


def _is_num(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _module_label(name: str) -> tuple[tuple[float, str], str, str]:
    """(sort key, short label, unambiguous label); modules outside `layer.N.` sort after all layers."""
    m = _LAYER_RE.search(name)
    if not m:
        return (math.inf, name), name.rsplit(".", 1)[-1], name
    layer, rest = int(m.group(1)), name[m.end():]
    return (layer, rest), f"L{layer} {rest.rsplit('.', 1)[-1]}", f"L{layer} {rest}"


def rank_matrix(events: Iterable[dict]) -> tuple[list[str], list[int], np.ndarray]:
    """(labels, steps, matrix[module, step]) from rank events; NaN where a module is absent at a step."""
    snapshots: dict[int, dict[str, float]] = {}
    for ev in events:
        if ev.get("event") == "ranks" and _is_num(ev.get("step")) and isinstance(ev.get("ranks"), dict):
            snapshots.setdefault(ev["step"], {}).update(ev["ranks"])  # repeated step: later values win
    steps = sorted(snapshots)
    names = sorted({n for snap in snapshots.values() for n in snap}, key=lambda n: _module_label(n)[0])
    short = [_module_label(n)[1] for n in names]
    # "L0 dense" is ambiguous in BERT (attention.output.dense vs output.dense): keep the path after layer.N.
    labels = [_module_label(n)[2] if short.count(lab) > 1 else lab for lab, n in zip(short, names)]
    matrix = np.full((len(names), len(steps)), np.nan)
    for j, step in enumerate(steps):
        for i, name in enumerate(names):
            val = snapshots[step].get(name)
            if _is_num(val):
                matrix[i, j] = val
    return labels, steps, matrix


def _save(fig: Figure, path: Path) -> Path:
    """Write fig to path via a temp file in the same folder, so readers never see a half-written PNG."""
    with fileio.atomic_path(path) as tmp, open(tmp, "wb") as fh:
        fig.savefig(fh, format="png", dpi=110, bbox_inches="tight")
    return path


def _line_plot(series: list[tuple[str, list, list]], title: str, ylabel: str) -> Figure:
    fig = Figure(figsize=(7, 4.2))
    ax = fig.add_subplot()
    for label, xs, ys in series:
        if xs:
            # Eval points are sparse, so mark them; dense train curves stay plain lines.
            ax.plot(xs, ys, label=label, marker="o" if len(xs) < 50 else None, markersize=3)
    ax.set(title=title, xlabel="step", ylabel=ylabel)
    ax.grid(alpha=0.3)
    if len(series) > 1:
        ax.legend()
    return fig


def _tick_positions(n: int, max_ticks: int = 12) -> list[int]:
    return list(range(0, n, max(1, math.ceil(n / max_ticks))))


def _ranks_figure(labels: list[str], steps: list[int], matrix: np.ndarray) -> Figure:
    fig = Figure(figsize=(min(16.0, max(6.0, 0.35 * len(steps) + 3)), min(40.0, 0.28 * len(labels) + 3.5)))
    heat, total = fig.subplots(2, 1, sharex=True, gridspec_kw={"height_ratios": [4, 1]})
    im = heat.imshow(np.ma.masked_invalid(matrix), aspect="auto", interpolation="nearest", cmap="viridis")
    fig.colorbar(im, ax=[heat, total], label="rank")
    heat.set_yticks(range(len(labels)), labels, fontsize=7 if len(labels) > 30 else 9)
    heat.set_title("AdaLoRA rank per module")
    totals = np.nansum(matrix, axis=0)
    total.plot(range(len(steps)), totals, marker="o", markersize=3)
    total.set_ylabel("total rank")
    ticks = _tick_positions(len(steps))
    # Columns are rank events, not uniform steps, so label the column indices with the real step numbers.
    total.set_xticks(ticks, [str(steps[t]) for t in ticks])
    total.set_xlabel("step")
    total.grid(alpha=0.3)
    return fig


def _confusion_figure(cm: np.ndarray, names: list[str]) -> Figure:
    n = cm.shape[0]
    side = max(4.5, 0.6 * n + 2.5)
    fig = Figure(figsize=(side + 1, side))
    ax = fig.add_subplot()
    im = ax.imshow(cm, cmap="Blues")
    fig.colorbar(im, ax=ax, label="count")
    thresh = cm.max() / 2 if cm.size else 0
    for i in range(n):
        for j in range(cm.shape[1]):
            ax.text(j, i, f"{cm[i, j]:g}", ha="center", va="center", fontsize=8 if n > 10 else 10,
                    color="white" if cm[i, j] > thresh else "black")
    ax.set_xticks(range(cm.shape[1]), names[: cm.shape[1]], rotation=45, ha="right")
    ax.set_yticks(range(n), names[:n])
    ax.set(xlabel="predicted", ylabel="true", title="Confusion matrix")
    return fig


ROUND_METRICS = (("accuracy", "eval_accuracy"), ("micro-F1", "eval_micro_f1"), ("MSE", "eval_mse"))


def _rounds_figure(rounds: list[dict]) -> Figure:
    """Self-training: the task's main validation metric per round (accuracy, micro-F1 or MSE), and the pseudo-labels
    kept per class or label (stacked; regression: all)."""
    fig = Figure(figsize=(7, 6))
    acc, kept = fig.subplots(2, 1, sharex=True)
    xs = [ev["round"] for ev in rounds]
    name, key = next(((n, k) for n, k in ROUND_METRICS if any(_is_num(ev.get(k)) for ev in rounds)),
                     ROUND_METRICS[0])
    ys = [ev.get(key) if _is_num(ev.get(key)) else np.nan for ev in rounds]
    acc.plot(xs, ys, marker="o")
    for ev, y in zip(rounds, ys):
        if ev.get("best"):
            acc.annotate("best", (ev["round"], y), textcoords="offset points", xytext=(0, 6), ha="center")
    acc.set(title="Self-training rounds", ylabel=f"validation {name}")
    acc.grid(alpha=0.3)
    per_class = np.array([ev.get("pseudo_per_class") or [] for ev in rounds], dtype=float)
    if per_class.ndim == 2 and per_class.size:
        bottom = np.zeros(len(xs))
        for c in range(per_class.shape[1]):
            kept.bar(xs, per_class[:, c], bottom=bottom, label=f"class {c}")
            bottom += per_class[:, c]
        kept.legend(fontsize=8)
    else:
        kept.bar(xs, [ev.get("pseudo_labels") or 0 for ev in rounds])
    kept.set(xlabel="round", ylabel="pseudo-labels kept")
    kept.set_xticks(xs)
    return fig


# Per task (budgetune.tasks): (file, title, y label, ((legend, eval event key), ...)) of each validation figure.
VALIDATION_FIGURES = {
    "single_label": [("accuracy.png", "Validation metrics", "score",
                      (("accuracy", "eval_accuracy"), ("macro-F1", "eval_macro_f1")))],
    "multi_label": [("f1.png", "Validation metrics (multi-label)", "score",
                     (("micro-F1", "eval_micro_f1"), ("macro-F1", "eval_macro_f1"),
                      ("subset accuracy", "eval_subset_accuracy")))],
    "regression": [("error.png", "Validation error (regression)", "error", (("MSE", "eval_mse"), ("MAE", "eval_mae"))),
                   ("correlation.png", "Validation correlation (regression)", "correlation",
                    (("Pearson r", "eval_pearson"), ("Spearman rho", "eval_spearman")))],
}


def run_task(events: Iterable[dict]) -> str:
    """The task whose metrics a run's eval events carry (regression: eval_mse; multi-label: eval_micro_f1)."""
    keys = {k for ev in events if ev.get("event") == "eval" for k in ev}
    return "regression" if "eval_mse" in keys else "multi_label" if "eval_micro_f1" in keys else "single_label"


def validation_figures(events: list[dict]) -> list[tuple[str, Figure]]:
    """The validation metrics of the run's task over steps, as VALIDATION_FIGURES lays them out (those with data)."""
    figures = []
    for name, title, ylabel, curves in VALIDATION_FIGURES[run_task(events)]:
        series = [(legend, *_series(events, "eval", key)) for legend, key in curves]
        if any(xs for _, xs, _ in series):
            figures.append((name, _line_plot(series, title, ylabel)))
    return figures


def plot_run(run_dir: str | os.PathLike, out_dir: str | os.PathLike | None = None) -> list[Path]:
    """Write PNGs for a run and return their paths; a plot is only written when it has data to show."""
    run_dir = Path(run_dir)
    metrics_path = run_dir / "metrics.jsonl"
    events = read_metrics(metrics_path)
    if not any(ev.get("event") in ("train", "eval") for ev in events):
        raise ValueError(f"{metrics_path}: no training or evaluation events to plot")
    train, eval_loss = _series(events, "train", "loss"), _series(events, "eval", "eval_loss")
    out = Path(out_dir) if out_dir is not None else run_dir / "plots"
    out.mkdir(parents=True, exist_ok=True)

    figures: list[tuple[str, Figure]] = []
    if train[0] or eval_loss[0]:
        figures.append(("loss.png", _line_plot(
            [("train loss", *train), ("validation loss", *eval_loss)], "Loss", "loss")))
    figures += validation_figures(events)
    lr = _series(events, "train", "learning_rate")
    if lr[0]:
        figures.append(("learning_rate.png", _line_plot([("learning rate", *lr)], "Learning rate", "lr")))
    labels, steps, matrix = rank_matrix(events)
    if labels and steps:
        figures.append(("ranks.png", _ranks_figure(labels, steps, matrix)))
    rounds = [ev for ev in events if ev.get("event") == "round" and _is_num(ev.get("round"))]
    if rounds:
        figures.append(("rounds.png", _rounds_figure(rounds)))
    eval_path = run_dir / "evaluation.json"
    if eval_path.is_file():
        try:
            report = json.loads(eval_path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as exc:
            raise ValueError(f"{eval_path}: invalid JSON ({exc.msg})") from exc
        cm = np.asarray(report.get("confusion_matrix") or [], dtype=float)
        if cm.ndim == 2 and cm.size:
            names = list(report.get("label_names") or [])
            names += [str(i) for i in range(len(names), max(cm.shape))]  # pad if names are missing/short
            figures.append(("confusion_matrix.png", _confusion_figure(cm, names)))
    return [_save(fig, out / name) for name, fig in figures]
