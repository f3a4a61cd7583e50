"""What every verb's parser shares: argparse, with a flag missing its value refused in one line.

Every verb builds an `argparse.ArgumentParser` and parses with `parse` (all of argv is its own) or `parse_known`
(the rest are training options, handed to `config.resolve`). A config verb (train, demo, params, plan) starts from
`config_parser`: its --help prints the parser's help and then every training option (`config.help_text()`).
"""

from __future__ import annotations

import argparse

from budgetune.errors import ConfigError

TRAINING_OPTIONS = "training options (the recipe's keys; flat or dotted):"  # docs/hooks.py splits --help here
MISSING_VALUE = ("expected one argument", "expected at least one argument")


def parser(verb: str, description: str, **kwargs) -> argparse.ArgumentParser:
    """`budgetune VERB`'s parser: no abbreviated flags (a training option may share a prefix with a verb's own)."""
    return argparse.ArgumentParser(prog=f"budgetune {verb}", description=description, allow_abbrev=False,
                                   exit_on_error=False, **kwargs)


def config_parser(verb: str, usage: str, description: str) -> argparse.ArgumentParser:
    """A config verb's parser: -h/--help and --config FILE; the verb adds its own flags."""
    p = parser(verb, description, usage=usage, add_help=False)
    p.add_argument("-h", "--help", action="store_true", help="show this help message and exit")
    p.add_argument("--config", metavar="FILE", help="a YAML recipe (configs/)")
    return p


def parse_known(p: argparse.ArgumentParser, argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    """(the verb's own flags, the rest in order). A flag of the verb's missing its value is a one-line usage error
    (ConfigError: exit 2); any other mistake is argparse's usage error (exit 2)."""
    try:
        return p.parse_known_args(argv)
    except argparse.ArgumentError as e:
        if e.message in MISSING_VALUE:
            raise ConfigError(f"{e.argument_name} needs a value ({p.prog} --help)") from None
        p.error(str(e))
        raise  # pragma: no cover - p.error exits


def parse(p: argparse.ArgumentParser, argv: list[str]) -> argparse.Namespace:
    """parse_known, where every argument must be the verb's own."""
    a, rest = parse_known(p, argv)
    if rest:
        p.error(f"unrecognized arguments: {' '.join(rest)}")
    return a


def parse_config_verb(p: argparse.ArgumentParser, argv: list[str]) -> tuple[argparse.Namespace, list[str]] | None:
    """(the verb's own flags, training overrides for config.resolve), or None after printing --help."""
    from budgetune.config import help_text

    a, overrides = parse_known(p, argv)
    if a.help:
        print(f"{p.format_help()}\n{TRAINING_OPTIONS}\n{help_text()}")
        return None
    return a, overrides
