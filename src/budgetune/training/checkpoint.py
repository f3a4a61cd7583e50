"""Resumable checkpoints: everything needed to continue a run exactly, written atomically."""

from __future__ import annotations

import json
import pickle
import random
import re
import shutil
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch

from budgetune.adalora import rank_masks
from budgetune.errors import CheckpointError
from budgetune.fileio import atomic_dir, recover_dir
from budgetune.hardware.devices import is_main_process

# Settings that may change between the interrupted run and its resume without changing any number.
RESUME_MAY_DIFFER = {("output", "output_dir"), ("output", "overwrite_output_dir"), ("output", "report_to"),
                     ("output", "run_name"), ("train", "resume_from_checkpoint"),
                     ("train", "dataloader_num_workers"), ("train", "save_steps"), ("train", "save_strategy"),
                     ("train", "save_total_limit"),
                     ("train", "logging_steps"), ("train", "per_device_eval_batch_size"), ("data", "cache_dir"),
                     ("train", "robust_tolerance"), ("train", "inference_precision_tolerance"),
                     ("method", "lean_adalora"),  # the same numbers either way (tests/test_lean_adalora.py)
                     ("train", "frozen_in_compute_dtype")}  # the same numbers either way (tests/test_precision.py)


_STEP = re.compile(r"step-\d+")



def find(spec: str, output_dir: str | Path) -> Path | None:
    """auto -> the latest checkpoint in output_dir (None if there is none); a run folder -> its latest; else the folder."""
    base = Path(output_dir) if spec == "auto" else Path(spec)
    recover_dir(base)
    if (base / "state.pt").is_file():
        return base
    for old in (base / "checkpoints").glob(".step-*.old"):  # a crash between atomic_dir's two renames
        recover_dir(old.with_name(old.name[1:-4]))
    ckpts = sorted((c for c in (base / "checkpoints").glob("step-*") if _STEP.fullmatch(c.name)),
                   key=lambda p: int(p.name.split("-")[1]))
    ckpts = [c for c in ckpts if (c / "state.pt").is_file()]
    if ckpts:
        return ckpts[-1]
    if spec == "auto":
        return None
    raise CheckpointError(f"--resume_from_checkpoint {spec}: no checkpoint there (expected state.pt or checkpoints/step-*)")


def trainable_state(model) -> dict[str, torch.Tensor]:
    """The parameters that train (adapters + head), on CPU; the frozen base is never saved in a checkpoint."""
    return {n: p.detach().cpu().clone() for n, p in model.named_parameters() if p.requires_grad}


def allocator_state(peft_model) -> dict[str, Any] | None:
    """AdaLoRA's importance averages and rank pattern, which peft does not save itself."""
    base = getattr(peft_model, "base_model", None)
    alloc = getattr(base, "rankallocator", None)
    if alloc is None:
        return None
    clone = {k: {n: t.detach().cpu().clone() for n, t in getattr(alloc, k).items()}
             for k in ("ipt", "exp_avg_ipt", "exp_avg_unc")}
    clone["rank_pattern"] = rank_masks.as_lists(peft_model.peft_config["default"].rank_pattern)
    return clone


def restore_allocator(peft_model, state: dict[str, Any] | None) -> None:
    if not state:
        return
    alloc = peft_model.base_model.rankallocator
    device = next(peft_model.parameters()).device
    for k in ("ipt", "exp_avg_ipt", "exp_avg_unc"):
        setattr(alloc, k, {n: t.to(device) for n, t in state[k].items()})
    peft_model.peft_config["default"].rank_pattern = state["rank_pattern"]


