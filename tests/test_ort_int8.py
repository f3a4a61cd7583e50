"""--precision int8 computed by onnxruntime where it is installed (issue 22): the merged model's int8 graph, built
once per model content and cached, gives fp32's classes; without onnxruntime, torch's dynamic quantization as
before, and the header line says which; serve answers as predict does.

Each test puts HOME (budgetune's cache: ~/.cache/budgetune) in its own temporary folder.
"""

from __future__ import annotations

import csv
import sys

import numpy as np
import pytest
import torch
from conftest import headline_rows, run_cli, tiny_train_args, wait_ready, write_csv
from torch import nn

from budgetune.config import resolve
from budgetune.hardware.devices import release_accelerator

pytest.importorskip("onnxruntime")
pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="int8 computes on CPU only")

TEXTS = [t for _, t in headline_rows()[:60]]
# int8 against fp32 on the tiny model, largest logit difference: weights rounded to 1/254 of each output channel's
# range and activations to 1/255 of each batch's, over 2 layers of width 32 (measured: 4e-4 on a 4-class head).
# A class may then change only where fp32's two best logits lie within twice this of each other.
LOGIT_TOL = 0.02
ORT_HEADER = ("precision int8: --precision int8, computed by onnxruntime (int8 weights per channel, activations "
              "quantized per batch)")


@pytest.fixture(scope="module")
def run(tiny_roberta, headlines_csv, tmp_path_factory):
    """A tiny LoRA run (no precision measurement at its end: the tests below build the int8 graph themselves)."""
    from budgetune.training.train import train

    out = tmp_path_factory.mktemp("ort") / "run"
    flags = {"max_train_samples": 64, "per_device_train_batch_size": 8, "num_train_epochs": 2,
             "robust_tolerance": "null", "inference_precision_tolerance": "null"}
    train(resolve(None, tiny_train_args(tiny_roberta, headlines_csv, out, "lora", **flags)[1:]))
    release_accelerator()
    return out


