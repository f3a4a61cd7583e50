"""--precision auto|fp32|bf16|int8 of evaluate, predict and serve (issue 22, part 3): int8 agrees with fp32, bf16
runs where the CPU has it (fp32 and says so where not), auto follows the choice a training run measured and recorded
in its bundle, bad values are refused naming the flag.

The CPU's capabilities are faked as in test_auto_precision.py; the suite's BUDGETUNE_MIXED_PRECISION=fp32 pins
auto, so the tests of auto unset it.
"""

from __future__ import annotations

import csv
import json
import sys
from types import MappingProxyType

import numpy as np
import pytest
import torch
from conftest import headline_rows, run_cli, tiny_train_args, wait_ready, write_csv
from torch import nn

from budgetune.config import resolve
from budgetune.hardware.devices import release_accelerator
from budgetune.inference.precisions import int8_backend

ENV = "BUDGETUNE_MIXED_PRECISION"
AVX512_BF16 = {"avx512_f": True, "avx512_bf16": True, "avx512_vnni": True, "amx_tile": False, "amx_bf16": False}
PLAIN = {"avx2": True, "avx512_f": True, "avx512_bf16": False, "amx_tile": False, "amx_bf16": False}
TEXTS = [t for _, t in headline_rows()[:60]]
INT8_PROB_TOL = 0.05  # int8 against fp32: largest difference of a class probability on the tiny model
BY = int8_backend()[1]  # which computes int8 here (onnxruntime where installed: tests/test_ort_int8.py)
cpu_only = pytest.mark.skipif(torch.cuda.is_available(), reason="int8 and the faked CPU need a CPU-only machine")
pytestmark = cpu_only


def fake_cpu(monkeypatch, caps: dict) -> None:
    monkeypatch.setattr(torch.cpu, "get_capabilities", lambda: MappingProxyType(dict(caps)))
    monkeypatch.delenv(ENV, raising=False)


@pytest.fixture(scope="module", autouse=True)
def home(tmp_path_factory):
    """budgetune's cache (~/.cache/budgetune: onnxruntime's int8 graphs) in a temporary folder, subprocesses too."""
    mp = pytest.MonkeyPatch()
    mp.setenv("HOME", str(tmp_path_factory.mktemp("home")))
    yield
    mp.undo()


@pytest.fixture(scope="module")
def run(tiny_roberta, headlines_csv, tmp_path_factory):
    """A tiny LoRA run, trained with the default --inference_precision_tolerance on a CPU said to have bf16."""
    from budgetune.training.train import train

    out = tmp_path_factory.mktemp("precision") / "run"
    mp = pytest.MonkeyPatch()
    fake_cpu(mp, AVX512_BF16)
    mp.setenv(ENV, "fp32")  # the training itself in fp32, as the suite trains
    try:
        flags = {"max_train_samples": 64, "per_device_train_batch_size": 8, "num_train_epochs": 2,
                 "robust_tolerance": "null"}
        train(resolve(None, tiny_train_args(tiny_roberta, headlines_csv, out, "lora", **flags)[1:]))
    finally:
        mp.undo()
        release_accelerator()
    return out


def bundle(run) -> dict:
    return json.loads((run / "adapter" / "budgetune.json").read_text())


def probabilities(path) -> np.ndarray:
    with open(path, encoding="utf-8") as f:
        rows = list(csv.reader(f))[1:]
    return np.asarray([[float(x) for x in r[2:]] for r in rows])


# --- what training records -------------------------------------------------------------------------------------


def test_training_records_the_measured_choice_and_its_table(run):
    rec = bundle(run)["inference_precision"]
    table = rec["table"]
    assert list(table) == ["fp32", "bf16", "int8"]  # every precision this (faked) CPU computes in
    assert rec["tolerance"] == 0.2 and rec["validation_rows"] > 0 and "AVX512-BF16" in rec["measured_on"]
    assert table["int8"]["backend"] == int8_backend()[0] and f"int8 by {int8_backend()[0]}" in rec["measured_on"]
    if int8_backend()[0] == "onnxruntime":  # its graph kept under the run's cache_dir, for predict to reuse
        assert len(list((run.parent / "cache" / "onnx-int8").glob("*.onnx"))) == 1
    fp32 = table["fp32"]["accuracy"]
    for row in table.values():
        assert 0 <= row["accuracy"] <= 1 and row["texts_per_s"] > 0
        assert row["within_tolerance"] == (row["accuracy"] >= fp32 - 0.002 - 1e-12)
    fastest_ok = max((n for n, r in table.items() if r["within_tolerance"]), key=lambda n: table[n]["texts_per_s"])
    assert rec["choice"] == fastest_ok


