"""Distillation on the tiny random RoBERTa: a fully fine-tuned teacher, budgeted students, the cache, bad input."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import headline_rows, read_jsonl, run_cli, tiny_train_args, write_csv

from budgetune.budget.plan import check_budget
from budgetune.config import resolve
from budgetune.data import readers as data_lib
from budgetune.data.unlabeled import normalise
from budgetune.errors import AdapterError, BudgetError, CheckpointError, ConfigError, DataError
from budgetune.inference.evaluate import evaluate
from budgetune.inference.loading import load_for_inference, load_model
from budgetune.inference.runner import table_logits
from budgetune.recipes import distill
from budgetune.training import train as train_lib

pytestmark = pytest.mark.slow  # trains real models: `pytest -m "not slow"` skips the module

TIMING = {"samples_per_second"}  # the only values that may differ between two identical runs


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    """Fixed train/validation/test files (so teacher and students share one validation split, whatever the
    seed) and unlabelled texts: halves of the training headlines plus validation/test texts that must be dropped."""
    d = tmp_path_factory.mktemp("distill-data")
    rows = headline_rows()
    perm = np.random.default_rng(0).permutation(len(rows))
    val, test, tr = [rows[i] for i in perm[:80]], [rows[i] for i in perm[80:120]], [rows[i] for i in perm[120:]]
    halves = {}  # the headlines are templated: many share a half; keep one of each (normalised)
    for _, t in tr:
        words = t.split()
        for half in (" ".join(words[: len(words) // 2]), " ".join(words[len(words) // 2:])):
            halves.setdefault(normalise(half), half)
    halves = list(halves.values())
    heldout = [val[0][1], val[1][1], val[2][1], test[0][1], test[1][1]]  # exact copies
    variants = [f"  {val[3][1].upper()}!! ", val[4][1].replace(" ", "  ") + ".", f"{test[2][1].lower()} ..."]
    unlabelled = halves + heldout + variants + halves[:4]  # + 4 repeats
    return {"train": write_csv(d / "train.csv", ["label", "text"], tr),
            "validation": write_csv(d / "validation.csv", ["label", "text"], val),
            "test": write_csv(d / "test.csv", ["label", "text"], test),
            "unlabelled": write_csv(d / "unlabelled.csv", ["text"], [[t] for t in unlabelled]),
            "n_halves": len(halves), "cache": d / "cache"}


def config(files, model: Path, out: Path, method: str = "full", **flags):
    flags = {"validation_file": files["validation"], "test_file": files["test"], **flags}
    args = tiny_train_args(model, files["train"], out, method, cache_dir=files["cache"], overwrite_output_dir="true",
                           **flags)
    return resolve(None, args[1:])


def predictions(run: Path, table) -> np.ndarray:
    accelerator, model, tokenizer, info = load_for_inference(run)
    return table_logits(model, tokenizer, table, accelerator, 64, info["max_seq_length"]).argmax(-1)


@pytest.fixture(scope="module")
def teacher(files, tiny_roberta, tmp_path_factory) -> Path:
    """An unbudgeted teacher: every weight of the tiny model fine-tuned (method full)."""
    out = tmp_path_factory.mktemp("teacher") / "run"
    train_lib.train(config(files, tiny_roberta, out, "full", learning_rate=3e-3, num_train_epochs=10, seed=1,
                           max_trainable_params="null"))
    return out


@pytest.fixture(scope="module")
def students(files, tiny_roberta, teacher, tmp_path_factory) -> dict[str, Path]:
    """The same student recipe (seed 2) trained on gold labels only, and distilled (alpha 0, with unlabelled)."""
    root = tmp_path_factory.mktemp("students")
    recipe = {"learning_rate": 3e-3, "num_train_epochs": 4, "seed": 2}
    train_lib.train(config(files, tiny_roberta, root / "gold", "full", **recipe))
    distill.distill(config(files, tiny_roberta, root / "kd", "full", **recipe), [str(teacher)],
                    unlabeled_file=str(files["unlabelled"]), alpha=0.0, temperature=1.0)
    return {"gold": root / "gold", "kd": root / "kd"}


def test_distilled_student_agrees_with_the_teacher_more_than_a_gold_only_student(files, teacher, students):
    val = data_lib.load_table(str(files["validation"]))
    t = predictions(teacher, val)
    gold, kd = predictions(students["gold"], val), predictions(students["kd"], val)
    agree_gold, agree_kd = float(np.mean(gold == t)), float(np.mean(kd == t))
    assert len(set(t.tolist())) > 1  # a teacher that answers one class would make agreement trivial
    assert agree_kd >= agree_gold + 0.1, (agree_kd, agree_gold)
    # both students are under the default budget of 1,000,000 (the tiny model has 33,476 weights)
    for run in students.values():
        assert json.loads((run / "budget.json").read_text())["fits"] is True


def test_distill_records_teachers_and_drops_heldout_texts(files, teacher, students):
    kd = students["kd"]
    record = json.loads((kd / "distill.json").read_text())
    u = record["unlabeled"]
    assert u["dropped_exact_validation_or_test"] == 5 and u["dropped_normalised_validation_or_test"] == 3
    assert u["dropped_repeated"] == 4 and u["read"] == files["n_halves"] + 12
    assert u["kept"] == files["n_halves"] and u["dropped_in_labelled_training_data"] == 0
    assert record["labelled_rows"] == 360 and record["alpha"] == 0.0
    (entry,) = record["teachers"]
    assert entry["method"] == "full" and entry["same_validation_split"] is True
    assert entry["same_tokenizer_as_student"] is True and Path(entry["cache_file"]).is_file()
    card = (kd / "adapter" / "README.md").read_text()
    assert "## Distilled from" in card and str(teacher) in card
    assert json.loads((kd / "adapter" / "budgetune.json").read_text())["distilled_from"][0]["path"] == str(teacher)
    assert any(e["event"] == "distill" for e in read_jsonl(kd / "metrics.jsonl"))
    # the run folder is like any other: evaluate reproduces the saved validation accuracy; plots render
    m = evaluate(kd, str(files["validation"]), output=str(kd / "eval-check"))
    assert m["accuracy"] == pytest.approx(json.loads((kd / "evaluation.json").read_text())["accuracy"])
    assert (kd / "plots" / "loss.png").is_file()


def comparable(path: Path) -> list[dict]:
    return [{k: v for k, v in e.items() if k not in TIMING} for e in read_jsonl(path) if e["event"] != "distill"]


def test_alpha_one_equals_ordinary_training(files, tiny_roberta, teacher, tmp_path):
    from safetensors.torch import load_file

    flags = {"max_steps": 6, "eval_strategy": "steps", "eval_steps": 3, "logging_steps": 1, "seed": 5,
             "target_modules": "all-linear", "learning_rate": 1e-2}
    train_lib.train(config(files, tiny_roberta, tmp_path / "plain", "lora", **flags))
    distill.distill(config(files, tiny_roberta, tmp_path / "kd", "lora", **flags), [str(teacher)], alpha=1.0)
    plain, kd = comparable(tmp_path / "plain" / "metrics.jsonl"), comparable(tmp_path / "kd" / "metrics.jsonl")
    assert len([e for e in plain if e["event"] == "train"]) == 6 and plain == kd
    a = load_file(tmp_path / "plain" / "adapter" / "adapter_model.safetensors")
    b = load_file(tmp_path / "kd" / "adapter" / "adapter_model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert (json.loads((tmp_path / "plain" / "evaluation.json").read_text())
            == json.loads((tmp_path / "kd" / "evaluation.json").read_text()))


def test_teacher_cache_is_reused_and_invalidated_when_the_teacher_changes(files, teacher, tmp_path):
    from safetensors.torch import load_file, save_file

    texts = data_lib.load_table(str(files["train"])).texts[:50]
    copy = tmp_path / "teacher"
    shutil.copytree(teacher / "adapter", copy)
    first, path, hit, *_ = distill.teacher_logits(copy, texts, tmp_path / "cache")
    assert not hit and path.is_file()
    again, path2, hit2, *_ = distill.teacher_logits(copy, texts, tmp_path / "cache")
    assert hit2 and path2 == path and np.array_equal(first, again)
    (copy / "README.md").write_text("a new model card changes no logit\n")
    assert distill.teacher_logits(copy, texts, tmp_path / "cache")[2]
    weights = load_file(copy / "model.safetensors")
    weights["classifier.out_proj.bias"] = weights["classifier.out_proj.bias"] + torch.tensor([3.0, 0, 0, 0])
    save_file(weights, copy / "model.safetensors", metadata={"format": "pt"})
    changed, path3, hit3, *_ = distill.teacher_logits(copy, texts, tmp_path / "cache")
    assert not hit3 and path3 != path
    assert np.allclose(changed[:, 0] - first[:, 0], 3.0, atol=1e-4)  # recomputed with the new weights
    other, path4, hit4, *_ = distill.teacher_logits(copy, texts[:-1], tmp_path / "cache")
    assert not hit4 and path4 != path3 and np.allclose(other, changed[:-1], atol=1e-5)


def test_teacher_cache_and_record_follow_the_precision_the_teacher_computes_in(files, teacher, tmp_path,
                                                                               monkeypatch):
    """The same teacher bundle computes in fp32 where auto is pinned (or the CPU lacks bf16) and in its measured
    choice elsewhere: the cached logits of one are not the other's, and distill.json names the one computed."""
    copy = tmp_path / "teacher"
    shutil.copytree(teacher / "adapter", copy)
    info = json.loads((copy / "budgetune.json").read_text())
    info["inference_precision"] = {"choice": "int8", "reason": "measured by the test", "tolerance": 0.2,
                                   "table": {"fp32": {"accuracy": 0.5, "texts_per_s": 1.0, "within_tolerance": True},
                                             "int8": {"accuracy": 0.5, "texts_per_s": 3.0, "within_tolerance": True}}}
    (copy / "budgetune.json").write_text(json.dumps(info))
    texts = data_lib.load_table(str(files["train"])).texts[:40]
    monkeypatch.setenv("BUDGETUNE_MIXED_PRECISION", "fp32")
    pinned = distill.teacher_logits(copy, texts, tmp_path / "cache")
    assert pinned.precision == "fp32" and not pinned.cache_hit
    monkeypatch.setenv("BUDGETUNE_MIXED_PRECISION", "auto")
    measured = distill.teacher_logits(copy, texts, tmp_path / "cache")
    assert measured.precision == "int8" and not measured.cache_hit and measured.cache_file != pinned.cache_file
    assert distill.teacher_logits(copy, texts, tmp_path / "cache").cache_hit
    monkeypatch.setenv("BUDGETUNE_MIXED_PRECISION", "fp32")
    again = distill.teacher_logits(copy, texts, tmp_path / "cache")
    assert again.cache_hit and again.cache_file == pinned.cache_file and np.array_equal(again.logits, pinned.logits)


