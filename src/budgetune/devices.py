"""Where the numbers are computed: the accelerate Accelerator, mixed precision and the CPU batch cap."""

from __future__ import annotations

import os

import torch


def mixed_precision(choice: str) -> str:
    """`auto` -> bf16 on a GPU that has it, else fp16 on a GPU, none on CPU."""
    if choice != "auto":
        return choice
    if torch.cuda.is_available():
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return "no"


def make_accelerator(**kwargs):
    """An Accelerator that joins the launcher's process group on CPU-only machines too.

    Under torchrun, accelerate only forms a (gloo) group on CPU when asked for cpu=True; without it every process
    would silently run alone on all the data. A launch of several processes that did not form a group is an error.
    """
    from accelerate import Accelerator

    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and "cpu" not in kwargs:
        dev = getattr(torch, "accelerator", None)
        kwargs["cpu"] = not (dev.is_available() if dev is not None else torch.cuda.is_available())
    accelerator = Accelerator(**kwargs)
    if accelerator.num_processes != world:
        raise RuntimeError(f"launched as {world} processes (WORLD_SIZE) but accelerate formed a group of "
                           f"{accelerator.num_processes}; check the launcher and `accelerate config`")
    return accelerator


def is_main_process() -> bool:
    """Outside a training run (which has its accelerator): whether this process writes the shared files."""
    return int(os.environ.get("RANK", "0")) == 0


def release_accelerator() -> None:
    """Forget accelerate's process-wide state, so the next train() or predict() in this process starts clean.

    AcceleratorState and GradientState are shared singletons: without this, a second run in the same process
    inherits the first one's mixed precision and gradient accumulation (accelerate refuses to change them).
    """
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(reset_partial_state=False)
    GradientState._reset_state()


def settle_collectives(accelerator) -> None:
    """Before a multi-process run's model (and its DDP reducer) is freed: a barrier, then a pause without the GIL.

    gloo's worker threads free finished collectives (their tensors are Python objects, so freeing them takes the
    GIL) after the caller has its result; freeing the reducer with the GIL held joins those threads, and torch then
    deadlocks (seen in CI: test_distributed's two-process run hung at exit, one worker in ~ProcessGroupGloo).
    """
    import time

    if accelerator.num_processes > 1:
        accelerator.wait_for_everyone()
        time.sleep(0.2)  # sleeping releases the GIL: the worker threads finish freeing their collectives


# On CPU, batches of more padded tokens than this can run slower per token: the feed-forward's activations (tokens
# x 4 x hidden floats) no longer fit in the cache. bench/inference_parts.py on 2 cores, MiniLM, AG News: 0 to 17 %
# more texts/s than 256 texts per batch, run to run. A GPU wants the largest batch: no cap there.
CPU_BATCH_TOKENS = 2048


def token_cap(device) -> int | None:
    """Padded tokens per inference batch on this device (None: batch_size alone decides)."""
    return CPU_BATCH_TOKENS if torch.device(device).type == "cpu" else None
