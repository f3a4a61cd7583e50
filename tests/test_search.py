"""budgetune search: budget-fitting trials on Optuna, honest outputs, workers sharing a study, faults."""

from __future__ import annotations

import csv
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from conftest import ROOT, read_jsonl, run_cli

pytestmark = pytest.mark.slow  # trains real models: `pytest -m "not slow"` skips the module

optuna = pytest.importorskip("optuna")

BUDGET = 3000  # on the tiny RoBERTa: 57 planner shapes fit, from 388 to 2,992 trainable
GROUP = {"method": ["lora", "adalora", "dora"], "target_modules": ["query,value", "all-linear"],
         "head": ["default", "linear"], "learning_rate": {"low": 1e-3, "high": 2e-2, "log": True}}


def tiny_flags(model: Path, data: Path, cache: Path, epochs: int = 1) -> dict:
    return {"model_name_or_path": str(model), "dataset_name": str(data), "cache_dir": str(cache),
            "num_train_epochs": epochs, "per_device_train_batch_size": 16, "max_seq_length": 48,
            "eval_strategy": "steps", "eval_steps": 9, "logging_steps": 5, "early_stopping_patience": "null",
            "seed": 7, "method": "lora", "rank": 4, "target_modules": "query,value"}


def as_args(flags: dict) -> list[str]:
    return [x for k, v in flags.items() for x in (f"--{k}", str(v))]


@pytest.fixture(scope="module")
def searched(tiny_roberta, headlines_csv, tmp_path_factory, worker_id):
    """Six trials of a tiny search, run once for all xdist workers; DoRA trials raise inside training (a peft error
    for one combination)."""
    from filelock import FileLock

    from budgetune.config import resolve
    from budgetune.recipes.search.driver import search
    from budgetune.training import train as train_lib

    root = tmp_path_factory.getbasetemp()
    root = root.parent if worker_id != "master" else root  # shared by the workers of one session
    out, reads_file = root / "search-shared" / "s", root / "search-shared" / "reads.json"
    with FileLock(str(root / "search-shared.lock")):
        if not reads_file.exists():
            cfg = resolve(None, as_args(tiny_flags(tiny_roberta, headlines_csv, out.parent / "cache")))
            real_train = train_lib.train
            reads = []

            def train_or_fail(cfg, **kw):
                reads.append(cfg.data.test_file)
                if cfg.method.method == "dora":
                    raise RuntimeError("simulated peft error for this combination")
                return real_train(cfg, **kw)

            with pytest.MonkeyPatch.context() as mp:
                mp.setattr(train_lib, "train", train_or_fail)
                search(cfg, search_group=GROUP, n_trials=6, output_dir=out, budget_cap=BUDGET, sampler_seed=3,
                       keep_top_k=2, min_steps=9, test_file=str(headlines_csv))
            reads_file.write_text(json.dumps(reads))
    study = optuna.load_study(study_name="search", storage=f"sqlite:///{out / 'study.db'}")
    return study, out, json.loads(reads_file.read_text())


