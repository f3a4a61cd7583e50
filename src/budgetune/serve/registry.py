"""Many saved adapters in one process: runs on the same base share its weights, each text picks its adapter.

Adapters are grouped by what a single peft model can hold: the same base model, head and label count, and the same
peft type. A group of one is merged into its base (the fast path `predict` uses). In a larger LoRA group a batch
that mixes adapters runs as one forward (peft's `adapter_names`); other methods (IA3, DoRA, LoHa, ...) run one
forward per adapter on the shared base (`set_adapter`).
"""

from __future__ import annotations

import json
import re
import types
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from budgetune import tasks
from budgetune.errors import AdapterError, ModelLoadError
from budgetune.inference import adapter_bundle

BUNDLE_KEYS = ("label_names", "base_model_name_or_path", "head", "max_seq_length", "method")
NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
FULL = "FULL"  # the peft_type given to a fully fine-tuned model's bundle
MIXED_PEFT_TYPES = {"LORA"}  # peft's mixed-batch forward (adapter_names): LoRA layers only, and not DoRA


@dataclass
class Adapter:
    """One served adapter: its name in requests, its folder, its bundle and adapter config."""

    name: str
    folder: Path
    info: dict
    peft_config: dict
    tokenizer: Any = None
    key: str = ""  # its name inside the peft model: a user's name may clash with a module attribute ("half")

    @property
    def peft_type(self) -> str:
        return str(self.peft_config.get("peft_type", "")).upper()

    @property
    def mixable(self) -> bool:
        return self.peft_type in MIXED_PEFT_TYPES and not self.peft_config.get("use_dora", False)

    @property
    def labels(self) -> list[str]:
        return [str(n) for n in self.info["label_names"]]

    @property
    def task(self) -> str:
        return self.info.get("task") or tasks.SINGLE_LABEL

    @property
    def text_pair(self) -> str | None:
        """The second text's column the run was trained on, or None (single texts)."""
        return self.info.get("text_pair_column_name") or None

    @property
    def thresholds(self) -> list[float] | None:
        """A multi-label run's per-label thresholds, in label order, as predict applies them (bundle_thresholds)."""
        from budgetune.inference.loading import bundle_thresholds

        return bundle_thresholds(self.info) if self.task == tasks.MULTI_LABEL else None

    def describe(self, mode: str) -> dict:
        budget, metrics = self.info.get("budget") or {}, self.info.get("metrics") or {}
        return {"name": self.name, "base_model": self.info["base_model_name_or_path"], "method": self.info["method"],
                "trainable_parameters": budget.get("total_trainable"), "labels": self.labels,
                "task": self.task, "text_pair": self.text_pair,
                "validation_accuracy": metrics.get("eval_accuracy"), "max_seq_length": self.info["max_seq_length"],
                "served": mode}


@dataclass
class Row:
    """One text to classify: its adapter and token ids (already truncated to the adapter's max_seq_length)."""

    adapter: str
    features: dict[str, list[int]]


@dataclass
class BaseGroup:
    """Adapters held by one peft model on one copy of a base model."""

    adapters: list[Adapter]
    model: Any = None
    merged: bool = False
    precision: Any = None  # hardware.devices.Precision: what this group computes in (group_precision)

    @property
    def mixed(self) -> set[str]:
        """Adapters whose rows share one forward (peft's adapter_names): LoRA ones, when there are several."""
        names = {a.name for a in self.adapters if a.mixable}
        return names if len(names) > 1 else set()

    def mode(self, name: str) -> str:
        if self.merged:
            return "merged"
        return "mixed" if name in self.mixed else "grouped"


