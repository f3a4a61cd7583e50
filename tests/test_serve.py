"""budgetune serve: the HTTP API on real tiny adapters (LoRA x2, DoRA, LoHa on one tiny RoBERTa), in-process and
as a real subprocess on loopback, plus the page in a real headless Chromium."""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch
from conftest import ROOT, headline_rows, tiny_train_args, wait_ready
from fastapi.testclient import TestClient

from budgetune.cli.serve import serve_parser
from budgetune.metrics import softmax
from budgetune.serve.api import ServeOptions, create_app, field_name
from budgetune.serve.registry import Registry, parse_runs

pytestmark = pytest.mark.slow  # trains real models: `pytest -m "not slow"` skips the module

TEXTS = [t for _, t in headline_rows()[:48]]
LIMITS = ServeOptions(max_texts=8, max_chars=200, max_body_bytes=8192)


@pytest.fixture(scope="module")
def runs(tiny_roberta, headlines_csv, tmp_path_factory) -> dict[str, Path]:
    """Four adapters on one base: two LoRA (other seeds), a DoRA (LoRA type, no mixed batch), a LoHa (own type)."""
    from filelock import FileLock

    from budgetune.config import resolve
    from budgetune.training.train import train

    # Trained once per session: under pytest-xdist the workers share the session's folder (the first one trains).
    base = tmp_path_factory.getbasetemp()
    shared = base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base
    out = shared / "serve-runs"
    specs = {"a": ("lora", {}), "b": ("lora", {"seed": 11, "learning_rate": 1e-2}), "d": ("dora", {"seed": 3}),
             "c": ("loha", {"seed": 5})}
    with FileLock(str(shared / "serve-runs.lock")):
        if not (out / "done").is_file():
            for name, (method, extra) in specs.items():
                args = tiny_train_args(tiny_roberta, headlines_csv, out / name, method, num_train_epochs=1,
                                       overwrite_output_dir="true", **extra)
                train(resolve(None, args[1:]))
            (out / "done").touch()
    return {n: out / n for n in specs}


@pytest.fixture(scope="module")
def offline(runs) -> dict[str, np.ndarray]:
    """Each adapter alone, through `budgetune predict`'s own path (merged model, table_logits), on TEXTS."""
    from budgetune.data.readers import TextTable
    from budgetune.inference.loading import load_for_inference
    from budgetune.inference.runner import table_logits

    out = {}
    for name, run in runs.items():
        accelerator, model, tokenizer, info = load_for_inference(run)
        out[name] = table_logits(model, tokenizer, TextTable(TEXTS, None, None, "texts"), accelerator, 256,
                                 info["max_seq_length"])
    return out


@pytest.fixture(scope="module")
def client(runs):
    app = create_app(Registry(parse_runs([str(p) for p in runs.values()])), LIMITS)
    with TestClient(app) as c:
        wait_ready(c.get)
        yield c


def check_matches(answer: dict, logits: np.ndarray) -> None:
    """Probabilities as offline (1e-5); the label too, unless the top two logits are closer than that."""
    probs = softmax(logits[None])[0]
    assert np.abs(np.asarray(answer["probabilities"]) - probs).max() < 1e-5
    top2 = np.sort(logits)[-2:]
    if top2[1] - top2[0] > 1e-5:
        assert answer["label_id"] == int(logits.argmax())


# --- adapters, mixed batches --------------------------------------------------------------------------------------

def test_adapters_endpoint_describes_each_bundle(client, runs):
    r = client.get("/v1/adapters")
    assert r.status_code == 200
    got = {a["name"]: a for a in r.json()["adapters"]}
    assert list(got) == ["a", "b", "d", "c"]
    for name, run in runs.items():
        info = json.loads((run / "adapter" / "budgetune.json").read_text())
        a = got[name]
        assert a["base_model"] == info["base_model_name_or_path"] and a["method"] == info["method"]
        assert a["trainable_parameters"] == info["budget"]["total_trainable"] > 0
        assert a["labels"] == info["label_names"] and a["validation_accuracy"] == info["metrics"]["eval_accuracy"]
    # a, b: LoRA sharing one forward; d: DoRA on the same base, its own forward; c: LoHa alone on a base, merged
    assert {n: a["served"] for n, a in got.items()} == {"a": "mixed", "b": "mixed", "d": "grouped", "c": "merged"}


def test_one_process_many_adapters_equal_each_alone(runs, offline):
    """Rows of all four adapters interleaved in one call: the logits each adapter gives alone (predict's path)."""
    registry = Registry(parse_runs([f"{n}={p}" for n, p in runs.items()]))
    registry.load()
    assert len(registry.groups) == 2  # a, b, d share one copy of the base; c (another peft type) has its own
    assert np.abs(offline["a"] - offline["b"]).max() > 1e-3  # the adapters really differ: the test can fail
    names = [["a", "b", "d", "c"][i % 4] for i in range(len(TEXTS))]
    rows = [registry.tokenize(n, [t])[0] for n, t in zip(names, TEXTS)]
    forwards: Counter[str] = Counter()
    got = registry.logits(rows, forwards)
    for i, n in enumerate(names):
        assert np.abs(got[i] - offline[n][i]).max() < 1e-5, (i, n)
    assert forwards["mixed"] >= 1 and forwards["single"] >= 1 and forwards["merged"] >= 1
    # and every adapter over all texts at once, one request each
    for n in runs:
        assert np.abs(registry.logits(registry.tokenize(n, TEXTS)) - offline[n]).max() < 1e-5


