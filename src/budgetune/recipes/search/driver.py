"""`budgetune search`: the best adapter under the budget, found by Optuna, on one process or many sharing a study.

Each trial draws an adapter shape, rank and schedule that fit the budget (search_space.py), checks the count before
any weight is loaded, and trains in-process with `train(cfg, on_evaluate=...)`, reporting to the pruner the
validations that compare across trials: all of them, except AdaLoRA's before its rank pattern is final (its warm-up
and pruning phases dip by design; every sampled AdaLoRA schedule has a final phase, so at least its last validation
is reported). Outputs (leaderboard.py) are rebuilt from the study, so any worker can write them.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import shutil
import socket
import sys
import time
from pathlib import Path

import yaml

from budgetune import tasks
from budgetune.budget.plan import check_budget
from budgetune.config import Config, build_config, build_merged, load_yaml
from budgetune.data import readers as data_lib
from budgetune.data.splits import Splits, load_splits
from budgetune.errors import BudgetError, ConfigError, Interrupted, TrainingError
from budgetune.metrics import improves, lower_is_better
from budgetune.recipes.search import leaderboard
from budgetune.recipes.search.search_space import (
    Space,
    base_point,
    build_space,
    parse_search_group,
    sample,
    targets_text,
)

PRUNERS = ("hyperband", "halving", "median", "none")
HEARTBEAT_S = 30  # RDB storages: a RUNNING trial silent for GRACE_S is failed by the next worker that starts one
GRACE_S = 120


def worker_id() -> str:
    """host:pid:start-time of this process; the start time tells a dead worker from a new process with its pid."""
    import psutil

    return f"{socket.gethostname()}:{os.getpid()}:{psutil.Process().create_time():.2f}"


def worker_alive(worker: str) -> bool | None:
    """True/False for a worker on this host; None for another host (its storage's heartbeat decides)."""
    import psutil

    host, _, rest = worker.partition(":")
    pid, _, started = rest.partition(":")
    if host != socket.gethostname() or not pid.isdigit():
        return None
    try:
        return f"{psutil.Process(int(pid)).create_time():.2f}" == started
    except psutil.NoSuchProcess:
        return False


def make_storage(storage: str | None, out: Path, retry_failed: int):
    """Default: SQLite in the output folder; `*.log`/`*.journal`: Optuna's journal file; else an RDB URL."""
    import optuna

    retry = optuna.storages.RetryFailedTrialCallback(max_retry=retry_failed) if retry_failed else None
    if storage and re.search(r"\.(log|journal)$", storage) and "://" not in storage:
        Path(storage).parent.mkdir(parents=True, exist_ok=True)
        return optuna.storages.JournalStorage(optuna.storages.journal.JournalFileBackend(storage))
    if storage and "://" not in storage:
        if not re.search(r"\.(db|sqlite3?)$", storage):
            raise ConfigError(f"--storage {storage}: give a database URL (sqlite:///FILE.db), a file ending in .db "
                              "(SQLite), or one ending in .log or .journal (Optuna's journal file)")
        storage = f"sqlite:///{Path(storage).resolve()}"
    url = storage or f"sqlite:///{(out / 'study.db').resolve()}"
    kwargs = {"connect_args": {"timeout": 60}} if url.startswith("sqlite") else {}
    return optuna.storages.RDBStorage(url, engine_kwargs=kwargs, heartbeat_interval=HEARTBEAT_S,
                                      grace_period=GRACE_S, heartbeat_stale_trial_callback=retry)


def make_pruner(name: str, min_steps: int, max_steps: int):
    import optuna

    if name == "hyperband":
        return optuna.pruners.HyperbandPruner(min_resource=min_steps, max_resource=max_steps, reduction_factor=3)
    if name == "halving":
        return optuna.pruners.SuccessiveHalvingPruner(min_resource=min_steps, reduction_factor=3)
    if name == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=3, n_warmup_steps=min_steps)
    return optuna.pruners.NopPruner()


def fail_dead_trials(study, retry_failed: int) -> list[int]:
    """Mark FAIL the RUNNING trials whose worker on this host is gone (kill -9); retry them if the policy says so."""
    import optuna

    failed = []
    for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,)):
        if worker_alive(t.user_attrs.get("worker", "")) is False:
            study.tell(t.number, state=optuna.trial.TrialState.FAIL, skip_if_finished=True)
            failed.append(t.number)
            if retry_failed:
                frozen = study.get_trials(deepcopy=False)[t.number]
                optuna.storages.RetryFailedTrialCallback(max_retry=retry_failed)(study, frozen)
    return failed


