"""Write a run's validation split (carved from its training file exactly as `train` did) to a CSV (label,text).

    python bench/validation_split.py RUN OUT.csv

It reads RUN/config.yaml and calls splits.load_splits, so the rows are those the run validated (and chose) on.
"""

from __future__ import annotations

import csv
import sys
from pathlib import Path


def main(run: str, out: str) -> None:
    from budgetune.config import resolve
    from budgetune.data.splits import load_splits

    val = load_splits(resolve(str(Path(run) / "config.yaml"), [])).validation
    with open(out, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["label", "text"])
        w.writerows(zip(val.labels, val.texts))
    print(f"wrote {len(val.texts)} validation rows of {run} to {out}")


if __name__ == "__main__":
    main(*sys.argv[1:])
