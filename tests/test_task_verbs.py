"""Tasks beyond one label per text through the CLI: text pairs, multi-label and regression data read and refused,
heads counted, and (slow) train -> evaluate -> predict on a tiny model, the saved adapter reloaded with plain
transformers + peft to the same outputs."""

from __future__ import annotations

import csv
import json
import random

import numpy as np
import pytest
from conftest import headline_rows, read_jsonl, run_cli, tiny_train_args, write_csv

from budgetune.data import readers
from budgetune.errors import DataError

NAMES = ["World", "Sports", "Business", "Sci/Tech"]


@pytest.fixture(scope="module")
def task_files(tmp_path_factory):
    """The headlines as a pair file (same topic or not), a multi-label file (a third of the rows two headlines
    joined, with both topics; JSON arrays and ;-joined names) and a regression file (a score from the topic)."""
    rows, rng, folder = headline_rows(), random.Random(0), tmp_path_factory.mktemp("tasks")
    pairs, multi, multi_delim, reg = [], [], [], []
    for i, (label, text) in enumerate(rows):
        other_label, other = rows[rng.randrange(len(rows))]
        if i % 2 == 0:
            other_label, other = next(r for r in rng.sample(rows, 40) + rows if r[0] == label)
        pairs.append([f"id{i}", text, other, int(label == other_label)])
        topics = sorted({NAMES[label], NAMES[other_label]}) if i % 3 == 0 else [NAMES[label]]
        joined = f"{text} {other}" if i % 3 == 0 else text
        multi.append([joined, json.dumps(topics)])
        multi_delim.append([joined, ";".join(topics)])
        reg.append([text, label * 1.5 + 0.25])
    return {"pairs": write_csv(folder / "pairs.csv", ["id", "text", "text_b", "label"], pairs),
            "multi": write_csv(folder / "multi.csv", ["text", "labels"], multi),
            "multi_delim": write_csv(folder / "multi_delim.csv", ["text", "labels"], multi_delim),
            "reg": write_csv(folder / "reg.csv", ["text", "score"], reg)}


def test_multi_label_cells_read_as_json_arrays_or_with_a_delimiter(task_files):
    a = readers.load_table(str(task_files["multi"]), task="multi_label")
    b = readers.load_table(str(task_files["multi_delim"]), task="multi_label", label_delimiter=";")
    assert a.label_names == b.label_names == sorted(NAMES)
    assert a.labels == b.labels
    assert {sum(row) for row in a.labels} == {1, 2}  # one or two topics per row
    assert a.labels[1] == [int(n == NAMES[headline_rows()[1][0]]) for n in sorted(NAMES)]


def test_regression_targets_read_as_floats(task_files):
    t = readers.load_table(str(task_files["reg"]), task="regression")
    assert t.label_names == ["score"]
    assert t.labels[:3] == [label * 1.5 + 0.25 for label, _ in headline_rows()[:3]]


@pytest.mark.parametrize("header, row, kwargs, message", [
    (["text", "labels"], ["t", '["World", "Moon"]'], {"task": "multi_label", "label_names": NAMES},
     r"row 2, column 'labels': label 'Moon' is not one of the labels"),
    (["text", "labels"], ["t", "World"], {"task": "multi_label"},
     r"row 2, column 'labels': --task multi_label needs a list of labels per cell"),
    (["text", "labels"], ["t", "3"], {"task": "multi_label"}, r"row 2, column 'labels': .*found '3'"),
    (["text", "score"], ["t", "high"], {"task": "regression"},
     r"row 2, column 'score': --task regression needs a number, found 'high'"),
    (["text", "score"], ["t", ""], {"task": "regression"}, r"row 2, column 'score': the regression target is missing"),
    (["text", "text_b", "label"], ["t", "", "1"], {"text_pair_column": "text_b"},
     r"row 2, column 'text_b': the text pair is empty"),
    (["text", "label"], ["t", "1"], {"text_pair_column": "text_b"}, r"no text pair column 'text_b'.*text_pair_column_name"),
])
def test_bad_task_data_is_refused_naming_file_row_and_column(tmp_path, header, row, kwargs, message):
    good = {"labels": '["World"]', "score": "1.5", "label": "0", "text_b": "other", "text": "fine"}
    path = write_csv(tmp_path / "bad.csv", header, [[good[h] for h in header], row])
    with pytest.raises(DataError, match=message) as e:
        readers.load_table(str(path), **kwargs)
    assert str(path) in str(e.value)


