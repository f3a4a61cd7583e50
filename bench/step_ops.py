"""Operators dispatched and host synchronisations in ONE training step, stock peft loop vs budgetune's, on CPU.

    OMP_NUM_THREADS=1 python bench/step_ops.py            # roberta-base and MiniLM shapes, batch 32 x 64: ~2 min
    python bench/step_ops.py --models minilm --batch 4    # quicker (the counts do not depend on the batch)
    python bench/step_ops.py --bf16 --batch 8             # forward under bf16 autocast, dtype casts counted

Per-step overhead, not arithmetic, bounds an AdaLoRA step on a GPU (issue 13); the number of operators a step
dispatches is that overhead's measure, and it can be counted on any machine. Models have random weights:
roberta-base = transformers' RobertaConfig defaults (12 layers, hidden 768); MiniLM = a BertConfig of 6 layers,
hidden 384 (all-MiniLM-L6-v2's shapes). Both with a 4-label head, fp32, train mode (dropout on).

Methods (both on query and value): AdaLoRA as the seed recipe (init_r 8, target_r 4, alpha 16, dropout 0.1,
orth_reg_weight 0.5, tinit 200, tfinal 1000, deltaT 10, total_step 22,500) and LoRA r 8, alpha 16, dropout 0.1.

Paths:
* peft: the loop of peft's documentation: `loss = model(**batch).loss; loss.backward(); optimizer.step();
  model.base_model.update_and_allocate(step); optimizer.zero_grad()`, torch's default AdamW.
* budgetune: the model, optimizer and scheduler built by budgetune (`modeling.methods.wrap`,
  `training.train.prepare_adalora`, `training.train.make_optimizer`), stepped in `training.train.train_step`'s order
  (forward, backward, gradient clipping, optimizer, scheduler, AdaLoRA's allocation, zero_grad), without
  accelerate's wrappers. AdaLoRA steps through `budgetune.adalora.lean_step` (the default); "budgetune, peft step" is
  the same with `--lean_adalora false`.
* budgetune, graphs: `--cuda_graphs true` (fp32 only): `training.graphs.StepGraphs` replays the captured forward,
  backward, clipping and AdamW, then scheduler, allocation and zero_grad run as `training.train.train_step` runs them
  after a replay. On CPU the graph is `tests/graph_tape.py`'s stand-in; its replay runs outside the counter and counts
  as one operator (the one graph launch it is on a GPU); the row "replay" also holds the copies of the batch into the
  graph's inputs and of the loss and grad norm out of it. Capture (once per batch shape) is not counted.

What is counted, per phase:
* ops: every call reaching `torch.utils._python_dispatch.TorchDispatchMode` (ATen operators below autograd,
  so backward's operators count too; views and in-place operators count as one each).
* syncs: reads of device values by the host: `aten._local_scalar_dense` (`.item()`, `bool()`, `int()`, `float()`
  of a tensor) plus Python calls of `Tensor.tolist`, `Tensor.cpu` and `Tensor.numpy` (which do not dispatch).
* h2d: tensors built from host data (`aten.lift_fresh`: `torch.tensor(list)`, `torch.Tensor(list)`); on a GPU each
  is a host-to-device copy.
On CPU every tensor is on the host, so these count what would be a sync or a copy on a GPU, with one exception:
torch's AdamW without `capturable` keeps its `step` counters on the host and reads them (`.item()`) once per
parameter each step; those reads appear under "optimizer" but are no device sync on a GPU. The one read under
"forward" is transformers' SDPA mask check (`padding_mask.all()`, to drop the mask of an unpadded batch). Each path is stepped
once, uncounted, before counting: optimizer and allocator state are created once per run, not per step.

--bf16: the forward runs under `torch.autocast("cpu", dtype=torch.bfloat16)` (what accelerate does under
`--mixed_precision bf16`), and the table adds the dtype casts (`aten._to_copy`) of forward and backward. The paths
are then peft, "budgetune, autocast casts" (`--frozen_in_compute_dtype false`: the frozen base stays fp32 and
autocast casts it on every forward) and budgetune (the default: frozen base Linear weights stored in bf16 once).

AdaLoRA's allocation differs by step: a normal pruning step (205: sensitivities updated), a masking step (210:
the budget mask too) and a final-phase step (21,501: the fixed rank pattern re-applied). The masking and final rows
reuse the normal step's forward/backward/optimizer counts and count the allocation alone, after an uncounted
forward/backward on a small batch (the allocator needs gradients; its operators do not depend on the batch).
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import os
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))  # test scaffolding (tiny models, graph_tape)

TOTAL_STEP, TINIT, TFINAL, DELTA_T = 22_500, 200, 1000, 10
NORMAL_STEP, MASK_STEP = 205, 210
FIX_STEP = TOTAL_STEP - TFINAL  # the step that fixes the rank pattern
FINAL_STEP = FIX_STEP + 1
PHASES = ("replay", "forward", "backward", "optimizer", "allocate", "zero_grad")
SYNC_METHODS = ("tolist", "cpu", "numpy")


@dataclass
class Counts:
    ops: Counter = field(default_factory=Counter)
    syncs: Counter = field(default_factory=Counter)
    h2d: Counter = field(default_factory=Counter)
    casts: Counter = field(default_factory=Counter)


class OpCounter(TorchDispatchMode):
    """Counts dispatched operators, host reads and host-built tensors under the current phase's name."""

    def __init__(self, counts: Counts):
        super().__init__()
        self.counts, self.phase = counts, "other"

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.counts.ops[self.phase] += 1
        if func is torch.ops.aten._local_scalar_dense.default:
            self.counts.syncs[self.phase] += 1
        elif func is torch.ops.aten.lift_fresh.default:
            self.counts.h2d[self.phase] += 1
        elif func is torch.ops.aten._to_copy.default:  # autocast's casts (and any other dtype/device copy)
            self.counts.casts[self.phase] += 1
        return func(*args, **(kwargs or {}))


