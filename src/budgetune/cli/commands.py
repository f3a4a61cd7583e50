"""The command line: a thin dispatcher onto plain functions (train, evaluate, predict, plot, params, plan, demo)."""

from __future__ import annotations

import argparse
import importlib
import os
import sys
import textwrap
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

--verbose (anywhere on the line) also shows the libraries' own output: their warnings, weight-loading reports and
progress bars, hidden by default. `budgetune train --help` lists every training option.
"""


def config_verb(argv: list[str], verb: str, synopsis: str, extras: dict[str, str | None]):
    """Parse a verb that takes a config: `--config FILE`, its own `extras` and training overrides.

    extras maps a flag to its help, or to None for a flag without a value (like --json). Returns None after
    printing help, else (config file, overrides, {extra: value}). A flag missing its value is a usage error.
    """
    from budgetune.config import help_text

    if "-h" in argv or "--help" in argv:
        own = "".join(f"  --{k}{'' if h is None else ' VALUE'}\n      {h or 'a switch'}\n" for k, h in extras.items())
        print(f"budgetune {verb} {synopsis}\n\n{verb} options:\n  --config FILE\n      a YAML recipe (configs/)\n"
              f"{own}\ntraining options (the recipe's keys; flat or dotted):\n{help_text()}")
        return None
    rest, config, found = [], None, {}
    i = 0
    while i < len(argv):
        flag = argv[i]
        name = flag[2:] if flag.startswith("--") else None
        if name == "config" or name in extras and extras[name] is not None:
            if i + 1 >= len(argv) or argv[i + 1].startswith("--"):
                raise ConfigError(f"--{name} needs a value (budgetune {verb} --help)")
            if name == "config":
                config = argv[i + 1]
            else:
                found[name] = argv[i + 1]
            i += 2
            continue
        if name in extras:
            found[name] = True
        else:
            rest.append(flag)
        i += 1
    return config, rest, found


def cmd_train(argv: list[str]) -> int:
    from budgetune.config import resolve
    from budgetune.training.train import train

    if any(a == "--unlabeled_file" or a.startswith("--unlabeled_file=") for a in argv):
        # rounds of pseudo-labels on unlabelled target text
        from budgetune.recipes.selftrain import command as self_train

        return self_train(argv)
    parsed = config_verb(argv, "train", "[--config FILE] [--flag value ...]\n       budgetune train --config FILE "
                         "--unlabeled_file FILE [--self_training_rounds 2] [--pseudo_label_threshold 0.9] ...  "
                         "(self-training: see budgetune selftrain --help)", {})
    if parsed is None:
        return 0
    config_file, overrides, _ = parsed
    result = train(resolve(config_file, overrides))
    say_summary(result, [f"budgetune predict {result['output_dir']} --input TEXTS.csv --output predictions.csv",
                         f"budgetune evaluate {result['output_dir']} --data_file LABELLED.csv"])
    return 0


def say_summary(result: dict, next_steps: list[str], title: str = "done") -> None:
    """The closing summary (finish.summary), printed once (by the main process under a distributed launch)."""
    from budgetune.hardware.devices import is_main_process
    from budgetune.training.finish import summary

    if is_main_process():
        print(f"\n{title}\n" + textwrap.indent(summary(result, next_steps), "  "), flush=True)


def cmd_plot(argv: list[str]) -> int:
    from budgetune.training.plots import plot_run

    p = argparse.ArgumentParser(prog="budgetune plot")
    p.add_argument("run")
    a = p.parse_args(argv)
    for path in plot_run(a.run):
        print(path)
    return 0


NUM_LABELS_HELP = "classes of the task (default: the config's label_names, else 4)"


def cmd_params(argv: list[str]) -> int:
    from budgetune.budget.plan import params_command

    parsed = config_verb(argv, "params", "[--config FILE] [--num_labels N] [--json] [--flag value ...]",
                         {"num_labels": NUM_LABELS_HELP, "json": None})
    if parsed is None:
        return 0
    config, rest, extra = parsed
    return params_command(config, rest, bool(extra.get("json")), count_flag(extra, "num_labels"))


def cmd_plan(argv: list[str]) -> int:
    from budgetune.budget.plan import plan_command

    parsed = config_verb(argv, "plan", "[--config FILE] [--budget 1M] [--num_labels N] [--json] [--flag value ...]",
                         {"budget": "the cap to plan for (default: --max_trainable_params)",
                          "num_labels": NUM_LABELS_HELP, "json": None})
    if parsed is None:
        return 0
    config, rest, extra = parsed
    return plan_command(config, rest, extra.get("budget"), bool(extra.get("json")), count_flag(extra, "num_labels"))


def count_flag(values: dict, name: str) -> int | None:
    if name not in values:
        return None
    text = str(values[name])
    if not text.isdigit() or int(text) < 2:
        raise ConfigError(f"--{name} must be an integer of at least 2, got {text!r}")
    return int(text)


DEMO_VALIDATION_PERCENT = 25


def cmd_demo(argv: list[str]) -> int:
    """Train the default (packaged MiniLM, built-in headlines), evaluate, plot, and write a submission."""
    from budgetune.config import resolve
    from budgetune.inference.predict import predict
    from budgetune.training.train import train

    parsed = config_verb(argv, "demo", "[--config FILE] [--input FILE] [--flag value ...]",
                         {"input": "texts to predict (default: the course's Kaggle test set when ../shared has it, "
                                   "else the built-in headlines)"})
    if parsed is None:
        return 0
    config, overrides, extra = parsed
    # a quarter of the 480 built-in headlines validates (120 rows, not 48): its accuracy and choices mean more
    split = [] if config else ["--validation_split_percentage", str(DEMO_VALIDATION_PERCENT)]
    cfg = resolve(config, ["--output_dir", "runs/demo", "--overwrite_output_dir", "true", *split, *overrides])
    result = train(cfg)
    kaggle = Path("../shared/data/nyu_dlsp25_proj2/test_unlabelled.csv")
    source = extra.get("input") or (str(kaggle) if kaggle.exists() else None)
    if source is None:
        from budgetune.data.readers import builtin_path

        source = str(builtin_path())
    out = cfg.output.output_dir
    predict(out, source, str(Path(out) / "submission.csv"))
    say_summary(result, [f"budgetune serve {out}   (try it in a browser)",
                         "budgetune train --dataset_name YOURS.csv --output_dir runs/mine   (your own labelled "
                         "texts: a text and a label column)"], title=f"demo done: predictions in {out}/submission.csv")
    return 0


COMMANDS = {"train": cmd_train, "plot": cmd_plot, "params": cmd_params, "plan": cmd_plan, "demo": cmd_demo}
# Verbs whose module parses its own flags: `command(argv) -> int`, imported only when the verb runs.
MODULE_VERBS = {"evaluate": "inference.evaluate", "predict": "inference.predict", "export": "inference.export",
                "search": "recipes.search.driver", "serve": "serve.api", "distill": "recipes.distill",
                "selftrain": "recipes.selftrain"}
NO_MODEL_VERBS = ("plot",)  # never load a model: transformers is not even imported
VERBOSE = "--verbose"  # global: the libraries' own output too (budgetune.quiet)


def run_verb(command: str, argv: list[str]) -> int:
    if command in COMMANDS:
        return COMMANDS[command](argv)
    return importlib.import_module(f"budgetune.{MODULE_VERBS[command]}").command(argv)


def main(argv: list[str] | None = None) -> int:
    from budgetune.cli.quiet import library_output

    argv = sys.argv[1:] if argv is None else argv
    verbose = VERBOSE in argv
    argv = [a for a in argv if a != VERBOSE]
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE)
        return 0 if argv else 2
    command, rest = argv[0], argv[1:]
    if command not in COMMANDS and command not in MODULE_VERBS:
        print(f"budgetune: unknown command {command!r}\n\n{USAGE}", file=sys.stderr)
        return 2
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        with library_output(verbose, progress_bars=command not in NO_MODEL_VERBS):
            return run_verb(command, rest)
    except Interrupted as e:
        print(f"budgetune: {e}", file=sys.stderr)
        return 130
    except USER_ERRORS as e:
        print(f"budgetune: error: {e}", file=sys.stderr)
        return 2
