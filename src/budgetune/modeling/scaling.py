"""Scale a trained adapter back toward the pretrained model (WiSE-FT-style weight-space interpolation).

`apply_scale(model, s)` makes every adapted weight W_s = W + s * (W_trained - W): s = 0 is the base model, s = 1 the
adapter as trained, and the classification head (modules_to_save) stays as trained at every s. Per method:

- LoRA, AdaLoRA, LoHa, LoKr: the update is linear in peft's per-layer `scaling`, so s multiplies it (LoRA's and
  LyCORIS's own `set_scale`; AdaLoRA's scaling is lora_alpha, not alpha/r, so it is scaled from its trained value).
- VeRA: the update is linear in `vera_lambda_b`: it is multiplied by s.
- IA3: the weight is diag(l) W (or W diag(l)), so interpolating the weight is interpolating l toward 1.
- DoRA: the trained weight is m/||W + cBA|| * (W + cBA) row by row, not linear in anything; the interpolated row
  g W + s r c BA (r = m/||W + cBA||, g = 1 - s + s r) is written back in DoRA's own form: B's row times s r / g and
  the magnitude g ||W + c B'A||. Exact, and it merges like any DoRA adapter.

A merged model is unmerged, scaled and merged again. The trained values are kept on the model per adapter (a model
may hold several adapters on the same modules, as `serve` groups them), so any scale can follow any other, each
adapter is scaled from its own trained values, and scale 1 restores the trained adapter bit for bit.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence

import torch

from budgetune.errors import AdapterError, ConfigError

SCALE_ATTR = "budgetune_adapter_scale"  # the scale each adapter currently carries: {adapter name: scale}
TRAINED_ATTR = "budgetune_trained"  # trained values overwritten by a scale: {adapter name: {key: tensor or float}}
DEFAULT_SCALES = (0.0, 0.25, 0.5, 0.6, 0.75, 1.0)  # what a user plots first
# What the automatic choice tries: below 0.5 the measured validation loss is several points (issue 15's table).
AUTO_SCALES = (0.5, 0.6, 0.7, 0.8, 0.9, 1.0)
DEFAULT_TOLERANCE = 0.5  # points of validation accuracy; provisional until measured on the default recipe


def parse_scales(text: str | float | Sequence, flag: str = "--adapter_scale") -> list[float]:
    """'0,0.5,1' -> [0.0, 0.5, 1.0]; a value outside [0, 1] or not a number is refused naming the flag."""
    items = text.split(",") if isinstance(text, str) else list(text) if isinstance(text, (list, tuple)) else [text]
    out = []
    for item in items:
        try:
            value = float(item.strip() if isinstance(item, str) else item)
        except (TypeError, ValueError):
            raise ConfigError(f"{flag}: {item!r} is not a number (expected values in [0, 1], e.g. 0,0.5,1)") from None
        out.append(check_scale(value, flag))
    if not out:
        raise ConfigError(f"{flag}: no scale given (expected values in [0, 1], e.g. 0,0.5,1)")
    return out


def one_scale(text: str | None, verb: str) -> float | None:
    """A verb's single --adapter_scale (None when not given): a number in [0, 1], refused naming the flag."""
    if text is None:
        return None
    scales = parse_scales(text)
    if len(scales) != 1:
        raise ConfigError(f"--adapter_scale: {verb} takes one scale, got {text!r}")
    return scales[0]


def check_scale(value: float, flag: str = "--adapter_scale") -> float:
    if not (0.0 <= value <= 1.0):  # also refuses NaN
        raise ConfigError(f"{flag}: {value} is outside [0, 1] (0 = the base model, 1 = the adapter as trained)")
    return float(value)


def current_scale(model, adapter_name: str = "default") -> float:
    return model.__dict__.get(SCALE_ATTR, {}).get(adapter_name, 1.0)


def apply_scale(model, scale: float, adapter_name: str = "default") -> None:
    """Scale the adapter's weight update by `scale` in [0, 1] (merged or not); the head stays as trained."""
    scale = check_scale(float(scale))
    layers = adapter_layers(model, adapter_name)
    if not layers:
        raise AdapterError(f"no adapter named {adapter_name!r} in this model")
    trained = model.__dict__.setdefault(TRAINED_ATTR, {}).setdefault(adapter_name, {})
    merged = merged_adapters(model)
    if merged:
        model.unmerge_adapter()
    with torch.no_grad():
        for name, layer in layers:
            scale_layer(layer, name, adapter_name, scale, trained)
    if merged:
        model.merge_adapter(merged)  # the adapters that were merged, not whichever is active
    model.__dict__.setdefault(SCALE_ATTR, {})[adapter_name] = scale


