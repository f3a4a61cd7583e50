"""Files on disk: atomic writes, the run folder, the saved adapter bundle and its model card."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from budgetune.errors import RunFolderError

BUNDLE_FILE = "budgetune.json"  # label names, base model id, head choice: what plain peft needs besides the adapter



def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside `path`; rename it into place only if the block finishes."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        with open(tmp_path, "rb+") as f:  # flush to disk before the rename makes it visible
            os.fsync(f.fileno())
        os.replace(tmp_path, path)
        _fsync_dir(path.parent)
    finally:
        tmp_path.unlink(missing_ok=True)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def atomic_write_json(path: str | os.PathLike, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False, default=_json_default) + "\n")


def _json_default(o: Any):
    if hasattr(o, "tolist"):
        return o.tolist()
    if isinstance(o, (set, tuple)):
        return list(o)
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def atomic_torch_save(obj: Any, path: str | os.PathLike) -> None:
    import torch

    with atomic_path(path) as tmp:
        torch.save(obj, tmp)


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary folder; it replaces `path` (whole) only if the block finishes."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    try:
        yield tmp
        for f in tmp.rglob("*"):
            if f.is_file():
                with open(f, "rb+") as fh:
                    os.fsync(fh.fileno())
        old = None
        if path.exists():
            old = path.with_name(f".{path.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(path, old)
        os.replace(tmp, path)  # the only moment the old folder is gone is between these two renames
        _fsync_dir(path.parent)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def recover_dir(path: str | os.PathLike) -> None:
    """If a crash fell between atomic_dir's two renames, put the old folder back."""
    path = Path(path)
    old = path.with_name(f".{path.name}.old")
    if not path.exists() and old.exists():
        os.replace(old, path)


def guard_output_dir(output_dir: str | os.PathLike, overwrite: bool, resuming: bool, clear: bool = True) -> Path:
    """Refuse to write into a folder that holds a run unless --overwrite_output_dir or resuming.

    clear=False only checks (and creates the folder): the old run's files are removed by a later call, once the
    inputs have loaded, so a command that fails on its inputs leaves the old run as it was.
    """
    out = Path(output_dir)
    holds_run = out.is_dir() and any((out / f).exists() for f in ("metrics.jsonl", "config.yaml", "adapter"))
    if holds_run and not (overwrite or resuming):
        raise RunFolderError(
            f"{out} already holds a run; pass --overwrite_output_dir to replace it, "
            f"--resume_from_checkpoint auto to continue it, or choose another --output_dir")
    if holds_run and overwrite and not resuming and clear:
        for name in ("metrics.jsonl", "budget.json", "evaluation.json", "evaluation.txt", "checkpoints", "plots"):
            p = out / name
            if p.is_dir():
                shutil.rmtree(p)
            else:
                p.unlink(missing_ok=True)
    out.mkdir(parents=True, exist_ok=True)
    return out


def save_bundle(peft_model, tokenizer, out_dir: str | os.PathLike, *, label_names: list[str], base_model: str,
                head: str, config: dict[str, Any], budget: dict[str, Any] | None, metrics: dict[str, Any] | None) -> Path:
    """Write the adapter in peft's format + tokenizer + labels + model card, atomically as one folder."""
    with atomic_dir(out_dir) as tmp:
        peft_model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        info = {"base_model_name_or_path": base_model, "label_names": label_names, "head": head,
                "method": config["method"]["method"], "max_seq_length": config["data"]["max_seq_length"],
                "budget": budget, "metrics": metrics}
        (tmp / BUNDLE_FILE).write_text(json.dumps(info, indent=2, default=_json_default) + "\n")
        (tmp / "README.md").write_text(model_card(info, config))
    return Path(out_dir)


def model_card(info: dict[str, Any], config: dict[str, Any]) -> str:
    """A model card that lets someone use the adapter with plain transformers + peft."""
    budget = info.get("budget") or {}
    metrics = info.get("metrics") or {}
    labels = info["label_names"]
    head_note = ""
    if info["head"] == "linear":
        head_note = ("\nThis adapter uses budgetune's linear head: call "
                     "`budgetune.methods.apply_head(model, 'linear')` on the base model before loading it.\n")
    lines = [
        "---", "library_name: peft", f"base_model: {info['base_model_name_or_path']}", "pipeline_tag: text-classification",
        "tags: [budgetune, peft, " + info["method"] + "]", "---", "",
        f"# {info['method']} adapter for {info['base_model_name_or_path']}", "",
        f"Trained with budgetune. Labels (in order): {', '.join(labels)}.", "",
        "## Budget", "",
        f"- trainable parameters during training: {budget.get('total_trainable', 'n/a'):,}"
        if isinstance(budget.get("total_trainable"), int) else "- trainable parameters: n/a",
        f"- budget: {budget.get('budget'):,}" if isinstance(budget.get("budget"), int) else "- budget: none",
        f"- classification head (trained): {budget.get('head'):,}" if isinstance(budget.get("head"), int) else "",
        "", "## Validation metrics (best checkpoint)", "",
    ]
    lines += [f"- {k}: {v:.4f}" if isinstance(v, float) else f"- {k}: {v}" for k, v in metrics.items()]
    lines += ["", "## Use without budgetune", "", "```python",
              "import json, torch",
              "from transformers import AutoModelForSequenceClassification, AutoTokenizer",
              "from peft import PeftModel", "",
              "adapter = 'PATH/TO/THIS/FOLDER'",
              "info = json.load(open(f'{adapter}/budgetune.json'))",
              "labels = info['label_names']",
              "base = AutoModelForSequenceClassification.from_pretrained(",
              "    info['base_model_name_or_path'], num_labels=len(labels))",
              "model = PeftModel.from_pretrained(base, adapter).eval()",
              "tok = AutoTokenizer.from_pretrained(adapter)",
              "batch = tok(['Stocks rally as rates fall'], return_tensors='pt', truncation=True,",
              "            max_length=info['max_seq_length'])",
              "with torch.inference_mode():",
              "    print(labels[model(**batch).logits.argmax(-1).item()])", "```", head_note,
              "## Training configuration", "", "```yaml"]
    import yaml

    lines += [yaml.safe_dump(config, sort_keys=False).rstrip(), "```", ""]
    return "\n".join(line for line in lines if line is not None)