def parse_run(spec: str) -> Adapter:
    """`PATH` or `NAME=PATH` -> an Adapter with its bundle checked (no weights loaded: this is the fail-fast part)."""
    # imported here: loading imports torch, and a wrong folder should fail before that
    from budgetune.inference.loading import adapter_dir, bundle_info, is_full_model

    name, sep, path = spec.partition("=")
    if not sep:
        name, path = "", spec
    folder = adapter_dir(path)
    if not name:
        name = (folder.parent if folder.name == "adapter" else folder).resolve().name
    if not NAME.fullmatch(name):
        raise AdapterError(f"{spec}: adapter name {name!r} must be letters, digits, '.', '_' or '-' (at most 64), "
                           "starting with a letter or digit; name it with NAME=PATH")
    info = bundle_info(folder)
    missing = [k for k in BUNDLE_KEYS if k not in info]
    if missing:
        raise AdapterError(f"{folder / adapter_bundle.BUNDLE_FILE}: not a budgetune bundle (missing {', '.join(missing)})")
    task = info.get("task") or tasks.SINGLE_LABEL
    if task not in tasks.TASKS:
        raise AdapterError(f"{folder / adapter_bundle.BUNDLE_FILE}: unknown task {task!r} (budgetune serve answers "
                           f"{', '.join(tasks.TASKS)})")
    fewest = 2 if task == tasks.SINGLE_LABEL else 1  # a regression target, or a multi-label label, may be alone
    if not isinstance(info["label_names"], list) or len(info["label_names"]) < fewest:
        raise AdapterError(f"{folder / adapter_bundle.BUNDLE_FILE}: label_names must list at least {fewest} "
                           f"{'labels' if fewest > 1 else 'label'} for a {task} model")
    if is_full_model(folder):  # a fully fine-tuned model (method full): served alone on its own weights
        return Adapter(name, folder, info, {"peft_type": FULL})
    try:
        peft_config = json.loads((folder / "adapter_config.json").read_text())
    except json.JSONDecodeError as e:
        raise AdapterError(f"{folder / 'adapter_config.json'}: not valid JSON ({e})") from None
    if not peft_config.get("peft_type"):
        raise AdapterError(f"{folder / 'adapter_config.json'}: no peft_type")
    if not any((folder / f).is_file() for f in ("adapter_model.safetensors", "adapter_model.bin")):
        raise AdapterError(f"{folder}: no adapter weights (adapter_model.safetensors)")
    return Adapter(name, folder, info, peft_config)


def parse_runs(specs: Sequence[str]) -> list[Adapter]:
    """Every run checked; two runs under one name is an error naming both folders."""
    adapters, seen = [], {}
    for spec in specs:
        a = parse_run(spec)
        if a.name in seen:
            raise AdapterError(f"two adapters named {a.name!r}: {seen[a.name]} and {a.folder}; "
                               "name them with NAME=PATH")
        seen[a.name] = a.folder
        adapters.append(a)
    if not adapters:
        raise AdapterError("no run folders given")
    return adapters


def group_adapters(adapters: Sequence[Adapter]) -> list[BaseGroup]:
    """Adapters one peft model can hold together, in first-seen order."""
    groups: dict[tuple, list[Adapter]] = {}
    for i, a in enumerate(adapters):
        a.key = f"adapter{i}"
        key = (a.info["base_model_name_or_path"], a.info.get("revision"), a.info["head"], len(a.labels), a.peft_type)
        if a.peft_type == FULL:
            key = (FULL, str(a.folder))
        groups.setdefault(key, []).append(a)
    return [BaseGroup(members) for members in groups.values()]


def mixed_head_forward(self, x, *args, adapter_names: list[str], **kwargs):
    """A saved head copy per adapter, each applied to its own rows.

    peft mixes batches in its ModulesToSaveWrapper only around plain Linear/Embedding/Conv modules and refuses
    RoBERTa's two-layer head or budgetune's linear head; the per-row choice is the same for any module.
    """
    import torch

    names = np.asarray(adapter_names)
    out = None
    for name in dict.fromkeys(adapter_names):
        rows = torch.as_tensor(np.flatnonzero(names == name), device=x.device)
        part = self.modules_to_save[name](x.index_select(0, rows), *args, **kwargs)
        if out is None:
            out = part.new_empty((len(adapter_names), *part.shape[1:]))
        out.index_copy_(0, rows, part)
    return out


def allow_mixed_heads(peft_model) -> None:
    """Let every saved head copy take part in a mixed batch (see mixed_head_forward)."""
    from peft.utils import ModulesToSaveWrapper

    for module in peft_model.modules():
        if isinstance(module, ModulesToSaveWrapper):
            module._mixed_batch_forward = types.MethodType(mixed_head_forward, module)


def apply_bundle_scale(peft_model, adapter: Adapter) -> None:
    """The adapter scale the bundle records (`adapter_scale`, budgetune.modeling.scaling), applied before any merge."""
    from budgetune.inference.loading import bundle_scale
    from budgetune.modeling import scaling

    scale = bundle_scale(adapter.info)
    if scale != 1:
        scaling.apply_scale(peft_model, scale, adapter.key)


def group_precision(group: BaseGroup, choice: str, device) -> Any:
    """What a group computes in for --precision `choice` (inference.precisions.resolve): a group of one adapter
    follows its bundle's measured choice under auto; several adapters on one base run unmerged, and no one bundle's
    choice applies to them, so auto follows the hardware."""
    import torch

    from budgetune.inference import precisions

    alone = len(group.adapters) == 1
    merged = group.merged if group.model is not None else alone
    return precisions.resolve(choice, group.adapters[0].info if alone else {}, torch.device(device).type,
                              merged=merged)


