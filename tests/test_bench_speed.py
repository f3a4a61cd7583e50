"""bench/speed.py's floors (issue 22): measured per dtype (fp32, bf16, int8 matmul rates), and every figure names
the floor it is against."""

from __future__ import annotations

import argparse
import importlib.util
import re

import pytest
import torch
from conftest import ROOT


@pytest.fixture(scope="module")
def speed():
    spec = importlib.util.spec_from_file_location("bench_speed", ROOT / "bench" / "speed.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    module.TORCH_DTYPES.update(fp32=torch.float32, bf16=torch.bfloat16, fp16=torch.float16)
    return module


def test_matmul_rates_are_measured_per_dtype(speed):
    rates = speed.matmul_rates(torch.device("cpu"), 64)
    assert list(rates) == ["fp32", "bf16", "int8"]
    assert rates["fp32"] > 0 and rates["bf16"] > 0
    assert rates["int8"] is None or rates["int8"] > 0  # None: a torch without torch._int_mm
    assert list(speed.matmul_rates(torch.device("cpu"), 64, "fp16")) == ["fp32", "bf16", "int8", "fp16"]


def fake_results() -> dict:
    """Two repeats of seed (fp32) and budgetune (bf16): 32 texts of 10 tokens per step or inference run."""
    def train(sps):
        return {"samples": 32, "seconds": 32 / sps, "steps": 1, "lengths": [10] * 32, "padded": 640, "real": 320,
                "step_s": [32 / sps], "rate": 1e9}

    def infer(sps):
        return {"seconds": 32 / sps, "lengths": [10] * 32, "padded": 400, "real": 320, "rate": 1e9}

    rates = [{"fp32": 1e11, "bf16": 4e11, "int8": 8e11}, {"fp32": 1e11, "bf16": 4e11, "int8": 8e11}]
    return {"seed_train": [train(5), train(5)], "bt_train": [train(50), train(50)], "gr_train": [],
            "seed_inf": [infer(20), infer(20)], "bt_inf": [infer(200), infer(200)], "rates": rates}


def test_every_floor_names_its_dtype_and_each_row_is_held_to_its_own_precision(speed, capsys):
    shape = {"non_embedding": 10_000_000, "hidden": 384, "layers": 6}
    R = fake_results()
    a = argparse.Namespace(repeats=2, graphs="off")
    rows = {r["key"]: r for r in speed.floor_rows(a, R, shape, "bf16", speed.machine_rates(R))}
    flops = 32 * speed.forward_flops([10], shape)  # one step's or one inference run's forward
    assert rows["bt_train"]["floors"] == pytest.approx({"fp32": 32 * 1e11 / (2 * flops),
                                                        "bf16": 32 * 4e11 / (2 * flops)})  # no int8 training
    assert rows["bt_inf"]["floors"]["int8"] == pytest.approx(32 * 8e11 / flops)
    assert (rows["seed_train"]["precision"], rows["bt_inf"]["precision"]) == ("fp32", "bf16")

    speed.report(a, R, shape, 1.0, True, "bf16", 64, torch.device("cpu"))
    out = capsys.readouterr().out
    assert re.search(r"matmul rates .*fp32 100\.0 GFLOP/s, bf16 400\.0 GFLOP/s, int8 800\.0 GOP/s", out)
    assert "CPU matrix instructions (torch.cpu.get_capabilities)" in out
    header = next(line for line in out.splitlines() if line.startswith("| pipeline"))
    for dtype in ("fp32", "bf16", "int8"):
        assert f"floor samples/s at {dtype}" in header
    budgetune_train = next(line for line in out.splitlines() if line.startswith("| budgetune | train"))
    own = 32 * 4e11 / (2 * flops) / 50  # against the bf16 floor, which budgetune computes in
    assert budgetune_train.endswith(f"| {own:.1f} (bf16) |") and "| n/a |" in budgetune_train
    assert not any("load-normalized" in line and "/ seed" in line for line in out.splitlines())