def rng_state() -> dict[str, Any]:
    """Python, numpy, torch (and CUDA) generator states, as plain lists and tensors (loadable with weights_only)."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {"python": random.getstate(), "numpy": [kind, keys.tolist(), pos, has_gauss, cached],
             "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict[str, Any]) -> None:
    random.setstate(tuple(x if not isinstance(x, list) else tuple(x) for x in state["python"]))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save(folder: Path, *, model, optimizer, scheduler, scaler, progress: dict, config: dict, keep: int,
         best: dict | None = None, world: dict | None = None, loss: dict | None = None) -> Path:
    """Write checkpoint `folder` atomically, then prune older checkpoints beyond `keep` (at least this one stays).

    `best` is the best step's trainable state, rank pattern and metrics so far, so that a resume from this
    checkpoint continues with the best it had, whatever later steps of the interrupted run wrote to best_state.pt.
    `loss` is what a recipe's own loss is made of (check_loss compares it on resume).
    """
    payload = {"model": trainable_state(model), "optimizer": optimizer.state_dict(),
               "scheduler": scheduler.state_dict(), "scaler": scaler.state_dict() if scaler is not None else None,
               "rng": rng_state(), "progress": progress, "allocator": allocator_state(model), "config": config,
               "best": best, "world": world, "loss": loss}
    folder = Path(folder)
    for stale in folder.parent.glob(".step-*.tmp"):  # left by a run killed while saving; never a checkpoint
        shutil.rmtree(stale, ignore_errors=True)
    with atomic_dir(folder) as tmp:
        torch.save(payload, tmp / "state.pt")
        (tmp / "progress.json").write_text(json.dumps(progress, indent=2) + "\n")
    ckpts = sorted((c for c in folder.parent.glob("step-*") if _STEP.fullmatch(c.name)),
                   key=lambda p: int(p.name.split("-")[1]))
    step = int(folder.name.split("-")[1]) if _STEP.fullmatch(folder.name) else None
    for later in [c for c in ckpts if step is not None and int(c.name.split("-")[1]) > step]:
        shutil.rmtree(later, ignore_errors=True)  # from an abandoned continuation (a resume from an older one)
    ckpts = [c for c in ckpts if c != folder and (step is None or int(c.name.split("-")[1]) < step)]
    for old in ckpts[: max(0, len(ckpts) + 1 - max(1, keep))]:
        shutil.rmtree(old, ignore_errors=True)
    return folder


def load_weights(path: Path, keys: tuple[str, ...]) -> dict[str, Any]:
    """A dict of tensors and plain values saved by torch.save, read with torch's weights-only unpickler (even where
    TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD is set, or with torch < 2.6): a file from a copied run folder that asks to
    import or call anything is refused. `keys`: those it must have."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:  # weights_only refuses globals outside tensors and plain containers
        first = str(e).strip().splitlines()
        detail = next((line for line in first if "GLOBAL" in line or "global" in line), first[0] if first else "")
        raise CheckpointError(f"{path}: refusing to load: it is not a plain budgetune checkpoint (it asks for "
                              f"code or objects that a checkpoint never holds: {detail.strip()[:300]})") from None
    except Exception as e:  # a torn or foreign file: say which
        raise CheckpointError(f"{path}: cannot be read ({type(e).__name__}: {e})") from None
    missing = [k for k in keys if not isinstance(state, dict) or k not in state]
    if missing:
        raise CheckpointError(f"{path}: not a budgetune checkpoint (missing {', '.join(missing)})")
    return state


def load(folder: Path) -> dict[str, Any]:
    """Read a checkpoint's state.pt (load_weights)."""
    return load_weights(Path(folder) / "state.pt", _KEYS)


_KEYS = ("model", "optimizer", "scheduler", "scaler", "rng", "progress", "allocator", "config")
BEST_KEYS = ("model", "rank_pattern", "metrics")  # best_state.pt (finish.save_best)


def config_differences(saved: dict, current: dict, ignored: set[tuple[str, str]],
                       defaults: dict | None = None) -> list[tuple[str, object, object]]:
    """(group.key, saved value, current value) for each option that differs, the `ignored` ones aside; an option
    `saved` lacks (written before it existed) counts as its value in `defaults`, else as "<absent>"."""
    diffs = []
    for group, values in current.items():
        for key, value in values.items():
            if (group, key) in ignored:
                continue
            old = saved.get(group, {}).get(key, (defaults or {}).get(group, {}).get(key, "<absent>"))
            if old != value:
                diffs.append((f"{group}.{key}", old, value))
    return diffs