def test_teacher_cache_follows_the_base_models_weights(files, tiny_roberta, tmp_path):
    """An adapter teacher's logits depend on its base model's weights, which its bundle only names: new weights
    under the same name are a cache miss, recomputed with them."""
    from safetensors.torch import load_file, save_file

    base = tmp_path / "base"
    shutil.copytree(tiny_roberta, base)
    run = tmp_path / "lora-teacher"
    train_lib.train(config(files, base, run, "lora", max_steps=2, eval_strategy="steps", eval_steps=2))
    texts = data_lib.load_table(str(files["train"])).texts[:40]
    first, path, hit, *_ = distill.teacher_logits(run, texts, tmp_path / "cache")
    assert not hit and distill.teacher_logits(run, texts, tmp_path / "cache")[2]
    weights = load_file(base / "model.safetensors")
    key = next(k for k in weights if k.endswith("layer.1.output.LayerNorm.weight"))
    weights[key] = weights[key] * 3
    save_file(weights, base / "model.safetensors", metadata={"format": "pt"})
    changed, path2, hit2, *_ = distill.teacher_logits(run, texts, tmp_path / "cache")
    assert not hit2 and path2 != path
    assert not np.allclose(changed, first, atol=1e-4)  # recomputed on the new base weights
    accelerator, model, tokenizer, info = load_for_inference(run)
    table = data_lib.TextTable(texts, None, info["label_names"], "check")
    assert np.allclose(changed, table_logits(model, tokenizer, table, accelerator, 64, info["max_seq_length"]),
                       atol=1e-5)