def merged_adapters(model) -> list[str]:
    """The adapters merged into the model's weights (unmerging takes them all out; these go back)."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    return list(dict.fromkeys(a for m in model.modules() if isinstance(m, BaseTunerLayer)
                              for a in m.merged_adapters))


def adapter_layers(model, adapter_name: str) -> list[tuple[str, torch.nn.Module]]:
    from peft.tuners.tuners_utils import BaseTunerLayer

    return [(n, m) for n, m in model.named_modules()
            if isinstance(m, BaseTunerLayer) and adapter_name in _adapter_keys(m)]


def _adapter_keys(layer) -> set[str]:
    keys: set[str] = set()
    for attr in layer.adapter_layer_names:
        keys |= set(getattr(layer, attr).keys())
    return keys


def scale_layer(layer, name: str, a: str, s: float, trained: dict) -> None:
    """One adapted layer to scale s (from its trained values, kept in `trained` on first use)."""
    from peft.tuners.adalora.layer import AdaLoraLayer
    from peft.tuners.ia3.layer import IA3Layer
    from peft.tuners.lora.layer import LoraLayer
    from peft.tuners.lycoris_utils import LycorisLayer
    from peft.tuners.vera.layer import VeraLayer

    if isinstance(layer, IA3Layer):
        vec = _param(layer.ia3_l[a], f"{name}.ia3_l", trained)
        layer.ia3_l[a].copy_(vec if s == 1 else 1 + s * (vec - 1))
    elif isinstance(layer, VeraLayer):
        lam = _param(layer.vera_lambda_b[a], f"{name}.vera_lambda_b", trained)
        layer.vera_lambda_b[a].copy_(lam * s)
    elif isinstance(layer, LoraLayer) and a in getattr(layer, "lora_magnitude_vector", {}):
        _scale_dora(layer, name, a, s, trained)
    elif isinstance(layer, AdaLoraLayer):
        layer.scaling[a] = s * trained.setdefault(f"{name}.scaling", layer.scaling[a])
    elif isinstance(layer, (LoraLayer, LycorisLayer)):
        layer.set_scale(a, s)  # initial scale (alpha/r, per layer) times s
    else:
        raise AdapterError(f"{name}: cannot scale a {type(layer).__name__} adapter layer")


def _param(p: torch.Tensor, key: str, trained: dict) -> torch.Tensor:
    if key not in trained:
        trained[key] = p.detach().clone()
    return trained[key]


def _scale_dora(layer, name: str, a: str, s: float, trained: dict) -> None:
    from peft.utils.other import transpose

    B = layer.lora_B[a].weight
    mag = layer.lora_magnitude_vector[a].weight
    B1 = _param(B, f"{name}.lora_B", trained)
    m1 = _param(mag, f"{name}.lora_magnitude_vector", trained)
    if s == 1:
        B.copy_(B1)
        mag.copy_(m1)
        return
    W = transpose(layer.get_base_layer().weight, layer.fan_in_fan_out).float()
    A = layer.lora_A[a].weight.float()
    c = layer.scaling[a]

    def row_norm(b: torch.Tensor) -> torch.Tensor:
        return torch.linalg.norm(W + c * (b.float() @ A), dim=1)

    r = m1.float() / row_norm(B1)  # per output row: trained weight = r * (W + c B A)
    g = 1 - s + s * r
    if (g <= 0).any():
        raise AdapterError(f"{name}: DoRA magnitude is not positive; this adapter cannot be interpolated")
    new_B = B1.float() * (s * r / g)[:, None]
    B.copy_(new_B.to(B.dtype))
    mag.copy_((g * row_norm(B)).to(mag.dtype))


def bake_scale(model, adapter_name: str = "default") -> None:
    """Fold the current scale into the adapter's saved parameters (for export): saved weights then carry it.

    Methods scaled through peft's `scaling` (not saved) get s multiplied into one factor of their update and the
    scaling reset; the others already hold the scale in their parameters. Forward results do not change.
    """
    from peft.tuners.adalora.layer import AdaLoraLayer
    from peft.tuners.loha.layer import LoHaLayer
    from peft.tuners.lokr.layer import LoKrLayer
    from peft.tuners.lora.layer import LoraLayer

    s = current_scale(model, adapter_name)
    if s == 1:
        return
    if any(getattr(layer, "merged", False) for _, layer in adapter_layers(model, adapter_name)):
        raise AdapterError("bake_scale needs an unmerged model")
    with torch.no_grad():
        for name, layer in adapter_layers(model, adapter_name):
            if isinstance(layer, LoraLayer) and adapter_name in getattr(layer, "lora_magnitude_vector", {}):
                continue  # DoRA: B and the magnitude already carry it
            if isinstance(layer, AdaLoraLayer):  # update B (A * E) scaling / ranknum: linear in lora_B
                layer.lora_B[adapter_name].mul_(s)
            elif isinstance(layer, LoraLayer):  # update lora_B(lora_A(x)) scaling: lora_B's weight and bias
                for p in layer.lora_B[adapter_name].parameters():
                    p.mul_(s)
            elif isinstance(layer, LoHaLayer):
                layer.hada_w1_a[adapter_name].mul_(s)
            elif isinstance(layer, LoKrLayer):
                key = "lokr_w1" if adapter_name in layer.lokr_w1 else "lokr_w1_a"
                getattr(layer, key)[adapter_name].mul_(s)
            else:
                continue  # IA3, VeRA: the parameters hold the scale
            if isinstance(layer, AdaLoraLayer):
                layer.scaling[adapter_name] = model.__dict__[TRAINED_ATTR][adapter_name][f"{name}.scaling"]
            else:
                layer.set_scale(adapter_name, 1.0)
    model.__dict__[TRAINED_ATTR].pop(adapter_name, None)  # the baked values are the new "as trained"
    model.__dict__[SCALE_ATTR][adapter_name] = 1.0


def near_best(table: dict, tolerance: float) -> list:
    """The keys whose validation accuracy (a fraction) is within `tolerance` points (percent) of the best: the
    candidates of the robust rule (the smallest adapter scale here, the latest self-training round in selftrain)."""
    if not table:
        raise ValueError("near_best: no validation accuracies")
    if tolerance < 0:
        raise ConfigError(f"robust_tolerance: {tolerance} is negative (points of validation accuracy, e.g. 0.5)")
    best = max(table.values())
    return [k for k, acc in table.items() if (best - acc) * 100 <= tolerance + 1e-9]


def choose_scale(table: dict[float, float], tolerance: float) -> float:
    """The smallest scale whose validation accuracy (a fraction) is within `tolerance` points (percent) of the best."""
    return min(near_best(table, tolerance))


def auto_scale(model, validate: Callable[[], float], scales: Iterable[float] = AUTO_SCALES,
               tolerance: float = DEFAULT_TOLERANCE) -> tuple[float, dict[float, float]]:
    """Validate at each scale, choose with `choose_scale`; the model is left at scale 1 (as trained).

    Returns (chosen scale, {scale: validation accuracy}).
    """
    table: dict[float, float] = {}
    try:
        for s in sorted(set(parse_scales(list(scales), "robust scales"))):
            apply_scale(model, s)
            table[s] = float(validate())
    finally:
        apply_scale(model, 1.0)
    return choose_scale(table, tolerance), table


def scale_summary(chosen: float, table: dict[float, float], metric: str = "accuracy") -> str:
    """One line for the run's output: what was chosen and what it cost on validation (`metric`: what the table
    holds, the task's scale metric)."""
    raw = table.get(1.0, max(table.values()))
    change = (table[chosen] - raw) * 100
    return (f"adapter_scale {chosen:g} chosen: validation {metric} {table[chosen]:.2%} at {chosen:g} vs "
            f"{raw:.2%} as trained ({change:+.2f} points); --adapter_scale 1 restores the raw adapter")



