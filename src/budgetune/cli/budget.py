"""`budgetune params` and `budgetune plan`: the exact trainable-parameter count of a configuration, and the
configurations that fit a budget; neither loads a weight."""

from __future__ import annotations

import argparse
import json

from budgetune import tasks
from budgetune.cli.parsing import config_parser, parse_config_verb
from budgetune.errors import ConfigError

NUM_LABELS_HELP = ("classes of the task, or labels of a multi_label task (default: the config's label_names, else 4); "
                   "a regression head has one output (--task regression)")


def params_parser() -> argparse.ArgumentParser:
    p = config_parser("params", "budgetune params [--config FILE] [--num_labels N] [--json] [--flag value ...]",
                      "The exact trainable-parameter breakdown of the configured model, counted without loading "
                      "weights; exit status 1 when it is over the budget (--max_trainable_params).")
    p.add_argument("--num_labels", metavar="N", help=NUM_LABELS_HELP)
    p.add_argument("--json", action="store_true", help="print the breakdown as JSON")
    return p


def params_command(argv: list[str]) -> int:
    parsed = parse_config_verb(params_parser(), argv)
    if parsed is None:
        return 0
    a, overrides = parsed
    return show_params(a.config, overrides, a.json, count_flag(a.num_labels, "num_labels"))


def plan_parser() -> argparse.ArgumentParser:
    p = config_parser("plan", "budgetune plan [--config FILE] [--budget 1M] [--num_labels N] [--json] "
                      "[--flag value ...]", "Every method x target set x head at its largest rank that fits the "
                      "budget, most trainable first (each with the flags that select it); exit status 1 when none "
                      "fits.")
    p.add_argument("--budget", help="the cap to plan for (default: --max_trainable_params)")
    p.add_argument("--num_labels", metavar="N", help=NUM_LABELS_HELP)
    p.add_argument("--json", action="store_true", help="print the configurations as JSON")
    return p


def plan_command(argv: list[str]) -> int:
    parsed = parse_config_verb(plan_parser(), argv)
    if parsed is None:
        return 0
    a, overrides = parsed
    return show_plan(a.config, overrides, a.budget, a.json, count_flag(a.num_labels, "num_labels"))


def count_flag(text: str | None, name: str) -> int | None:
    if text is None:
        return None
    if not text.isdigit() or int(text) < 2:
        raise ConfigError(f"--{name} must be an integer of at least 2, got {text!r}")
    return int(text)


def num_labels_of(cfg, num_labels: int | None) -> int:
    """The head's outputs: --num_labels, else the config's label_names, else 4; regression: one per target column
    (--label_column_name a,b: two)."""
    if cfg.data.task == "regression":
        if num_labels is not None:
            raise ConfigError("--num_labels: a --task regression head has one output per target column "
                              "(--label_column_name a,b: two); leave it out")
        return len(tasks.target_columns(cfg.data.task, cfg.data.label_column_name) or [None])
    return num_labels or (len(cfg.data.label_names) if cfg.data.label_names else 4)


def outputs_text(cfg, n: int) -> str:
    """'4 labels', '3 labels (multi_label)' or '1 target (regression)'."""
    if cfg.data.task == "regression":
        return f"{n} target{'s' if n > 1 else ''} (regression)"
    return f"{n} labels ({cfg.data.task})" if cfg.data.task != "single_label" else f"{n} labels"


def show_params(config: str | None, overrides: list[str], as_json: bool, num_labels: int | None = None) -> int:
    """`budgetune params`: the breakdown of the configured model; exit 1 when it is over the budget."""
    from budgetune.budget.count import config_breakdown
    from budgetune.budget.plan import resolve_auto_rank
    from budgetune.config import resolve

    cfg = resolve(config, overrides)
    n = num_labels_of(cfg, num_labels)
    cfg, message = resolve_auto_rank(cfg, n)
    bd = config_breakdown(cfg, n)
    if as_json:
        print(json.dumps({**bd.to_dict(), "num_labels": n, "task": cfg.data.task, "rank": cfg.method.rank,
                          "message": message}, indent=2))
    else:
        print("\n".join(filter(None, [message, f"{cfg.model.model_name_or_path}, {cfg.method.method}, "
                                               f"{outputs_text(cfg, n)}", bd.table()])))
    return 1 if bd.budget is not None and bd.total_trainable > bd.budget else 0


def show_plan(config: str | None, overrides: list[str], budget: str | None, as_json: bool,
              num_labels: int | None = None) -> int:
    """`budgetune plan`: what fits the budget (--budget, else --max_trainable_params); exit 1 if nothing does."""
    from budgetune.budget.plan import plan
    from budgetune.config import parse_count, resolve

    cfg = resolve(config, overrides)
    cap = parse_count(budget, "--budget") if budget is not None else cfg.budget.max_trainable_params
    if cap is None:
        raise ConfigError("plan needs a budget: --budget 1M (or --max_trainable_params)")
    if cap < 1:
        raise ConfigError(f"--budget must be a positive count, got {budget}")
    rows = plan(cfg, num_labels_of(cfg, num_labels), cap)
    if as_json:
        print(json.dumps({"budget": cap, "rows": rows}, indent=2))
    else:
        print(f"{len(rows)} configurations fit {cap:,} trainable parameters on {cfg.model.model_name_or_path}:")
        for r in rows:
            print(f"{r['trainable']:>12,}  {r['override']}")
    return 0 if rows else 1