def test_a_hub_base_is_fingerprinted_by_the_commit_its_revision_resolves_to(tmp_path, monkeypatch):
    """The Hub cache's layout: refs/<branch> names a commit, snapshots/<commit>/ holds that commit's files."""
    import huggingface_hub.constants

    repo = tmp_path / "models--org--encoder"
    for commit in ("a" * 40, "b" * 40):
        (repo / "snapshots" / commit).mkdir(parents=True)
        (repo / "snapshots" / commit / "config.json").write_text("{}")
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("a" * 40)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path))
    assert distill.base_fingerprint("org/encoder", None) == f"org/encoder@{'a' * 40}"
    (repo / "refs" / "main").write_text("b" * 40)  # main moved on: another base, another key
    assert distill.base_fingerprint("org/encoder", None) == f"org/encoder@{'b' * 40}"
    assert distill.base_fingerprint("org/encoder", "a" * 40) == f"org/encoder@{'a' * 40}"
    assert distill.base_fingerprint("org/not-downloaded", None) is None


def test_a_teacher_whose_split_cannot_be_checked_is_warned_about(files, tiny_roberta, teacher, tmp_path, capsys):
    from transformers import AutoTokenizer

    cfg = config(files, tiny_roberta, tmp_path / "s", "lora")
    tok = AutoTokenizer.from_pretrained(tiny_roberta)
    distill.check_teachers([str(teacher)], ["0", "1", "2", "3"], tok, cfg)
    assert "warning" not in capsys.readouterr().err  # a run folder: its config.yaml says it held out the same rows
    (entry,) = distill.check_teachers([str(teacher / "adapter")], ["0", "1", "2", "3"], tok, cfg)
    assert entry["same_validation_split"] is True  # RUN/adapter: the run's config.yaml is beside it
    assert "warning" not in capsys.readouterr().err
    bare = tmp_path / "bare"
    shutil.copytree(teacher / "adapter", bare)
    (entry,) = distill.check_teachers([str(bare)], ["0", "1", "2", "3"], tok, cfg)
    err = capsys.readouterr().err
    assert entry["same_validation_split"] is None
    assert f"warning: teacher {bare}: {bare / 'config.yaml'} is missing" in err
    assert "cannot check that it held out the student's validation rows" in err


