"""Metrics of a saved adapter on labelled files, at one adapter scale or several."""

from __future__ import annotations

from pathlib import Path

from budgetune import fileio
from budgetune.data import readers as data_lib
from budgetune.errors import AdapterError
from budgetune.inference.loading import bundle_info, load_for_inference
from budgetune.inference.runner import table_logits
from budgetune.metrics import (
    classification_metrics,
    comparison_text,
    cross_entropy,
    metrics_text,
    paired_comparison,
)


def evaluate(run: str | Path, data_file: str, *, split: str = "test", text_column: str | None = None,
             label_column: str | None = None, batch_size: int = 256, output: str | None = None,
             cache_dir: str | None = None, adapter_scale: float | None = None, precision: str = "auto") -> dict:
    """Accuracy, macro-F1, per-class scores and confusion matrix of the saved adapter on a labelled file.

    adapter_scale: None applies the bundle's recorded default (1 when it has none). precision: auto, fp32, bf16 or
    int8 (inference.precisions).
    """
    names = bundle_info(run)["label_names"]
    table = data_lib.load_table(data_file, split=split, text_column=text_column, label_column=label_column,
                                label_names=names)
    accelerator, model, tokenizer, info = load_for_inference(run, adapter_scale=adapter_scale, precision=precision)
    logits = table_logits(model, tokenizer, table, accelerator, batch_size, info["max_seq_length"], cache_dir)
    m = file_metrics(table, logits, names)
    m["adapter_scale"], m["precision"] = info["applied_adapter_scale"], info["precision"]["precision"]
    if accelerator.is_main_process:
        stem = Path(output) if output else Path(run) / f"evaluation-{Path(data_file).stem}"
        title = f"{data_file} (adapter scale {m['adapter_scale']:g})"
        fileio.atomic_write_json(stem.with_suffix(".json"), m)
        fileio.atomic_write_text(stem.with_suffix(".txt"), metrics_text(m, title))
        print(metrics_text(m, title), end="")
    return m


def compare(run_a: str | Path, run_b: str | Path, data_file: str, *, split: str = "test",
            text_column: str | None = None, label_column: str | None = None, batch_size: int = 256,
            output: str | None = None, cache_dir: str | None = None, precision: str = "auto") -> dict:
    """Two runs on the same labelled file, each at its bundle's adapter scale: their metrics, the accuracy
    difference A - B with a paired bootstrap interval, and McNemar's exact test (metrics.paired_comparison).
    Written to OUTPUT.{json,txt} (default RUN_A/evaluation-compare-STEM)."""
    names, names_b = bundle_info(run_a)["label_names"], bundle_info(run_b)["label_names"]
    if names_b != names:
        raise AdapterError(f"--compare: {run_b} has the labels {names_b}, {run_a} has {names}; runs compared on one "
                           "file must share their label names")
    table = data_lib.load_table(data_file, split=split, text_column=text_column, label_column=label_column,
                                label_names=names)
    preds, models = [], []
    for run in (run_a, run_b):
        accelerator, model, tokenizer, info = load_for_inference(run, precision=precision)
        logits = table_logits(model, tokenizer, table, accelerator, batch_size, info["max_seq_length"], cache_dir)
        preds.append(logits.argmax(-1))
        models.append({"run": str(run), "adapter_scale": info["applied_adapter_scale"],
                       "precision": info["precision"]["precision"],
                       **file_metrics(table, logits, names)})
        del model
    report = {"data_file": str(data_file), "a": models[0], "b": models[1],
              "comparison": paired_comparison(table.labels, preds[0], preds[1])}
    if accelerator.is_main_process:
        stem = Path(output) if output else Path(run_a) / f"evaluation-compare-{Path(data_file).stem}"
        text = comparison_text(report["comparison"], str(run_a), str(run_b), str(data_file))
        fileio.atomic_write_json(stem.with_suffix(".json"), report)
        fileio.atomic_write_text(stem.with_suffix(".txt"), text)
        print(text, end="")
    return report


