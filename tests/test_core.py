"""The core made right (issue 10): AdaLoRA scored as saved, its schedule and early stopping, weight decay by role,
flat prediction memory, portable runs, one command line, and train() called many times in one process."""

from __future__ import annotations

import contextlib
import gc
import json
import os
import re
import shutil
import subprocess
import sys

import pytest
import torch
from conftest import read_jsonl, run_cli, tiny_train_args
from transformers import AutoTokenizer

from budgetune import cli
from budgetune.adalora import rank_masks
from budgetune.config import ConfigError, resolve
from budgetune.data import readers as data_lib
from budgetune.modeling import backbone, methods
from budgetune.training.train import make_optimizer, train

pytestmark = pytest.mark.slow  # trains real models: `pytest -m "not slow"` skips the module


def flags(args: list[str]) -> list[str]:
    return args[1:]  # without the verb: resolve() takes the options


def ada_args(tiny_roberta, headlines_csv, out, **extra) -> list[str]:
    """AdaLoRA whose pruning lasts to the end (tfinal 0): every evaluation falls inside the pruning phase, and
    deltaT 7 leaves pruned singular values to drift between allocations (evaluations every 5 steps)."""
    base = {"max_train_samples": 96, "per_device_train_batch_size": 8, "num_train_epochs": 2, "tinit": 2,
            "tfinal": 0, "deltaT": 7, "eval_strategy": "steps", "eval_steps": 5, "learning_rate": 2e-2, "lora_alpha": 1024,
            "lora_dropout": 0.0}
    base.update(extra)
    return tiny_train_args(tiny_roberta, headlines_csv, out, "adalora", **base)


def saved_losses(args: list[str], out) -> dict[int, tuple[float, float]]:
    """step -> (validation loss the run logged, loss of that step's checkpoint saved and reloaded with plain peft)."""
    from peft import PeftModel

    from budgetune.data.splits import load_splits, scores
    from budgetune.hardware.devices import make_accelerator
    from budgetune.inference.loading import load_base_for
    from budgetune.inference.runner import table_logits
    from budgetune.training import checkpoint

    cfg = resolve(None, flags(args))
    splits = load_splits(cfg)
    logged = {e["step"]: e["eval_loss"] for e in read_jsonl(out / "metrics.jsonl") if e["event"] == "eval"}
    info = {"base_model_name_or_path": str(cfg.model.model_name_or_path), "label_names": splits.label_names,
            "head": "default"}
    found = {}
    for folder in sorted((out / "checkpoints").glob("step-*")):
        state = checkpoint.load(folder)
        model = methods.wrap(cfg, load_base_for(info), total_step=state["world"]["total_steps"])
        checkpoint.restore_model(model, state["model"])
        checkpoint.restore_allocator(model, state["allocator"])
        model.save_pretrained(out / "resaved")  # peft keeps the rank pattern's rows only
        reloaded = PeftModel.from_pretrained(load_base_for(info), out / "resaved").eval()
        logits = table_logits(reloaded, AutoTokenizer.from_pretrained(out / "adapter"), splits.validation,
                              make_accelerator(), 64, cfg.data.max_seq_length)
        found[state["progress"]["step"]] = (logged[state["progress"]["step"]], scores(logits, splits)["loss"])
    return found


def test_adalora_scores_the_adapter_it_saves(tiny_roberta, headlines_csv, tmp_path):
    """At every evaluation (all inside the pruning phase, masks gone stale), the logged validation loss is the
    loss of that step's adapter as peft saves and reloads it; evaluation.json is computed from adapter/ itself."""
    out = tmp_path / "ada"
    args = ada_args(tiny_roberta, headlines_csv, out)
    train(resolve(None, flags(args)))
    losses = saved_losses(args, out)
    assert sorted(losses) == [20, 24]  # 5 and 2 steps after the allocations of steps 15 and 22
    for logged, reloaded in losses.values():
        assert logged == pytest.approx(reloaded, abs=1e-6)
    best = [e for e in read_jsonl(out / "metrics.jsonl") if e["event"] == "eval" and e["best"]][-1]
    saved = json.loads((out / "evaluation.json").read_text())
    assert saved["raw_adapter"]["loss"] == pytest.approx(best["eval_loss"], abs=1e-6)