def test_bundle_adapter_scale_is_honoured_per_adapter(runs, tmp_path):
    """A copy of `a` recording another adapter_scale, served beside a and b: each as `load_model` gives it."""
    from budgetune.inference.loading import load_model

    copy = tmp_path / "rescaled" / "adapter"
    shutil.copytree(runs["a"] / "adapter", copy)
    info = json.loads((copy / "budgetune.json").read_text())
    scale_a = info.get("adapter_scale", 1.0)  # training may have chosen one (issue 15)
    scale_copy = 1.0 if scale_a != 1.0 else 0.5
    (copy / "budgetune.json").write_text(json.dumps({**info, "adapter_scale": scale_copy}))
    registry = Registry(parse_runs([str(runs["a"]), str(runs["b"]), str(copy.parent)]))
    registry.load()
    assert {d["name"]: d["served"] for d in registry.describe()} == {"a": "mixed", "b": "mixed",
                                                                       "rescaled": "mixed"}
    names = [["a", "rescaled", "b"][i % 3] for i in range(24)]
    got = registry.logits([registry.tokenize(n, [t])[0] for n, t in zip(names, TEXTS)])
    alone = {}
    for name, folder, scale in (("a", runs["a"], scale_a), ("rescaled", copy.parent, scale_copy)):
        model, tokenizer, info = load_model(folder)
        assert info["applied_adapter_scale"] == scale
        enc = tokenizer(TEXTS[:24], truncation=True, max_length=info["max_seq_length"], padding=True,
                        return_tensors="pt")
        with torch.inference_mode():
            alone[name] = model(**enc).logits.numpy()
        rows = [i for i, n in enumerate(names) if n == name]
        assert np.abs(got[rows] - alone[name][rows]).max() < 1e-5
    assert np.abs(alone["a"] - alone["rescaled"]).max() > 1e-4  # the scales differ in effect: the test can fail


def test_a_fully_fine_tuned_model_is_served_beside_adapters(runs, offline, tiny_roberta, headlines_csv, tmp_path):
    from budgetune.config import resolve
    from budgetune.data.readers import TextTable
    from budgetune.inference.loading import load_for_inference
    from budgetune.inference.runner import table_logits
    from budgetune.training.train import train

    args = tiny_train_args(tiny_roberta, headlines_csv, tmp_path / "full", "full", num_train_epochs=1)
    train(resolve(None, args[1:]))
    registry = Registry(parse_runs([str(runs["a"]), str(tmp_path / "full")]))
    registry.load()
    assert {d["name"]: d["served"] for d in registry.describe()} == {"a": "merged", "full": "merged"}
    names = ["a", "full"] * 8
    got = registry.logits([registry.tokenize(n, [t])[0] for n, t in zip(names, TEXTS)])
    accelerator, model, tokenizer, info = load_for_inference(tmp_path / "full")
    alone = table_logits(model, tokenizer, TextTable(TEXTS[:16], None, None, "t"), accelerator, 256, 48)
    assert np.abs(got[1::2] - alone[1::2]).max() < 1e-5 and np.abs(got[::2] - offline["a"][:16:2]).max() < 1e-5


def test_answers_equal_budgetune_predict_files(client, runs, tmp_path):
    """`budgetune predict --probabilities` (6 decimals) for a and b, against the server's answers for both."""
    import csv

    from budgetune.inference.predict import predict

    source = tmp_path / "texts.csv"
    with open(source, "w", newline="", encoding="utf-8") as f:
        csv.writer(f).writerows([["text"], *([t] for t in TEXTS)])
    for name in ("a", "b"):
        out = predict(runs[name], str(source), str(tmp_path / f"{name}.csv"), probabilities=True)
        with open(out, encoding="utf-8") as f:
            rows = list(csv.reader(f))[1:]
        answers = [p for i in range(0, len(TEXTS), 8) for p in client.post(
            "/v1/classify", json={"texts": TEXTS[i:i + 8], "adapter": name}).json()["predictions"]]
        for row, p in zip(rows, answers, strict=True):
            assert np.abs(np.asarray(row[2:], dtype=float) - p["probabilities"]).max() < 1e-6
            if sorted(p["probabilities"])[-1] - sorted(p["probabilities"])[-2] > 1e-6:
                assert int(row[1]) == p["label_id"]


def test_long_text_is_cut_and_the_answer_says_so(client):
    long = "Markets rally on upbeat earnings " * 20  # 660 characters > max_chars 200
    r = client.post("/v1/classify", json={"texts": [long, "short"], "adapter": "a"})
    body = r.json()
    assert r.status_code == 200 and body["max_chars"] == 200 and body["truncated_texts"] == 1
    assert [p["truncated"] for p in body["predictions"]] == [True, False]
    cut = client.post("/v1/classify", json={"texts": [long[:200]], "adapter": "a"}).json()["predictions"][0]
    assert np.allclose(cut["probabilities"], body["predictions"][0]["probabilities"], atol=1e-6)


# --- bad input: 4xx naming the field, never a 500 -----------------------------------------------------------------

BAD = [
    ({"texts": [], "adapter": "a"}, 422, "texts"),
    ({"texts": ["x"] * 9, "adapter": "a"}, 422, "texts"),
    ({"texts": "one text", "adapter": "a"}, 422, "texts"),
    ({"texts": ["ok", 7], "adapter": "a"}, 422, "texts[1]"),
    ({"texts": ["ok", None], "adapter": "a"}, 422, "texts[1]"),
    ({"texts": ["ok"], "adapter": 3}, 422, "adapter"),
    ({"texts": ["ok"], "adapter": "nope"}, 422, "adapter"),
    ({"texts": ["ok"]}, 422, "adapter"),  # several adapters served: the name is required
    ({"texts": ["ok"], "adapter": "a", "extra": 1}, 422, "extra"),
    ({"adapter": "a"}, 422, "texts"),
    (["ok"], 422, "body"),
]


@pytest.mark.parametrize(("payload", "status", "field"), BAD)
def test_bad_json_is_a_4xx_naming_the_field(client, payload, status, field):
    r = client.post("/v1/classify", json=payload)
    assert r.status_code == status, r.text
    body = r.json()
    assert body["field"] == field and field in body["message"]


@pytest.mark.parametrize(("raw", "status", "needle"), [
    (b'{"texts": ["caf\xe9"], "adapter": "a"}', 400, "not UTF-8 (byte 0xe9 at offset 15)"),
    (b'{"texts": ["a"', 400, "not valid JSON"),
    (b"", 400, "not valid JSON"),
])
def test_bad_bytes_are_a_400_naming_the_body(client, raw, status, needle):
    r = client.post("/v1/classify", content=raw, headers={"content-type": "application/json"})
    assert r.status_code == status and r.json()["field"] == "body" and needle in r.json()["message"]