def test_distilled_lora_student_loads_with_plain_peft(files, tiny_roberta, teacher, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    out = tmp_path / "student"
    distill.distill(config(files, tiny_roberta, out, "lora", max_steps=8, target_modules="all-linear"),
                    [str(teacher), str(teacher)], unlabeled_file=str(files["unlabelled"]), alpha=0.5, temperature=2.0)
    folder = out / "adapter"
    base = AutoModelForSequenceClassification.from_pretrained(tiny_roberta, num_labels=4)
    plain = PeftModel.from_pretrained(base, folder).eval()
    tok = AutoTokenizer.from_pretrained(folder)
    batch = tok(data_lib.load_table(str(files["validation"])).texts[:8], return_tensors="pt", padding=True,
                truncation=True, max_length=48)
    ours, _, _ = load_model(out, merge=False, adapter_scale=1.0)  # plain peft applies the adapter as trained
    with torch.inference_mode():
        assert torch.allclose(plain(**batch).logits, ours(**batch).logits, atol=1e-5)
    record = json.loads((out / "distill.json").read_text())
    assert len(record["teachers"]) == 2 and all(t["cache_hit"] for t in record["teachers"][1:])


def test_full_method_saves_a_whole_model_counted_by_the_gate(files, tiny_roberta, teacher):
    from transformers import AutoModelForSequenceClassification

    folder = teacher / "adapter"
    assert (folder / "model.safetensors").is_file() and not (folder / "adapter_config.json").exists()
    model = AutoModelForSequenceClassification.from_pretrained(folder)  # plain transformers, no peft
    counted = json.loads((teacher / "budget.json").read_text())
    assert counted["total_trainable"] == sum(p.numel() for p in model.parameters()) == 33_476
    assert "library_name: transformers" in (folder / "README.md").read_text()
    m = evaluate(teacher, str(files["validation"]), output=str(teacher / "eval-check"))
    assert m["accuracy"] == pytest.approx(json.loads((teacher / "evaluation.json").read_text())["accuracy"])
    with pytest.raises(BudgetError, match="33,476 trainable parameters is over the budget of 10,000") as e:
        check_budget(config(files, tiny_roberta, teacher.parent / "x", "full", max_trainable_params=10_000), 4)
    assert "pass --max_trainable_params null" in str(e.value)


def test_bad_input_is_refused_and_nothing_written_is_lost(files, tiny_roberta, teacher, tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "metrics.jsonl").write_text('{"event": "eval", "step": 1}\n')
    cfg = config(files, tiny_roberta, out, "lora")
    reordered = tmp_path / "reordered"
    shutil.copytree(teacher / "adapter", reordered)
    info = json.loads((reordered / "budgetune.json").read_text())
    (reordered / "budgetune.json").write_text(json.dumps({**info, "label_names": info["label_names"][::-1]}))
    with pytest.raises(AdapterError, match=f"--teacher {reordered}: its labels"):
        distill.distill(cfg, [str(reordered)])
    with pytest.raises(ConfigError, match="--alpha"):
        distill.distill(cfg, [str(teacher)], alpha=1.5)
    with pytest.raises(ConfigError, match="--temperature"):
        distill.distill(cfg, [str(teacher)], temperature=0)
    with pytest.raises(AdapterError, match="no adapter here"):
        distill.distill(cfg, [str(tmp_path / "missing")])
    empty = tmp_path / "empty.csv"
    empty.write_text("")
    no_text = write_csv(tmp_path / "notext.csv", ["body"], [["a headline"]])
    only_heldout = write_csv(tmp_path / "heldout.csv", ["text"],
                             [[t.upper()] for t in data_lib.load_table(str(files["validation"])).texts[:5]])
    for bad, message in ((empty, "the file is empty"), (no_text, "no text column found"),
                         (only_heldout, "no text left")):
        with pytest.raises(DataError, match=f"--unlabeled_file: .*{message}"):
            distill.distill(cfg, [str(teacher)], unlabeled_file=str(bad))
    assert (out / "metrics.jsonl").read_text() == '{"event": "eval", "step": 1}\n'


def test_cli_verb(teacher, tmp_path):
    help_text = run_cli("distill", "--help").stdout
    assert "--teacher" in help_text and "--unlabeled_file" in help_text
    proc = run_cli("distill", "--teacher", str(teacher), "--alpha", "2", "--output_dir", str(tmp_path / "x"),
                   check=False)
    assert proc.returncode == 2 and "budgetune: error: --alpha must be between 0 and 1" in proc.stderr


def test_teacher_checks_note_another_tokenizer_and_another_validation_split(files, tiny_roberta, teacher, tmp_path):
    from transformers import AutoTokenizer

    from budgetune.modeling.backbone import resolve_model_path

    cfg = config(files, tiny_roberta, tmp_path / "s", "lora")
    minilm = AutoTokenizer.from_pretrained(resolve_model_path("packaged:all-MiniLM-L6-v2"))
    (entry,) = distill.check_teachers([str(teacher)], ["0", "1", "2", "3"], minilm, cfg)
    assert entry["same_tokenizer_as_student"] is False  # allowed: each model tokenizes for itself
    assert entry["same_validation_split"] is True  # both hold out the same validation file
    carved = config(files, tiny_roberta, tmp_path / "s", "lora", validation_file="null", seed=3)
    other = tmp_path / "other-seed"
    shutil.copytree(teacher, other, ignore=shutil.ignore_patterns("checkpoints"))
    (other / "config.yaml").write_text((other / "config.yaml").read_text().replace(
        f"validation_file: {files['validation']}", "validation_file: null"))
    assert distill.same_split(other, carved) is False  # seed 1 carved other rows than seed 3 would
    assert distill.same_split(other, config(files, tiny_roberta, tmp_path / "s", "lora", validation_file="null",
                                            seed=1)) is True
    assert distill.same_split(other / "adapter", carved) is False  # RUN/adapter: the run's config.yaml decides
    relative = {k: os.path.relpath(files[k]) for k in ("train", "validation")}  # the same files, spelled otherwise
    respelled = config({**files, **relative}, tiny_roberta, tmp_path / "s", "lora")
    assert respelled.data.dataset_name == relative["train"] != str(files["train"])
    assert distill.same_split(teacher, respelled) is True
    shutil.copytree(other / "adapter", tmp_path / "bare")
    assert distill.same_split(tmp_path / "bare", carved) is None  # a bare bundle: unknown


def tiny_batch(tiny_roberta, labels: list[int]) -> dict:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_roberta)
    texts = [t for _, t in headline_rows()[:len(labels)]]
    enc = dict(tok(texts, return_tensors="pt", padding=True, truncation=True, max_length=48))
    return {**enc, "labels": torch.tensor(labels), "idx": torch.tensor([9, 3, 0, 7, 5, 1][:len(labels)])}