def trial_steps(cfg: Config, rows: int) -> int:
    """Optimizer steps of one trial, computed as train() does (one process)."""
    t = cfg.train
    per_epoch = max(1, math.ceil(math.ceil(rows / t.per_device_train_batch_size) / t.gradient_accumulation_steps))
    return t.max_steps if t.max_steps > 0 else math.ceil(per_epoch * t.num_train_epochs)


@dataclasses.dataclass
class Setup:
    """What every trial of this worker shares."""

    cfg: Config
    space: Space
    out: Path
    num_labels: int
    total_steps: int
    metric: str
    pruner_name: str
    splits: Splits | None = None  # loaded once per worker: every trial trains on the same rows
    flags: dict = dataclasses.field(default_factory=dict)


def trial_config(setup: Setup, trial) -> Config:
    """The trial's sampled configuration in its own run folder, its shape recorded on the trial."""
    trial.set_user_attr("worker", worker_id())
    cfg = sample(trial, setup.space, setup.cfg, setup.total_steps)
    run_dir = setup.out / "trials" / f"{trial.number:04d}"
    cfg = dataclasses.replace(cfg, output=dataclasses.replace(cfg.output, output_dir=str(run_dir),
                                                              overwrite_output_dir=True))
    for k, v in {"method": cfg.method.method, "rank": cfg.method.rank if cfg.method.method != "ia3" else "",
                 "targets": targets_text(cfg.method.target_modules), "head": cfg.model.head,
                 "learning_rate": cfg.train.learning_rate, "metric": setup.metric, "task": cfg.data.task}.items():
        trial.set_user_attr(k, v)
    return cfg


def gate_trial(setup: Setup, trial, cfg: Config) -> None:
    """The gate: a point over budget is pruned before any weight loads, so it costs nothing."""
    import optuna

    try:
        bd = check_budget(cfg, setup.num_labels)
    except BudgetError as e:
        n = e.breakdown.total_trainable if e.breakdown else "?"
        trial.set_user_attr("trainable", n)
        trial.set_user_attr("prune_reason", f"over budget: {n:,} > {setup.space.budget:,} trainable, not trained")
        raise optuna.TrialPruned() from None
    trial.set_user_attr("trainable", bd.total_trainable)
    trial.set_user_attr("config_yaml", yaml.safe_dump(cfg.to_dict(), sort_keys=False))


def record_metrics(trial, task: str, metric: str, m: dict) -> None:
    """The trial's validation figures the leaderboard shows (val_accuracy, val_mse, ...), from eval_* metrics."""
    for name in leaderboard.metric_names(task, metric):
        trial.set_user_attr(f"val_{name}", m[f"eval_{name}"])


def reporter(setup: Setup, trial, t0: float):
    """train()'s on_evaluate for this trial: the best validation so far on the trial, the comparable ones reported
    to the pruner (which may stop the trial)."""
    import optuna

    key = f"eval_{setup.metric}"
    best = {"value": None}

    def on_evaluate(step: int, m: dict) -> None:
        value = m[key]
        trial.set_user_attr("steps", step)
        trial.set_user_attr("wall_s", round(time.perf_counter() - t0, 1))
        if not m["final_ranks"]:  # AdaLoRA's warm-up and pruning phases dip by design: not comparable
            return
        if improves(value, best["value"], setup.metric):
            best["value"] = value
            record_metrics(trial, setup.cfg.data.task, setup.metric, m)
        trial.report(value, step)
        if trial.should_prune():
            trial.set_user_attr("prune_reason", f"{setup.pruner_name} pruner at step {step}: {key} {value:.4f}")
            raise optuna.TrialPruned()

    return on_evaluate