def load_group(group: BaseGroup, device, precision: str = "auto") -> None:
    """The group's base model once, every adapter on it, in eval mode on `device`, in the group's precision
    (group_precision: made ready by inference.precisions.prepare); tokenizers per adapter."""
    from peft import PeftModel

    from budgetune.inference.loading import load_base_for
    from budgetune.modeling import fast_forward, methods

    first = group.adapters[0]
    if first.peft_type == FULL:
        load_full_group(group, device)
        group.model = prepared(group, group.model, first, device)
        return
    base_name = first.info["base_model_name_or_path"]
    try:
        base = load_base_for(first.info)
    except (OSError, ValueError, ModelLoadError) as e:
        raise AdapterError(f"{first.folder}: cannot load its base model {base_name} ({e})") from None
    model = None
    for a in group.adapters:  # a size mismatch or a broken weights file names its adapter folder
        try:
            if model is None:
                model = PeftModel.from_pretrained(base, a.folder, adapter_name=a.key)
            else:
                model.load_adapter(a.folder, adapter_name=a.key)
        except (OSError, ValueError, RuntimeError, KeyError) as e:
            raise AdapterError(f"{a.folder}: cannot load this adapter onto {base_name} ({e})") from None
    for a in group.adapters:
        apply_bundle_scale(model, a)
    model.eval()
    # Alone on its base, an adapter is merged (as `predict` does); a method that cannot merge runs unmerged.
    group.merged = len(group.adapters) == 1 and methods.merge_for_inference(model)
    if group.mixed:
        allow_mixed_heads(model)
    fast_forward.first_token_last_layer(model)
    if group.precision.int8 and not group.merged:  # a method that cannot merge: int8 is out of reach
        group.model = model
        group.precision = group_precision(group, precision, device)
    load_tokenizers(group)
    group.model = prepared(group, model, first, device)


def prepared(group: BaseGroup, model, first, device):
    """The group's model in its precision on the device; a failure (building the int8 graph, out of memory) names
    the folder, so the command stops with the reason (exit 2), not a traceback."""
    from budgetune.inference import precisions

    try:
        return precisions.prepare(model, group.precision, first.tokenizer).to(device)
    except (OSError, RuntimeError, ValueError) as e:
        raise AdapterError(f"{first.folder}: cannot prepare it in {group.precision.name} on {device} "
                           f"({type(e).__name__}: {' '.join(str(e).split())[:300]})") from None


def load_full_group(group: BaseGroup, device) -> None:
    """A fully fine-tuned model: its own weights, nothing to share or merge."""

    from budgetune.inference.loading import load_full
    from budgetune.modeling import fast_forward

    (a,) = group.adapters
    try:
        model = load_full(a.folder, a.info).eval()
    except (OSError, ValueError, RuntimeError) as e:
        raise AdapterError(f"{a.folder}: cannot load this model ({e})") from None
    fast_forward.first_token_last_layer(model)
    group.model, group.merged = model.to(device), True
    a.tokenizer = folder_tokenizer(a.folder)


def folder_tokenizer(folder):
    """The tokenizer saved beside an adapter; a folder without a readable one is an error naming it."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(folder)
    except (OSError, ValueError, TypeError) as e:
        raise AdapterError(f"{folder}: cannot load its tokenizer ({' '.join(str(e).split())[:300]})") from None


def load_tokenizers(group: BaseGroup) -> None:
    """Each adapter's own tokenizer; one base pads with one id, or rows of a mixed batch would disagree."""

    pads = set()
    for a in group.adapters:
        a.tokenizer = folder_tokenizer(a.folder)
        pads.add(a.tokenizer.pad_token_id)
    if len(pads) > 1:
        raise AdapterError(f"adapters {', '.join(a.name for a in group.adapters)} share a base model but their "
                           f"tokenizers pad with different ids {sorted(pads, key=str)}; serve them from separate runs")