def teacher_log_probs() -> torch.Tensor:
    teachers = [np.random.default_rng(s).normal(size=(10, 4)).astype(np.float32) for s in (1, 2)]
    log_p = torch.from_numpy(distill.ensemble_log_probs(teachers, 2.0))
    expected_p = (torch.softmax(torch.from_numpy(teachers[0]) / 2, -1)
                  + torch.softmax(torch.from_numpy(teachers[1]) / 2, -1)) / 2
    assert torch.allclose(log_p.exp(), expected_p, atol=1e-6)  # probabilities averaged, not logits
    return log_p


def per_row(model, batch: dict, log_p: torch.Tensor, alpha: float, temperature: float) -> torch.Tensor:
    """The documented loss, row by row: alpha x CE_i (0 unlabelled) + (1 - alpha) x T^2 x KL_i, averaged over rows."""
    import torch.nn.functional as F

    logits = model(**{k: v for k, v in batch.items() if k not in ("labels", "idx")}).logits
    labels = batch["labels"]
    ce = torch.stack([F.cross_entropy(logits[i:i + 1], labels[i:i + 1]) if labels[i] != -100 else logits.new_zeros(())
                      for i in range(len(labels))])
    q = torch.log_softmax(logits / temperature, -1)
    p = log_p[batch["idx"]]
    kl = (p.exp() * (p - q)).sum(-1) * temperature ** 2
    return (alpha * ce + (1 - alpha) * kl).mean()


