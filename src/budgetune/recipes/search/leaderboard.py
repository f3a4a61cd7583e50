"""What a search leaves behind: leaderboard.csv/.md, pareto.png and best.yaml (read from the study, any worker)."""

from __future__ import annotations

import csv
import io
import tempfile
from pathlib import Path

from budgetune import fileio
from budgetune.config import resolve, save_yaml

COLUMNS = ("trial", "state", "method", "rank", "targets", "head", "learning_rate", "trainable", "val_accuracy",
           "val_macro_f1", "steps", "wall_s", "note")


def trial_rows(study) -> list[dict]:
    """One row per trial: finished ones best first (complete, then pruned, then failed), running last."""
    import optuna

    order = {"COMPLETE": 0, "PRUNED": 1, "FAIL": 2, "RUNNING": 3, "WAITING": 4}
    sign = -1 if study.direction == optuna.study.StudyDirection.MAXIMIZE else 1
    rows = []
    for t in study.get_trials(deepcopy=False):
        a = t.user_attrs
        note = a.get("prune_reason") or a.get("error") or ""
        if t.state.name == "FAIL" and not note:  # failed from outside: its worker died (kill -9, lost machine)
            note = f"worker {a.get('worker', '?')} stopped mid-trial"
        rows.append({"trial": t.number, "state": t.state.name, "method": a.get("method", ""),
                     "rank": a.get("rank", ""), "targets": a.get("targets", ""), "head": a.get("head", ""),
                     "learning_rate": a.get("learning_rate", ""), "trainable": a.get("trainable", ""),
                     "val_accuracy": a.get("val_accuracy", ""), "val_macro_f1": a.get("val_macro_f1", ""),
                     "steps": a.get("steps", ""), "wall_s": a.get("wall_s", ""), "note": note,
                     "value": t.value})
    rows.sort(key=lambda r: (order.get(r["state"], 5), sign * r["value"] if r["value"] is not None else 0,
                             r["trial"]))
    return rows


def _cell(column: str, value) -> str:
    if value is None or value == "":
        return ""
    if column == "learning_rate":
        return f"{value:.2e}"
    if column in ("val_accuracy", "val_macro_f1"):
        return f"{value:.4f}"
    if column == "wall_s":
        return f"{value:.0f}"
    if column == "trainable":
        return f"{value:,}"
    return str(value).replace("|", "/").replace("\n", " ")


def write_leaderboard(study, out: Path, extra: str = "") -> tuple[Path, Path]:
    rows = trial_rows(study)
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=COLUMNS, extrasaction="ignore")
    w.writeheader()
    w.writerows(rows)
    fileio.atomic_write_text(out / "leaderboard.csv", buf.getvalue())
    counts = {s: sum(r["state"] == s for r in rows) for s in ("COMPLETE", "PRUNED", "FAIL", "RUNNING")}
    lines = [f"# Leaderboard of study `{study.study_name}`", "",
             ", ".join(f"{n} {s.lower()}" for s, n in counts.items() if n) + ". Validation metrics are the best "
             "evaluation of each trial (pruned: up to where it was stopped); selection never reads a test file.", ""]
    lines.append("| " + " | ".join(COLUMNS) + " |")
    lines.append("|" + "|".join(" ---: " if c in ("trainable", "val_accuracy", "val_macro_f1", "steps", "wall_s",
                                                 "rank", "learning_rate", "trial") else " --- " for c in COLUMNS) + "|")
    for r in rows:
        lines.append("| " + " | ".join(_cell(c, r[c]) for c in COLUMNS) + " |")
    if extra:
        lines += ["", extra]
    fileio.atomic_write_text(out / "leaderboard.md", "\n".join(lines) + "\n")
    return out / "leaderboard.csv", out / "leaderboard.md"


def pareto_front(points: list[tuple[float, float]]) -> list[int]:
    """Indices of (cost, accuracy) points that no other point beats on both (lower cost, higher accuracy)."""
    front = []
    for i, (c, a) in enumerate(points):
        if not any((c2 <= c and a2 >= a) and (c2 < c or a2 > a) for j, (c2, a2) in enumerate(points) if j != i):
            front.append(i)
    return front


def write_pareto(study, path: Path) -> Path | None:
    """Validation accuracy against trainable parameters and against wall time; the Pareto front in red."""
    from matplotlib.figure import Figure
    from matplotlib.ticker import NullFormatter

    rows = [r for r in trial_rows(study) if isinstance(r["val_accuracy"], float) and r["state"] in ("COMPLETE", "PRUNED")]
    if not rows:
        return None
    fig = Figure(figsize=(10, 4), dpi=90)
    for ax, key, label in ((fig.add_subplot(1, 2, 1), "trainable", "trainable parameters"),
                           (fig.add_subplot(1, 2, 2), "wall_s", "wall time of the trial (s)")):
        done = [r for r in rows if r["state"] == "COMPLETE" and isinstance(r[key], (int, float))]
        pruned = [r for r in rows if r["state"] == "PRUNED" and isinstance(r[key], (int, float))]
        ax.scatter([r[key] for r in pruned], [r["val_accuracy"] for r in pruned], marker="x", c="0.6", s=20,
                   label="pruned (accuracy when stopped)")
        ax.scatter([r[key] for r in done], [r["val_accuracy"] for r in done], c="tab:blue", s=24, label="complete")
        front = sorted((done[i] for i in pareto_front([(r[key], r["val_accuracy"]) for r in done])),
                       key=lambda r: r[key])
        if front:
            ax.step([r[key] for r in front], [r["val_accuracy"] for r in front], where="post", c="tab:red", lw=1)
            ax.scatter([r[key] for r in front], [r["val_accuracy"] for r in front], c="tab:red", s=30,
                       label="Pareto front")
            for r in front:
                ax.annotate(f"#{r['trial']} {r['method']}", (r[key], r["val_accuracy"]), fontsize=7,
                            xytext=(3, -9), textcoords="offset points")
        if key == "trainable":
            ax.set_xscale("log")
            ax.xaxis.set_minor_formatter(NullFormatter())  # 2x10^5, 3x10^5, ... collide
        ax.set_xlabel(label)
        ax.set_ylabel("validation accuracy")
        ax.grid(alpha=0.3)
    fig.axes[0].legend(fontsize=7, loc="best")
    fig.suptitle(f"study {study.study_name!r}: {len(rows)} trials with a validation score")
    fig.tight_layout()
    with fileio.atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    return path


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
    a = best.user_attrs
    trainable = f"{a['trainable']:,}" if isinstance(a.get("trainable"), int) else "?"
    header = (f"# budgetune train --config {path}\n"
              f"# best of study {study.study_name!r}: trial {best.number}, validation "
              f"{a.get('metric', 'accuracy')} {best.value:.4f} ({trainable} trainable); the same "
              "seed on CPU gives the same figure.\n# For all training rows: add --max_train_samples null "
              "--max_eval_samples null\n")
    save_yaml(cfg, path, header=header)
    return path
