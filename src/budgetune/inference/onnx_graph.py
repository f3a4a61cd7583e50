"""A torch model as an ONNX graph for onnxruntime: written (dynamic batch and sequence axes), quantized to int8, and
run. Shared by `budgetune export --format onnx` (inference.export_onnx) and `--precision int8`'s onnxruntime backend
(inference.ort_int8)."""

from __future__ import annotations

import inspect
import warnings
from pathlib import Path
from typing import NamedTuple

import numpy as np

from budgetune.errors import AdapterError
from budgetune.inference.export_merged import check_batch, logits_of

OPSET = 17  # LayerNormalization as one operator; onnxruntime >= 1.13 runs it
TRACE_TEXTS = ["a", "Markets close higher"]  # padded: the attention mask's path is traced
ONNX_TOLERANCE = 1e-3  # max |logit difference| of onnxruntime (fp32) against budgetune
INPUTS = ("input_ids", "attention_mask", "token_type_ids")  # those of them the tokenizer returns and the model takes
# Weights quantized per output channel (one scale per row of a weight matrix, as torch's dynamic quantization
# does): on the real MiniLM (AG News, bench/results/cpu_infer_precision_ort.txt) it agreed with fp32 on more
# validation texts than one scale per tensor did, at the same speed.
PER_CHANNEL = True


def missing_module() -> str | None:
    """The name of the module of the `[onnx]` extra (onnx, onnxruntime) this Python cannot import; None: both can."""
    try:
        import onnx  # noqa: F401
        import onnxruntime  # noqa: F401
    except ImportError as e:
        return e.name or "onnxruntime"
    return None


def input_names(model, tokenizer) -> list[str]:
    """The graph's inputs: the tokenizer's outputs that the model's forward takes (token_type_ids where it does)."""
    takes = inspect.signature(model.forward).parameters
    return [n for n in INPUTS if n in tokenizer.model_input_names and n in takes]


def write_graph(model, batch: dict, names: list[str], path: Path) -> None:
    """torch.onnx's TorchScript exporter (no onnxscript needed), traced on `batch` (padded, so that the attention
    mask's path is the one traced); batch and sequence axes dynamic."""
    import torch

    axes = {n: {0: "batch", 1: "sequence"} for n in names} | {"logits": {0: "batch"}}
    with warnings.catch_warnings():  # the legacy exporter's notice, tracing notes on shape checks (constants here)
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (), str(path), kwargs={n: batch[n] for n in names}, input_names=names,
                          output_names=["logits"], dynamic_axes=axes, opset_version=OPSET, dynamo=False)


class Checked(NamedTuple):
    """What write_checked compared: the check texts tokenized, the model's logits for them, and the largest
    |onnxruntime - model| difference."""

    batch: dict
    logits: np.ndarray
    diff: float


def write_checked(model, tokenizer, max_seq_length: int, path: Path, what: str) -> Checked:
    """Write the model's graph at `path`, traced on TRACE_TEXTS, and check it on export_merged's check texts (other
    sizes and lengths: the axes must really be dynamic): onnxruntime must give the model's logits to ONNX_TOLERANCE,
    else AdapterError starting with `what`."""
    traced = check_batch(tokenizer, max_seq_length, TRACE_TEXTS)
    write_graph(model, traced, input_names(model, tokenizer), path)
    batch = check_batch(tokenizer, max_seq_length)
    expected = logits_of(model, batch).numpy()
    diff = float(np.abs(ort_logits(path, batch) - expected).max())
    if not diff <= ONNX_TOLERANCE:
        raise AdapterError(f"{what}: onnxruntime gives logits up to {diff:.2e} away from budgetune's (tolerance "
                           f"{ONNX_TOLERANCE:g})")
    return Checked(batch, expected, diff)


def quantize_int8(source: Path, target: Path, per_channel: bool = PER_CHANNEL) -> None:
    """Weights int8, activations quantized dynamically per batch (onnxruntime's quantize_dynamic), after
    onnxruntime's recommended pre-processing (ONNX shape inference and graph optimization; its symbolic shape
    inference is skipped: it gives up on MiniLM's graph, "Incomplete symbolic shape inference")."""
    from onnxruntime.quantization import QuantType, quantize_dynamic
    from onnxruntime.quantization.shape_inference import quant_pre_process

    prepared = target.with_name(f".{target.stem}.prepared.onnx")
    try:
        quant_pre_process(str(source), str(prepared), skip_symbolic_shape=True)
        quantize_dynamic(str(prepared), str(target), weight_type=QuantType.QInt8, per_channel=per_channel)
    finally:
        prepared.unlink(missing_ok=True)


def session(path: Path, threads: int | None = None):
    """An onnxruntime CPU session of the graph at `path`; `threads` intra-op threads (None: onnxruntime's default)."""
    import onnxruntime

    opts = onnxruntime.SessionOptions()
    if threads is not None:
        opts.intra_op_num_threads, opts.inter_op_num_threads = threads, 1
    return onnxruntime.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def ort_logits(path: Path, batch: dict) -> np.ndarray:
    """onnxruntime's logits for a tokenized batch (feeding the inputs the graph has)."""
    s = session(path)
    return s.run(None, {i.name: batch[i.name].numpy() for i in s.get_inputs()})[0]