def test_body_over_the_limit_is_a_413_declared_or_streamed(client):
    big = json.dumps({"texts": ["x" * 9000], "adapter": "a"}).encode()
    r = client.post("/v1/classify", content=big, headers={"content-type": "application/json"})
    assert r.status_code == 413 and r.json()["field"] == "body" and "8192" in r.json()["message"]

    def chunks():  # no Content-Length: counted as it arrives
        for i in range(0, len(big), 1000):
            yield big[i:i + 1000]

    r = client.post("/v1/classify", content=chunks(), headers={"content-type": "application/json"})
    assert r.status_code == 413 and r.json()["field"] == "body"


def test_errors_never_500_and_the_server_keeps_answering(client):
    for payload, _, _ in BAD:
        client.post("/v1/classify", json=payload)
    assert client.post("/v1/classify", json={"texts": ["still here"], "adapter": "c"}).status_code == 200
    assert client.get("/nowhere").json()["error"] == "not_found"
    text = client.get("/metrics").text
    assert not re.search(r'budgetune_requests_total\{[^}]*status="5(?!03)\d\d"\}', text)  # 503: /health, loading
    assert re.search(r'budgetune_errors_total\{status="422",field="texts"\} [1-9]', text)


def test_the_listening_line_is_a_url_a_client_can_open():
    from budgetune.serve.api import listen_url

    assert listen_url("127.0.0.1", 8000) == "http://127.0.0.1:8000/"
    assert listen_url("::1", 8000) == "http://[::1]:8000/"
    assert httpx.URL(listen_url("::1", 8000)).port == 8000
    assert listen_url("fe80::1%eth0", 8000) == "http://[fe80::1%25eth0]:8000/"


def test_field_names():
    from budgetune.serve.telemetry import field_label

    assert field_label("text_pair[0]") == "text_pair" and field_label("texts[2]") == "texts"  # not `other`
    assert field_name(("body", "texts", 3)) == "texts[3]"
    assert field_name(("body",)) == "body" and field_name(("body", "adapter")) == "adapter"


# --- metrics, docs, page --------------------------------------------------------------------------------------------

def test_metrics_are_prometheus_text(client):
    client.post("/v1/classify", json={"texts": TEXTS[:3], "adapter": "a"})
    r = client.get("/metrics")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain; version=0.0.4")
    sample = re.compile(r'^[a-z_]+(\{([a-z_]+="[^"]*",?)+\})? -?[0-9.e+-]+$|^[a-z_]+\{le="\+Inf"\} \d+$')
    for line in r.text.splitlines():
        assert line.startswith("# HELP ") or line.startswith("# TYPE ") or sample.match(line), line
    for hist in ("budgetune_classify_latency_seconds", "budgetune_batch_texts", "budgetune_batch_requests"):
        counts = [int(v) for v in re.findall(rf"^{hist}_bucket\{{le=\"[^\"]+\"\}} (\d+)$", r.text, re.M)]
        total = int(re.search(rf"^{hist}_count (\d+)$", r.text, re.M).group(1))
        assert counts == sorted(counts) and counts[-1] == total > 0
    texts_a = int(re.search(r'^budgetune_texts_total\{adapter="a"\} (\d+)$', r.text, re.M).group(1))
    client.post("/v1/classify", json={"texts": TEXTS[:3], "adapter": "a"})
    again = client.get("/metrics").text
    assert int(re.search(r'^budgetune_texts_total\{adapter="a"\} (\d+)$', again, re.M).group(1)) == texts_a + 3


def test_docs_and_page(client):
    assert client.get("/docs").status_code == 200
    spec = client.get("/openapi.json").json()
    schema = spec["paths"]["/v1/classify"]["post"]["requestBody"]["content"]["application/json"]["schema"]
    assert set(schema["properties"]) == {"texts", "adapter", "text_pair"}
    assert {"/v1/adapters", "/health", "/metrics"} <= set(spec["paths"])
    page = client.get("/")
    assert page.status_code == 200 and 'id="adapter"' in page.text and "v1/classify" in page.text


# --- auth, readiness ------------------------------------------------------------------------------------------------

def test_api_key_guards_every_api_request(runs):
    app = create_app(Registry(parse_runs([str(runs["a"])])), ServeOptions(api_key="s3cret"))
    with TestClient(app) as c:
        wait_ready(c.get)  # /health and the page stay open: probes and browsers cannot send headers
        assert c.get("/").status_code == 200
        for method, path in (("post", "/v1/classify"), ("get", "/v1/adapters"), ("get", "/metrics"),
                             ("get", "/nowhere")):
            for headers in ({}, {"Authorization": "Bearer wrong"}, {"X-API-Key": "s3cre"}):
                r = c.request(method, path, json={"texts": ["x"]}, headers=headers)
                assert r.status_code == 401 and r.json()["field"] == "Authorization", (path, headers)
                assert r.headers["www-authenticate"] == "Bearer"
        ok = {"texts": ["Stocks rally"]}  # one adapter served: the name may be left out
        assert c.post("/v1/classify", json=ok, headers={"Authorization": "Bearer s3cret"}).status_code == 200
        assert c.post("/v1/classify", json=ok, headers={"X-API-Key": "s3cret"}).json()["adapter"] == "a"
        assert c.post("/v1/classify", json=ok, headers={"Authorization": "bearer s3cret"}).status_code == 200  # RFC 7235
        assert c.post("/v1/classify", json=ok, headers={"Authorization": "s3cret"}).status_code == 401  # no scheme


def test_an_api_key_beyond_ascii_matches_as_sent(runs):
    app = create_app(Registry(parse_runs([str(runs["a"])])), ServeOptions(api_key="clé"))
    with TestClient(app) as c:
        wait_ready(c.get)
        r = c.post("/v1/classify", json={"texts": ["x"]}, headers={"X-API-Key": "clé".encode()})
        assert r.status_code == 200, r.text


def test_api_key_from_the_environment(monkeypatch):
    monkeypatch.setenv("BUDGETUNE_API_KEY", "from-env")
    assert serve_parser().parse_args(["run"]).api_key == "from-env"
    assert serve_parser().parse_args(["run", "--api_key", "flag"]).api_key == "flag"
    monkeypatch.delenv("BUDGETUNE_API_KEY")
    a = serve_parser().parse_args(["run"])
    assert a.api_key is None and a.host == "127.0.0.1"