@contextmanager
def counting(counts: Counts) -> Iterator[OpCounter]:
    """The dispatch mode plus Tensor.tolist/cpu/numpy wrapped to count host reads (they bypass the dispatcher)."""
    mode = OpCounter(counts)
    originals = {name: getattr(torch.Tensor, name) for name in SYNC_METHODS}

    def wrap(name: str, method: Callable) -> Callable:
        def counted(self, *args, **kwargs):
            counts.syncs[mode.phase] += 1
            return method(self, *args, **kwargs)
        return counted

    for name, method in originals.items():
        setattr(torch.Tensor, name, wrap(name, method))
    try:
        with mode:
            yield mode
    finally:
        for name, method in originals.items():
            setattr(torch.Tensor, name, method)


def hf_config(model: str):
    from transformers import BertConfig, RobertaConfig

    if model == "roberta-base":
        return RobertaConfig(num_labels=4)
    return BertConfig(num_hidden_layers=6, hidden_size=384, num_attention_heads=12, intermediate_size=1536,
                      num_labels=4)


def base_model(model: str):
    from transformers import AutoModelForSequenceClassification

    torch.manual_seed(0)
    return AutoModelForSequenceClassification.from_config(hf_config(model), attn_implementation="sdpa")


def budgetune_flags(method: str) -> list[str]:
    flags = ["--method", method, "--rank", "8", "--lora_alpha", "16", "--lora_dropout", "0.1",
             "--target_modules", "query,value", "--learning_rate", "2e-4", "--weight_decay", "0.0"]
    if method == "adalora":
        flags += ["--target_r", "4", "--tinit", str(TINIT), "--tfinal", str(TFINAL), "--deltaT", str(DELTA_T),
                  "--orth_reg_weight", "0.5"]
    return flags


def peft_config(method: str):
    import peft

    common = {"task_type": peft.TaskType.SEQ_CLS, "target_modules": ["query", "value"], "lora_alpha": 16,
              "lora_dropout": 0.1}
    if method == "adalora":
        return peft.AdaLoraConfig(init_r=8, target_r=4, tinit=TINIT, tfinal=TFINAL, deltaT=DELTA_T,
                                  orth_reg_weight=0.5, total_step=TOTAL_STEP, **common)
    return peft.LoraConfig(r=8, **common)


@dataclass
class Stepper:
    """A model with its optimizer and the calls of one training step, split into phases."""

    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    clip: float
    after_optimizer: Callable[[], None]
    allocate: Callable[[int], None] | None
    bf16: bool = False

    def step(self, batch: dict, global_step: int, mode: OpCounter | None) -> None:
        def phase(name: str) -> None:
            if mode is not None:
                mode.phase = name

        phase("forward")
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=self.bf16):
            loss = self.model(**batch).loss
        phase("backward")
        loss.backward()
        phase("optimizer")
        if self.clip > 0:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.clip)
        self.optimizer.step()
        self.after_optimizer()
        phase("allocate")
        if self.allocate is not None:
            self.allocate(global_step)
        phase("zero_grad")
        self.optimizer.zero_grad(set_to_none=True)
        phase("other")


