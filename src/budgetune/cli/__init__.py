"""The command line: the one place that parses argv, for every verb (`budgetune train`, `evaluate`, ...). Each
verb calls the library's functions; nothing below this package reads sys.argv."""

from budgetune.cli.commands import main

__all__ = ["main"]