def test_kd_loss_is_a_mean_over_rows_and_a_labelled_row_weighs_the_same_among_unlabelled_ones(tiny_roberta):
    from transformers import AutoModelForSequenceClassification

    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_pretrained(tiny_roberta, num_labels=4).eval()
    log_p = teacher_log_probs()
    mixed = tiny_batch(tiny_roberta, [0, 2, -100, 1, -100, 3])  # rows 2 and 4: unlabelled texts
    one_gold = tiny_batch(tiny_roberta, [2, -100, -100, -100, -100, -100])
    unlabelled = tiny_batch(tiny_roberta, [-100] * 6)
    gold = tiny_batch(tiny_roberta, [0, 2, 3, 1, 0, 3])
    with torch.no_grad():
        for batch in (mixed, one_gold, unlabelled, gold):
            for alpha in (0.0, 0.3, 1.0):
                got = distill.kd_loss(log_p, alpha, 2.0)(model, dict(batch))
                assert torch.allclose(got, per_row(model, batch, log_p, alpha, 2.0), atol=1e-6), (batch["labels"], alpha)
        # one labelled row of six counts 1/6 of its cross-entropy, as it does in a batch of six labelled rows
        inputs = {k: v for k, v in one_gold.items() if k not in ("labels", "idx")}
        ce0 = model(**inputs, labels=one_gold["labels"]).loss  # transformers: averaged over the labelled row only
        assert torch.allclose(distill.kd_loss(log_p, 1.0, 2.0)(model, dict(one_gold)), ce0 / 6, atol=1e-7)
        # every row labelled, alpha 1: exactly the model's own loss (a run then equals ordinary training)
        plain = model(**{k: v for k, v in gold.items() if k != "idx"}).loss
        assert torch.equal(distill.kd_loss(log_p, 1.0, 2.0)(model, dict(gold)), plain)


@pytest.mark.parametrize("lean", [True, False])
def test_kd_loss_keeps_adalora_orthogonal_regulariser_at_its_weight(tiny_roberta, lean):
    """Whatever alpha, and on a batch with no labelled row, the loss carries orth_reg_weight x R as AdaLoRA's own
    forward adds it (measured there: its loss at the configured weight minus its loss at weight 0)."""
    import peft
    from transformers import AutoModelForSequenceClassification

    from budgetune.adalora import lean_step

    torch.manual_seed(0)
    base = AutoModelForSequenceClassification.from_pretrained(tiny_roberta, num_labels=4)
    config = peft.AdaLoraConfig(init_r=4, target_r=2, lora_alpha=8, lora_dropout=0.0, target_modules=["query", "value"],
                                tinit=2, tfinal=2, deltaT=1, orth_reg_weight=0.7, total_step=10,
                                task_type=peft.TaskType.SEQ_CLS)
    model = peft.get_peft_model(base, config).eval()
    if lean:
        assert lean_step.install(model)  # the default training path; False: peft's own AdaLoraModel
    settings = model.peft_config["default"]
    log_p = teacher_log_probs()
    gold = tiny_batch(tiny_roberta, [0, 2, 3, 1, 0, 3])

    def at_weight(weight: float, fn, *args) -> torch.Tensor:
        settings.orth_reg_weight = weight
        with torch.no_grad():
            return fn(*args)

    own = at_weight(0.7, lambda b: model(**b).loss, {k: v for k, v in gold.items() if k != "idx"})
    penalty = own - at_weight(0.0, lambda b: model(**b).loss, {k: v for k, v in gold.items() if k != "idx"})
    assert penalty > 0.1  # the random adapters are far from orthogonal
    for labels in ([0, 2, -100, 1, -100, 3], [-100] * 6, [0, 2, 3, 1, 0, 3]):
        batch = tiny_batch(tiny_roberta, labels)
        for alpha in (0.0, 0.3, 1.0):
            loss = distill.kd_loss(log_p, alpha, 2.0)
            with_reg, without = (at_weight(w, loss, model, dict(batch)) for w in (0.7, 0.0))
            assert torch.allclose(with_reg - without, penalty, atol=1e-5), (labels, alpha, with_reg - without)
            assert torch.allclose(without, at_weight(0.0, per_row, model, batch, log_p, alpha, 2.0), atol=1e-6)
    # every row labelled, alpha 1: the model's own loss, regulariser included
    assert torch.allclose(at_weight(0.7, distill.kd_loss(log_p, 1.0, 2.0), model, dict(gold)), own, atol=1e-6)