def test_the_choice_rule_takes_the_fastest_within_tolerance():
    from budgetune.inference.precision_choice import choose

    table = {"fp32": {"accuracy": 0.900, "texts_per_s": 100.0}, "bf16": {"accuracy": 0.899, "texts_per_s": 150.0},
             "int8": {"accuracy": 0.890, "texts_per_s": 300.0}}
    assert choose(table, 0.2)[0] == "bf16"  # int8 loses 1 point
    assert choose(table, 1.0)[0] == "int8" and "3x fp32's texts/s" in choose(table, 1.0)[1]
    assert choose(table, 0.0)[0] == "fp32"


def test_a_precision_that_cannot_compute_is_recorded_and_never_chosen(monkeypatch):
    """DeBERTa-v2 with LoHa fails under bf16 autocast (peft casts back to fp32, the mask fill overflows bf16): the
    measurement at the end of a run records why and leaves bf16 out, instead of losing the run."""
    from budgetune.inference.precision_choice import choose, measure

    fake_cpu(monkeypatch, AVX512_BF16)
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # int8 by torch: onnxruntime's needs a real encoder
    labels = np.array([0, 1, 1, 0])

    def logits_of(model):
        if torch.is_autocast_enabled("cpu"):
            raise RuntimeError("value cannot be converted to type c10::BFloat16 without overflow")
        return np.eye(2)[labels]

    table = measure(nn.Sequential(nn.Linear(2, 2)), torch.device("cpu"), logits_of, labels)
    assert table["bf16"] == {"error": "RuntimeError: value cannot be converted to type c10::BFloat16 without overflow"}
    assert table["fp32"]["accuracy"] == table["int8"]["accuracy"] == 1.0
    assert choose(table, 0.2)[0] in ("fp32", "int8") and table["bf16"]["within_tolerance"] is False


def test_switched_off_training_records_nothing(tiny_roberta, headlines_csv, tmp_path):
    from budgetune.training.train import train

    out = tmp_path / "off"
    train(resolve(None, tiny_train_args(tiny_roberta, headlines_csv, out, "lora", max_train_samples=32,
                                        num_train_epochs=1, inference_precision_tolerance="null")[1:]))
    release_accelerator()
    assert "inference_precision" not in bundle(out)


# --- the flag through the real CLI --------------------------------------------------------------------------------


def test_predict_int8_agrees_with_fp32(run, tmp_path):
    texts = write_csv(tmp_path / "texts.csv", ["text"], [[t] for t in TEXTS])
    heads = {}
    for name in ("fp32", "int8"):
        proc = run_cli("predict", str(run), "--input", str(texts), "--output", str(tmp_path / f"{name}.csv"),
                       "--probabilities", "--precision", name)
        heads[name] = proc.stdout.splitlines()[0]
    assert heads == {"fp32": "precision fp32: --precision fp32", "int8": f"precision int8: --precision int8, {BY}"}
    p32, p8 = probabilities(tmp_path / "fp32.csv"), probabilities(tmp_path / "int8.csv")
    assert p32.shape == p8.shape == (len(TEXTS), 4)
    assert np.abs(p8 - p32).max() < INT8_PROB_TOL
    assert not np.array_equal(p8, p32)  # it did compute in int8
    assert np.mean(p8.argmax(1) == p32.argmax(1)) >= 0.9


def test_evaluate_bf16_runs_in_what_this_cpu_has(run, headlines_csv, tmp_path):
    from budgetune.inference.precisions import unavailable

    proc = run_cli("evaluate", str(run), "--data_file", str(headlines_csv), "--precision", "bf16",
                   "--output", str(tmp_path / "ev"))
    why_not = unavailable("bf16", "cpu")
    expected = "precision bf16: --precision bf16" if why_not is None else f"precision fp32: --precision bf16, but {why_not}"
    assert proc.stdout.splitlines()[0].startswith(expected)
    assert json.loads((tmp_path / "ev.json").read_text())["precision"] == ("bf16" if why_not is None else "fp32")


