"""Exact resume: a run killed with SIGKILL (or stopped by SIGTERM) and resumed ends where an uninterrupted run ends."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import ROOT, read_jsonl, run_cli, tiny_train_args
from safetensors.torch import load_file

pytestmark = pytest.mark.slow  # trains real models: `pytest -m "not slow"` skips the module

# 64 training rows in batches of 8: 8 optimizer steps per epoch, 3 epochs = 24 steps; AdaLoRA prunes over
# steps 4..16 and keeps its final pattern for the last 8. A checkpoint every 3 steps and at each epoch's evaluation.
RESUME_FLAGS = {"max_train_samples": 64, "per_device_train_batch_size": 8, "num_train_epochs": 3, "save_steps": 3,
                "deterministic": "true", "save_total_limit": 3}
TOTAL_STEPS = 24


def _args(tiny_roberta, headlines_csv, out: Path, method: str, **extra) -> list[str]:
    return tiny_train_args(tiny_roberta, headlines_csv, out, method, **{**RESUME_FLAGS, **extra})


def _popen(args: list[str], log: Path) -> subprocess.Popen:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen([sys.executable, "-m", "budgetune", *args], cwd=ROOT, env=env,
                            stdout=open(log.with_suffix(".out"), "w"), stderr=open(log.with_suffix(".err"), "w"))


def _checkpoint_steps(out: Path) -> list[int]:
    return sorted(int(p.name.split("-")[1]) for p in (out / "checkpoints").glob("step-*")
                  if (p / "state.pt").is_file())


def _wait_for(proc: subprocess.Popen, cond, what: str, timeout: float = 600) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if proc.poll() is not None:
            raise AssertionError(f"the run ended (exit {proc.returncode}) before {what}")
        if time.monotonic() > deadline:
            proc.kill()
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


def _events(out: Path, event: str) -> list[dict]:
    return [r for r in read_jsonl(out / "metrics.jsonl") if r["event"] == event]


def _max_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    assert a, "no tensors to compare"
    return max((x.float() - b[k].float()).abs().max().item() if x.numel() else 0.0 for k, x in a.items())


def assert_same_run(ref: Path, got: Path, method: str) -> None:
    """Training losses, final metrics, rank pattern, adapter weights and best state of two finished runs agree."""
    same = ("step", "epoch", "loss", "learning_rate", "grad_norm")  # not the throughput, which is timing
    train_got, train_ref = ([{k: e[k] for k in same} for e in _events(run, "train")] for run in (got, ref))
    assert train_got == train_ref  # the first line after the resume averages the same steps as the reference's
    assert _events(got, "eval") == _events(ref, "eval")
    assert len(_events(got, "eval")) == 3
    end_ref, end_got = _events(ref, "end"), _events(got, "end")
    assert len(end_got) == 1 and end_got[0] == end_ref[0]
    assert json.loads((got / "evaluation.json").read_text()) == json.loads((ref / "evaluation.json").read_text())
    cfg_ref = json.loads((ref / "adapter" / "adapter_config.json").read_text())
    cfg_got = json.loads((got / "adapter" / "adapter_config.json").read_text())
    assert cfg_got.get("rank_pattern") == cfg_ref.get("rank_pattern")
    if method == "adalora":
        assert cfg_ref["rank_pattern"], "AdaLoRA should have fixed a rank pattern by the end"
        assert end_ref[0]["final_ranks"]
    assert _max_diff(load_file(ref / "adapter" / "adapter_model.safetensors"),
                     load_file(got / "adapter" / "adapter_model.safetensors")) < 1e-6
    best_ref = torch.load(ref / "best_state.pt", map_location="cpu", weights_only=True)
    best_got = torch.load(got / "best_state.pt", map_location="cpu", weights_only=True)
    assert _max_diff(best_ref["model"], best_got["model"]) < 1e-6
    assert best_got["metrics"] == best_ref["metrics"]
    assert json.dumps(best_got["rank_pattern"], default=str) == json.dumps(best_ref["rank_pattern"], default=str)


@pytest.mark.parametrize("method", ["adalora", "lora"])
def test_sigkill_then_resume_is_exact(tiny_roberta, headlines_csv, tmp_path, method):
    ref_out, out = tmp_path / "reference", tmp_path / "killed"
    ref_args = _args(tiny_roberta, headlines_csv, ref_out, method)
    args = _args(tiny_roberta, headlines_csv, out, method)
    reference = _popen(ref_args, tmp_path / "reference")  # runs alongside the run that gets killed
    proc = _popen(args, tmp_path / "killed")
    try:
        # Past the first epoch's evaluation (step 8) and a save_steps checkpoint after it: mid-epoch 2.
        _wait_for(proc, lambda: any(s > 8 for s in _checkpoint_steps(out)), "a checkpoint in the second epoch")
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == -signal.SIGKILL
    assert not _events(out, "end"), "the killed run must not have finished"
    killed_at = max(_checkpoint_steps(out))
    assert killed_at < TOTAL_STEPS

    resumed = run_cli(*args, "--resume_from_checkpoint", "auto")
    m = re.search(r"resumed from (\S+) at step (\d+) \(epoch (\d+), batch (\d+)\)", resumed.stdout)
    assert m, resumed.stdout[-2000:]
    step, epoch, batch = int(m[2]), int(m[3]), int(m[4])
    assert step >= killed_at and step < TOTAL_STEPS and epoch >= 1
    assert batch > 0, "killed mid-epoch: the resume must skip into the epoch (skip_first_batches)"
    assert Path(m[1]).name == f"step-{step:06d}"
    assert reference.wait(timeout=900) == 0, (tmp_path / "reference.err").read_text()[-3000:]
    assert_same_run(ref_out, out, method)
    # metrics.jsonl holds each step's events once: the killed run's events after the checkpoint were dropped
    steps = [r["step"] for r in _events(out, "train")]
    assert steps == sorted(set(steps)) and steps[-1] == TOTAL_STEPS


def test_sigterm_checkpoints_and_resumes(tiny_roberta, headlines_csv, tmp_path):
    out = tmp_path / "run"
    args = _args(tiny_roberta, headlines_csv, out, "lora", save_steps=0)
    proc = _popen(args, tmp_path / "run")
    try:
        _wait_for(proc, lambda: (out / "metrics.jsonl").is_file() and _events(out, "train"), "training to start")
        proc.send_signal(signal.SIGTERM)
        rc = proc.wait(timeout=300)
    finally:
        proc.kill()
    err = (tmp_path / "run.err").read_text()
    assert rc == 130, err[-3000:]
    m = re.search(r"budgetune: stopped by signal 15 at step (\d+); checkpoint: (\S+)\. Resume with: budgetune train "
                  r"--config (\S+) --resume_from_checkpoint (\S+)", err)
    assert m, err[-3000:]
    step, folder = int(m[1]), Path(m[2])
    assert folder == out / "checkpoints" / f"step-{step:06d}" and (folder / "state.pt").is_file()
    assert Path(m[3]) == out / "config.yaml" and Path(m[4]) == out
    assert 0 < step < TOTAL_STEPS
    assert not _events(out, "end")

    # The command it prints works as printed.
    resumed = run_cli("train", "--config", m[3], "--resume_from_checkpoint", m[4])
    assert f"resumed from {folder} at step {step}" in resumed.stdout
    assert len(_events(out, "end")) == 1
    assert [r["step"] for r in _events(out, "eval")] == [8, 16, 24]
    assert (out / "adapter" / "adapter_model.safetensors").is_file()


class KilledAfterBest(Exception):
    """Stands for a kill right after a validation's best adapter was written, before its checkpoint."""


