"""Accuracy on real AG News: train the packaged MiniLM on ../shared/data/ag_news/train.csv, print validation accuracy.

    python bench/accuracy.py                       # budgetune's default adapter, 1 epoch, 10% held out
    python bench/accuracy.py --test-file agnews_test.csv   # also score any AG News CSV (either layout)
    python bench/accuracy.py -- --method adalora --rank 8 --target_modules query,value   # any train flags

The validation split is carved from train.csv (stratified, seeded); the test file, if given, is only scored.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_TRAIN = ROOT.parent / "shared" / "data" / "ag_news" / "train.csv"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--train-file", default=str(DEFAULT_TRAIN))
    p.add_argument("--test-file", help="an AG News CSV with labels (label,text with 0..3, or the original layout)")
    p.add_argument("--config", default=str(ROOT / "configs" / "minilm_agnews.yaml"))
    p.add_argument("--output-dir", default="runs/bench_accuracy")
    p.add_argument("train_flags", nargs="*", help="extra `budgetune train` flags after --")
    a = p.parse_args()
    if not Path(a.train_file).exists():
        print(f"skipped: {a.train_file} not found (it comes from ../shared/data; see its README)")
        return 0
    from budgetune.config import resolve
    from budgetune.training.train import train

    flags = ["--dataset_name", a.train_file, "--output_dir", a.output_dir, "--overwrite_output_dir", "true"]
    if a.test_file:
        flags += ["--test_file", a.test_file]
    cfg = resolve(a.config, flags + a.train_flags)
    t0 = time.perf_counter()
    result = train(cfg)
    minutes = (time.perf_counter() - t0) / 60
    budget = json.loads((Path(a.output_dir) / "budget.json").read_text())
    print("\n| model | method | trainable | validation accuracy | macro-F1 | minutes |")
    print("| --- | --- | --- | --- | --- | --- |")
    print(f"| {cfg.model.model_name_or_path} | {cfg.method.method} r{cfg.method.rank} on {cfg.method.target_modules}, "
          f"head {cfg.model.head} | {budget['total_trainable']:,} | {result['validation']['accuracy']:.4f} | "
          f"{result['validation']['macro_f1']:.4f} | {minutes:.1f} |")
    test = Path(a.output_dir) / "evaluation_test.json"
    if a.test_file and test.exists():
        print(f"test accuracy ({a.test_file}): {json.loads(test.read_text())['accuracy']:.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
