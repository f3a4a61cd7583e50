"""Where a CPU training step's time goes: torch.profiler over budgetune's own steps, per operator and per kind.

    OMP_NUM_THREADS=2 python bench/profile_step.py         # MiniLM: fp32, bf16, bf16 without attention dropout
    python bench/profile_step.py --variants bf16 --steps 10 --model packaged:all-mpnet-base-v2

budgetune.training.train.train(cfg) runs the default recipe's method (AdaLoRA init_r 8 -> target_r 4, alpha 16,
dropout 0.1, query+value; batch 32 of real AG News rows, dynamic padding, length-grouped batches) with
`train.mixed_precision` (and `model.attention_dropout`) set per variant in turn; `training.train.train_step` is
wrapped so that after --warmup steps the next --steps run under torch.profiler (CPU activity), and the run is
stopped there.

Printed per variant: ms per step, then the share of self CPU time by kind of operator (matrix work: mm, addmm,
bmm, linear's kernels, attention; dtype casts and copies; normalisation; activations and dropout; softmax; the
optimizer's foreach kernels; everything else) and the top operators by self CPU time (torch's key_averages table).
The kinds say how far the step is from matrix-bound: a step at the bf16 floor would be nearly all matrix work.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import speed  # noqa: E402  (bench/speed.py: the budgetune config of the speed benchmark, accelerate's reset)

KINDS = {  # first match wins: an operator's name (aten::...) containing one of these
    "matrix (mm, addmm, bmm, attention)": ("mm", "addmm", "bmm", "matmul", "linear", "attention", "mkldnn_",
                                           "onednn", "baddbmm"),
    "dtype casts and copies": ("_to_copy", "copy_", "to", "clone", "contiguous"),
    "layer norm": ("layer_norm",),
    "gelu, dropout, tanh": ("gelu", "dropout", "bernoulli", "tanh", "native_dropout"),
    "softmax": ("softmax",),
    "optimizer (foreach, adam)": ("_foreach", "adam", "lerp", "addcmul", "addcdiv", "sqrt"),
    "embedding": ("embedding",),
}


class StopProfile(Exception):
    """Raised once the profiled steps are done: the run stops right there."""


def kind_of(name: str) -> str:
    op = name.split("::")[-1]
    for kind, keys in KINDS.items():
        if any(op == k or op.startswith(k) or k in op for k in keys):
            return kind
    return "other (elementwise, indexing, views, autograd bookkeeping)"


def profile_run(a, variant: str, workdir: Path):
    """Profile `a.steps` budgetune training steps of `variant` (fp32 or bf16, optionally +attention_dropout=P) after
    `a.warmup`; returns (profiler, seconds per step)."""
    import torch

    from budgetune.training import train as train_lib

    speed.reset_accelerate()
    import dataclasses

    precision, _, attn = variant.partition("+attention_dropout=")
    cfg = speed.budgetune_cfg(a, Path(a.data_csv), workdir / variant, workdir / "cache", a.warmup + a.steps + 1)
    cfg = dataclasses.replace(cfg, train=dataclasses.replace(
        cfg.train, mixed_precision=precision if precision != "fp32" else "no"), model=dataclasses.replace(
        cfg.model, attention_dropout=float(attn) if attn else None))
    real_step, state = train_lib.train_step, {"n": 0, "prof": None, "t0": 0.0, "dt": 0.0}

    def profiled_step(run_, batch, steps_done):
        state["n"] += 1
        if state["n"] == a.warmup + 1:
            state["prof"] = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU])
            state["prof"].__enter__()
            state["t0"] = time.perf_counter()
        if state["n"] == a.warmup + a.steps + 1:
            state["dt"] = (time.perf_counter() - state["t0"]) / a.steps
            state["prof"].__exit__(None, None, None)
            raise StopProfile
        return real_step(run_, batch, steps_done)

    train_lib.train_step = profiled_step
    try:
        train_lib.train(cfg)
    except StopProfile:
        pass
    finally:
        train_lib.train_step = real_step
    return state["prof"], state["dt"]


def kind_shares(prof) -> list[tuple[str, float]]:
    totals: dict[str, float] = {}
    for e in prof.key_averages():
        totals[kind_of(e.key)] = totals.get(kind_of(e.key), 0.0) + e.self_cpu_time_total
    whole = sum(totals.values()) or 1.0
    return sorted(((k, v / whole) for k, v in totals.items()), key=lambda kv: -kv[1])


def report(variant: str, prof, dt: float, a) -> str:
    lines = [f"== {variant}: {dt * 1e3:.0f} ms per step of batch 32 ({32 / dt:.1f} samples/s while profiled)",
             "share of self CPU time by kind of operator:"]
    lines += [f"  {share:6.1%}  {kind}" for kind, share in kind_shares(prof)]
    lines.append(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=a.rows, max_name_column_width=40))
    return "\n".join(lines)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=speed.PACKAGED, help="model folder or packaged: name (default: MiniLM)")
    p.add_argument("--data_csv", default=str(speed.DEFAULT_DATA), help="AG News CSV (default: ../shared/data)")
    p.add_argument("--variants", default="fp32,bf16,bf16+attention_dropout=0",
                   help="comma-separated: fp32 or bf16, each optionally +attention_dropout=P (--attention_dropout P; "
                        "default: fp32,bf16,bf16+attention_dropout=0)")
    p.add_argument("--warmup", type=int, default=3, help="steps before profiling (default 3)")
    p.add_argument("--steps", type=int, default=8, help="profiled steps (default 8)")
    p.add_argument("--rows", type=int, default=25, help="operators in each table (default 25)")
    p.add_argument("--max_seq_length", type=int, default=256)
    p.add_argument("--out", help="also write the report here")
    return p.parse_args(argv)


def main(argv=None) -> int:
    import torch

    a = parse_args(argv)
    if not Path(a.data_csv).is_file():
        print(f"no data at {a.data_csv}: pass --data_csv", file=sys.stderr)
        return 2
    cap = torch.backends.cpu.get_cpu_capability()
    head = (f"bench/profile_step.py on {a.model}, torch {torch.__version__}, {torch.get_num_threads()} threads, "
            f"CPU capability {cap}; command: python bench/profile_step.py {' '.join(argv or sys.argv[1:])}")
    parts = [head]
    with tempfile.TemporaryDirectory() as tmp:
        for variant in a.variants.split(","):
            prof, dt = profile_run(a, variant.strip(), Path(tmp))
            parts.append(report(variant.strip(), prof, dt, a))
            print(parts[-1], flush=True)
    if a.out:
        Path(a.out).write_text("\n\n".join(parts) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
