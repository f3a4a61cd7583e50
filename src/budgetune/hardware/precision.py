"""Frozen base weights stored in the compute dtype (issue 13, item 3).

Under bf16 autocast every `nn.Linear` casts its fp32 weight and bias to bf16 on every forward, and autocast caches
those casts only for leaf tensors that require grad: a frozen base re-casts every projection of every layer on every
step (hundreds of small kernels on a GPU). Casting the frozen Linear weights to bf16 once removes those casts;
autocast's own cast of an fp32 tensor rounds exactly as `.to(torch.bfloat16)` does, so the forward computes the same
numbers.

What stays fp32, and why:
* every parameter that trains (adapters, head): AdamW updates and keeps its state in fp32;
* everything under peft's `ModulesToSaveWrapper` (the head, trained or frozen): it is saved with the adapter, and
  a saved adapter must stay fp32 so that plain peft reloads it exactly;
* LayerNorm and embeddings: autocast runs layer_norm in fp32 (a bf16 weight would be cast *up* on every forward)
  and does not cast embedding lookups at all (a bf16 table would change the numbers, not save casts).
"""

from __future__ import annotations

import torch
from torch import nn

COMPUTE_DTYPES = {"bf16": torch.bfloat16}  # fp16 trains with a gradient scaler: its frozen base stays fp32


def compute_dtype(mixed_precision: str, enabled: bool) -> torch.dtype | None:
    """The dtype the frozen base is stored in for this run, or None to leave it as loaded."""
    return COMPUTE_DTYPES.get(mixed_precision) if enabled else None


def saved_with_adapter(model: nn.Module) -> set[int]:
    """ids of the parameters inside peft's ModulesToSaveWrapper (original and saved copies): never cast."""
    try:
        from peft.utils.other import ModulesToSaveWrapper
    except ImportError:  # pragma: no cover - peft is a dependency
        return set()
    return {id(p) for m in model.modules() if isinstance(m, ModulesToSaveWrapper) for p in m.parameters()}


def frozen_linear_params(model: nn.Module) -> list[nn.Parameter]:
    """The frozen floating-point weights and biases of the model's nn.Linear layers, outside the saved head."""
    keep = saved_with_adapter(model)
    out: list[nn.Parameter] = []
    for module in model.modules():
        if not isinstance(module, nn.Linear):
            continue
        for p in module.parameters(recurse=False):
            if not p.requires_grad and p.is_floating_point() and id(p) not in keep:
                out.append(p)
    return out


def store_frozen_in(model: nn.Module, dtype: torch.dtype | None) -> int:
    """Cast the frozen base Linear weights to `dtype` in place (once, before accelerator.prepare); how many."""
    if dtype is None:
        return 0
    params = frozen_linear_params(model)
    with torch.no_grad():
        for p in params:
            p.data = p.data.to(dtype)  # the same Parameter object: references (peft's base_layer) stay valid
    return len(params)


def dtypes_by_role(model: nn.Module) -> dict[str, set[torch.dtype]]:
    """{"trainable": dtypes, "frozen_linear": dtypes} of the model's parameters (for tests and the run's log)."""
    frozen = {id(p) for p in frozen_linear_params(model)}
    out: dict[str, set[torch.dtype]] = {"trainable": set(), "frozen_linear": set()}
    for p in model.parameters():
        if p.requires_grad:
            out["trainable"].add(p.dtype)
        elif id(p) in frozen:
            out["frozen_linear"].add(p.dtype)
    return out