def test_resume_from_an_earlier_checkpoint_ships_the_best_it_reports(tiny_roberta, headlines_csv, tmp_path,
                                                                      monkeypatch):
    """The killed run wrote a later best into adapter/ and best_state.pt; the resumed run (from a checkpoint that
    knew only an earlier best) never beats that earlier best, as a continuation that is not bit-exact (a GPU run
    without --deterministic) may not: adapter/, best_state.pt, evaluation.json and the reported best step must
    all be the checkpoint's best."""
    from budgetune.config import resolve
    from budgetune.inference.loading import load_model
    from budgetune.training import train as train_mod

    out = tmp_path / "run"
    args = _args(tiny_roberta, headlines_csv, out, "lora", num_train_epochs=1, eval_strategy="steps", eval_steps=2,
                 save_steps=0, save_total_limit=10, metric_for_best_model="loss", robust_tolerance="null",
                 learning_rate=5e-2)  # validation loss at steps 2, 4, 6: best, worse, best
    cfg = resolve(None, args[1:])

    def kill_at_step_6(step: int, metrics: dict) -> None:
        if step == 6:
            raise KilledAfterBest

    with pytest.raises(KilledAfterBest):
        train_mod.train(cfg, on_evaluate=kill_at_step_6)
    assert _checkpoint_steps(out) == [2, 4]
    assert torch.load(out / "best_state.pt", map_location="cpu")["metrics"]["step"] == 6  # a later best, written
    earlier = torch.load(out / "checkpoints" / "step-000004" / "state.pt", map_location="cpu")["best"]
    assert earlier["metrics"]["step"] == 2

    real_validate = train_mod.validate

    def never_better(run) -> dict:  # the continuation's validations all fall short of step 2's
        return {**real_validate(run), "loss": earlier["metrics"]["eval_loss"] + 1.0}

    monkeypatch.setattr(train_mod, "validate", never_better)
    cfg = resolve(None, [*args[1:], "--resume_from_checkpoint", "auto"])  # step 4, which knew step 2's best
    result = train_mod.train(cfg)

    assert result["best_step"] == 2 and _events(out, "end")[0]["best_step"] == 2
    best = torch.load(out / "best_state.pt", map_location="cpu")
    assert best["metrics"] == earlier["metrics"] and _max_diff(best["model"], earlier["model"]) == 0
    shipped, _, info = load_model(out, merge=False)
    assert info["metrics"] == earlier["metrics"]
    params = dict(shipped.named_parameters())
    assert _max_diff({k: params[k].detach() for k in earlier["model"]}, earlier["model"]) == 0
    evaluation = json.loads((out / "evaluation.json").read_text())
    assert evaluation["loss"] == pytest.approx(earlier["metrics"]["eval_loss"], abs=1e-5)
    assert evaluation["accuracy"] == earlier["metrics"]["eval_accuracy"]


