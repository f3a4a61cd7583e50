"""The training step captured in CUDA graphs (`--cuda_graphs true`, issue 13 item 4).

On a GPU a roberta-base AdaLoRA step at batch 32 is bound by launching thousands of small kernels, not by their
arithmetic. A CUDA graph records the step's kernels once and replays them with one launch. What is captured, per
batch shape (with `--pad_to_buckets N` a run has at most N full-batch shapes):

    forward (under accelerate's autocast) -> backward -> gradient clipping -> AdamW step

The AdamW step is fused and capturable, with its learning rate a device tensor that the scheduler fills in place, so
a replay reads this step's rate; nothing in the captured region reads a value back to the host. Left eager, with
reasons:

* AdaLoRA's `update_and_allocate` after each replay: its phase (averages, masking every deltaT, fixed pattern)
  is chosen in Python from the step number. The lean allocator (adalora.lean_step) is a handful of `_foreach` kernels
  and reads the graph's gradients, which `expose_grads` hands to the parameters first.
* Batches of another shape (an epoch's short last batch): an ordinary step on the same parameters and optimizer.
* Validation: its own batches, in eval mode, eager.

Capturing a shape first runs `WARMUP_STEPS` ordinary steps on a side stream (lazy initialisation must not happen
inside a capture); the trainable weights, optimizer state and random state are saved before and put back after the
capture, in place, so the run trains exactly as if the first replay were its first step there. A capture that fails
(a host read in the step, an unsupported operator) leaves that shape eager, said in one line.

Graphs cannot be checked without a GPU; `graph_tape.TapeBackend` replays the recorded operators on CPU with the
same rules (only tensor operations re-run, a host read during capture fails) and tests/test_graphs.py trains with it
and without it to the same losses.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch

WARMUP_STEPS = 3  # as in PyTorch's whole-network capture example: lets lazy initialisation happen outside capture


def unsupported(cfg, accelerator, custom_loss: bool) -> str | None:
    """Why this run cannot capture its step (one line, naming the option), or None when it can."""
    t = cfg.train
    if (why := BACKEND.unavailable(accelerator.device)) is not None:
        return why
    if accelerator.num_processes > 1:
        return f"{accelerator.num_processes} processes: DDP's gradient all-reduce is not captured"
    if t.gradient_accumulation_steps > 1:
        return "--gradient_accumulation_steps > 1 is not captured"
    if accelerator.mixed_precision == "fp16":
        return "fp16's gradient scaler reads back whether a step overflowed; use --mixed_precision bf16"
    if custom_loss:
        return ("a custom training loss (distillation, soft labels, --class_weights, --label_smoothing_factor) is "
                "not captured")
    if t.optim not in ("adamw_torch", "adamw_torch_fused"):
        return f"--optim {t.optim} is not captured (AdamW only)"
    if t.lr_scheduler_type == "greedy":  # it assigns a float where the graph reads the learning rate tensor
        return "--lr_scheduler_type greedy replaces the learning rate a captured step reads"
    if t.torch_compile:
        return "--torch_compile is on; use one or the other"
    return None


class CudaBackend:
    """torch.cuda's graphs, streams and random state."""

    def unavailable(self, device: torch.device) -> str | None:
        return None if device.type == "cuda" else f"no CUDA device (training on {device.type})"

    def new_graph(self):
        return torch.cuda.CUDAGraph()

    @contextlib.contextmanager
    def capture(self, graph):
        """torch.cuda.graph, and the ambient stream back even when capture fails: torch.cuda.graph's exit ends the
        capture before it restores the stream, so a failed capture would leave the run on the capture stream."""
        ambient = torch.cuda.current_stream()
        try:
            # thread_local: the DataLoader's pin-memory thread may allocate while this thread captures
            with torch.cuda.graph(graph, capture_error_mode="thread_local"):
                yield
        finally:
            torch.cuda.set_stream(ambient)

    @contextlib.contextmanager
    def side_stream(self):
        stream, ambient = torch.cuda.Stream(), torch.cuda.current_stream()
        stream.wait_stream(ambient)
        try:
            with torch.cuda.stream(stream):
                yield
        finally:  # a failed warm-up too: what follows must not overtake its kernels
            ambient.wait_stream(stream)

    def settle(self) -> None:
        """Wait for everything queued (after a failed capture, before weights are put back)."""
        torch.cuda.synchronize()

    def rng_state(self):
        return torch.cuda.get_rng_state(), torch.get_rng_state()

    def set_rng_state(self, state) -> None:
        torch.cuda.set_rng_state(state[0])
        torch.set_rng_state(state[1])


BACKEND = CudaBackend()  # tests put graph_tape.TapeBackend() here to run the same code on CPU


@dataclass
class Captured:
    """One shape's graph: the static inputs it reads, the loss and norm it writes, the gradients it computes."""

    graph: object
    inputs: dict[str, torch.Tensor]
    loss: torch.Tensor
    grad_norm: torch.Tensor | None
    grads: list[torch.Tensor | None]


@dataclass
class Snapshot:
    params: list[torch.Tensor]
    optimizer: dict[torch.Tensor, dict[str, torch.Tensor]]
    rng: object


def shape_key(batch: dict[str, torch.Tensor]) -> tuple:
    return tuple((k, tuple(v.shape), v.dtype) for k, v in sorted(batch.items()))


