"""Every error a user can cause, in one place: each message names the flag, file, line or folder to fix.

The CLI prints these as `budgetune: error: ...` (exit 2); anything else is a bug and keeps its traceback.
"""

from __future__ import annotations


class ConfigError(ValueError):
    """A configuration the user must fix; the message names the flag or file key."""


class DataError(ValueError):
    """Bad input data; the message names the file and, where it applies, line/row and column."""


class UnsafePickleError(DataError):
    """The pickle asks for a global outside the allow-list; raised before that global is ever loaded."""


class BudgetError(ValueError):
    """Over the budget; the message has the count, the breakdown table and overrides that fit."""

    def __init__(self, message: str, breakdown=None, suggestions: list[dict] | None = None):
        super().__init__(message)
        self.breakdown = breakdown  # a budget.Breakdown
        self.suggestions = suggestions or []


class CountMismatchError(BudgetError):
    """The live model's trainable parameters differ from the config-only count (a bug, not a user error)."""


class ModelLoadError(RuntimeError):
    """The base model could not be loaded; the message says how to point at a local copy."""


class RunFolderError(RuntimeError):
    """The output folder holds a run that would be overwritten."""


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be resumed from; the message names the folder and what differs."""


class AdapterError(RuntimeError):
    """A run folder or adapter folder that cannot be used; the message names it."""


class TrainingError(RuntimeError):
    """The run cannot go on (non-finite loss, out of memory); the message names the step and what to do."""


class RequestError(ValueError):
    """A bad request to `budgetune serve`: answered with its HTTP status and a JSON body naming the field."""

    def __init__(self, status: int, field: str | None, message: str, errors: list[dict] | None = None,
                 kind: str | None = None):
        super().__init__(message)
        self.status, self.field, self.kind = status, field, kind  # kind: the body's `error` (default: by status)
        self.errors = errors or [{"field": field, "message": message}]


class Interrupted(RuntimeError):
    """SIGINT/SIGTERM: a checkpoint was written; the message says how to resume."""


USER_ERRORS = (ConfigError, DataError, BudgetError, ModelLoadError, RunFolderError, CheckpointError, AdapterError,
               TrainingError, FileNotFoundError)
