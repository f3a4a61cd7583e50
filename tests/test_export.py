"""`budgetune export --merge` (a plain transformers model) and `--format onnx` (onnxruntime, optionally int8):
the logits of budgetune's own inference, with no budgetune or peft needed to load them (issue 22, part 4)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import headline_rows, run_cli, tiny_train_args
from test_scaling import METHODS, base_model, trained_like

from budgetune.cli import main
from budgetune.inference import adapter_bundle
from budgetune.inference.loading import load_model

LABELS = ["World", "Sports", "Business", "Sci/Tech"]
TEXTS = [t for _, t in headline_rows()[:37]] + ["a", "x " * 200]  # the last one is truncated at max_seq_length


@pytest.fixture(scope="module")
def run(tiny_roberta, tmp_path_factory) -> Path:
    """A LoRA run of the tiny RoBERTa through the real CLI (max_seq_length 48)."""
    out = tmp_path_factory.mktemp("export-run") / "run"
    run_cli(*tiny_train_args(tiny_roberta, "builtin:headlines", out, "lora", num_train_epochs=1,
                             target_modules="query,value,dense", robust_tolerance="null"))
    return out


def budgetune_logits(run_or_adapter, texts=TEXTS, adapter_scale=None) -> np.ndarray:
    """budgetune's own inference (the model predict, evaluate and serve load), fp32, one padded batch."""
    model, tok, info = load_model(run_or_adapter, adapter_scale=adapter_scale)
    batch = tok(texts, truncation=True, max_length=info["max_seq_length"], padding=True, return_tensors="pt")
    with torch.inference_mode():
        return model(**batch).logits.numpy()


PLAIN = """
import importlib.util, json, sys
assert importlib.util.find_spec("peft") is None and importlib.util.find_spec("budgetune") is None
import numpy, torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer
folder, texts = sys.argv[1], json.loads(sys.argv[2])
model = AutoModelForSequenceClassification.from_pretrained(folder).eval()
tok = AutoTokenizer.from_pretrained(folder)
with torch.inference_mode():
    logits = model(**tok(texts, truncation=True, padding=True, return_tensors="pt")).logits
numpy.save(sys.argv[3], logits.numpy())
print(json.dumps({"id2label": model.config.id2label}))
"""


def without_peft(folder: Path) -> Path:
    """This environment's site-packages without peft and budgetune (links to everything else): for `python -S`
    with PYTHONPATH set to it, as if neither were installed."""
    site = Path(torch.__file__).parents[1]
    folder.mkdir(exist_ok=True)
    for entry in site.iterdir():
        name = entry.name.lower()
        if not (name.startswith(("peft", "budgetune", "__editable__")) or entry.suffix == ".pth"
                or (folder / entry.name).exists()):
            (folder / entry.name).symlink_to(entry)
    return folder