def test_auto_in_a_folder_with_a_run_but_no_checkpoint_says_so(tiny_roberta, headlines_csv, tmp_path):
    """Killed before its first checkpoint: the message used to tell the user to pass the flag they had passed."""
    out = tmp_path / "run"
    out.mkdir()
    (out / "config.yaml").write_text("# a run killed before its first checkpoint\n")
    (out / "metrics.jsonl").write_text('{"event": "budget", "step": 0}\n')
    proc = run_cli(*_args(tiny_roberta, headlines_csv, out, "lora"), "--resume_from_checkpoint", "auto", check=False)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert f"{out} holds a run but no checkpoint to resume from" in proc.stderr and "--overwrite_output_dir" in proc.stderr


def test_resuming_twice_from_one_checkpoint_keeps_one_header_per_session(tmp_path):
    """Each resume logs the precision it computes in at its step; a second resume from the same checkpoint (the
    first was killed before the next one) replaces the first's header instead of adding a second."""
    from budgetune.training.runlog import MetricsLog, read_metrics

    log = MetricsLog(tmp_path / "metrics.jsonl")
    log.log("precision", step=0, precision="bf16")
    log.log("train", step=4, loss=1.0)
    for session in ("fp32", "bf16"):  # two resumes from the checkpoint of step 4, each killed at step 6
        log.truncate_after(4)
        log.log("precision", step=4, precision=session)
        log.log("train", step=6, loss=0.5)
    log.truncate_after(4)
    assert [(r["event"], r["step"]) for r in read_metrics(tmp_path / "metrics.jsonl")] == [("precision", 0),
                                                                                          ("train", 4)]


def test_a_checkpoint_resumes_only_with_the_loss_it_trained_with(tmp_path, capsys):
    """check_loss: a recipe's loss identity must match on resume; values under NOTED only print a note."""
    from budgetune.errors import CheckpointError
    from budgetune.training.checkpoint import NOTED, check_loss
    from budgetune.training.train import PLAIN_LOSS

    kd = {"recipe": "budgetune distill", "alpha": 0.5, NOTED: {"teacher precisions": ["bf16"]}}
    check_loss(None, kd, tmp_path)  # written before the record existed
    check_loss(PLAIN_LOSS, dict(PLAIN_LOSS), tmp_path)
    with pytest.raises(CheckpointError, match=r"trained by `budgetune distill` with its own loss; resume it with that "
                                              r"command and --resume_from_checkpoint auto \(`budgetune train` would"):
        check_loss(kd, PLAIN_LOSS, tmp_path)
    with pytest.raises(CheckpointError, match=r"trained by `budgetune train` .*\(`budgetune distill` would"):
        check_loss(PLAIN_LOSS, kd, tmp_path)
    with pytest.raises(CheckpointError, match=r"Differences: alpha: checkpoint 0.5, now 0.7\. hint"):
        check_loss(kd, {**kd, "alpha": 0.7}, tmp_path, "hint")
    assert capsys.readouterr().err == ""
    check_loss(kd, {**kd, NOTED: {"teacher precisions": ["fp32"]}}, tmp_path)
    assert "with teacher precisions ['fp32'] where it trained with ['bf16']" in capsys.readouterr().err
