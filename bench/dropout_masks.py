"""What a dropout mask costs on this CPU, against the matrix multiply it sits beside, side by side in one process.

    OMP_NUM_THREADS=1 python bench/dropout_masks.py [--shape 32,64,1536] [--repeats 20]

A training step of the default MiniLM recipe draws about 32 dropout masks (the frozen encoder's hidden and attention
dropout, LoRA's input dropout, the head's): bench/results/cpu_profile_step_minilm.txt puts them at 29 % of a bf16
step. This compares, on one activation of a batch (32 texts x 64 tokens x MiniLM's FFN width by default):

* torch's dropout (`F.dropout`, what nn.Dropout runs: a Bernoulli draw into the activation's dtype, then a multiply),
* the draw alone into a bool mask (`bernoulli_`),
* other ways to draw the same mask: `torch.rand(...) < 1 - p`, and bytes `torch.randint(0, 256, ...)` compared with a
  threshold (p rounded to 1/256),
* an elementwise multiply and the Linear's matmul (the activation times a width x 384 weight), for scale.

Medians of `--repeats` calls, in ms, and each as a multiple of the matmul.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch


def timed(fn, repeats: int) -> float:
    fn()
    runs = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        runs.append(time.perf_counter() - start)
    return statistics.median(runs) * 1e3


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shape", default="32,64,1536", help="the activation's shape (default 32,64,1536)")
    p.add_argument("--p", type=float, default=0.1, help="dropout probability (default 0.1)")
    p.add_argument("--dtype", choices=["bf16", "fp32"], default="bf16")
    p.add_argument("--repeats", type=int, default=20)
    a = p.parse_args()
    shape = tuple(int(s) for s in a.shape.split(","))
    dtype = torch.bfloat16 if a.dtype == "bf16" else torch.float32
    torch.manual_seed(0)
    x = torch.randn(shape, dtype=dtype)
    w = torch.randn(shape[-1], 384, dtype=dtype)
    keep = 1 - a.p
    cases = {
        "matmul (activation @ width x 384)": lambda: x.reshape(-1, shape[-1]) @ w,
        "F.dropout (nn.Dropout)": lambda: torch.nn.functional.dropout(x, a.p, True),
        "bernoulli_ into a bool mask": lambda: torch.empty(shape, dtype=torch.bool).bernoulli_(keep),
        "torch.rand < 1 - p": lambda: torch.rand(shape) < keep,
        "torch.randint bytes >= 256 p": lambda: torch.randint(0, 256, shape, dtype=torch.uint8) >= round(256 * a.p),
        "elementwise multiply": lambda: x * x,
    }
    ms = {name: timed(fn, a.repeats) for name, fn in cases.items()}
    base = ms["matmul (activation @ width x 384)"]
    print(f"# {a.dtype} activation {shape}, p {a.p}, {torch.get_num_threads()} threads, torch {torch.__version__}, "
          f"medians of {a.repeats}")
    print("| operation | ms | x matmul |")
    print("| --- | ---: | ---: |")
    for name, t in ms.items():
        print(f"| {name} | {t:.2f} | {t / base:.2f} |")


if __name__ == "__main__":
    main()