def test_pairs_are_encoded_as_true_pairs_not_joined_strings(tiny_encoder):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_encoder("bert"))
    table = readers.TextTable(["a cat sat", "stocks fell " * 30], [0, 1], ["x", "y"], "mem",
                              text_pairs=["on the mat " * 30, "rates rose"])
    ds = readers.tokenize(table, tok, 24, None)
    want = tok(table.texts, table.text_pairs, truncation="longest_first", max_length=24)
    assert ds["input_ids"] == want["input_ids"] and ds["token_type_ids"] == want["token_type_ids"]
    assert all(1 in types for types in ds["token_type_ids"])  # the second text is segment 1
    joined = tok([f"{a} {b}" for a, b in zip(table.texts, table.text_pairs)], truncation=True, max_length=24)
    assert ds["input_ids"] != joined["input_ids"]


def test_the_tokenized_cache_tells_pairs_from_single_texts(tiny_encoder, tmp_path):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_encoder("bert"))
    pairs = readers.TextTable(["a cat sat"], [0], ["x"], "mem", text_pairs=["on the mat"])
    single = readers.TextTable(["a cat sat"], [0], ["x"], "mem")
    with_pair = readers.tokenize(pairs, tok, 24, tmp_path)["input_ids"]
    assert readers.tokenize(single, tok, 24, tmp_path)["input_ids"] == tok(["a cat sat"])["input_ids"] != with_pair
    regression = readers.TextTable(["a cat sat"], [0.5], ["score"], "mem")
    assert readers.tokenize(regression, tok, 24, tmp_path)["labels"] == [0.5]  # not the cached integer label


def test_the_collator_gives_float_targets_for_multi_label_and_regression():
    import torch

    from budgetune.data.batching import make_collator

    class Tok:
        pad_token_id, padding_side = 0, "right"

    collate = make_collator(Tok(), None)
    rows = [{"input_ids": [5, 6], "attention_mask": [1, 1], "idx": 0}, {"input_ids": [7], "attention_mask": [1], "idx": 1}]
    assert collate([{**r, "labels": k} for k, r in enumerate(rows)])["labels"].dtype == torch.long
    assert collate([{**r, "labels": [1, 0, 1]} for r in rows])["labels"].dtype == torch.float32
    assert collate([{**r, "labels": 0.5 + k} for k, r in enumerate(rows)])["labels"].tolist() == [0.5, 1.5]


@pytest.mark.parametrize("flags, message", [
    (["--task", "regression", "--label_names", "a,b"], "--label_names names classes; --task regression"),
    (["--label_delimiter", ";"], "--label_delimiter separates the labels of a multi_label cell"),
    (["--task", "multi_label", "--label_delimiter", "[x]"], "--label_delimiter must be a non-empty string"),
    (["--task", "ranking"], "--task must be one of single_label, multi_label, regression"),
    (["--task", "regression", "--metric_for_best_model", "micro_f1"],
     "--metric_for_best_model 'micro_f1' is a multi_label metric; with --task regression choose one of mse"),
    (["--metric_for_best_model", "pearson"], "'pearson' is a regression metric; with --task single_label"),
    (["--task", "regression", "--num_labels", "3"], "--num_labels: a --task regression head has one output"),
    (["--text_column_name", "q", "--text_pair_column_name", "q"], "--text_pair_column_name 'q' is the text column"),
])
def test_wrong_task_combinations_are_refused_naming_the_flag(flags, message, capsys):
    from budgetune import cli

    assert cli.main(["params", *flags]) == 2
    err = capsys.readouterr().err
    assert message in err, err


def test_the_head_is_counted_for_each_task(tiny_roberta, capsys):
    """RoBERTa's head is dense (32 x 32 + 32) + out_proj (32 x outputs + outputs): one output per label
    (multi_label) or per target (regression), the budget and the live model agree."""
    from budgetune import cli

    def head(*flags):
        assert cli.main(["params", "--model_name_or_path", str(tiny_roberta), "--json", *flags]) == 0
        return json.loads(capsys.readouterr().out)["head"]

    assert head("--task", "regression") == 32 * 32 + 32 + 32 * 1 + 1
    assert head("--task", "multi_label", "--label_names", "a,b,c,d,e") == 32 * 32 + 32 + 32 * 5 + 5
    assert head("--num_labels", "5") == head("--task", "multi_label", "--num_labels", "5")


