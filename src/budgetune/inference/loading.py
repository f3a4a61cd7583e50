"""A saved adapter bundle, loaded with plain transformers + peft (as a user without budgetune would) for inference."""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from pathlib import Path

from budgetune.errors import AdapterError
from budgetune.hardware.devices import default_device_type, make_accelerator
from budgetune.inference import adapter_bundle, precisions
from budgetune.modeling import backbone, classifier_heads, fast_forward, methods, scaling


def adapter_dir(run_or_adapter: str | Path) -> Path:
    """A run folder -> its best adapter; an adapter folder -> itself."""
    p = Path(run_or_adapter)
    for cand in (p, p / "adapter"):
        # a full model (method full) has config.json where an adapter has adapter_config.json
        weights = (cand / "adapter_config.json").is_file() or (cand / "config.json").is_file()
        if weights and (cand / adapter_bundle.BUNDLE_FILE).is_file():
            return cand
    raise AdapterError(f"{p}: no adapter here (expected adapter_config.json and {adapter_bundle.BUNDLE_FILE}, "
                       "in the folder or in its adapter/ subfolder)")


def is_full_model(folder: Path) -> bool:
    """A bundle of a whole fine-tuned model (method full), not a peft adapter."""
    return not (folder / "adapter_config.json").is_file() and (folder / "config.json").is_file()


def load_full(folder: Path, info: dict):
    """A whole fine-tuned model (method full), loaded with plain transformers."""
    from transformers import AutoModelForSequenceClassification

    model = AutoModelForSequenceClassification.from_pretrained(folder)
    if info["head"] == "linear":  # transformers built the model's own head: put budgetune's back, with its weights
        from safetensors.torch import load_file

        classifier_heads.apply_head(model, "linear")
        saved = {k: v for f in sorted(folder.glob("model*.safetensors")) for k, v in load_file(f).items()}
        model.classifier.load_state_dict({k.removeprefix("classifier."): v for k, v in saved.items()
                                          if k.startswith("classifier.")})
    return model


def bundle_info(run_or_adapter: str | Path) -> dict:
    """The bundle's budgetune.json: label names, base model, head, max_seq_length, budget, metrics."""
    path = adapter_dir(run_or_adapter) / adapter_bundle.BUNDLE_FILE
    try:
        info = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise AdapterError(f"{path}: not valid JSON ({e})") from None
    check_thresholds(info, path)
    return info


def check_thresholds(info: dict, path: Path) -> None:
    """A multi-label bundle's `thresholds` ({label name: probability}) must name its labels and lie in [0, 1]: a
    hand-edited 50 (for 0.5) or a misspelt label would otherwise change every answer without a word. (A file that is
    not a JSON object, or without a list of label names, is left to the callers' own checks.)"""
    if not isinstance(info, dict) or not isinstance(info.get("label_names"), list):
        return
    recorded = info.get("thresholds")
    if recorded is None:
        return
    if not isinstance(recorded, dict):
        raise AdapterError(f"{path}: thresholds must map label names to probabilities, got {type(recorded).__name__}")
    names = info["label_names"]
    for name, value in recorded.items():
        if name not in names:
            raise AdapterError(f"{path}: thresholds[{name!r}]: not one of the bundle's label_names {names}")
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= 1:
            raise AdapterError(f"{path}: thresholds[{name!r}] must be a probability in [0, 1], got {value!r}")


def local_sources(run_or_adapter: str | Path) -> tuple[Path, ...]:
    """The folders an export of RUN reads: the run, its adapter and, for an adapter, its base model where that is a
    local (or packaged) folder. An export must never replace one of them."""
    folder = adapter_dir(run_or_adapter)
    found = [Path(run_or_adapter), folder]
    if not is_full_model(folder):
        base = Path(backbone.resolve_model_path(bundle_info(folder)["base_model_name_or_path"]))
        found += [base] if base.is_dir() else []
    return tuple(found)


def load_base_for(info: dict):
    """The bundle's base model with a fresh head of the right size (the adapter's saved head replaces it) and the
    task's problem_type."""
    base, _ = backbone.load_pretrained(info["base_model_name_or_path"], info["label_names"], info.get("revision"),
                                       problem_type=backbone.problem_type_of(info.get("task")))
    classifier_heads.apply_head(base, info["head"])
    return base