class StepGraphs:
    """Captures the training step per full-batch shape and replays it; `step` returns None where it cannot."""

    def __init__(self, model, optimizer, max_grad_norm: float, full_batch: int | None, say=print, backend=None):
        """full_batch: capture only batches of this many rows (None: any)."""
        self.model, self.optimizer, self.max_grad_norm = model, optimizer, max_grad_norm
        self.params = [p for p in model.parameters() if p.requires_grad]  # model order, as accelerate clips
        self.full_batch, self.say, self.backend = full_batch, say, backend or BACKEND
        self.graphs: dict[tuple, Captured | None] = {}
        self.last: Captured | None = None
        self.replays = 0
        self.bound = self.addresses()

    def step(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor | None] | None:
        """Forward, backward, clipping and AdamW on `batch` by replaying its shape's graph (captured on first
        sight); (loss, grad norm) as fresh tensors, or None when this batch must take the eager step."""
        if self.full_batch is not None and batch["input_ids"].shape[0] != self.full_batch:
            return None  # an epoch's last, short batch: once per epoch, not worth a capture
        now = self.addresses()
        if len(now) != len(self.bound) or not all(a is b for a, b in zip(now, self.bound)):
            self.graphs.clear()  # a graph would read the freed learning rate or optimizer state: capture anew
            self.bound = now
        key = shape_key(batch)
        if key not in self.graphs:
            self.graphs[key] = self.capture(batch)
        captured = self.graphs[key]
        if captured is None:
            return None
        for name, value in batch.items():
            captured.inputs[name].copy_(value, non_blocking=True)
        captured.graph.replay()
        self.last, self.replays = captured, self.replays + 1
        # copies: the next replay overwrites the graph's own tensors, and the loop sums losses between log lines
        norm = captured.grad_norm.clone() if captured.grad_norm is not None else None
        return captured.loss.clone(), norm

    def summary(self) -> dict[str, int]:
        return {"captured": sum(c is not None for c in self.graphs.values()),
                "failed": sum(c is None for c in self.graphs.values()), "replays": self.replays}

    def addresses(self) -> tuple:
        """What the graphs read in place that an optimizer's load_state_dict would replace: its state mapping and
        its learning-rate tensors."""
        return (self.optimizer.state, *(group["lr"] for group in self.optimizer.param_groups))

    def expose_grads(self) -> None:
        """Point each parameter's .grad at the last replay's gradients (AdaLoRA's allocator reads them)."""
        for p, g in zip(self.params, self.last.grads):
            p.grad = g

    def body(self, inputs: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The captured step: what train.train_step does for one batch under accelerate, minus the bookkeeping."""
        loss = self.model(**inputs).loss
        loss.backward()
        norm = None
        if self.max_grad_norm > 0:  # as accelerate's clip_grad_norm_ (the same implementation, the same numbers)
            norm = torch.nn.utils.clip_grad_norm_(self.params, self.max_grad_norm)
        self.optimizer.step()
        return loss.detach(), norm

    def capture(self, batch: dict[str, torch.Tensor]) -> Captured | None:
        inputs = {name: value.clone() for name, value in batch.items()}  # the graph's static input buffers
        saved = self.snapshot()
        try:
            with self.backend.side_stream():
                for _ in range(WARMUP_STEPS):
                    self.optimizer.zero_grad(set_to_none=True)
                    self.body(inputs)
            self.optimizer.zero_grad(set_to_none=True)  # the capture's backward allocates its own gradients
            graph = self.backend.new_graph()
            with self.backend.capture(graph):
                loss, norm = self.body(inputs)
        except torch.cuda.OutOfMemoryError:
            raise  # as an eager step would: train's message says which flags to lower
        except RuntimeError as e:
            self.backend.settle()
            self.restore(saved)
            self.optimizer.zero_grad(set_to_none=True)
            cause = e.__context__ or e  # a failed capture's own error hides the operation that broke it
            first = str(cause).strip().splitlines()[0] if str(cause).strip() else type(cause).__name__
            self.say(f"--cuda_graphs: batches of shape {tuple(batch['input_ids'].shape)} train eagerly: "
                     f"capture failed ({first})")
            return None
        captured = Captured(graph, inputs, loss, norm, [p.grad for p in self.params])
        self.restore(saved)  # undo the warm-up steps: the first replay is the run's next step
        self.optimizer.zero_grad(set_to_none=True)  # eager steps must not add into the graph's gradients
        return captured

    def snapshot(self) -> Snapshot:
        with torch.no_grad():
            state = {p: {k: v.clone() for k, v in s.items() if torch.is_tensor(v)}
                     for p, s in self.optimizer.state.items()}
            return Snapshot([p.detach().clone() for p in self.params], state, self.backend.rng_state())

    def restore(self, saved: Snapshot) -> None:
        """Put weights, optimizer state and random state back in place (the graph holds their addresses).

        State the warm-up created (a fresh optimizer) goes back to AdamW's initial zeros."""
        with torch.no_grad():
            for p, value in zip(self.params, saved.params):
                p.copy_(value)
            for p, state in self.optimizer.state.items():
                old = saved.optimizer.get(p)
                for k, v in state.items():
                    if torch.is_tensor(v):
                        v.copy_(old[k]) if old is not None else v.zero_()
        self.backend.set_rng_state(saved.rng)


def lr_on_device(optimizer) -> None:
    """A tensor learning rate on its parameters' device (a restored optimizer state may bring it back on CPU)."""
    for group in optimizer.param_groups:
        lr, device = group["lr"], group["params"][0].device
        if torch.is_tensor(lr) and lr.device != device:
            group["lr"] = lr.to(device)