def test_train_prints_the_measured_table_and_the_choice(tiny_roberta, headlines_csv, tmp_path):
    out = tmp_path / "cli"
    proc = run_cli(*tiny_train_args(tiny_roberta, headlines_csv, out, "lora", max_train_samples=32,
                                    num_train_epochs=1, robust_tolerance="null"))
    rec = bundle(out)["inference_precision"]
    assert f"inference precision auto -> {rec['choice']}: {rec['reason']}" in proc.stdout
    assert all(f"  {name:5s} accuracy" in proc.stdout for name in rec["table"])
    assert f"inference precision (--precision auto): {rec['choice']}, measured on validation" in proc.stdout


def test_auto_reads_the_bundles_record(run, tmp_path):
    """The record says int8: auto computes in int8 (BUDGETUNE_MIXED_PRECISION unset: auto is not pinned)."""
    copy = tmp_path / "copy"
    import shutil

    shutil.copytree(run / "adapter", copy)
    info = bundle(run)
    info["inference_precision"]["choice"] = "int8"
    (copy / "budgetune.json").write_text(json.dumps(info))
    texts = write_csv(tmp_path / "texts.csv", ["text"], [[t] for t in TEXTS[:8]])
    proc = run_cli("predict", str(copy), "--input", str(texts), "--output", str(tmp_path / "sub.csv"),
                   env={ENV: "auto"})
    assert proc.stdout.splitlines()[0].startswith("precision int8: auto: the bundle's measured choice (")
    pinned = run_cli("predict", str(copy), "--input", str(texts), "--output", str(tmp_path / "sub2.csv"),
                     env={ENV: "fp32"})
    assert pinned.stdout.splitlines()[0] == f"precision fp32: auto, set by {ENV}=fp32"


@pytest.mark.parametrize("argv", [["predict", "RUN", "--input", "TEXTS", "--precision", "fp16"],
                                  ["evaluate", "RUN", "--data_file", "TEXTS", "--precision", "int4"]])