def test_not_ready_until_the_models_are_loaded(runs):
    gate = threading.Event()
    app = create_app(Registry(parse_runs([str(runs["a"]), str(runs["b"])])), before_load=gate.wait)
    with TestClient(app) as c:
        h = c.get("/health")
        assert h.status_code == 503 and h.json()["status"] == "loading"
        r = c.post("/v1/classify", json={"texts": ["x"], "adapter": "a"})
        assert r.status_code == 503 and r.json()["error"] == "not_ready" and r.headers["retry-after"] == "1"
        assert c.get("/v1/adapters").status_code == 503
        gate.set()
        wait_ready(c.get)
        assert c.post("/v1/classify", json={"texts": ["x"], "adapter": "a"}).status_code == 200


def run_with_missing_base(run, tmp_path):
    """A copy of `run` whose bundle names a base model folder that does not exist."""
    broken = tmp_path / "broken"
    shutil.copytree(run / "adapter", broken / "adapter")
    info = json.loads((broken / "adapter" / "budgetune.json").read_text())
    info["base_model_name_or_path"] = str(tmp_path / "gone-model")
    (broken / "adapter" / "budgetune.json").write_text(json.dumps(info))
    return broken


def test_a_base_model_that_fails_to_load_is_reported(runs, tmp_path):
    broken = run_with_missing_base(runs["a"], tmp_path)
    app = create_app(Registry(parse_runs([str(broken)])))
    with TestClient(app) as c:
        deadline = time.monotonic() + 60
        while (h := c.get("/health").json())["status"] == "loading" and time.monotonic() < deadline:
            time.sleep(0.05)
        assert h["status"] == "failed" and "gone-model" in h["message"] and str(broken) in h["message"]
        assert c.post("/v1/classify", json={"texts": ["x"]}).status_code == 503


def test_run_folders_are_checked_before_loading(runs, tmp_path):
    from budgetune.errors import AdapterError

    with pytest.raises(AdapterError, match="two adapters named 'a'"):
        parse_runs([str(runs["a"]), f"a={runs['b']}"])
    with pytest.raises(AdapterError, match="adapter name"):
        parse_runs([f"bad name={runs['a']}"])
    no_weights = tmp_path / "no-weights"
    shutil.copytree(runs["a"] / "adapter", no_weights)
    (no_weights / "adapter_model.safetensors").unlink()
    with pytest.raises(AdapterError, match="no adapter weights"):
        parse_runs([str(no_weights)])
    assert [a.name for a in parse_runs([str(runs["a"] / "adapter"), f"x={runs['a']}"])] == ["a", "x"]


@pytest.mark.parametrize(("flags", "needle"), [
    (["--max_texts", "0"], "--max_texts must be at least 1"),
    (["--batch_wait_ms", "-1"], "--batch_wait_ms must be 0 or more"),
    (["--max_queue_texts", "0"], "--max_queue_texts must be at least 1"),
    (["--max_queue_texts", "10"], "--max_queue_texts (10) must be at least --max_texts (64)"),
    (["--request_timeout", "0"], "--request_timeout must be more than 0 seconds"),
    (["--request_timeout", "nan"], "--request_timeout must be more than 0 seconds")])
def test_bad_flags_exit_2_before_loading(runs, capsys, flags, needle):
    from budgetune.cli import main

    assert main(["serve", str(runs["a"]), *flags]) == 2
    assert needle in capsys.readouterr().err


# --- a live server on loopback: concurrency, the page ---------------------------------------------------------------

@contextlib.contextmanager
def serving(app):
    """The app under uvicorn in this process on a free loopback port, ready; its URL."""
    import uvicorn

    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        while not server.started:
            assert thread.is_alive(), "uvicorn did not start"
            time.sleep(0.02)
        port = server.servers[0].sockets[0].getsockname()[1]
        url = f"http://127.0.0.1:{port}"
        with httpx.Client(base_url=url, timeout=60) as c:
            wait_ready(c.get)
        yield url
    finally:
        server.should_exit = True
        thread.join(timeout=30)


@pytest.fixture(scope="module")
def live(runs):
    """The four adapters on a live loopback server; batches gather for up to 50 ms."""
    app = create_app(Registry(parse_runs([str(p) for p in runs.values()])),
                     ServeOptions(max_texts=64, batch_wait_ms=50))
    with serving(app) as url:
        yield url


