"""`budgetune train` and `budgetune demo`: a run from a recipe and training options, and the whole job on the
packaged MiniLM and the built-in headlines."""

from __future__ import annotations

import argparse
import textwrap
from pathlib import Path

from budgetune.cli.parsing import config_parser, parse_config_verb

DEMO_VALIDATION_PERCENT = 25


def train_parser() -> argparse.ArgumentParser:
    return config_parser("train", "budgetune train [--config FILE] [--flag value ...]\n       budgetune train "
                         "--config FILE --unlabeled_file FILE [--self_training_rounds 2] [--pseudo_label_threshold "
                         "0.9] ...  (self-training: see budgetune selftrain --help)",
                         "Train an adapter under the parameter budget: defaults <- the recipe <- the training "
                         "options given here.")


def train_command(argv: list[str]) -> int:
    from budgetune.config import resolve
    from budgetune.training.train import train

    if any(a == "--unlabeled_file" or a.startswith("--unlabeled_file=") for a in argv):
        # rounds of pseudo-labels on unlabelled target text
        from budgetune.cli.distill import selftrain_command

        return selftrain_command(argv)
    parsed = parse_config_verb(train_parser(), argv)
    if parsed is None:
        return 0
    a, overrides = parsed
    result = train(resolve(a.config, overrides))
    say_summary(result, [f"budgetune predict {result['output_dir']} --input TEXTS.csv --output predictions.csv",
                         f"budgetune evaluate {result['output_dir']} --data_file LABELLED.csv"])
    return 0


def say_summary(result: dict, next_steps: list[str], title: str = "done") -> None:
    """The closing summary (finish.summary), printed once (by the main process under a distributed launch)."""
    from budgetune.hardware.devices import is_main_process
    from budgetune.training.finish import summary

    if is_main_process():
        print(f"\n{title}\n" + textwrap.indent(summary(result, next_steps), "  "), flush=True)


def demo_parser() -> argparse.ArgumentParser:
    p = config_parser("demo", "budgetune demo [--config FILE] [--input FILE] [--flag value ...]",
                      "The whole job on the packaged MiniLM and the built-in headlines: train (into runs/demo unless "
                      "--output_dir says otherwise), evaluate, plot, and write a submission (submission.csv in the "
                      "run folder).")
    p.add_argument("--input", metavar="FILE", help="texts to predict (default: the course's Kaggle test set when "
                   "../shared has it, else the built-in headlines)")
    return p


def demo_command(argv: list[str]) -> int:
    """Train the default (packaged MiniLM, built-in headlines), evaluate, plot, and write a submission."""
    from budgetune.config import resolve
    from budgetune.inference.predict import predict
    from budgetune.training.train import train

    parsed = parse_config_verb(demo_parser(), argv)
    if parsed is None:
        return 0
    a, overrides = parsed
    # a quarter of the 480 built-in headlines validates (120 rows, not 48): its accuracy and choices mean more
    split = [] if a.config else ["--validation_split_percentage", str(DEMO_VALIDATION_PERCENT)]
    cfg = resolve(a.config, ["--output_dir", "runs/demo", "--overwrite_output_dir", "true", *split, *overrides])
    result = train(cfg)
    kaggle = Path("../shared/data/nyu_dlsp25_proj2/test_unlabelled.csv")
    source = a.input or (str(kaggle) if kaggle.exists() else None)
    if source is None:
        from budgetune.data.readers import builtin_path

        source = str(builtin_path())
    out = cfg.output.output_dir
    predict(out, source, str(Path(out) / "submission.csv"))
    say_summary(result, [f"budgetune serve {out}   (try it in a browser)",
                         "budgetune train --dataset_name YOURS.csv --output_dir runs/mine   (your own labelled "
                         "texts: a text and a label column)"], title=f"demo done: predictions in {out}/submission.csv")
    return 0
