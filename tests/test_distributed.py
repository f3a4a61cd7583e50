"""Two processes on CPU (gloo), launched for real with torchrun and accelerate launch.

One module-scoped pair of training runs (2 processes x 8 and 1 process x 16: the same global batch) serves the
rank-consistency and equivalence tests; evaluate and predict compare 2 processes against 1, row for row.
Dropout is off in the model and the adapter so that the two setups compute the same numbers up to float
rounding (dropout masks are drawn per process, so with dropout on the two runs would only agree statistically).
"""

from __future__ import annotations

import csv
import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import ROOT, headline_rows, tiny_train_args

pytestmark = [pytest.mark.skipif(not torch.distributed.is_available() or not torch.distributed.is_gloo_available(),
                                 reason="needs torch.distributed with gloo"),
              pytest.mark.slow]  # several processes train: `pytest -m "not slow"` skips the module

# One thread per process: two processes share this machine's cores, and the single-process references must run
# the same kernels as the ranks for bitwise-equal inference.
ENV = {"HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1", "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(*args: str) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
            "--master_port", str(free_port()), "-m", "budgetune", *args]


def accelerate_launch(*args: str) -> list[str]:
    return [sys.executable, "-m", "accelerate.commands.launch", "--cpu", "--num_processes", "2", "--num_machines", "1",
            "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(free_port()),
            "-m", "budgetune", *args]


def single(*args: str) -> list[str]:
    return [sys.executable, "-m", "budgetune", *args]


