"""What a served run answers, per task (budgetune.tasks): the request, and the response models that the OpenAPI schema
describes. Single-label: the class, its id and the softmax per label (unchanged since the first serve). Multi-label:
the label set at the bundle's per-label thresholds and the sigmoid per label. Regression: one value per target,
named. A run trained on text pairs reads a `text_pair` per text.
"""

from __future__ import annotations

from typing import Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, StrictStr

from budgetune import tasks
from budgetune.errors import RequestError


class ClassifyRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", json_schema_extra={
        "examples": [{"texts": ["Stocks slide as oil prices jump"], "adapter": "my-run"}]})

    texts: list[StrictStr] = Field(min_length=1, description="texts to classify (at most --max_texts; each is cut "
                                   "to --max_chars characters, which the answer states)")
    adapter: StrictStr | None = Field(None, description="adapter name from /v1/adapters; may be left out when "
                                      "the server has a single adapter")
    text_pair: list[StrictStr] | None = Field(None, description="the second text of each pair, one per text in "
                                              "the same order (as transformers' tokenizer(text, text_pair)): "
                                              "required by a run trained with --text_pair_column_name, refused by "
                                              "any other; each is cut to --max_chars characters")


class Prediction(BaseModel):
    label: str
    label_id: int
    probabilities: list[float] = Field(description="one per label, in the order of `labels`")
    truncated: bool = Field(description="the text was cut to max_chars characters before it was classified")


class ClassifyResponse(BaseModel):
    """A single_label run's answer."""

    adapter: str
    labels: list[str]
    predictions: list[Prediction]
    max_chars: int
    truncated_texts: int = Field(description="how many texts were cut to max_chars characters")


class LabelSet(BaseModel):
    labels: list[str] = Field(description="the labels whose probability reaches their threshold (may be empty)")
    label_ids: list[int] = Field(description="their indices in `labels` of the response")
    probabilities: list[float] = Field(description="the sigmoid of each label, in the order of `labels`")
    truncated: bool = Field(description="the text (or its pair) was cut to max_chars characters")


class MultiLabelResponse(BaseModel):
    """A multi_label run's answer: a set of labels per text."""

    task: Literal["multi_label"] = Field("multi_label", description="always multi_label: tells this answer from the other "
                                 "tasks' (a single_label answer has no `task`)")
    adapter: str
    labels: list[str]
    thresholds: list[float] = Field(description="one per label, in the order of `labels`: tuned on validation and "
                                    "recorded in the run's bundle, as `budgetune predict` applies them")
    predictions: list[LabelSet]
    max_chars: int
    truncated_texts: int = Field(description="how many texts were cut to max_chars characters")


class Values(BaseModel):
    values: dict[str, float] = Field(description="the predicted value of each target, by the target's name")
    truncated: bool = Field(description="the text (or its pair) was cut to max_chars characters")


class RegressionResponse(BaseModel):
    """A regression run's answer: one value per target."""

    task: Literal["regression"] = Field("regression", description="always regression: tells this answer from the other "
                                 "tasks' (a single_label answer has no `task`)")
    adapter: str
    targets: list[str] = Field(description="the targets' names (the label columns the run was trained on)")
    predictions: list[Values]
    max_chars: int
    truncated_texts: int = Field(description="how many texts were cut to max_chars characters")


AnyResponse = ClassifyResponse | MultiLabelResponse | RegressionResponse


def check_pairs(payload: ClassifyRequest, adapter: str, pair_column: str | None) -> None:
    """A pair run needs one text_pair per text; a run of single texts takes none (422 naming `text_pair`)."""
    given = payload.text_pair
    if pair_column and given is None:
        raise RequestError(422, "text_pair", f"text_pair: adapter {adapter!r} was trained on text pairs (column "
                           f"{pair_column!r}); send one text_pair per text")
    if not pair_column and given is not None:
        raise RequestError(422, "text_pair", f"text_pair: adapter {adapter!r} reads single texts, not pairs; leave "
                           "text_pair out")
    if given is not None and len(given) != len(payload.texts):
        raise RequestError(422, "text_pair", f"text_pair: {len(given)} pairs for {len(payload.texts)} texts; send "
                           "one text_pair per text")


def answer(task: str, adapter: str, labels: list[str], logits: np.ndarray, cut: list[bool], max_chars: int,
           thresholds: list[float] | None = None) -> AnyResponse:
    """The response of the task for these logits [texts, outputs], as `budgetune predict` computes its outputs."""
    logits = logits[:, :len(labels)]
    common = {"adapter": adapter, "max_chars": max_chars, "truncated_texts": sum(cut)}
    if task == tasks.MULTI_LABEL:
        limits = tasks.thresholds_of(thresholds, len(labels))
        probs, hits = tasks.probabilities(task, logits), tasks.predictions(task, logits, limits)
        sets = [np.flatnonzero(row).tolist() for row in hits]
        return MultiLabelResponse(labels=labels, thresholds=limits.tolist(), **common, predictions=[
            LabelSet(labels=[labels[k] for k in ids], label_ids=ids, probabilities=p.tolist(), truncated=c)
            for ids, p, c in zip(sets, probs, cut)])
    if task == tasks.REGRESSION:
        values = tasks.predictions(task, logits)
        return RegressionResponse(targets=labels, **common, predictions=[
            Values(values=dict(zip(labels, row.tolist())), truncated=c) for row, c in zip(values, cut)])
    probs = tasks.probabilities(task, logits)
    ids = probs.argmax(-1)
    return ClassifyResponse(adapter=adapter, labels=labels, max_chars=max_chars, truncated_texts=sum(cut),
                            predictions=[Prediction(label=labels[i], label_id=int(i), probabilities=p.tolist(),
                                                    truncated=c) for i, p, c in zip(ids, probs, cut)])
