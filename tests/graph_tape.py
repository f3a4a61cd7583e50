"""A CPU stand-in for CUDA graphs, so that graphs.StepGraphs can be tested on machines without a GPU.

`TapeGraph` records every operator a capture dispatches (below autograd, so the backward's and the optimizer's
operators too) and `replay` runs exactly those operators again on the same tensors, writing each result into the
tensor the capture produced. That is what a CUDA graph's replay does, and it has the same blind spots, which is the
point: Python between the operators does not run again (a learning rate passed as a float stays the captured
float), and a host read during capture (`.item()`, `bool(tensor)`) fails as it fails in a CUDA capture. Random
operators draw from the generator again on every replay, in the same order as eager steps would.

Unlike a CUDA capture, recording also executes the operators; StepGraphs restores weights, optimizer state and
random state after every capture, which makes the two equivalent.
"""

from __future__ import annotations

import contextlib

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

aten = torch.ops.aten
# Operators that read device values on the host on a GPU: scalars, and those whose output size depends on values.
HOST_READS = {aten._local_scalar_dense.default, aten.is_nonzero.default, aten.equal.default, aten.nonzero.default,
              aten.masked_select.default, aten._unique2.default, aten.unique_consecutive.default,
              aten.unique_dim.default}


def reads_host(func, args, kwargs) -> bool:
    if func in HOST_READS:
        return True
    if func is aten.repeat_interleave.Tensor:  # sizes its output from the repeats unless told
        return kwargs.get("output_size") is None
    if func in (aten.index.Tensor, aten.index_put.default, aten.index_put_.default):  # boolean-mask indexing
        indices = args[1] if len(args) > 1 else kwargs.get("indices", ())
        return any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in indices)
    return False


class Recorder(TorchDispatchMode):
    def __init__(self, ops: list):
        super().__init__()
        self.ops = ops

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if reads_host(func, args, kwargs):
            raise RuntimeError(f"operation not permitted when stream is capturing: {func} reads a value back "
                               "to the host")
        out = func(*args, **kwargs)
        if func.namespace != "profiler":  # record_function markers: not computation
            self.ops.append((func, args, kwargs, out))
        return out


class TapeGraph:
    def __init__(self):
        self.ops: list = []
        self.replays = 0

    def replay(self) -> None:
        self.replays += 1
        with torch.no_grad():
            for func, args, kwargs, out in self.ops:
                new = func(*args, **kwargs)
                for old, fresh in zip(tree_flatten(out)[0], tree_flatten(new)[0]):
                    if isinstance(old, torch.Tensor) and not same_memory(old, fresh):
                        old.copy_(fresh)


def same_memory(a: torch.Tensor, b: torch.Tensor) -> bool:
    """b is a, or a view of exactly a's elements (an in-place or view operator's result)."""
    return a is b or (a.data_ptr() == b.data_ptr() and a.shape == b.shape and a.stride() == b.stride())


class TapeBackend:
    """graphs.CudaBackend's interface on CPU: tape graphs, no streams, the CPU generator."""

    def __init__(self):
        self.graphs: list[TapeGraph] = []

    def unavailable(self, device) -> str | None:
        return None if device.type == "cpu" else f"the tape stands in for CUDA graphs on CPU only, not {device.type}"

    def new_graph(self) -> TapeGraph:
        self.graphs.append(TapeGraph())
        return self.graphs[-1]

    @contextlib.contextmanager
    def capture(self, graph: TapeGraph):
        """Record, with torch.cuda.is_current_stream_capturing() true as in a CUDA capture: libraries that look
        (transformers skips its all-tokens-real mask check, a host read) take their capture path."""
        real = torch.cuda.is_current_stream_capturing
        torch.cuda.is_current_stream_capturing = lambda: True
        try:
            with Recorder(graph.ops):
                yield
        finally:
            torch.cuda.is_current_stream_capturing = real

    def side_stream(self):
        return contextlib.nullcontext()

    def settle(self) -> None:
        pass  # CPU operators finish before they return

    def rng_state(self):
        return torch.get_rng_state()

    def set_rng_state(self, state) -> None:
        torch.set_rng_state(state)
