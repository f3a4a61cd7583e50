"""The precision an inference computes in (`--precision auto|fp32|bf16|int8` of evaluate, predict and serve): what
`auto` picks for a bundle on this machine, and a loaded model made ready for it.

* fp32: as loaded.
* bf16: the encoder's Linear weights stored in bf16 once, computed under bf16 autocast (autocast would otherwise
  re-cast every fp32 weight on every forward); on a device without native bf16 it falls back to what the hardware
  rule picks, and says so.
* int8: the merged model with int8 weights and activations quantized per batch, CPU only, and only for a model
  whose adapter is merged into its base weights. Computed by onnxruntime where it is installed (the `[onnx]`
  extra: the model written once as an int8 ONNX graph, cached by its content, inference.ort_int8; 1.26x torch's
  int8 and 2.77x fp32 on MiniLM, bench/results/cpu_infer_precision_ort.txt), else by torch's dynamic quantization
  of the encoder's Linear layers (int8 weights per output channel; the x86/fbgemm engine uses AVX512-VNNI where the
  CPU has it; the classification head stays fp32). The header line says which.

`auto` = the choice the bundle records (`inference_precision` in budgetune.json, written when a training run
finishes by `inference.precision_choice`: the fastest precision whose validation accuracy is within
--inference_precision_tolerance points of fp32); a bundle without one follows the hardware rule of
`mixed_precision: auto` (bf16 on a CPU with native bf16 matrix instructions, else fp32). The environment variable
BUDGETUNE_MIXED_PRECISION overrides auto here as it does for training.
"""

from __future__ import annotations

import contextlib
import warnings
from pathlib import Path

import torch
from torch import nn

from budgetune.errors import ConfigError
from budgetune.hardware.devices import (
    Precision,
    auto_precision,
    cpu_bf16_instructions,
    forced_precision,
    resolve_precision,
)

PRECISIONS = ("auto", "fp32", "bf16", "int8")
RECORD_KEY = "inference_precision"  # the bundle's record of the measured choice
INT8_ENGINES = ("x86", "fbgemm", "qnnpack")  # torch's quantized CPU engines, best first
INT8_BACKENDS = ("onnxruntime", "torch")  # what computes --precision int8, preferred first
AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def check_choice(choice: str) -> str:
    if choice not in PRECISIONS:
        raise ConfigError(f"--precision must be one of {', '.join(PRECISIONS)}, got {choice!r}")
    return choice


def int8_engine() -> str | None:
    """The quantized engine torch runs int8 Linear layers with on this CPU, or None."""
    engines = torch.backends.quantized.supported_engines
    return next((e for e in INT8_ENGINES if e in engines), None)


def int8_backend() -> tuple[str, str]:
    """(what computes int8 here: onnxruntime or torch, in words for the header line)."""
    from budgetune.inference.onnx_graph import missing_module

    missing = missing_module()
    if missing is None:
        return "onnxruntime", "computed by onnxruntime (int8 weights per channel, activations quantized per batch)"
    return "torch", (f"computed by torch's dynamic quantization ({missing} is not installed; pip install "
                     "'budgetune[onnx]' for onnxruntime's int8, faster)")


def unavailable(name: str, device_type: str, merged: bool = True) -> str | None:
    """Why `name` cannot compute here (None: it can)."""
    if name == "bf16":
        if device_type == "cpu" and cpu_bf16_instructions() is None:
            return "this CPU has no native bf16 matrix instructions (AMX or AVX512-BF16): bf16 would be emulated"
        if device_type == "cuda" and not torch.cuda.is_bf16_supported():
            return "this GPU has no bf16"
        if device_type not in ("cpu", "cuda"):
            return f"no bf16 autocast on {device_type}"
    if name == "int8":
        if device_type != "cpu":
            return f"int8 (onnxruntime's or torch's dynamic quantization) runs on CPU only, not {device_type}"
        if int8_backend()[0] == "torch" and int8_engine() is None:
            return "onnxruntime is not installed and this torch has no quantized CPU engine"
        if not merged:
            return "int8 needs the adapter merged into the base weights, and this model runs unmerged"
    return None


def named(name: str, reason: str) -> Precision:
    """fp32, bf16, fp16 or int8 as a Precision (int8 computes without autocast; its reason says which backend)."""
    if name == "int8":
        return Precision("no", f"{reason}, {int8_backend()[1]}", int8=True)
    return Precision("no" if name == "fp32" else name, reason)


def resolve(choice: str, info: dict, device_type: str, merged: bool = True) -> Precision:
    """What an inference of the bundle `info` computes in on `device_type`, and why (its header line).

    An explicit precision this device or model cannot compute in falls back to what the hardware rule picks, and
    the reason says so.
    """
    check_choice(choice)
    if choice == "auto":
        forced, _ = forced_precision()
        if forced != "auto":  # BUDGETUNE_MIXED_PRECISION pins auto, as for training (the test suite: fp32)
            return resolve_precision("auto", device_type)
        if (chosen := recorded(info, device_type, merged)) is not None:
            return chosen
        hw = auto_precision(device_type)  # the hardware rule of mixed_precision: auto
        return Precision(hw.mixed_precision, f"{hw.reason} (the bundle records no measured choice: trained "
                                             "with --inference_precision_tolerance null or before it existed)")
    why_not = unavailable(choice, device_type, merged)
    if why_not is None:
        return named(choice, f"--precision {choice}")
    return hardware_rule(device_type, f"--precision {choice}, but {why_not}")


