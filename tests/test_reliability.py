"""Failures that must not lose work: a torn checkpoint save, a non-finite loss, out of memory, an occupied run
folder, and hostile or broken input (each a clear error naming the file and place, with existing outputs untouched)."""

from __future__ import annotations

import json
import os
import pickle
import re
import shutil
import signal
import struct
import types
from pathlib import Path

import pytest
import torch
from conftest import read_jsonl, run_cli, tiny_train_args

from budgetune import cli
from budgetune.data import readers as data_lib
from budgetune.data import unlabeled
from budgetune.errors import ModelLoadError
from budgetune.modeling import backbone, methods
from budgetune.training import checkpoint

pytestmark = pytest.mark.slow  # trains real models: `pytest -m "not slow"` skips the module

SMALL = {"max_train_samples": 64, "per_device_train_batch_size": 8, "save_steps": 3}  # 8 steps/epoch, 16 steps


def main(capsys, *args: str) -> tuple[int, str]:
    """The CLI's own entry point, in this process: (exit code, stderr)."""
    capsys.readouterr()
    rc = cli.main(list(args))
    return rc, capsys.readouterr().err


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def events(out: Path, event: str) -> list[dict]:
    return [r for r in read_jsonl(out / "metrics.jsonl") if r["event"] == event]


@pytest.fixture(scope="module")
def finished_run(tiny_roberta, headlines_csv, tmp_path_factory) -> Path:
    """A small finished LoRA run (one epoch, 2 steps) with its adapter, checkpoint and a submission.csv."""
    out = tmp_path_factory.mktemp("finished") / "run"
    args = tiny_train_args(tiny_roberta, headlines_csv, out, "lora", max_train_samples=32, num_train_epochs=1)
    assert cli.main(args) == 0
    (out / "submission.csv").write_text("ID,Label\n0,1\n")
    return out


@pytest.fixture
def run_copy(finished_run, tmp_path) -> Path:
    """A private copy of the finished run, for a test that should leave it as it is."""
    dst = tmp_path / "run"
    shutil.copytree(finished_run, dst)
    return dst


# ---------------------------------------------------------------------------------------------- torn save


