"""`--precision auto`'s choice, measured once when a training run finishes: each precision this machine computes in
(fp32, bf16, int8: inference.precisions) run over the run's validation split, its accuracy and texts/s; the fastest
whose accuracy is within the tolerance of fp32's is recorded in the bundle (budgetune.json `inference_precision`,
beside the adapter scale), with the table."""

from __future__ import annotations

import copy
import time
from collections.abc import Callable

import numpy as np
import torch
from torch import nn

from budgetune.hardware.devices import cpu_bf16_instructions, cpu_capabilities
from budgetune.inference import precisions

MEASURED = ("fp32", "bf16", "int8")  # the precisions --precision names, fp32 first (the reference)


def capability(device_type: str) -> str:
    """The hardware the table was measured on, in words (the speeds hold for it)."""
    if device_type != "cpu":
        return device_type
    caps = cpu_capabilities()
    vnni = "AVX512-VNNI" if caps.get("avx512_vnni") else ("AVX-VNNI" if caps.get("avx_vnni") else "no VNNI")
    return (f"CPU with {cpu_bf16_instructions() or 'no native bf16 matrix instructions'}, {vnni}, "
            f"int8 by {int8_by()}, {torch.get_num_threads()} threads")


def int8_by() -> str:
    """What computes int8 here, in words: onnxruntime (its version), or torch's engine."""
    backend = precisions.int8_backend()[0]
    if backend == "onnxruntime":
        import onnxruntime

        return f"onnxruntime {onnxruntime.__version__}"
    return f"torch (engine {precisions.int8_engine()})"


def measure(model: nn.Module, device: torch.device, logits_of: Callable[[nn.Module], np.ndarray],
            labels: np.ndarray, merged: bool = True, tokenizer=None, cache_dir: str | None = None) -> dict[str, dict]:
    """{precision: {accuracy, texts_per_s}} for each precision this device computes in, over the rows `logits_of`
    runs; int8's row also names its backend (onnxruntime or torch: precisions.int8_backend, what int8 means on
    this machine). `model` (fp32, adapter merged) is left as it is; each other precision runs on a copy (int8 by
    onnxruntime: its graph, built from the model and `tokenizer`, kept under `cache_dir`). Each pass is timed
    after one warm-up call on the same copy (kernels chosen, caches filled)."""
    table = {}
    for name in MEASURED:
        if precisions.unavailable(name, device.type, merged) is not None:
            continue
        try:
            table[name] = measure_one(model, device, logits_of, labels, name, tokenizer, cache_dir)
        except (RuntimeError, ValueError, TypeError, NotImplementedError) as e:
            if name == "fp32":
                raise
            # e.g. DeBERTa-v2 with LoHa under bf16 autocast: peft casts the layer's output back to fp32 and
            # transformers' mask fill overflows bf16. Such a precision is left out of auto's choice, with why.
            table[name] = {"error": f"{type(e).__name__}: {(str(e).splitlines() or [''])[0][:200]}"}
    return table


def measure_one(model: nn.Module, device: torch.device, logits_of: Callable[[nn.Module], np.ndarray],
                labels: np.ndarray, name: str, tokenizer=None, cache_dir: str | None = None) -> dict:
    """{accuracy, texts_per_s} of one precision (a warm-up call, then one timed call); int8's backend."""
    precision = precisions.named(name, "measured")
    backend = {"backend": precisions.int8_backend()[0]} if precision.int8 else {}
    candidate = model if name == "fp32" else precisions.prepare(copy.deepcopy(model), precision, tokenizer,
                                                                backend.get("backend"), cache_dir).to(device)
    with precisions.autocast(precision, device.type):
        logits_of(candidate)  # warm-up
        start = time.perf_counter()
        logits = logits_of(candidate)
        seconds = time.perf_counter() - start
    return {"accuracy": float(np.mean(logits.argmax(-1) == labels)),
            "texts_per_s": round(len(labels) / max(seconds, 1e-9), 1), **backend}


def choose(table: dict[str, dict], tolerance: float) -> tuple[str, str]:
    """(the fastest precision whose accuracy is within `tolerance` points of fp32's, why)."""
    ref = table["fp32"]
    for row in table.values():
        if "error" in row:
            row["within_tolerance"] = False
            continue
        row["within_tolerance"] = row["accuracy"] >= ref["accuracy"] - tolerance / 100 - 1e-12
        row["speedup"] = round(row["texts_per_s"] / max(ref["texts_per_s"], 1e-9), 2)
    best = max((n for n, row in table.items() if row["within_tolerance"]), key=lambda n: table[n]["texts_per_s"])
    row = table[best]
    if best == "fp32":
        return best, f"no faster precision within {tolerance:g} points of fp32's validation accuracy"
    by = f" (computed by {row['backend']})" if "backend" in row else ""
    return best, (f"the fastest{by} within {tolerance:g} points of fp32's validation accuracy: {row['speedup']:g}x "
                  f"fp32's texts/s, accuracy {row['accuracy']:.2%} against {ref['accuracy']:.2%}")


def record(model: nn.Module, device: torch.device, logits_of: Callable[[nn.Module], np.ndarray],
           labels: np.ndarray, tolerance: float, merged: bool = True, tokenizer=None,
           cache_dir: str | None = None) -> dict:
    """The bundle's `inference_precision` record: choice, reason, tolerance, where measured, and the table."""
    table = measure(model, device, logits_of, labels, merged, tokenizer, cache_dir)
    choice, reason = choose(table, tolerance)
    return {"choice": choice, "reason": reason, "tolerance": tolerance, "validation_rows": int(len(labels)),
            "measured_on": capability(device.type), "table": table}


def table_text(rec: dict) -> str:
    """The record as the lines a run prints at its end."""
    lines = [f"inference precision auto -> {rec['choice']}: {rec['reason']} ({rec['validation_rows']} validation "
             f"rows; {rec['measured_on']})"]
    lines += [f"  {name:5s} failed: {row['error']}" if "error" in row else
              f"  {name:5s} accuracy {row['accuracy']:.2%}  {row['texts_per_s']:9.1f} texts/s  x{row['speedup']:g}"
              + (f"  ({row['backend']})" if "backend" in row else "") for name, row in rec["table"].items()]
    return "\n".join(lines)
