"""AdaLoRA's rank pattern: its masks, the pattern read from a peft model, and scoring the model exactly as it is
saved (rows outside the pattern at zero)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch


def kept_ranks(peft_model, pattern: dict[str, list[bool]] | None) -> int:
    """Ranks an adapter with rank pattern `pattern` keeps, summed over its modules (before the first allocation,
    with no pattern: every row of every lora_E)."""
    if pattern:
        return sum(sum(bool(x) for x in mask) for mask in pattern.values())
    return sum(p.shape[0] for n, p in peft_model.named_parameters() if ".lora_E." in n)


def target_ranks(peft_model) -> int:
    """target_r times the adapted modules: what the final rank pattern keeps."""
    modules = sum(1 for n, _ in peft_model.named_parameters() if ".lora_E." in n)
    return peft_model.peft_config["default"].target_r * modules


def pattern_key(pattern: dict, name: str, adapter: str = "default") -> str:
    """The key of lora_E parameter `name` in a rank pattern: peft keys it `<module>.lora_E.<adapter>`, and drops
    the adapter name (`<module>.lora_E`) once the adapter was saved."""
    return name if name in pattern else name.replace(f".{adapter}", "")


def as_lists(pattern: dict | None) -> dict[str, list[bool]] | None:
    """A rank pattern's masks (tensors, arrays or lists) as lists of bools; None for an empty or absent pattern."""
    if not pattern:
        return None
    return {name: [bool(x) for x in (v.tolist() if hasattr(v, "tolist") else v)] for name, v in pattern.items()}


def _masks(peft_model) -> dict[str, torch.Tensor]:
    """lora_E parameter name (of the inner model) -> its current keep mask, from the config's rank pattern."""
    config = peft_model.peft_config["default"]
    pattern = getattr(config, "rank_pattern", None)  # LoRA has one too (ranks per module, not masks)
    if str(getattr(config, "peft_type", "")).upper().split(".")[-1] != "ADALORA" or not pattern:
        return {}
    out = {}
    for name, p in peft_model.base_model.model.named_parameters():
        if ".lora_E." not in name:
            continue
        mask = pattern.get(pattern_key(pattern, name))
        if mask is not None:
            out[name] = torch.as_tensor(mask, dtype=torch.bool, device=p.device).view(-1, 1)
    return out


@contextlib.contextmanager
def as_saved(peft_model) -> Iterator[None]:
    """Inside the block, the model computes what peft saves: lora_E rows outside the rank pattern are zero.

    Between two allocations AdamW moves pruned singular values away from zero, while save_pretrained keeps only
    the pattern's rows; evaluating the unmasked model would score a model that is never saved. The rows are put
    back on exit, so training continues exactly as peft's own loop would.
    """
    masks = _masks(peft_model) if hasattr(peft_model, "peft_config") else {}
    params = dict(peft_model.base_model.model.named_parameters()) if masks else {}
    kept = {n: params[n].detach().clone() for n in masks}
    with torch.no_grad():
        for n, mask in masks.items():
            params[n].masked_fill_(~mask, 0.0)
    try:
        yield
    finally:
        with torch.no_grad():
            for n, value in kept.items():
                params[n].copy_(value)


def rank_pattern_masks(peft_model) -> dict[str, list[bool]] | None:
    """AdaLoRA's current rank masks per adapted module (None before the first allocation or for other methods)."""
    pcfg = peft_model.peft_config.get("default") if hasattr(peft_model, "peft_config") else None
    return as_lists(getattr(pcfg, "rank_pattern", None))


def rank_pattern(peft_model) -> dict[str, int] | None:
    """AdaLoRA's current rank per adapted module (None before the first allocation or for other methods)."""
    masks = rank_pattern_masks(peft_model)
    # peft keys the pattern "<module>.lora_E.default" or, once an adapter was saved, "<module>.lora_E": one name each.
    return {name.replace(".default", "").removesuffix(".lora_E"): sum(m) for name, m in masks.items()} if masks else None
