"""The public API at the top of the package: what the docs show, imported as a user would."""

from __future__ import annotations

import inspect

import pytest


def test_the_public_api_imports_from_the_top():
    from budgetune import Config, count_trainable, evaluate, predict, resolve, train
    from budgetune.budget.count import count_trainable as counted
    from budgetune.inference.evaluate import evaluate as evaluated
    from budgetune.inference.predict import predict as predicted
    from budgetune.training.train import train as trained

    assert (train, evaluate, predict, count_trainable) == (trained, evaluated, predicted, counted)
    assert isinstance(resolve(None, ["--learning_rate", "1e-3"]), Config)
    assert "cfg" in inspect.signature(train).parameters


def test_an_unknown_name_is_an_attribute_error():
    import budgetune

    with pytest.raises(AttributeError, match="no attribute 'trian'"):
        budgetune.trian  # noqa: B018
