"""Logging behind a tiny interface: metrics.jsonl by default, trackers (through accelerate) when asked for."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from budgetune.fileio import atomic_write_text


class MetricsLog:
    """Appends one JSON line per event to metrics.jsonl; a torn last line after a crash is skipped on reading."""

    def __init__(self, path: str | Path, accelerator=None, enabled: bool = True):
        self.path = Path(path)
        self.accelerator = accelerator
        self.enabled = enabled
        self.trackers = bool(accelerator is not None and accelerator.trackers)

    def log(self, event: str, **values: Any) -> None:
        if not self.enabled:
            return
        record = {"event": event, **values}
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")
            f.flush()
            os.fsync(f.fileno())
        if self.trackers:
            scalars = {f"{event}/{k}": v for k, v in values.items() if isinstance(v, (int, float)) and k != "step"}
            if scalars:
                self.accelerator.log(scalars, step=values.get("step"))

    def truncate_after(self, step: int) -> None:
        """Keep the events up to `step` (resuming from a checkpoint there), rewritten atomically. A `precision` event
        at `step` itself is an earlier resume's header: the resume writes its own."""
        if not self.enabled or not self.path.exists():
            return
        kept = []
        for line in self.path.read_text(encoding="utf-8").splitlines():
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                continue  # the torn line of a killed run
            earlier_resume = rec.get("event") == "precision" and step > 0 and rec.get("step") == step
            if rec.get("step", 0) <= step and rec.get("event") not in ("end", "stopped") and not earlier_resume:
                kept.append(line)
        atomic_write_text(self.path, "".join(line + "\n" for line in kept))


def read_metrics(path: str | os.PathLike) -> list[dict]:
    """Parse metrics.jsonl; a torn last line is dropped, a bad line elsewhere raises ValueError with its number."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: metrics file not found")
    lines = path.read_text(encoding="utf-8", errors="replace").splitlines()
    numbered = [(i, line) for i, line in enumerate(lines, start=1) if line.strip()]
    records = []
    for pos, (lineno, line) in enumerate(numbered):
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as exc:
            # The writer may have been killed mid-append, so only the final line may be partial.
            if pos == len(numbered) - 1:
                break
            raise ValueError(f"{path}:{lineno}: corrupt metrics line ({exc.msg})") from exc
        if not isinstance(obj, dict):
            raise ValueError(f"{path}:{lineno}: expected a JSON object, got {type(obj).__name__}")
        records.append(obj)
    return records