def test_a_bad_precision_is_refused_naming_the_flag(run, tmp_path, argv, capsys):
    from budgetune.cli import main

    texts = write_csv(tmp_path / "texts.csv", ["label", "text"], [[0, "a"]])
    argv = [str(run) if a == "RUN" else str(texts) if a == "TEXTS" else a for a in argv]
    assert main(argv + ["--output", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"budgetune: error: --precision must be one of auto, fp32, bf16, int8, got {argv[-1]!r}"]
    assert not list(tmp_path.glob("out*"))


def test_serve_refuses_a_bad_precision_before_loading(run):
    from budgetune.errors import ConfigError
    from budgetune.serve.registry import Registry, parse_runs

    with pytest.raises(ConfigError, match="--precision must be one of auto, fp32, bf16, int8, got 'half'"):
        Registry(parse_runs([str(run)]), device="cpu", precision="half")


def test_a_bad_tolerance_is_refused_naming_the_option(tiny_roberta, headlines_csv, tmp_path):
    from budgetune.errors import ConfigError

    with pytest.raises(ConfigError, match="--inference_precision_tolerance must be between 0 and 100"):
        resolve(None, tiny_train_args(tiny_roberta, headlines_csv, tmp_path / "x", "lora",
                                      inference_precision_tolerance=-1)[1:])


# --- in process: faked CPUs, what int8 and bf16 do to the model ---------------------------------------------------


def logits_in(run, precision: str, capsys) -> tuple[np.ndarray, nn.Module, str]:
    from budgetune.data.readers import TextTable
    from budgetune.inference.loading import load_for_inference
    from budgetune.inference.runner import table_logits

    accelerator, model, tokenizer, info = load_for_inference(run, precision=precision)
    out = table_logits(model, tokenizer, TextTable(TEXTS, None, None, "texts"), accelerator, 16, info["max_seq_length"])
    release_accelerator()
    return out, model, capsys.readouterr().out.splitlines()[0]


def test_bf16_stores_the_encoder_in_bf16_where_the_cpu_has_it(run, monkeypatch, capsys):
    fake_cpu(monkeypatch, AVX512_BF16)
    fp32, _, _ = logits_in(run, "fp32", capsys)
    bf16, model, head = logits_in(run, "bf16", capsys)
    assert head == "precision bf16: --precision bf16"
    dtypes = {n: m.weight.dtype for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    assert {d for n, d in dtypes.items() if ".encoder." in n and "lora_" not in n} == {torch.bfloat16}
    assert {d for n, d in dtypes.items() if "classifier" in n} == {torch.float32}
    np.testing.assert_allclose(bf16, fp32, atol=0.05)


def test_without_bf16_bf16_runs_fp32_and_says_so_and_auto_skips_it(run, monkeypatch, capsys, tmp_path):
    import shutil

    fake_cpu(monkeypatch, PLAIN)
    fp32, _, _ = logits_in(run, "fp32", capsys)
    got, _, head = logits_in(run, "bf16", capsys)
    assert head == ("precision fp32: --precision bf16, but this CPU has no native bf16 matrix instructions (AMX or "
                    "AVX512-BF16): bf16 would be emulated; the CPU has no native bf16 matrix instructions (AMX or "
                    "AVX512-BF16), so bf16 would be emulated and slower")
    np.testing.assert_array_equal(got, fp32)
    # a record whose choice is bf16: auto takes the fastest other precision within its tolerance
    copy = tmp_path / "copy"
    shutil.copytree(run / "adapter", copy)
    info = bundle(run)
    info["inference_precision"]["choice"] = "bf16"
    info["inference_precision"]["table"] = {
        "fp32": {"accuracy": 0.9, "texts_per_s": 10.0, "within_tolerance": True},
        "bf16": {"accuracy": 0.9, "texts_per_s": 20.0, "within_tolerance": True},
        "int8": {"accuracy": 0.9, "texts_per_s": 15.0, "within_tolerance": True}}
    (copy / "budgetune.json").write_text(json.dumps(info))
    _, _, head = logits_in(copy, "auto", capsys)
    assert head.startswith("precision int8: auto: the bundle's measured choice bf16 cannot compute here (this CPU "
                           "has no native bf16")
    # an old bundle without the record: the hardware rule, and it says why
    del info["inference_precision"]
    (copy / "budgetune.json").write_text(json.dumps(info))
    _, _, head = logits_in(copy, "auto", capsys)
    assert head.startswith("precision fp32: auto: the CPU has no native bf16") and "records no measured choice" in head


def test_serve_int8_answers_like_fp32_and_health_says_int8(run, monkeypatch):
    from fastapi.testclient import TestClient

    from budgetune.serve.api import create_app
    from budgetune.serve.registry import Registry, parse_runs

    fake_cpu(monkeypatch, AVX512_BF16)
    probs = {}
    for name in ("fp32", "int8"):
        registry = Registry(parse_runs([str(run)]), device="cpu", precision=name)
        with TestClient(create_app(registry)) as c:
            wait_ready(c.get)
            health = c.get("/health").json()
            assert health["precision"] == f"precision {name}: --precision {name}" + (f", {BY}" if name == "int8" else "")
            r = c.post("/v1/classify", json={"texts": TEXTS[:16]})
            assert r.status_code == 200
            probs[name] = np.asarray([p["probabilities"] for p in r.json()["predictions"]])
    assert np.abs(probs["int8"] - probs["fp32"]).max() < INT8_PROB_TOL


def test_auto_does_not_run_an_int8_backend_that_was_never_measured(monkeypatch):
    """A bundle whose int8 was measured by onnxruntime, on a machine where int8 means torch's quantization: its
    accuracy there was never measured, so auto takes the fastest other precision within the tolerance."""
    from budgetune.inference import precisions

    table = {"fp32": {"texts_per_s": 10.0, "within_tolerance": True},
             "bf16": {"texts_per_s": 20.0, "within_tolerance": True},
             "int8": {"texts_per_s": 30.0, "within_tolerance": True, "backend": "onnxruntime"}}
    info = {precisions.RECORD_KEY: {"choice": "int8", "table": table}}
    monkeypatch.setattr(precisions, "unavailable", lambda name, device_type, merged=True: None)
    monkeypatch.setattr(precisions, "int8_backend", lambda: ("torch", "computed by torch"))
    chosen = precisions.recorded(info, "cpu", True)
    assert chosen.name == "bf16" and "measured with onnxruntime" in chosen.reason
    monkeypatch.setattr(precisions, "int8_backend", lambda: ("onnxruntime", "computed by onnxruntime"))
    assert precisions.recorded(info, "cpu", True).name == "int8"
