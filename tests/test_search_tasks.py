"""budgetune search beyond one label per text: the study optimises the task's metric in its direction (minimise
mse, maximise micro-F1), and the leaderboard, pareto plot and best.yaml say which metric ranks the trials."""

from __future__ import annotations

import csv

import pytest
import yaml
from test_search import as_args, tiny_flags
from test_task_verbs import task_files  # noqa: F401  (the fixture, shared)

optuna = pytest.importorskip("optuna")

METRIC_COLUMNS = {"multi_label": ["val_micro_f1", "val_macro_f1", "val_subset_accuracy"],
                  "regression": ["val_mse", "val_mae", "val_pearson", "val_spearman"]}


def synthetic_study(direction: str, task: str, metric: str, values: list[float]):
    from budgetune.config import Config

    study = optuna.create_study(direction=direction)
    for v in values:
        attrs = {"task": task, "metric": metric, f"val_{metric}": v, "trainable": 100, "method": "lora",
                 "config_yaml": yaml.safe_dump(Config().to_dict(), sort_keys=False)}
        study.add_trial(optuna.trial.create_trial(value=v, user_attrs=attrs))
    return study


@pytest.mark.parametrize(("task", "metric", "direction", "ranked"), [
    ("regression", "mse", "minimize", [0.2, 0.5, 0.9]),
    ("regression", "pearson", "maximize", [0.9, 0.5, 0.2]),
    ("multi_label", "micro_f1", "maximize", [0.9, 0.5, 0.2]),
])
def test_the_leaderboard_ranks_by_the_tasks_metric_in_its_direction(tmp_path, task, metric, direction, ranked):
    from budgetune.recipes.search import leaderboard

    study = synthetic_study(direction, task, metric, [0.5, 0.9, 0.2])
    leaderboard.write_leaderboard(study, tmp_path)
    with open(tmp_path / "leaderboard.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [float(r[f"val_{metric}"]) for r in rows] == ranked
    assert list(rows[0]) == [*leaderboard.HEAD, *METRIC_COLUMNS[task], *leaderboard.TAIL]
    better = "lower" if metric == "mse" else "higher"
    assert f"Ranked by validation {metric} ({better} is better; --task {task})" in (tmp_path / "leaderboard.md").read_text()
    assert leaderboard.write_pareto(study, tmp_path / "pareto.png") is not None
    header = (leaderboard.write_best_yaml(study, tmp_path)).read_text().splitlines()[1]
    assert f"validation {metric} {ranked[0]:.4f} ({'lowest' if metric == 'mse' else 'highest'} is best" in header


def test_a_study_stored_for_the_other_direction_is_refused(tmp_path):
    from budgetune.errors import ConfigError
    from budgetune.recipes.search.driver import open_study

    storage = (None, tmp_path, 0)
    study = open_study("s", storage, "tpe", 0, optuna.pruners.NopPruner(), "mse", {"task": "regression"})
    assert study.direction.name == "MINIMIZE"
    with pytest.raises(ConfigError, match="--study s: the stored study is to minimize its metric, but "
                                          "--metric_for_best_model micro_f1 is to maximize"):
        open_study("s", storage, "tpe", 0, optuna.pruners.NopPruner(), "micro_f1", {"task": "multi_label"})


@pytest.mark.slow
@pytest.mark.parametrize(("task", "data", "extra", "metric", "direction"), [
    ("multi_label", "multi_delim", {"label_delimiter": ";"}, "micro_f1", "MAXIMIZE"),
    ("regression", "reg", {}, "mse", "MINIMIZE"),
])
def test_a_tiny_search_of_each_task_optimises_its_metric(tiny_roberta, task_files, tmp_path,  # noqa: F811
                                                         task, data, extra, metric, direction):
    from budgetune.config import resolve
    from budgetune.recipes.search.driver import search

    flags = tiny_flags(tiny_roberta, task_files[data], tmp_path / "cache", epochs=2) | {"task": task, **extra}
    cfg = resolve(None, as_args(flags))
    out = tmp_path / "s"
    study = search(cfg, search_group={"method": ["lora"], "learning_rate": {"low": 5e-3, "high": 5e-2, "log": True}},
                   n_trials=2, output_dir=out, budget_cap=3000, sampler_seed=1, pruner="none",
                   test_file=str(task_files[data]))
    assert study.direction.name == direction  # what every pruner reads
    done = study.get_trials(states=(optuna.trial.TrialState.COMPLETE,))
    assert len(done) == 2 and all(t.user_attrs["metric"] == metric for t in done)
    with open(out / "leaderboard.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [c for c in rows[0] if c.startswith("val_")] == METRIC_COLUMNS[task]
    scores = [float(r[f"val_{metric}"]) for r in rows]
    assert scores == sorted(scores, reverse=direction == "MAXIMIZE")
    assert scores[0] == pytest.approx(study.best_value)
    md = (out / "leaderboard.md").read_text()
    assert f"Ranked by validation {metric}" in md and ("MSE" if task == "regression" else "micro-F1") in md
    best = resolve(str(out / "best.yaml"), [])
    assert best.data.task == task and best.train.metric_for_best_model == metric
    assert f"validation {metric} {study.best_value:.4f}" in (out / "best.yaml").read_text()