def classify_concurrently(url: str, requests: list[dict]) -> list[httpx.Response | BaseException]:
    """Each request from its own thread and connection, all released at once."""
    answers: list = [None] * len(requests)
    start = threading.Barrier(len(requests))

    def send(i: int) -> None:
        try:
            with httpx.Client(base_url=url, timeout=120) as c:
                start.wait()
                answers[i] = c.post("/v1/classify", json=requests[i])
        except BaseException as e:  # reported by the test
            answers[i] = e

    threads = [threading.Thread(target=send, args=(i,)) for i in range(len(requests))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return answers


def test_64_concurrent_clients_batched_and_exact(live, offline):
    names = ["a", "b", "d", "c"]
    requests = [{"texts": [TEXTS[i % len(TEXTS)]], "adapter": names[i % 4]} for i in range(64)]
    answers = classify_concurrently(live, requests)
    assert all(isinstance(r, httpx.Response) and r.status_code == 200 for r in answers), answers
    for i, r in enumerate(answers):
        check_matches(r.json()["predictions"][0], offline[names[i % 4]][i % len(TEXTS)])
    with httpx.Client(base_url=live, timeout=60) as c:
        metrics = c.get("/metrics").text
        sequential = [c.post("/v1/classify", json=q).json() for q in requests]
    # some model batch gathered several requests, and some mixed LoRA adapters in one forward
    alone = int(re.search(r'^budgetune_batch_requests_bucket\{le="1"\} (\d+)$', metrics, re.M).group(1))
    batches = int(re.search(r"^budgetune_batch_requests_count (\d+)$", metrics, re.M).group(1))
    assert alone < batches
    assert int(re.search(r'^budgetune_forwards_total\{kind="mixed"\} (\d+)$', metrics, re.M).group(1)) >= 1
    for r, s in zip(answers, sequential):
        p, q = r.json()["predictions"][0], s["predictions"][0]
        assert np.abs(np.subtract(p["probabilities"], q["probabilities"])).max() < 1e-5


# --- hostile input on the live server: a 4xx naming the field, and the server answers on ------------------------

DEEP = 50_000
MANY_NUMBERS = ("[" + ",".join(["1"] * 200_000) + "]").encode()  # 400 KB: under the 1 MiB body limit
HOSTILE = [  # a name, the raw body, status, field, words of the message
    ("deep-arrays", b"[" * DEEP + b"]" * DEEP, 400, "body", "nested too deeply"),
    ("deep-texts", b'{"texts": ' + b"[" * DEEP + b"]" * DEEP + b', "adapter": "a"}', 400, "body", "nested too deeply"),
    ("deep-objects", b'{"x": ' * DEEP + b"1" + b"}" * DEEP, 400, "body", "nested too deeply"),
    ("nested-100", b'{"texts": ' + b"[" * 100 + b"]" * 100 + b', "adapter": "a"}', 422, "texts[0]", "valid string"),
    ("surrogate-high", rb'{"texts": ["ok", "bad \ud800 here"], "adapter": "a"}', 422, "texts[1]",
     r"unpaired surrogate \ud800 at character 4"),
    ("surrogate-low", rb'{"texts": ["\udc00"], "adapter": "a"}', 422, "texts[0]", r"unpaired surrogate \udc00"),
    ("surrogates-reversed", rb'{"texts": ["\ude00\ud83d"], "adapter": "a"}', 422, "texts[0]", "unpaired surrogate"),
    ("surrogate-adapter", rb'{"texts": ["x"], "adapter": "\ud800"}', 422, "adapter", "unpaired surrogate"),
    ("surrogate-key", rb'{"texts": ["x"], "adapter": "a", "\ud800": 1}', 422, "body", "an object key"),
    ("huge-integer", b'{"texts": ["x"], "adapter": ' + b"9" * 5000 + b"}", 400, "body", "more than 4300 digits"),
    ("huge-float", b'{"texts": ["x"], "adapter": 1e999}', 422, "adapter", "valid string"),
    ("nan", b'{"texts": [NaN], "adapter": "a"}', 400, "body", "NaN is not JSON"),
    ("infinity", b'{"texts": ["x"], "adapter": -Infinity}', 400, "body", "-Infinity is not JSON"),
    ("utf8-surrogate", b'{"texts": ["\xed\xa0\x80"], "adapter": "a"}', 400, "body", "not UTF-8 (byte 0xed at offset 12)"),
    ("utf8-overlong", b'{"texts": ["\xc0\xaf"], "adapter": "a"}', 400, "body", "not UTF-8 (byte 0xc0 at offset 12)"),
    ("null", b"null", 422, "body", "valid dictionary"),
    ("a-string", b'"texts"', 422, "body", "valid dictionary"),
    ("texts-object", b'{"texts": {"0": "x"}, "adapter": "a"}', 422, "texts", "valid list"),
    ("texts-bool", b'{"texts": [true], "adapter": "a"}', 422, "texts[0]", "valid string"),
    ("200k-numbers", b'{"texts": ' + MANY_NUMBERS + b', "adapter": "a"}', 422, "texts",
     "at most 64 texts per request (got 200000"),
    ("long-key", b'{"texts": ["x"], "adapter": "a", "' + b"k" * 100_000 + b'": 1}', 422, "k" * 64 + "…",
     "Extra inputs are not permitted"),
    ("long-adapter", b'{"texts": ["x"], "adapter": "' + b"n" * 100_000 + b'"}', 422, "adapter", "unknown adapter"),
]


def post_raw(c: httpx.Client, raw: bytes, content_type: str | None = "application/json") -> httpx.Response:
    return c.post("/v1/classify", content=raw, headers={"content-type": content_type} if content_type else {})


@pytest.mark.parametrize(("raw", "status", "field", "needle"), [pytest.param(*h[1:], id=h[0]) for h in HOSTILE])
def test_hostile_bodies_are_a_4xx_naming_the_field(live, raw, status, field, needle):
    with httpx.Client(base_url=live, timeout=60) as c:
        r = post_raw(c, raw)
        assert r.status_code == status, r.text[:500]
        body = r.json()
        assert body["field"] == field and needle in body["message"] and body["message"].startswith(field)
        assert len(body["errors"]) <= 20 and len(r.content) < 10_000  # the answer does not echo the flood back
        assert c.post("/v1/classify", json={"texts": ["still answering"], "adapter": "c"}).status_code == 200


def test_endpoints_without_a_body_ignore_one_and_refuse_a_post(live):
    with httpx.Client(base_url=live, timeout=60) as c:
        for path in ("/v1/adapters", "/health", "/metrics"):
            assert c.request("GET", path, content=HOSTILE[0][1]).status_code == 200
            r = c.post(path, content=HOSTILE[0][1])
            assert r.status_code == 405 and r.json()["error"] == "method_not_allowed"


@pytest.mark.parametrize(("content_type", "status"), [
    ("text/plain", 415), ("application/x-www-form-urlencoded", 415), ("multipart/form-data; boundary=x", 415),
    ("application/json; charset=latin-1", 415), ("application/json; charset=UTF-8", 200),
    ("application/json;charset=\"utf-8\"", 200), ("application/problem+json", 200), (None, 200)])
def test_a_body_that_is_not_json_by_its_content_type_is_a_415(live, content_type, status):
    with httpx.Client(base_url=live, timeout=60) as c:
        r = post_raw(c, b'{"texts": ["Stocks rally"], "adapter": "a"}', content_type)
        assert r.status_code == status, r.text
        if status == 415:
            body = r.json()
            assert body["field"] == "Content-Type" and body["error"] == "unsupported_media_type"
            assert content_type.split(";")[0] in body["message"] and "application/json" in body["message"]


def test_odd_but_valid_texts_are_answered(live):
    texts = ["", " ", "\x00", "\u200b\ufeff", "\U0001F600 a pair of surrogates in JSON", "x" * 100_000, "مرحبا",
             "a\nb\tc"]
    with httpx.Client(base_url=live, timeout=60) as c:
        r = post_raw(c, json.dumps({"texts": texts, "adapter": "d"}, ensure_ascii=True).encode())  # \ud83d\ude00
        assert r.status_code == 200, r.text
        assert len(r.json()["predictions"]) == len(texts) and r.json()["truncated_texts"] == 1


# --- request ids, bounded metric labels, the model thread's hand-off -----------------------------------------------

def test_every_response_carries_a_request_id(client):
    answers = [client.post("/v1/classify", json={"texts": ["x"], "adapter": "a"}), client.get("/health"),
               client.post("/v1/classify", json={"texts": [], "adapter": "a"}), client.get("/nowhere"),
               client.get("/metrics"), client.put("/v1/classify")]
    ids = [r.headers["x-request-id"] for r in answers]
    assert len(set(ids)) == len(ids) and all(re.fullmatch(r"[0-9a-f]{32}", i) for i in ids)
    for r in answers[2:4] + answers[5:]:
        assert r.status_code >= 400 and r.json()["request_id"] == r.headers["x-request-id"]
    given = client.post("/v1/classify", json={"texts": []}, headers={"X-Request-ID": "trace-42.a_b:c"})
    assert given.headers["x-request-id"] == given.json()["request_id"] == "trace-42.a_b:c"  # a caller's own id
    for bad in ("two words", "x" * 129, "ünï"):  # not echoed: a fresh one instead
        r = client.get("/health", headers={"X-Request-ID": bad.encode()})
        assert re.fullmatch(r"[0-9a-f]{32}", r.headers["x-request-id"])


def test_a_500_names_its_request_id_in_the_body_and_the_log_line_with_the_traceback(runs):
    import logging

    registry = Registry(parse_runs([str(runs["a"])]))
    records: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = records.append
    log = logging.getLogger("uvicorn.error")
    log.addHandler(handler)
    try:
        with TestClient(create_app(registry), raise_server_exceptions=False) as c:
            wait_ready(c.get)

            def broken(adapter, texts):
                raise RuntimeError("tokenizer exploded")

            registry.tokenize = broken
            r = c.post("/v1/classify", json={"texts": ["x"]})
            assert r.status_code == 500 and r.json()["error"] == "error"
            rid = r.headers["x-request-id"]
            assert r.json()["request_id"] == rid and rid in r.json()["message"]
            assert "tokenizer exploded" not in r.text  # the details stay in the log
            del registry.tokenize
            assert c.post("/v1/classify", json={"texts": ["x"]}).status_code == 200
            assert re.search(r'budgetune_requests_total\{method="POST",path="/v1/classify",status="500"\} 1$',
                             c.get("/metrics").text, re.M)
    finally:
        log.removeHandler(handler)
    (record,) = [x for x in records if rid in x.getMessage()]
    assert record.exc_info is not None and "/v1/classify" in record.getMessage()
    assert "tokenizer exploded" in logging.Formatter().format(record)  # the traceback, in that line


def test_non_finite_logits_are_a_500_naming_the_text_not_an_answer(runs):
    """NaN logits (broken weights, an overflowing precision) would answer class 0 with NaN probabilities."""
    import logging

    registry = Registry(parse_runs([str(runs["a"])]))
    real = registry.logits

    def nan_in_second_row(rows, forwards=None):
        out = real(rows, forwards)
        out[1:2] = np.nan
        return out

    registry.logits = nan_in_second_row
    records: list = []
    handler = logging.Handler()
    handler.emit = records.append
    logging.getLogger("uvicorn.error").addHandler(handler)
    try:
        with TestClient(create_app(registry)) as c:
            wait_ready(c.get)
            r = c.post("/v1/classify", json={"texts": ["fine", "broken", "fine too"]})
            again = c.post("/v1/classify", json={"texts": ["one text"]})
    finally:
        logging.getLogger("uvicorn.error").removeHandler(handler)
    assert r.status_code == 500 and r.json()["error"] == "non_finite_logits" and r.json()["field"] is None
    assert r.json()["errors"][0]["field"] == "texts[1]" and again.status_code == 200
    assert "non-finite logits (NaN or inf) for 1 of 3 texts (the first: texts[1])" in r.json()["message"]
    rid = r.headers["x-request-id"]
    assert any(rid in x.getMessage() and "non-finite logits" in x.getMessage() for x in records)  # the operator's


def test_metric_labels_come_from_a_fixed_set_not_from_the_client(client):
    for i in range(20):
        client.request(f"BREW{i}", "/v1/classify")
        client.post("/v1/classify", json={"texts": ["x"], "adapter": "a", f"key{i}": 1})
        client.post("/v1/classify", json={"texts": ["ok"] * 3 + [i], "adapter": "a"})
        client.get(f"/path{i}")
    text = client.get("/metrics").text
    assert "BREW" not in text and "key1" not in text and "path1" not in text and "texts[" not in text
    values: dict[str, set[str]] = {}
    for name, value in re.findall(r'(\w+)="([^"]*)"', text):
        values.setdefault(name, set()).add(value)
    assert values["method"] <= {"GET", "HEAD", "POST", "PUT", "DELETE", "PATCH", "OPTIONS", "other"}
    assert "other" in values["method"] and "other" in values["field"]
    assert values["field"] <= {"", "texts", "adapter", "body", "Authorization", "Content-Type", "other"}
    assert values["path"] <= {"/", "/docs", "/docs/oauth2-redirect", "/openapi.json", "/redoc", "/health",
                              "/v1/classify", "/v1/adapters", "/metrics", "other"}


def test_forward_counts_are_handed_to_the_event_loop_with_each_batch(runs):
    """The model thread fills a Counter of its own per batch; only the event loop's thread adds it to /metrics."""
    registry = Registry(parse_runs([str(runs["a"]), str(runs["b"])]))
    with TestClient(create_app(registry)) as c:
        wait_ready(c.get)
        metrics = c.app.state.serve.metrics
        writers: set[str] = set()

        class Recording(type(metrics.forwards)):
            def __setitem__(self, key, value):
                writers.add(threading.current_thread().name)
                super().__setitem__(key, value)

        metrics.forwards = Recording(metrics.forwards)
        for i in range(4):
            assert c.post("/v1/classify", json={"texts": TEXTS[i:i + 2], "adapter": "ab"[i % 2]}).status_code == 200
        loop_thread = c.portal.call(lambda: threading.current_thread().name)
        text = c.get("/metrics").text
    assert writers == {loop_thread}
    assert sum(int(n) for n in re.findall(r'^budgetune_forwards_total\{kind="\w+"\} (\d+)$', text, re.M)) >= 4
    assert not hasattr(registry, "forwards")  # no counter shared between the threads


# --- under pressure: a bounded queue, a timeout for waiting in it --------------------------------------------------

@contextlib.contextmanager
def gated_server(run: Path, **options):
    """A live server on `run` whose model calls wait for `gate`; `entered` is set once one has started."""
    registry = Registry(parse_runs([str(run)]))
    gate, entered, logits = threading.Event(), threading.Event(), registry.logits

    def held(*args):
        entered.set()
        assert gate.wait(60), "the test never opened the gate"
        return logits(*args)

    registry.logits = held
    try:
        with serving(create_app(registry, ServeOptions(**options))) as url:
            yield url, gate, entered
    finally:
        gate.set()


def metric(text: str, sample: str) -> float:
    m = re.search(rf"^{re.escape(sample)} (\S+)$", text, re.M)
    assert m is not None, f"{sample} not in /metrics"
    return float(m.group(1))


def test_a_flood_beyond_the_queue_bound_is_refused_and_the_server_keeps_answering(runs):
    with gated_server(runs["a"], max_texts=2, max_queue_texts=8) as (url, gate, entered):
        requests = [{"texts": TEXTS[2 * i:2 * i + 2]} for i in range(24)]
        answers: list = []
        sender = threading.Thread(target=lambda: answers.extend(classify_concurrently(url, requests)))
        sender.start()
        with httpx.Client(base_url=url, timeout=60) as c:
            deadline = time.monotonic() + 60
            while metric(c.get("/metrics").text, 'budgetune_rejected_total{reason="queue_full"}') < 20:
                assert time.monotonic() < deadline, "the flood was not refused"
                time.sleep(0.02)
            flooded = c.get("/metrics").text  # 4 requests (8 texts) wait for the model; the server still answers
            assert metric(flooded, "budgetune_queue_texts") == 8
            assert c.get("/health").status_code == 200 and c.get("/v1/adapters").status_code == 200
            refused = c.post("/v1/classify", json={"texts": ["one more"]})
            assert refused.status_code == 503 and refused.headers["retry-after"] == "1"
            gate.set()
            sender.join(timeout=60)
            assert c.post("/v1/classify", json={"texts": ["after the flood"]}).status_code == 200
            after = c.get("/metrics").text
    assert sorted(r.status_code for r in answers) == [200] * 4 + [503] * 20
    for r in answers:
        if r.status_code == 503:
            body = r.json()
            assert body["error"] == "overloaded" and r.headers["retry-after"] == "1"
            assert "8 texts" in body["message"] and "--max_queue_texts" in body["message"]
    assert metric(after, 'budgetune_rejected_total{reason="queue_full"}') == 21
    assert metric(after, "budgetune_queue_texts") == 0
    assert metric(after, 'budgetune_errors_total{status="503",field=""}') == 21


def test_a_request_waiting_past_request_timeout_is_a_503_and_leaves_the_queue(runs):
    with gated_server(runs["a"], request_timeout=0.5) as (url, gate, entered):
        first: list = []
        sender = threading.Thread(target=lambda: first.extend(classify_concurrently(url, [{"texts": ["first"]}])))
        sender.start()
        assert entered.wait(60)  # the first request's batch is on the model, which is held
        with httpx.Client(base_url=url, timeout=60) as c:
            r = c.post("/v1/classify", json={"texts": ["second", "third"]})  # waits in the queue behind it
            assert r.status_code == 503 and r.headers["retry-after"] == "1", r.text
            body = r.json()
            assert body["error"] == "timeout" and "0.5 s" in body["message"] and "--request_timeout" in body["message"]
            assert metric(c.get("/metrics").text, "budgetune_queue_texts") == 1  # only the first one's text
            gate.set()
            sender.join(timeout=60)
            assert c.post("/v1/classify", json={"texts": ["later"]}).status_code == 200
            text = c.get("/metrics").text
    assert first[0].status_code == 200  # taken into a batch before its time ran out: answered
    assert metric(text, 'budgetune_rejected_total{reason="timeout"}') == 1
    assert metric(text, "budgetune_queue_texts") == 0
    assert metric(text, "budgetune_batch_texts_sum") == 2  # "first" and "later": the timed-out texts never ran


def test_a_client_that_hangs_up_leaves_the_queue_uncomputed(runs):
    """A client giving up on its own timeout closes the connection: its texts leave the queue and never reach the
    model (they used to be computed for nobody, holding queue room under overload)."""
    with gated_server(runs["a"]) as (url, gate, entered):
        first: list = []
        sender = threading.Thread(target=lambda: first.extend(classify_concurrently(url, [{"texts": ["first"]}])))
        sender.start()
        assert entered.wait(60)  # the first request's batch is on the model, which is held
        with httpx.Client(base_url=url, timeout=0.5) as impatient, pytest.raises(httpx.TimeoutException):
            impatient.post("/v1/classify", json={"texts": ["second", "third"]})
        with httpx.Client(base_url=url, timeout=60) as c:
            deadline = time.monotonic() + 30
            while metric(c.get("/metrics").text, "budgetune_abandoned_total") < 1:
                assert time.monotonic() < deadline, "the server never noticed the client leave"
                time.sleep(0.05)
            assert metric(c.get("/metrics").text, "budgetune_queue_texts") == 1  # only the first one's text
            gate.set()
            sender.join(timeout=60)
            assert c.post("/v1/classify", json={"texts": ["later"]}).status_code == 200
            text = c.get("/metrics").text
    assert first[0].status_code == 200
    assert metric(text, "budgetune_batch_texts_sum") == 2  # "first" and "later": the abandoned texts never ran
    assert metric(text, "budgetune_classify_latency_seconds_count") == 3  # every answer is timed, the 499 too

def chromium() -> str | None:
    return next((p for p in (shutil.which(n) for n in ("chromium", "chromium-browser", "google-chrome")) if p), None)


@pytest.mark.skipif(chromium() is None, reason="no Chromium installed (CI installs Debian's `chromium`)")
def test_page_in_a_headless_browser(live):
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright not installed (it is in .[test])")
    text = "Quarterly profits beat forecasts as shares jump"
    with httpx.Client(base_url=live, timeout=60) as c:
        expected = c.post("/v1/classify", json={"texts": [text], "adapter": "b"}).json()["predictions"][0]
    with sync_api.sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=chromium(), args=["--no-sandbox", "--disable-gpu"])
        try:
            page = browser.new_page()
            page.goto(live + "/")
            page.wait_for_selector("#adapter option[value='b']", state="attached")
            page.fill("#text", text)
            page.select_option("#adapter", "b")
            page.click("#go")
            page.wait_for_function("document.getElementById('label').textContent.length > 0")
            assert page.inner_text("#label") == expected["label"]
            assert page.locator("#bars .bar").count() == 4
            shown = [float(s.replace("%", "")) for s in page.locator("#bars .prob").all_inner_texts()]
            assert np.allclose(shown, np.round(np.asarray(expected["probabilities"]) * 100, 1), atol=0.051)
            assert page.inner_text("#error") == ""
        finally:
            browser.close()


