"""Hugging Face's training options: --class_weights, --label_smoothing_factor, --lr_scheduler_type (+ kwargs),
--warmup_steps, --eval_strategy no, --save_strategy, --optim (+ optim_args); each does what it says, resumes and
searches, and bad input names the flag."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import read_jsonl, run_cli, tiny_train_args, write_csv

from budgetune.config import resolve
from budgetune.errors import ConfigError
from budgetune.training import losses, optim

LABELS = ["World", "Sports", "Business", "Sci/Tech"]


def _error(*flags: str) -> str:
    with pytest.raises(ConfigError) as info:
        resolve(None, list(flags))
    return str(info.value)


@pytest.mark.parametrize(("flags", "message"), [
    (["--class_weights", "1,0,1,1"], "--class_weights must be `balanced` or one number above 0 per label, got 0.0"),
    (["--class_weights", "1,nan,1,1"], "--class_weights must be `balanced` or one number above 0 per label, got nan"),
    (["--class_weights", "1,heavy"], "--class_weights: expected a number, got 'heavy'"),
    (["--label_smoothing_factor", "1"], "--label_smoothing_factor must be in [0, 1), got 1.0"),
    (["--label_smoothing_factor", "-0.1"], "--label_smoothing_factor must be in [0, 1), got -0.1"),
    (["--warmup_steps", "-2"], "--warmup_steps must be 0 or a number of optimizer steps, got -2"),
    (["--warmup_steps", "2.5"], "--warmup_steps must be a step count or a fraction between 0 and 1, got 2.5"),
    (["--optim", "adam"], "--optim must be one of adamw_torch, adamw_torch_fused, adafactor, sgd, got 'adam'"),
    (["--eval_strategy", "never"], "--eval_strategy must be one of epoch, steps, no, got 'never'"),
    (["--save_strategy", "best"], "--save_strategy must be one of null, no, epoch, steps, got 'best'"),
    (["--save_strategy", "steps"], "--save_strategy steps needs --save_steps N (optimizer steps between checkpoints)"),
    (["--save_steps", "-1"], "--save_steps must be 0 or a number of optimizer steps, got -1"),
    (["--eval_strategy", "no", "--lr_scheduler_type", "reduce_lr_on_plateau"],
     "--lr_scheduler_type reduce_lr_on_plateau steps on the validation metric, which --eval_strategy no never "
     "computes; choose another schedule or evaluate"),
    (["--lr_scheduler_kwargs", "[1, 2]"], "command line: train.lr_scheduler_kwargs: expected a mapping, got [1, 2]"),
])
def test_bad_training_options_name_the_flag(flags, message):
    assert _error(*flags) == message


@pytest.mark.parametrize(("flags", "fragment"), [
    (["--lr_scheduler_type", "cosine_with_min_lr"], "--lr_scheduler_type cosine_with_min_lr with "
     "--lr_scheduler_kwargs {}: "),
    (["--lr_scheduler_type", "warmup_stable_decay"], "--lr_scheduler_type warmup_stable_decay with "
     "--lr_scheduler_kwargs {}: "),
    (["--lr_scheduler_type", "cosine", "--lr_scheduler_kwargs", "{num_cycle: 2}"],
     "--lr_scheduler_type cosine with --lr_scheduler_kwargs {'num_cycle': 2}: "),
    (["--optim", "sgd", "--optim_args", "momentum=fast"], "--optim_args: momentum must be a number, got 'fast'"),
    (["--optim", "sgd", "--optim_args", "beta=0.9"], "--optim_args: 'beta=0.9' is not KEY=VALUE with a key --optim sgd "
     "takes (keys: momentum, dampening, nesterov)"),
    (["--optim", "adafactor", "--optim_args", "momentum=0.9"], "--optim_args: 'momentum=0.9' is not KEY=VALUE with a "
     "key --optim adafactor takes (keys: none)"),
])
def test_schedule_and_optimizer_arguments_are_checked_before_training(flags, fragment):
    with pytest.raises(ConfigError) as info:
        optim.check_schedule(resolve(None, flags).train)
    assert str(info.value).startswith(fragment), str(info.value)


def _lr_trace(flags: list[str], total: int) -> list[float]:
    t = resolve(None, flags).train
    opt = optim.build_optimizer(t, torch.nn.Linear(2, 2), torch.device("cpu"))
    sched = optim.make_scheduler(t, opt, total)
    trace = []
    for _ in range(total):
        opt.step()
        sched.step()
        trace.append(optim.current_lr(sched, opt))
    return trace


def test_linear_default_is_the_old_schedule_and_warmup_steps_override_the_ratio():
    from transformers import get_linear_schedule_with_warmup

    opt = torch.optim.AdamW(torch.nn.Linear(2, 2).parameters(), lr=1e-3)
    old = get_linear_schedule_with_warmup(opt, int(0.06 * 30), 30)  # what train.make_optimizer built before
    expected = []
    for _ in range(30):
        opt.step()
        old.step()
        expected.append(old.get_last_lr()[0])
    assert _lr_trace([], 30) == expected  # 1.8 warmup steps round down to 1, as before
    ratio = _lr_trace(["--warmup_ratio", "0.5"], 20)
    steps = _lr_trace(["--warmup_ratio", "0.5", "--warmup_steps", "2"], 20)
    assert ratio[:3] == pytest.approx([1e-4, 2e-4, 3e-4])  # 10 warm-up steps
    assert steps[:3] == pytest.approx([5e-4, 1e-3, 1e-3 * 17 / 18])  # 2, then linear decay
    assert optim.warmup_steps(resolve(None, ["--warmup_steps", "7"]).train, 100) == 7
    assert optim.warmup_steps(resolve(None, ["--warmup_ratio", "0.25"]).train, 100) == 25
    assert optim.warmup_steps(resolve(None, ["--warmup_steps", "0.1"]).train, 100) == 10  # transformers 5's fraction
    assert optim.warmup_steps(resolve(None, ["--warmup_steps", "4.0"]).train, 100) == 4


def test_cosine_and_hf_constant_follow_transformers():
    lr, total, warm = 1e-3, 20, 4
    cosine = _lr_trace(["--lr_scheduler_type", "cosine", "--warmup_steps", str(warm)], total)
    for s, got in enumerate(cosine, start=1):  # logged after s optimizer steps
        want = lr * s / warm if s < warm else lr * 0.5 * (1 + math.cos(math.pi * (s - warm) / (total - warm)))
        assert got == pytest.approx(want, abs=1e-12), s
    assert _lr_trace(["--lr_scheduler_type", "constant"], 10) == [lr] * 10  # Hugging Face's: no warm-up
    restarts = _lr_trace(["--lr_scheduler_type", "cosine_with_restarts", "--warmup_ratio", "0",
                          "--lr_scheduler_kwargs", "{num_cycles: 2}"], total)
    want = [lr * 0.5 * (1 + math.cos(math.pi * ((2 * s / total) % 1))) for s in range(1, total)]
    assert restarts[:-1] == pytest.approx(want, abs=1e-12)
    assert restarts[9] == pytest.approx(lr) and restarts[8] < lr / 10  # the second cycle restarts at step 10


def test_plateau_schedule_steps_on_the_metric_in_its_direction():
    t = resolve(None, ["--lr_scheduler_type", "reduce_lr_on_plateau", "--lr_scheduler_kwargs",
                       "{factor: 0.5, patience: 0}"]).train
    opt = optim.build_optimizer(t, torch.nn.Linear(2, 2), torch.device("cpu"))
    sched = optim.make_scheduler(t, opt, 10)
    assert optim.steps_on_metric(sched) and sched.mode == "max"  # accuracy: higher is better
    for acc in (0.5, 0.6, 0.55):
        sched.step(acc)
    assert optim.current_lr(sched, opt) == pytest.approx(5e-4)
    loss = resolve(None, ["--lr_scheduler_type", "reduce_lr_on_plateau", "--metric_for_best_model", "loss"]).train
    assert optim.make_scheduler(loss, opt, 10).mode == "min"


def test_each_optimizer_is_built_as_hugging_face_builds_it():
    from transformers.optimization import Adafactor

    model = torch.nn.Linear(2, 2)
    built = {name: optim.build_optimizer(resolve(None, ["--optim", name, *extra]).train, model, torch.device("cpu"))
             for name, extra in {"adamw_torch": [], "adamw_torch_fused": [], "adafactor": [],
                                 "sgd": ["--optim_args", "momentum=0.9,nesterov=true"]}.items()}
    assert type(built["adamw_torch"]) is torch.optim.AdamW and not built["adamw_torch"].defaults["fused"]
    assert built["adamw_torch_fused"].defaults["fused"]
    assert isinstance(built["adafactor"], Adafactor)
    assert not built["adafactor"].defaults["relative_step"] and not built["adafactor"].defaults["scale_parameter"]
    assert built["sgd"].defaults["momentum"] == 0.9 and built["sgd"].defaults["nesterov"]
    plain = optim.build_optimizer(resolve(None, ["--optim", "sgd"]).train, model, torch.device("cpu"))
    assert plain.defaults["momentum"] == 0  # torch's default, as Hugging Face's Trainer leaves it
    for opt in built.values():
        assert [g["weight_decay"] for g in opt.param_groups] == [0.01, 0.0]  # decay on the weight, not the bias


def test_class_weights_resolve_on_the_training_labels():
    from sklearn.utils.class_weight import compute_class_weight

    y = np.array([0, 0, 0, 1, 2, 2, -100, 3])  # -100: an unlabelled row, left out
    got = losses.class_weights("balanced", y, LABELS)
    assert got == pytest.approx(list(compute_class_weight("balanced", classes=np.arange(4), y=y[y >= 0])))
    assert got == pytest.approx([7 / 12, 7 / 4, 7 / 8, 7 / 4])
    assert losses.class_weights([1, 4, 1, 1], y, LABELS) == [1.0, 4.0, 1.0, 1.0]
    assert losses.class_weights(None, y, LABELS) is None
    with pytest.raises(ConfigError, match=r"--class_weights: 2 weight\(s\) for 4 labels \(World, Sports, Business, "
                                          r"Sci/Tech\); give one per label"):
        losses.class_weights([1, 2], y, LABELS)
    with pytest.raises(ConfigError, match="--class_weights balanced: class 'Sci/Tech' has no training row"):
        losses.class_weights("balanced", np.array([0, 1, 2]), LABELS)
    # a multi-label 0/1 matrix gives BCE's pos_weight: each label's negatives / positives
    matrix = np.array([[1, 0], [1, 1], [0, 0], [1, 0]])
    assert losses.class_weights("balanced", matrix, ["a", "b"]) == pytest.approx([1 / 3, 3.0])
    with pytest.raises(ConfigError, match="label 'a' is on no training row or on every one"):
        losses.class_weights("balanced", np.ones((3, 2)), ["a", "b"])


@pytest.mark.parametrize("method", ["lora", "adalora"])
def test_the_loss_is_torchs_weighted_smoothed_cross_entropy_on_a_known_batch(tiny_roberta, method):
    from transformers import AutoTokenizer

    from budgetune.adalora import lean_step
    from budgetune.modeling import backbone, methods

    cfg = resolve(None, ["--model_name_or_path", str(tiny_roberta), "--method", method, "--rank", "4",
                         "--target_modules", "query,value", "--tinit", "2", "--tfinal", "2", "--target_r", "2"])
    torch.manual_seed(0)
    model = methods.wrap(cfg, backbone.load_base(cfg, LABELS)[0], total_step=10)
    if method == "adalora":
        lean_step.install(model)
    model.eval()
    tok = AutoTokenizer.from_pretrained(tiny_roberta)
    batch = dict(tok(["stocks fall", "team wins cup", "new chip", "peace talks"], padding=True, return_tensors="pt"))
    batch["labels"] = torch.tensor([2, 1, 3, 3])
    weights = [0.5, 2.0, 1.0, 3.0]
    logits = model(**{k: v for k, v in batch.items() if k != "labels"}).logits
    penalty = lean_step.orth_penalty(model)
    extra = 0.0 if penalty is None else penalty
    assert (penalty is not None) == (method == "adalora")
    want = F.cross_entropy(logits, batch["labels"], weight=torch.tensor(weights), label_smoothing=0.1) + extra
    got = losses.cross_entropy_loss(weights, 0.1)(model, batch)
    assert torch.equal(got, want)
    plain = model(**batch).loss  # the model's own loss (with AdaLoRA's regulariser): what weights of 1 give
    assert torch.allclose(losses.cross_entropy_loss([1.0] * 4, 0.0)(model, batch), plain, atol=1e-6)
    assert not torch.allclose(got, plain, atol=1e-3)
    assert losses.cross_entropy_loss(None, 0.0) is None  # neither option: the model's own loss, untouched


def test_a_callers_own_loss_is_not_silently_kept_beside_weights_or_smoothing():
    from budgetune.data.readers import TextTable
    from budgetune.data.splits import Splits
    from budgetune.training.train import training_loss

    table = TextTable(["a", "b", "c", "d"], [0, 1, 2, 3], LABELS, "rows")
    splits = Splits(table, table, None, LABELS)

    def own(model, batch):  # distill's loss_fn stands here
        return torch.zeros(())

    for flags in (["--class_weights", "balanced"], ["--label_smoothing_factor", "0.1"]):
        with pytest.raises(ConfigError, match=r"--class_weights and --label_smoothing_factor shape the cross entropy "
                                              r"of `budgetune train`; this command trains with a loss of its own"):
            training_loss(resolve(None, flags), splits, own)
        assert training_loss(resolve(None, flags), splits, None)[0] is not None
    loss, options = training_loss(resolve(None, []), splits, own)
    assert loss is own and options["class_weights"] is None
    assert training_loss(resolve(None, []), splits, None)[0] is None  # the model's own loss


def test_save_strategy_decides_the_checkpoint_steps():
    from budgetune.training.train import due_for_save

    def saves(*flags: str, evaluated=lambda s: s % 4 == 0) -> list[int]:
        t = resolve(None, list(flags)).train
        return [s for s in range(1, 17) if due_for_save(t, s, s % 8 == 0, evaluated(s))]

    assert saves() == [4, 8, 12, 16]  # null: at each evaluation (as before)
    assert saves("--save_steps", "3") == [3, 4, 6, 8, 9, 12, 15, 16]
    assert saves("--save_strategy", "no", "--save_steps", "3") == []
    assert saves("--save_strategy", "epoch") == [8, 16]
    assert saves("--save_strategy", "steps", "--save_steps", "5") == [5, 10, 15]
    assert saves("--eval_strategy", "no", evaluated=lambda s: False) == [8, 16]  # null without validations: epochs


def test_class_weights_of_the_wrong_length_through_the_real_cli(tiny_roberta, headlines_csv, tmp_path):
    out = tmp_path / "run"
    proc = run_cli(*tiny_train_args(tiny_roberta, headlines_csv, out, "lora", class_weights="1,2"), check=False,
                   timeout=300)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert ("budgetune: error: --class_weights: 2 weight(s) for 4 labels (0, 1, 2, 3); give "
            "one per label, in label order, or `balanced`") in proc.stderr.splitlines(), proc.stderr[-2000:]
    assert not (out / "config.yaml").exists() and not (out / "metrics.jsonl").exists()


# ---------------------------------------------------------------- runs (slow)

SMALL = {"max_train_samples": 64, "per_device_train_batch_size": 8, "logging_steps": 1, "deterministic": "true"}


def _events(out: Path, event: str) -> list[dict]:
    return [r for r in read_jsonl(out / "metrics.jsonl") if r["event"] == event]


def _ckpt_steps(out: Path) -> list[int]:
    return sorted(int(p.name.split("-")[1]) for p in (out / "checkpoints").glob("step-*"))


@pytest.mark.slow
def test_cosine_trace_and_warmup_steps_in_metrics_jsonl(tiny_roberta, headlines_csv, tmp_path):
    out = tmp_path / "run"
    run_cli(*tiny_train_args(tiny_roberta, headlines_csv, out, "lora", **SMALL, lr_scheduler_type="cosine",
                             warmup_ratio=0.5, warmup_steps=3))
    lr, total, warm = 5e-3, 16, 3  # 64 rows in batches of 8, 2 epochs
    assert _events(out, "options")[0]["warmup_steps"] == warm  # not 8: the steps override the ratio
    trace = {e["step"]: e["learning_rate"] for e in _events(out, "train")}
    assert sorted(trace) == list(range(1, total + 1))
    for s, got in trace.items():
        want = lr * s / warm if s < warm else lr * 0.5 * (1 + math.cos(math.pi * (s - warm) / (total - warm)))
        assert got == pytest.approx(want, abs=1e-12), s


@pytest.mark.slow
def test_class_weights_and_smoothing_change_the_training_loss(tiny_roberta, headlines_csv, tmp_path):
    from sklearn.utils.class_weight import compute_class_weight

    from budgetune.data.splits import load_splits

    rows = [r for r in (headlines_csv.read_text().splitlines()[1:])]
    skewed = write_csv(tmp_path / "skewed.csv", ["label", "text"],
                       [r.split(",", 1) for i, r in enumerate(rows) if not r.startswith("0,") or i % 4 == 0])
    runs = {"plain": {}, "weighted": {"class_weights": "balanced"}, "smoothed": {"label_smoothing_factor": 0.2}}
    first = {}
    for name, extra in runs.items():
        args = tiny_train_args(tiny_roberta, skewed, tmp_path / name, "lora", **SMALL, max_steps=2, **extra)
        run_cli(*args)
        options = _events(tmp_path / name, "options")[0]
        first[name] = _events(tmp_path / name, "train")[0]["loss"]
        if name == "weighted":
            splits = load_splits(resolve(None, args[1:]))
            y = np.array(splits.train.labels)
            assert options["class_weights"] == pytest.approx(
                list(compute_class_weight("balanced", classes=np.arange(4), y=y)))
            assert options["class_weights"][0] > 1.5 * options["class_weights"][1]  # the cut class weighs more
        else:
            assert options["class_weights"] is None
        assert options["label_smoothing_factor"] == (0.2 if name == "smoothed" else 0.0)
    # the same first batch and weights: only the loss differs
    assert first["weighted"] != pytest.approx(first["plain"], abs=1e-4)
    assert first["smoothed"] != pytest.approx(first["plain"], abs=1e-4)


@pytest.mark.slow
def test_eval_strategy_no_ships_the_last_state_without_validating(tiny_roberta, headlines_csv, tmp_path):
    out = tmp_path / "run"
    proc = run_cli(*tiny_train_args(tiny_roberta, headlines_csv, out, "lora", **SMALL, eval_strategy="no",
                                    early_stopping_patience=1))
    assert ("--eval_strategy no: no validation while training; --early_stopping_patience 1 and "
            "--metric_for_best_model do not apply") in proc.stdout
    assert not _events(out, "eval")  # no validation while training (patience 1 would have stopped it early)
    assert _ckpt_steps(out) == [8, 16]  # save_strategy null without validations: each epoch's end
    last = torch.load(out / "checkpoints" / "step-000016" / "state.pt", map_location="cpu")["model"]
    best = torch.load(out / "best_state.pt", map_location="cpu")
    assert best["metrics"]["step"] == 16 and _events(out, "end")[0]["best_step"] == 16
    assert best["model"].keys() == last.keys() and all(torch.equal(best["model"][k], last[k]) for k in last)
    evaluation = json.loads((out / "evaluation.json").read_text())  # the shipped adapter, scored at the end
    assert best["metrics"]["eval_accuracy"] == evaluation["raw_adapter"]["accuracy"]


@pytest.mark.slow
def test_save_strategy_no_writes_no_checkpoint(tiny_roberta, headlines_csv, tmp_path):
    out = tmp_path / "run"
    run_cli(*tiny_train_args(tiny_roberta, headlines_csv, out, "lora", **SMALL, save_strategy="no", save_steps=3))
    assert _ckpt_steps(out) == [] and len(_events(out, "eval")) == 2
    assert (out / "adapter" / "adapter_model.safetensors").is_file()


class Stop(Exception):
    """Stands for a kill after a validation, before its checkpoint."""


RESUMES = {
    "adamw_torch_fused": ("lora", {"optim": "adamw_torch_fused"}),
    "adafactor-cosine": ("lora", {"optim": "adafactor", "lr_scheduler_type": "cosine", "warmup_steps": 2}),
    "sgd-plateau": ("lora", {"optim": "sgd", "optim_args": "momentum=0.9", "learning_rate": 0.5,
                             "lr_scheduler_type": "reduce_lr_on_plateau", "metric_for_best_model": "loss",
                             "lr_scheduler_kwargs": "{factor: 0.5, patience: 0, threshold: 0.5}"}),
    "adalora-adafactor-restarts": ("adalora", {"optim": "adafactor", "class_weights": "balanced",
                                               "label_smoothing_factor": 0.1, "lr_scheduler_type":
                                               "cosine_with_restarts", "lr_scheduler_kwargs": "{num_cycles: 2}"}),
}


@pytest.mark.slow
@pytest.mark.parametrize("name", list(RESUMES))
def test_each_optimizer_and_schedule_resumes_to_the_uninterrupted_run(tiny_roberta, headlines_csv, tmp_path, name):
    from budgetune.training import train as train_mod

    method, extra = RESUMES[name]
    flags = {**SMALL, "num_train_epochs": 3, "eval_strategy": "steps", "eval_steps": 4, "save_total_limit": 10,
             "robust_tolerance": "null", **extra}
    ref_out, out = tmp_path / "reference", tmp_path / "stopped"
    train_mod.train(resolve(None, tiny_train_args(tiny_roberta, headlines_csv, ref_out, method, **flags)[1:]))

    def stop_at_12(step: int, metrics: dict) -> None:
        if step == 12:
            raise Stop

    args = tiny_train_args(tiny_roberta, headlines_csv, out, method, **flags)[1:]
    with pytest.raises(Stop):
        train_mod.train(resolve(None, args), on_evaluate=stop_at_12)
    assert _ckpt_steps(out) == [4, 8]
    train_mod.train(resolve(None, [*args, "--resume_from_checkpoint", "auto"]))
    for event in ("train", "eval", "end"):
        ref = [{k: v for k, v in e.items() if k != "samples_per_second"} for e in _events(ref_out, event)]
        got = [{k: v for k, v in e.items() if k != "samples_per_second"} for e in _events(out, event)]
        assert got == ref, event
    rates = [e["learning_rate"] for e in _events(out, "train")]
    if name == "sgd-plateau":
        assert min(rates) < 0.5, "the plateau schedule never lowered the rate: the test would not see its state"
    assert len(set(rates)) > 2


@pytest.mark.slow
def test_search_trains_its_trials_with_the_options(tiny_roberta, headlines_csv, tmp_path):
    """A trial without validations (--eval_strategy no) is scored by its shipped adapter's validation at the end;
    the options reach every trial and the best config."""
    pytest.importorskip("optuna")
    import yaml

    from budgetune.recipes.search.driver import search

    args = tiny_train_args(tiny_roberta, headlines_csv, tmp_path / "unused", "lora", **SMALL, max_steps=6,
                           eval_strategy="no", save_strategy="no", class_weights="balanced",
                           label_smoothing_factor=0.1, lr_scheduler_type="cosine", optim="adafactor")
    group = {"method": ["lora"], "target_modules": ["query,value"], "head": ["default"], "rank": [4],
             "learning_rate": [5e-3], "alpha_ratio": [2.0], "lora_dropout": [0.0]}
    study = search(resolve(None, args[1:]), search_group=group, n_trials=1, output_dir=tmp_path / "s",
                   budget_cap=3000, pruner="none", verbose=False)
    trial = study.best_trial
    run = tmp_path / "s" / "trials" / "0000"
    assert not _events(run, "eval") and not _ckpt_steps(run)
    evaluation = json.loads((run / "evaluation.json").read_text())
    assert trial.value == evaluation["raw_adapter"]["accuracy"]
    options = _events(run, "options")[0]
    assert options["optim"] == "adafactor" and options["lr_scheduler_type"] == "cosine"
    assert len(options["class_weights"]) == 4 and options["label_smoothing_factor"] == 0.1
    train = yaml.safe_load((tmp_path / "s" / "best.yaml").read_text())["train"]
    assert (train["eval_strategy"], train["optim"], train["class_weights"]) == ("no", "adafactor", "balanced")


def test_multi_label_class_weights_are_bces_pos_weight_on_a_known_batch(tiny_roberta):
    """--task multi_label --class_weights: BCEWithLogits with pos_weight (the training rows' negatives/positives
    under `balanced`); regression refuses class weights and only single-label takes label smoothing."""
    from transformers import AutoTokenizer

    from budgetune.data.readers import TextTable
    from budgetune.data.splits import Splits
    from budgetune.modeling import backbone, methods
    from budgetune.training.train import training_loss

    cfg = resolve(None, ["--model_name_or_path", str(tiny_roberta), "--task", "multi_label", "--label_names",
                         ",".join(LABELS), "--class_weights", "balanced"])
    rows = [[1, 0, 1, 0], [0, 1, 0, 0], [1, 0, 0, 1], [0, 0, 1, 1]]
    table = TextTable(["a", "b", "c", "d"], rows, LABELS, "rows")
    loss_fn, options = training_loss(cfg, Splits(table, table, None, LABELS, "rows", "multi_label"), None)
    assert options["class_weights"] == pytest.approx([1.0, 3.0, 1.0, 1.0])  # negatives / positives per label
    torch.manual_seed(0)
    model = methods.wrap(cfg, backbone.load_base(cfg, LABELS)[0], total_step=10).eval()
    batch = dict(AutoTokenizer.from_pretrained(tiny_roberta)(["stocks fall", "team wins cup", "new chip", "talks"],
                                                            padding=True, return_tensors="pt"))
    batch["labels"] = torch.tensor(rows, dtype=torch.float32)
    logits = model(**{k: v for k, v in batch.items() if k != "labels"}).logits
    want = F.binary_cross_entropy_with_logits(logits, batch["labels"], pos_weight=torch.tensor([1.0, 3.0, 1.0, 1.0]))
    assert torch.equal(loss_fn(model, batch), want)
    assert not torch.allclose(want, model(**batch).loss, atol=1e-4)  # the model's own BCE is unweighted
    with pytest.raises(ConfigError, match=r"--class_weights: a regression target has no classes to weigh"):
        resolve(None, ["--task", "regression", "--class_weights", "balanced"])
    with pytest.raises(ConfigError, match=r"--label_smoothing_factor smooths one class per row; --task multi_label"):
        resolve(None, ["--task", "multi_label", "--label_smoothing_factor", "0.1"])
