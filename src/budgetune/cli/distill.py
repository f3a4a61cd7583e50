"""`budgetune distill` and `budgetune selftrain`: a budgeted student trained on big teachers' probabilities, and
rounds of confident pseudo-labels on unlabelled target texts. Any other --flag is a training option."""

from __future__ import annotations

import argparse

from budgetune.cli.parsing import parse_known, parser

UNLABELED_TEXT_COLUMN_HELP = "text column of --unlabeled_file (default: text, sentence, ...)"


def distill_parser() -> argparse.ArgumentParser:
    p = parser("distill", "Train a budgeted student (any budgetune configuration, any --task) on the teachers' outputs. "
               "Any other --flag is a training option (see `budgetune train --help`).")
    p.add_argument("--teacher", nargs="+", required=True, action="extend", metavar="RUN",
                   help="teacher run or bundle folder (adapter or full model); several: an ensemble (averaged "
                        "probabilities; regression: values)")
    p.add_argument("--config", help="the student's configuration YAML")
    p.add_argument("--unlabeled_file", help="unlabelled target texts to distil on (validation/test duplicates "
                                            "are dropped)")
    p.add_argument("--unlabeled_text_column", help=UNLABELED_TEXT_COLUMN_HELP)
    p.add_argument("--temperature", type=float, default=2.0,
                   help="temperature T of the softmax (multi-label: of each sigmoid); regression has none (default 2)")
    p.add_argument("--alpha", type=float, default=0.5,
                   help="weight of the gold-label loss (the task's: cross-entropy, BCE or MSE); 1 - alpha weighs the "
                        "teachers (default 0.5)")
    p.add_argument("--teacher_batch_size", type=int, default=None,
                   help="texts per teacher inference batch (default: --per_device_eval_batch_size)")
    return p


def distill_command(argv: list[str]) -> int:
    from budgetune.config import resolve
    from budgetune.recipes.distill import distill

    a, rest = parse_known(distill_parser(), argv)
    cfg = resolve(a.config, rest)
    distill(cfg, a.teacher, unlabeled_file=a.unlabeled_file, text_column=a.unlabeled_text_column,
            temperature=a.temperature, alpha=a.alpha, batch_size=a.teacher_batch_size)
    return 0


def selftrain_parser() -> argparse.ArgumentParser:
    p = parser("selftrain", "Train, then rounds of pseudo-labelling unlabelled texts and training a fresh student. "
               "Any other --flag is a training option (see `budgetune train --help`).")
    p.add_argument("--config", help="configuration YAML")
    p.add_argument("--unlabeled_file", required=True, help="unlabelled target texts (validation/test duplicates "
                                                           "are dropped)")
    p.add_argument("--unlabeled_text_column", help=UNLABELED_TEXT_COLUMN_HELP)
    p.add_argument("--self_training_rounds", type=int, default=2, help="rounds after round 0 (default 2)")
    p.add_argument("--pseudo_label_threshold", type=float, default=0.9,
                   help="keep a pseudo-label when its probability (multi-label: its confidence, the smallest margin "
                        "of a label's probability from its threshold) is at least this, in (0, 1); unused by "
                        "regression, which keeps every text (default 0.9)")
    p.add_argument("--pseudo_label_class_cap", type=float, default=1.5,
                   help="no class (multi-label: no label, and no empty set) may exceed its labelled share x this among "
                        "the kept pseudo-labels; unused by regression (default 1.5)")
    p.add_argument("--self_training_dropout", type=float, default=0.1,
                   help="adapter dropout (noise) from round 1 on, where the method has one (default 0.1)")
    p.add_argument("--round_tolerance", type=float, default=0.5,
                   help="the round kept (and labelling the next) is the latest whose validation metric is within "
                        "this many points of the best round's; 0: the best; not for loss, mse or mae, whose "
                        "lowest round is kept (default 0.5)")
    return p


def selftrain_command(argv: list[str]) -> int:
    from budgetune.config import resolve
    from budgetune.recipes.selftrain import self_train

    a, rest = parse_known(selftrain_parser(), argv)
    cfg = resolve(a.config, rest)
    self_train(cfg, a.unlabeled_file, a.self_training_rounds, a.pseudo_label_threshold,
               cap_factor=a.pseudo_label_class_cap, text_column=a.unlabeled_text_column,
               noise_dropout=a.self_training_dropout, round_tolerance=a.round_tolerance)
    return 0
