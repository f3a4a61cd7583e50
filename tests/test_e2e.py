"""End to end through the real CLI on the packaged MiniLM: train -> evaluate -> predict -> plot."""

from __future__ import annotations

import csv
import json
import pickle

import pytest
from conftest import KAGGLE_TEST, read_jsonl, run_cli, tiny_train_args, write_csv

pytestmark = pytest.mark.slow  # trains real models: `pytest -m "not slow"` skips the module


@pytest.fixture(scope="module")
def minilm_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("e2e") / "run"
    run_cli("train", "--output_dir", str(out), "--num_train_epochs", "3", "--max_seq_length", "64",
            "--cache_dir", str(out.parent / "cache"), "--logging_steps", "5")
    return out


def test_train_learns_and_writes_the_run_folder(minilm_run):
    out = minilm_run
    for name in ("config.yaml", "metrics.jsonl", "budget.json", "evaluation.json", "evaluation.txt",
                 "adapter/adapter_config.json", "adapter/adapter_model.safetensors", "adapter/budgetune.json",
                 "adapter/README.md", "adapter/tokenizer.json", "plots/loss.png", "plots/accuracy.png",
                 "plots/learning_rate.png", "plots/confusion_matrix.png"):
        assert (out / name).is_file(), name
    evaluation = json.loads((out / "evaluation.json").read_text())
    # Built-in headlines, 4 balanced classes: chance is 0.25; a short run must clearly beat it.
    assert evaluation["accuracy"] >= 0.7, evaluation["accuracy"]
    assert evaluation["label_names"] == ["World", "Sports", "Business", "Sci/Tech"]
    assert sum(map(sum, evaluation["confusion_matrix"])) == evaluation["n"] == 48
    events = read_jsonl(out / "metrics.jsonl")
    evals = [e for e in events if e["event"] == "eval"]
    assert len(evals) == 3 and evals[-1]["step"] == 42  # 432 training rows / 32 = 14 steps x 3 epochs
    assert max(e["eval_accuracy"] for e in evals) == pytest.approx(evaluation["raw_adapter"]["accuracy"])
    # 48 validation rows cannot resolve the default 0.5-point tolerance: no scale recorded, the adapter as trained
    assert evaluation["adapter_scale"] == json.loads((out / "adapter" / "budgetune.json").read_text()).get(
        "adapter_scale", 1.0) == 1.0
    trains = [e for e in events if e["event"] == "train"]
    assert trains[0]["loss"] > trains[-1]["loss"]
    budget = json.loads((out / "budget.json").read_text())
    assert budget["total_trainable"] == 663_552 + 1_540  # LoRA r16 on all 36 linear layers + the 384x4 head
    # Portable: the packaged MiniLM is stored by name (resolved where the run is used), not as a site-packages path
    assert json.loads((out / "adapter" / "budgetune.json").read_text())["base_model_name_or_path"] == \
        "packaged:all-MiniLM-L6-v2"
    card = (out / "adapter" / "README.md").read_text()
    assert "665,092" in card and "PeftModel.from_pretrained" in card