def bundle_task(info: dict) -> str:
    """The bundle's task (budgetune.tasks); bundles from before tasks are single_label."""
    return info.get("task") or "single_label"


def bundle_thresholds(info: dict) -> list[float] | None:
    """A multi-label bundle's per-label thresholds in label order (None: 0.5 for every label)."""
    recorded = info.get("thresholds")
    return None if not recorded else [float(recorded.get(n, 0.5)) for n in info["label_names"]]


def bundle_scale(info: dict, adapter_scale: float | None = None) -> float:
    """The adapter scale to apply: an explicit value, else the bundle's recorded default, else 1 (as trained)."""
    return scaling.check_scale(float(info.get("adapter_scale", 1.0) if adapter_scale is None else adapter_scale))


@contextlib.contextmanager
def readable(folder: Path) -> Iterator[None]:
    """A bundle whose weight files cannot be read (truncated, corrupt, another shape) is an AdapterError naming the
    folder, not a traceback."""
    from safetensors import SafetensorError

    try:
        yield
    except (SafetensorError, OSError, RuntimeError, ValueError, KeyError) as e:
        raise AdapterError(f"{folder}: the saved weights cannot be loaded ({type(e).__name__}: "
                           f"{str(e).splitlines()[0][:300] if str(e) else 'no detail'})") from e


def load_model(run_or_adapter: str | Path, merge: bool = True, adapter_scale: float | None = None):
    """(peft model in eval mode, tokenizer, bundle info); merged into the base weights for speed unless merge=False.

    The adapter is applied at `adapter_scale` (None: the bundle's recorded `adapter_scale`, or 1 when it has none);
    info["applied_adapter_scale"] says which.
    """
    from peft import PeftModel
    from transformers import AutoTokenizer

    folder = adapter_dir(run_or_adapter)
    info = bundle_info(folder)
    if is_full_model(folder):
        if adapter_scale not in (None, 1):
            raise AdapterError(f"{folder}: a fully fine-tuned model has no adapter to scale (--adapter_scale "
                               f"{adapter_scale})")
        with readable(folder):
            model = load_full(folder, info).eval()
        fast_forward.first_token_last_layer(model)
        info["applied_adapter_scale"], info["merged"] = 1.0, True  # no adapter: nothing left to merge
        return model, AutoTokenizer.from_pretrained(folder), info
    base = load_base_for(info)
    with readable(folder):
        model = PeftModel.from_pretrained(base, folder).eval()
    info["applied_adapter_scale"] = scale = bundle_scale(info, adapter_scale)
    if scale != 1:
        scaling.apply_scale(model, scale)  # before merging: the merge then carries the scale
    info["merged"] = merge and methods.merge_for_inference(model)
    fast_forward.first_token_last_layer(model)
    return model, AutoTokenizer.from_pretrained(folder), info


def load_for_inference(run_or_adapter: str | Path, merge: bool = True, adapter_scale: float | None = None,
                       precision: str = "auto", cache_dir: str | None = None):
    """(accelerator, model on its device, tokenizer, info), computing in `precision` (auto, fp32, bf16 or int8:
    inference.precisions.resolve; auto = the bundle's measured choice, else the hardware rule): printed, and in
    info["precision"] ({precision, mixed_precision, reason}). bf16 computes under the accelerator's autocast; int8
    by onnxruntime keeps its graph under `cache_dir` (None: ~/.cache/budgetune)."""
    precisions.check_choice(precision)
    model, tokenizer, info = load_model(run_or_adapter, merge=merge, adapter_scale=adapter_scale)
    chosen = precisions.resolve(precision, info, default_device_type(), merged=info["merged"])
    accelerator = make_accelerator(mixed_precision=chosen.mixed_precision)
    info["precision"] = chosen.to_dict()
    accelerator.print(chosen.line())
    model = precisions.prepare(model, chosen, tokenizer, cache_dir=cache_dir)  # onnxruntime's int8: another module
    # evaluation_mode: placed on the device, not wrapped in DDP (nothing trains; DDP refuses frozen models)
    return accelerator, accelerator.prepare_model(model, evaluation_mode=True), tokenizer, info
