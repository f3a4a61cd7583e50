"""A run's adapter merged into its base weights: a plain transformers model folder (head, label names, tokenizer)
that `AutoModelForSequenceClassification.from_pretrained` loads without budgetune or peft."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from budgetune import fileio
from budgetune.errors import AdapterError
from budgetune.inference import adapter_bundle
from budgetune.inference.loading import adapter_dir, is_full_model, load_model, local_sources
from budgetune.modeling import classifier_heads, methods

# The texts every export is checked on (reloaded as a user would, logits against budgetune's own): short, long
# (truncated at max_seq_length), one character, padded together in one batch.
CHECK_TEXTS = ["Stocks rally as rates fall", "Team wins the cup final in extra time after a goalless ninety minutes "
               "and a red card, while fans wait outside the stadium in the rain " * 6, "a",
               "New chip doubles battery life", "Leaders meet for peace talks in Geneva"]
MERGED_TOLERANCE = 1e-4  # max |logit difference| of the reloaded transformers model


def merged_model(run: str | Path, adapter_scale: float | None = None):
    """(plain transformers model in eval mode, tokenizer, bundle info, adapter folder): RUN's adapter merged into
    its base weights at `adapter_scale` (None: the bundle's recorded default), the trained head in place. The
    tokenizer's model_max_length is the run's max_seq_length, so that `truncation=True` cuts where budgetune does."""
    source = adapter_dir(run)
    model, tokenizer, info = load_model(source, merge=False, adapter_scale=adapter_scale)
    if not is_full_model(source):
        model = methods.merge_and_unload(model)
    tokenizer.model_max_length = info["max_seq_length"]
    return model.eval(), tokenizer, info, source


def require_standard_head(model, info: dict) -> None:
    """Refuse a head transformers cannot rebuild from config.json: --head linear on a RoBERTa-style model (one
    Linear layer where the architecture's head has dense + tanh + out_proj)."""
    if isinstance(getattr(model, "classifier", None), classifier_heads.FirstTokenLinear):
        raise AdapterError(f"export --merge: this run was trained with --head linear, a single Linear layer on the "
                           f"first token where {type(model).__name__} has a dense + tanh + out_proj head; "
                           "transformers has no such head, so AutoModelForSequenceClassification could not load it. "
                           "Use --format onnx (any head) or the default export (a peft adapter)")


def check_batch(tokenizer, max_seq_length: int, texts: list[str] = CHECK_TEXTS) -> dict[str, torch.Tensor]:
    """`texts` tokenized as budgetune tokenizes (truncated at max_seq_length), padded into one batch."""
    return dict(tokenizer(texts, truncation=True, max_length=max_seq_length, padding=True, return_tensors="pt"))


@torch.inference_mode()
def logits_of(model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    return model(**batch).logits.float()


def check_reloaded(folder: Path, expected: torch.Tensor, batch: dict[str, torch.Tensor]) -> float:
    """The folder reloaded with plain transformers gives `expected` to MERGED_TOLERANCE (else AdapterError);
    returns the largest difference."""
    from transformers import AutoModelForSequenceClassification

    reloaded = AutoModelForSequenceClassification.from_pretrained(folder).eval()
    diff = float((logits_of(reloaded, batch) - expected).abs().max())
    if not diff <= MERGED_TOLERANCE:
        raise AdapterError(f"export --merge: the merged model, reloaded with transformers, gives logits up to "
                           f"{diff:.2e} away from budgetune's (tolerance {MERGED_TOLERANCE:g}); nothing written")
    return diff


def exported_info(info: dict, source: Path, scale: float, fmt: str) -> dict:
    """The bundle info of an exported model: the scale is in its weights (adapter_scale 1, merged_adapter_scale)."""
    out = {k: v for k, v in info.items() if k not in ("applied_adapter_scale", "adapter_scale_validation",
                                                       "robust_tolerance", "precision")}
    return {**out, "adapter_scale": 1.0, "merged_adapter_scale": scale, "exported_from": str(source),
            "export_format": fmt}


def export_merged(run: str | Path, output: str | Path, adapter_scale: float | None = None,
                  overwrite: bool = False) -> Path:
    """Write RUN's adapter merged into its base model at `adapter_scale` (None: the bundle's recorded default) as a
    transformers model folder: weights (safetensors) with the trained head, config.json with id2label/label2id,
    tokenizer, model card, and budgetune.json (budgetune's own verbs also load the folder, as a full model).

    The folder is checked before it is put in place: reloaded with AutoModelForSequenceClassification, it must give
    budgetune's logits to 1e-4.
    """
    out = fileio.refuse_nonempty(output, overwrite, reads=local_sources(run))
    model, tokenizer, info, source = merged_model(run, adapter_scale)
    require_standard_head(model, info)
    batch = check_batch(tokenizer, info["max_seq_length"])
    expected = logits_of(model, batch)
    scale = info["applied_adapter_scale"]
    with fileio.atomic_dir(out) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        meta = exported_info(info, source, scale, "transformers")
        (tmp / adapter_bundle.BUNDLE_FILE).write_text(json.dumps(meta, indent=2, default=fileio.json_default) + "\n")
        (tmp / "README.md").write_text(deployment_card(meta, "transformers"))
        diff = check_reloaded(tmp, expected, batch)
    print(f"wrote {out}: the {info['method']} adapter of {source} merged at scale {scale:g} into "
          f"{type(model).__name__} (reloaded with transformers: logits within {diff:.1e} of budgetune's)")
    return out


def deployment_card(info: dict, fmt: str) -> str:
    """The model card of an exported model (fmt: transformers or onnx): what it is and how to run it."""
    metrics = info.get("metrics") or {}
    usage = {"transformers": [
        "import torch",
        "from transformers import AutoModelForSequenceClassification, AutoTokenizer", "",
        "model = AutoModelForSequenceClassification.from_pretrained('PATH/TO/THIS/FOLDER').eval()",
        "tok = AutoTokenizer.from_pretrained('PATH/TO/THIS/FOLDER')",
        "batch = tok(['Stocks rally as rates fall'], truncation=True, padding=True, return_tensors='pt')",
        "with torch.inference_mode():",
        "    print(model.config.id2label[model(**batch).logits.argmax(-1).item()])"], "onnx": [
        "import json, onnxruntime",
        "from transformers import AutoTokenizer  # or the `tokenizers` package: tokenizer.json", "",
        "session = onnxruntime.InferenceSession('PATH/TO/THIS/FOLDER/model.onnx')  # or model_int8.onnx",
        "id2label = json.loads(session.get_modelmeta().custom_metadata_map['id2label'])",
        "tok = AutoTokenizer.from_pretrained('PATH/TO/THIS/FOLDER')",
        "enc = tok(['Stocks rally as rates fall'], truncation=True, padding=True, return_tensors='np')",
        "logits = session.run(None, {i.name: enc[i.name] for i in session.get_inputs()})[0]",
        "print(id2label[str(logits.argmax(-1)[0])])"]}[fmt]
    lines = ["---", f"library_name: {'transformers' if fmt == 'transformers' else 'onnx'}",
             *filter(None, [adapter_bundle.hub_base_line(info["base_model_name_or_path"])]),
             "pipeline_tag: text-classification",
             f"tags: [budgetune, {info['method']}, {fmt}]", "---", "",
             f"# {info['method']} fine-tune of {info['base_model_name_or_path']} ({fmt})", "",
             f"Trained with budgetune ({info['method']}, head {info['head']}) and exported for deployment: "
             + ("every weight fine-tuned" if info["method"] == "full" else "the adapter merged into the base weights "
                f"at adapter scale {info['merged_adapter_scale']:g}") + ", the classification head included. Neither "
             "budgetune nor peft is needed to run it.", "",
             f"{adapter_bundle.task_sentence(info)} Texts were truncated at {info['max_seq_length']} tokens in "
             "training (the tokenizer's model_max_length here).", "", "## Validation metrics (best checkpoint)", ""]
    lines += [f"- {k}: {v:.4f}" if isinstance(v, float) else f"- {k}: {v}" for k, v in metrics.items()]
    task = info.get("task") or "single_label"
    thresholds = "budgetune.json's" if fmt == "transformers" else "the ONNX metadata's (custom_metadata_map)"
    reading = {"multi_label": "The example takes the most likely label; this model is multi-label: read "
                              f"sigmoid(logits) per label against its threshold ({thresholds} `thresholds`, "
                              "0.5 by default).",
               "regression": "The example takes an argmax; this model is a regression: the logits are the "
                             "predicted values."}.get(task)
    lines += ["", "## Use", "", "```python", *usage, "```", ""] + ([reading, ""] if reading else [])
    return "\n".join(lines)
