"""AdaLoRA: rank allocation through the real CLI, the saved pruned adapter, and the training loop's call order."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import pytest
import torch
from conftest import headline_rows, read_jsonl, run_cli, tiny_train_args
from safetensors.torch import load_file
from test_methods import batch_for, outputs, rebuild_trained, reload_plain

from budgetune.config import resolve

pytestmark = pytest.mark.slow  # trains real models: `pytest -m "not slow"` skips the module

TOL = 1e-5


# ---------------------------------------------------------------- one real CLI run


@pytest.fixture(scope="module")
def ada_run(tiny_roberta, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("adalora") / "run"
    # 1 epoch of the built-in data: 27 optimizer steps; pruning from step 4 until 27 - 8, every 2 steps.
    run_cli(*tiny_train_args(tiny_roberta, "builtin:headlines", out, "adalora", num_train_epochs=1))
    return out


def test_cli_run_allocates_prunes_saves_and_reloads(ada_run, tiny_roberta):
    """One test on purpose: under xdist every test of the module could land on another worker and retrain."""
    cfg = resolve(str(ada_run / "config.yaml"), [])
    init_r, target_r = cfg.method.rank, cfg.method.resolved_target_r()
    assert (init_r, target_r) == (4, 2)
    arch = json.loads((tiny_roberta / "config.json").read_text())
    n_modules = arch["num_hidden_layers"] * len(cfg.method.target_modules)  # query + value in every layer
    events = read_jsonl(ada_run / "metrics.jsonl")

    # The final rank pattern: non-uniform, summing to target_r x adapted modules.
    final = [e for e in events if e["event"] == "end"][-1]["final_ranks"]
    assert len(final) == n_modules
    assert sum(final.values()) == target_r * n_modules
    assert len(set(final.values())) > 1, final
    assert all(0 <= r <= init_r for r in final.values())
    acfg = json.loads((ada_run / "adapter" / "adapter_config.json").read_text())
    saved = {k: sum(bool(x) for x in v) for k, v in acfg["rank_pattern"].items()}
    assert {k.removesuffix(".lora_E"): v for k, v in saved.items()} == final
    assert (acfg["init_r"], acfg["target_r"]) == (init_r, target_r)

    # The total rank falls over time, from above the target down to it.
    ranks = [(e["step"], sum(e["ranks"].values())) for e in events if e["event"] == "ranks"]
    assert len(ranks) >= 3
    # One name per module throughout (peft renames its pattern's keys when an adapter is saved mid-run).
    assert {frozenset(e["ranks"]) for e in events if e["event"] == "ranks"} == {frozenset(final)}
    steps, totals = zip(*ranks)
    assert list(steps) == sorted(steps)
    assert all(a >= b for a, b in zip(totals, totals[1:])), totals
    assert totals[0] > totals[-1] == target_r * n_modules
    assert max(totals) <= init_r * n_modules

    # The pruned adapter file holds only the kept ranks, and plain peft reloads it without a size mismatch.
    tensors = load_file(str(ada_run / "adapter" / "adapter_model.safetensors"))
    e_shapes = {k: v.shape for k, v in tensors.items() if ".lora_E" in k}
    assert len(e_shapes) == n_modules
    assert sorted(s[0] for s in e_shapes.values()) == sorted(final.values())
    reloaded = reload_plain(ada_run, tiny_roberta)
    for name, p in reloaded.named_parameters():
        if ".lora_E." in name:
            key = name.removeprefix("base_model.model.").replace(".default", "")
            assert p.shape[0] == saved[key], name
    trained = rebuild_trained(ada_run)
    batch = batch_for(ada_run)
    want_logits, want_hidden = outputs(trained, batch)
    got_logits, got_hidden = outputs(reloaded, batch)
    assert (got_logits - want_logits).abs().max().item() < TOL
    assert (got_hidden - want_hidden).abs().max().item() < TOL
    with reloaded.disable_adapter():
        _, plain_hidden = outputs(reloaded, batch)
    assert (plain_hidden - got_hidden).abs().max().item() > 10 * TOL


# ---------------------------------------------------------------- in-process: the loop's call order

N_TRAIN, BATCH = 100, 16


@pytest.fixture(scope="module")
def small_data(tmp_path_factory) -> tuple[Path, Path]:
    """A training file of exactly N_TRAIN rows and a separate validation file: batch counts are known exactly."""
    folder = tmp_path_factory.mktemp("ada-data")
    rows = headline_rows()
    paths = []
    for name, part in (("train.csv", rows[:N_TRAIN]), ("validation.csv", rows[N_TRAIN:N_TRAIN + 24])):
        with open(folder / name, "w", newline="", encoding="utf-8") as f:
            w = csv.writer(f)
            w.writerow(["label", "text"])
            w.writerows(part)
        paths.append(folder / name)
    return paths[0], paths[1]


def _reset_accelerate():
    from accelerate.state import AcceleratorState, GradientState, PartialState

    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    PartialState._reset_state()


def train_recorded(monkeypatch, tiny_roberta, data, out: Path, *, accumulation: int, epochs: int,
                   skip_step: int | None = None) -> dict:
    """Run train() in-process, recording optimizer steps, scheduler steps, micro-batches and update_and_allocate."""
    import accelerate
    from peft.tuners.adalora import AdaLoraModel
    from torch.optim.optimizer import register_optimizer_step_post_hook

    from budgetune.adalora.lean_step import LeanAdaLoraModel
    from budgetune.training.train import train

    rec: dict = {"events": [], "micro": 0, "calls": [], "reads": 0, "owners": set()}
    # Both peft's class and budgetune's lean subclass (the default; it overrides both methods without calling
    # peft's), each wrapper calling its own class's original: whichever the run uses is recorded, once.
    originals = {cls: (cls.update_and_allocate, cls.forward) for cls in (AdaLoraModel, LeanAdaLoraModel)}
    original_sched = torch.optim.lr_scheduler.LambdaLR.step

    def owner(self) -> type:
        return LeanAdaLoraModel if isinstance(self, LeanAdaLoraModel) else AdaLoraModel

    def update_and_allocate(self, global_step):
        lora = [p for n, p in self.model.named_parameters() if p.requires_grad and "lora_" in n]
        grads = bool(lora) and all(p.grad is not None for p in lora)
        rec["calls"].append((global_step, grads, rec["micro"]))
        rec["events"].append("ual")
        rec["owners"].add(owner(self).__name__)
        return originals[owner(self)][0](self, global_step)

    def forward(self, *args, **kwargs):
        if self.model.training:
            rec["micro"] += 1
        return originals[owner(self)][1](self, *args, **kwargs)

    def sched_step(self, *args, **kwargs):
        rec["events"].append("sched")
        return original_sched(self, *args, **kwargs)

    def skipped(self):
        rec["reads"] += 1
        return rec["reads"] - 1 == skip_step

    for cls in originals:
        monkeypatch.setattr(cls, "update_and_allocate", update_and_allocate)
        monkeypatch.setattr(cls, "forward", forward)
    monkeypatch.setattr(torch.optim.lr_scheduler.LambdaLR, "step", sched_step)
    if skip_step is not None:
        monkeypatch.setattr(accelerate.Accelerator, "optimizer_step_was_skipped", property(skipped))
    handle = register_optimizer_step_post_hook(lambda opt, args, kwargs: rec["events"].append("opt"))
    train_file, val_file = data
    cfg = resolve(None, [
        "--model_name_or_path", str(tiny_roberta), "--dataset_name", str(train_file), "--validation_file",
        str(val_file), "--label_names", "World,Sports,Business,Sci/Tech", "--output_dir", str(out),
        "--method", "adalora", "--rank", "4", "--target_r", "2", "--target_modules", "query,value",
        "--tinit", "2", "--tfinal", "2", "--deltaT", "1", "--per_device_train_batch_size", str(BATCH),
        "--gradient_accumulation_steps", str(accumulation), "--num_train_epochs", str(epochs),
        "--max_seq_length", "32", "--learning_rate", "5e-3", "--early_stopping_patience", "null",
        "--logging_steps", "1", "--cache_dir", str(out.parent / "cache"), "--seed", "3"])
    _reset_accelerate()
    try:
        train(cfg)
    finally:
        handle.remove()
        _reset_accelerate()
    # Scheduler steps before the first optimizer step are its construction (LambdaLR steps once in __init__).
    first = rec["events"].index("opt")
    rec["events"] = rec["events"][first:]
    rec["adapter_config"] = json.loads((out / "adapter" / "adapter_config.json").read_text())
    return rec


def per_step(events: list[str]) -> list[list[str]]:
    """What happened after each optimizer step, up to the next one."""
    steps: list[list[str]] = []
    for e in events:
        if e == "opt":
            steps.append([])
        else:
            steps[-1].append(e)
    return steps


def expected_total_step(accumulation: int, epochs: int) -> int:
    batches = math.ceil(N_TRAIN / BATCH)
    return math.ceil(batches / accumulation) * epochs


def assert_once_per_optimizer_step(rec: dict, total: int) -> None:
    """total_step saved; after each optimizer.step: scheduler, then update_and_allocate, once, with gradients and
    consecutive 0-based steps."""
    assert rec["adapter_config"]["total_step"] == total
    steps = per_step(rec["events"])
    assert len(steps) == total
    assert all(s == ["sched", "ual"] for s in steps), steps  # after optimizer.step, in this order, once
    assert [c[0] for c in rec["calls"]] == list(range(total))
    assert all(c[1] for c in rec["calls"]), "update_and_allocate ran after zero_grad: no gradients"


def test_update_and_allocate_once_per_optimizer_step_with_gradients(monkeypatch, tiny_roberta, small_data, tmp_path):
    rec = train_recorded(monkeypatch, tiny_roberta, small_data, tmp_path / "run", accumulation=1, epochs=1)
    total = expected_total_step(1, 1)
    assert total == 7
    assert_once_per_optimizer_step(rec, total)
    assert [c[2] for c in rec["calls"]] == list(range(1, total + 1))
    assert rec["owners"] == {"LeanAdaLoraModel"}  # train's default AdaLoRA step


def test_gradient_accumulation_calls_once_per_two_micro_batches(monkeypatch, tiny_roberta, small_data, tmp_path):
    rec = train_recorded(monkeypatch, tiny_roberta, small_data, tmp_path / "run", accumulation=2, epochs=2)
    total = expected_total_step(2, 2)
    assert total == 8
    assert_once_per_optimizer_step(rec, total)
    # 7 micro-batches an epoch: steps of 2, 2, 2 and a last partial one of 1, twice.
    batches = math.ceil(N_TRAIN / BATCH)
    per_epoch = [min(2, batches - i) for i in range(0, batches, 2)]
    cumulative, n = [], 0
    for size in per_epoch * 2:
        n += size
        cumulative.append(n)
    assert [c[2] for c in rec["calls"]] == cumulative
    assert rec["micro"] == 2 * batches


def test_skipped_optimizer_step_advances_neither_allocator_nor_scheduler(monkeypatch, tiny_roberta, small_data,
                                                                          tmp_path):
    skip = 3
    rec = train_recorded(monkeypatch, tiny_roberta, small_data, tmp_path / "run", accumulation=1, epochs=1,
                         skip_step=skip)
    total = expected_total_step(1, 1)
    steps = per_step(rec["events"])
    assert len(steps) == total
    assert rec["reads"] == total  # the flag is read once per optimizer step
    assert steps[skip] == [], steps
    assert all(s == ["sched", "ual"] for i, s in enumerate(steps) if i != skip), steps
    assert [c[0] for c in rec["calls"]] == [s for s in range(total) if s != skip]
    assert all(c[1] for c in rec["calls"])


# ---------------------------------------------------------------- the shipped adapter: the final rank pattern

# 64 rows in batches of 8, 3 epochs: 24 optimizer steps; warm-up to step 5, pruning to step 17, final from 18.
SHIPPED_FLAGS = {"max_train_samples": 64, "per_device_train_batch_size": 8, "num_train_epochs": 3, "tinit": 4,
                 "deltaT": 2, "target_r": 2, "eval_strategy": "steps", "robust_tolerance": "null"}


def shipped_ranks(run: Path) -> int:
    """Ranks the saved adapter file keeps (the rows of its lora_E tensors)."""
    tensors = load_file(str(run / "adapter" / "adapter_model.safetensors"))
    return sum(v.shape[0] for k, v in tensors.items() if ".lora_E" in k)


def test_the_best_adapter_comes_from_the_final_rank_pattern(tiny_roberta, tmp_path):
    """Validations every 2 steps from warm-up on; patience 1: the shipped adapter has the final pattern's
    target_r ranks, early stopping did not end the run before that pattern, and budget.json says what shipped."""
    out = tmp_path / "run"
    run_cli(*tiny_train_args(tiny_roberta, "builtin:headlines", out, "adalora", tfinal=7, eval_steps=2,
                             early_stopping_patience=1, **SHIPPED_FLAGS))
    events = read_jsonl(out / "metrics.jsonl")
    evals = [e for e in events if e["event"] == "eval"]
    assert evals[0]["step"] == 2 and evals[-1]["step"] >= 18  # validated in warm-up, stopped only in the final phase
    target = 2 * 2 * 2  # target_r x (query, value) x 2 layers
    best_step = [e for e in events if e["event"] == "end"][0]["best_step"]
    assert shipped_ranks(out) == target, f"shipped the adapter of step {best_step}"
    assert best_step >= 18 and all(not e["best"] for e in evals if e["step"] < 18)
    best = torch.load(out / "best_state.pt", map_location="cpu")
    assert best["metrics"]["step"] == best_step and sum(sum(m) for m in best["rank_pattern"].values()) == target
    shipped = json.loads((out / "budget.json").read_text())["adalora_shipped"]
    assert shipped == {"step": best_step, "ranks": target, "target_ranks": target, "final_rank_pattern": True}


def test_without_a_final_phase_the_last_validation_ships_and_says_so(tiny_roberta, tmp_path):
    """--tfinal 0 never fixes the pattern: the last validation's adapter ships, in one line and in budget.json."""
    out = tmp_path / "run"
    proc = run_cli(*tiny_train_args(tiny_roberta, "builtin:headlines", out, "adalora", tfinal=0, eval_steps=4,
                                    **SHIPPED_FLAGS))
    events = read_jsonl(out / "metrics.jsonl")
    assert [e["step"] for e in events if e["event"] == "eval"] == [4, 8, 12, 16, 20, 24]
    assert [e for e in events if e["event"] == "end"][0]["best_step"] == 24
    shipped = json.loads((out / "budget.json").read_text())["adalora_shipped"]
    assert shipped["step"] == 24 and shipped["final_rank_pattern"] is False
    assert shipped["ranks"] == shipped_ranks(out) and shipped["target_ranks"] == 8
    lines = [line for line in proc.stdout.splitlines() if "no validation had the final rank pattern" in line]
    assert lines == [shipped["note"]] and "step 24" in lines[0] and "--tfinal 0" in lines[0]


def test_the_schedule_line_never_names_an_empty_range():
    """A final phase of one step: the pattern is fixed by the last allocation, and the line says so (it used to
    read 'final steps 14-13')."""
    from budgetune.adalora.phases import Schedule

    line = Schedule(total_step=13, tinit=0, tfinal=1, deltaT=10).describe()
    assert "14-13" not in line and "fixed by step 13's allocation" in line
    assert "final steps 14-24" in Schedule(total_step=24, tinit=2, tfinal=12, deltaT=1).describe()