def test_without_the_mask_validation_scores_another_model(tiny_roberta, headlines_csv, tmp_path, monkeypatch):
    """The same run with the mask switched off: what validation scored is not what was saved (the old bug)."""
    monkeypatch.setattr(rank_masks, "as_saved", lambda model: contextlib.nullcontext())
    out = tmp_path / "ada"
    args = ada_args(tiny_roberta, headlines_csv, out)
    train(resolve(None, flags(args)))
    losses = saved_losses(args, out)
    # outside the 1e-6 within which the masked run's logged and reloaded losses agree (test above)
    assert all(abs(logged - reloaded) > 1e-6 for logged, reloaded in losses.values()), losses


def test_early_stopping_waits_for_the_final_rank_pattern(tiny_roberta, headlines_csv, tmp_path, capsys):
    out = tmp_path / "ada"
    args = ada_args(tiny_roberta, headlines_csv, out, tinit=0.1, tfinal=0.5, eval_steps=1,
                    early_stopping_patience=1, learning_rate=1e-4)
    train(resolve(None, flags(args)))
    printed = capsys.readouterr().out
    assert "AdaLoRA schedule over 24 optimizer steps: warm-up steps 1-3" in printed  # 0.1 x 24 -> tinit 2
    assert "final steps 14-24" in printed  # 0.5 x 24 = 12 final steps
    config = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert (config["tinit"], config["tfinal"], config["total_step"]) == (2, 12, 24)
    evals = [e for e in read_jsonl(out / "metrics.jsonl") if e["event"] == "eval"]
    assert all(e["bad_evals"] == 0 for e in evals if e["step"] <= 12)  # no patience counted while pruning
    assert evals[-1]["step"] >= 13 and evals[-1]["bad_evals"] == 1  # stopped only once the pattern was final
    end = [e for e in read_jsonl(out / "metrics.jsonl") if e["event"] == "end"][0]
    assert sum(end["final_ranks"].values()) == 2 * len(end["final_ranks"])  # target_r 2 everywhere on average