# --- the real command: startup failures, SIGTERM drain --------------------------------------------------------------

def serve_env() -> dict:
    return {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}


def test_startup_fails_fast_naming_the_folder(runs, tmp_path, capsys):
    from budgetune.cli import main

    missing = tmp_path / "no-such-run"
    p = subprocess.run([sys.executable, "-m", "budgetune", "serve", str(runs["a"]), str(missing)], cwd=ROOT,
                       env=serve_env(), capture_output=True, text=True, timeout=120)
    assert p.returncode == 2 and f"budgetune: error: {missing}: no adapter here" in p.stderr
    corrupt = tmp_path / "corrupt"  # the same path in-process (a second interpreter costs seconds)
    shutil.copytree(runs["a"] / "adapter", corrupt / "adapter")
    (corrupt / "adapter" / "budgetune.json").write_text('{"label_names": ["x", "y"]}')
    assert main(["serve", str(corrupt)]) == 2
    err = capsys.readouterr().err
    assert str(corrupt / "adapter" / "budgetune.json") in err and "missing base_model_name_or_path" in err


@pytest.mark.slow
def test_loading_failure_stops_the_command_with_exit_2(runs, tmp_path):
    broken = run_with_missing_base(runs["a"], tmp_path)
    p = subprocess.run([sys.executable, "-m", "budgetune", "serve", str(broken), "--port", "0"], cwd=ROOT,
                       env=serve_env(), capture_output=True, text=True, timeout=120)
    assert p.returncode == 2 and "gone-model" in p.stderr and str(broken / "adapter") in p.stderr