@dataclass
class GraphStepper(Stepper):
    """budgetune's step under --cuda_graphs: graphs.StepGraphs replays the captured forward, backward, clipping
    and AdamW (graph_tape's CPU stand-in; the replay counts as the one launch it is on a GPU), then the scheduler,
    the allocation and zero_grad run eagerly, as train.train_step does after a replay."""

    graphs: object = None

    def step(self, batch: dict, global_step: int, mode: OpCounter | None) -> None:
        from torch.utils._python_dispatch import _disable_current_modes

        from budgetune.training import graphs

        if mode is not None and graphs.shape_key(batch) not in self.graphs.graphs:
            with _disable_current_modes():  # capturing is once per shape, not per step
                self.graphs.graphs[graphs.shape_key(batch)] = self.graphs.capture(batch)
        if mode is not None:
            mode.phase = "replay"
        with replay_uncounted(self.graphs, mode) if mode is not None else contextlib.nullcontext():
            self.graphs.step(batch)
        if mode is not None:
            mode.phase = "optimizer"
        self.after_optimizer()
        if mode is not None:
            mode.phase = "allocate"
        if self.allocate is not None:
            self.graphs.expose_grads()
            self.allocate(global_step)
        if mode is not None:
            mode.phase = "zero_grad"
        self.optimizer.zero_grad(set_to_none=True)
        if mode is not None:
            mode.phase = "other"


@contextmanager
def replay_uncounted(step_graphs, mode: OpCounter) -> Iterator[None]:
    """Inside, a tape replay dispatches its operators outside the counter and counts as one operator."""
    from torch.utils._python_dispatch import _disable_current_modes

    originals = {id(c.graph): c.graph.replay for c in step_graphs.graphs.values() if c is not None}

    def launch(graph):
        def replay() -> None:
            with _disable_current_modes():
                originals[id(graph)]()
            mode.counts.ops[mode.phase] += 1
        return replay

    for c in step_graphs.graphs.values():
        if c is not None:
            c.graph.replay = launch(c.graph)
    try:
        yield
    finally:
        for c in step_graphs.graphs.values():
            if c is not None:
                c.graph.replay = originals[id(c.graph)]


def stock_peft(model_name: str, method: str, bf16: bool = False) -> Stepper:
    import peft

    model = peft.get_peft_model(base_model(model_name), peft_config(method))
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-4)
    allocate = model.base_model.update_and_allocate if method == "adalora" else None
    return Stepper(model, optimizer, 0.0, lambda: None, allocate, bf16)


def budgetune_path(model_name: str, method: str, lean: bool = True, bf16: bool = False,
                   frozen_bf16: bool = True, cuda_graphs: bool = False) -> Stepper:
    import graph_tape

    from budgetune.config import resolve
    from budgetune.hardware import precision
    from budgetune.modeling import methods
    from budgetune.training import graphs, train

    cfg = resolve(None, budgetune_flags(method) + ["--lean_adalora", str(lean).lower(),
                                                   "--frozen_in_compute_dtype", str(frozen_bf16).lower(),
                                                   "--cuda_graphs", str(cuda_graphs).lower(),
                                                   "--pad_to_buckets", "6" if cuda_graphs else "0"])
    model = methods.wrap(cfg, base_model(model_name), TOTAL_STEP, [])
    train.prepare_adalora(cfg, model)  # as train.setup does
    precision.store_frozen_in(model, precision.compute_dtype("bf16" if bf16 else "no",
                                                             cfg.train.frozen_in_compute_dtype))
    model.train()
    optimizer, scheduler = train.make_optimizer(cfg, model, TOTAL_STEP, torch.device("cpu"))
    allocate = model.base_model.update_and_allocate if method == "adalora" else None
    if cuda_graphs:
        step_graphs = graphs.StepGraphs(model, optimizer, cfg.train.max_grad_norm, full_batch=None,
                                        backend=graph_tape.TapeBackend())
        return GraphStepper(model, optimizer, cfg.train.max_grad_norm, scheduler.step, allocate, bf16, step_graphs)
    return Stepper(model, optimizer, cfg.train.max_grad_norm, scheduler.step, allocate, bf16)


def make_batch(model_name: str, batch: int, tokens: int) -> dict:
    vocab = hf_config(model_name).vocab_size
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(5, vocab, (batch, tokens), generator=g)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": torch.randint(0, 4, (batch,),
                                                                                                generator=g)}


def measure(stepper: Stepper, batch: dict, small: dict, method: str) -> dict[str, Counts]:
    """Counts of a whole normal step and, for AdaLoRA, of the allocation alone on a masking and a final step."""
    out = {"normal": Counts()}
    stepper.step(small, 0, None)  # uncounted: the optimizer's and the allocator's state are created once
    with counting(out["normal"]) as mode:
        stepper.step(batch, NORMAL_STEP, mode)
    if method != "adalora":
        return out
    for row, step in (("masking", MASK_STEP), ("fix", FIX_STEP), ("final", FINAL_STEP)):
        counts = Counts()
        allocate, stepper.allocate = stepper.allocate, None
        stepper.step(small, step, None)  # uncounted: gradients for the allocator, then zero_grad ...
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=stepper.bf16):
            loss = stepper.model(**small).loss
        loss.backward()  # ... so gradients again
        stepper.allocate = allocate
        with counting(counts) as mode:
            mode.phase = "allocate"
            allocate(step)
        stepper.optimizer.zero_grad(set_to_none=True)
        out[row] = counts
    return out


