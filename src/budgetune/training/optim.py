"""The optimizer and learning-rate schedule a run's options choose: --optim (with --optim_args), --lr_scheduler_type
(with --lr_scheduler_kwargs), --warmup_steps / --warmup_ratio, as Hugging Face's Trainer builds them."""

from __future__ import annotations

from typing import Any

import torch

from budgetune.config import Config, TrainConfig
from budgetune.errors import ConfigError
from budgetune.modeling import methods

# Schedulers that step on a validation metric (after each evaluation), not after each optimizer step.
METRIC_SCHEDULERS = ("reduce_lr_on_plateau", "greedy")
# --optim_args keys per optimizer, as transformers' Trainer reads them (trainer_optimizer._get_sgd).
OPTIM_ARGS = {"sgd": {"momentum": float, "dampening": float, "nesterov": bool}}


def warmup_steps(t: TrainConfig, total_steps: int) -> int:
    """Warm-up optimizer steps: --warmup_steps when positive (Hugging Face's rule; a fraction below 1 of all steps),
    else --warmup_ratio of all steps; fractions round down, as budgetune's warmup always did."""
    if t.warmup_steps >= 1:
        return int(t.warmup_steps)
    return int((t.warmup_steps or t.warmup_ratio) * total_steps)


def param_groups(model, weight_decay: float) -> list[dict]:
    """Decay on projection matrices only (methods.decays): not on biases, norms or AdaLoRA's singular values."""
    decay, no_decay = [], []
    for n, p in model.named_parameters():
        if p.requires_grad:
            (decay if methods.decays(n, p) else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def optim_args(t: TrainConfig) -> dict[str, Any]:
    """--optim_args 'momentum=0.9,nesterov=true' -> keyword arguments of --optim's class; errors name the flag."""
    if not t.optim_args:
        return {}
    allowed = OPTIM_ARGS.get(t.optim, {})
    out: dict[str, Any] = {}
    for item in [s.strip() for s in t.optim_args.split(",") if s.strip()]:
        key, eq, value = item.partition("=")
        key = key.strip()
        if not eq or key not in allowed:
            keys = ", ".join(allowed) or "none"
            raise ConfigError(f"--optim_args: {item!r} is not KEY=VALUE with a key --optim {t.optim} takes "
                              f"(keys: {keys})")
        value = value.strip()
        if allowed[key] is bool:
            out[key] = value.lower() in ("true", "1", "yes")
            continue
        try:
            out[key] = float(value)
        except ValueError:
            raise ConfigError(f"--optim_args: {key} must be a number, got {value!r}") from None
    return out


def make_optimizer(cfg: Config, model, total_steps: int, device: torch.device, capturable: bool = False):
    """(optimizer, scheduler) for --optim and --lr_scheduler_type over total_steps optimizer steps.

    adamw_torch is torch's AdamW, fused on a GPU (as budgetune always trained); adamw_torch_fused the fused kernel on
    every device; adafactor is transformers' Adafactor with Hugging Face's Trainer settings (no relative step, no
    parameter scaling: the learning rate is --learning_rate); sgd is torch's SGD (no momentum unless --optim_args
    says). Under --cuda_graphs (captured or not, so that a fallback trains the same numbers) AdamW is fused and its
    learning rate a tensor on the device, which the scheduler fills in place: a captured step reads the current
    rate, where a float would stay the one captured. `capturable` (a GPU run whose step will be captured) keeps
    AdamW's step count on the device too.
    """
    t = cfg.train
    optimizer = build_optimizer(t, model, device, capturable)
    return optimizer, make_scheduler(t, optimizer, total_steps)


def build_optimizer(t: TrainConfig, model, device: torch.device, capturable: bool = False):
    """--optim's optimizer over the model's trainable parameters (make_optimizer)."""
    on_gpu = device.type == "cuda"
    groups = param_groups(model, t.weight_decay)
    extra = optim_args(t)
    if t.optim == "adafactor":
        from transformers.optimization import Adafactor

        optimizer = Adafactor(groups, lr=t.learning_rate, scale_parameter=False, relative_step=False)
    elif t.optim == "sgd":
        optimizer = torch.optim.SGD(groups, lr=t.learning_rate, **extra)
    else:
        lr = torch.tensor(t.learning_rate, device=device) if t.cuda_graphs else t.learning_rate
        fused = on_gpu or t.cuda_graphs or t.optim == "adamw_torch_fused"
        optimizer = torch.optim.AdamW(groups, lr=lr, fused=fused, capturable=on_gpu and capturable)
    return optimizer


def scheduler_kwargs(t: TrainConfig) -> dict[str, Any]:
    """--lr_scheduler_kwargs, with the direction of a metric-driven schedule following --metric_for_best_model
    (accuracy and macro-F1 improve upwards) unless the kwargs name a mode."""
    kwargs = dict(t.lr_scheduler_kwargs)
    if t.lr_scheduler_type in METRIC_SCHEDULERS:
        kwargs.setdefault("mode", "min" if t.metric_for_best_model == "loss" else "max")
    return kwargs


def make_scheduler(t: TrainConfig, optimizer, total_steps: int):
    """transformers.get_scheduler for --lr_scheduler_type; a keyword the schedule lacks or needs is refused, naming
    --lr_scheduler_kwargs."""
    from transformers import get_scheduler

    try:
        return get_scheduler(t.lr_scheduler_type, optimizer, num_warmup_steps=warmup_steps(t, total_steps),
                             num_training_steps=total_steps, scheduler_specific_kwargs=scheduler_kwargs(t))
    except (TypeError, ValueError) as e:
        raise ConfigError(f"--lr_scheduler_type {t.lr_scheduler_type} with --lr_scheduler_kwargs "
                          f"{t.lr_scheduler_kwargs or '{}'}: {e}") from None


def check_schedule(t: TrainConfig) -> None:
    """Build the optimizer and schedule on one dummy parameter: a bad --optim_args or --lr_scheduler_kwargs is
    refused before any data or weights load."""
    optimizer = build_optimizer(t, torch.nn.Linear(1, 1), torch.device("cpu"))
    make_scheduler(t, optimizer, 100)


def steps_on_metric(scheduler) -> bool:
    """Whether the schedule steps after each evaluation on the validation metric (reduce_lr_on_plateau, greedy)."""
    from transformers.optimization import GreedyLR

    return isinstance(scheduler, (torch.optim.lr_scheduler.ReduceLROnPlateau, GreedyLR))


def current_lr(scheduler, optimizer) -> float:
    """The learning rate of the first parameter group, as the schedule last set it."""
    lr = optimizer.param_groups[0]["lr"] if steps_on_metric(scheduler) else scheduler.get_last_lr()[0]
    return float(lr)