def test_an_adapter_without_its_tokenizer_stops_the_command_with_exit_2(runs, tmp_path):
    broken = tmp_path / "no-tokenizer"
    shutil.copytree(runs["a"], broken)
    for f in (broken / "adapter").glob("*"):
        if f.name.startswith(("tokenizer", "special_tokens", "vocab", "merges")):
            f.unlink()
    p = subprocess.run([sys.executable, "-m", "budgetune", "serve", str(broken), "--port", "0"], cwd=ROOT,
                       env=serve_env(), capture_output=True, text=True, timeout=120)
    assert p.returncode == 2 and "Traceback" not in p.stderr, p.stderr[-3000:]
    assert f"{broken / 'adapter'}: cannot load its tokenizer" in p.stderr


def start_server(*args: str, log: Path) -> tuple[subprocess.Popen, str]:
    """`budgetune serve ARGS --port 0` as a subprocess; its URL from the line it prints once listening."""
    with open(log, "w") as err:
        proc = subprocess.Popen([sys.executable, "-m", "budgetune", "serve", *args, "--port", "0"], cwd=ROOT,
                                env=serve_env(), stdout=subprocess.PIPE, stderr=err, text=True)
    line = proc.stdout.readline()
    m = re.search(r"listening on (http://127\.0\.0\.1:\d+)/", line)
    if m is None:
        proc.kill()
        raise AssertionError(f"server did not start: {line!r}\n{log.read_text()[-3000:]}")
    return proc, m.group(1)


