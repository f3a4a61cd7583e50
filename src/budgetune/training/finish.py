"""The end of a run: the best adapter saved and restored, re-scored as a user will load it, its default scale
chosen, evaluation files and plots written."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import torch

from budgetune import fileio, tasks
from budgetune.adalora import rank_masks
from budgetune.data.splits import cache_dir, scores
from budgetune.errors import CheckpointError
from budgetune.inference import adapter_bundle
from budgetune.inference.runner import table_logits
from budgetune.metrics import classification_metrics
from budgetune.training import checkpoint
from budgetune.training.runstate import Best, Run, TrainState

BEST_STATE = "best_state.pt"  # the best step's exact trainable tensors, to finish (or resume) with them


def save_best(run: Run, best: Best) -> None:
    """The best adapter in peft's format (+ tokenizer, labels, model card) and its exact trainable state."""
    cfg = run.cfg
    adapter_bundle.save_bundle(run.inner, run.tokenizer, run.out / "adapter", label_names=run.splits.label_names,
                          base_model=portable_model_id(cfg.model.model_name_or_path), revision=cfg.model.revision,
                          head=cfg.model.head, config=cfg.to_dict(), budget=run.live.to_dict(), metrics=best.metrics)
    fileio.atomic_torch_save({"model": best.state, "rank_pattern": best.pattern, "metrics": best.metrics},
                                run.out / BEST_STATE)


def saved_best_is(out: Path, best: Best) -> bool:
    """Whether adapter/ and best_state.pt both hold `best` (their recorded metrics name its step).

    A resume continues with its checkpoint's best, but the killed run may have written a later one after that
    checkpoint; a continuation that is not bit-exact (no --deterministic on a GPU) may never find it again.
    """
    try:
        bundle = json.loads((out / "adapter" / adapter_bundle.BUNDLE_FILE).read_text()).get("metrics")
        state = checkpoint.load_weights(out / BEST_STATE, checkpoint.BEST_KEYS).get("metrics")
    except (OSError, ValueError, CheckpointError):
        return False
    return bundle == best.metrics and state == best.metrics


def record_shipped_ranks(run: Run, state: TrainState, best: Best) -> None:
    """AdaLoRA: the shipped adapter's kept ranks in budget.json (`adalora_shipped`). Where no validation had the
    final rank pattern (a final phase of 0 steps), one line and a note there say the last validation's was shipped."""
    if run.schedule is None or state.best_step is None:
        return
    sched, m = run.schedule, run.cfg.method
    shipped = {"step": state.best_step, "ranks": rank_masks.kept_ranks(run.inner, best.pattern),
               "target_ranks": rank_masks.target_ranks(run.inner), "final_rank_pattern": sched.is_final(state.best_step)}
    if not shipped["final_rank_pattern"]:
        shipped["note"] = (f"AdaLoRA: no validation had the final rank pattern (--tfinal {m.tfinal} leaves "
                           f"{sched.tfinal} of {sched.total_step} steps to the final phase); shipped the last "
                           f"validation's adapter (step {state.best_step}): {shipped['ranks']} ranks kept, "
                           f"{shipped['target_ranks']} at target_r")
        run.accelerator.print(shipped["note"])
    if run.accelerator.is_main_process:
        fileio.update_json(run.out / "budget.json", {"adalora_shipped": shipped})


def score_last(run: Run, state: TrainState, best: Best, raw: dict) -> None:
    """--eval_strategy no: the last step's adapter, scored on validation as saved, is the run's best: its metrics go
    into the bundle, best_state.pt and what train() returns (search's objective reads them)."""
    if best.metrics is None:
        return
    best.metrics.update(tasks.prefixed(run.splits.task, raw))
    state.best_metric = raw[run.cfg.train.metric_for_best_model]
    if run.accelerator.is_main_process:
        save_best(run, best)


def portable_model_id(name: str) -> str:
    """What the bundle stores as its base: a Hub id or a packaged name as given, a local folder made absolute."""
    if name.startswith("packaged:") or not Path(name).exists():
        return name
    return str(Path(name).resolve())


