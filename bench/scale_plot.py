"""Issue 15's picture and table: accuracy against adapter scale, shifted_dev and validation, for measured runs.

    python bench/scale_plot.py OUT.png NAME=RUN:SHIFTED.json:VALIDATION.json [NAME=...]

RUN/evaluation.json holds the validation accuracies the run's own automatic choice computed (0.5 ... 1) and the
chosen scale; the two JSON files are `budgetune evaluate RUN --adapter_scale ... --output STEM` reports (the
validation one for the scales the run did not compute). Prints one Markdown table per run.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from matplotlib.figure import Figure


def accuracies(report: Path) -> dict[float, float]:
    return {r["adapter_scale"]: r["accuracy"] for r in json.loads(report.read_text())["results"]}


def main(out: str, specs: list[str]) -> None:
    fig = Figure(figsize=(7, 4.5))
    ax = fig.subplots()
    for spec in specs:
        name, paths = spec.split("=", 1)
        run, shifted_json, validation_json = (Path(p) for p in paths.split(":"))
        evaluation = json.loads((run / "evaluation.json").read_text())
        validation = {float(s): a for s, a in evaluation["adapter_scale_validation"].items()}
        validation.update(accuracies(validation_json))
        shifted, chosen = accuracies(shifted_json), evaluation["adapter_scale"]
        print(f"\n{name} (automatic choice: {chosen:g})\n\n| adapter scale | shifted_dev.csv | validation |\n| ---: | ---: | ---: |")
        for s in sorted(shifted):
            mark = " (chosen)" if s == chosen else ""
            val = f"{validation[s]:.2%}" if s in validation else "-"
            print(f"| {s:g}{mark} | {shifted[s]:.2%} | {val} |")
        for label, table, style in (("shifted_dev", shifted, "-o"), ("validation", validation, "--s")):
            xs = sorted(table)
            ax.plot(xs, [table[x] * 100 for x in xs], style, label=f"{name}: {label}")
        ax.axvline(chosen, color="grey", lw=0.6)
    ax.set(xlabel="adapter scale (0 = pretrained MiniLM + trained head, 1 = as trained)", ylabel="accuracy (%)",
           ylim=(80, 92.5), title="Adapter scale: AG News validation vs shifted text")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=110)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2:])