def test_evaluate_predict_plot(minilm_run, headlines_csv, tmp_path):
    out = minilm_run
    proc = run_cli("evaluate", str(out), "--data_file", str(headlines_csv))
    assert "accuracy" in proc.stdout
    report = json.loads((out / "evaluation-headlines.json").read_text())
    assert report["n"] == 480 and report["accuracy"] > 0.7

    with open(headlines_csv, encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    texts = tmp_path / "texts.csv"
    with open(texts, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["text"])
        w.writerows([r["text"]] for r in rows[:50])
    sub = tmp_path / "submission.csv"
    run_cli("predict", str(out), "--input", str(texts), "--output", str(sub))
    with open(sub, encoding="utf-8") as f:
        lines = list(csv.reader(f))
    assert lines[0] == ["ID", "Label"]
    assert [int(r[0]) for r in lines[1:]] == list(range(50))
    assert {int(r[1]) for r in lines[1:]} <= {0, 1, 2, 3}
    agree = sum(int(r[1]) == int(row["label"]) for r, row in zip(lines[1:], rows))
    assert agree >= 35

    # Streamed in chunks of 7 rows (what a file over data.STREAM_BYTES does): the same submission, byte for byte.
    from budgetune.data import readers as data_lib
    from budgetune.inference.predict import predict

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(data_lib, "STREAM_BYTES", 0)
        mp.setattr(data_lib, "CHUNK_ROWS", 7)
        predict(str(out), str(texts), str(tmp_path / "streamed.csv"), batch_size=4)
    assert (tmp_path / "streamed.csv").read_text() == sub.read_text()

    # The course ships a pickled pandas DataFrame or Dataset: same predictions through the safe unpickler.
    import pandas as pd

    pkl = tmp_path / "test_unlabelled.pkl"
    with open(pkl, "wb") as f:
        pickle.dump(pd.DataFrame({"text": [r["text"] for r in rows[:50]]}), f)
    sub2 = tmp_path / "submission2.csv"
    run_cli("predict", str(out), "--input", str(pkl), "--output", str(sub2))
    assert sub2.read_text() == sub.read_text()

    for png in (out / "plots").glob("*.png"):
        png.unlink()
    proc = run_cli("plot", str(out))
    assert (out / "plots" / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "confusion_matrix.png" in proc.stdout


def test_train_ends_with_a_summary_and_keeps_the_scale_a_small_validation_cannot_choose(tiny_roberta, tmp_path):
    out = tmp_path / "run"
    proc = run_cli(*tiny_train_args(tiny_roberta, "builtin:headlines", out, "lora", num_train_epochs=1))
    evaluation = json.loads((out / "evaluation.json").read_text())
    assert evaluation["n"] == 48 and evaluation["adapter_scale"] == 1.0
    assert evaluation["adapter_scale_validation"] is None  # no scale was tried: every one would tie or differ by rows
    assert "48 validation rows cannot resolve the 0.5-point --robust_tolerance" in evaluation["adapter_scale_reason"]
    assert "adapter_scale" not in json.loads((out / "adapter" / "budgetune.json").read_text())
    summary = proc.stdout[proc.stdout.index("\ndone\n"):]
    assert f"validation accuracy {evaluation['accuracy']:.2%}" in summary
    assert "on 48 rows: 10% held out of the training data" in summary
    assert "adapter scale 1: kept as trained, because 48 validation rows" in summary and "2.08 points" in summary
    assert f"files: {out}/" in summary and f"next: budgetune predict {out} --input" in summary


def test_demo_validates_on_a_quarter_of_the_headlines_and_ends_with_a_summary(tiny_roberta, tmp_path):
    # The demo's own code path on the tiny model (the packaged MiniLM takes about a minute: `time budgetune demo`)
    texts = write_csv(tmp_path / "texts.csv", ["text"], [["Stocks rally as rates fall"], ["Cup final tonight"]])
    proc = run_cli("demo", "--model_name_or_path", str(tiny_roberta), "--max_steps", "4", "--max_seq_length", "48",
                   "--cache_dir", str(tmp_path / "cache"), "--input", str(texts), cwd=tmp_path)
    out = tmp_path / "runs" / "demo"
    evaluation = json.loads((out / "evaluation.json").read_text())
    assert evaluation["n"] == 120  # a quarter of the 480 built-in headlines, not a tenth
    summary = proc.stdout[proc.stdout.index("demo done"):]
    assert "demo done: predictions in runs/demo/submission.csv" in summary
    assert f"validation accuracy {evaluation['accuracy']:.2%}" in summary
    assert "on 120 rows: 25% held out of the training data" in summary
    assert "adapter scale 1: kept as trained, because 120 validation rows" in summary
    assert "next: budgetune serve runs/demo" in summary
    assert len((out / "submission.csv").read_text().splitlines()) == 3


@pytest.mark.skipif(not KAGGLE_TEST.exists(), reason="../shared/data/nyu_dlsp25_proj2/test_unlabelled.csv absent")
def test_kaggle_submission(tiny_roberta, tmp_path):
    # The tiny RoBERTa keeps 8,000 texts quick on a CPU; the MiniLM path is the same code (test above).
    run = tmp_path / "run"
    run_cli(*tiny_train_args(tiny_roberta, "builtin:headlines", run, "lora", num_train_epochs=1))
    sub = tmp_path / "submission.csv"
    run_cli("predict", str(run), "--input", str(KAGGLE_TEST), "--output", str(sub))
    with open(sub, encoding="utf-8") as f:
        rows = list(csv.reader(f))
    assert rows[0] == ["ID", "Label"]
    assert len(rows) == 8001
    assert [int(r[0]) for r in rows[1:]] == list(range(8000))
    assert {int(r[1]) for r in rows[1:]} <= {0, 1, 2, 3}