class Registry:
    """The served adapters by name, their base groups, and the forward pass over rows of any adapters."""

    def __init__(self, adapters: Sequence[Adapter], device: str | None = None, max_batch_texts: int = 256,
                 max_batch_tokens: int | None = None, precision: str = "auto"):
        import torch

        from budgetune.hardware.devices import token_cap
        from budgetune.inference.precisions import check_choice

        self.adapters = {a.name: a for a in adapters}
        self.groups = group_adapters(adapters)
        self.group_of = {a.name: g for g in self.groups for a in g.adapters}
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.max_batch_texts = max_batch_texts
        self.max_batch_tokens = max_batch_tokens if max_batch_tokens is not None else token_cap(self.device)
        self.precision_choice = check_choice(precision)  # --precision
        for g in self.groups:
            g.precision = group_precision(g, precision, self.device)

    def load(self) -> None:
        for g in self.groups:
            load_group(g, self.device, self.precision_choice)

    def precision_line(self) -> str:
        """What the models compute in, and why: one line, or one per group where the groups differ."""
        lines: dict[str, list[str]] = {}
        for g in self.groups:
            lines.setdefault(g.precision.line(), []).extend(a.name for a in g.adapters)
        if len(lines) == 1:
            return next(iter(lines))
        return "; ".join(f"{', '.join(names)}: {line}" for line, names in lines.items())

    def describe(self) -> list[dict]:
        return [a.describe(self.group_of[a.name].mode(a.name)) for a in self.adapters.values()]

    def tokenize(self, adapter: str, texts: Sequence[str], pairs: Sequence[str] | None = None) -> list[Row]:
        """Rows truncated to the adapter's max_seq_length, as `predict` tokenizes (data.tokenize); with `pairs`,
        true pairs (the longer text truncated first)."""
        from budgetune.data.readers import encode

        a = self.adapters[adapter]
        enc = encode(a.tokenizer, list(texts), a.info["max_seq_length"], None if pairs is None else list(pairs))
        return [Row(adapter, {k: ids[i] for k, ids in enc.items()}) for i in range(len(texts))]

    def logits(self, rows: Sequence[Row], forwards: Counter[str] | None = None) -> np.ndarray:
        """float32 logits [len(rows), max labels] in row order (columns past an adapter's labels are unused).

        `forwards`, when given, counts this call's model calls by kind (merged, mixed, single: one adapter). It
        belongs to the caller: the registry keeps no counter that another thread reads while the model runs.
        """
        forwards = Counter() if forwards is None else forwards
        width = max(len(self.adapters[r.adapter].labels) for r in rows)
        out = np.zeros((len(rows), width), dtype=np.float32)
        by_group: dict[int, list[int]] = {}
        for i, r in enumerate(rows):
            by_group.setdefault(id(self.group_of[r.adapter]), []).append(i)
        for members in by_group.values():
            group = self.group_of[rows[members[0]].adapter]
            self._group_logits(group, [rows[i] for i in members], np.asarray(members), out, forwards)
        return out

    def _group_logits(self, group: BaseGroup, rows: list[Row], where: np.ndarray, out: np.ndarray,
                      forwards: Counter[str]) -> None:
        from budgetune.data.batching import SortedBatchSampler, make_collator

        collate = make_collator(group.adapters[0].tokenizer, 8 if self.device.type == "cuda" else None)
        lengths = [len(r.features["input_ids"]) for r in rows]
        sampler = SortedBatchSampler(lengths, self.max_batch_texts, max_tokens=self.max_batch_tokens)
        for batch_idx in sampler:
            names = [rows[i].adapter for i in batch_idx]
            batch = collate([{**rows[i].features, "idx": i} for i in batch_idx])
            batch.pop("idx")
            logits = self._forward(group, batch, names, forwards)
            out[where[batch_idx], :logits.shape[1]] = logits

    def _forward(self, group: BaseGroup, batch: dict, names: list[str], forwards: Counter[str]) -> np.ndarray:
        """One forward for the rows of merged or mixable adapters, one per other adapter in the batch."""
        import torch

        batch = {k: v.to(self.device) for k, v in batch.items()}
        if group.merged:
            forwards["merged"] += 1
            return self._run(group, batch)
        parts: dict[str, list[int]] = {}
        mixed = group.mixed
        for i, n in enumerate(names):  # the mixable adapters under one key: they share a forward
            parts.setdefault("" if n in mixed else n, []).append(i)
        if "" in parts and len({names[i] for i in parts[""]}) == 1:  # one adapter alone needs no mixing
            rows = parts.pop("")
            parts[names[rows[0]]] = rows
        logits = None
        for key, rows in parts.items():
            sub = batch if len(rows) == len(names) else {
                k: v.index_select(0, torch.as_tensor(rows, device=self.device)) for k, v in batch.items()}
            if key:
                group.model.set_adapter(self.adapters[key].key)
                forwards["single"] += 1
                part = self._run(group, sub)
            else:
                forwards["mixed"] += 1
                part = self._run(group, sub, adapter_names=[self.adapters[names[i]].key for i in rows])
            if logits is None:
                logits = np.zeros((len(names), part.shape[1]), dtype=np.float32)
            logits[rows] = part
        return logits

    def _run(self, group: BaseGroup, batch: dict, **kwargs) -> np.ndarray:
        import torch

        from budgetune.inference.precisions import autocast

        with torch.inference_mode(), autocast(group.precision, self.device.type):
            return group.model(**batch, **kwargs).logits.float().cpu().numpy()