def test_the_student_may_not_overwrite_its_teacher(files, tiny_roberta, teacher):
    for out in (teacher, teacher / "adapter"):
        with pytest.raises(ConfigError, match="the student would overwrite it"):
            distill.distill(config(files, tiny_roberta, out, "lora"), [str(teacher)])
    assert (teacher / "adapter" / "model.safetensors").is_file()


def test_a_stopped_distill_run_says_to_continue_with_distill_not_train(files, tiny_roberta, teacher, tmp_path,
                                                                        monkeypatch):
    """`budgetune train --config RUN/config.yaml` would continue without the teachers: the hint names distill."""
    import os
    import signal

    from safetensors.torch import load_file, save_file

    from budgetune.errors import Interrupted

    real = train_lib.after_step

    def stop_after_step_two(run, state, *args, **kwargs):
        if state.step == 2:
            os.kill(os.getpid(), signal.SIGTERM)  # caught by the run's handler: it checkpoints and stops
        return real(run, state, *args, **kwargs)

    monkeypatch.setattr(train_lib, "after_step", stop_after_step_two)
    cfg = config(files, tiny_roberta, tmp_path / "kd", "lora", max_steps=6, logging_steps=1)
    with pytest.raises(Interrupted, match=r"stopped by signal 15 at step 2; checkpoint: .*\. Resume with: the same "
                                          r"`budgetune distill` command .* with --resume_from_checkpoint auto"):
        distill.distill(cfg, [str(teacher)], alpha=0.5)
    # the loss it trained with is in the checkpoint: a resume with another alpha or T is refused, naming it
    monkeypatch.setattr(train_lib, "after_step", real)
    resume = config(files, tiny_roberta, tmp_path / "kd", "lora", max_steps=6, logging_steps=1,
                    resume_from_checkpoint="auto")
    for flags, named in (({"alpha": 0.3}, r"alpha: checkpoint 0\.5, now 0\.3"),
                         ({"alpha": 0.5, "temperature": 4.0}, r"temperature: checkpoint 2\.0, now 4\.0")):
        with pytest.raises(CheckpointError, match=r"step-000002 was trained with another loss; refusing to resume\. "
                                                  rf"Differences: {named}\. Resume with the same `budgetune distill` command"):
            distill.distill(resume, [str(teacher)], **flags)
    with pytest.raises(CheckpointError, match=r"was trained by `budgetune distill` with its own loss; resume it with "
                                              r"that command"):
        train_lib.train(resume)  # plain train would go on with the plain loss
    other = tmp_path / "other-teacher"  # the same teacher with one weight changed: another teacher by content
    shutil.copytree(teacher / "adapter", other)
    weights = next(other.glob("*.safetensors"))
    state = load_file(weights)
    key = next(k for k in state if k.endswith("out_proj.bias"))
    save_file({**state, key: state[key] + 1.0}, weights)
    with pytest.raises(CheckpointError, match=r"Differences: teachers \(content hashes\): checkpoint"):
        distill.distill(resume, [str(other)], alpha=0.5)
    # the same teacher spelt as its adapter folder is the same teacher
    assert distill.distill(resume, [str(teacher / "adapter")], alpha=0.5)["eval_accuracy"] >= 0