def objective(setup: Setup, trial) -> float:
    import optuna

    from budgetune.training.train import train

    t0 = time.perf_counter()
    try:
        cfg = trial_config(setup, trial)
        gate_trial(setup, trial, cfg)
        # the objective is the raw adapter's validation metric: choosing an adapter scale (5 more validation
        # passes) is left to the run trained from best.yaml, which keeps the base config's robust_tolerance
        trial_cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, robust_tolerance=None,
                                                                       inference_precision_tolerance=None))
        result = train(trial_cfg, splits=setup.splits, on_evaluate=reporter(setup, trial, t0))
        value = float(result["best_metric"])
        if not math.isfinite(value):
            raise TrainingError(f"validation {setup.metric} is {value}")
    except optuna.TrialPruned:
        raise
    except (Interrupted, KeyboardInterrupt) as e:
        trial.set_user_attr("error", f"{INTERRUPTED}: {e}"[:500])
        trial.study.enqueue_trial(trial.params)  # the same point is tried again when the search continues
        trial.study.stop()
        setup.flags["interrupted"] = True
        raise Interrupted(str(e)) from None
    except Exception as e:  # recorded on the trial; the search goes on with the next one
        trial.set_user_attr("error", f"{type(e).__name__}: {e}"[:500])
        raise
    finally:
        trial.set_user_attr("wall_s", round(time.perf_counter() - t0, 1))
    record_metrics(trial, setup.cfg.data.task, setup.metric, result)
    return value


def prune_run_folders(study, out: Path, keep_top_k: int) -> None:
    """Delete the run folders of finished trials outside the best keep_top_k complete ones (never a running one)."""
    import optuna

    S = optuna.trial.TrialState
    done = study.get_trials(deepcopy=False, states=(S.COMPLETE,))
    reverse = study.direction == optuna.study.StudyDirection.MAXIMIZE
    keep = {t.number for t in sorted(done, key=lambda t: t.value, reverse=reverse)[:keep_top_k]}
    for t in study.get_trials(deepcopy=False, states=(S.COMPLETE, S.PRUNED, S.FAIL)):
        folder = out / "trials" / f"{t.number:04d}"
        if t.number not in keep and folder.exists():
            shutil.rmtree(folder, ignore_errors=True)


def progress_line(study, trial, n_trials: int) -> str:
    import optuna

    a = trial.user_attrs
    finished = len(study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,
                                                            optuna.trial.TrialState.PRUNED,
                                                            optuna.trial.TrialState.FAIL)))
    metric = a.get("metric", "accuracy")
    value = a.get(f"val_{metric}")
    shape = f"{a.get('method', '?')} r{a.get('rank', '-')} {a.get('targets', '')} {a.get('head', '')}"
    lr = a.get("learning_rate")
    score = f"val {'acc' if metric == 'accuracy' else metric} {value:.4f}" if isinstance(value, float) else "no score"
    note = a.get("prune_reason") or a.get("error") or ""
    trainable = a.get("trainable")
    return (f"[{finished}/{n_trials}] trial {trial.number} {trial.state.name.lower()}: {shape} lr "
            f"{lr:.2e}: {score}, {trainable:,} trainable, {a.get('wall_s', 0):.0f} s" if isinstance(lr, float)
            and isinstance(trainable, int) else f"[{finished}/{n_trials}] trial {trial.number} "
            f"{trial.state.name.lower()}: {shape}") + (f" ({note})" if note else "")


def write_outputs(study, out: Path, test_file: str | None, metric: str, splits: Splits | None = None) -> dict:
    """leaderboard.csv/.md, pareto.png, best.yaml; the best's test metrics (once, after selection) when asked."""
    import optuna

    written = {"best_yaml": leaderboard.write_best_yaml(study, out)}
    extra = ""
    done = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
    if done:
        best = study.best_trial
        extra = (f"Best: trial {best.number}, validation {metric} {best.value:.4f} "
                 f"({'lower' if lower_is_better(metric) else 'higher'} is better), "
                 f"{best.user_attrs.get('trainable')} trainable parameters; re-train it with `budgetune train "
                 f"--config {out / 'best.yaml'}`.")
        run = out / "trials" / f"{best.number:04d}"
        if test_file and splits is not None and (run / "adapter").exists() and "config_yaml" in best.user_attrs:
            cfg = build_config(yaml.safe_load(best.user_attrs["config_yaml"]), f"trial {best.number}")
            written.update(evaluate_selected(run, cfg, splits, test_file, out))
            extra += "\n\n" + selected_test_text(test_file, written, splits.task)
    written["leaderboard"] = leaderboard.write_leaderboard(study, out, extra)
    written["pareto"] = leaderboard.write_pareto(study, out / "pareto.png")
    return written