def file_metrics(table: data_lib.TextTable, logits, names: list[str]) -> dict:
    m = classification_metrics(table.labels, logits.argmax(-1), names)
    m["loss"] = cross_entropy(logits, table.labels)
    m["data_file"] = str(table.source)
    return m


def evaluate_scales(run: str | Path, data_files: list[str], scales: list[float], *, split: str = "test",
                    text_column: str | None = None, label_column: str | None = None, batch_size: int = 256,
                    output: str | None = None, cache_dir: str | None = None, precision: str = "auto") -> dict:
    """Every file at every adapter scale: one table (printed, STEM.txt), STEM.json and the plot STEM.png.

    STEM defaults to RUN/evaluation-scales. Every input is read before any model work, so a bad file costs nothing.
    The model is loaded once per scale: a bf16 or int8 model cannot be re-merged at another scale exactly.
    """
    names = bundle_info(run)["label_names"]
    tables = [data_lib.load_table(f, split=split, text_column=text_column, label_column=label_column,
                                  label_names=names) for f in data_files]
    results = []
    for s in scales:
        accelerator, model, tokenizer, info = load_for_inference(run, adapter_scale=s, precision=precision)
        for f, table in zip(data_files, tables):
            logits = table_logits(model, tokenizer, table, accelerator, batch_size, info["max_seq_length"],
                                  cache_dir, desc=f"scale {s:g}")
            results.append({"adapter_scale": s, **file_metrics(table, logits, names), "data_file": str(f)})
        del model
    report = {"run": str(run), "data_files": [str(f) for f in data_files], "adapter_scales": scales,
              "bundle_adapter_scale": info.get("adapter_scale"), "precision": info["precision"]["precision"],
              "results": results}
    if accelerator.is_main_process:
        stem = Path(output) if output else Path(run) / "evaluation-scales"
        text = scale_table(report)
        fileio.atomic_write_json(stem.with_suffix(".json"), report)
        fileio.atomic_write_text(stem.with_suffix(".txt"), text)
        plot_scales(report, stem.with_suffix(".png"))
        print(text, end="")
        print(f"wrote {stem.with_suffix('.json')}, {stem.with_suffix('.txt')}, {stem.with_suffix('.png')}")
    return report


def scale_table(report: dict) -> str:
    """A Markdown table: one row per scale, accuracy and macro-F1 per file."""
    files = report["data_files"]
    by = {(r["data_file"], r["adapter_scale"]): r for r in report["results"]}
    head = "| adapter scale | " + " | ".join(f"{Path(f).name} accuracy | {Path(f).name} macro-F1" for f in files)
    lines = [head + " |", "| ---: |" + " ---: | ---: |" * len(files)]
    for s in report["adapter_scales"]:
        cells = [f"{by[f, s]['accuracy']:.2%} | {by[f, s]['macro_f1']:.2%}" for f in files]
        lines.append(f"| {s:g} | " + " | ".join(cells) + " |")
    rows = ", ".join(f"{Path(f).name}: {by[f, report['adapter_scales'][0]]['n']} rows" for f in files)
    return "\n".join(lines) + f"\n\n({rows})\n"


def plot_scales(report: dict, path: Path) -> Path:
    """Accuracy against adapter scale, one line per file."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6.5, 4.2))
    ax = fig.subplots()
    for f in report["data_files"]:
        pts = sorted((r["adapter_scale"], r["accuracy"] * 100) for r in report["results"] if r["data_file"] == f)
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=Path(f).name)
    if report.get("bundle_adapter_scale") is not None:
        ax.axvline(report["bundle_adapter_scale"], color="grey", linestyle="--", linewidth=1,
                   label=f"recorded default ({report['bundle_adapter_scale']:g})")
    ax.set(xlabel="adapter scale (0 = pretrained, 1 = as trained)", ylabel="accuracy (%)",
           title="Accuracy against adapter scale")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    with fileio.atomic_path(path) as tmp, open(tmp, "wb") as fh:
        fig.savefig(fh, format="png", dpi=110, bbox_inches="tight")
    return path
