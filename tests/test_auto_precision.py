"""mixed_precision auto follows the hardware (issue 22, parts 1 and 6): bf16 on a CPU with native bf16 matrix
instructions (AMX or AVX512-BF16, as torch detects them at run time), fp32 on other CPUs; train, evaluate, predict,
serve, distill's teacher pass and search's trials alike; each says which and why; saved adapters stay fp32.

The CPU's capabilities are faked (torch.cpu.get_capabilities), both ways, so every test runs on any machine; the
suite's own BUDGETUNE_MIXED_PRECISION=fp32 (conftest) is unset here.
"""

from __future__ import annotations

import json
from types import MappingProxyType

import pytest
import torch
from conftest import headline_rows, read_jsonl, run_cli, tiny_train_args, wait_ready, write_csv
from fastapi.testclient import TestClient
from safetensors.torch import load_file

from budgetune.config import resolve
from budgetune.hardware.devices import release_accelerator

ENV = "BUDGETUNE_MIXED_PRECISION"
AMX = {"avx512_f": True, "avx512_bf16": True, "amx_tile": True, "amx_bf16": True, "amx_int8": True}
AVX512_BF16 = {"avx512_f": True, "avx512_bf16": True, "amx_tile": False, "amx_bf16": False}
PLAIN = {"avx2": True, "avx512_f": True, "avx512_bf16": False, "amx_tile": False, "amx_bf16": False}
TEXTS = [t for _, t in headline_rows()[:40]]
cpu_only = pytest.mark.skipif(torch.cuda.is_available(), reason="the run would compute on the GPU")


def fake_cpu(monkeypatch, caps: dict) -> None:
    """This process's CPU has exactly `caps`; no BUDGETUNE_MIXED_PRECISION."""
    monkeypatch.setattr(torch.cpu, "get_capabilities", lambda: MappingProxyType(dict(caps)))
    monkeypatch.delenv(ENV, raising=False)


# --- detection ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("caps", "expected", "says"), [
    (AMX, "bf16", "native bf16 matrix instructions (AMX-BF16)"),
    (AVX512_BF16, "bf16", "native bf16 matrix instructions (AVX512-BF16)"),
    (PLAIN, "no", "no native bf16 matrix instructions"),
    ({}, "no", "no native bf16 matrix instructions"),
])
def test_auto_on_cpu_follows_the_detected_instructions(monkeypatch, caps, expected, says):
    from budgetune.hardware.devices import resolve_precision

    fake_cpu(monkeypatch, caps)
    got = resolve_precision("auto", "cpu")
    assert got.mixed_precision == expected and says in got.reason
    assert got.line() == f"precision {'fp32' if expected == 'no' else 'bf16'}: {got.reason}"


@pytest.mark.parametrize(("avx512_bf16", "amx", "expected"), [(True, False, "bf16"), (False, True, "bf16"),
                                                              (False, False, "no")])
def test_torch_without_get_capabilities_uses_its_two_probes(monkeypatch, avx512_bf16, amx, expected):
    from budgetune.hardware.devices import resolve_precision

    monkeypatch.delattr(torch.cpu, "get_capabilities")
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: avx512_bf16, raising=False)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx, raising=False)
    monkeypatch.delenv(ENV, raising=False)
    assert resolve_precision("auto", "cpu").mixed_precision == expected


def test_the_environment_overrides_auto_and_an_explicit_choice_overrides_both(monkeypatch):
    from budgetune.errors import ConfigError
    from budgetune.hardware.devices import resolve_precision

    fake_cpu(monkeypatch, AMX)
    for value in ("fp32", "no", "FP32 "):
        monkeypatch.setenv(ENV, value)
        got = resolve_precision("auto", "cpu")
        assert got.mixed_precision == "no" and got.name == "fp32" and ENV in got.reason
    monkeypatch.setenv(ENV, "bf16")
    assert resolve_precision("no", "cpu").mixed_precision == "no"  # --mixed_precision no wins
    fake_cpu(monkeypatch, PLAIN)
    monkeypatch.setenv(ENV, "bf16")
    forced = resolve_precision("auto", "cpu")
    assert forced.mixed_precision == "bf16" and "emulated" in forced.reason
    monkeypatch.setenv(ENV, "fp8")
    with pytest.raises(ConfigError, match=f"{ENV}='fp8'"):
        resolve_precision("auto", "cpu")


def test_explicit_choices_say_what_they_compute_in(monkeypatch):
    from budgetune.hardware.devices import resolve_precision

    fake_cpu(monkeypatch, PLAIN)
    fp16 = resolve_precision("fp16", "cpu")  # accelerate has no fp16 autocast on CPU: it computes fp32
    assert fp16.mixed_precision == "no" and "fp32" in fp16.reason
    assert "emulated" in resolve_precision("bf16", "cpu").reason
    fake_cpu(monkeypatch, AVX512_BF16)
    assert resolve_precision("bf16", "cpu").reason == "--mixed_precision bf16"