def shipped_scale(run: Path, cfg: Config, splits: Splits) -> tuple[float, dict | None, str | None]:
    """The adapter scale the run trained from best.yaml records (what it ships): trials train without choosing one,
    so its robust rule (finish.choose_adapter_scale: scaling.auto_scale with cfg's robust_tolerance) is applied here
    to the selected trial's adapter on the same validation rows: (scale, {scale: accuracy}, None), or (1, None, why)
    where scaling.kept_as_trained says the retrain keeps scale 1 (the rule off, no adapter, or too few validation
    rows to resolve the tolerance)."""
    from budgetune.data.splits import cache_dir, scores
    from budgetune.inference.loading import load_for_inference
    from budgetune.inference.runner import table_logits
    from budgetune.modeling import scaling

    why = scaling.kept_as_trained(cfg.train.robust_tolerance, cfg.method.method, len(splits.validation.texts))
    if why is not None:
        return 1.0, None, why
    accelerator, model, tokenizer, info = load_for_inference(run, merge=False, adapter_scale=1.0)

    def validate() -> float:
        logits = table_logits(model, tokenizer, splits.validation, accelerator, cfg.train.per_device_eval_batch_size,
                              info["max_seq_length"], cache_dir(cfg), desc="validation")
        return scores(logits, splits)[tasks.SCALE_METRIC[splits.task]]

    return (*scaling.auto_scale(model, validate, scaling.AUTO_SCALES, cfg.train.robust_tolerance), None)


def evaluate_selected(run: Path, cfg: Config, splits: Splits, test_file: str, out: Path) -> dict:
    """The selected trial on the test file at the scale its best.yaml retrain ships (best_test_evaluation.*) and,
    when that is not 1, as trained (best_test_evaluation_as_trained.*)."""
    from budgetune.inference.evaluate import evaluate

    scale, table, why = shipped_scale(run, cfg, splits)
    shipped = evaluate(run, test_file, output=str(out / "best_test_evaluation"), adapter_scale=scale)
    raw = shipped if scale == 1 else evaluate(run, test_file, output=str(out / "best_test_evaluation_as_trained"),
                                               adapter_scale=1.0)
    return {"test": shipped, "test_as_trained": raw, "adapter_scale_validation": table, "adapter_scale_reason": why}


def test_figures(task: str, m: dict) -> str:
    """'accuracy 0.9100, macro-F1 0.9050' (single-label), else the task's headline (tasks.headline)."""
    if task == tasks.SINGLE_LABEL:
        return f"accuracy {m['accuracy']:.4f}, macro-F1 {m['macro_f1']:.4f}"
    return tasks.headline(task, m)


def selected_test_text(test_file: str, written: dict, task: str = tasks.SINGLE_LABEL) -> str:
    m, raw = written["test"], written["test_as_trained"]
    head = (f"Test ({test_file}), the selected trial evaluated once after the search (never used for selection): "
            f"{test_figures(task, m)} at adapter scale {m['adapter_scale']:g}, ")
    if written["adapter_scale_validation"] is None:
        return head + f"as trained (best.yaml's retrain chooses no scale: {written['adapter_scale_reason']})."
    return head + (f"the scale best.yaml's retrain chooses on validation and ships; as trained (scale 1): "
                   f"{test_figures(task, raw)}.")


