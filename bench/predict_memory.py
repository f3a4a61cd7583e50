"""Peak memory of `budgetune predict` as the input file grows (a benchmark, not a test).

    python bench/predict_memory.py                      # 10k and 30k rows: about 3 minutes on 2 CPU cores
    python bench/predict_memory.py --sizes 10000,1000000

Builds a tiny random RoBERTa (tiny_models, as the tests do) and a throwaway LoRA adapter for it in a temp dir, writes
CSV files of short texts, and runs `python -m budgetune predict` on each in a fresh subprocess; the peak resident
set size of that subprocess (getrusage RUSAGE_CHILDREN, measured from a fresh parent per size) is printed per size.
Flat peaks mean prediction streams; peaks that grow with the rows mean something holds the whole file.
"""

from __future__ import annotations

import argparse
import csv
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))  # test scaffolding (tiny models, graph_tape)

ROOT = Path(__file__).resolve().parents[1]
WORDS = ("stocks rally as markets rise team wins final election results storm hits coast new phone launch "
         "oil prices fall court rules on merger scientists find water on mars league cup injury update").split()

MEASURE = """
import resource, subprocess, sys
rc = subprocess.run(sys.argv[1:], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
if rc.returncode:
    sys.stderr.write(rc.stderr[-3000:])
    raise SystemExit(rc.returncode)
print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)  # KiB on Linux
"""


def env() -> dict:
    return {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "PYTHONPATH": str(ROOT / "src")}


def tiny_model(folder: Path) -> Path:
    from tiny_models import tiny_roberta

    folder.mkdir(parents=True)
    return tiny_roberta(folder, [" ".join(WORDS)] * 20, vocab_size=300, min_frequency=1)


def write_csv(path: Path, n: int, labels: bool) -> None:
    rng = random.Random(n)
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["label", "text"] if labels else ["text"])
        for i in range(n):
            text = " ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 12)))
            w.writerow([i % 4, text] if labels else [text])


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", default="10000,30000", help="comma-separated row counts")
    p.add_argument("--batch_size", type=int, default=256)
    a = p.parse_args()
    sizes = [int(s) for s in a.sizes.split(",") if s]
    with tempfile.TemporaryDirectory(prefix="budgetune-bench-") as tmp:
        tmp = Path(tmp)
        model = tiny_model(tmp / "model")
        train = tmp / "train.csv"
        write_csv(train, 400, labels=True)
        run = tmp / "run"
        subprocess.run([sys.executable, "-m", "budgetune", "train", "--model_name_or_path", str(model),
                        "--dataset_name", str(train), "--output_dir", str(run), "--method", "lora", "--rank", "2",
                        "--target_modules", "query,value", "--max_steps", "2", "--max_seq_length", "16",
                        "--cache_dir", str(tmp / "cache")],
                       check=True, env=env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        print(f"{'rows':>10}  {'file MB':>8}  {'peak RSS MB':>11}  {'seconds':>8}")
        for n in sizes:
            data = tmp / f"texts-{n}.csv"
            write_csv(data, n, labels=False)
            cmd = [sys.executable, "-m", "budgetune", "predict", str(run), "--input", str(data), "--output",
                   str(tmp / f"sub-{n}.csv"), "--per_device_eval_batch_size", str(a.batch_size)]
            t0 = time.perf_counter()
            out = subprocess.run([sys.executable, "-c", MEASURE, *cmd], env=env(),
                                 capture_output=True, text=True)
            if out.returncode:
                print(out.stderr, file=sys.stderr)
                return out.returncode
            peak_mb = int(out.stdout.split()[-1]) / 1024
            print(f"{n:>10}  {data.stat().st_size / 2**20:>8.1f}  {peak_mb:>11.0f}  {time.perf_counter() - t0:>8.1f}",
                  flush=True)
            data.unlink()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
