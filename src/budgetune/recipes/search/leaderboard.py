"""What a search leaves behind: leaderboard.csv/.md, pareto.png and best.yaml (read from the study, any worker)."""

from __future__ import annotations

import csv
import io
import tempfile
from pathlib import Path

from budgetune import fileio, tasks
from budgetune.config import resolve, save_yaml
from budgetune.metrics import lower_is_better

HEAD = ("trial", "state", "method", "rank", "targets", "head", "learning_rate", "trainable")
TAIL = ("steps", "wall_s", "note")
COLUMNS = (*HEAD, "val_accuracy", "val_macro_f1", *TAIL)  # a single-label search's columns


def metric_names(task: str, metric: str) -> list[str]:
    """The validation metrics a trial records and the leaderboard shows: the task's (tasks.METRICS) but the loss,
    and the selection metric whatever it is."""
    names = [k for k in tasks.METRICS[task] if k != "loss"]
    return names if metric in names else [*names, metric]


def study_metric(study) -> tuple[str, str]:
    """(task, metric) the study's trials were trained and judged on (a study from before tasks: single-label)."""
    for t in study.get_trials(deepcopy=False):
        if "metric" in t.user_attrs:
            return t.user_attrs.get("task", tasks.SINGLE_LABEL), t.user_attrs["metric"]
    return tasks.SINGLE_LABEL, "accuracy"


def columns(study) -> tuple[str, ...]:
    task, metric = study_metric(study)
    return (*HEAD, *(f"val_{k}" for k in metric_names(task, metric)), *TAIL)


def trial_rows(study) -> list[dict]:
    """One row per trial: finished ones best first (complete, then pruned, then failed), running last."""
    import optuna

    order = {"COMPLETE": 0, "PRUNED": 1, "FAIL": 2, "RUNNING": 3, "WAITING": 4}
    task, metric = study_metric(study)
    shown = [f"val_{k}" for k in metric_names(task, metric)]
    sign = -1 if study.direction == optuna.study.StudyDirection.MAXIMIZE else 1
    rows = []
    for t in study.get_trials(deepcopy=False):
        a = t.user_attrs
        note = a.get("prune_reason") or a.get("error") or ""
        if t.state.name == "FAIL" and not note:  # failed from outside: its worker died (kill -9, lost machine)
            note = f"worker {a.get('worker', '?')} stopped mid-trial"
        if t.state.name == "WAITING":  # an interrupted or retried trial's point, queued again
            note = "queued: runs when the search continues"
        rows.append({"trial": t.number, "state": t.state.name, "method": a.get("method", ""),
                     "rank": a.get("rank", ""), "targets": a.get("targets", ""), "head": a.get("head", ""),
                     "learning_rate": a.get("learning_rate", ""), "trainable": a.get("trainable", ""),
                     **{k: a.get(k, "") for k in shown},
                     "steps": a.get("steps", ""), "wall_s": a.get("wall_s", ""), "note": note,
                     "value": t.value, "score": a.get(f"val_{metric}")})
    rows.sort(key=lambda r: (order.get(r["state"], 5), shown_value(r) is None, sign * (shown_value(r) or 0),
                             r["trial"]))
    return rows


def shown_value(row: dict) -> float | None:
    """What a row is ranked by: a pruned trial's best comparable validation (the figure it shows), else its value;
    None (ranked after the others of its state) when it has neither."""
    if row["state"] == "PRUNED" and isinstance(row["score"], (int, float)):
        return row["score"]
    return row["value"]


def _cell(column: str, value) -> str:
    if value is None or value == "":
        return ""
    if column == "learning_rate":
        return f"{value:.2e}"
    if column.startswith("val_"):
        return f"{value:.4f}"
    if column == "wall_s":
        return f"{value:.0f}"
    if column == "trainable":
        return f"{value:,}"
    return str(value).replace("|", "/").replace("\n", " ")


def write_leaderboard(study, out: Path, extra: str = "") -> tuple[Path, Path]:
    rows, cols, (task, metric) = trial_rows(study), columns(study), study_metric(study)
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=cols, extrasaction="ignore")
    w.writeheader()
    w.writerows(rows)
    fileio.atomic_write_text(out / "leaderboard.csv", buf.getvalue())
    counts = {s: sum(r["state"] == s for r in rows) for s in ("COMPLETE", "PRUNED", "FAIL", "RUNNING")}
    lines = [f"# Leaderboard of study `{study.study_name}`", "",
             ", ".join(f"{n} {s.lower()}" for s, n in counts.items() if n) + ". Validation metrics are the best "
             "evaluation of each trial (pruned: up to where it was stopped); selection never reads a test file. "
             f"Ranked by validation {metric} ({'lower' if lower_is_better(metric) else 'higher'} is better; "
             f"--task {task}).", ""]
    lines.append("| " + " | ".join(cols) + " |")
    lines.append("|" + "|".join(" ---: " if c.startswith("val_") or c in ("trainable", "steps", "wall_s", "rank",
                                                                         "learning_rate", "trial") else " --- "
                                for c in cols) + "|")
    for r in rows:
        lines.append("| " + " | ".join(_cell(c, r[c]) for c in cols) + " |")
    if extra:
        lines += ["", extra]
    fileio.atomic_write_text(out / "leaderboard.md", "\n".join(lines) + "\n")
    return out / "leaderboard.csv", out / "leaderboard.md"


