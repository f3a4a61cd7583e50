"""A saved adapter bundle, loaded with plain transformers + peft (as a user without budgetune would) for inference."""

from __future__ import annotations

import json
from pathlib import Path

from budgetune import artifacts, methods
from budgetune.devices import make_accelerator, mixed_precision
from budgetune.errors import AdapterError


def adapter_dir(run_or_adapter: str | Path) -> Path:
    """A run folder -> its best adapter; an adapter folder -> itself."""
    p = Path(run_or_adapter)
    for cand in (p, p / "adapter"):
        if (cand / "adapter_config.json").is_file() and (cand / artifacts.BUNDLE_FILE).is_file():
            return cand
    raise AdapterError(f"{p}: no adapter here (expected adapter_config.json and {artifacts.BUNDLE_FILE}, "
                       "in the folder or in its adapter/ subfolder)")


def bundle_info(run_or_adapter: str | Path) -> dict:
    """The bundle's budgetune.json: label names, base model, head, max_seq_length, budget, metrics."""
    path = adapter_dir(run_or_adapter) / artifacts.BUNDLE_FILE
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise AdapterError(f"{path}: not valid JSON ({e})") from None


def load_base_for(info: dict):
    """The bundle's base model with a fresh head of the right size (the adapter's saved head replaces it)."""
    from transformers import AutoModelForSequenceClassification

    names = info["label_names"]
    base = AutoModelForSequenceClassification.from_pretrained(
        methods.resolve_model_path(info["base_model_name_or_path"]), revision=info.get("revision"),
        num_labels=len(names), id2label=dict(enumerate(names)), label2id={n: i for i, n in enumerate(names)})
    methods.apply_head(base, info["head"])
    return base


def load_model(run_or_adapter: str | Path, merge: bool = True):
    """(peft model in eval mode, tokenizer, bundle info); merged into the base weights for speed unless merge=False."""
    from peft import PeftModel
    from transformers import AutoTokenizer

    folder = adapter_dir(run_or_adapter)
    info = bundle_info(folder)
    model = PeftModel.from_pretrained(load_base_for(info), folder).eval()
    if merge:
        methods.merge_for_inference(model)
    methods.first_token_last_layer(model)
    return model, AutoTokenizer.from_pretrained(folder), info


def load_for_inference(run_or_adapter: str | Path, merge: bool = True):
    """(accelerator, model on its device, tokenizer, info): bf16 on a GPU that has it, fp32 on CPU."""
    accelerator = make_accelerator(mixed_precision=mixed_precision("auto"))
    model, tokenizer, info = load_model(run_or_adapter, merge=merge)
    # evaluation_mode: placed on the device, not wrapped in DDP (nothing trains; DDP refuses frozen models)
    return accelerator, accelerator.prepare_model(model, evaluation_mode=True), tokenizer, info