def search(cfg: Config, *, search_group: dict | None = None, n_trials: int = 20, timeout: float | None = None,
           output_dir: str | Path = "runs/search", storage: str | None = None, study_name: str = "search",
           budget_cap: int | None = None, min_train_samples: int | None = None, min_steps: int | None = None,
           pruner: str = "hyperband", sampler: str = "tpe", sampler_seed: int | None = None, keep_top_k: int = 3,
           test_file: str | None = None, retry_failed: int = 0, verbose: bool = True):
    """Run (or join) a study of at most n_trials finished trials in all; returns the optuna Study.

    The space is refused before any training when nothing in it fits the budget. Test files are never read while
    searching; `test_file` (or cfg.data.test_file) is evaluated once on the selected trial at the end.
    """
    if pruner not in PRUNERS:
        raise ConfigError(f"--pruner must be one of {', '.join(PRUNERS)}, got {pruner!r}")
    if n_trials < 1 or keep_top_k < 1:
        raise ConfigError("--n_trials and --keep_top_k must be at least 1")
    for flag, value in (("--min_steps", min_steps), ("--min_train_samples", min_train_samples)):
        if value is not None and value < 1:
            raise ConfigError(f"{flag} must be at least 1, got {value}")
    cfg, cap, test_file = searched_config(cfg, budget_cap, test_file)
    dims = parse_search_group(search_group)
    out = Path(output_dir)
    splits = load_splits(cfg)  # test_file is cleared above: the splits hold no test table
    rows, names = len(splits.train.labels), splits.label_names
    if cfg.data.task != tasks.REGRESSION:  # a regression's label_names are its targets: no classes to fix
        cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, label_names=names))
    total = trial_steps(cfg, rows)
    space = build_space(cfg, len(names), dims, cap)  # BudgetError here: nothing has trained
    batch = cfg.train.per_device_train_batch_size * cfg.train.gradient_accumulation_steps
    low = min_steps or (math.ceil(min_train_samples / batch) if min_train_samples else max(1, total // 9))
    if low > total:
        raise ConfigError(f"--min_train_samples/--min_steps ({low} steps) exceeds a trial's {total} steps")
    metric = cfg.train.metric_for_best_model
    out.mkdir(parents=True, exist_ok=True)
    signature = {"dataset_name": cfg.data.dataset_name, "model_name_or_path": cfg.model.model_name_or_path,
                 "task": cfg.data.task, "metric_for_best_model": metric, "budget": cap, "trial_steps": total,
                 "space": sorted(f"{s.key}|{s.ranks}" for s in space.shapes),
                 "search": {k: [d.choices, d.low, d.high, d.log] for k, d in sorted(dims.items())}}
    study = open_study(study_name, (storage, out, retry_failed), sampler, sampler_seed,
                       make_pruner(pruner, low, total), metric, signature)
    start = base_point(space, cfg)
    if start is not None and not study.get_trials(deepcopy=False):
        study.enqueue_trial(start, skip_if_exists=True)  # trial 0 measures the base config at this fidelity
    for number in fail_dead_trials(study, retry_failed):
        print(f"trial {number}: its worker is gone (killed mid-trial): marked failed", file=sys.stderr)
    setup = Setup(cfg, space, out, len(names), total, metric, pruner, splits)
    if verbose:
        print(f"search {study_name!r}: {len(space.shapes)} adapter shapes fit {cap:,} trainable parameters; "
              f"{rows:,} training rows, {total} steps a trial, pruning from step {low} ({pruner}); "
              f"{'minimising' if lower_is_better(metric) else 'maximising'} validation {metric} ({cfg.data.task})"
              + ("; AdaLoRA trials are judged only on validations with their final rank pattern"
                 if any(s.method == "adalora" for s in space.shapes) else "")
              + f"; storage {storage or out / 'study.db'}", flush=True)
    run_trials(study, setup, n_trials, timeout, keep_top_k, test_file, verbose)
    return study


def searched_config(cfg: Config, budget_cap: int | None, test_file: str | None) -> tuple[Config, int, str | None]:
    """(the base config with the budget cap set and no test file, the cap, the test file evaluated at the end)."""
    cap = budget_cap if budget_cap is not None else cfg.budget.max_trainable_params
    if cap is None:
        raise ConfigError("search needs a budget: --budget 1M (or --max_trainable_params)")
    test_file = test_file or cfg.data.test_file
    if data_lib.has_split(cfg.data.dataset_name, "test", cfg.data.dataset_config_name):
        raise ConfigError(f"--dataset_name {cfg.data.dataset_name} has a test split, which training would read; "
                          "point --dataset_name at the training file and give the test file as --test_file")
    cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, test_file=None),
                              budget=dataclasses.replace(cfg.budget, max_trainable_params=cap))
    return cfg, cap, test_file


def make_sampler(sampler: str, seed: int | None):
    import optuna

    if sampler == "tpe":
        return optuna.samplers.TPESampler(seed=seed, constant_liar=True)
    if sampler == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    raise ConfigError(f"--sampler must be tpe or random, got {sampler!r}")


