"""The command line: a thin dispatcher onto plain functions (train, evaluate, predict, plot, params, plan, demo)."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from budgetune.errors import USER_ERRORS, ConfigError, Interrupted

USAGE = """budgetune COMMAND [options]

commands:
  train     --config FILE [--flag value ...]   train an adapter under the parameter budget
  evaluate  RUN --data_file FILE               metrics of a run's best adapter on labelled data
  predict   RUN --input FILE --output FILE     Kaggle submission (ID,Label) for unlabelled texts
  export    RUN --adapter_scale A --output DIR  a peft adapter with its adapter scale baked in
  plot      RUN                                learning curves, rank allocation, confusion matrix
  params    --config FILE [--json]             exact trainable-parameter breakdown (no weights needed)
  plan      --config FILE --budget 1M          configurations that fit a budget
  search    --config FILE --budget 1M --n_trials 40   the best adapter under the budget (Optuna)
  serve     RUN [RUN ...] [--port 8000]        HTTP API + a page: many adapters on one base model
  distill   --teacher RUN [RUN ...] --config FILE [--unlabeled_file FILE]   a budgeted student from big teachers
  selftrain --config FILE --unlabeled_file FILE   rounds of confident pseudo-labels on unlabelled target texts
  demo      [--output_dir DIR]                 the whole job on the packaged MiniLM + built-in headlines

`budgetune train --help` lists every training option.
"""


def cmd_train(argv: list[str]) -> int:
    from budgetune.config import help_text, resolve
    from budgetune.train import train

    if "-h" in argv or "--help" in argv:
        print("budgetune train [--config FILE] [--flag value ...]\n\n" + help_text())
        return 0
    config_file = None
    if "--config" in argv:
        i = argv.index("--config")
        if i + 1 >= len(argv):
            raise ConfigError("--config needs a file")
        config_file = argv[i + 1]
        argv = argv[:i] + argv[i + 2:]
    train(resolve(config_file, argv))
    return 0


def cmd_evaluate(argv: list[str]) -> int:
    from budgetune.evaluate import command

    return command(argv)


def cmd_predict(argv: list[str]) -> int:
    from budgetune.predict import command

    return command(argv)


def cmd_export(argv: list[str]) -> int:
    from budgetune.export import command

    return command(argv)


def cmd_plot(argv: list[str]) -> int:
    from budgetune.plots import plot_run

    p = argparse.ArgumentParser(prog="budgetune plot")
    p.add_argument("run")
    a = p.parse_args(argv)
    for path in plot_run(a.run):
        print(path)
    return 0


def cmd_params(argv: list[str]) -> int:
    from budgetune.budget import params_command

    config, rest, as_json = _config_and_flags(argv)
    return params_command(config, rest, as_json, None)


def cmd_plan(argv: list[str]) -> int:
    from budgetune.budget import plan_command

    config, rest, as_json = _config_and_flags(argv)
    budget = None
    if "--budget" in rest:
        i = rest.index("--budget")
        budget = rest[i + 1] if i + 1 < len(rest) else None
        rest = rest[:i] + rest[i + 2:]
    return plan_command(config, rest, budget, as_json)


def _config_and_flags(argv: list[str]) -> tuple[str | None, list[str], bool]:
    argv = list(argv)
    as_json = "--json" in argv
    argv = [a for a in argv if a != "--json"]
    config = None
    if "--config" in argv:
        i = argv.index("--config")
        config = argv[i + 1]
        argv = argv[:i] + argv[i + 2:]
    return config, argv, as_json


def cmd_search(argv: list[str]) -> int:
    from budgetune.search import command

    return command(argv)


def cmd_serve(argv: list[str]) -> int:
    from budgetune.serve import command

    return command(argv)


def cmd_distill(argv: list[str]) -> int:
    from budgetune.distill import command

    return command(argv)


def cmd_selftrain(argv: list[str]) -> int:
    from budgetune.selftrain import command

    return command(argv)


def cmd_demo(argv: list[str]) -> int:
    """Train the default (packaged MiniLM, built-in headlines), evaluate, plot, and write a submission."""
    from budgetune.config import resolve
    from budgetune.predict import predict
    from budgetune.train import train

    p = argparse.ArgumentParser(prog="budgetune demo")
    p.add_argument("--output_dir", default="runs/demo")
    p.add_argument("--input", help="texts to predict (default: the course's Kaggle test set when ../shared has it, "
                   "else the built-in headlines)")
    a = p.parse_args(argv)
    cfg = resolve(None, ["--output_dir", a.output_dir, "--overwrite_output_dir", "true"])
    train(cfg)
    kaggle = Path("../shared/data/nyu_dlsp25_proj2/test_unlabelled.csv")
    source = a.input or (str(kaggle) if kaggle.exists() else None)
    if source is None:
        from budgetune.data import builtin_path

        source = str(builtin_path())
    predict(a.output_dir, source, str(Path(a.output_dir) / "submission.csv"))
    print(f"demo done: see {a.output_dir}/ (evaluation.txt, plots/, adapter/, submission.csv)")
    return 0


COMMANDS = {"train": cmd_train, "evaluate": cmd_evaluate, "predict": cmd_predict, "plot": cmd_plot,
            "params": cmd_params, "plan": cmd_plan, "demo": cmd_demo, "export": cmd_export, "search": cmd_search}
COMMANDS["serve"] = cmd_serve
COMMANDS.update(distill=cmd_distill, selftrain=cmd_selftrain)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE)
        return 0 if argv else 2
    command, rest = argv[0], argv[1:]
    if command not in COMMANDS:
        print(f"budgetune: unknown command {command!r}\n\n{USAGE}", file=sys.stderr)
        return 2
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        return COMMANDS[command](rest)
    except Interrupted as e:
        print(f"budgetune: {e}", file=sys.stderr)
        return 130
    except USER_ERRORS as e:
        print(f"budgetune: error: {e}", file=sys.stderr)
        return 2
