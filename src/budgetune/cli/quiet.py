"""Library chatter off: a command prints budgetune's own lines, unless --verbose.

transformers, peft, accelerate, datasets, huggingface_hub and torch print deprecation warnings, weight-loading
reports ("LOAD REPORT ... classifier.weight | MISSING": budgetune trains that head) and progress bars of their own
on every command. While a command runs, `library_output(verbose=False)` hides them: Python warnings raised outside
budgetune are ignored, those libraries' loggers pass errors only, and transformers' own progress bars (the weight
loader's) are off. Nothing that stops a command is hidden: exceptions propagate as before, a library's logged error
is still printed, and Hub download bars stay. Everything is put back when the command returns.
"""

from __future__ import annotations

import contextlib
import logging
import os
import warnings
from collections.abc import Iterator

# logger name -> the environment variable that sets its level when the library is first imported (None: none)
LIBRARY_LOGGERS = {"transformers": "TRANSFORMERS_VERBOSITY", "datasets": "DATASETS_VERBOSITY",
                   "huggingface_hub": "HF_HUB_VERBOSITY", "peft": None, "accelerate": None, "torch": None}
OWN_MODULES = r"budgetune(\.|$)"  # warnings raised by these are budgetune's own and stay


@contextlib.contextmanager
def library_output(verbose: bool, progress_bars: bool = True) -> Iterator[None]:
    """Within the block, libraries print errors only (verbose: everything, as the libraries choose).

    progress_bars=False leaves transformers' progress bars alone, for commands that never load a model (importing
    transformers to switch them off would cost more than the command).
    """
    if verbose:
        yield
        return
    with warnings.catch_warnings(), errors_only_loggers():
        warnings.filterwarnings("ignore")
        warnings.filterwarnings("default", module=OWN_MODULES)
        previous = no_transformers_bars() if progress_bars else None
        try:
            yield
        finally:
            if progress_bars:
                from transformers.utils import logging as hf_logging

                hf_logging.set_tqdm_hook(previous)


@contextlib.contextmanager
def errors_only_loggers() -> Iterator[None]:
    """The libraries' loggers at ERROR (and their verbosity variables, read when a library is first imported)."""
    levels = {name: logging.getLogger(name).level for name in LIBRARY_LOGGERS}
    env = {var: os.environ.get(var) for var in LIBRARY_LOGGERS.values() if var}
    try:
        for name, var in LIBRARY_LOGGERS.items():
            logging.getLogger(name).setLevel(logging.ERROR)
            if var:
                os.environ[var] = "error"
        yield
    finally:
        for name, level in levels.items():
            logging.getLogger(name).setLevel(level)
        for var, value in env.items():
            if value is None:
                os.environ.pop(var, None)
            else:
                os.environ[var] = value


def no_transformers_bars():
    """Switch off transformers' own progress bars (not the Hub's download bars); returns the hook to restore."""
    from transformers.utils import logging as hf_logging

    return hf_logging.set_tqdm_hook(lambda factory, args, kwargs: factory(*args, **{**kwargs, "disable": True}))