@pytest.mark.parametrize(("bf16", "expected"), [(True, "bf16"), (False, "fp16")])
def test_auto_on_a_gpu(monkeypatch, bf16, expected):
    from budgetune.hardware.devices import resolve_precision

    fake_cpu(monkeypatch, PLAIN)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: bf16)
    assert resolve_precision("auto", "cuda").mixed_precision == expected


# --- train --------------------------------------------------------------------------------------------------------


def run_cfg(tiny_roberta, headlines_csv, out, **extra):
    # no measured inference precision recorded: auto at inference follows the hardware (test_inference_precision.py
    # covers the record)
    flags = {"max_train_samples": 32, "per_device_train_batch_size": 8, "num_train_epochs": 1,
             "robust_tolerance": "null", "inference_precision_tolerance": "null", **extra}
    return resolve(None, tiny_train_args(tiny_roberta, headlines_csv, out, "lora", **flags)[1:])


def precision_events(out) -> list[dict]:
    return [e for e in read_jsonl(out / "metrics.jsonl") if e["event"] == "precision"]


@pytest.mark.slow
@cpu_only
@pytest.mark.parametrize(("caps", "name"), [(AVX512_BF16, "bf16"), (PLAIN, "fp32")])
def test_a_run_computes_in_what_the_cpu_has_and_says_so(tiny_roberta, headlines_csv, tmp_path, monkeypatch, capsys,
                                                        caps, name):
    from budgetune.training.train import train

    fake_cpu(monkeypatch, caps)
    out = tmp_path / "run"
    train(run_cfg(tiny_roberta, headlines_csv, out))
    header = capsys.readouterr().out.splitlines()[0]
    assert header.startswith(f"precision {name}: auto: the CPU has")
    events = precision_events(out)
    assert len(events) == 1 and events[0]["step"] == 0 and events[0]["precision"] == name
    assert events[0]["reason"] in header
    saved = load_file(out / "adapter" / "adapter_model.safetensors")
    assert saved and {t.dtype for t in saved.values()} == {torch.float32}  # saved adapters stay fp32


@cpu_only
def test_under_auto_bf16_the_frozen_base_is_bf16_and_what_trains_fp32(tiny_roberta, headlines_csv, tmp_path,
                                                                      monkeypatch):
    from budgetune.hardware import precision
    from budgetune.training.train import setup

    fake_cpu(monkeypatch, AMX)
    try:
        run = setup(run_cfg(tiny_roberta, headlines_csv, tmp_path / "run"))
        assert run.accelerator.mixed_precision == "bf16" and run.accelerator.native_amp
        assert precision.dtypes_by_role(run.inner) == {"trainable": {torch.float32},
                                                       "frozen_linear": {torch.bfloat16}}
    finally:
        release_accelerator()


@pytest.mark.slow
@cpu_only
def test_a_resumed_run_logs_the_precision_of_its_own_session(tiny_roberta, headlines_csv, tmp_path, monkeypatch):
    from budgetune.training.train import train

    out = tmp_path / "run"
    flags = {"num_train_epochs": 2, "save_steps": 2, "save_total_limit": 10}
    fake_cpu(monkeypatch, PLAIN)
    train(run_cfg(tiny_roberta, headlines_csv, out, **flags))
    fake_cpu(monkeypatch, AMX)  # resumed on another machine
    train(run_cfg(tiny_roberta, headlines_csv, out, resume_from_checkpoint=str(out / "checkpoints" / "step-000002"),
                  **flags))
    assert [(e["step"], e["precision"]) for e in precision_events(out)] == [(0, "fp32"), (2, "bf16")]


@pytest.mark.slow
def test_cli_header_names_what_auto_picks_on_this_very_machine(tiny_roberta, headlines_csv, tmp_path, monkeypatch):
    """No faking: the CLI's first line is what auto picks on this very machine, with or without bf16."""
    from budgetune.hardware.devices import resolve_precision

    monkeypatch.delenv(ENV, raising=False)
    out = tmp_path / "cli"
    args = tiny_train_args(tiny_roberta, headlines_csv, out, "lora", max_train_samples=32, num_train_epochs=1,
                           robust_tolerance="null")
    proc = run_cli(*args, env={ENV: "auto"})
    assert proc.stdout.splitlines()[0] == resolve_precision("auto", "cuda" if torch.cuda.is_available() else "cpu"
                                                            ).line()
    assert precision_events(out)[0]["reason"] in proc.stdout


def test_a_bad_override_is_one_line_exit_2_before_anything_is_written(tiny_roberta, headlines_csv, tmp_path,
                                                                      monkeypatch, capsys):
    from budgetune.cli import main

    monkeypatch.setenv(ENV, "half")
    assert main(tiny_train_args(tiny_roberta, headlines_csv, tmp_path / "bad", "lora")) == 2
    assert capsys.readouterr().err.splitlines() == [
        f"budgetune: error: environment variable {ENV}='half': must be one of auto, fp32 (or no), bf16, fp16"]
    assert not (tmp_path / "bad").exists()


# --- inference: evaluate, predict, serve, distill's teacher pass, search's trials ---------------------------------


