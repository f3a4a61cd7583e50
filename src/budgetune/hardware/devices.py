"""Where the numbers are computed: the accelerate Accelerator, the precision (detected from the hardware) and the
CPU batch cap."""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from budgetune.errors import ConfigError

PRECISION_ENV = "BUDGETUNE_MIXED_PRECISION"  # overrides what `auto` picks: auto, fp32 (= no), bf16, fp16
PRECISIONS = ("auto", "no", "bf16", "fp16")  # accelerate's names; "no" computes in fp32
# torch.cpu.get_capabilities() keys of native bf16 matrix instructions, best first, with the names printed
CPU_BF16_KEYS = (("amx_bf16", "AMX-BF16"), ("avx512_bf16", "AVX512-BF16"))


@dataclass(frozen=True)
class Precision:
    """What a run or an inference computes in (accelerate's mixed_precision value) and why it was chosen."""

    mixed_precision: str  # no, bf16 or fp16
    reason: str
    int8: bool = False  # inference only: the encoder's Linear layers quantized to int8 (mixed_precision "no")

    @property
    def name(self) -> str:
        if self.int8:
            return "int8"
        return "fp32" if self.mixed_precision == "no" else self.mixed_precision

    def line(self) -> str:
        """The one line a run or an inference verb prints before it computes."""
        return f"precision {self.name}: {self.reason}"

    def to_dict(self) -> dict[str, str]:
        return {"precision": self.name, "mixed_precision": self.mixed_precision, "reason": self.reason}


def cpu_capabilities() -> dict:
    """The CPU's instruction sets as torch detects them at run time (cpuinfo), not from the CPU's model name."""
    probe = getattr(torch.cpu, "get_capabilities", None)
    if probe is not None:
        return dict(probe())
    # torch before get_capabilities has only these two probes (AMX's tile unit implies its bf16 instructions)
    found = {}
    for key, fn in (("amx_bf16", "_is_amx_tile_supported"), ("avx512_bf16", "_is_avx512_bf16_supported")):
        found[key] = bool(getattr(torch.cpu, fn, lambda: False)())
    return found


def cpu_bf16_instructions() -> str | None:
    """The CPU's native bf16 matrix instructions (AMX-BF16, else AVX512-BF16), or None: bf16 would be emulated."""
    caps = cpu_capabilities()
    return next((name for key, name in CPU_BF16_KEYS if caps.get(key)), None)


def default_device_type() -> str:
    """The device accelerate will compute on: the accelerator torch sees (cuda, ...), else cpu."""
    dev = getattr(torch, "accelerator", None)
    found = dev.current_accelerator() if dev is not None and dev.is_available() else None
    if found is None and torch.cuda.is_available():  # torch before torch.accelerator
        return "cuda"
    return found.type if found is not None else "cpu"


def resolve_precision(choice: str = "auto", device_type: str | None = None) -> Precision:
    """The precision to compute in on `device_type` (default: the one accelerate will use), and why.

    `choice` is --mixed_precision (auto, no, bf16, fp16). auto: the environment's override
    (BUDGETUNE_MIXED_PRECISION), else what the hardware computes fastest: bf16 on a GPU that has it (else fp16),
    bf16 on a CPU with native bf16 matrix instructions (AMX or AVX512-BF16), fp32 on other CPUs.
    """
    device_type = device_type or default_device_type()
    why = f"--mixed_precision {choice}"
    if choice == "auto":
        choice, why = forced_precision()
        if choice == "auto":
            return auto_precision(device_type)
    if device_type == "cpu" and choice == "fp16":  # accelerate does not autocast fp16 on CPU
        return Precision("no", f"{why}, but there is no fp16 autocast on CPU: fp32")
    if device_type == "cpu" and choice == "bf16" and cpu_bf16_instructions() is None:
        return Precision("bf16", f"{why} (this CPU has no native bf16 matrix instructions: emulated, slower)")
    return Precision(choice, why)


def forced_precision() -> tuple[str, str]:
    """(choice, why) from BUDGETUNE_MIXED_PRECISION (fp32 is a synonym of no); ("auto", "") when unset."""
    value = os.environ.get(PRECISION_ENV, "").strip().lower()
    if value in ("", "auto"):
        return "auto", ""
    choice = "no" if value == "fp32" else value
    if choice not in PRECISIONS:
        raise ConfigError(f"environment variable {PRECISION_ENV}={value!r}: must be one of auto, fp32 (or no), "
                          "bf16, fp16")
    return choice, f"auto, set by {PRECISION_ENV}={value}"


def auto_precision(device_type: str) -> Precision:
    """What `auto` picks from the hardware alone."""
    if device_type == "cuda":
        if torch.cuda.is_bf16_supported():
            return Precision("bf16", "auto: the GPU computes in bf16")
        return Precision("fp16", "auto: the GPU has no bf16, so fp16")
    if device_type != "cpu":
        return Precision("no", f"auto: fp32 on {device_type}")
    if (isa := cpu_bf16_instructions()) is not None:
        return Precision("bf16", f"auto: the CPU has native bf16 matrix instructions ({isa})")
    return Precision("no", "auto: the CPU has no native bf16 matrix instructions (AMX or AVX512-BF16), so "
                           "bf16 would be emulated and slower")


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