def run_all(*commands: list[str], env: dict | None = None, timeout: int = 600) -> None:
    """Run the commands concurrently; fail with the output of any that fails."""
    full_env = {**os.environ, **ENV, **(env or {})}
    for k in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_PORT", "MASTER_ADDR"):
        full_env.pop(k, None)
    procs = [subprocess.Popen(c, cwd=ROOT, env=full_env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for c in commands]
    failures = []
    for c, p in zip(commands, procs):
        try:
            out, _ = p.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            p.kill()
            out, _ = p.communicate()
        if p.returncode != 0:
            failures.append(f"{' '.join(c)} exited {p.returncode}\n{out[-6000:]}")
    if failures:
        raise AssertionError("\n\n".join(failures))


@pytest.fixture(scope="module")
def no_dropout_model(tiny_roberta, tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("tiny-roberta-nodropout")
    for f in tiny_roberta.iterdir():
        shutil.copy(f, folder / f.name)
    cfg = json.loads((folder / "config.json").read_text())
    cfg.update(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    (folder / "config.json").write_text(json.dumps(cfg))
    return folder


@pytest.fixture(scope="module")
def runs(no_dropout_model, headlines_csv, tmp_path_factory) -> dict[str, Path]:
    """AdaLoRA with allocation inside the run: 2 processes x 8 (torchrun) and 1 process x 16, concurrently."""
    base = tmp_path_factory.mktemp("dist")
    out, commands = {}, []
    for name, per_device in (("two", 8), ("one", 16)):
        out[name] = base / name
        args = tiny_train_args(no_dropout_model, headlines_csv, base / name, "adalora",
                               per_device_train_batch_size=per_device, lora_dropout=0.0, learning_rate=2e-2,
                               num_train_epochs=2, cache_dir=str(base / f"cache-{name}"))
        commands.append(torchrun(*args) if name == "two" else single(*args))
    run_all(*commands)
    return out


def last_checkpoint(run: Path) -> dict:
    """The state of the run's last step, as the main process saved it (every evaluation writes a checkpoint)."""
    folder = sorted((run / "checkpoints").glob("step-*"))[-1]
    return torch.load(folder / "state.pt", map_location="cpu", weights_only=True)


def end_event(run: Path) -> dict:
    events = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return next(e for e in events if e["event"] == "end")


def test_ranks_end_identical(runs):
    """Every process ends with the same weights (one checksum each, gathered into the end event)."""
    digests = end_event(runs["two"])["replica_digests"]
    assert len(digests) == 2 and digests[0] == digests[1]
    assert end_event(runs["one"])["replica_digests"] and len(end_event(runs["one"])["replica_digests"]) == 1
    # allocation really happened (target_r 2 of rank 4)
    pattern = last_checkpoint(runs["two"])["allocator"]["rank_pattern"]
    assert pattern and any(not all(m) for m in pattern.values())


def test_schedule_matches_single_process(runs):
    """Same global batch -> same optimizer steps per epoch, total steps (AdaLoRA's total_step) and batch count."""
    two, one = last_checkpoint(runs["two"]), last_checkpoint(runs["one"])
    assert two["world"]["num_processes"] == 2 and one["world"]["num_processes"] == 1
    for k in ("steps_per_epoch", "total_steps"):
        assert two["world"][k] == one["world"][k], k
    assert two["progress"]["step"] == one["progress"]["step"] == one["world"]["total_steps"]
    assert two["progress"]["epoch"] == one["progress"]["epoch"] == 2
    # 432 training rows / global batch 16 = 27 steps per epoch
    assert one["world"]["steps_per_epoch"] == 27


def test_two_processes_match_one(runs):
    """2 x 8 forms the same global batches as 1 x 16 (shard-aware sampler): same training up to float rounding."""
    two, one = last_checkpoint(runs["two"]), last_checkpoint(runs["one"])
    e2, e1 = (json.loads((runs[k] / "evaluation.json").read_text()) for k in ("two", "one"))
    assert e2["n"] == e1["n"]
    assert abs(e2["accuracy"] - e1["accuracy"]) <= 0.03
    assert abs(e2["loss"] - e1["loss"]) <= 0.02
    assert two["allocator"]["rank_pattern"] == one["allocator"]["rank_pattern"]
    for n in two["model"]:
        assert torch.allclose(two["model"][n], one["model"][n], atol=5e-2), n
    # only the main process wrote the run's files: one metrics log, one evaluation
    events = [json.loads(line) for line in (runs["two"] / "metrics.jsonl").read_text().splitlines()]
    assert sum(e["event"] == "end" for e in events) == 1
    steps = [e["step"] for e in events if e["event"] == "train"]
    assert steps == sorted(set(steps))


def test_resume_with_another_process_count_is_refused(runs, tmp_path):
    """A checkpoint of 2 processes x 8 resumed by 1 process x 8 would halve the global batch: refused, named."""
    run = tmp_path / "copy"
    shutil.copytree(runs["two"], run)
    proc = subprocess.run(single("train", "--config", str(run / "config.yaml"), "--output_dir", str(run),
                                 "--resume_from_checkpoint", str(run)), capture_output=True, text=True,
                          env={**os.environ, "HF_HUB_OFFLINE": "1"}, timeout=600)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "processes (launcher): checkpoint 2, now 1" in proc.stderr
    assert "optimizer steps per epoch: checkpoint 27, now 54" in proc.stderr


@pytest.fixture(scope="module")
def inference_files(tmp_path_factory) -> dict[str, Path]:
    """101 rows: with batch 7 that is 15 batches, not divisible by 2 processes, and a short last batch."""
    folder = tmp_path_factory.mktemp("infer")
    rows = headline_rows()[:101]
    with open(folder / "labelled.csv", "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["label", "text"])
        w.writerows(rows)
    with open(folder / "texts.csv", "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["text"])
        w.writerows([t] for _, t in rows)
    return {"labelled": folder / "labelled.csv", "texts": folder / "texts.csv", "dir": folder}


def test_evaluate_and_predict_match_single_process(runs, inference_files):
    d, run = inference_files["dir"], runs["two"]
    run_all(
        torchrun("evaluate", str(run), "--data_file", str(inference_files["labelled"]), "--output", str(d / "eval2"),
                 "--per_device_eval_batch_size", "7"),
        accelerate_launch("predict", str(run), "--input", str(inference_files["texts"]), "--output",
                          str(d / "sub2.csv"), "--per_device_eval_batch_size", "7", "--label_format", "name"),
    )
    # The single-process references run in this process (one thread, like each rank): saves two interpreter starts.
    from budgetune.inference.evaluate import evaluate
    from budgetune.inference.predict import predict

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        evaluate(run, str(inference_files["labelled"]), batch_size=7, output=str(d / "eval1"),
                 cache_dir=str(d / "cache"))
        predict(run, str(inference_files["texts"]), str(d / "sub1.csv"), label_format="name", batch_size=7,
                cache_dir=str(d / "cache"))
    finally:
        torch.set_num_threads(threads)
    m1, m2 = (json.loads((d / f"eval{i}.json").read_text()) for i in (1, 2))
    assert m1["n"] == m2["n"] == 101
    for k in ("accuracy", "macro_f1", "per_class", "confusion_matrix"):
        assert m1[k] == m2[k], k
    assert m2["loss"] == pytest.approx(m1["loss"], abs=1e-6)  # same batches, same kernels: equal up to rounding
    sub1, sub2 = (d / "sub1.csv").read_text(), (d / "sub2.csv").read_text()
    assert sub1 == sub2
    lines = sub2.splitlines()
    assert lines[0] == "ID,Label" and [int(x.split(",")[0]) for x in lines[1:]] == list(range(101))