def row_totals(normal: Counts, alloc: Counts | None) -> tuple[int, int, int]:
    """ops/syncs/h2d of a step: the normal step's, with its allocation replaced by `alloc` when given."""
    def total(c: Counter, a: Counter | None) -> int:
        return sum(c.values()) - (c["allocate"] if a is not None else 0) + (a["allocate"] if a is not None else 0)
    return (total(normal.ops, alloc and alloc.ops), total(normal.syncs, alloc and alloc.syncs),
            total(normal.h2d, alloc and alloc.h2d))


def table(model_name: str, method: str, results: dict[str, dict[str, Counts]], casts: bool = False) -> list[str]:
    paths = list(results)
    width = max(24, max(len(p) for p in paths) + 2)
    head = f"{'':<26}" + "".join(f"{p:>{width}}" for p in paths)
    lines = [f"{model_name}, {method}: operators dispatched (host syncs / host-built tensors)", head]

    def cell(ops: int, syncs: int, h2d: int) -> str:
        return f"{ops:>8,} ({syncs:>3} / {h2d:>3})".rjust(width)

    for ph in PHASES:
        lines.append(f"  {ph:<24}" + "".join(cell(r["normal"].ops[ph], r["normal"].syncs[ph], r["normal"].h2d[ph])
                                             for r in results.values()))
    lines.append(f"  {'step total (normal)':<24}" + "".join(cell(*row_totals(r["normal"], None))
                                                           for r in results.values()))
    if casts:  # under bf16 autocast
        for ph in ("forward", "backward"):
            lines.append(f"  {ph + ' dtype casts':<24}" + "".join(f"{r['normal'].casts[ph]:>{width},}"
                                                                 for r in results.values()))
    if method == "adalora":
        for row, label in (("masking", f"masking step {MASK_STEP}"), ("fix", f"fixing step {FIX_STEP}"),
                           ("final", f"final step {FINAL_STEP}")):
            lines.append(f"  {'  allocate, ' + label:<24}" + "".join(
                cell(r[row].ops["allocate"], r[row].syncs["allocate"], r[row].h2d["allocate"])
                for r in results.values()))
            lines.append(f"  {'step total, ' + row:<24}" + "".join(cell(*row_totals(r["normal"], r[row]))
                                                                  for r in results.values()))
    return lines


def paths_for(method: str, bf16: bool) -> list[tuple[str, Callable[[str, str], Stepper]]]:
    """The compared paths: fp32 adds budgetune with peft's AdaLoRA step; bf16 budgetune with autocast's casts."""
    if bf16:
        return [("peft", lambda m, me: stock_peft(m, me, bf16=True)),
                ("budgetune, autocast casts", lambda m, me: budgetune_path(m, me, bf16=True, frozen_bf16=False)),
                ("budgetune", lambda m, me: budgetune_path(m, me, bf16=True))]
    paths = [("peft", stock_peft), ("budgetune", budgetune_path),
             ("budgetune, graphs", lambda m, me: budgetune_path(m, me, cuda_graphs=True))]
    if method == "adalora":
        paths.insert(1, ("budgetune, peft step", lambda m, me: budgetune_path(m, me, lean=False)))
    return paths


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", default="roberta-base,minilm")
    ap.add_argument("--methods", default="adalora,lora")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--out", type=Path, default=None, help="also write the report here")
    ap.add_argument("--bf16", action="store_true", help="forward under bf16 autocast; count the dtype casts")
    args = ap.parse_args(argv)
    torch.set_num_threads(max(1, int(os.environ.get("OMP_NUM_THREADS", "1"))))
    precision = "bf16 autocast" if args.bf16 else "fp32"
    lines = [f"bench/step_ops.py: one training step, batch {args.batch} x {args.tokens} tokens, {precision} CPU, "
             f"torch {torch.__version__}", ""]
    start = time.perf_counter()
    for model_name in args.models.split(","):
        batch, small = make_batch(model_name, args.batch, args.tokens), make_batch(model_name, 2, 8)
        for method in args.methods.split(","):
            results = {}
            paths = paths_for(method, args.bf16)
            for path, build in paths:
                results[path] = measure(build(model_name, method), batch, small, method)
                gc.collect()  # peft models hold reference cycles; a tape holds every tensor of its step
            block = table(model_name, method, results, casts=args.bf16)
            print("\n".join(block), flush=True)
            lines += block + [""]
    lines.append(f"({time.perf_counter() - start:.0f} s)")
    print(lines[-1])
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
