import json
import math

import matplotlib.image as mpimg
import numpy as np
import pytest

from budgetune.training.plots import plot_run, rank_matrix, read_metrics

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
PREFIX = "base_model.model.roberta.encoder.layer.{}.attention.self.{}"


def _rank_events():
    # Non-uniform pruning: layer 1 query drops fastest, layer 0 value keeps its full budget.
    schedule = {
        (0, "query"): [8, 7, 6, 6],
        (0, "value"): [8, 8, 8, 8],
        (1, "query"): [8, 5, 3, 2],
        (1, "value"): [8, 6, 6, 5],
    }
    events = []
    for j, step in enumerate([100, 200, 300, 400]):
        # Insertion order deliberately scrambled (layer 1 before layer 0, value before query).
        ranks = {PREFIX.format(layer, mod): schedule[(layer, mod)][j]
                 for layer, mod in [(1, "value"), (0, "value"), (1, "query"), (0, "query")]}
        events.append({"event": "ranks", "step": step, "ranks": ranks})
    return events


def _write_run(run, with_ranks=True, with_eval=True):
    run.mkdir(parents=True, exist_ok=True)
    events = []
    for step in range(1, 401):
        events.append({"event": "train", "step": step, "epoch": step / 100,
                       "loss": 1.4 * math.exp(-step / 120) + 0.1, "learning_rate": 2e-4 * (1 - step / 400)})
        if step % 100 == 0:
            events.append({"event": "eval", "step": step, "epoch": step / 100, "eval_loss": 0.6 - step / 2000,
                           "eval_accuracy": 0.7 + step / 2000, "eval_macro_f1": 0.68 + step / 2000})
    events.append({"event": "other", "note": "ignored"})
    if with_ranks:
        events.extend(_rank_events())
    (run / "metrics.jsonl").write_text("".join(json.dumps(e) + "\n" for e in events))
    if with_eval:
        (run / "evaluation.json").write_text(json.dumps({
            "accuracy": 0.9, "macro_f1": 0.89, "label_names": ["World", "Sports", "Business", "Sci/Tech"],
            "confusion_matrix": [[90, 3, 4, 3], [1, 97, 1, 1], [5, 2, 85, 8], [4, 1, 9, 86]],
            "per_class": {}}))
    return run


def _assert_png(path):
    data = path.read_bytes()
    assert len(data) > 0 and data[:8] == PNG_MAGIC
    img = mpimg.imread(path)
    assert img.ndim == 3 and img.shape[0] > 100 and img.shape[1] > 100 and img.shape[2] in (3, 4)


def test_plot_run_adalora_writes_all_plots(tmp_path):
    run = _write_run(tmp_path / "run")
    paths = plot_run(run)
    names = {p.name for p in paths}
    assert names == {"loss.png", "accuracy.png", "learning_rate.png", "ranks.png", "confusion_matrix.png"}
    for p in paths:
        assert p.parent == run / "plots"
        _assert_png(p)
    # Atomic writes leave no temp files behind.
    assert sorted(p.name for p in (run / "plots").iterdir()) == sorted(names)


def test_plot_run_lora_has_no_ranks_plot_and_honours_out_dir(tmp_path):
    run = _write_run(tmp_path / "run", with_ranks=False, with_eval=False)
    out = tmp_path / "elsewhere"
    paths = plot_run(run, out_dir=out)
    assert {p.name for p in paths} == {"loss.png", "accuracy.png", "learning_rate.png"}
    assert not (out / "ranks.png").exists() and not (out / "confusion_matrix.png").exists()
    assert not (run / "plots").exists()
    for p in paths:
        _assert_png(p)


def test_rank_matrix_labels_sorted_and_exact():
    labels, steps, matrix = rank_matrix(_rank_events() + [{"event": "train", "step": 5, "loss": 1.0}])
    assert labels == ["L0 query", "L0 value", "L1 query", "L1 value"]
    assert steps == [100, 200, 300, 400]
    np.testing.assert_array_equal(matrix, [[8, 7, 6, 6], [8, 8, 8, 8], [8, 5, 3, 2], [8, 6, 6, 5]])
    assert matrix.sum(axis=0).tolist() == [32, 26, 23, 21]