# --- end to end on the tiny model: train -> evaluate -> predict, and plain peft to the same outputs ---------------


def plain_logits(adapter, texts, pairs=None):
    """The saved adapter loaded as its model card says, without budgetune."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    info = json.loads((adapter / "budgetune.json").read_text())
    base = AutoModelForSequenceClassification.from_pretrained(info["base_model_name_or_path"],
                                                              num_labels=len(info["label_names"]))
    model = PeftModel.from_pretrained(base, adapter).eval()
    tok = AutoTokenizer.from_pretrained(adapter)
    args = (texts, pairs) if pairs is not None else (texts,)
    batch = tok(*args, truncation="longest_first", max_length=info["max_seq_length"], padding=True,
                return_tensors="pt")
    with torch.inference_mode():
        return model(**batch).logits.numpy(), info


def read_submission(path):
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


@pytest.mark.slow
def test_multi_label_end_to_end(tiny_roberta, task_files, tmp_path):
    from sklearn.metrics import f1_score

    out = tmp_path / "run"
    run_cli(*tiny_train_args(tiny_roberta, task_files["multi_delim"], out, "lora", task="multi_label",
                             label_delimiter=";", num_train_epochs=4, learning_rate=2e-2, robust_tolerance=5))
    info = json.loads((out / "adapter" / "budgetune.json").read_text())
    assert info["task"] == "multi_label" and info["label_names"] == sorted(NAMES) and info["label_delimiter"] == ";"
    assert set(info["thresholds"]) == set(NAMES) and all(0 < t < 1 for t in info["thresholds"].values())
    assert "multi_label" in (out / "adapter" / "README.md").read_text() and "## Thresholds" in (
        out / "adapter" / "README.md").read_text()
    assert "eval_micro_f1" in info["metrics"] and json.loads((out / "evaluation.json").read_text())["thresholds"]
    # the adapter scale was chosen on validation micro-F1 (48 rows resolve a 5-point tolerance)
    assert info["adapter_scale_metric"] == "micro_f1" and len(info["adapter_scale_validation"]) == 6
    assert "validation micro_f1 |" in (out / "adapter" / "README.md").read_text()
    run_cli("evaluate", str(out), "--data_file", str(task_files["multi_delim"]), "--output", str(tmp_path / "ev"),
            "--adapter_scale", "1")
    m = json.loads((tmp_path / "ev.json").read_text())
    run_cli("predict", str(out), "--input", str(task_files["multi"]), "--output", str(tmp_path / "p.csv"),
            "--probabilities", "--label_format", "name", "--adapter_scale", "1")
    rows = read_submission(tmp_path / "p.csv")
    names = info["label_names"]
    probs = np.array([[float(r[n]) for n in names] for r in rows])
    sets = [json.loads(r["Label"]) for r in rows]
    thresholds = np.array([info["thresholds"][n] for n in names])
    assert sets == [[n for n, hit in zip(names, row >= thresholds) if hit] for row in probs]
    table = readers.load_table(str(task_files["multi"]), task="multi_label", label_names=names)
    pred = np.array([[int(n in s) for n in names] for s in sets])
    assert m["micro_f1"] == pytest.approx(f1_score(table.labels, pred, average="micro"))
    logits, _ = plain_logits(out / "adapter", table.texts[:16])
    np.testing.assert_allclose(1 / (1 + np.exp(-logits)), probs[:16], atol=2e-6)


@pytest.mark.slow
def test_regression_end_to_end(tiny_roberta, task_files, tmp_path):
    out = tmp_path / "run"
    proc = run_cli(*tiny_train_args(tiny_roberta, task_files["reg"], out, "lora", task="regression",
                                    num_train_epochs=4, learning_rate=2e-2, robust_tolerance=5))
    assert "validation MSE" in proc.stdout
    info = json.loads((out / "adapter" / "budgetune.json").read_text())
    assert info["task"] == "regression" and info["label_names"] == ["score"] and "eval_mse" in info["metrics"]
    assert yaml_metric(out) == "mse"  # the default metric_for_best_model, for this task
    assert info["adapter_scale_metric"] == "pearson" and len(info["adapter_scale_validation"]) == 6
    run_cli("evaluate", str(out), "--data_file", str(task_files["reg"]), "--output", str(tmp_path / "ev"),
            "--adapter_scale", "1")
    m = json.loads((tmp_path / "ev.json").read_text())
    run_cli("predict", str(out), "--input", str(task_files["reg"]), "--output", str(tmp_path / "p.csv"),
            "--adapter_scale", "1")
    values = np.array([float(r["Label"]) for r in read_submission(tmp_path / "p.csv")])
    y = np.array(readers.load_table(str(task_files["reg"]), task="regression").labels)
    assert m["mse"] == pytest.approx(np.mean((values - y) ** 2), rel=1e-5)
    losses = [e["loss"] for e in read_jsonl(out / "metrics.jsonl") if e.get("event") == "train"]
    assert losses[0] > 2 * losses[-1]  # MSE from the start (targets 0.25..4.75 against outputs near 0) falls
    logits, _ = plain_logits(out / "adapter", readers.load_table(str(task_files["reg"]), task="regression").texts[:16])
    np.testing.assert_allclose(logits[:, 0], values[:16], rtol=1e-5, atol=1e-5)
    refused = run_cli("predict", str(out), "--input", str(task_files["reg"]), "--probabilities", check=False)
    assert refused.returncode == 2 and "regression model; it predicts values" in refused.stderr


def yaml_metric(out):
    import yaml

    return yaml.safe_load((out / "config.yaml").read_text())["train"]["metric_for_best_model"]


@pytest.mark.slow
def test_text_pairs_end_to_end(tiny_roberta, task_files, tmp_path):
    out = tmp_path / "run"
    run_cli(*tiny_train_args(tiny_roberta, task_files["pairs"], out, "lora", text_pair_column_name="text_b"))
    info = json.loads((out / "adapter" / "budgetune.json").read_text())
    assert info["text_pair_column_name"] == "text_b" and info["task"] == "single_label"
    ev = run_cli("evaluate", str(out), "--data_file", str(task_files["pairs"]), "--output", str(tmp_path / "ev"))
    assert "accuracy" in ev.stdout
    run_cli("evaluate", str(out), "--data_file", str(task_files["pairs"]), "--compare", str(out), "--output",
            str(tmp_path / "cmp"))  # --compare reads the pairs too: the same figures as evaluate's
    plain, report = (json.loads((tmp_path / f"{n}.json").read_text()) for n in ("ev", "cmp"))
    assert report["a"]["confusion_matrix"] == report["b"]["confusion_matrix"] == plain["confusion_matrix"]
    run_cli("predict", str(out), "--input", str(task_files["pairs"]), "--output", str(tmp_path / "p.csv"),
            "--probabilities", "--id_column", "id")
    rows = read_submission(tmp_path / "p.csv")
    table = readers.load_table(str(task_files["pairs"]), text_pair_column="text_b")
    assert [r["ID"] for r in rows[:3]] == ["id0", "id1", "id2"]
    logits, _ = plain_logits(out / "adapter", table.texts[:16], table.text_pairs[:16])
    e = np.exp(logits - logits.max(-1, keepdims=True))
    np.testing.assert_allclose(e / e.sum(-1, keepdims=True), [[float(r["0"]), float(r["1"])] for r in rows[:16]],
                               atol=2e-6)
    missing = write_csv(tmp_path / "nopair.csv", ["text"], [["a headline"]])
    refused = run_cli("predict", str(out), "--input", str(missing), check=False)
    assert refused.returncode == 2 and "no text pair column 'text_b'" in refused.stderr


def test_each_task_has_its_default_metric_and_accepts_its_own():
    from budgetune.config import resolve

    assert resolve(None, []).train.metric_for_best_model == "accuracy"
    assert resolve(None, ["--task", "multi_label"]).train.metric_for_best_model == "micro_f1"
    assert resolve(None, ["--task", "regression"]).train.metric_for_best_model == "mse"
    for task, metric in [("multi_label", "subset_accuracy"), ("multi_label", "macro_f1"), ("regression", "pearson"),
                         ("regression", "spearman"), ("regression", "mae")]:
        assert resolve(None, ["--task", task, "--metric_for_best_model", metric]).train.metric_for_best_model == metric


def test_serve_checks_a_bundles_task(tmp_path):
    from budgetune.errors import AdapterError
    from budgetune.serve.registry import parse_run

    folder = tmp_path / "scores" / "adapter"
    folder.mkdir(parents=True)
    (folder / "adapter_config.json").write_text("{}")
    info = {"label_names": ["score"], "base_model_name_or_path": "x", "head": "default", "max_seq_length": 32,
            "method": "lora", "task": "ranking"}
    (folder / "budgetune.json").write_text(json.dumps(info))
    with pytest.raises(AdapterError, match="unknown task 'ranking'"):
        parse_run(str(folder))
    (folder / "budgetune.json").write_text(json.dumps({**info, "task": "single_label"}))
    with pytest.raises(AdapterError, match="at least 2 labels for a single_label model"):
        parse_run(str(folder))


def test_predict_reads_a_labelled_file_of_the_models_task(task_files):
    """predict's input may keep its label column: it is not read (a pair file loads whole), so labels predict never
    uses cannot stop it, whatever their format."""
    tables = list(readers.iter_tables(str(task_files["multi_delim"]), task="multi_label", label_delimiter=";",
                                      chunk_rows=100))
    assert [len(t.texts) for t in tables] == [100] * 4 + [80] and tables[0].labels is None
    unread = list(readers.iter_tables(str(task_files["multi_delim"]), task="multi_label", chunk_rows=100))
    assert [t.texts for t in unread] == [t.texts for t in tables]  # no --label_delimiter: the labels are not read
    pairs = list(readers.iter_tables(str(task_files["pairs"]), text_pair_column="text_b", id_column="id"))
    assert pairs[0].ids[:2] == ["id0", "id1"] and len(pairs[0].text_pairs) == len(pairs[0].texts) == 480


def test_regression_reads_several_target_columns(tmp_path, tiny_roberta, capsys):
    from budgetune import cli

    path = write_csv(tmp_path / "two.csv", ["text", "a", "b"], [["x", "1", "2.5"], ["y", "-1", "0"]])
    t = readers.load_table(str(path), task="regression", label_column="a,b")
    assert t.label_names == ["a", "b"] and t.labels == [[1.0, 2.5], [-1.0, 0.0]]
    with pytest.raises(DataError, match="no target column 'c'"):
        readers.load_table(str(path), task="regression", label_column="a,c")
    assert cli.main(["params", "--model_name_or_path", str(tiny_roberta), "--json", "--task", "regression",
                     "--label_column_name", "a,b"]) == 0
    assert json.loads(capsys.readouterr().out)["head"] == 32 * 32 + 32 + 32 * 2 + 2


@pytest.mark.slow
def test_two_regression_targets_end_to_end(tiny_roberta, tmp_path):
    rows = [[text, label * 1.5, 3.0 - label] for label, text in headline_rows()]
    data = write_csv(tmp_path / "two.csv", ["text", "a", "b"], rows)
    out = tmp_path / "run"
    run_cli(*tiny_train_args(tiny_roberta, data, out, "lora", task="regression", label_column_name="a,b",
                             num_train_epochs=1))
    info = json.loads((out / "adapter" / "budgetune.json").read_text())
    assert info["label_names"] == ["a", "b"] and info["budget"]["head"] == 32 * 32 + 32 + 32 * 2 + 2
    run_cli("evaluate", str(out), "--data_file", str(data), "--output", str(tmp_path / "ev"))
    m = json.loads((tmp_path / "ev.json").read_text())
    assert set(m["per_target"]) == {"a", "b"} and m["mse"] == pytest.approx(
        (m["per_target"]["a"]["mse"] + m["per_target"]["b"]["mse"]) / 2)
    run_cli("predict", str(out), "--input", str(data), "--output", str(tmp_path / "p.csv"))
    values = np.array([json.loads(r["Label"]) for r in read_submission(tmp_path / "p.csv")])
    y = np.array([[r[1], r[2]] for r in rows])
    assert values.shape == (480, 2) and m["mse"] == pytest.approx(np.mean((values - y) ** 2), rel=1e-4)


@pytest.mark.parametrize("task, data, metric", [("multi_label", "multi_delim", "eval_micro_f1"),
                                                ("regression", "reg", "eval_mse")])
def test_eval_strategy_no_ships_the_last_state_for_every_task(tiny_roberta, task_files, tmp_path, task, data, metric):
    """--eval_strategy no scores the shipped adapter at the end with the task's own metrics (it asked for accuracy)."""
    out = tmp_path / "run"
    delimiter = {"label_delimiter": ";"} if task == "multi_label" else {}
    run_cli(*tiny_train_args(tiny_roberta, task_files[data], out, "lora", task=task, num_train_epochs=1,
                             eval_strategy="no", **delimiter))
    info = json.loads((out / "adapter" / "budgetune.json").read_text())
    assert metric in info["metrics"] and "eval_accuracy" not in info["metrics"]