def test_failed_checkpoint_save_keeps_previous_and_resumes(tiny_roberta, headlines_csv, tmp_path, monkeypatch):
    out = tmp_path / "run"
    args = tiny_train_args(tiny_roberta, headlines_csv, out, "lora", **SMALL)
    real_save = torch.save
    calls = []

    def failing_save(obj, f, *a, **k):
        if Path(str(f)).name == "state.pt":
            calls.append(f)
            if len(calls) == 3:  # the checkpoint of step 8: write half of it, then the disk is full
                real_save(obj, f, *a, **k)
                data = Path(f).read_bytes()
                Path(f).write_bytes(data[: len(data) // 2])
                raise OSError(28, "No space left on device")
        return real_save(obj, f, *a, **k)

    monkeypatch.setattr(torch, "save", failing_save)
    with pytest.raises(OSError, match="No space left"):
        cli.main(args)
    monkeypatch.setattr(torch, "save", real_save)

    ckpts = out / "checkpoints"
    assert sorted(p.name for p in ckpts.iterdir()) == ["step-000003", "step-000006"]  # no torn step-000008
    found = checkpoint.find("auto", out)
    assert found == ckpts / "step-000006"
    state = checkpoint.load(found)
    assert state["progress"]["step"] == 6 and state["progress"]["batches_done"] == 6

    assert cli.main([*args, "--resume_from_checkpoint", "auto"]) == 0
    assert [r["step"] for r in events(out, "eval")] == [8, 16]
    assert len(events(out, "end")) == 1
    assert (out / "adapter" / "adapter_model.safetensors").is_file()


def test_checkpoint_save_is_atomic_when_interrupted(tiny_roberta, headlines_csv, tmp_path, monkeypatch):
    """A crash inside checkpoint.save after part of the temporary folder is written: the old folder still loads."""
    out = tmp_path / "run"
    args = tiny_train_args(tiny_roberta, headlines_csv, out, "lora", max_steps=4, save_steps=2, **{
        k: v for k, v in SMALL.items() if k != "save_steps"})
    n = {"calls": 0}

    def crash_on_second(obj, *a, **k):  # progress.json is written after state.pt: crash between the two files
        n["calls"] += 1
        if n["calls"] == 2:
            raise RuntimeError("crash while saving")
        return json.dumps(obj, *a, **k)

    monkeypatch.setattr(checkpoint, "json", types.SimpleNamespace(dumps=crash_on_second))
    with pytest.raises(RuntimeError, match="crash while saving"):
        cli.main(args)
    monkeypatch.undo()
    assert n["calls"] == 2
    assert [p.name for p in (out / "checkpoints").iterdir()] == ["step-000002"]
    assert checkpoint.load(out / "checkpoints" / "step-000002")["progress"]["step"] == 2
    assert cli.main([*args, "--resume_from_checkpoint", str(out)]) == 0
    assert [r["step"] for r in events(out, "eval")] == [4]


# ------------------------------------------------------------------------------- non-finite loss, OOM


def _poison_forward(monkeypatch, at_call: int, effect) -> None:
    """Make the model's `at_call`-th training forward pass misbehave (effect(output) -> output)."""
    real_wrap = methods.wrap

    def wrap(*a, **k):
        model = real_wrap(*a, **k)
        forward, count = model.forward, {"n": 0}

        def poisoned(*args, **kwargs):
            out = forward(*args, **kwargs)
            if model.training:
                count["n"] += 1
                if count["n"] == at_call:
                    out = effect(out)
            return out

        model.forward = poisoned
        return model

    monkeypatch.setattr(methods, "wrap", wrap)


def test_nonfinite_loss_names_step_and_usable_checkpoint(tiny_roberta, headlines_csv, tmp_path, monkeypatch, capsys):
    out = tmp_path / "run"
    args = tiny_train_args(tiny_roberta, headlines_csv, out, "lora", **SMALL)

    def nan_loss(o):
        o.loss = o.loss * float("nan")
        return o

    _poison_forward(monkeypatch, 5, nan_loss)
    rc, err = main(capsys, *args)
    monkeypatch.undo()
    assert rc == 2
    good = out / "checkpoints" / "step-000003"
    # The loss is read back once per logging window (2 steps), never per step: the message names the window.
    assert (f"budgetune: error: non-finite training loss (nan) between steps 5 and 6; lower --learning_rate or "
            f"check the data. "
            f"Last good checkpoint: {good}\n") in err
    assert not events(out, "end")
    rc, err = main(capsys, *args, "--resume_from_checkpoint", str(good))
    assert rc == 0, err[-3000:]
    assert [r["step"] for r in events(out, "eval")] == [8, 16]
    assert [r["step"] for r in events(out, "train")] == [2, 4, 6, 8, 10, 12, 14, 16]


@pytest.mark.parametrize("at_step, with_signal", [(6, False), (5, True)])
def test_nonfinite_gradient_with_finite_loss_is_never_checkpointed(at_step, with_signal, tiny_roberta, headlines_csv,
                                                                    tmp_path, monkeypatch, capsys):
    """A step whose loss is finite but whose gradient is NaN breaks the weights it updates: the checkpoint due at that
    step (step 6: --save_steps 3), or the one a stop signal arriving at it (step 5) would write, must not be written,
    and the error must name the one before it, from which the run resumes."""
    out = tmp_path / "run"
    args = tiny_train_args(tiny_roberta, headlines_csv, out, "lora", **SMALL)

    def nan_gradient(o):  # sqrt at 0: the value is 0, its derivative infinite, times 0: a NaN gradient
        if with_signal:
            os.kill(os.getpid(), signal.SIGTERM)  # budgetune's handler only notes it; the loop stops after this step
        o.loss = o.loss + (o.logits * 0).sum().sqrt()
        return o

    _poison_forward(monkeypatch, at_step, nan_gradient)
    rc, err = main(capsys, *args)
    monkeypatch.undo()
    assert rc == 2
    good = out / "checkpoints" / "step-000003"
    assert (f"budgetune: error: non-finite gradient norm (nan) applied by step {at_step} (its loss was finite); lower "
            f"--learning_rate or check the data. Last good checkpoint: {good}\n") in err
    assert "stopped by signal" not in err
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-000003"]
    rc, err = main(capsys, *args, "--resume_from_checkpoint", "auto")
    assert rc == 0, err[-3000:]
    assert [r["step"] for r in events(out, "eval")] == [8, 16]


def test_out_of_memory_names_batch_size_and_flag(tiny_roberta, headlines_csv, tmp_path, monkeypatch, capsys):
    out = tmp_path / "run"
    args = tiny_train_args(tiny_roberta, headlines_csv, out, "lora", **SMALL)

    def oom(o):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    _poison_forward(monkeypatch, 1, oom)
    rc, err = main(capsys, *args)
    assert rc == 2
    assert ("budgetune: error: out of GPU memory at step 1 with --per_device_train_batch_size 8; lower it (and raise "
            "--gradient_accumulation_steps to keep the global batch) or lower --max_seq_length.") in err


# ------------------------------------------------------------------------------------------ run folder


def test_existing_run_is_not_overwritten(tiny_roberta, headlines_csv, run_copy):
    before = snapshot(run_copy)
    args = tiny_train_args(tiny_roberta, headlines_csv, run_copy, "lora", max_train_samples=32, num_train_epochs=1)
    proc = run_cli(*args, check=False)
    assert proc.returncode == 2
    assert proc.stderr.endswith(
        f"budgetune: error: {run_copy} already holds a run; pass --overwrite_output_dir to replace it, "
        "--resume_from_checkpoint auto to continue it, or choose another --output_dir\n")
    assert snapshot(run_copy) == before


# ------------------------------------------------------------------------------------- hostile input

BAD_FILES = {  # name: (bytes, expected message after "budgetune: error: PATH"), PATH being the file
    "empty": (b"", ": the file is empty"),
    "missing_column": (b"label,body\n0,hello\n1,world\n",
                       ": no text column found (columns: label, body); set --text_column_name"),
    "out_of_range_label": (b"label,text\n0,a\n3,b\n9,c\n",
                           ", row 3: label 9 is not one of 0..3 (World, Sports, Business, Sci/Tech)"),
    "unknown_label": (b"label,text\nWorld,a\nWeather,b\n",
                      ", row 2: label 'Weather' is not one of World, Sports, Business, Sci/Tech"),
    "not_utf8": (b"label,text\n0,caf\xe9 au lait\n", ": not UTF-8 text (invalid byte 0xe9 at offset 16, line 2)"),
    "field_count": (b"label,text\n0,fine\n1,too,many\n", ", line 3: expected 2 fields, found 3"),
    "stray_quote": (b'label,text\n0,fine\n1,"quoted"then text\n', ", line 3: malformed CSV"),
    "nul_byte": (b"label,text\n0,fine\n1,a\x00b\n", ", line 3: contains a NUL byte"),
}


@pytest.mark.parametrize("case", sorted(BAD_FILES))
def test_broken_training_data_is_refused_and_run_untouched(case, tiny_roberta, run_copy, tmp_path, capsys):
    content, message = BAD_FILES[case]
    bad = tmp_path / f"{case}.csv"
    bad.write_bytes(content)
    before = snapshot(run_copy)
    args = tiny_train_args(tiny_roberta, bad, run_copy, "lora", overwrite_output_dir="true",
                           label_names="World,Sports,Business,Sci/Tech")
    rc, err = main(capsys, *args)
    assert rc == 2
    assert f"budgetune: error: {bad}{message}" in err, err[-2000:]
    assert snapshot(run_copy) == before


def test_broken_data_through_the_real_cli(tiny_roberta, run_copy, tmp_path):
    """The same refusal in a real process, for training and prediction: exit 2, one line on stderr."""
    bad = tmp_path / "latin1.csv"
    bad.write_bytes(b"label,text\n0,ok\n1,na\xefve\n")
    before = snapshot(run_copy)
    proc = run_cli(*tiny_train_args(tiny_roberta, bad, run_copy, "lora", overwrite_output_dir="true"), check=False)
    assert proc.returncode == 2
    assert proc.stderr.endswith(f"budgetune: error: {bad}: not UTF-8 text (invalid byte 0xef at offset 20, line 3)\n")
    proc = run_cli("predict", str(run_copy), "--input", str(bad), check=False)
    assert proc.returncode == 2
    assert proc.stderr.endswith(f"budgetune: error: {bad}: not UTF-8 text (invalid byte 0xef at offset 20, line 3)\n")
    assert snapshot(run_copy) == before


@pytest.mark.parametrize("case", ["empty", "not_utf8", "nul_byte", "stray_quote"])
def test_broken_prediction_input_leaves_submission(case, run_copy, tmp_path, capsys):
    content, message = BAD_FILES[case]
    bad = tmp_path / f"{case}.csv"
    bad.write_bytes(content)
    before = snapshot(run_copy)
    rc, err = main(capsys, "predict", str(run_copy), "--input", str(bad))
    assert rc == 2
    assert f"budgetune: error: {bad}{message}" in err
    assert snapshot(run_copy) == before


def test_several_megabyte_text_trains_and_predicts(tiny_roberta, headlines_csv, tmp_path, capsys):
    huge = "stocks rally as rates fall " * 200_000  # 5.4 MB in one field
    rows = headlines_csv.read_text(encoding="utf-8").splitlines()
    data = tmp_path / "huge.csv"
    data.write_text("\n".join([rows[0], f'2,"{huge}"', *rows[1:]]) + "\n", encoding="utf-8")
    assert data.stat().st_size > 5_000_000
    out = tmp_path / "run"
    rc, err = main(capsys, *tiny_train_args(tiny_roberta, data, out, "lora", max_train_samples=32,
                                            num_train_epochs=1))
    assert rc == 0, err[-3000:]
    inputs = tmp_path / "texts.csv"
    inputs.write_text(f'text\n"{huge}"\nshort headline\n', encoding="utf-8")
    rc, err = main(capsys, "predict", str(out), "--input", str(inputs), "--output", str(tmp_path / "sub.csv"))
    assert rc == 0, err[-3000:]
    lines = (tmp_path / "sub.csv").read_text().splitlines()
    assert lines[0] == "ID,Label" and [line.split(",")[0] for line in lines[1:]] == ["0", "1"]


SURROGATE = "holds a lone UTF-16 surrogate ('\\ud800', character {at}), which is not Unicode text"
HOSTILE_INPUTS = {  # file name: (bytes, expected message after "budgetune: error: PATH"); labelled for every verb
    "surrogate.jsonl": (b'{"text": "fine", "label": 0}\n{"text": "bad \\ud800", "label": 1}\n',
                        ", line 2: 'bad \\ud800' " + SURROGATE.format(at=5)),
    "surrogate.json": (b'[{"text": "fine", "label": 0}, {"text": "\\ud800", "label": 1}]',
                       ", row 2: '\\ud800' " + SURROGATE.format(at=1)),
    "deep.json": (b'[{"text": "fine", "label": 0, "x": ' + b"[" * 50_000 + b"]" * 50_000 + b"}]",
                  ": invalid JSON (nested more deeply than Python's JSON parser allows)"),
    "not_utf8.jsonl": (b'{"text": "fine", "label": 0}\n{"text": "caf\xe9", "label": 1}\n',
                       ": not UTF-8 text (invalid byte 0xe9 at offset 42, line 2)"),
}


def test_surrogate_in_prediction_input_through_the_real_cli(run_copy, tmp_path):
    """It died with a UnicodeEncodeError traceback (exit 1); now one line naming the file and line, exit 2."""
    content, message = HOSTILE_INPUTS["surrogate.jsonl"]
    bad = tmp_path / "x.jsonl"
    bad.write_bytes(content)
    before = snapshot(run_copy)
    proc = run_cli("predict", str(run_copy), "--input", str(bad), check=False)
    assert (proc.returncode, proc.stderr.splitlines()[-1]) == (2, f"budgetune: error: {bad}{message}"), proc.stderr
    assert "Traceback" not in proc.stderr
    assert snapshot(run_copy) == before


@pytest.mark.parametrize("verb", ["predict", "evaluate", "train", "unlabeled"])
@pytest.mark.parametrize("case", sorted(HOSTILE_INPUTS))
def test_hostile_input_is_refused_by_every_verb(case, verb, tiny_roberta, run_copy, tmp_path, capsys):
    """One check in the data layer serves predict --input, evaluate --data_file, train --dataset_name and the
    unlabelled files of distill and selftrain."""
    content, message = HOSTILE_INPUTS[case]
    bad = tmp_path / case
    bad.write_bytes(content)
    before = snapshot(run_copy)
    if verb == "unlabeled":
        with pytest.raises(data_lib.DataError) as info:
            unlabeled.load_texts(str(bad))
        assert str(info.value) == f"--unlabeled_file: {bad}{message}"
        return
    args = {"predict": ["predict", str(run_copy), "--input", str(bad)],
            "evaluate": ["evaluate", str(run_copy), "--data_file", str(bad)],
            "train": tiny_train_args(tiny_roberta, bad, run_copy, "lora", overwrite_output_dir="true")}[verb]
    rc, err = main(capsys, *args)
    assert (rc, err.splitlines()[-1]) == (2, f"budgetune: error: {bad}{message}"), err[-2000:]
    assert snapshot(run_copy) == before


@pytest.mark.parametrize("stream", [False, True])
def test_blank_texts_are_predicted_kept_and_warned_once(stream, run_copy, tmp_path, capsys, monkeypatch):
    """Empty or whitespace-only texts keep their rows (so IDs stay aligned); one warning counts them, whatever the
    number of chunks, and names the first rows."""
    if stream:  # several chunks: the count and the rows run on across them
        monkeypatch.setattr(data_lib, "STREAM_BYTES", 0)
        monkeypatch.setattr(data_lib, "CHUNK_ROWS", 4)
    blank = [2, 3, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14]
    texts = ["" if r in blank[::2] else " \t " if r in blank else f"headline {r}" for r in range(1, 16)]
    inputs, sub = tmp_path / "texts.csv", tmp_path / "sub.csv"
    inputs.write_text("id,text\n" + "".join(f"a{r},{t}\n" for r, t in enumerate(texts, 1)), encoding="utf-8")
    rc, err = main(capsys, "predict", str(run_copy), "--input", str(inputs), "--output", str(sub), "--id_column", "id")
    assert rc == 0, err[-2000:]
    assert [line.split(",")[0] for line in sub.read_text().splitlines()] == ["ID"] + [f"a{r}" for r in range(1, 16)]
    warnings = [line for line in err.splitlines() if line.startswith("budgetune: warning:")]
    assert warnings == [f"budgetune: warning: {inputs}: 12 rows with empty or whitespace-only text (rows 2, 3, 5, "
                        "6, 7, 8, 9, 10, 11, 12, ...), predicted from no text at all and kept in the submission"]


@pytest.mark.parametrize("yaml_text, message", [
    ("train:\n  learning_rat: 0.1\n", "unknown key 'learning_rat' in section 'train' (did you mean 'learning_rate'?)"),
    ("train:\n  per_device_train_batch_size: many\n",
     "train.per_device_train_batch_size: expected an integer, got 'many'"),
    ("trian:\n  seed: 1\n", "unknown section 'trian' (did you mean 'train'?)"),
])
def test_bad_config_file(yaml_text, message, run_copy, tmp_path, capsys):
    cfg = tmp_path / "config.yaml"
    cfg.write_text(yaml_text + f"output:\n  output_dir: {run_copy}\n  overwrite_output_dir: true\n")
    before = snapshot(run_copy)
    rc, err = main(capsys, "train", "--config", str(cfg))
    assert rc == 2
    assert f"budgetune: error: {cfg}: {message}" in err, err
    assert snapshot(run_copy) == before


def test_model_folder_without_weights(tiny_roberta, headlines_csv, run_copy, tmp_path, capsys):
    folder = tmp_path / "no-weights"
    shutil.copytree(tiny_roberta, folder, ignore=shutil.ignore_patterns("*.safetensors", "*.bin"))
    before = snapshot(run_copy)
    rc, err = main(capsys, *tiny_train_args(folder, headlines_csv, run_copy, "lora", overwrite_output_dir="true"))
    assert rc == 2
    assert (f"budgetune: error: {folder}: no model weights (model.safetensors or pytorch_model.bin) in this "
            "folder") in err
    assert snapshot(run_copy) == before
    with pytest.raises(ModelLoadError, match=re.escape(str(folder))):
        from budgetune.config import resolve

        backbone.load_base(resolve(None, tiny_train_args(folder, headlines_csv, run_copy, "lora")[1:]), ["a", "b"])


class _RunsCode:
    """A pickle payload that would create a file when unpickled."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_pickle_that_runs_code_is_refused(run_copy, tmp_path):
    marker = tmp_path / "pwned"
    evil = tmp_path / "test_unlabelled.pkl"
    evil.write_bytes(pickle.dumps(_RunsCode(marker)))
    before = snapshot(run_copy)
    proc = run_cli("predict", str(run_copy), "--input", str(evil), check=False)
    assert proc.returncode == 2
    assert re.search(rf"budgetune: error: {re.escape(str(evil))}: refusing to unpickle '(posix|os)\.system'",
                     proc.stderr), proc.stderr[-2000:]
    assert not marker.exists()
    assert snapshot(run_copy) == before


def test_crafted_arrow_pickle_is_a_usage_error_not_a_crash(run_copy, tmp_path):
    """A DataFrame pickle whose Arrow string offsets point far past their data (it exited 139, SIGSEGV)."""
    import pandas as pd

    good, bad = struct.pack("<3q", 0, 2, 4), struct.pack("<3q", 0, 2, 1 << 40)
    frame = pickle.dumps(pd.DataFrame({"text": pd.array(["ab", "cd"], dtype="string[pyarrow]")}), protocol=5)
    assert frame.count(good) == 1
    evil = tmp_path / "test_unlabelled.pkl"
    evil.write_bytes(frame.replace(good, bad))
    before = snapshot(run_copy)
    proc = run_cli("predict", str(run_copy), "--input", str(evil), check=False)
    assert (proc.returncode, proc.stderr.splitlines()[-1]) == (2, (
        f"budgetune: error: {evil}: the pickle holds an invalid Arrow array (Length spanned by binary offsets "
        "(1099511627776) larger than values array (size 4))")), proc.stderr[-2000:]
    assert snapshot(run_copy) == before


def test_checkpoint_that_runs_code_is_refused(tiny_roberta, headlines_csv, run_copy, tmp_path, capsys):
    marker = tmp_path / "pwned"
    folder = tmp_path / "evil-checkpoint"
    folder.mkdir()
    torch.save({"model": _RunsCode(marker)}, folder / "state.pt")  # torch.save pickles it as is
    before = snapshot(run_copy)
    args = tiny_train_args(tiny_roberta, headlines_csv, run_copy, "lora", max_train_samples=32, num_train_epochs=1)
    rc, err = main(capsys, *args, "--resume_from_checkpoint", str(folder))
    assert rc == 2
    assert f"budgetune: error: {folder / 'state.pt'}: refusing to load" in err, err[-2000:]
    assert not marker.exists()
    assert snapshot(run_copy) == before


def test_best_state_that_runs_code_is_refused(tiny_roberta, headlines_csv, run_copy, tmp_path, capsys, monkeypatch):
    """A resume reads best_state.pt when the checkpoint predates keeping its own best: weights only, even where
    torch would unpickle anything (TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD, or torch < 2.6), and before writing."""
    monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")
    marker = tmp_path / "pwned"
    found = checkpoint.find("auto", run_copy)
    state = checkpoint.load(found)
    del state["best"]
    torch.save(state, found / "state.pt")
    torch.save({"model": _RunsCode(marker), "rank_pattern": None, "metrics": {}}, run_copy / "best_state.pt")
    before = snapshot(run_copy)
    args = tiny_train_args(tiny_roberta, headlines_csv, run_copy, "lora", max_train_samples=32, num_train_epochs=1)
    rc, err = main(capsys, *args, "--resume_from_checkpoint", "auto")
    assert rc == 2
    assert f"budgetune: error: {run_copy / 'best_state.pt'}: refusing to load: it is not a plain budgetune " \
           "checkpoint" in err, err[-2000:]
    assert not marker.exists()
    assert snapshot(run_copy) == before


def test_checkpoint_from_other_configuration_is_refused(tiny_roberta, headlines_csv, run_copy, capsys):
    before = snapshot(run_copy)
    args = tiny_train_args(tiny_roberta, headlines_csv, run_copy, "lora", max_train_samples=32, num_train_epochs=1,
                           learning_rate=0.001)
    rc, err = main(capsys, *args, "--resume_from_checkpoint", "auto")
    assert rc == 2
    assert "budgetune: error: " in err and "was written by a different configuration; refusing to resume" in err
    assert "train.learning_rate: checkpoint 0.005, now 0.001" in err
    assert snapshot(run_copy) == before


def test_checkpoint_pruning_and_abandoned_continuations(tmp_path):
    """Keep the newest `keep`; a save at step s drops checkpoints past s (left by a resume from an older one)."""
    model = torch.nn.Linear(2, 2)
    opt = torch.optim.AdamW(model.parameters())
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    ckpts = tmp_path / "checkpoints"

    def save(step: int, keep: int = 2) -> None:
        checkpoint.save(ckpts / f"step-{step:06d}", model=model, optimizer=opt, scheduler=sched, scaler=None,
                        progress={"step": step}, config={}, keep=keep)

    for step in (3, 6, 9, 12):
        save(step)
    (ckpts / ".step-000015.abc.tmp").mkdir()  # a save killed part-way
    assert sorted(p.name for p in ckpts.iterdir()) == [".step-000015.abc.tmp", "step-000009", "step-000012"]
    assert checkpoint.find("auto", tmp_path) == ckpts / "step-000012"
    save(10, keep=0)  # resumed from step 9: step 12 belongs to the abandoned run; keep=0 still keeps this one
    assert sorted(p.name for p in ckpts.iterdir()) == ["step-000010"]
    assert checkpoint.load(checkpoint.find("auto", tmp_path))["progress"] == {"step": 10}
