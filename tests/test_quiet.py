"""Every verb through the real CLI prints budgetune's own lines only; --verbose brings the libraries' output back;
a real error is still shown."""

from __future__ import annotations

import logging
import re
import shutil
import subprocess
import sys
import time

import pytest
from conftest import ROOT, run_cli, tiny_train_args, write_csv

from budgetune.cli.quiet import library_output

pytestmark = pytest.mark.slow  # trains tiny models in subprocesses

# What the libraries print: Python warnings (with their file and `warnings.warn(` line), transformers' weight-loading
# report and its progress bar.
CHATTER = re.compile(r"LOAD REPORT|\w+Warning: |warnings\.warn\(|optuna_warn\(|Loading weights|site-packages|"
                     r"\[transformers\]")
TINY = {"num_train_epochs": 1, "max_train_samples": 32, "rank": 2}


def assert_quiet(proc: subprocess.CompletedProcess) -> None:
    found = CHATTER.findall(proc.stdout + proc.stderr)
    assert not found, f"library output {found} in\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}"


def flags(**extra) -> list[str]:
    return [a for k, v in extra.items() for a in (f"--{k}", str(v))]


@pytest.fixture(scope="module")
def env(tiny_roberta, headlines_csv, tmp_path_factory) -> dict:
    """A run trained by the quiet CLI (the `train` verb's check), unlabelled texts, the tiny training flags."""
    root = tmp_path_factory.mktemp("quiet")
    run = root / "run"
    proc = run_cli(*tiny_train_args(tiny_roberta, headlines_csv, run, "lora", **TINY))
    texts = write_csv(root / "texts.csv", ["text"], [[f"unseen text number {i} about markets and games"]
                                                    for i in range(12)])
    train_flags = tiny_train_args(tiny_roberta, headlines_csv, root / "unused", "lora", **TINY)[1:]
    return {"root": root, "run": run, "train_proc": proc, "texts": texts, "data": headlines_csv,
            "train_flags": [a for a in train_flags if a not in ("--output_dir", str(root / "unused"))]}


def test_train_prints_no_library_output(env):
    assert_quiet(env["train_proc"])
    assert "trainable parameters" in env["train_proc"].stdout  # budgetune's own lines are there


VERBS = {
    "evaluate": lambda e: ["evaluate", str(e["run"]), "--data_file", str(e["data"])],
    "predict": lambda e: ["predict", str(e["run"]), "--input", str(e["texts"]), "--output", str(e["root"] / "p.csv")],
    "export": lambda e: ["export", str(e["run"]), "--adapter_scale", "0.5", "--output", str(e["root"] / "exported")],
    "plot": lambda e: ["plot", str(e["run"])],
    "params": lambda e: ["params", *e["train_flags"]],
    "plan": lambda e: ["plan", *e["train_flags"], "--budget", "5k"],
    "distill": lambda e: ["distill", "--teacher", str(e["run"]), *e["train_flags"], "--output_dir",
                          str(e["root"] / "distilled")],
    "selftrain": lambda e: ["selftrain", "--unlabeled_file", str(e["texts"]), "--self_training_rounds", "1",
                            *e["train_flags"], "--output_dir", str(e["root"] / "selftrained")],
    "search": lambda e: ["search", "--budget", "10k", "--n_trials", "1", *e["train_flags"], "--output_dir",
                         str(e["root"] / "searched")],
    "demo": lambda e: ["demo", *e["train_flags"], "--input", str(e["texts"]), "--output_dir", str(e["root"] / "demo")],
}


@pytest.mark.parametrize("verb", sorted(VERBS))
def test_each_verb_prints_no_library_output(env, verb):
    assert_quiet(run_cli(*VERBS[verb](env), cwd=env["root"]))


def test_serve_prints_no_library_output(env):
    """The adapters load in the background once the server listens: stopped only after /health says ready."""
    import httpx

    log = env["root"] / "serve.err"
    with open(log, "w") as err:
        proc = subprocess.Popen([sys.executable, "-m", "budgetune", "serve", str(env["run"]), "--port", "0"],
                                cwd=ROOT, stdout=subprocess.PIPE, stderr=err, text=True)
    try:
        url = re.search(r"listening on (http://[\d.]+:\d+)/", proc.stdout.readline()).group(1)
        deadline = time.monotonic() + 120
        while not httpx.get(f"{url}/health").json()["ready"] and time.monotonic() < deadline:
            time.sleep(0.2)
        proc.terminate()
        out = proc.communicate(timeout=60)[0]
    finally:
        if proc.poll() is None:
            proc.kill()
    assert_quiet(subprocess.CompletedProcess(proc.args, proc.returncode, out, log.read_text()))


def test_verbose_anywhere_on_the_line_shows_the_libraries_output(env):
    before = run_cli("--verbose", "evaluate", str(env["run"]), "--data_file", str(env["data"]))
    after = run_cli("params", *env["train_flags"], "--verbose")
    assert "LOAD REPORT" in before.stderr and "classifier" in before.stderr
    assert "FutureWarning" in after.stderr and "trainable parameters" in after.stdout


def test_a_real_error_is_still_shown(env):
    """A library's exception (a corrupt weights file) and a user error both reach the user in the quiet mode."""
    broken = env["root"] / "broken"
    shutil.copytree(env["run"], broken)
    (broken / "adapter" / "adapter_model.safetensors").write_bytes(b"not a safetensors file")
    proc = run_cli("evaluate", str(broken), "--data_file", str(env["data"]), check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert "the saved weights cannot be loaded (SafetensorError" in proc.stderr and str(broken) in proc.stderr
    proc = run_cli("evaluate", str(env["run"]), "--data_file", str(env["root"] / "missing.csv"), check=False)
    assert proc.returncode == 2 and "budgetune: error:" in proc.stderr and "missing.csv" in proc.stderr


def test_the_quiet_block_passes_library_errors_and_restores_everything():
    import warnings

    names = ("transformers", "datasets", "peft", "accelerate", "torch", "huggingface_hub")
    levels = {n: logging.getLogger(n).level for n in names}
    with library_output(verbose=False, progress_bars=False):
        assert all(logging.getLogger(n).isEnabledFor(logging.ERROR) for n in names)
        assert not any(logging.getLogger(n).isEnabledFor(logging.WARNING) for n in names)
        with warnings.catch_warnings(record=True) as seen:
            warnings.warn_explicit("chatter", FutureWarning, "x.py", 1, module="transformers.modeling_utils")
            warnings.warn_explicit("ours", UserWarning, "y.py", 1, module="budgetune.training.train")
        assert [str(w.message) for w in seen] == ["ours"]
    assert {n: logging.getLogger(n).level for n in names} == levels
    with library_output(verbose=True):
        assert logging.getLogger("transformers").level == levels["transformers"]