def test_every_trial_fits_and_is_listed(searched):
    study, out, reads = searched
    trials = study.get_trials()
    assert len(trials) == 6
    assert all(t.state.is_finished() for t in trials)
    for t in trials:
        assert t.user_attrs["trainable"] <= BUDGET, t.user_attrs
        assert t.user_attrs["method"] in GROUP["method"]
    with open(out / "leaderboard.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert sorted(int(r["trial"]) for r in rows) == list(range(6))
    assert {r["state"] for r in rows} <= {"COMPLETE", "PRUNED", "FAIL"}
    md = (out / "leaderboard.md").read_text()
    assert all(f"| {t.number} | {t.state.name} |" in md for t in trials)
    assert (out / "pareto.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # Selection never reads the test file; the selected adapter is evaluated on it once at the end.
    assert reads and all(r is None for r in reads)
    assert "Test (" in md and (out / "best_test_evaluation.json").exists()


def test_failed_trials_keep_their_message_and_the_search_goes_on(searched):
    study, out, _ = searched
    by_state = {s: [t for t in study.get_trials() if t.state == s] for s in optuna.trial.TrialState}
    failed = by_state[optuna.trial.TrialState.FAIL]
    assert failed and all(t.user_attrs["method"] == "dora" for t in failed)
    assert all("simulated peft error" in t.user_attrs["error"] for t in failed)
    assert by_state[optuna.trial.TrialState.COMPLETE]
    assert "simulated peft error" in (out / "leaderboard.md").read_text()


def test_only_the_top_k_run_folders_stay(searched):
    study, out, _ = searched
    done = sorted(study.get_trials(states=(optuna.trial.TrialState.COMPLETE,)), key=lambda t: -t.value)
    kept = sorted(p.name for p in (out / "trials").iterdir())
    assert kept == sorted(f"{t.number:04d}" for t in done[:2])


def test_best_yaml_retrains_to_the_same_validation_accuracy_and_the_test_figure_is_its_models(searched,
                                                                                               headlines_csv):
    """best.yaml's retrain chooses an adapter scale on validation (trials do not): --test_file's figure is the
    selected trial at that scale, which is what the retrained bundle gives; the figure as trained is given too."""
    from budgetune.config import resolve
    from budgetune.inference.evaluate import evaluate
    from budgetune.training.train import train

    study, out, _ = searched
    best = study.best_trial
    text = (out / "best.yaml").read_text()
    assert text.splitlines()[0] == f"# budgetune train --config {out / 'best.yaml'}"
    cfg = resolve(str(out / "best.yaml"), [])
    assert (cfg.method.method, cfg.method.rank) == (best.user_attrs["method"], best.user_attrs["rank"])
    assert cfg.data.test_file is None
    result = train(cfg)
    assert result["best_metric"] == best.value
    assert result["eval_accuracy"] == best.user_attrs["val_accuracy"]
    assert Path(cfg.output.output_dir, "adapter").exists()
    shipped = json.loads((out / "best_test_evaluation.json").read_text())
    retrained = evaluate(cfg.output.output_dir, str(headlines_csv), output=str(out / "retrained-test"))  # its scale
    keys = ("adapter_scale", "accuracy", "macro_f1", "loss")
    assert {k: shipped[k] for k in keys} == {k: retrained[k] for k in keys}
    assert retrained["adapter_scale"] == json.loads(Path(cfg.output.output_dir, "evaluation.json").read_text())[
        "adapter_scale"]
    md = (out / "leaderboard.md").read_text()
    assert f"at adapter scale {shipped['adapter_scale']:g}, " in md
    if shipped["adapter_scale"] != 1:
        raw = json.loads((out / "best_test_evaluation_as_trained.json").read_text())
        assert raw["adapter_scale"] == 1.0 and f"as trained (scale 1): accuracy {raw['accuracy']:.4f}" in md


def test_adalora_is_not_pruned_for_its_pruning_phase_dip(tiny_roberta, headlines_csv, tmp_path):
    """A fixed-seed AdaLoRA trial whose validation loss rises while it prunes ranks, against finished trials that
    scored between its pruning-phase worst and its final-phase worst at every step. The successive-halving pruner
    (as Hyperband's brackets) judges a trial by its value at each rung: it pruned the trial at its dip; now it sees
    only the validations with the final rank pattern and the trial completes."""
    from budgetune.adalora import phases
    from budgetune.config import resolve
    from budgetune.recipes.search.driver import make_pruner, search

    flags = tiny_flags(tiny_roberta, headlines_csv, tmp_path / "cache", epochs=2) | {"metric_for_best_model": "loss"}
    cfg = resolve(None, as_args(flags))
    group = {"method": ["adalora"], "target_modules": ["query,value"], "head": ["default"], "rank": [4],
             "learning_rate": [2e-2], "alpha_ratio": [2.0], "lora_dropout": [0.0], "target_r_fraction": [0.5],
             "tinit_fraction": [0.1], "tfinal_fraction": [0.3]}
    common = {"search_group": group, "budget_cap": BUDGET, "min_steps": 9, "verbose": False}
    search(cfg, n_trials=1, output_dir=tmp_path / "alone", pruner="none", **common)  # the trial on its own
    run = tmp_path / "alone" / "trials" / "0000"
    curve = {e["step"]: e["eval_loss"] for e in read_jsonl(run / "metrics.jsonl") if e["event"] == "eval"}
    schedule = phases.schedule(resolve(str(run / "config.yaml"), []).method, max(curve))
    final = {s: v for s, v in curve.items() if schedule.is_final(s)}
    pruning = {s: v for s, v in curve.items() if s not in final}
    assert final and pruning and max(pruning.values()) > max(final.values()), curve  # it dips while pruning
    between = (max(pruning.values()) + max(final.values())) / 2

    out = tmp_path / "s"
    out.mkdir()
    study = optuna.create_study(study_name="search", storage=f"sqlite:///{out / 'study.db'}", direction="minimize",
                                pruner=make_pruner("halving", 9, max(curve)))
    for _ in range(3):  # finished trials, `between` at every validation step, judged at every rung on the way
        other = study.ask()
        for step in curve:
            other.report(between, step)
            other.should_prune()
        study.tell(other, between)
    search(cfg, n_trials=4, output_dir=out, pruner="halving", **common)
    trial = study.get_trials()[3]
    assert trial.state == optuna.trial.TrialState.COMPLETE, trial.user_attrs.get("prune_reason")
    assert trial.intermediate_values == final  # reported: the final-phase validations only
    alone = optuna.load_study(study_name="search", storage=f"sqlite:///{tmp_path / 'alone' / 'study.db'}")
    assert trial.value == alone.best_value  # the same training, to the bit


def test_a_space_that_fits_nothing_is_refused_before_training(tiny_roberta, headlines_csv, tmp_path):
    from budgetune.config import resolve
    from budgetune.errors import BudgetError
    from budgetune.recipes.search.driver import search

    cfg = resolve(None, as_args(tiny_flags(tiny_roberta, headlines_csv, tmp_path / "cache")))
    with pytest.raises(BudgetError, match="budget of 300 trainable parameters"):
        search(cfg, search_group={"method": ["lora"]}, budget_cap=300, output_dir=tmp_path / "s")
    with pytest.raises(BudgetError, match="budget of 3,000 trainable"):  # only ranks above what fits
        search(cfg, search_group={"method": ["lora"], "rank": {"low": 40, "high": 64}}, budget_cap=BUDGET,
               output_dir=tmp_path / "s")
    assert not (tmp_path / "s").exists()  # no study, no trial folder


def test_sampled_points_fit_the_budget_and_are_valid_adapters(tiny_roberta, headlines_csv, tmp_path):
    """Many draws of the default space, none trained: each fits, AdaLoRA keeps target_r < init_r and a schedule."""
    from budgetune.adalora import phases
    from budgetune.budget.plan import check_budget
    from budgetune.config import resolve
    from budgetune.recipes.search.search_space import build_space, parse_search_group, sample

    cfg = resolve(None, as_args(tiny_flags(tiny_roberta, headlines_csv, tmp_path / "cache")) + ["--label_names",
                                                                                                  "a,b,c,d"])
    space = build_space(cfg, 4, parse_search_group(None), BUDGET)
    assert {s.method for s in space.shapes} >= {"lora", "adalora", "dora", "ia3", "vera", "loha", "lokr"}
    assert all(min(s.ranks) >= 2 for s in space.shapes if s.method == "adalora")
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    for _ in range(40):
        trial = study.ask()
        point = sample(trial, space, cfg, total_steps=100)
        assert check_budget(point, 4).total_trainable <= BUDGET
        m = point.method
        if m.method == "adalora":
            assert 1 <= m.target_r < m.rank and m.tinit + m.tfinal < 100
        study.tell(trial, 0.0)
    # however short the trial, an AdaLoRA schedule reaches its final rank pattern: its last validation is comparable
    short_final = parse_search_group({"method": ["adalora"], "tfinal_fraction": [0.0, 0.1]})  # 0 or 0.8 steps
    adalora_only = build_space(cfg, 4, short_final, BUDGET)
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    for _ in range(20):
        trial = study.ask()
        m = sample(trial, adalora_only, cfg, total_steps=8).method
        assert phases.schedule(m, 8).is_final(8), (m.tinit, m.tfinal)
        study.tell(trial, 0.0)


@pytest.mark.parametrize("group, message", [
    ({"rnak": [4]}, r"unknown key 'rnak' in section 'search' \(did you mean 'rank'\?\)"),
    ({"learning_rate": {"low": 1e-2, "high": 1e-3}}, r"search.learning_rate: lower bound 0.01 > upper bound 0.001"),
    ({"method": []}, r"search.method: empty list of choices"),
    ({"rank": {}}, r"search.rank: empty range"),
    ({"rank": {"low": 4}}, r"search.rank: a range needs both low and high"),
    ({"rank": [0, 4]}, r"search.rank: expected a positive integer, got 0"),
    ({"method": ["lora", "lroa"]}, r"search.method: unknown method 'lroa'"),
    ({"learning_rate": {"low": 0, "high": 1e-3, "log": True}}, r"search.learning_rate: a log range needs low > 0"),
])
def test_bad_search_entries_are_refused_naming_the_key(group, message):
    from budgetune.errors import ConfigError
    from budgetune.recipes.search.search_space import parse_search_group

    with pytest.raises(ConfigError, match=message):
        parse_search_group(group)


def test_cli_refuses_a_bad_search_group_naming_file_and_key(tmp_path):
    config = tmp_path / "base.yaml"
    config.write_text(yaml.safe_dump({"method": {"method": "lora"}, "search": {"rank": {"low": 8, "high": 2}}}))
    proc = run_cli("search", "--config", str(config), "--output_dir", str(tmp_path / "s"), check=False)
    assert proc.returncode == 2
    assert f"budgetune: error: {config}: search.rank: lower bound 8 > upper bound 2" in proc.stderr
    assert not (tmp_path / "s").exists()


def search_cli(tiny_roberta, headlines_csv, tmp_path: Path, journal: Path, n_trials: int, epochs: int,
               out: Path) -> list[str]:
    config = tmp_path / "base.yaml"
    config.write_text(yaml.safe_dump({"search": GROUP | {"method": ["lora", "adalora"]}}))
    extra = as_args(tiny_flags(tiny_roberta, headlines_csv, tmp_path / "cache", epochs))
    return [sys.executable, "-m", "budgetune", "search", "--config", str(config), "--budget", str(BUDGET),
            "--n_trials", str(n_trials), "--storage", str(journal), "--study", "shared", "--output_dir", str(out),
            "--keep_top_k", "10", *extra]


def load_journal(journal: Path):
    storage = optuna.storages.JournalStorage(optuna.storages.journal.JournalFileBackend(str(journal)))
    return optuna.load_study(study_name="shared", storage=storage)


ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}


@pytest.mark.slow
def test_two_workers_share_one_study_on_a_journal_file(tiny_roberta, headlines_csv, tmp_path):
    journal, out = tmp_path / "study.log", tmp_path / "s"
    cmd = search_cli(tiny_roberta, headlines_csv, tmp_path, journal, 6, 2, out)
    workers = [subprocess.Popen(cmd, cwd=ROOT, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
               for _ in range(2)]
    logs = [w.communicate(timeout=600)[0] for w in workers]
    assert [w.returncode for w in workers] == [0, 0], "\n".join(log[-3000:] for log in logs)
    study = load_journal(journal)
    trials = study.get_trials()
    assert [t.number for t in trials] == list(range(len(trials)))  # distinct trials, one numbering
    assert 6 <= len(trials) <= 7  # n_trials is the study's total; a worker may start one while the other ends
    assert all(t.state.is_finished() for t in trials)
    pids = {str(w.pid) for w in workers}
    by_worker = {t.user_attrs["worker"].split(":")[1] for t in trials
                 if t.state == optuna.trial.TrialState.COMPLETE}
    assert by_worker == pids  # both workers' results are in the one study
    for t in trials:
        assert (out / "trials" / f"{t.number:04d}").exists() or t.state != optuna.trial.TrialState.COMPLETE


@pytest.mark.slow
def test_a_killed_worker_restarts_and_the_killed_trial_is_failed(tiny_roberta, headlines_csv, tmp_path):
    journal, out = tmp_path / "study.log", tmp_path / "s"
    cmd = search_cli(tiny_roberta, headlines_csv, tmp_path, journal, 3, 3, out)
    first = subprocess.Popen(cmd, cwd=ROOT, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    victim = out / "trials" / "0001" / "metrics.jsonl"
    deadline = time.monotonic() + 300
    while not (victim.exists() and any(e.get("event") == "eval" or "eval_accuracy" in e
                                       for e in read_jsonl(victim))):
        assert first.poll() is None, "the worker ended before trial 1 was evaluated"
        assert time.monotonic() < deadline
        time.sleep(0.2)
    os.kill(first.pid, signal.SIGKILL)  # mid-trial 1: trial 0 has finished
    first.wait()
    before = load_journal(journal).get_trials()
    assert before[1].state == optuna.trial.TrialState.RUNNING
    assert before[0].state.is_finished()
    proc = subprocess.run(cmd, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "trial 1: its worker is gone (killed mid-trial): marked failed" in proc.stderr
    after = load_journal(journal).get_trials()
    assert after[0].state == before[0].state and after[0].value == before[0].value  # nothing finished is lost
    assert after[1].state == optuna.trial.TrialState.FAIL
    assert all(t.state.is_finished() for t in after)
    assert sum(t.state != optuna.trial.TrialState.FAIL for t in after) >= 2, (out / "leaderboard.md").read_text()
    rows = {r["trial"]: r for r in csv.DictReader(open(out / "leaderboard.csv", newline=""))}
    assert rows["1"]["state"] == "FAIL" and "worker" in rows["1"]["note"]


@pytest.mark.slow
def test_ctrl_c_ends_the_search_with_the_leaderboard_written(tiny_roberta, headlines_csv, tmp_path):
    journal, out = tmp_path / "study.log", tmp_path / "s"
    cmd = search_cli(tiny_roberta, headlines_csv, tmp_path, journal, 4, 3, out)
    proc = subprocess.Popen(cmd, cwd=ROOT, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    victim = out / "trials" / "0001" / "metrics.jsonl"
    deadline = time.monotonic() + 300
    while not (victim.exists() and any(e.get("event") == "eval" for e in read_jsonl(victim))):
        assert proc.poll() is None and time.monotonic() < deadline
        time.sleep(0.2)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 130, err[-3000:]
    assert "search interrupted; leaderboard:" in err and "Run the same command again" in err
    rows = {r["trial"]: r for r in csv.DictReader(open(out / "leaderboard.csv", newline=""))}
    assert set(rows) == {"0", "1", "2"}  # no trial started after the interrupt; the interrupted one's point queued
    assert rows["0"]["state"] in ("COMPLETE", "PRUNED")
    assert rows["1"]["state"] == "FAIL" and rows["1"]["note"].startswith("interrupted")
    assert rows["2"]["state"] == "WAITING" and rows["2"]["note"] == "queued: runs when the search continues"
    assert (out / "leaderboard.md").exists()


@pytest.mark.parametrize("retry_failed", [0, 1])
def test_a_dead_workers_trial_is_failed_and_retried_by_policy(tmp_path, retry_failed):
    """--retry_failed N: the trial a killed worker left RUNNING is failed and, by policy, queued again with the same
    parameters (Optuna's RetryFailedTrialCallback); with 0 it is only failed."""
    import socket

    from budgetune.recipes.search.driver import fail_dead_trials, make_storage, worker_id

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()  # a pid that no longer runs
    storage = make_storage(str(tmp_path / "study.log"), tmp_path, retry_failed)
    study = optuna.create_study(study_name="s", storage=storage)
    trial = study.ask({"learning_rate": optuna.distributions.FloatDistribution(1e-4, 1e-2, log=True)})
    trial.set_user_attr("worker", f"{socket.gethostname()}:{dead.pid}:0.00")
    alive = study.ask()
    alive.set_user_attr("worker", worker_id())  # this test's own process
    assert fail_dead_trials(study, retry_failed) == [trial.number]
    trials = study.get_trials()
    assert trials[trial.number].state == optuna.trial.TrialState.FAIL
    assert trials[alive.number].state == optuna.trial.TrialState.RUNNING  # a live worker's trial is left alone
    waiting = [t for t in trials if t.state == optuna.trial.TrialState.WAITING]
    if retry_failed:
        assert len(waiting) == 1 and waiting[0].params == trials[trial.number].params
        assert waiting[0].system_attrs["failed_trial"] == trial.number
    else:
        assert waiting == []


def test_database_storage_fails_stale_trials_by_heartbeat(tmp_path):
    """On a database the heartbeat decides: a trial whose worker stopped beating past the grace period is failed by
    the next worker, and retried when --retry_failed says so."""
    from budgetune.recipes.search.driver import GRACE_S, HEARTBEAT_S, make_storage

    storage = make_storage(f"sqlite:///{tmp_path / 'db.sqlite'}", tmp_path, 1)
    assert storage.heartbeat_interval == HEARTBEAT_S and storage.grace_period == GRACE_S
    storage.grace_period = 1  # a short grace period instead of waiting two minutes
    study = optuna.create_study(study_name="s", storage=storage)
    stale = study.ask({"x": optuna.distributions.FloatDistribution(0, 1)})
    storage.record_heartbeat(stale._trial_id)  # beat once, then the worker "dies"
    time.sleep(2.5)
    optuna.storages.fail_stale_trials(study)
    trials = study.get_trials()
    assert trials[stale.number].state == optuna.trial.TrialState.FAIL
    assert [t.params for t in trials if t.state == optuna.trial.TrialState.WAITING] == [trials[stale.number].params]


def test_best_yaml_is_written_while_another_worker_writes_it_too(tmp_path, monkeypatch):
    """Workers sharing a study and an output folder each write best.yaml; one's scratch file is not the other's."""
    import optuna

    from budgetune.config import Config
    from budgetune.recipes.search import leaderboard

    study = optuna.create_study(direction="maximize")
    trial = optuna.trial.create_trial(value=0.5, user_attrs={
        "config_yaml": yaml.safe_dump(Config().to_dict(), sort_keys=False), "trainable": 10})
    study.add_trial(trial)
    real_resolve, calls = leaderboard.resolve, []

    def resolve_while_the_other_worker_writes(path, overrides):
        calls.append(path)
        if len(calls) == 1:  # the other worker writes (and cleans up) between our write and our read
            assert leaderboard.write_best_yaml(study, tmp_path) == tmp_path / "best.yaml"
        return real_resolve(path, overrides)

    monkeypatch.setattr(leaderboard, "resolve", resolve_while_the_other_worker_writes)
    assert leaderboard.write_best_yaml(study, tmp_path) == tmp_path / "best.yaml"
    assert len(set(calls)) == 2
    assert yaml.safe_load((tmp_path / "best.yaml").read_text())["output"]["output_dir"] == str(tmp_path / "best")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["best.yaml"]  # no scratch left behind


# ---- a study continued, its settings, its counts and its leaderboard (no training) -------------------------


SIGNATURE = {"dataset_name": "d.csv", "budget": 1000, "trial_steps": 30, "metric_for_best_model": "accuracy"}


def sampled(study, n: int) -> list[float]:
    study.optimize(lambda t: t.suggest_float("x", 0, 1), n_trials=n)
    return [t.params["x"] for t in study.get_trials()]


def test_a_seeded_study_continued_draws_new_points(tmp_path):
    from budgetune.recipes.search.driver import open_study

    def opened():
        return open_study("s", (None, tmp_path, 0), "random", 3, optuna.pruners.NopPruner(), "accuracy", SIGNATURE)

    first = sampled(opened(), 3)
    both = sampled(opened(), 3)
    assert both[:3] == first and not set(both[3:]) & set(first)  # the same seed used to draw the same 3 again


def test_a_study_continued_with_other_settings_is_refused_naming_them(tmp_path):
    from budgetune.errors import ConfigError
    from budgetune.recipes.search.driver import open_study

    args = ("s", (None, tmp_path, 0), "tpe", 0, optuna.pruners.NopPruner(), "accuracy")
    sampled(open_study(*args, SIGNATURE), 1)
    assert len(sampled(open_study(*args, dict(SIGNATURE)), 1)) == 2  # the same settings continue
    with pytest.raises(ConfigError, match=r"--study s: the stored study searched with other settings \(budget: "
                                          r"stored 1000, now 2000\)"):
        open_study(*args, {**SIGNATURE, "budget": 2000})


def test_an_interrupted_trial_does_not_count_and_its_point_is_queued_again(tmp_path):
    from types import SimpleNamespace

    from budgetune.errors import Interrupted
    from budgetune.recipes.search import driver

    study = optuna.create_study()
    study.optimize(lambda t: t.suggest_float("x", 0, 1), n_trials=2)

    def interrupted(setup, trial):
        trial.suggest_float("x", 0, 1)
        raise Interrupted("stopped by signal 15")

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(driver, "trial_config", interrupted)
        with pytest.raises(Interrupted):
            study.optimize(lambda t: driver.objective(SimpleNamespace(flags={}), t), n_trials=1)
    stopped = study.get_trials()[2]
    assert stopped.state == optuna.trial.TrialState.FAIL and driver.finished_trials(study) == 2
    assert len(study.get_trials(states=(optuna.trial.TrialState.WAITING,))) == 1
    study.optimize(lambda t: t.suggest_float("x", 0, 1), n_trials=1)  # the search continued: the same point
    assert study.get_trials()[3].params == stopped.params


def test_a_trial_that_fails_before_training_records_why(tmp_path):
    """An error while sampling or gating is the trial's own (the leaderboard used to say its worker died)."""
    from types import SimpleNamespace

    from budgetune.errors import ConfigError
    from budgetune.recipes.search import driver

    study = optuna.create_study()
    trial = study.ask()

    def bad(setup, trial):
        raise ConfigError("--learning_rate must be positive")

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(driver, "trial_config", bad)
        with pytest.raises(ConfigError):
            driver.objective(SimpleNamespace(flags={}), trial)
    assert study.get_trials()[0].user_attrs["error"] == "ConfigError: --learning_rate must be positive"


def test_warm_up_validations_do_not_set_a_pruned_adalora_trials_figures():
    from types import SimpleNamespace

    from budgetune.recipes.search.driver import reporter

    study = optuna.create_study(direction="maximize", pruner=optuna.pruners.NopPruner())
    trial = study.ask()
    setup = SimpleNamespace(metric="accuracy", cfg=SimpleNamespace(data=SimpleNamespace(task="single_label")),
                            pruner_name="median")
    report = reporter(setup, trial, 0.0)
    report(5, {"eval_accuracy": 0.80, "eval_macro_f1": 0.8, "eval_loss": 0.5, "final_ranks": False})
    report(9, {"eval_accuracy": 0.55, "eval_macro_f1": 0.5, "eval_loss": 0.9, "final_ranks": True})
    assert trial.user_attrs["val_accuracy"] == 0.55


def test_the_leaderboard_ranks_pruned_trials_by_the_figure_it_shows_and_empty_ones_last():
    from budgetune.recipes.search.leaderboard import trial_rows

    study = optuna.create_study(direction="minimize")
    P = optuna.trial.TrialState.PRUNED
    for attrs, values in (({"prune_reason": "over budget"}, None), ({"val_loss": 0.4}, {0: 0.3}),
                          ({"val_loss": 0.3}, {0: 0.5})):  # pruned at a last report of 0.3 and 0.5, best 0.4 and 0.3
        study.add_trial(optuna.trial.create_trial(state=P, user_attrs={"metric": "loss", **attrs},
                                                  intermediate_values=values or {}))
    assert [r["trial"] for r in trial_rows(study)] == [2, 1, 0]


@pytest.mark.parametrize("call, message", [
    (lambda: __import__("budgetune.cli.search", fromlist=["x"]).parse_duration("1.2.3"), "--timeout: expected"),
    (lambda: __import__("budgetune.recipes.search.driver", fromlist=["x"]).make_storage("runs/x/study.txt",
                                                                                        Path("."), 0),
     "--storage runs/x/study.txt: give a database URL"),
])
def test_bad_search_flags_are_refused_naming_the_flag(call, message):
    from budgetune.errors import ConfigError

    with pytest.raises(ConfigError, match=re.escape(message)):
        call()


def test_a_storage_path_ending_in_db_is_sqlite(tmp_path):
    from budgetune.recipes.search.driver import make_storage

    storage = make_storage(str(tmp_path / "study.db"), tmp_path, 0)
    optuna.create_study(study_name="s", storage=storage)
    assert (tmp_path / "study.db").is_file()


@pytest.mark.parametrize("group, message", [
    ({"learning_rate": [0.0, 1e-3]}, r"search.learning_rate: values must be above 0"),
    ({"alpha_ratio": [-1.0, 2.0]}, r"search.alpha_ratio: values must be above 0"),
])
def test_search_values_that_cannot_train_are_refused(group, message):
    from budgetune.errors import ConfigError
    from budgetune.recipes.search.search_space import parse_search_group

    with pytest.raises(ConfigError, match=message):
        parse_search_group(group)
    assert parse_search_group({"target_modules": ["query, value"]})["target_modules"].choices == ["query,value"]


def test_min_steps_below_one_is_refused_before_anything_loads(tmp_path):
    from budgetune.config import Config
    from budgetune.errors import ConfigError
    from budgetune.recipes.search.driver import search

    with pytest.raises(ConfigError, match="--min_steps must be at least 1, got 0"):
        search(Config(), n_trials=1, output_dir=tmp_path, budget_cap=1000, min_steps=0)


def test_an_adalora_winner_s_schedule_is_also_given_as_fractions_of_the_run():
    from budgetune.config import resolve
    from budgetune.recipes.search.leaderboard import adalora_fractions

    study = optuna.create_study()
    study.set_user_attr("budgetune_signature", {"trial_steps": 200})
    cfg = resolve(None, ["--method", "adalora", "--tinit", "20", "--tfinal", "60"])
    assert adalora_fractions(cfg, study).startswith(" --tinit 0.1 --tfinal 0.3 (AdaLoRA's schedule")
    assert adalora_fractions(resolve(None, []), study) == ""