def open_study(study_name: str, storage: tuple[str | None, Path, int], sampler: str, sampler_seed: int | None,
               pruner, metric: str, signature: dict):
    """Create the study, or load it when another worker (or an earlier run) made it; `storage`: make_storage's
    arguments (the storage is opened once the sampler is known to be valid). A study continued with other settings
    (`signature`: data, model, task, metric, budget, trial length, space) is refused. A seeded sampler continuing a
    study is seeded past its trials (seed + their count): the same seed would draw the first trials' points again."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    make_sampler(sampler, sampler_seed)  # an unknown sampler is refused before the storage opens
    direction = "minimize" if lower_is_better(metric) else "maximize"
    study = optuna.create_study(study_name=study_name, storage=make_storage(*storage),
                                sampler=make_sampler(sampler, sampler_seed), pruner=pruner, direction=direction,
                                load_if_exists=True)
    if study.direction.name.lower() != direction:  # an earlier search of this study optimised another metric
        raise ConfigError(f"--study {study_name}: the stored study is to {study.direction.name.lower()} its "
                          f"metric, but --metric_for_best_model {metric} is to {direction}; name another study")
    check_signature(study, study_name, json.loads(json.dumps(signature)))
    done = len(study.get_trials(deepcopy=False))
    if done and sampler_seed is not None:
        study.sampler = make_sampler(sampler, sampler_seed + done)
    return study


def check_signature(study, study_name: str, signature: dict) -> None:
    """Record the search's settings on a new study; refuse to continue one stored with other settings, naming them
    (a study from before the record is continued unchecked)."""
    stored = study.user_attrs.get("budgetune_signature")
    if stored is None:
        if not study.get_trials(deepcopy=False):
            study.set_user_attr("budgetune_signature", signature)
        return
    differ = [k for k in signature if stored.get(k) != signature[k]]
    if differ:
        shown = "; ".join(f"{k}: stored {stored.get(k)!r}, now {signature[k]!r}"[:300] for k in differ)
        raise ConfigError(f"--study {study_name}: the stored study searched with other settings ({shown}); its "
                          "trials cannot be ranked with these. Name another study, or use the settings it had")


def run_trials(study, setup: Setup, n_trials: int, timeout: float | None, keep_top_k: int, test_file: str | None,
               verbose: bool) -> None:
    """Trials until the study has n_trials finished ones (or the timeout), then the outputs; Ctrl-C keeps them."""

    out = setup.out

    def after_trial(study, trial) -> None:
        prune_run_folders(study, out, keep_top_k)
        if verbose:
            print(progress_line(study, trial, n_trials), flush=True)
        if finished_trials(study) >= n_trials:  # several workers share the count
            study.stop()

    remaining = n_trials - finished_trials(study)
    interrupted = False
    try:
        if remaining > 0:
            study.optimize(lambda trial: objective(setup, trial), n_trials=remaining, timeout=timeout,
                           catch=(Exception,), gc_after_trial=True, callbacks=[after_trial])
    except KeyboardInterrupt:
        interrupted = True
    finally:
        prune_run_folders(study, out, keep_top_k)
        written = write_outputs(study, out, None if interrupted or setup.flags else test_file, setup.metric,
                                setup.splits)
    if interrupted or setup.flags.get("interrupted"):
        raise Interrupted(f"search interrupted; leaderboard: {written['leaderboard'][1]}. Run the same command "
                          "again to continue the study")
    if verbose:
        print(f"leaderboard: {written['leaderboard'][1]}\npareto: {written['pareto']}\nbest: {written['best_yaml']}")


INTERRUPTED = "interrupted"  # the start of the error a trial stopped by Ctrl-C or a signal records


def finished_trials(study) -> int:
    """Trials that count toward --n_trials: complete, pruned or failed, but not one stopped by an interruption
    (its point is queued again)."""
    import optuna

    S = optuna.trial.TrialState
    return sum(1 for t in study.get_trials(deepcopy=False, states=(S.COMPLETE, S.PRUNED, S.FAIL))
               if not str(t.user_attrs.get("error", "")).startswith(f"{INTERRUPTED}:"))


def load_search_config(config: str | None, overrides: list[str]) -> tuple[Config, dict | None]:
    """The base config (YAML <- flags) and the YAML's raw `search:` group, which Config does not know."""
    sections = load_yaml(config) if config else {}
    group = sections.pop("search", None)
    source = str(config) if config else "command line"
    if config:
        parse_search_group(group, source)
    return build_merged(sections, overrides, source), group
