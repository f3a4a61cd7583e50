"""What a training run holds while it runs: its position, its best adapter, and the objects setup built."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader

from budgetune.adalora import phases
from budgetune.budget.count import Breakdown
from budgetune.config import Config
from budgetune.data.splits import Splits
from budgetune.training.runlog import MetricsLog

LossFn = Callable[[torch.nn.Module, dict], torch.Tensor]


@dataclass
class TrainState:
    """Where the loop is; saved in every checkpoint (plain values only)."""

    step: int = 0
    epoch: int = 0
    batches_done: int = 0
    samples: int = 0
    best_metric: float | None = None
    best_step: int | None = None
    bad_evals: int = 0
    # the logging window a checkpoint falls inside: a resumed run's next train line averages the same steps
    window_loss: float | None = None
    window_n: int = 0
    window_first_step: int | None = None


@dataclass
class Best:
    """The best step's trainable tensors, AdaLoRA rank pattern and validation metrics."""

    state: dict[str, torch.Tensor] | None = None
    pattern: dict[str, list[bool]] | None = None
    metrics: dict[str, Any] | None = None


@dataclass
class Run:
    """Everything setup builds and the loop uses."""

    cfg: Config
    out: Path
    accelerator: Any
    splits: Splits
    tokenizer: Any
    model: Any  # as prepared by accelerate (DDP-wrapped under several processes)
    inner: Any  # the peft model itself
    optimizer: Any
    scheduler: Any
    sampler: Any
    train_loader: DataLoader
    val_loader: DataLoader
    log: MetricsLog
    live: Breakdown
    world: dict[str, int]  # processes, batches, steps: a resume must find the same
    schedule: phases.Schedule | None
    loss_fn: LossFn
    graphs: Any = None  # graphs.StepGraphs under --cuda_graphs where the step can be captured
    precision: Any = None  # devices.Precision: what the run computes in, and why
    options: dict[str, Any] = field(default_factory=dict)  # resolved training options (metrics.jsonl `options`)
    resume_hint: str | None = None  # how a stopped run continues (default: `budgetune train` on its config.yaml)
    loss_identity: dict[str, Any] | None = None  # what a recipe's loss_fn is made of: kept in checkpoints, checked

    @property
    def per_epoch(self) -> int:
        return self.world["steps_per_epoch"]

    @property
    def total_steps(self) -> int:
        return self.world["total_steps"]

    def epoch_of(self, step: int) -> float:
        return round(step / self.per_epoch, 4)