def plain_transformers_logits(folder: Path, texts=TEXTS) -> tuple[np.ndarray, dict]:
    """Logits of `folder` loaded by AutoModelForSequenceClassification + AutoTokenizer in a fresh Python where
    budgetune and peft cannot be imported; the tokenizer's own truncation (truncation=True)."""
    out = folder.parent / f"{folder.name}-logits.npy"
    env = {"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin", "PYTHONPATH": str(without_peft(folder.parent / "site"))}
    proc = subprocess.run([sys.executable, "-S", "-c", textwrap.dedent(PLAIN), str(folder), json.dumps(texts),
                           str(out)], capture_output=True, text=True, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return np.load(out), json.loads(proc.stdout.strip().splitlines()[-1])


def test_merge_writes_a_transformers_model_with_budgetunes_logits(run, tmp_path):
    out = tmp_path / "merged"
    proc = run_cli("export", str(run), "--merge", "--adapter_scale", "0.5", "--output", str(out))
    expected = budgetune_logits(run, adapter_scale=0.5)
    assert np.abs(expected - budgetune_logits(run)).max() > 1e-3  # the scale matters on this run
    logits, seen = plain_transformers_logits(out)
    assert np.abs(logits - expected).max() < 1e-4
    assert seen == {"id2label": {str(i): n for i, n in enumerate(LABELS)}}
    config = json.loads((out / "config.json").read_text())
    assert config["id2label"] == {str(i): n for i, n in enumerate(LABELS)} and config["label2id"]["Sci/Tech"] == 3
    assert not (out / "adapter_config.json").exists() and (out / "tokenizer.json").is_file()
    card = (out / "README.md").read_text()
    assert "library_name: transformers" in card and "adapter scale 0.5" in card and "Sci/Tech" in card
    assert "merged at scale 0.5" in proc.stdout
    # budgetune's own verbs load it too (a full model, the scale in its weights)
    info = json.loads((out / adapter_bundle.BUNDLE_FILE).read_text())
    assert info["adapter_scale"] == 1.0 and info["merged_adapter_scale"] == 0.5
    assert np.abs(budgetune_logits(out) - expected).max() < 1e-4


def fake_bundle(folder: Path, model, tiny_roberta: Path, head: str = "default", scale: float | None = None) -> Path:
    """A saved bundle of `model` (a peft model of the tiny RoBERTa), as a run's adapter/ would hold it."""
    from transformers import AutoTokenizer

    adapter_bundle.save_bundle(model, AutoTokenizer.from_pretrained(tiny_roberta), folder, label_names=LABELS,
                               base_model=str(tiny_roberta), head=head,
                               config={"method": {"method": model.peft_config["default"].peft_type.value.lower()},
                                       "data": {"max_seq_length": 48}}, budget=None, metrics=None)
    if scale is not None:
        adapter_bundle.record_adapter_scale(folder, scale, {scale: 0.9, 1.0: 0.9}, 0.5)
    return folder


@pytest.mark.parametrize("method", METHODS)
def test_every_method_merges_at_the_bundles_scale(tiny_roberta, tmp_path, method):
    """peft's merge_and_unload as such fails for IA3, VeRA, LoHa and LoKr on RoBERTa's head: each one merges."""
    bundle = fake_bundle(tmp_path / "adapter", trained_like(tiny_roberta, method), tiny_roberta, scale=0.6)
    assert main(["export", str(bundle), "--merge", "--output", str(tmp_path / "merged")]) == 0
    expected = budgetune_logits(bundle)  # at the recorded 0.6
    assert np.abs(expected - budgetune_logits(bundle, adapter_scale=1.0)).max() > 1e-3
    logits, _ = plain_transformers_logits(tmp_path / "merged")
    assert np.abs(logits - expected).max() < 1e-4


@pytest.mark.slow
def test_a_full_run_exports_as_it_is(tiny_roberta, tmp_path):
    """method full has no adapter: its model is written as is, with the same checks."""
    out = tmp_path / "run"
    run_cli(*tiny_train_args(tiny_roberta, "builtin:headlines", out, "full", max_steps=3, num_train_epochs=1,
                             max_trainable_params="null", robust_tolerance="null", target_modules="null"))
    proc = run_cli("export", str(out), "--merge", "--output", str(tmp_path / "merged"))
    assert np.abs(plain_transformers_logits(tmp_path / "merged")[0] - budgetune_logits(out)).max() < 1e-4
    assert "every weight fine-tuned" in (tmp_path / "merged" / "README.md").read_text() and "full" in proc.stdout


def linear_head_bundle(tiny_roberta: Path, folder: Path) -> Path:
    """A LoRA bundle with budgetune's --head linear (one Linear where RoBERTa's head has dense+tanh+out_proj)."""
    import peft

    from budgetune.modeling import classifier_heads

    base = base_model(tiny_roberta)
    classifier_heads.apply_head(base, "linear")
    model = peft.get_peft_model(base, peft.LoraConfig(r=4, target_modules=["query", "value"],
                                                      task_type=peft.TaskType.SEQ_CLS))
    gen = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for p in (p for p in model.parameters() if p.requires_grad):
            p.add_(torch.randn(p.shape, generator=gen) * 0.3)
    return fake_bundle(folder, model.eval(), tiny_roberta, head="linear")


def test_merge_refuses_the_linear_head_naming_the_flag(tiny_roberta, tmp_path, capsys):
    bundle = linear_head_bundle(tiny_roberta, tmp_path / "adapter")
    assert main(["export", str(bundle), "--merge", "--output", str(tmp_path / "merged")]) == 2
    err = capsys.readouterr().err
    assert err.splitlines()[-1].startswith("budgetune: error: export --merge:") and "--head linear" in err and "--format onnx" in err
    assert not (tmp_path / "merged").exists()


def test_a_merged_model_that_reloads_differently_is_not_written(tiny_roberta, tmp_path, capsys, monkeypatch):
    """The reload check itself: with the head guard off, transformers rebuilds RoBERTa's own head (random), the
    logits differ, and nothing is written."""
    from budgetune.inference import export_merged

    bundle = linear_head_bundle(tiny_roberta, tmp_path / "adapter")
    monkeypatch.setattr(export_merged, "require_standard_head", lambda model, info: None)
    assert main(["export", str(bundle), "--merge", "--output", str(tmp_path / "merged")]) == 2
    assert "reloaded with transformers, gives logits up to" in capsys.readouterr().err
    assert not (tmp_path / "merged").exists() and not list(tmp_path.glob(".merged*"))


def ort_session(path: Path):
    ort = pytest.importorskip("onnxruntime")
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def ort_run(session, folder: Path, texts=TEXTS) -> np.ndarray:
    """onnxruntime's logits, tokenized as the model card says (the exported tokenizer, truncation=True)."""
    from transformers import AutoTokenizer

    enc = AutoTokenizer.from_pretrained(folder)(texts, truncation=True, padding=True, return_tensors="np")
    return session.run(None, {i.name: enc[i.name] for i in session.get_inputs()})[0]


def test_onnx_gives_budgetunes_logits_with_the_labels_in_its_metadata(run, tmp_path):
    pytest.importorskip("onnxruntime")
    out = tmp_path / "onnx"
    proc = run_cli("export", str(run), "--format", "onnx", "--quantize", "int8", "--adapter_scale", "0.5",
                   "--output", str(out))
    expected = budgetune_logits(run, adapter_scale=0.5)
    session = ort_session(out / "model.onnx")
    assert np.abs(ort_run(session, out) - expected).max() < 1e-3
    assert np.abs(ort_run(session, out, TEXTS[:1]) - expected[:1]).max() < 1e-3  # batch and length dynamic
    assert [i.name for i in session.get_inputs()] == ["input_ids", "attention_mask"]  # RoBERTa: no token types
    meta = session.get_modelmeta().custom_metadata_map
    assert json.loads(meta["id2label"]) == {str(i): n for i, n in enumerate(LABELS)}
    assert meta["max_seq_length"] == "48" and meta["merged_adapter_scale"] == "0.5" and meta["task"] == "single_label"
    # int8: weights and activations quantized, so a looser check: the same class on nearly every text
    int8 = ort_session(out / "model_int8.onnx")
    got = ort_run(int8, out)
    assert json.loads(int8.get_modelmeta().custom_metadata_map["id2label"])["3"] == "Sci/Tech"
    assert (got.argmax(-1) == expected.argmax(-1)).mean() >= 0.9 and np.abs(got - expected).max() < 0.1
    assert (out / "model_int8.onnx").stat().st_size < 0.8 * (out / "model.onnx").stat().st_size
    assert "library_name: onnx" in (out / "README.md").read_text() and "model_int8.onnx" in proc.stdout


@pytest.mark.parametrize("model_type", ["bert", *(pytest.param(t, marks=pytest.mark.slow)
                                                 for t in ("distilbert", "mpnet", "deberta-v2"))])
def test_onnx_of_other_architectures(tiny_encoder, tmp_path, model_type):
    """BERT's graph takes token_type_ids; the rest run on input_ids and attention_mask alone."""
    pytest.importorskip("onnxruntime")
    out = tmp_path / "run"
    run_cli(*tiny_train_args(tiny_encoder(model_type), "builtin:headlines", out, "lora", max_steps=3,
                             num_train_epochs=1, robust_tolerance="null"))
    assert main(["export", str(out), "--format", "onnx", "--output", str(tmp_path / "onnx")]) == 0
    session = ort_session(tmp_path / "onnx" / "model.onnx")
    assert np.abs(ort_run(session, tmp_path / "onnx") - budgetune_logits(out)).max() < 1e-3
    assert ("token_type_ids" in [i.name for i in session.get_inputs()]) == (model_type == "bert")


@pytest.mark.parametrize("args,message", [
    (["--format", "tflite"], "argument --format: invalid choice: 'tflite'"),
    (["--quantize", "int8"], "--quantize int8 needs --format onnx"),
    (["--merge", "--quantize", "int8"], "--quantize int8 needs --format onnx"),
    (["--format", "onnx", "--quantize", "int4"], "argument --quantize: invalid choice: 'int4'"),
])
def test_export_refuses_bad_flags_naming_them(run, tmp_path, capsys, args, message):
    try:
        code = main(["export", str(run), "--output", str(tmp_path / "out"), *args])
    except SystemExit as e:  # argparse's own usage errors exit
        code = e.code
    assert code == 2 and message in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("flags", [["--merge"], ["--format", "onnx"]])
def test_export_refuses_a_non_empty_output_and_keeps_it(run, tmp_path, capsys, flags):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    assert main(["export", str(run), *flags, "--output", str(out)]) == 2
    assert "--output" in capsys.readouterr().err and (out / "keep.txt").read_text() == "mine"
    assert main(["export", str(run), *flags, "--output", str(out / "keep.txt")]) == 2
    assert "a file is there" in capsys.readouterr().err


@pytest.mark.parametrize("flags", [[], ["--merge"], ["--format", "onnx"]])
def test_export_never_replaces_the_run_it_reads(run, tiny_roberta, tmp_path, capsys, flags):
    """--output RUN, RUN/adapter, a folder holding RUN or the local base model, with --overwrite, would replace a
    source whole."""
    import shutil

    copy, base = tmp_path / "runs" / "run", tmp_path / "base"
    shutil.copytree(run, copy)
    shutil.copytree(tiny_roberta, base)
    info = json.loads((copy / "adapter" / "budgetune.json").read_text())
    (copy / "adapter" / "budgetune.json").write_text(json.dumps({**info, "base_model_name_or_path": str(base)}))
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    for out in (copy, copy / "adapter", copy.parent, base):
        assert main(["export", str(copy), *flags, "--output", str(out), "--overwrite"]) == 2
        err = capsys.readouterr().err
        assert f"--output {out}: it {'holds' if out == copy.parent else 'is'} " in err and "which this command reads" in err
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before
    assert main(["export", str(copy), *flags, "--output", str(copy / "exported")]) == 0  # beside the adapter: fine


def test_onnx_without_onnxruntime_names_the_extra(run, tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # `import onnxruntime` now fails
    assert main(["export", str(run), "--format", "onnx", "--output", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "--format onnx needs onnx and onnxruntime" in err and "pip install 'budgetune[onnx]'" in err
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_minilm_merged_and_onnx(tmp_path):
    """The real packaged MiniLM (BERT: token_type_ids), a few training steps, both exports."""
    pytest.importorskip("onnxruntime")
    out = tmp_path / "run"
    run_cli(*tiny_train_args("packaged:all-MiniLM-L6-v2", "builtin:headlines", out, "lora", max_steps=4,
                             max_seq_length=64, robust_tolerance="null", learning_rate=1e-3))
    texts = [t for _, t in headline_rows()[::5]]
    expected = budgetune_logits(out, texts)
    config = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == "sentence-transformers/all-MiniLM-L6-v2"  # not this machine's folder
    run_cli("export", str(out), "--merge", "--output", str(tmp_path / "merged"))
    assert np.abs(plain_transformers_logits(tmp_path / "merged", texts)[0] - expected).max() < 1e-4
    run_cli("export", str(out), "--format", "onnx", "--quantize", "int8", "--output", str(tmp_path / "onnx"))
    assert np.abs(ort_run(ort_session(tmp_path / "onnx" / "model.onnx"), tmp_path / "onnx", texts)
                  - expected).max() < 1e-3
    got = ort_run(ort_session(tmp_path / "onnx" / "model_int8.onnx"), tmp_path / "onnx", texts)
    assert (got.argmax(-1) == expected.argmax(-1)).mean() >= 0.95


def test_written_files_and_folders_are_readable_as_plain_ones_would_be(tmp_path):
    """tempfile makes 0600 files and 0700 folders; an export copied into a container or served by another user must
    read like a file written by open() (the umask's mode)."""
    from budgetune import fileio

    fileio.atomic_write_text(tmp_path / "card.md", "x")
    with fileio.atomic_dir(tmp_path / "bundle") as tmp:
        (tmp / "a.json").write_text("{}")
    assert (tmp_path / "card.md").stat().st_mode & 0o777 == 0o666 & ~fileio.UMASK
    assert (tmp_path / "bundle").stat().st_mode & 0o777 == 0o777 & ~fileio.UMASK


def test_a_bundles_peft_config_names_a_base_another_machine_finds(run, tmp_path):
    """peft's adapter_config.json: a packaged base by its Hub id, never this machine's folder of it."""
    from budgetune.inference.adapter_bundle import model_card, portable_adapter_config

    folder = tmp_path / "adapter"
    shutil.copytree(run / "adapter", folder)
    portable_adapter_config(folder, "packaged:all-MiniLM-L6-v2")
    config = json.loads((folder / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == "sentence-transformers/all-MiniLM-L6-v2"
    info = json.loads((folder / "budgetune.json").read_text())
    card = model_card({**info, "base_model_name_or_path": "packaged:all-mpnet-base-v2"}, {"method": {}})
    assert "base_model: sentence-transformers/all-mpnet-base-v2" in card and "budgetune.modeling" not in card
    local = model_card(info, {"method": {}})  # a local folder's base: no Hub id to name
    assert "base_model:" not in local


def test_exporting_an_exported_folder_records_the_scale_in_all(run, tmp_path):
    run_cli("export", str(run), "--adapter_scale", "0.5", "--output", str(tmp_path / "half"))
    run_cli("export", str(tmp_path / "half"), "--adapter_scale", "0.5", "--output", str(tmp_path / "quarter"))
    info = json.loads((tmp_path / "quarter" / "budgetune.json").read_text())
    assert info["baked_adapter_scale"] == 0.25
    np.testing.assert_allclose(budgetune_logits(tmp_path / "quarter"), budgetune_logits(run, adapter_scale=0.25),
                               atol=1e-5)


def test_a_finished_runs_saved_adapter_reloads_as_trained_whatever_scale_it_recorded(run, tmp_path):
    """finish() reloads the saved adapter to measure it at scale 1; a run resumed after it recorded a default scale
    (killed while finishing) must not measure that scale as 'as trained'."""
    from types import SimpleNamespace

    from budgetune.modeling import scaling
    from budgetune.training.finish import reload_saved

    copy = tmp_path / "run"
    shutil.copytree(run / "adapter", copy / "adapter")
    adapter_bundle.record_adapter_scale(copy / "adapter", 0.6, {0.6: 0.5, 1.0: 0.5}, 0.5)
    model = reload_saved(SimpleNamespace(out=copy, accelerator=SimpleNamespace(prepare_model=lambda m, **kw: m)))
    assert scaling.current_scale(model) == 1.0


def test_the_int8_check_line_reads_the_logits_as_the_task_does():
    from budgetune.inference.export_onnx import int8_note

    got, want = np.array([[0.1, 2.0], [1.0, -1.0]]), np.array([[0.2, 2.1], [-1.0, -1.0]])
    assert int8_note(got, want, {"task": "single_label"}).startswith("model_int8.onnx: same class on 2 of 2")
    multi = {"task": "multi_label", "label_names": ["a", "b"], "thresholds": {"a": 0.5, "b": 0.5}}
    assert int8_note(got, want, multi).startswith("model_int8.onnx: the same label set on 1 of 2")  # row 2: a flips
    assert int8_note(got, want, {"task": "regression"}) == "model_int8.onnx: values within 2 of fp32's on 2 check texts"
