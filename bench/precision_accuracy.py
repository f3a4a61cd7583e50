"""bf16 against fp32 on real AG News: the default recipe, a few seeds, each seed trained in both precisions.

    python bench/precision_accuracy.py                              # 3 seeds x {fp32, bf16}, 3,200 rows, 500 validation
    python bench/precision_accuracy.py --seeds 1,2,3,4,5 --train-rows 6400 --out report.md

Every run is `python -m budgetune train --config configs/minilm_agnews.yaml --max_train_samples N
--max_eval_samples M --seed S --mixed_precision P` in its own process, one after another (fp32 = `no`; bf16 = `bf16`,
what `auto` picks on a CPU with native bf16 matrix instructions; each run's header line says what it computed in).
A seed fixes the validation split, the head's initialisation, dropout and batch order, so the two precisions of one
seed see the same data: the paired difference isolates precision, the spread over seeds is run-to-run variation.
Reported per run: the best validation accuracy of the loop (step 100 of 100 here), the saved adapter's accuracy
at its chosen scale (what predict loads), and the median of the logging windows' training samples/s.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data" / "ag_news" / "train.csv"
PRECISIONS = {"fp32": "no", "bf16": "bf16"}


def command(a, seed: int, precision: str, out: Path) -> list[str]:
    return [sys.executable, "-m", "budgetune", "train", "--config", "configs/minilm_agnews.yaml", "--dataset_name",
            str(DATA), "--max_train_samples", str(a.train_rows), "--max_eval_samples", str(a.eval_rows), "--seed",
            str(seed), "--mixed_precision", PRECISIONS[precision], "--output_dir", str(out),
            "--overwrite_output_dir", "true"]


def one_run(a, seed: int, precision: str) -> dict:
    out = Path(a.work) / f"{precision}-seed{seed}"
    cmd = command(a, seed, precision, out)
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} exited {proc.returncode}:\n{proc.stderr[-3000:]}")
    events = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
    evaluation = json.loads((out / "evaluation.json").read_text())
    rates = [e["samples_per_second"] for e in events if e["event"] == "train"][1:]  # the first window warms up
    return {"seed": seed, "precision": precision, "header": proc.stdout.splitlines()[0],
            "computed": next(e["precision"] for e in events if e["event"] == "precision"),
            "best": max(e["eval_accuracy"] for e in events if e["event"] == "eval"),
            "saved": evaluation["accuracy"], "scale": evaluation["adapter_scale"],
            "samples_per_second": statistics.median(rates), "command": "python " + " ".join(cmd[1:])}


def spread(xs: list[float]) -> str:
    sd = statistics.stdev(xs) if len(xs) > 1 else 0.0
    return f"{statistics.mean(xs):.4f} ± {sd:.4f} (min {min(xs):.4f}, max {max(xs):.4f})"


def report(a, runs: list[dict]) -> str:
    lines = [f"# bf16 vs fp32 on real AG News ({a.train_rows} training rows, {a.eval_rows} validation rows)", "",
             f"machine: {os.cpu_count()} CPU(s), OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}; "
             f"command: python bench/precision_accuracy.py --seeds {a.seeds} --train-rows {a.train_rows} "
             f"--eval-rows {a.eval_rows}", "",
             "| seed | precision | computed in (metrics.jsonl) | best validation accuracy | saved adapter accuracy "
             "(scale) | training samples/s (median window) |", "|---|---|---|---|---|---|"]
    for r in runs:
        lines.append(f"| {r['seed']} | {r['precision']} | {r['computed']} | {r['best']:.4f} | {r['saved']:.4f} "
                     f"({r['scale']:g}) | {r['samples_per_second']:.1f} |")
    lines.append("")
    by = {(r["seed"], r["precision"]): r for r in runs}
    seeds = sorted({r["seed"] for r in runs})
    for key, label in (("best", "best validation accuracy"), ("saved", "saved adapter accuracy")):
        for p in PRECISIONS:
            lines.append(f"- {label}, {p}: {spread([by[s, p][key] for s in seeds])}")
        diffs = [by[s, "bf16"][key] - by[s, "fp32"][key] for s in seeds]
        lines.append(f"- {label}, bf16 - fp32 of the same seed: {spread(diffs)}")
    speed = [by[s, "bf16"]["samples_per_second"] / by[s, "fp32"]["samples_per_second"] for s in seeds]
    lines += [f"- training samples/s, bf16 / fp32 of the same seed: {', '.join(f'{x:.2f}x' for x in speed)}", "",
              "headers (first line of each run):"] + [f"    {r['precision']} seed {r['seed']}: {r['header']}"
                                                      for r in runs]
    lines += ["", "commands:"] + [f"    {r['command']}" for r in runs]
    return "\n".join(lines) + "\n"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seeds", default="1,2,3")
    p.add_argument("--train-rows", type=int, default=3200)
    p.add_argument("--eval-rows", type=int, default=500)
    p.add_argument("--work", default="runs/precision_accuracy", help="run folders (default runs/precision_accuracy)")
    p.add_argument("--out", help="also write the report here")
    a = p.parse_args()
    if not DATA.is_file():
        print(f"skipped: {DATA} not found (AG News train.csv comes from ../shared/data/ag_news)")
        return 0
    runs = []
    for seed in (int(s) for s in a.seeds.split(",")):
        for precision in PRECISIONS:  # fp32 then bf16 of the same seed: both see the machine's load of the moment
            runs.append(one_run(a, seed, precision))
            r = runs[-1]
            print(f"seed {seed} {precision}: best {r['best']:.4f}, saved {r['saved']:.4f}, "
                  f"{r['samples_per_second']:.1f} samples/s", flush=True)
    text = report(a, runs)
    print(text)
    if a.out:
        Path(a.out).write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