def check_compatible(saved: dict, current: dict, folder: Path, defaults: dict | None = None) -> None:
    """Refuse a checkpoint written with a configuration that changes the numbers, naming the keys that differ.

    A key the checkpoint lacks (written before the option existed) counts as its default in `defaults`: the
    behaviour that checkpoint was trained with, since new options default to the old behaviour.
    """
    diffs = [f"{name}: checkpoint {old!r}, now {value!r}"
             for name, old, value in config_differences(saved, current, RESUME_MAY_DIFFER, defaults)]
    if diffs:
        raise CheckpointError(f"{folder} was written by a different configuration; refusing to resume. "
                              "Differences: " + "; ".join(diffs))


WORLD_FLAGS = {"num_processes": "processes (launcher)", "per_device_train_batch_size": "--per_device_train_batch_size",
               "gradient_accumulation_steps": "--gradient_accumulation_steps",
               "steps_per_epoch": "optimizer steps per epoch", "total_steps": "total optimizer steps"}


def check_world(saved: dict | None, current: dict, folder: Path) -> None:
    """Refuse to resume with another process count, batch or schedule: it would change the global batch, the
    learning-rate schedule and AdaLoRA's total_step in the middle of a run."""
    if saved is None:
        return  # written before the world was recorded
    diffs = [f"{WORLD_FLAGS.get(k, k)}: checkpoint {saved[k]}, now {current.get(k)}"
             for k in saved if saved[k] != current.get(k)]
    if diffs:
        raise CheckpointError(f"{folder} was written by a run with another layout; refusing to resume. "
                              + "; ".join(diffs) + ". Resume with the same number of processes and batch sizes.")


NOTED = "noted"  # a loss identity's values that may differ on resume, with a note (another machine's precision)


def check_loss(saved: dict | None, current: dict | None, folder: Path, hint: str = "") -> None:
    """Refuse to resume a run whose loss is made of something else (a recipe's teachers, alpha, T), naming what
    differs; values under NOTED that differ are only printed. A checkpoint without a record (written before it was
    kept, or by a custom loss without one) passes; one resumed by another recipe (a distill checkpoint by plain
    `train`, or the reverse) is refused."""
    if saved is None:
        return
    current = current or {}
    if saved.get("recipe") != current.get("recipe"):
        by = f"`{saved['recipe']}`" if "recipe" in saved else "a recipe"
        now = f"`{current['recipe']}`" if "recipe" in current else "this command"
        raise CheckpointError(f"{folder} was trained by {by} with its own loss; resume it with that command and "
                              f"--resume_from_checkpoint auto ({now} would go on with another loss)")
    diffs = [f"{k}: checkpoint {saved.get(k, '<absent>')!r}, now {current.get(k, '<absent>')!r}"
             for k in dict.fromkeys([*saved, *current]) if k != NOTED and saved.get(k) != current.get(k)]
    if diffs:
        raise CheckpointError(f"{folder} was trained with another loss; refusing to resume. Differences: "
                              + "; ".join(diffs) + (f". {hint}" if hint else ""))
    was, now = saved.get(NOTED) or {}, current.get(NOTED) or {}
    for k in dict.fromkeys([*was, *now]):
        if was.get(k) != now.get(k) and is_main_process():
            print(f"note: resuming {folder} with {k} {now.get(k)!r} where it trained with {was.get(k)!r}: the "
                  "resumed run is not bit-identical to an uninterrupted one", file=sys.stderr)


def restore_model(model, state: dict[str, torch.Tensor]) -> None:
    params = dict(model.named_parameters())
    missing = [n for n in state if n not in params]
    if missing:
        raise CheckpointError(f"checkpoint holds parameters the model lacks: {missing[:3]}")
    with torch.no_grad():
        for n, t in state.items():
            params[n].copy_(t.to(params[n].device))