def kept_as_trained(tolerance: float | None, method: str, rows: int) -> str | None:
    """Why an adapter keeps scale 1 without a choice (None: a scale is chosen on `rows` validation rows): the robust
    rule is off, there is no adapter to scale, or the split is too small to resolve the tolerance (`unresolved`).
    The one rule the end of training and search's test figure both apply."""
    if tolerance is None:
        return "as trained (--robust_tolerance null: no scale chosen)"
    if method == "full":
        return "as trained (method full: no adapter to scale)"
    too_few = unresolved(rows, tolerance)
    return None if too_few is None else f"kept as trained, because {too_few}"


def unresolved(rows: int, tolerance: float) -> str | None:
    """Why a validation split of `rows` rows cannot choose a scale within `tolerance` points (None: it can).

    One row weighs 100 / rows points. Where that is more than the tolerance, the only scales the split sees within
    it are exact ties with the best, and a tie may hide a loss of almost a row: all scales tie at 100 % on a small,
    easy split. Choosing then means nothing, so the adapter stays as trained.
    """
    if rows * tolerance >= 100 - 1e-9:
        return None
    need = f"at least {math.ceil(100 / tolerance - 1e-9)} rows" if tolerance > 0 else "a tolerance above 0"
    return (f"{rows} validation rows cannot resolve the {tolerance:g}-point --robust_tolerance (one row is "
            f"{100 / rows:.2f} points; choosing a scale needs {need})")


def scale_reason(chosen: float, table: dict[float, float], tolerance: float, metric: str = "accuracy") -> str:
    """Why `chosen` is the adapter's scale, in words (for a run's closing summary)."""
    raw = table.get(1.0, max(table.values()))
    restore = "; --adapter_scale 1 restores the raw adapter" if chosen != 1 else ""
    return (f"the smallest scale within {tolerance:g} points of the best validation {metric} ({table[chosen]:.2%} at "
            f"{chosen:g}, {raw:.2%} as trained){restore}")