def finish(run: Run, state: TrainState, best: Best) -> dict:
    """The best adapter back in the model; evaluation files computed from the saved adapter reloaded; plots.

    Returns the best step's metrics and what the closing `summary` says: validation (and test) figures of the saved
    adapter at its scale, the scale and why, the run folder."""
    acc, out, main = run.accelerator, run.out, run.accelerator.is_main_process
    if best.state is not None:
        checkpoint.restore_model(run.inner, best.state)
        if best.pattern is not None:
            run.inner.peft_config["default"].rank_pattern = best.pattern
        if main and not saved_best_is(out, best):  # a resumed run: the killed one may have saved a later best
            save_best(run, best)
    record_shipped_ranks(run, state, best)
    acc.wait_for_everyone()
    saved = reload_saved(run)  # what `predict` will load, through plain peft
    task, names = run.splits.task, tasks.METRICS[run.splits.task]
    raw_logits = validation_logits(run, saved)
    raw = scores(raw_logits, run.splits)
    if run.cfg.train.eval_strategy == "no":
        score_last(run, state, best, raw)
    scale, table, logits, why = choose_adapter_scale(run, saved, raw_logits)
    thresholds = tune_thresholds(run, logits)
    final = raw if scale == 1 and thresholds is None else scores(logits, run.splits, thresholds)
    final.update(adapter_scale=scale, adapter_scale_reason=why, adapter_scale_validation=table,
                 raw_adapter={k: raw[k] for k in names})
    if main:
        if table is not None:
            adapter_bundle.record_adapter_scale(out / "adapter", scale, table, run.cfg.train.robust_tolerance,
                                                tasks.SCALE_METRIC[task])
        if thresholds is not None:
            adapter_bundle.record_thresholds(out / "adapter", run.splits.label_names, thresholds)
        fileio.atomic_write_json(out / "evaluation.json", {"split": "validation", **final})
        fileio.atomic_write_text(out / "evaluation.txt", tasks.metrics_text(
            task, final, f"validation (saved adapter at adapter_scale {scale:g}: what predict loads)"))
    precision = choose_inference_precision(run, scale)
    if main and precision is not None:
        adapter_bundle.record_inference_precision(out / "adapter", precision)
    test = evaluate_test(run, saved, thresholds) if run.splits.test is not None else None
    run.log.log("end", step=state.step, best_step=state.best_step, best_metric=state.best_metric,
                final_ranks=rank_masks.rank_pattern(run.inner), replica_digests=replica_digests(run))
    if main:
        plot(out)
    acc.print(f"best validation {run.cfg.train.metric_for_best_model} {state.best_metric:.4f} at step "
              f"{state.best_step}; adapter: {out / 'adapter'}")
    kept = [k for k in names if k != "loss"]
    return {"best_metric": state.best_metric, "best_step": state.best_step, **(best.metrics or {}),
            "validation": {k: final[k] for k in (*names, "n")},
            "validation_source": run.splits.validation_source, "adapter_scale": scale, "adapter_scale_reason": why,
            "inference_precision": None if precision is None else precision["choice"],
            "test": None if test is None else {k: test[k] for k in (*kept, "n")},
            "output_dir": str(out), "task": task}


def tune_thresholds(run: Run, logits: np.ndarray) -> list[float] | None:
    """multi_label: one threshold per label, tuned on the validation logits of the saved adapter at its scale
    (tasks.tune_thresholds); None for the other tasks."""
    if run.splits.task != tasks.MULTI_LABEL:
        return None
    thresholds = tasks.tune_thresholds(logits, run.splits.validation.labels)
    run.accelerator.print("thresholds tuned on validation: " + ", ".join(
        f"{n} {t:.2f}" for n, t in zip(run.splits.label_names, thresholds)))
    return thresholds


def evaluate_test(run: Run, saved, thresholds: list[float] | None = None) -> dict:
    """The test split's metrics with the saved adapter: reported once (files and a line), never used to choose."""
    tl = table_logits(saved, run.tokenizer, run.splits.test, run.accelerator, run.cfg.train.per_device_eval_batch_size,
                      run.cfg.data.max_seq_length, cache_dir(run.cfg), desc="test")
    task = run.splits.task
    if task == tasks.SINGLE_LABEL:
        tm = classification_metrics(run.splits.test.labels, tl.argmax(-1), run.splits.label_names)
    else:
        tm = tasks.task_metrics(task, tl, run.splits.test.labels, run.splits.label_names, thresholds)
    if run.accelerator.is_main_process:
        fileio.atomic_write_json(run.out / "evaluation_test.json", {"split": "test", **tm})
        fileio.atomic_write_text(run.out / "evaluation_test.txt", tasks.metrics_text(task, tm, "test (saved adapter)"))
    shown = tasks.DEFAULT_METRIC[task]
    run.accelerator.print(f"test {shown} {tm[shown]:.4f}")
    return tm


