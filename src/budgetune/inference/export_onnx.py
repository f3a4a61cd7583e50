"""A run's merged model as ONNX (dynamic batch and sequence axes, label names in its metadata), optionally also
dynamically quantized to int8, for onnxruntime without torch, transformers, peft or budgetune."""

from __future__ import annotations

import inspect
import json
import warnings
from pathlib import Path

import numpy as np

from budgetune import fileio
from budgetune.errors import AdapterError, ConfigError
from budgetune.inference.export_merged import (
    check_batch,
    deployment_card,
    exported_info,
    logits_of,
    merged_model,
)

OPSET = 17  # LayerNormalization as one operator; onnxruntime >= 1.13 runs it
ONNX_TOLERANCE = 1e-3  # max |logit difference| of onnxruntime (fp32) against budgetune
QUANTIZE = ("int8",)
TRACE_TEXTS = ["a", "Markets close higher"]  # padded: the attention mask's path is traced
INPUTS = ("input_ids", "attention_mask", "token_type_ids")  # those of them the tokenizer returns and the model takes


def require_onnx() -> None:
    """onnx and onnxruntime are an optional extra: a clear error naming it where they are missing."""
    try:
        import onnx  # noqa: F401
        import onnxruntime  # noqa: F401
    except ImportError as e:
        raise ConfigError(f"--format onnx needs onnx and onnxruntime ({e.name} is not installed): "
                          "pip install 'budgetune[onnx]'") from None


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


def label_metadata(path: Path, meta: dict) -> None:
    """Put the label names (id2label, label2id as JSON) and the run's facts into the ONNX model's metadata_props."""
    import onnx

    model = onnx.load(str(path))
    labels = meta["label_names"]
    props = {"id2label": json.dumps({str(i): n for i, n in enumerate(labels)}),
             "label2id": json.dumps({n: i for i, n in enumerate(labels)}),
             "max_seq_length": str(meta["max_seq_length"]), "base_model": str(meta["base_model_name_or_path"]),
             "method": str(meta["method"]), "merged_adapter_scale": f"{meta['merged_adapter_scale']:g}",
             "task": str(meta.get("task") or "single_label"), "producer": "budgetune export --format onnx"}
    if meta.get("thresholds"):  # multi-label: a label is predicted where sigmoid(logit) reaches its threshold
        props["thresholds"] = json.dumps(meta["thresholds"])
    onnx.helper.set_model_props(model, props)
    onnx.save(model, str(path))


def ort_logits(path: Path, batch: dict) -> np.ndarray:
    """onnxruntime's logits for a tokenized batch (feeding the inputs the graph has)."""
    import onnxruntime

    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(None, {i.name: batch[i.name].numpy() for i in session.get_inputs()})[0]


def quantize_int8(source: Path, target: Path) -> None:
    """Weights int8, activations quantized dynamically per batch (onnxruntime's quantize_dynamic), after
    onnxruntime's recommended pre-processing (ONNX shape inference and graph optimization; its symbolic shape
    inference is skipped: it gives up on MiniLM's graph, "Incomplete symbolic shape inference")."""
    from onnxruntime.quantization import QuantType, quantize_dynamic
    from onnxruntime.quantization.shape_inference import quant_pre_process

    prepared = target.with_name(f".{target.stem}.prepared.onnx")
    quant_pre_process(str(source), str(prepared), skip_symbolic_shape=True)
    quantize_dynamic(str(prepared), str(target), weight_type=QuantType.QInt8)
    prepared.unlink()


def export_onnx(run: str | Path, output: str | Path, adapter_scale: float | None = None,
                quantize: str | None = None, overwrite: bool = False) -> Path:
    """Write RUN's merged model (at `adapter_scale`; None: the bundle's default) as OUTPUT/model.onnx with the
    tokenizer, config.json and a model card; quantize="int8" adds model_int8.onnx. Checked before it is put in
    place: onnxruntime must give budgetune's logits to 1e-3 (fp32); the int8 model's agreement is printed."""
    if quantize is not None and quantize not in QUANTIZE:
        raise ConfigError(f"--quantize must be {' or '.join(QUANTIZE)}, got {quantize!r}")
    out = fileio.refuse_nonempty(output, overwrite)
    require_onnx()
    model, tokenizer, info, source = merged_model(run, adapter_scale)
    batch = check_batch(tokenizer, info["max_seq_length"])
    expected = logits_of(model, batch).numpy()
    meta = exported_info(info, source, info["applied_adapter_scale"], "onnx")
    with fileio.atomic_dir(out) as tmp:
        # traced on two short texts, checked on other sizes and lengths: the axes must really be dynamic
        traced = check_batch(tokenizer, info["max_seq_length"], TRACE_TEXTS)
        write_graph(model, traced, input_names(model, tokenizer), tmp / "model.onnx")
        label_metadata(tmp / "model.onnx", meta)
        diff = float(np.abs(ort_logits(tmp / "model.onnx", batch) - expected).max())
        if not diff <= ONNX_TOLERANCE:
            raise AdapterError(f"export --format onnx: onnxruntime gives logits up to {diff:.2e} away from "
                               f"budgetune's (tolerance {ONNX_TOLERANCE:g}); nothing written")
        notes = [f"onnxruntime logits within {diff:.1e} of budgetune's"]
        if quantize == "int8":
            quantize_int8(tmp / "model.onnx", tmp / "model_int8.onnx")
            label_metadata(tmp / "model_int8.onnx", meta)
            got = ort_logits(tmp / "model_int8.onnx", batch)
            notes.append(f"model_int8.onnx: same class on {int((got.argmax(-1) == expected.argmax(-1)).sum())} of "
                         f"{len(got)} check texts, logits within {float(np.abs(got - expected).max()):.2g}")
        tokenizer.save_pretrained(tmp)
        model.config.save_pretrained(tmp)  # id2label for tools that read it (optimum's ORTModel)
        (tmp / "README.md").write_text(deployment_card(meta, "onnx"))
    print(f"wrote {out}: the {info['method']} adapter of {source} merged at scale {info['applied_adapter_scale']:g} "
          f"into model.onnx (opset {OPSET}; {'; '.join(notes)})")
    return out