@pytest.mark.parametrize("extra, message", [
    ({"tinit": 0.5, "tfinal": 0.5}, "--tinit 0.5 (12 steps) + --tfinal 0.5 (12 steps) >= 24 total optimizer steps"),
    ({"tinit": 20, "tfinal": 4}, "--tinit 20 (20 steps) + --tfinal 4 (4 steps) >= 24"),
])
def test_schedule_without_pruning_is_refused(tiny_roberta, headlines_csv, tmp_path, extra, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        train(resolve(None, flags(ada_args(tiny_roberta, headlines_csv, tmp_path / "x", **extra))))
    assert not (tmp_path / "x" / "metrics.jsonl").exists()


def test_adalora_with_nothing_to_prune_is_refused(tiny_roberta, headlines_csv, tmp_path):
    with pytest.raises(ConfigError, match=r"--rank 1, --target_r 1; use --rank 2 or more"):
        train(resolve(None, flags(ada_args(tiny_roberta, headlines_csv, tmp_path / "x", rank=1, target_r=1))))


@pytest.mark.parametrize("flag, value, message", [("deltaT", "0", "--deltaT must be at least 1"),
                                                  ("tinit", "1.5", "--tinit must be a step count or a fraction"),
                                                  ("tfinal", "-3", "--tfinal must not be negative")])
def test_schedule_flags_are_checked(flag, value, message):
    with pytest.raises(ConfigError, match=message):
        resolve(None, ["--method", "adalora", f"--{flag}", value])


@pytest.mark.parametrize("method, decayed, not_decayed", [
    ("ia3", [], ["ia3_l"]),  # IA3's vectors are 2-D ([out, 1]): the old ndim rule decayed them toward 0
    ("lora", ["lora_A", "lora_B", "classifier.modules_to_save.default.dense.weight"], ["classifier.modules_to_save.default.dense.bias"]),
    ("adalora", ["lora_A", "lora_B"], ["lora_E"]),
    ("vera", [], ["vera_lambda_b", "vera_lambda_d"]),
])
def test_weight_decay_follows_the_parameter_role(tiny_roberta, headlines_csv, method, decayed, not_decayed):
    args = ["--model_name_or_path", str(tiny_roberta), "--method", method, "--rank", "4", "--target_modules",
            "query,value" if method != "ia3" else "key,value,output.dense", "--max_trainable_params", "null",
            "--tinit", "10", "--tfinal", "10"]
    cfg = resolve(None, args)
    model = methods.wrap(cfg, backbone.load_base(cfg, data_lib.AG_NEWS_LABELS)[0], total_step=100)
    optimizer, _ = make_optimizer(cfg, model, 100, torch.device("cpu"))
    names = {id(p): n for n, p in model.named_parameters()}
    group = {names[id(p)]: g["weight_decay"] for g in optimizer.param_groups for p in g["params"]}
    assert len(group) == sum(p.requires_grad for p in model.parameters())
    for role in decayed:
        found = [n for n in group if role in n]
        assert found and all(group[n] == cfg.train.weight_decay for n in found), role
    for role in not_decayed:
        found = [n for n in group if role in n]
        assert found and all(group[n] == 0.0 for n in found), role


def test_prediction_memory_does_not_grow_with_chunks(tiny_roberta, headlines_csv, tmp_path, monkeypatch):
    """Each chunk's tokenized Dataset is released before the next one (accelerate used to keep every loader)."""
    import datasets

    from budgetune.inference import runner
    from budgetune.inference.predict import predict

    out = tmp_path / "run"
    run_cli(*tiny_train_args(tiny_roberta, headlines_csv, out, "lora", num_train_epochs=1, max_train_samples=32))
    texts = tmp_path / "texts.csv"
    texts.write_text("text\n" + "".join(f"headline number {i} about markets\n" for i in range(60)))
    monkeypatch.setattr(data_lib, "STREAM_BYTES", 0)
    monkeypatch.setattr(data_lib, "CHUNK_ROWS", 3)  # 20 chunks
    alive, real = [], runner.table_logits

    def counting(*a, **k):
        gc.collect()
        alive.append(sum(isinstance(o, datasets.Dataset) for o in gc.get_objects()))
        return real(*a, **k)

    monkeypatch.setattr("budgetune.inference.predict.table_logits", counting)
    predict(out, str(texts), str(tmp_path / "sub.csv"), cache_dir=str(tmp_path / "cache"))
    assert len(alive) == 20 and max(alive) <= alive[1] + 1, alive


def test_overwrite_removes_everything_of_the_old_run(tiny_roberta, headlines_csv, tmp_path):
    out = tmp_path / "run"
    args = tiny_train_args(tiny_roberta, headlines_csv, out, "lora", num_train_epochs=1, max_train_samples=32)
    run_cli(*args, "--test_file", str(headlines_csv))
    (out / "evaluation-other.json").write_text("{}")
    assert (out / "evaluation_test.json").exists() and (out / "best_state.pt").exists()
    keep = out / "notes.txt"  # not the run's: left alone
    keep.write_text("mine")
    shutil.rmtree(out / "adapter")
    (out / "adapter").mkdir()
    (out / "adapter" / "stale.bin").write_text("old")
    run_cli(*args, "--overwrite_output_dir")
    assert not (out / "evaluation_test.json").exists() and not (out / "evaluation-other.json").exists()
    assert not (out / "adapter" / "stale.bin").exists() and (out / "adapter" / "adapter_config.json").exists()
    assert keep.read_text() == "mine"


def test_a_copied_run_folder_still_predicts(tiny_roberta, headlines_csv, tmp_path):
    out = tmp_path / "run"
    run_cli(*tiny_train_args(tiny_roberta, headlines_csv, out, "lora", num_train_epochs=1, max_train_samples=32))
    info = json.loads((out / "adapter" / "budgetune.json").read_text())
    assert info["base_model_name_or_path"] == str(tiny_roberta.resolve()) and "revision" in info
    moved = tmp_path / "elsewhere" / "copy"
    shutil.copytree(out, moved)
    shutil.rmtree(out)
    run_cli("predict", str(moved), "--input", str(headlines_csv), "--output", str(tmp_path / "sub.csv"))
    assert len((tmp_path / "sub.csv").read_text().splitlines()) == 481


def test_packaged_base_is_stored_by_name():
    from budgetune.training.finish import portable_model_id

    assert portable_model_id("packaged:all-MiniLM-L6-v2") == "packaged:all-MiniLM-L6-v2"
    assert portable_model_id("roberta-base") == "roberta-base"


@pytest.mark.parametrize("verb", ["train", "evaluate", "predict", "plot", "params", "plan", "demo"])
def test_every_verb_has_help(verb, capsys):
    with contextlib.suppress(SystemExit):
        assert cli.main([verb, "--help"]) == 0
    assert f"budgetune {verb}" in capsys.readouterr().out


@pytest.mark.parametrize("argv, message", [
    (["plan", "--config"], "--config needs a value"),
    (["params", "--num_labels"], "--num_labels needs a value"),
    (["plan", "--budget", "--json"], "--budget needs a value"),
    (["params", "--num_labels", "one"], "--num_labels must be an integer of at least 2, got 'one'"),
    (["train", "--learning_rate"], "--learning_rate needs a value"),
    (["train", "--seed", "--overwrite_output_dir"], "--seed needs a value"),
])
def test_a_flag_missing_its_value_is_a_usage_error(argv, message, capsys):
    assert cli.main(argv) == 2
    assert message in capsys.readouterr().err


def test_params_and_plan_take_num_labels(capsys):
    assert cli.main(["params", "--method", "lora", "--rank", "4", "--num_labels", "2", "--json"]) == 0
    two = json.loads(capsys.readouterr().out)
    assert cli.main(["params", "--method", "lora", "--rank", "4", "--num_labels", "7", "--json"]) == 0
    seven = json.loads(capsys.readouterr().out)
    assert seven["total_trainable"] - two["total_trainable"] == 5 * (384 + 1)  # MiniLM's linear head
    assert cli.main(["plan", "--budget", "50k", "--num_labels", "3"]) in (0, 1)
    assert "configurations fit 50,000" in capsys.readouterr().out


MIXED = [("lora", "no"), ("ia3", "bf16"), ("adalora", "no")]


@pytest.mark.slow
def test_many_runs_in_one_process_equal_separate_processes(tiny_roberta, headlines_csv, tmp_path):
    """Three runs in one process (other methods, other mixed precision) give what three fresh processes give."""
    runs = []
    for i, (method, precision) in enumerate(MIXED):
        args = tiny_train_args(tiny_roberta, headlines_csv, tmp_path / f"in-{i}", method, num_train_epochs=1,
                               max_train_samples=64, per_device_train_batch_size=8, mixed_precision=precision,
                               logging_steps=1, **({"tinit": 2, "tfinal": 2, "deltaT": 1} if method == "adalora" else {}))
        runs.append(args)
        train(resolve(None, flags(args)))
    for i, args in enumerate(runs):
        sep = [a if a != str(tmp_path / f"in-{i}") else str(tmp_path / f"sep-{i}") for a in args]
        subprocess.run([sys.executable, "-m", "budgetune", *sep], check=True, capture_output=True, timeout=600,
                       env={**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"})
        ours, theirs = (read_jsonl(tmp_path / f"{k}-{i}" / "metrics.jsonl") for k in ("in", "sep"))
        strip = [{k: v for k, v in e.items() if k != "samples_per_second"} for e in ours]
        assert strip == [{k: v for k, v in e.items() if k != "samples_per_second"} for e in theirs], MIXED[i]
    assert torch.get_default_dtype() == torch.float32


def test_the_automatic_adapter_scale_respects_the_tolerance(tiny_roberta, headlines_csv, tmp_path):
    """At the end of training the smallest scale within --robust_tolerance points of the best validation accuracy
    becomes the adapter's default: recorded in the bundle, used by evaluate/predict, reported in evaluation.json."""
    out = tmp_path / "run"
    args = tiny_train_args(tiny_roberta, headlines_csv, out, "lora", num_train_epochs=1, max_train_samples=128,
                           robust_tolerance=3)
    train(resolve(None, flags(args)))
    evaluation = json.loads((out / "evaluation.json").read_text())
    table = {float(s): a for s, a in evaluation["adapter_scale_validation"].items()}
    assert sorted(table) == [0.5, 0.6, 0.7, 0.8, 0.9, 1.0]
    chosen = evaluation["adapter_scale"]
    assert (max(table.values()) - table[chosen]) * 100 <= 3 + 1e-9
    assert all((max(table.values()) - a) * 100 > 3 for s, a in table.items() if s < chosen)
    assert evaluation["accuracy"] == pytest.approx(table[chosen])
    assert evaluation["raw_adapter"]["accuracy"] == pytest.approx(table[1.0])
    info = json.loads((out / "adapter" / "budgetune.json").read_text())
    assert info["adapter_scale"] == chosen and info["robust_tolerance"] == 3
    assert evaluation["adapter_scale_reason"].startswith("the smallest scale within 3 points of the best validation")
    off = tmp_path / "off"
    train(resolve(None, flags(tiny_train_args(tiny_roberta, headlines_csv, off, "lora", num_train_epochs=1,
                                              max_train_samples=128, robust_tolerance="null"))))
    evaluation = json.loads((off / "evaluation.json").read_text())
    assert evaluation["adapter_scale"] == 1.0 and evaluation["adapter_scale_validation"] is None
    assert "adapter_scale" not in json.loads((off / "adapter" / "budgetune.json").read_text())


def test_early_stopping_on_loss_every_few_steps(tiny_roberta, headlines_csv, tmp_path):
    """eval_strategy steps + metric_for_best_model loss + patience 2: the run ends at the second evaluation without
    a lower loss, and the saved adapter is the lowest-loss one."""
    out = tmp_path / "run"
    args = tiny_train_args(tiny_roberta, headlines_csv, out, "lora", eval_strategy="steps", eval_steps=2,
                           metric_for_best_model="loss", early_stopping_patience=2, learning_rate=0.5,
                           max_train_samples=160, num_train_epochs=3, robust_tolerance="null")
    train(resolve(None, flags(args)))
    evals = [e for e in read_jsonl(out / "metrics.jsonl") if e["event"] == "eval"]
    losses = [e["eval_loss"] for e in evals]
    best_at = losses.index(min(losses))
    assert [e["best"] for e in evals] == [i == 0 or losses[i] < min(losses[:i]) for i in range(len(losses))]
    assert evals[-1]["bad_evals"] == 2 and evals[-1]["step"] < 30  # 10 steps per epoch x 3: it stopped early
    assert all(e["step"] % 2 == 0 for e in evals)
    end = [e for e in read_jsonl(out / "metrics.jsonl") if e["event"] == "end"][0]
    assert end["best_step"] == evals[best_at]["step"] and end["best_metric"] == min(losses)
    assert json.loads((out / "evaluation.json").read_text())["loss"] == pytest.approx(min(losses), abs=1e-6)
    # resumed from the checkpoint of the validation that stopped it (a kill while finishing): no more training
    before = [e for e in read_jsonl(out / "metrics.jsonl") if e["event"] in ("train", "eval")]
    train(resolve(None, flags(args) + ["--resume_from_checkpoint", "auto"]))
    after = [e for e in read_jsonl(out / "metrics.jsonl") if e["event"] in ("train", "eval")]
    assert after == before and [e for e in read_jsonl(out / "metrics.jsonl") if e["event"] == "end"][-1] == end


@pytest.fixture(scope="module")
def tiny_run(tiny_roberta, headlines_csv, tmp_path_factory):
    out = tmp_path_factory.mktemp("tiny") / "run"
    run_cli(*tiny_train_args(tiny_roberta, headlines_csv, out, "lora", num_train_epochs=1, max_train_samples=32))
    return out


@pytest.mark.parametrize("streamed", [False, True])
def test_predict_keeps_the_inputs_own_ids(tiny_run, tmp_path, monkeypatch, streamed):
    from budgetune.inference.predict import predict

    if streamed:
        monkeypatch.setattr(data_lib, "STREAM_BYTES", 0)
        monkeypatch.setattr(data_lib, "CHUNK_ROWS", 4)
    texts = tmp_path / "texts.csv"
    texts.write_text("doc,text\n" + "".join(f"a-{i},headline {i} on markets\n" for i in range(10)))
    predict(tiny_run, str(texts), str(tmp_path / "ids.csv"), id_column="doc", cache_dir=str(tmp_path / "c"))
    predict(tiny_run, str(texts), str(tmp_path / "pos.csv"), cache_dir=str(tmp_path / "c"))
    with_ids = [line.split(",") for line in (tmp_path / "ids.csv").read_text().splitlines()]
    by_pos = [line.split(",") for line in (tmp_path / "pos.csv").read_text().splitlines()]
    assert with_ids[0] == by_pos[0] == ["ID", "Label"]
    assert [r[0] for r in with_ids[1:]] == [f"a-{i}" for i in range(10)]
    assert [r[1] for r in with_ids[1:]] == [r[1] for r in by_pos[1:]]
    with pytest.raises(data_lib.DataError, match=r"texts\.csv: no ID column 'nope' \(columns: doc, text\); set "
                       r"--id_column"):
        predict(tiny_run, str(texts), str(tmp_path / "bad.csv"), id_column="nope", cache_dir=str(tmp_path / "c"))
    assert not (tmp_path / "bad.csv").exists()


def test_predict_takes_its_defaults_from_a_recipe(tiny_run, tmp_path, capsys):
    texts = tmp_path / "texts.csv"
    texts.write_text("body\n" + "".join(f"headline {i}\n" for i in range(5)))
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(f"data:\n  text_column_name: body\n  cache_dir: {tmp_path / 'cache'}\n")
    assert cli.main(["predict", str(tiny_run), "--input", str(texts), "--output", str(tmp_path / "s.csv"),
                     "--config", str(recipe)]) == 0
    assert len((tmp_path / "s.csv").read_text().splitlines()) == 6 and (tmp_path / "cache").is_dir()


def test_non_finite_logits_are_refused_not_written(tiny_run, tmp_path, capsys):
    """A model giving NaN logits (broken weights, or a precision that overflows) would predict class 0 for every
    row, silently: predict and evaluate refuse, naming the row, and write nothing."""
    from safetensors.torch import load_file, save_file

    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    weights = next((run / "adapter").glob("*.safetensors"))
    state = load_file(weights)
    heads = [k for k in state if "out_proj.weight" in k]
    assert heads, sorted(state)
    save_file({k: v.fill_(float("nan")) if k in heads else v for k, v in state.items()}, weights)
    texts = tmp_path / "texts.csv"
    texts.write_text("label,text\n" + "".join(f"0,headline {i}\n" for i in range(5)))
    expected = "logits are not finite (NaN or inf) for 5 of 5 rows (the first: row 1), computing in fp32"
    assert cli.main(["predict", str(run), "--input", str(texts), "--output", str(tmp_path / "s.csv"),
                     "--precision", "fp32"]) == 2
    assert expected in capsys.readouterr().err and not (tmp_path / "s.csv").exists()
    assert cli.main(["evaluate", str(run), "--data_file", str(texts), "--precision", "fp32"]) == 2
    assert expected in capsys.readouterr().err and not list(run.glob("evaluation-*"))


def test_validation_does_not_change_what_trains(tiny_roberta, headlines_csv, tmp_path):
    """Evaluating every 3 steps or only at the end trains the same model: validation loaders draw no random numbers
    from the global generator (dropout is on, so a shifted stream would change every later step)."""
    losses = {}
    for name, extra in {"often": {"eval_strategy": "steps", "eval_steps": 3}, "end": {"eval_strategy": "epoch"}}.items():
        out = tmp_path / name
        train(resolve(None, flags(tiny_train_args(tiny_roberta, headlines_csv, out, "lora", max_train_samples=96,
                                                  per_device_train_batch_size=8, lora_dropout=0.1, **extra))))
        losses[name] = [(e["step"], e["loss"]) for e in read_jsonl(out / "metrics.jsonl") if e["event"] == "train"]
    assert len(losses["end"]) >= 5 and losses["often"] == losses["end"]
