"""budgetune: fine-tune a pretrained encoder for text classification under a hard budget of trainable parameters.

The public API (what the docs show; everything else may move):

    from budgetune import Config, resolve, train, evaluate, predict, count_trainable

    cfg = resolve("configs/minilm_agnews.yaml", ["--learning_rate", "1e-3"])
    result = train(cfg)

The functions are imported on first use, so `import budgetune` stays light.
"""

from __future__ import annotations

import importlib

from budgetune.config import Config, resolve

_LAZY = {
    "train": "budgetune.training.train",
    "evaluate": "budgetune.inference.evaluate",
    "predict": "budgetune.inference.predict",
    "count_trainable": "budgetune.budget.count",
}

__all__ = ["Config", "resolve", *_LAZY]


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'budgetune' has no attribute {name!r}")