def pareto_front(points: list[tuple[float, float]]) -> list[int]:
    """Indices of (cost, score) points that no other point beats on both (lower cost, higher score)."""
    front = []
    for i, (c, a) in enumerate(points):
        if not any((c2 <= c and a2 >= a) and (c2 < c or a2 > a) for j, (c2, a2) in enumerate(points) if j != i):
            front.append(i)
    return front


def write_pareto(study, path: Path) -> Path | None:
    """The validation metric the study optimises against trainable parameters and against wall time; the Pareto
    front (fewer parameters or seconds, a better metric: lower for mse, mae and loss) in red."""
    from matplotlib.figure import Figure

    _, metric = study_metric(study)
    rows = [r for r in trial_rows(study) if isinstance(r["score"], float) and r["state"] in ("COMPLETE", "PRUNED")]
    if not rows:
        return None
    sign = -1 if lower_is_better(metric) else 1
    fig = Figure(figsize=(10, 4), dpi=90)
    for ax, key, label in ((fig.add_subplot(1, 2, 1), "trainable", "trainable parameters"),
                           (fig.add_subplot(1, 2, 2), "wall_s", "wall time of the trial (s)")):
        done = [r for r in rows if r["state"] == "COMPLETE" and isinstance(r[key], (int, float))]
        pruned = [r for r in rows if r["state"] == "PRUNED" and isinstance(r[key], (int, float))]
        ax.scatter([r[key] for r in pruned], [r["score"] for r in pruned], marker="x", c="0.6", s=20,
                   label=f"pruned ({metric} when stopped)")
        ax.scatter([r[key] for r in done], [r["score"] for r in done], c="tab:blue", s=24, label="complete")
        front = sorted((done[i] for i in pareto_front([(r[key], sign * r["score"]) for r in done])),
                       key=lambda r: r[key])
        draw_front(ax, front, key)
        axis_labels(ax, key, label, metric)
    fig.axes[0].legend(fontsize=7, loc="best")
    fig.suptitle(f"study {study.study_name!r}: {len(rows)} trials with a validation score")
    fig.tight_layout()
    with fileio.atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    return path


def draw_front(ax, front: list[dict], key: str) -> None:
    if front:
        ax.step([r[key] for r in front], [r["score"] for r in front], where="post", c="tab:red", lw=1)
        ax.scatter([r[key] for r in front], [r["score"] for r in front], c="tab:red", s=30, label="Pareto front")
        for r in front:
            ax.annotate(f"#{r['trial']} {r['method']}", (r[key], r["score"]), fontsize=7, xytext=(3, -9),
                        textcoords="offset points")


def axis_labels(ax, key: str, label: str, metric: str) -> None:
    from matplotlib.ticker import NullFormatter

    if key == "trainable":
        ax.set_xscale("log")
        ax.xaxis.set_minor_formatter(NullFormatter())  # 2x10^5, 3x10^5, ... collide
    ax.set_xlabel(label)
    ax.set_ylabel(f"validation {metric}" + (" (lower is better)" if lower_is_better(metric) else ""))
    ax.grid(alpha=0.3)


def adalora_fractions(cfg, study) -> str:
    """For an AdaLoRA winner: its schedule as fractions of the run, since best.yaml holds step counts of this
    search's trial length, which a run on all rows would stretch."""
    steps = study.user_attrs.get("budgetune_signature", {}).get("trial_steps")
    m = cfg.method
    if m.method != "adalora" or not steps:
        return ""
    return (f" --tinit {m.tinit / steps:.3g} --tfinal {m.tfinal / steps:.3g} (AdaLoRA's schedule as fractions of "
            f"the run: best.yaml holds steps of a {steps}-step trial)")


def write_best_yaml(study, out: Path) -> Path | None:
    """The best complete trial's resolved config, retargeted to OUT/best; its first line is the command."""
    import optuna

    done = [t for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))]
    if not done or "config_yaml" not in done[0].user_attrs:
        return None
    best = study.best_trial
    path = out / "best.yaml"
    with tempfile.TemporaryDirectory(dir=out, prefix=".best-") as scratch:  # one per call: workers share OUT
        source = Path(scratch) / "trial.yaml"
        source.write_text(best.user_attrs["config_yaml"], encoding="utf-8")
        cfg = resolve(str(source), ["--output_dir", str(out / "best")])
    a, (task, metric) = best.user_attrs, study_metric(study)
    trainable = f"{a['trainable']:,}" if isinstance(a.get("trainable"), int) else "?"
    header = (f"# budgetune train --config {path}\n"
              f"# best of study {study.study_name!r}: trial {best.number}, validation "
              f"{metric} {best.value:.4f} ({'lowest' if lower_is_better(metric) else 'highest'} is best; --task "
              f"{task}; {trainable} trainable); the same "
              "seed on CPU gives the same figure.\n# For all training rows: add --max_train_samples null "
              "--max_eval_samples null" + adalora_fractions(cfg, study) + "\n")
    save_yaml(cfg, path, header=header)
    return path