def hardware_rule(device_type: str, why: str) -> Precision:
    """`mixed_precision: auto`'s choice from the hardware alone, prefixed by `why`."""
    hw = auto_precision(device_type)
    return Precision(hw.mixed_precision, f"{why}; {hw.reason.removeprefix('auto: ')}")


def recorded(info: dict, device_type: str, merged: bool) -> Precision | None:
    """The bundle's measured choice if it can compute here, else the fastest other one within its tolerance that
    can; None without a record."""
    record = info.get(RECORD_KEY) or {}
    table = record.get("table") or {}
    if not table:
        return None
    choice = record.get("choice", "fp32")

    def why_not(name: str) -> str | None:  # also: int8 measured by one backend is not int8 by another
        measured = (table.get(name) or {}).get("backend")
        if name == "int8" and measured and unavailable(name, device_type, merged) is None \
                and measured != (here := int8_backend()[0]):
            return f"its int8 was measured with {measured}, and this machine computes int8 with {here}"
        return unavailable(name, device_type, merged)

    if why_not(choice) is None:
        return named(choice, f"auto: the bundle's measured choice ({record.get('reason', choice)})")
    ok = sorted((n for n, row in table.items() if row.get("within_tolerance") and why_not(n) is None),
                key=lambda n: -table[n]["texts_per_s"])
    fallback = ok[0] if ok else "fp32"
    return named(fallback, f"auto: the bundle's measured choice {choice} cannot compute here ({why_not(choice)}); "
                           f"{fallback} is the fastest other precision within its tolerance")


def encoder_linears(model: nn.Module) -> dict[str, nn.Linear]:
    """The nn.Linear layers of the model's encoder by qualified name: not the classification head (outside the
    encoder) and not an adapter's own layers (peft's lora_A, lora_B, ...; merged, they no longer compute)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    encoder = getattr(base, getattr(base, "base_model_prefix", ""), None)
    if not isinstance(encoder, nn.Module):
        return {}
    adapter_parts = set()
    for m in model.modules():
        for part in getattr(m, "adapter_layer_names", ()):  # peft's BaseTunerLayer
            sub = getattr(m, part, None)
            if isinstance(sub, nn.Module):
                adapter_parts.update(id(x) for x in sub.modules())
    inside = {id(m) for m in encoder.modules()}
    return {name: m for name, m in model.named_modules()
            if isinstance(m, nn.Linear) and id(m) in inside and id(m) not in adapter_parts}


def prepare(model: nn.Module, precision: Precision, tokenizer=None, backend: str | None = None,
            cache_dir: str | Path | None = None) -> nn.Module:
    """The model made ready to compute in `precision`: bf16 stores the encoder's Linear weights in bf16 (in place;
    run it under `autocast`); int8 returns onnxruntime's int8 model (inference.ort_int8: needs the tokenizer; its
    graph cached under `cache_dir`, None: ~/.cache/budgetune) or quantizes the encoder's Linear layers in place with
    torch's dynamic quantization, as `backend` says (None: int8_backend()); fp32 and fp16 leave it as is."""
    if precision.int8:
        backend = backend or int8_backend()[0]
        if backend not in INT8_BACKENDS:
            raise ValueError(f"int8 backend must be one of {', '.join(INT8_BACKENDS)}, got {backend!r}")
        if backend == "onnxruntime":
            from budgetune.inference.ort_int8 import int8_model

            if tokenizer is None:
                raise ValueError("int8 through onnxruntime needs the model's tokenizer (the graph's inputs)")
            return int8_model(model, tokenizer, cache_dir)
        return torch_int8(model)
    if precision.mixed_precision == "bf16":
        for layer in encoder_linears(model).values():
            layer.to(torch.bfloat16)
    return model


def torch_int8(model: nn.Module) -> nn.Module:
    """The encoder's Linear layers quantized in place by torch's dynamic quantization (int8 weights per output
    channel); the classification head and an adapter's own layers stay as they are."""
    from torch.ao.quantization import per_channel_dynamic_qconfig, quantize_dynamic

    torch.backends.quantized.engine = int8_engine()
    with warnings.catch_warnings():  # torch 2.13 announces that its quantized tensors move to torchao
        warnings.filterwarnings("ignore", message=r"torch\.quantize_per_tensor", category=UserWarning)
        warnings.filterwarnings("ignore", message=r"torch\.ao\.quantization is deprecated",
                                category=DeprecationWarning)
        quantize_dynamic(model, {name: per_channel_dynamic_qconfig for name in encoder_linears(model)},
                         dtype=torch.qint8, inplace=True)
    return model


def autocast(precision: Precision, device_type: str):
    """The autocast context `precision` computes under (none for fp32 and int8)."""
    dtype = AUTOCAST_DTYPES.get(precision.mixed_precision)
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type, dtype=dtype)
