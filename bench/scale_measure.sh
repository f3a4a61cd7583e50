#!/bin/bash
# Issue 15's measurement for one run folder: accuracy per adapter scale on shifted_dev.csv and on the run's own
# validation split, the plot, and what the automatic choice picks (chosen on validation only, never shifted_dev).
#   bash bench/scale_measure.sh RUN OUT_STEM
set -euo pipefail
RUN=$1 OUT=$2
PY=${PY:-.venv/bin/python}
SHIFTED=${SHIFTED:-/work/shared/data/nyu_dlsp25_proj2/shifted_dev.csv}
$PY bench/validation_split.py "$RUN" "$OUT-validation.csv"
$PY -m budgetune evaluate "$RUN" --data_file "$SHIFTED" --data_file "$OUT-validation.csv" \
    --adapter_scale 0,0.25,0.5,0.6,0.7,0.75,0.8,0.9,1 --output "$OUT"
$PY - "$OUT.json" <<'PYEOF'
import json, sys
from budgetune.modeling.scaling import AUTO_SCALES, choose_scale
r = json.load(open(sys.argv[1]))
val, shifted = r["data_files"][1], r["data_files"][0]
acc = {(x["data_file"], x["adapter_scale"]): x["accuracy"] for x in r["results"]}
table = {s: acc[val, s] for s in AUTO_SCALES}
for tol in (0.25, 0.5, 1.0):
    s = choose_scale(table, tol)
    print(f"tolerance {tol}: adapter_scale {s:g}: validation {acc[val, s]:.2%} ({(acc[val, s] - acc[val, 1.0]) * 100:+.2f}"
          f" points), shifted_dev {acc[shifted, s]:.2%} ({(acc[shifted, s] - acc[shifted, 1.0]) * 100:+.2f} points)")
PYEOF
