"""`budgetune VERB ...`: the dispatcher. Each verb's module in this package parses its own flags (argparse) and
calls the library; here: the verb list, --verbose, and user errors printed in one line (exit 2)."""

from __future__ import annotations

import importlib
import os
import sys

from budgetune.errors import USER_ERRORS, Interrupted

USAGE = """budgetune COMMAND [options]

commands:
  train     --config FILE [--flag value ...]   train an adapter under the parameter budget
  evaluate  RUN --data_file FILE               metrics of a run's best adapter on labelled data
  predict   RUN --input FILE --output FILE     Kaggle submission (ID,Label) for unlabelled texts
  export    RUN --output DIR [--merge | --format onnx [--quantize int8]]   a peft adapter with its adapter
                                               scale baked in; merged into a transformers model; or ONNX
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


# verb -> the module of budgetune.cli that parses it: `VERB_command(argv) -> int` (and `VERB_parser()`), imported
# only when the verb runs
MODULE_VERBS = {"train": "train", "demo": "train", "params": "budget", "plan": "budget", "evaluate": "inference",
                "predict": "inference", "export": "inference", "plot": "plot", "search": "search", "serve": "serve",
                "distill": "distill", "selftrain": "distill"}
NO_MODEL_VERBS = ("plot",)  # never load a model: transformers is not even imported
VERBOSE = "--verbose"  # global: the libraries' own output too (cli/quiet.py)


def run_verb(verb: str, argv: list[str]) -> int:
    module = importlib.import_module(f"budgetune.cli.{MODULE_VERBS[verb]}")
    return getattr(module, f"{verb}_command")(argv)


def main(argv: list[str] | None = None) -> int:
    try:
        return dispatch(argv)
    except BrokenPipeError:  # the reader went away (`budgetune train --help | head`): stop without a traceback
        stdout_to_devnull()
        return 1


def dispatch(argv: list[str] | None) -> int:
    from budgetune.cli.quiet import library_output

    argv = sys.argv[1:] if argv is None else argv
    verbose = VERBOSE in argv
    argv = [a for a in argv if a != VERBOSE]
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE)
        return 0 if argv else 2
    command, rest = argv[0], argv[1:]
    if command not in MODULE_VERBS:
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


def stdout_to_devnull() -> None:
    """Point stdout at /dev/null, so that Python's flush at exit does not hit the closed pipe again (the recipe of
    Python's `signal` documentation for SIGPIPE)."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
