"""Metrics of a saved adapter on labelled files, at one adapter scale or several."""

from __future__ import annotations

from pathlib import Path

from budgetune import fileio, tasks
from budgetune.data import readers as data_lib
from budgetune.errors import AdapterError
from budgetune.inference.loading import bundle_info, bundle_task, bundle_thresholds, load_for_inference
from budgetune.inference.runner import require_finite, table_logits
from budgetune.metrics import comparison_text, paired_comparison


def labelled_table(info: dict, data_file: str, *, split: str = "test", text_column: str | None = None,
                   label_column: str | None = None, text_pair_column: str | None = None,
                   label_delimiter: str | None = None) -> data_lib.TextTable:
    """A labelled file read as the bundle's task reads it: its labels (regression: its target column, unless
    label_column says otherwise), its text pair column and label delimiter unless given here."""
    task = bundle_task(info)
    regression = task == tasks.REGRESSION
    return data_lib.load_table(data_file, split=split, text_column=text_column, task=task,
                               label_column=label_column or (",".join(info["label_names"]) if regression else None),
                               label_names=None if regression else info["label_names"],
                               text_pair_column=text_pair_column or info.get("text_pair_column_name"),
                               label_delimiter=label_delimiter or info.get("label_delimiter"))


def evaluate(run: str | Path, data_file: str, *, split: str = "test", text_column: str | None = None,
             label_column: str | None = None, batch_size: int = 256, output: str | None = None,
             cache_dir: str | None = None, adapter_scale: float | None = None, text_pair_column: str | None = None,
             label_delimiter: str | None = None, precision: str = "auto") -> dict:
    """The task's metrics of the saved adapter on a labelled file (single-label: accuracy, macro-F1, per-class
    scores and confusion matrix; multi-label at the bundle's thresholds; regression).

    adapter_scale: None applies the bundle's recorded default (1 when it has none). precision: auto, fp32, bf16 or
    int8 (inference.precisions).
    """
    info = bundle_info(run)
    table = labelled_table(info, data_file, split=split, text_column=text_column, label_column=label_column,
                           text_pair_column=text_pair_column, label_delimiter=label_delimiter)
    accelerator, model, tokenizer, info = load_for_inference(run, adapter_scale=adapter_scale, precision=precision,
                                                             cache_dir=cache_dir)
    logits = table_logits(model, tokenizer, table, accelerator, batch_size, info["max_seq_length"], cache_dir)
    require_finite(logits, data_file, info["precision"]["precision"])
    m = file_metrics(table, logits, info)
    m["adapter_scale"], m["precision"] = info["applied_adapter_scale"], info["precision"]["precision"]
    if accelerator.is_main_process:
        stem = Path(output) if output else Path(run) / f"evaluation-{Path(data_file).stem}"
        title = f"{data_file} (adapter scale {m['adapter_scale']:g})"
        text = tasks.metrics_text(bundle_task(info), m, title)
        fileio.atomic_write_json(stem.with_suffix(".json"), m)
        fileio.atomic_write_text(stem.with_suffix(".txt"), text)
        print(text, end="")
    return m


def compare(run_a: str | Path, run_b: str | Path, data_file: str, *, split: str = "test",
            text_column: str | None = None, label_column: str | None = None, batch_size: int = 256,
            output: str | None = None, cache_dir: str | None = None, precision: str = "auto",
            text_pair_column: str | None = None) -> dict:
    """Two runs on the same labelled file, each at its bundle's adapter scale and reading the rows as it was
    trained to (a pair run: with its text pair column): their metrics, the accuracy difference A - B with a paired
    bootstrap interval, and McNemar's exact test (metrics.paired_comparison). Written to OUTPUT.{json,txt}
    (default RUN_A/evaluation-compare-STEM)."""
    info_a, info_b = bundle_info(run_a), bundle_info(run_b)
    names, names_b = info_a["label_names"], info_b["label_names"]
    for run, info in ((run_a, info_a), (run_b, info_b)):
        if bundle_task(info) != tasks.SINGLE_LABEL:
            raise AdapterError(f"--compare: {run} is a {bundle_task(info)} model; --compare compares the accuracies "
                               "of two single_label runs")
    if names_b != names:
        raise AdapterError(f"--compare: {run_b} has the labels {names_b}, {run_a} has {names}; runs compared on one "
                           "file must share their label names")
    preds, models, tables = [], [], {}
    for run, info in ((run_a, info_a), (run_b, info_b)):  # the same rows and labels; each run's own text pairs
        pairs = text_pair_column or info.get("text_pair_column_name")
        if pairs not in tables:  # the file is read once when both runs read it alike
            tables[pairs] = labelled_table(info, data_file, split=split, text_column=text_column,
                                           label_column=label_column, text_pair_column=pairs)
        table = tables[pairs]
        accelerator, model, tokenizer, info = load_for_inference(run, precision=precision, cache_dir=cache_dir)
        logits = table_logits(model, tokenizer, table, accelerator, batch_size, info["max_seq_length"], cache_dir)
        require_finite(logits, f"{data_file} by {run}", info["precision"]["precision"])
        preds.append(logits.argmax(-1))
        models.append({"run": str(run), "adapter_scale": info["applied_adapter_scale"],
                       "precision": info["precision"]["precision"],
                       **file_metrics(table, logits, info)})
        del model
    report = {"data_file": str(data_file), "a": models[0], "b": models[1],
              "comparison": paired_comparison(table.labels, preds[0], preds[1])}
    if accelerator.is_main_process:
        stem = Path(output) if output else Path(run_a) / f"evaluation-compare-{Path(data_file).stem}"
        text = comparison_text(report["comparison"], *(describe(m) for m in models), str(data_file))
        fileio.atomic_write_json(stem.with_suffix(".json"), report)
        fileio.atomic_write_text(stem.with_suffix(".txt"), text)
        print(text, end="")
    return report


