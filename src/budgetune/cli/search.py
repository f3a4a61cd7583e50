"""`budgetune search`: the best adapter under the budget, found by Optuna; any other --flag is a training option
that sets the base of every trial."""

from __future__ import annotations

import argparse
import re

from budgetune.cli.parsing import parse_known, parser
from budgetune.errors import ConfigError


def search_parser() -> argparse.ArgumentParser:
    from budgetune.recipes.search.driver import PRUNERS
    from budgetune.recipes.search.search_space import HELP

    p = parser("search", "Find the best adapter under the parameter budget with Optuna. Any `budgetune train` "
               "option (e.g. --max_train_samples 2000) sets the base of every trial.",
               formatter_class=argparse.RawDescriptionHelpFormatter, epilog=HELP)
    p.add_argument("--config", help="base YAML (any train config), optionally with a search: group")
    p.add_argument("--budget", help="trainable-parameter cap, e.g. 1M (default: the config's max_trainable_params)")
    p.add_argument("--n_trials", type=int, default=20, help="finished trials in the study, all workers together")
    p.add_argument("--timeout", help="stop starting trials after this long (seconds, or 45m, 3h)")
    p.add_argument("--output_dir", default="runs/search", help="leaderboard, pareto.png, best.yaml, trials/NNNN")
    p.add_argument("--storage", help="a journal file (*.log) shared by workers on one machine, or a database URL "
                   "(postgresql://..., mysql://...) for many; default: sqlite OUTPUT_DIR/study.db")
    p.add_argument("--study", default="search", help="study name (workers with the same name and storage share it)")
    p.add_argument("--min_train_samples", type=int, help="training rows every trial sees before it can be pruned")
    p.add_argument("--min_steps", type=int, help="the same in optimizer steps")
    p.add_argument("--pruner", default="hyperband", choices=PRUNERS)
    p.add_argument("--sampler", default="tpe", choices=("tpe", "random"))
    p.add_argument("--sampler_seed", type=int, help="seed of the sampler (one worker: a reproducible search)")
    p.add_argument("--keep_top_k", type=int, default=3, help="run folders kept (the best trials); others deleted")
    p.add_argument("--test_file", help="labelled file evaluated once with the selected adapter at the end")
    p.add_argument("--retry_failed", type=int, default=0,
                   help="re-run a trial whose worker died this many times (default 0: record it failed, skip)")
    return p


def search_command(argv: list[str]) -> int:
    from budgetune.config import parse_count
    from budgetune.recipes.search.driver import load_search_config, search

    a, rest = parse_known(search_parser(), argv)
    cfg, group = load_search_config(a.config, rest)
    search(cfg, search_group=group, n_trials=a.n_trials, timeout=parse_duration(a.timeout), output_dir=a.output_dir,
           storage=a.storage, study_name=a.study, budget_cap=parse_count(a.budget, "--budget") if a.budget else None,
           min_train_samples=a.min_train_samples, min_steps=a.min_steps, pruner=a.pruner, sampler=a.sampler,
           sampler_seed=a.sampler_seed, keep_top_k=a.keep_top_k, test_file=a.test_file, retry_failed=a.retry_failed)
    return 0


def parse_duration(text: str | None) -> float | None:
    """'90', '45m', '3h' -> seconds."""
    if text is None:
        return None
    m = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]*)?|\.[0-9]+)\s*([smh]?)\s*", text)
    if not m:
        raise ConfigError(f"--timeout: expected seconds or a duration like 45m or 3h, got {text!r}")
    return float(m.group(1)) * {"": 1, "s": 1, "m": 60, "h": 3600}[m.group(2)]
