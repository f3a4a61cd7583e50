"""Self-training: confident, class-balanced pseudo-labels; held-out texts never used; rounds chosen on validation."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import headline_rows, read_jsonl, run_cli, tiny_train_args, write_csv

from budgetune.config import resolve
from budgetune.data import readers as data_lib
from budgetune.data.unlabeled import drop_heldout, normalise
from budgetune.errors import ConfigError, DataError, RunFolderError
from budgetune.inference.loading import load_for_inference
from budgetune.inference.runner import table_logits
from budgetune.recipes import selftrain

pytestmark = pytest.mark.slow  # trains real models: `pytest -m "not slow"` skips the module

THRESHOLD = 0.4  # the tiny model is never very sure: a threshold that some of its answers reach


def test_normalised_duplicates_of_heldout_texts_are_dropped_and_counted():
    assert normalise("  Stocks RALLY, as rates fall!! ") == normalise("stocks rally as rates fall") != ""
    val = data_lib.TextTable(["Stocks rally as rates fall", "Team wins the cup"], [2, 1], None, "val.csv")
    test = data_lib.TextTable(["Probe lands on Mars"], [3], None, "test.csv")
    train = data_lib.TextTable(["Markets slide"], [2], None, "train.csv")
    found = drop_heldout(["Stocks rally as rates fall", "STOCKS RALLY AS RATES FALL.", "Probe lands on Mars",
                          "markets  slide", "New chip unveiled", "new chip unveiled!", "   ", "Rain in Paris"],
                         [val, test], train)
    assert found.kept == ["New chip unveiled", "Rain in Paris"]
    assert (found.exact_heldout, found.normalised_heldout, found.labelled, found.repeated, found.empty) == (2, 1, 1, 1, 1)
    assert found.to_dict()["held_out_sources"] == ["val.csv", "test.csv"]


def test_selection_keeps_only_confident_texts_most_confident_first():
    probs = np.array([[0.95, 0.05, 0, 0], [0.5, 0.5, 0, 0], [0.1, 0.9, 0, 0], [0, 0, 0.89, 0.11], [0, 0, 0.2, 0.8]])
    rows, labels = selftrain.select_confident(probs, 0.8, np.full(4, 0.25), cap_factor=100)
    assert rows.tolist() == [0, 2, 3, 4] and labels.tolist() == [0, 1, 2, 3]
    rows, _ = selftrain.select_confident(probs, 0.9, np.full(4, 0.25), cap_factor=100)
    assert rows.tolist() == [0, 2]  # 0.9 itself is kept, 0.89 is not


@pytest.mark.parametrize("seed", range(5))
def test_selection_respects_the_class_balance_cap(seed):
    rng = np.random.default_rng(seed)
    # class 0 dominates the confident answers, as a model biased toward one class would
    probs = rng.dirichlet([6, 1, 1, 1] if seed % 2 else [1, 1, 1, 1], size=2000)
    shares = np.array([0.4, 0.3, 0.2, 0.1])
    rows, labels = selftrain.select_confident(probs, 0.5, shares, cap_factor=1.5)
    conf = probs.max(-1)
    assert len(rows) > 0 and (conf[rows] >= 0.5).all() and (probs[rows].argmax(-1) == labels).all()
    kept = np.bincount(labels, minlength=4)
    assert (kept <= np.floor(1.5 * shares * kept.sum() + 1e-9)).all(), kept
    for c in range(4):  # what a class keeps are its most confident answers
        confident = np.flatnonzero((probs.argmax(-1) == c) & (conf >= 0.5))
        dropped = np.setdiff1d(confident, rows)
        if len(dropped) and kept[c]:
            assert conf[rows[labels == c]].min() >= conf[dropped].max()


def test_one_confident_class_alone_is_not_kept():
    probs = np.array([[0.99, 0.01], [0.97, 0.03], [0.6, 0.4]])
    rows, _ = selftrain.select_confident(probs, 0.9, np.array([0.5, 0.5]), cap_factor=1.5)
    assert len(rows) == 0  # 100 % of one class would exceed 1.5 x its 50 % share


@pytest.fixture(scope="module")
def run(tiny_roberta, tmp_path_factory) -> dict:
    d = tmp_path_factory.mktemp("selftrain")
    rows = headline_rows()
    perm = np.random.default_rng(1).permutation(len(rows))
    val, tr = [rows[i] for i in perm[:80]], [rows[i] for i in perm[80:]]
    halves = []
    for _, t in tr:
        words = t.split()
        halves += [" ".join(words[: len(words) // 2]), " ".join(words[len(words) // 2:])]
    heldout = [val[0][1], val[1][1], val[2][1].upper() + "!", val[3][1].lower()]  # 2 exact, 2 normalised
    files = {"train": write_csv(d / "train.csv", ["label", "text"], tr),
             "validation": write_csv(d / "validation.csv", ["label", "text"], val),
             "unlabelled": write_csv(d / "unlabelled.csv", ["text"], [[t] for t in halves + heldout])}
    out = d / "run"
    args = tiny_train_args(tiny_roberta, files["train"], out, "full", validation_file=files["validation"],
                           cache_dir=d / "cache", learning_rate=3e-3, num_train_epochs=8, seed=1)
    cfg = resolve(None, args[1:])
    record = selftrain.self_train(cfg, str(files["unlabelled"]), rounds=1, threshold=THRESHOLD, cap_factor=1.5)
    return {"out": out, "record": record, "files": files, "val": val, "tr": tr, "halves": halves}


def read_pseudo(path: Path) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        return list(csv.DictReader(f))


def test_round_one_pseudo_labels_are_the_round_zero_models_confident_answers(run):
    out, record = run["out"], run["record"]
    pseudo = read_pseudo(out / "round-1" / "pseudo_labels.csv")
    assert pseudo and all(float(r["probability"]) >= THRESHOLD for r in pseudo)
    r1 = record["rounds"][1]
    assert r1["pseudo_labels"] == len(pseudo) and sum(r1["pseudo_per_class"]) == len(pseudo)
    # recompute: round 0's saved model on the unlabelled texts that survive deduplication
    val = data_lib.load_table(str(run["files"]["validation"]))
    train = data_lib.load_table(str(run["files"]["train"]))
    kept = drop_heldout(run["halves"], [val], train).kept
    accelerator, model, tok, info = load_for_inference(out / "round-0")
    probs = torch.softmax(torch.from_numpy(table_logits(model, tok, data_lib.TextTable(kept, None, None, "u"),
                                                        accelerator, 64, 48)).double(), -1).numpy()
    assert r1["confident"] == int((probs.max(-1) >= THRESHOLD).sum()) >= len(pseudo)
    by_text = {t: p for t, p in zip(kept, probs)}
    for r in pseudo:
        p = by_text[r["text"]]
        assert int(r["label"]) == p.argmax() and float(r["probability"]) == pytest.approx(p.max(), abs=1e-5)
    shares = np.bincount([lab for lab, _ in run["tr"]], minlength=4) / len(run["tr"])
    assert (np.array(r1["pseudo_per_class"]) <= np.floor(1.5 * shares * len(pseudo) + 1e-9)).all()


def test_validation_texts_are_never_pseudo_labelled(run):
    u = run["record"]["unlabeled"]
    assert u["dropped_exact_validation_or_test"] == 2 and u["dropped_normalised_validation_or_test"] == 2
    val = {normalise(t) for _, t in run["val"]}
    assert not any(normalise(r["text"]) in val for r in read_pseudo(run["out"] / "round-1" / "pseudo_labels.csv"))


def test_best_round_is_chosen_on_validation_and_the_run_folder_shows_the_rounds(run):
    out, record = run["out"], run["record"]
    accs = [r["eval_accuracy"] for r in record["rounds"]]
    # the latest round within 0.5 points (the default --round_tolerance) of the best
    assert record["best_round"] == max(r for r, a in enumerate(accs) if a >= max(accs) - 0.005)
    best = out / f"round-{record['best_round']}"
    assert ((out / "adapter" / "model.safetensors").read_bytes()
            == (best / "adapter" / "model.safetensors").read_bytes())
    assert json.loads((out / "evaluation.json").read_text()) == json.loads((best / "evaluation.json").read_text())
    events = read_jsonl(out / "metrics.jsonl")
    rounds = [e for e in events if e["event"] == "round"]
    assert [e["round"] for e in rounds] == [0, 1] and [e["best"] for e in rounds].count(True) == 1
    assert rounds[1]["pseudo_per_class"] == record["rounds"][1]["pseudo_per_class"]
    steps = [e["step"] for e in events if e["event"] == "train"]
    assert steps == sorted(steps) and {e["round"] for e in events if e["event"] == "eval"} == {0, 1}
    assert (out / "plots" / "rounds.png").is_file() and (out / "plots" / "loss.png").is_file()
    assert record["rounds"][1]["lora_dropout"] == 0.0  # full fine-tuning has no adapter dropout: model dropout only


@pytest.mark.parametrize("threshold", [0, 1, 1.5, -0.2])
def test_threshold_outside_zero_one_is_refused(threshold, tmp_path):
    cfg = resolve(None, ["--output_dir", str(tmp_path / "x")])
    with pytest.raises(ConfigError, match="--pseudo_label_threshold must be between 0 and 1"):
        selftrain.self_train(cfg, "unused.csv", rounds=1, threshold=threshold)


def test_bad_unlabelled_files_are_refused_naming_the_file(run, tmp_path):
    files = run["files"]
    args = tiny_train_args(Path("unused"), files["train"], tmp_path / "x", "lora", validation_file=files["validation"])
    cfg = resolve(None, args[1:])
    empty = tmp_path / "empty.csv"
    empty.write_text("")
    header_only = write_csv(tmp_path / "header.csv", ["text"], [])
    no_text = write_csv(tmp_path / "notext.csv", ["body"], [["x"]])
    for bad, message in ((empty, "the file is empty"), (header_only, "no data rows"), (no_text, "no text column")):
        with pytest.raises(DataError, match=f"--unlabeled_file: {bad}.*{message}"):
            selftrain.self_train(cfg, str(bad), rounds=1, threshold=0.9)
    assert not (tmp_path / "x" / "round-0").exists()  # refused before anything trained


def test_cli_verb(tmp_path):
    assert "--pseudo_label_threshold" in run_cli("selftrain", "--help").stdout
    proc = run_cli("selftrain", "--unlabeled_file", "u.csv", "--pseudo_label_threshold", "1",
                   "--output_dir", str(tmp_path / "x"), check=False)
    assert proc.returncode == 2 and "budgetune: error: --pseudo_label_threshold" in proc.stderr


def test_train_with_unlabeled_file_self_trains(monkeypatch, tmp_path):
    """`budgetune train --unlabeled_file F --self_training_rounds N ...` is self-training with the same options."""
    from budgetune import cli

    calls = []
    monkeypatch.setattr(selftrain, "self_train", lambda cfg, f, rounds, threshold, **kw: calls.append(
        (cfg.train.learning_rate, cfg.output.output_dir, f, rounds, threshold, kw["cap_factor"])))
    assert cli.main(["train", "--unlabeled_file", "texts.csv", "--self_training_rounds", "3",
                     "--pseudo_label_threshold", "0.8", "--learning_rate", "2e-3",
                     "--output_dir", str(tmp_path / "r")]) == 0
    assert calls == [(2e-3, str(tmp_path / "r"), "texts.csv", 3, 0.8, 1.5)]


def test_the_kept_round_is_the_latest_within_the_tolerance_of_the_best():
    values = [0.9051, 0.9043, 0.9060, 0.9012]
    assert selftrain.chosen_round(values, "accuracy", 0.5) == 3  # 0.48 points below the best: within 0.5
    assert selftrain.chosen_round(values, "accuracy", 0.4) == 2
    assert selftrain.chosen_round([0.9051, 0.9043], "accuracy", 0.5) == 1  # 0.08 points below the best
    assert selftrain.chosen_round([0.9051, 0.9043], "accuracy", 0) == 0
    assert selftrain.chosen_round([0.9051, 0.8990], "accuracy", 0.5) == 0  # 0.61 points below
    assert selftrain.chosen_round([0.31, 0.29, 0.30], "loss", 0.5) == 1  # loss: the lowest, no tolerance
    with pytest.raises(ConfigError, match="--round_tolerance"):
        selftrain.check_options(1, 0.9, 1.5, 0.1, -1)


def test_a_killed_run_continues_reusing_finished_rounds(run, tiny_roberta, tmp_path):
    """The same command after a kill in round 1: round 0 is reused (not trained again), round 1 trains again and
    ends where an uninterrupted run ends; other options refuse to mix with the rounds already there."""
    files, out = run["files"], tmp_path / "run"
    args = tiny_train_args(tiny_roberta, files["train"], out, "full", validation_file=files["validation"],
                           cache_dir=tmp_path / "cache", learning_rate=3e-3, num_train_epochs=8, seed=1)
    cfg = resolve(None, args[1:])
    first = selftrain.self_train(cfg, str(files["unlabelled"]), rounds=1, threshold=THRESHOLD)
    round0 = (out / "round-0" / "adapter" / "model.safetensors").stat().st_mtime_ns
    for name in ("adapter", "metrics.jsonl", "selftrain.json", "evaluation.json", "plots"):  # killed in round 1:
        target = out / name                                                                # RUN not written yet
        shutil.rmtree(target) if target.is_dir() else target.unlink()
    (out / "round-1" / "evaluation.json").unlink()
    again = selftrain.self_train(cfg, str(files["unlabelled"]), rounds=1, threshold=THRESHOLD)
    assert [r["reused"] for r in again["rounds"]] == [True, False]
    assert (out / "round-0" / "adapter" / "model.safetensors").stat().st_mtime_ns == round0
    strip = lambda rounds: [{k: v for k, v in r.items() if k != "reused"} for r in rounds]  # noqa: E731
    assert strip(again["rounds"]) == strip(first["rounds"]) and again["best_round"] == first["best_round"]
    assert (out / "adapter").is_dir() and (out / "selftrain.json").is_file()
    with pytest.raises(RunFolderError, match=r"round-1 holds a round trained with another configuration"):
        selftrain.self_train(cfg, str(files["unlabelled"]), rounds=1, threshold=THRESHOLD + 0.05)
    assert (out / "round-1" / "evaluation.json").is_file()  # nothing already written is lost


def test_a_finished_rank_auto_run_is_reused_not_refused(run, tiny_roberta, tmp_path):
    """--rank auto: each round's config.yaml holds the rank it resolved to; the same command again reuses the round
    instead of calling it another configuration."""
    files, out = run["files"], tmp_path / "run"
    args = tiny_train_args(tiny_roberta, files["train"], out, "lora", validation_file=files["validation"],
                           cache_dir=tmp_path / "cache", num_train_epochs=1, rank="auto", max_trainable_params=3000)
    cfg = resolve(None, args[1:])
    first = selftrain.self_train(cfg, str(files["unlabelled"]), rounds=0, threshold=THRESHOLD)
    again = selftrain.self_train(cfg, str(files["unlabelled"]), rounds=0, threshold=THRESHOLD)
    assert [r["reused"] for r in first["rounds"]] == [False] and [r["reused"] for r in again["rounds"]] == [True]
    assert again["rounds"][0]["best_metric"] == first["rounds"][0]["best_metric"]


def test_a_round_killed_while_finishing_is_trained_again_not_refused(tmp_path, monkeypatch):
    """evaluation.json is written before the run's `end` event: a round killed between the two is unfinished."""
    from budgetune.training import train as train_lib

    folder = tmp_path / "run" / "round-1"
    folder.mkdir(parents=True)
    (folder / "metrics.jsonl").write_text('{"event": "eval", "step": 4, "eval_accuracy": 0.5}\n')
    (folder / "evaluation.json").write_text("{}")
    cfg = resolve(None, ["--output_dir", str(folder)])
    calls = []
    monkeypatch.setattr(train_lib, "train", lambda rcfg, splits, **kw: calls.append((rcfg, kw)) or {"best_metric": 0.5})
    result, reused = selftrain.run_round(cfg, None, None)
    assert (result, reused) == ({"best_metric": 0.5}, False) and calls[0][0].output.overwrite_output_dir
    assert "the same `budgetune selftrain` command" in calls[0][1]["resume_hint"]
    (folder / "metrics.jsonl").write_text('{"event": "eval", "step": 4}\n{"event": "end", "best_step": 9}\n')
    with pytest.raises(RunFolderError, match="holds a round trained with another configuration"):
        selftrain.run_round(cfg, None, None)  # a finished round that does not match is still refused


def test_an_infinite_class_cap_is_refused():
    with pytest.raises(ConfigError, match="--pseudo_label_class_cap must be a number of at least 1"):
        selftrain.check_options(1, 0.9, float("inf"), 0.1)


def test_the_lowest_loss_round_kept_is_the_latest_of_equals():
    assert selftrain.chosen_round([0.3, 0.3, 0.4], "loss", 0.5) == 1


def test_overwriting_a_run_folder_clears_a_recipes_files_too(tmp_path):
    from budgetune import fileio

    for name in ("metrics.jsonl", "distill.json", "selftrain.json", "round-robin.csv"):
        (tmp_path / name).write_text("{}")
    (tmp_path / "round-0").mkdir()
    fileio.guard_output_dir(tmp_path, overwrite=True, resuming=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["round-robin.csv"]  # the user's own file stays