@pytest.fixture
def home(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    return tmp_path / "home"


def logits_in(run, precision: str, capsys, **kw) -> tuple[np.ndarray, nn.Module, str]:
    from budgetune.data.readers import TextTable
    from budgetune.inference.loading import load_for_inference
    from budgetune.inference.runner import table_logits

    accelerator, model, tokenizer, info = load_for_inference(run, precision=precision, **kw)
    out = table_logits(model, tokenizer, TextTable(TEXTS, None, None, "texts"), accelerator, 16, info["max_seq_length"])
    release_accelerator()
    return out, model, capsys.readouterr().out.splitlines()[0]


def cached(home) -> list:
    return sorted((home / ".cache" / "budgetune" / "onnx-int8").glob("*.onnx"))


def test_int8_by_onnxruntime_gives_fp32s_classes(run, home, capsys):
    import onnx

    from budgetune.inference.ort_int8 import OrtModel

    fp32, _, _ = logits_in(run, "fp32", capsys)
    int8, model, head = logits_in(run, "int8", capsys)
    assert head == ORT_HEADER and isinstance(model, OrtModel)
    (graph,) = cached(home)
    ops = {n.op_type for n in onnx.load(str(graph)).graph.node}
    assert ops & {"MatMulInteger", "DynamicQuantizeMatMul"} and "DynamicQuantizeLinear" in ops  # it is int8
    assert not np.array_equal(int8, fp32)
    np.testing.assert_allclose(int8, fp32, atol=LOGIT_TOL, rtol=0)
    top2 = np.sort(fp32, axis=1)[:, -2:]
    clear = top2[:, 1] - top2[:, 0] > 2 * LOGIT_TOL
    assert clear.sum() >= len(TEXTS) // 2  # the check below is about most texts, not a few
    np.testing.assert_array_equal(int8.argmax(1)[clear], fp32.argmax(1)[clear])


def test_the_int8_graph_is_built_once_per_adapter_scale(run, home, capsys, monkeypatch):
    from budgetune.inference import onnx_graph

    written = []
    write_graph = onnx_graph.write_graph
    monkeypatch.setattr(onnx_graph, "write_graph", lambda *a: written.append(a[-1]) or write_graph(*a))
    first, _, _ = logits_in(run, "int8", capsys)
    assert len(written) == 1 and len(cached(home)) == 1
    again, _, _ = logits_in(run, "int8", capsys)
    assert len(written) == 1  # the second load reuses the cached graph
    np.testing.assert_array_equal(again, first)
    logits_in(run, "int8", capsys, adapter_scale=0.5)  # another scale: other merged weights, another graph
    assert len(written) == 2 and len(cached(home)) == 2
    assert not list((home / ".cache" / "budgetune" / "onnx-int8").glob(".*"))  # no temporary file left


def test_without_onnxruntime_int8_is_torchs_and_says_why(run, home, capsys, monkeypatch):
    from torch.ao.nn.quantized.dynamic import Linear as QLinear

    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # `import onnxruntime` now fails
    fp32, _, _ = logits_in(run, "fp32", capsys)
    int8, model, head = logits_in(run, "int8", capsys)
    assert head == ("precision int8: --precision int8, computed by torch's dynamic quantization (onnxruntime is not "
                    "installed; pip install 'budgetune[onnx]' for onnxruntime's int8, faster)")
    quantized = [n for n, m in model.named_modules() if isinstance(m, QLinear)]
    assert quantized and all(".encoder." in n and "lora_" not in n for n in quantized)
    heads = [m for n, m in model.named_modules() if "classifier" in n and isinstance(m, nn.Linear)]
    assert heads and all(m.weight.dtype == torch.float32 for m in heads)
    np.testing.assert_allclose(int8, fp32, atol=0.15)  # logits of a 4-class head: int8 rounding
    assert not cached(home)


def test_the_measurement_at_the_end_of_training_names_the_int8_backend(monkeypatch):
    """precision_choice measures int8 with what int8 means here and says so, in the table and in its reason."""
    from budgetune.inference import precision_choice, precisions

    rows = {"fp32": {"accuracy": 0.9, "texts_per_s": 10.0}, "int8": {"accuracy": 0.9, "texts_per_s": 30.0}}
    monkeypatch.setattr(precision_choice, "measure_one",
                        lambda m, d, f, y, name, *rest: dict(rows[name], **({"backend": "onnxruntime"}
                                                                             if name == "int8" else {})))
    monkeypatch.setattr(precisions, "unavailable", lambda name, *a: None if name in rows else "faked away")
    rec = precision_choice.record(nn.Linear(2, 2), torch.device("cpu"), None, np.zeros(4), 0.2)
    assert rec["choice"] == "int8" and rec["reason"].startswith("the fastest (computed by onnxruntime) within")
    assert "int8 by onnxruntime" in rec["measured_on"]
    assert "x3  (onnxruntime)" in precision_choice.table_text(rec)


def test_serve_int8_answers_like_predict(run, home, tmp_path):
    from fastapi.testclient import TestClient

    from budgetune.inference.ort_int8 import OrtModel
    from budgetune.serve.api import create_app
    from budgetune.serve.registry import Registry, parse_runs

    texts = write_csv(tmp_path / "texts.csv", ["text"], [[t] for t in TEXTS[:16]])
    run_cli("predict", str(run), "--input", str(texts), "--output", str(tmp_path / "sub.csv"), "--probabilities",
            "--precision", "int8", env={"HOME": str(home)})
    with open(tmp_path / "sub.csv", encoding="utf-8") as f:
        predicted = np.asarray([[float(x) for x in r[2:]] for r in list(csv.reader(f))[1:]])
    registry = Registry(parse_runs([str(run)]), device="cpu", precision="int8")
    with TestClient(create_app(registry)) as c:
        wait_ready(c.get)
        assert c.get("/health").json()["precision"] == ORT_HEADER
        r = c.post("/v1/classify", json={"texts": TEXTS[:16]})
    assert r.status_code == 200 and isinstance(registry.groups[0].model, OrtModel)
    served = np.asarray([p["probabilities"] for p in r.json()["predictions"]])
    assert len(cached(home)) == 1  # serve reused the graph predict built
    # one batch of the same 16 texts in both: the same activations quantized the same way (probabilities are
    # printed to 6 decimals)
    np.testing.assert_allclose(served, predicted, atol=2e-6)