def summary(result: dict, next_steps: list[str]) -> str:
    """A run's closing lines (train, demo): how good the saved model is, on which rows; its adapter scale and why;
    where the files are; what to run next."""
    v, out, task = result["validation"], result["output_dir"], result.get("task", tasks.SINGLE_LABEL)
    lines = [f"validation {tasks.headline(task, v)} on {v['n']} rows: {result['validation_source']}",
             f"adapter scale {result['adapter_scale']:g}: {result['adapter_scale_reason']}"]
    if result.get("test"):
        t = result["test"]
        shown = (f"accuracy {t['accuracy']:.2%}" if task == tasks.SINGLE_LABEL else tasks.headline(task, t))
        lines.append(f"test {shown} on {t['n']} rows (reported once, never used to choose)")
    if result.get("inference_precision"):
        lines.append(f"inference precision (--precision auto): {result['inference_precision']}, measured on validation "
                     "(table: adapter/budgetune.json, inference_precision)")
    lines.append(f"files: {out}/ (adapter/: the model; evaluation.txt; plots/; metrics.jsonl)")
    return "\n".join(lines + [f"next: {step}" for step in next_steps])


def validation_logits(run: Run, model) -> np.ndarray:
    return table_logits(model, run.tokenizer, run.splits.validation, run.accelerator,
                        run.cfg.train.per_device_eval_batch_size, run.cfg.data.max_seq_length, cache_dir(run.cfg),
                        desc="validation")


def choose_adapter_scale(run: Run, saved, raw_logits: np.ndarray):
    """(scale, {scale: validation accuracy}, validation logits at that scale, why): the adapter's default scale toward
    the pretrained model (scaling.auto_scale on validation); the model is left at that scale. Scale 1 without a
    table when switched off (--robust_tolerance null), for a method without an adapter, or when the validation
    split is too small to resolve the tolerance (scaling.unresolved)."""
    from budgetune.modeling import scaling

    tolerance, metric = run.cfg.train.robust_tolerance, tasks.SCALE_METRIC[run.splits.task]
    why = scaling.kept_as_trained(tolerance, run.cfg.method.method, len(run.splits.validation.texts))
    if why is not None:
        if tolerance is not None and run.cfg.method.method != "full":  # the user asked for a choice: say why not
            run.accelerator.print(f"adapter_scale 1 {why}")
        return 1.0, None, raw_logits, why
    logits = {1.0: raw_logits}  # each scale's validation pass runs once

    def validate() -> float:
        s = scaling.current_scale(saved)
        if s not in logits:
            logits[s] = validation_logits(run, saved)
        return scores(logits[s], run.splits)[metric]

    chosen, table = scaling.auto_scale(saved, validate, scaling.AUTO_SCALES, tolerance)
    scaling.apply_scale(saved, chosen)
    run.accelerator.print(scaling.scale_summary(chosen, table, metric))
    return chosen, table, logits[chosen], scaling.scale_reason(chosen, table, tolerance, metric)


def choose_inference_precision(run: Run, scale: float) -> dict | None:
    """`--precision auto`'s choice for this run (inference.precision_choice.record on the validation split, the saved
    adapter merged at its scale, as predict loads it), printed; None when --inference_precision_tolerance is null
    and for tasks other than single_label."""
    from budgetune.inference import precision_choice
    from budgetune.inference.loading import load_model

    tolerance = run.cfg.train.inference_precision_tolerance
    if tolerance is None:
        return None
    if run.splits.task != tasks.SINGLE_LABEL:  # the table compares accuracies
        run.accelerator.print(f"inference precision: not measured for a {run.splits.task} run (the choice compares "
                              "validation accuracies); --precision auto follows the hardware rule")
        return None
    model, tokenizer, info = load_model(run.out / "adapter", adapter_scale=scale)
    device = run.accelerator.device
    rec = precision_choice.record(model.to(device), device, lambda m: validation_logits(run, m),
                                  np.asarray(run.splits.validation.labels), tolerance, merged=info["merged"],
                                  tokenizer=tokenizer, cache_dir=cache_dir(run.cfg))
    run.accelerator.print(precision_choice.table_text(rec))
    return rec


def reload_saved(run: Run):
    """The saved adapter folder loaded onto a fresh base with plain peft, unmerged, at scale 1 (as trained: a run
    resumed after it finished has recorded a default scale in the bundle), on this run's device."""
    from budgetune.inference.loading import load_model

    model, _, _ = load_model(run.out / "adapter", merge=False, adapter_scale=1.0)
    return run.accelerator.prepare_model(model, evaluation_mode=True)


def replica_digests(run: Run) -> list[float]:
    """One checksum of the trainable weights per process: under DDP they must all be equal."""
    total = sum(p.detach().double().abs().sum() for p in run.inner.parameters() if p.requires_grad)
    tensor = torch.as_tensor([float(total)], dtype=torch.float64, device=run.accelerator.device)
    return [float(x) for x in run.accelerator.gather(tensor).cpu()]


def plot(out: Path) -> None:
    try:
        from budgetune.training.plots import plot_run

        plot_run(out)
    except Exception as e:  # plots are a convenience: never lose a finished run over them
        print(f"warning: plots failed: {e}", file=sys.stderr)
