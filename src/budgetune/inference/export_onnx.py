"""A run's merged model as ONNX (dynamic batch and sequence axes, label names in its metadata), optionally also
dynamically quantized to int8, for onnxruntime without torch, transformers, peft or budgetune."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from budgetune import fileio, tasks
from budgetune.errors import ConfigError
from budgetune.inference.export_merged import deployment_card, exported_info, merged_model
from budgetune.inference.loading import bundle_thresholds, local_sources
from budgetune.inference.onnx_graph import (
    OPSET,
    missing_module,
    ort_logits,
    quantize_int8,
    write_checked,
)

QUANTIZE = ("int8",)


def require_onnx() -> None:
    """onnx and onnxruntime are an optional extra: a clear error naming it where they are missing."""
    if (missing := missing_module()) is not None:
        raise ConfigError(f"--format onnx needs onnx and onnxruntime ({missing} is not installed): "
                          "pip install 'budgetune[onnx]'")


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


def export_onnx(run: str | Path, output: str | Path, adapter_scale: float | None = None,
                quantize: str | None = None, overwrite: bool = False) -> Path:
    """Write RUN's merged model (at `adapter_scale`; None: the bundle's default) as OUTPUT/model.onnx with the
    tokenizer, config.json and a model card; quantize="int8" adds model_int8.onnx. Checked before it is put in
    place: onnxruntime must give budgetune's logits to 1e-3 (fp32); the int8 model's agreement is printed."""
    if quantize is not None and quantize not in QUANTIZE:
        raise ConfigError(f"--quantize must be {' or '.join(QUANTIZE)}, got {quantize!r}")
    out = fileio.refuse_nonempty(output, overwrite, reads=local_sources(run))
    require_onnx()
    model, tokenizer, info, source = merged_model(run, adapter_scale)
    meta = exported_info(info, source, info["applied_adapter_scale"], "onnx")
    with fileio.atomic_dir(out) as tmp:
        check = write_checked(model, tokenizer, info["max_seq_length"], tmp / "model.onnx",
                              "export --format onnx (nothing written)")
        label_metadata(tmp / "model.onnx", meta)
        notes = [f"onnxruntime logits within {check.diff:.1e} of budgetune's"]
        if quantize == "int8":
            quantize_int8(tmp / "model.onnx", tmp / "model_int8.onnx")
            label_metadata(tmp / "model_int8.onnx", meta)
            got = ort_logits(tmp / "model_int8.onnx", check.batch)
            notes.append(int8_note(got, check.logits, meta))
        tokenizer.save_pretrained(tmp)
        model.config.save_pretrained(tmp)  # id2label for tools that read it (optimum's ORTModel)
        (tmp / "README.md").write_text(deployment_card(meta, "onnx"))
    print(f"wrote {out}: the {info['method']} adapter of {source} merged at scale {info['applied_adapter_scale']:g} "
          f"into model.onnx (opset {OPSET}; {'; '.join(notes)})")
    return out


def int8_note(got: np.ndarray, want: np.ndarray, meta: dict) -> str:
    """How the int8 graph's answers on the check texts compare with fp32's, as the task reads its logits: the same
    class, the same label sets at the bundle's thresholds, or (regression) only how far the values are."""
    task, diff = meta.get("task") or tasks.SINGLE_LABEL, float(np.abs(got - want).max())
    if task == tasks.REGRESSION:
        return f"model_int8.onnx: values within {diff:.2g} of fp32's on {len(got)} check texts"
    a, b = (tasks.predictions(task, x, bundle_thresholds(meta)) for x in (got, want))
    same = int((a == b).reshape(len(a), -1).all(-1).sum())
    what = "the same label set" if task == tasks.MULTI_LABEL else "same class"
    return f"model_int8.onnx: {what} on {same} of {len(got)} check texts, logits within {diff:.2g}"
