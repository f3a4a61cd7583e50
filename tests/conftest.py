"""Shared fixtures: a tiny random RoBERTa with its own byte-level BPE tokenizer, small real datasets, the CLI."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"
AG_TRAIN = SHARED / "ag_news" / "train.csv"
KAGGLE_TEST = SHARED / "nyu_dlsp25_proj2" / "test_unlabelled.csv"
HEADLINES = ROOT / "src" / "budgetune" / "resources" / "headlines.csv"

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# pytest -n 2 on 2 cores: one thread per process, or OpenMP threads of concurrent processes fight (10x slower).
os.environ.setdefault("OMP_NUM_THREADS", "1")
# mixed_precision auto computes in bf16 where the CPU has native bf16 instructions: the suite's numbers (exact
# resumes, serve = predict, ...) would then depend on the machine. fp32 here, subprocesses included; the tests of
# auto itself (test_auto_precision.py) unset it.
os.environ.setdefault("BUDGETUNE_MIXED_PRECISION", "fp32")


def headline_rows() -> list[tuple[int, str]]:
    with open(HEADLINES, encoding="utf-8") as f:
        return [(int(r["label"]), r["text"]) for r in csv.DictReader(f)]


@pytest.fixture(scope="session")
def tiny_roberta(tmp_path_factory) -> Path:
    """A random 2-layer RoBERTa (hidden 32) saved as a model folder with a byte-level BPE tokenizer trained here."""
    from tiny_models import tiny_roberta

    return tiny_roberta(tmp_path_factory.mktemp("tiny-roberta"), [t for _, t in headline_rows()] * 2,
                        vocab_size=400, min_frequency=2)


@pytest.fixture(scope="session")
def tiny_encoder(tmp_path_factory):
    """model_type -> a random 2-layer encoder folder of that architecture (hidden 32), built once per session, with
    a tokenizer of its own kind: bert, electra, distilbert, mpnet, deberta-v2 or roberta."""
    from tiny_models import tiny_encoder as build

    built: dict[str, Path] = {}

    def get(model_type: str) -> Path:
        if model_type not in built:
            folder = tmp_path_factory.mktemp(f"tiny-{model_type}")
            built[model_type] = build(folder, model_type, [t for _, t in headline_rows()] * 2)
        return built[model_type]

    return get


@pytest.fixture(scope="session")
def headlines_csv(tmp_path_factory) -> Path:
    """The built-in headlines as a plain CSV file (label,text)."""
    path = tmp_path_factory.mktemp("data") / "headlines.csv"
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["label", "text"])
        w.writerows(headline_rows())
    return path


def run_cli(*args: str, cwd: Path | None = None, check: bool = True, env: dict | None = None,
            timeout: int = 900) -> subprocess.CompletedProcess:
    """Run `python -m budgetune ARGS` as a real subprocess."""
    full_env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1", **(env or {})}
    proc = subprocess.run([sys.executable, "-m", "budgetune", *args], cwd=cwd or ROOT, env=full_env,
                          capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"budgetune {' '.join(args)} exited {proc.returncode}\n{proc.stdout[-3000:]}\n"
                             f"{proc.stderr[-5000:]}")
    return proc


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def tiny_train_args(model: Path, data: Path, out: Path, method: str, **extra) -> list[str]:
    """CLI flags for a short, deterministic run of a tiny model."""
    flags = {"model_name_or_path": str(model), "dataset_name": str(data), "output_dir": str(out), "method": method,
             "rank": 4, "target_modules": "query,value", "num_train_epochs": 2, "per_device_train_batch_size": 16,
             "learning_rate": 5e-3, "max_seq_length": 48, "logging_steps": 2, "early_stopping_patience": "null",
             "cache_dir": str(out.parent / "cache"), "seed": 7}
    if method == "adalora":
        flags.update(tinit=4, tfinal=8, deltaT=2, target_r=2)
    flags.update(extra)
    args = ["train"]
    for k, v in flags.items():
        args += [f"--{k}", str(v)]
    return args


def write_csv(path: Path, header: list[str], rows) -> Path:
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(header)
        w.writerows(rows)
    return path


def wait_ready(get, timeout: float = 120) -> None:
    """Poll a served app's /health (`get`: a TestClient's or an HTTP client's get) until it answers 200."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        r = get("/health")
        if r.status_code == 200:
            return
        assert r.json()["status"] == "loading", r.json()
        time.sleep(0.05)
    raise AssertionError("server not ready in time")