@pytest.fixture(scope="module")
def trained(tiny_roberta, headlines_csv, tmp_path_factory):
    """One tiny LoRA run, trained in fp32 (the suite's setting)."""
    from budgetune.training.train import train

    out = tmp_path_factory.mktemp("auto-precision") / "run"
    train(run_cfg(tiny_roberta, headlines_csv, out))
    return out


def logits_of(run) -> tuple[torch.Tensor, object, dict]:
    from budgetune.data.readers import TextTable
    from budgetune.inference.loading import load_for_inference
    from budgetune.inference.runner import table_logits

    accelerator, model, tokenizer, info = load_for_inference(run)
    logits = table_logits(model, tokenizer, TextTable(TEXTS, None, None, "texts"), accelerator, 16,
                          info["max_seq_length"])
    release_accelerator()
    return torch.from_numpy(logits), model, info


@cpu_only
def test_inference_computes_in_bf16_where_the_cpu_has_it_and_the_weights_stay_fp32(trained, monkeypatch, capsys):
    fake_cpu(monkeypatch, PLAIN)
    fp32, _, info32 = logits_of(trained)
    assert capsys.readouterr().out.startswith("precision fp32: auto: the CPU has no native bf16")
    fake_cpu(monkeypatch, AVX512_BF16)
    bf16, model, info16 = logits_of(trained)
    assert capsys.readouterr().out.startswith("precision bf16: auto: the CPU has native bf16")
    assert (info32["precision"]["precision"], info16["precision"]["precision"]) == ("fp32", "bf16")
    # autocast computes; the encoder's Linear weights are stored in bf16 once (autocast would cast them each
    # forward, to the same numbers), the head stays fp32
    dtypes = {n: p.dtype for n, p in model.named_parameters()}
    assert {d for n, d in dtypes.items() if "classifier" in n} == {torch.float32}
    assert torch.bfloat16 in set(dtypes.values())
    assert not torch.equal(bf16, fp32)  # it did compute in bf16 ...
    torch.testing.assert_close(bf16, fp32, atol=0.05, rtol=0.05)  # ... to bf16's rounding


@cpu_only
def test_evaluate_and_predict_record_the_precision(trained, headlines_csv, tmp_path, monkeypatch, capsys):
    from budgetune.inference.evaluate import evaluate
    from budgetune.inference.predict import predict

    fake_cpu(monkeypatch, AMX)
    m = evaluate(trained, str(headlines_csv), output=str(tmp_path / "ev"))
    assert m["precision"] == "bf16" and json.loads((tmp_path / "ev.json").read_text())["precision"] == "bf16"
    release_accelerator()
    texts = write_csv(tmp_path / "texts.csv", ["text"], [[t] for t in TEXTS])
    predict(trained, str(texts), str(tmp_path / "sub.csv"))
    release_accelerator()
    lines = capsys.readouterr().out.splitlines()
    assert sum(line.startswith("precision bf16: auto: the CPU has native bf16 matrix instructions (AMX-BF16)")
               for line in lines) == 2
    assert len((tmp_path / "sub.csv").read_text().splitlines()) == len(TEXTS) + 1


@cpu_only
@pytest.mark.parametrize(("caps", "name"), [(AVX512_BF16, "bf16"), (PLAIN, "fp32")])
def test_serve_computes_in_what_the_cpu_has_and_health_says_so(trained, monkeypatch, caps, name):
    from budgetune.serve.api import create_app
    from budgetune.serve.registry import Registry, parse_runs

    fake_cpu(monkeypatch, caps)
    registry = Registry(parse_runs([str(trained)]), device="cpu")
    assert registry.groups[0].precision.name == name
    with TestClient(create_app(registry)) as c:
        wait_ready(c.get)
        health = c.get("/health").json()
        assert health["ready"] and health["precision"].startswith(f"precision {name}: auto: the CPU has")
        r = c.post("/v1/classify", json={"texts": TEXTS[:4], "adapter": trained.name})
        assert r.status_code == 200 and len(r.json()["predictions"]) == 4


@pytest.mark.slow
@cpu_only
def test_distills_teacher_pass_and_searchs_trials_follow_the_cpu(trained, tiny_roberta, headlines_csv, tmp_path,
                                                                 monkeypatch):
    from budgetune.recipes.distill import distill
    from budgetune.recipes.search.driver import search

    fake_cpu(monkeypatch, AVX512_BF16)
    student = tmp_path / "student"
    distill(run_cfg(tiny_roberta, headlines_csv, student, cache_dir=str(tmp_path / "cache")), [str(trained)])
    record = json.loads((student / "distill.json").read_text())
    assert [t["precision"] for t in record["teachers"]] == ["bf16"] and not record["teachers"][0]["cache_hit"]
    assert precision_events(student)[0]["precision"] == "bf16"  # the student's run too

    out = tmp_path / "search"
    search(run_cfg(tiny_roberta, headlines_csv, tmp_path / "unused"), search_group={"learning_rate": [1e-3]},
           n_trials=1, output_dir=out, keep_top_k=1, verbose=False)
    trial = out / "trials" / "0000"
    assert [e["precision"] for e in precision_events(trial)] == ["bf16"]
