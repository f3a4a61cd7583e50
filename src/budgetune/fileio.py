"""Files on disk: atomic writes (a file or folder appears whole or not at all) and the run folder's guard. The
floor under everything that writes files."""

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


def user_cache() -> Path:
    """budgetune's own cache folder (~/.cache/budgetune): tokenized data by default, joined packaged models, int8
    graphs for onnxruntime. Everything in it is rebuilt when missing."""
    return Path.home() / ".cache" / "budgetune"


def process_umask() -> int:
    """This process's umask (read once: setting it to read it is not thread-safe)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


UMASK = process_umask()  # what a plain open() or mkdir() would give: tempfile's own 0600 and 0700 are undone


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
    tmp_path.chmod(0o666 & ~UMASK)  # readable as a file written by open() would be, not private to its owner
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
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False, default=json_default) + "\n")


def update_json(path: str | os.PathLike, changes: dict[str, Any]) -> dict[str, Any]:
    """Set `changes` in the JSON object stored at `path`, the rest kept, atomically; returns the object written."""
    obj = {**json.loads(Path(path).read_text(encoding="utf-8")), **changes}
    atomic_write_json(path, obj)
    return obj


def json_default(o: Any):
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
    tmp.chmod(0o777 & ~UMASK)  # a deploy folder others (a container, a server user) can read
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


def refuse_nonempty(path: str | os.PathLike, overwrite: bool, flag: str = "--output",
                    reads: tuple[str | os.PathLike, ...] = ()) -> Path:
    """A folder to be written whole (atomic_dir): refused while it holds anything, unless --overwrite; refused
    always where it is, or holds, a folder the command `reads` (replacing it would delete what is being exported)."""
    out = Path(path)
    for source in map(Path, reads):
        same = out.exists() and source.exists() and os.path.samefile(out, source)  # links and case-folding too
        holds = out.exists() and any(p.exists() and os.path.samefile(out, p) for p in source.resolve().parents)
        if same or holds:
            raise RunFolderError(f"{flag} {out}: it {'is' if same else 'holds'} {source}, which this command reads, "
                                 "and would be replaced whole; choose another folder")
    if out.exists() and not out.is_dir():
        raise RunFolderError(f"{flag} {out}: a file is there, not a folder; choose another path")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise RunFolderError(f"{flag} {out}: the folder is not empty; choose another or pass --overwrite")
    return out


def holds_a_run(out: Path) -> bool:
    """Whether a folder holds (part of) a run: its log, its config or its adapter."""
    return out.is_dir() and any((out / f).exists() for f in ("metrics.jsonl", "config.yaml", "adapter"))


def guard_output_dir(output_dir: str | os.PathLike, overwrite: bool, resuming: bool, clear: bool = True) -> Path:
    """Refuse to write into a folder that holds a run unless --overwrite_output_dir or resuming.

    clear=False only checks (and creates the folder): the old run's files are removed by a later call, once the
    inputs have loaded, so a command that fails on its inputs leaves the old run as it was.
    """
    out = Path(output_dir)
    holds_run = holds_a_run(out)
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


RUN_FILES = ("config.yaml", "metrics.jsonl", "budget.json", "best_state.pt", "adapter", "checkpoints", "plots",
             "submission.csv", "distill.json", "selftrain.json")


RUN_PATTERNS = ("evaluation*.json", "evaluation*.txt", "evaluation*.png", ".*.tmp", ".*.old", "round-[0-9]*")


def run_files(out: Path) -> list[Path]:
    found = [out / name for name in RUN_FILES if (out / name).exists()]
    return found + sorted({p for pattern in RUN_PATTERNS for p in out.glob(pattern)})
