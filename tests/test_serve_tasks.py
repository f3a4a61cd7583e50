"""budgetune serve beyond one label per text: a multi-label, a regression and a text-pair run (tiny RoBERTa, trained
through the real CLI) served together; each answer equals `budgetune predict`'s output for the same texts, a pair
run needs `text_pair`, and the OpenAPI schema describes each task's response."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
from conftest import run_cli, tiny_train_args, wait_ready, write_csv
from fastapi.testclient import TestClient
from test_task_verbs import read_submission, task_files  # noqa: F401  (task_files: the fixture, shared)

from budgetune.serve.api import ServeOptions, create_app
from budgetune.serve.registry import Registry, parse_runs

pytestmark = pytest.mark.slow  # trains real models

N = 16  # texts compared with predict


@pytest.fixture(scope="module")
def task_runs(tiny_roberta, task_files, tmp_path_factory) -> dict:  # noqa: F811
    """One run per task through `budgetune train`, trained once for all xdist workers."""
    from filelock import FileLock

    base = tmp_path_factory.getbasetemp()
    shared = base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base
    out = shared / "serve-task-runs"
    specs = {"tags": (task_files["multi_delim"], {"task": "multi_label", "label_delimiter": ";",
                                                   "learning_rate": 2e-2}),
             "score": (task_files["reg"], {"task": "regression", "learning_rate": 2e-2}),
             "same": (task_files["pairs"], {"text_pair_column_name": "text_b", "learning_rate": 2e-2})}
    with FileLock(str(shared / "serve-task-runs.lock")):
        if not (out / "done").is_file():
            for name, (data, extra) in specs.items():
                run_cli(*tiny_train_args(tiny_roberta, data, out / name, "lora", num_train_epochs=1,
                                         overwrite_output_dir="true", **extra))
            (out / "done").touch()
    return {n: out / n for n in specs}


@pytest.fixture(scope="module")
def client(task_runs):
    app = create_app(Registry(parse_runs([str(p) for p in task_runs.values()])), ServeOptions(max_texts=N))
    with TestClient(app) as c:
        wait_ready(c.get)
        yield c


@pytest.fixture(scope="module")
def inputs(task_files, tmp_path_factory):  # noqa: F811
    """The first N rows of the pair file: its texts alone (one file) and its pairs (another), for predict."""
    rows = read_submission(task_files["pairs"])[:N]
    folder = tmp_path_factory.mktemp("serve-inputs")
    texts = [r["text"] for r in rows]
    pairs = [r["text_b"] for r in rows]
    return {"texts": texts, "pairs": pairs, "single": write_csv(folder / "single.csv", ["text"], [[t] for t in texts]),
            "paired": write_csv(folder / "paired.csv", ["text", "text_b"], list(zip(texts, pairs)))}


def predicted(run, source, tmp_path, **kwargs) -> list[dict]:
    from budgetune.inference.predict import predict

    return read_submission(predict(run, str(source), str(tmp_path / f"{run.name}.csv"), **kwargs))


def test_adapters_say_their_task_and_pairs(client):
    got = {a["name"]: a for a in client.get("/v1/adapters").json()["adapters"]}
    assert {n: (a["task"], a["text_pair"]) for n, a in got.items()} == {
        "tags": ("multi_label", None), "score": ("regression", None), "same": ("single_label", "text_b")}
    assert got["score"]["labels"] == ["score"]


def test_multi_label_answers_equal_predict(client, task_runs, inputs, tmp_path):
    rows = predicted(task_runs["tags"], inputs["single"], tmp_path, probabilities=True, label_format="name")
    r = client.post("/v1/classify", json={"texts": inputs["texts"], "adapter": "tags"})
    body = r.json()
    assert r.status_code == 200 and body["task"] == "multi_label"
    info = json.loads((task_runs["tags"] / "adapter" / "budgetune.json").read_text())
    names = body["labels"]
    assert names == info["label_names"] and body["thresholds"] == [info["thresholds"][n] for n in names]
    for row, p in zip(rows, body["predictions"], strict=True):
        probs = np.array([float(row[n]) for n in names])
        assert np.abs(probs - p["probabilities"]).max() < 2e-6  # predict writes 6 decimals
        assert p["labels"] == [names[k] for k in p["label_ids"]]
        if np.abs(np.asarray(p["probabilities"]) - body["thresholds"]).min() > 1e-5:  # no label on its threshold
            assert p["labels"] == json.loads(row["Label"])


def test_regression_answers_equal_predict(client, task_runs, inputs, tmp_path):
    rows = predicted(task_runs["score"], inputs["single"], tmp_path)
    body = client.post("/v1/classify", json={"texts": inputs["texts"], "adapter": "score"}).json()
    assert body["task"] == "regression" and body["targets"] == ["score"]
    values = np.array([p["values"]["score"] for p in body["predictions"]])
    np.testing.assert_allclose(values, [float(r["Label"]) for r in rows], rtol=1e-5, atol=1e-5)
    assert np.ptp(values) > 1e-3  # the values differ by text: the comparison can fail


def test_pair_answers_equal_predict_and_pairs_matter(client, task_runs, inputs, tmp_path):
    rows = predicted(task_runs["same"], inputs["paired"], tmp_path, probabilities=True)
    body = client.post("/v1/classify", json={"texts": inputs["texts"], "text_pair": inputs["pairs"],
                                             "adapter": "same"}).json()
    assert "task" not in body and body["labels"] == ["0", "1"]  # a single-label answer, as ever
    got = np.array([p["probabilities"] for p in body["predictions"]])
    np.testing.assert_allclose(got, [[float(r["0"]), float(r["1"])] for r in rows], atol=2e-6)
    swapped = client.post("/v1/classify", json={"texts": inputs["texts"], "text_pair": inputs["pairs"][::-1],
                                                "adapter": "same"}).json()
    assert np.abs(np.array([p["probabilities"] for p in swapped["predictions"]]) - got).max() > 1e-5


def test_pairs_are_tokenized_as_true_pairs(task_runs, inputs):
    from transformers import AutoTokenizer

    registry = Registry(parse_runs([str(task_runs["same"])]))
    tok = AutoTokenizer.from_pretrained(task_runs["same"] / "adapter")
    registry.adapters["same"].tokenizer = tok
    rows = registry.tokenize("same", inputs["texts"], inputs["pairs"])
    want = tok(inputs["texts"], inputs["pairs"], truncation="longest_first", max_length=48)["input_ids"]
    assert [r.features["input_ids"] for r in rows] == want
    assert want != tok(inputs["texts"], truncation=True, max_length=48)["input_ids"]


@pytest.mark.parametrize(("payload", "needle"), [
    ({"texts": ["a", "b"], "adapter": "same"}, "was trained on text pairs (column 'text_b'); send one text_pair"),
    ({"texts": ["a", "b"], "text_pair": ["x"], "adapter": "same"}, "1 pairs for 2 texts"),
    ({"texts": ["a"], "text_pair": ["x"], "adapter": "score"}, "reads single texts, not pairs"),
    ({"texts": ["a"], "text_pair": "x", "adapter": "same"}, "valid list"),
    ({"texts": ["a"], "text_pair": ["x"] * (N + 1), "adapter": "same"}, f"at most {N} texts per request"),
])
def test_text_pair_errors_are_a_422_naming_the_field(client, payload, needle):
    r = client.post("/v1/classify", json=payload)
    assert r.status_code == 422 and r.json()["field"] == "text_pair" and needle in r.json()["message"], r.json()


def test_a_long_pair_is_cut_and_the_answer_says_so(client):
    body = client.post("/v1/classify", json={"texts": ["short", "short"], "text_pair": ["x" * 2001, "y"],
                                             "adapter": "same"}).json()
    assert [p["truncated"] for p in body["predictions"]] == [True, False] and body["truncated_texts"] == 1


def test_the_openapi_schema_describes_each_tasks_response(client):
    spec = client.get("/openapi.json").json()
    ok = spec["paths"]["/v1/classify"]["post"]["responses"]["200"]["content"]["application/json"]["schema"]
    refs = {s["$ref"].rsplit("/", 1)[-1] for s in ok["anyOf"]}
    assert refs == {"ClassifyResponse", "MultiLabelResponse", "RegressionResponse"}
    schemas = spec["components"]["schemas"]
    assert {"labels", "thresholds", "predictions"} <= set(schemas["MultiLabelResponse"]["properties"])
    assert schemas["RegressionResponse"]["properties"]["task"]["const"] == "regression"
    assert set(schemas["Values"]["properties"]) == {"values", "truncated"}
    request = spec["paths"]["/v1/classify"]["post"]["requestBody"]["content"]["application/json"]["schema"]
    assert request["properties"]["text_pair"]["anyOf"][0]["type"] == "array"