def test_rank_matrix_numeric_layer_order_and_ambiguous_names():
    ranks = {"m.layer.10.output.dense": 2, "m.layer.2.attention.output.dense": 3, "m.layer.2.output.dense": 4,
             "m.classifier.dense": 1}
    labels, steps, matrix = rank_matrix([{"event": "ranks", "step": 7, "ranks": ranks},
                                         {"event": "ranks", "step": 9, "ranks": {"m.layer.2.output.dense": 1}}])
    # Layer 10 sorts after layer 2 (numeric, not lexical); only duplicated short labels keep the full sub-path.
    assert labels == ["L2 attention.output.dense", "L2 output.dense", "L10 dense", "dense"]
    assert steps == [7, 9]
    np.testing.assert_array_equal(matrix[:, 0], [3, 4, 2, 1])
    assert np.isnan(matrix[0, 1]) and matrix[1, 1] == 1


def test_rank_matrix_empty():
    labels, steps, matrix = rank_matrix([{"event": "train", "step": 1, "loss": 1.0}])
    assert labels == [] and steps == [] and matrix.shape == (0, 0)


def test_read_metrics_tolerates_torn_last_line(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"event": "train", "step": 1, "loss": 1.0}\n{"event": "eval", "step": 1}\n{"event": "tr')
    assert [e["event"] for e in read_metrics(path)] == ["train", "eval"]


def test_read_metrics_corrupt_middle_line_names_line_number(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"event": "train", "step": 1, "loss": 1.0}\n\n{"event": oops}\n{"event": "eval", "step": 2}\n')
    with pytest.raises(ValueError, match=r"metrics\.jsonl:3\b"):
        read_metrics(path)


def test_plot_run_missing_or_empty_metrics(tmp_path):
    with pytest.raises(FileNotFoundError, match="metrics.jsonl"):
        plot_run(tmp_path)
    (tmp_path / "metrics.jsonl").write_text(json.dumps({"event": "ranks", "step": 1, "ranks": {}}) + "\n")
    with pytest.raises(ValueError, match="no training or evaluation events"):
        plot_run(tmp_path)


@pytest.mark.parametrize("task, metrics, files", [
    ("multi_label", {"eval_micro_f1": 0.6, "eval_macro_f1": 0.5, "eval_subset_accuracy": 0.4}, {"f1.png"}),
    ("regression", {"eval_mse": 1.2, "eval_mae": 0.9, "eval_pearson": 0.5, "eval_spearman": 0.4},
     {"error.png", "correlation.png"}),
])
def test_validation_plots_show_and_label_the_tasks_metrics(tmp_path, task, metrics, files):
    from budgetune.training.plots import run_task, validation_figures

    events = [{"event": "train", "step": s, "loss": 1.0 / s} for s in range(1, 5)]
    events += [{"event": "eval", "step": s, "eval_loss": 1.0 / s, **{k: v + s / 100 for k, v in metrics.items()}}
               for s in (2, 4)]
    assert run_task(events) == task
    figures = dict(validation_figures(events))
    assert set(figures) == files
    legends = {t.get_text() for fig in figures.values() for t in fig.axes[0].get_legend().get_texts()}
    wanted = {"multi_label": {"micro-F1", "macro-F1", "subset accuracy"},
              "regression": {"MSE", "MAE", "Pearson r", "Spearman rho"}}[task]
    assert legends == wanted
    assert all(task.replace("_", "-") in fig.axes[0].get_title() for fig in figures.values())
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_text("".join(json.dumps(e) + "\n" for e in events))
    assert {p.name for p in plot_run(run)} == {"loss.png"} | files  # no empty accuracy.png
