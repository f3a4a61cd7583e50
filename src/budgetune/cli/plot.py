"""`budgetune plot RUN`: a run folder's learning curves, rank allocation and confusion matrix, as PNG files."""

from __future__ import annotations

import argparse

from budgetune.cli.parsing import parse, parser


def plot_parser() -> argparse.ArgumentParser:
    p = parser("plot", "PNG plots of a run folder, into RUN/plots: loss, validation metrics, learning rate, AdaLoRA's "
               "rank allocation, self-training rounds and the confusion matrix, each where the run has its data; "
               "prints their paths.")
    p.add_argument("run", help="run folder")
    return p


def plot_command(argv: list[str]) -> int:
    from budgetune.training.plots import plot_run

    a = parse(plot_parser(), argv)
    for path in plot_run(a.run):
        print(path)
    return 0