def describe(model: dict) -> str:
    """A compared run as the report names it: its folder, adapter scale and the precision it computed in."""
    return f"{model['run']} (adapter scale {model['adapter_scale']:g}, {model['precision']})"


def file_metrics(table: data_lib.TextTable, logits, info: dict) -> dict:
    """The bundle's task's metrics of logits on a labelled table (multi-label at the bundle's thresholds)."""
    m = tasks.task_metrics(bundle_task(info), logits, table.labels, info["label_names"], bundle_thresholds(info))
    m["data_file"] = str(table.source)
    return m


def evaluate_scales(run: str | Path, data_files: list[str], scales: list[float], *, split: str = "test",
                    text_column: str | None = None, label_column: str | None = None, batch_size: int = 256,
                    output: str | None = None, cache_dir: str | None = None, text_pair_column: str | None = None,
                    label_delimiter: str | None = None, precision: str = "auto") -> dict:
    """Every file at every adapter scale: one table (printed, STEM.txt), STEM.json and the plot STEM.png.

    STEM defaults to RUN/evaluation-scales. Every input is read before any model work, so a bad file costs nothing.
    The model is loaded once per scale: a bf16 or int8 model cannot be re-merged at another scale exactly.
    """
    info = bundle_info(run)
    tables = [labelled_table(info, f, split=split, text_column=text_column, label_column=label_column,
                             text_pair_column=text_pair_column, label_delimiter=label_delimiter) for f in data_files]
    results = []
    for s in scales:
        accelerator, model, tokenizer, info = load_for_inference(run, adapter_scale=s, precision=precision,
                                                                 cache_dir=cache_dir)
        for f, table in zip(data_files, tables):
            logits = table_logits(model, tokenizer, table, accelerator, batch_size, info["max_seq_length"],
                                  cache_dir, desc=f"scale {s:g}")
            require_finite(logits, f"{f} at adapter scale {s:g}", info["precision"]["precision"])
            results.append({"adapter_scale": s, **file_metrics(table, logits, info), "data_file": str(f)})
        del model
    report = {"run": str(run), "task": bundle_task(info), "data_files": [str(f) for f in data_files],
              "adapter_scales": scales,
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


TABLE_METRICS = {tasks.SINGLE_LABEL: ("accuracy", "macro_f1"), tasks.MULTI_LABEL: ("micro_f1", "macro_f1"),
                 tasks.REGRESSION: ("pearson", "mse")}
SHOWN = {"accuracy": "accuracy", "macro_f1": "macro-F1", "micro_f1": "micro-F1", "pearson": "Pearson", "mse": "MSE"}


def shown_value(metric: str, value: float) -> str:
    """A fraction as a percentage, a correlation to 4 places, an error to 4 significant digits."""
    return f"{value:.2%}" if metric.endswith(("accuracy", "f1")) else f"{value:.4f}" if metric == "pearson" \
        else f"{value:.4g}"


def scale_table(report: dict) -> str:
    """A Markdown table: one row per scale, the task's two main metrics per file (single-label: accuracy and
    macro-F1)."""
    files, (a, b) = report["data_files"], TABLE_METRICS[report.get("task", tasks.SINGLE_LABEL)]
    by = {(r["data_file"], r["adapter_scale"]): r for r in report["results"]}
    head = "| adapter scale | " + " | ".join(f"{Path(f).name} {SHOWN[a]} | {Path(f).name} {SHOWN[b]}" for f in files)
    lines = [head + " |", "| ---: |" + " ---: | ---: |" * len(files)]
    for s in report["adapter_scales"]:
        cells = [f"{shown_value(a, by[f, s][a])} | {shown_value(b, by[f, s][b])}" for f in files]
        lines.append(f"| {s:g} | " + " | ".join(cells) + " |")
    rows = ", ".join(f"{Path(f).name}: {by[f, report['adapter_scales'][0]]['n']} rows" for f in files)
    return "\n".join(lines) + f"\n\n({rows})\n"


def plot_scales(report: dict, path: Path) -> Path:
    """Accuracy against adapter scale, one line per file."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6.5, 4.2))
    ax = fig.subplots()
    metric = tasks.SCALE_METRIC[report.get("task", tasks.SINGLE_LABEL)]
    for f in report["data_files"]:
        pts = sorted((r["adapter_scale"], r[metric] * 100) for r in report["results"] if r["data_file"] == f)
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=Path(f).name)
    if report.get("bundle_adapter_scale") is not None:
        ax.axvline(report["bundle_adapter_scale"], color="grey", linestyle="--", linewidth=1,
                   label=f"recorded default ({report['bundle_adapter_scale']:g})")
    ax.set(xlabel="adapter scale (0 = pretrained, 1 = as trained)", ylabel=f"{SHOWN[metric]} (%)",
           title=f"{SHOWN[metric][0].upper()}{SHOWN[metric][1:]} against adapter scale")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    with fileio.atomic_path(path) as tmp, open(tmp, "wb") as fh:
        fig.savefig(fh, format="png", dpi=110, bbox_inches="tight")
    return path