@pytest.mark.slow
def test_sigterm_drains_in_flight_requests_then_exits_0(runs, tmp_path, offline):
    # Batches wait 1.5 s for company: SIGTERM arrives while all 16 requests are inside the server.
    proc, url = start_server(str(runs["a"]), str(runs["b"]), "--batch_wait_ms", "1500", log=tmp_path / "err.log")
    try:
        with httpx.Client(base_url=url, timeout=60) as c:
            wait_ready(c.get)
            requests = [{"texts": [TEXTS[i]], "adapter": "ab"[i % 2]} for i in range(16)]
            answers: list = []
            sender = threading.Thread(target=lambda: answers.extend(classify_concurrently(url, requests)))
            sender.start()
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline:  # all 16 in flight (+ this metrics request)
                m = re.search(r"^budgetune_requests_in_flight (\d+)$", c.get("/metrics").text, re.M)
                if int(m.group(1)) >= 17:
                    break
                time.sleep(0.02)
            proc.send_signal(signal.SIGTERM)
            sender.join(timeout=60)
        assert proc.wait(timeout=60) == 0, (tmp_path / "err.log").read_text()[-3000:]
    finally:
        if proc.poll() is None:
            proc.kill()
    assert len(answers) == 16 and all(isinstance(r, httpx.Response) and r.status_code == 200 for r in answers)
    for i, r in enumerate(answers):
        check_matches(r.json()["predictions"][0], offline["ab"[i % 2]][i])
    assert "budgetune serve: stopped" in (tmp_path / "err.log").read_text()
