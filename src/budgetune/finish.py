"""The end of a run: the best adapter saved and restored, re-scored as a user will load it, its default scale
chosen, evaluation files and plots written."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import torch

from budgetune import artifacts, checkpoint, methods
from budgetune.inference import table_logits
from budgetune.metrics import classification_metrics, metrics_text
from budgetune.runstate import Best, Run, TrainState
from budgetune.splits import cache_dir, scores

BEST_STATE = "best_state.pt"  # the best step's exact trainable tensors, to finish (or resume) with them


def save_best(run: Run, best: Best) -> None:
    """The best adapter in peft's format (+ tokenizer, labels, model card) and its exact trainable state."""
    cfg = run.cfg
    artifacts.save_bundle(run.inner, run.tokenizer, run.out / "adapter", label_names=run.splits.label_names,
                          base_model=portable_model_id(cfg.model.model_name_or_path), revision=cfg.model.revision,
                          head=cfg.model.head, config=cfg.to_dict(), budget=run.live.to_dict(), metrics=best.metrics)
    artifacts.atomic_torch_save({"model": best.state, "rank_pattern": best.pattern, "metrics": best.metrics},
                                run.out / BEST_STATE)


def portable_model_id(name: str) -> str:
    """What the bundle stores as its base: a Hub id or a packaged name as given, a local folder made absolute."""
    if name.startswith("packaged:") or not Path(name).exists():
        return name
    return str(Path(name).resolve())


def finish(run: Run, state: TrainState, best: Best) -> dict:
    """The best adapter back in the model; evaluation files computed from the saved adapter reloaded; plots."""
    acc, out, main = run.accelerator, run.out, run.accelerator.is_main_process
    if best.state is not None:
        checkpoint.restore_model(run.inner, best.state)
        if best.pattern is not None:
            run.inner.peft_config["default"].rank_pattern = best.pattern
    acc.wait_for_everyone()
    saved = reload_saved(run)  # what `predict` will load, through plain peft
    raw_logits = validation_logits(run, saved)
    raw = scores(raw_logits, run.splits)
    scale, table, logits = choose_adapter_scale(run, saved, raw_logits)
    final = raw if scale == 1 else scores(logits, run.splits)
    final.update(adapter_scale=scale, adapter_scale_validation=table,
                 raw_adapter={k: raw[k] for k in ("accuracy", "macro_f1", "loss")})
    if main:
        if table is not None:
            artifacts.record_adapter_scale(out / "adapter", scale, table, run.cfg.train.robust_tolerance)
        artifacts.atomic_write_json(out / "evaluation.json", {"split": "validation", **final})
        artifacts.atomic_write_text(out / "evaluation.txt", metrics_text(
            final, f"validation (saved adapter at adapter_scale {scale:g}: what predict loads)"))
    if run.splits.test is not None:  # reported once, never used to choose
        tl = table_logits(saved, run.tokenizer, run.splits.test, acc, run.cfg.train.per_device_eval_batch_size,
                          run.cfg.data.max_seq_length, cache_dir(run.cfg), desc="test")
        tm = classification_metrics(run.splits.test.labels, tl.argmax(-1), run.splits.label_names)
        if main:
            artifacts.atomic_write_json(out / "evaluation_test.json", {"split": "test", **tm})
            artifacts.atomic_write_text(out / "evaluation_test.txt", metrics_text(tm, "test (saved adapter)"))
        acc.print(f"test accuracy {tm['accuracy']:.4f}")
    run.log.log("end", step=state.step, best_step=state.best_step, best_metric=state.best_metric,
                final_ranks=methods.rank_pattern(run.inner), replica_digests=replica_digests(run))
    if main:
        plot(out)
    acc.print(f"best validation {run.cfg.train.metric_for_best_model} {state.best_metric:.4f} at step "
              f"{state.best_step}; adapter: {out / 'adapter'}")
    return {"best_metric": state.best_metric, "best_step": state.best_step, **(best.metrics or {}),
            "validation": {k: final[k] for k in ("accuracy", "macro_f1", "loss")}}


def validation_logits(run: Run, model) -> np.ndarray:
    return table_logits(model, run.tokenizer, run.splits.validation, run.accelerator,
                        run.cfg.train.per_device_eval_batch_size, run.cfg.data.max_seq_length, cache_dir(run.cfg),
                        desc="validation")


def choose_adapter_scale(run: Run, saved, raw_logits: np.ndarray):
    """(scale, {scale: validation accuracy}, validation logits at that scale): the adapter's default scale toward
    the pretrained model (scaling.auto_scale on validation); the model is left at that scale. (1, None, raw logits)
    when switched off (--robust_tolerance null) or for a method without an adapter."""
    tolerance = run.cfg.train.robust_tolerance
    if tolerance is None or run.cfg.method.method == "full":
        return 1.0, None, raw_logits
    from budgetune import scaling

    logits = {1.0: raw_logits}  # each scale's validation pass runs once

    def validate() -> float:
        s = scaling.current_scale(saved)
        if s not in logits:
            logits[s] = validation_logits(run, saved)
        return scores(logits[s], run.splits)["accuracy"]

    chosen, table = scaling.auto_scale(saved, validate, scaling.AUTO_SCALES, tolerance)
    scaling.apply_scale(saved, chosen)
    run.accelerator.print(scaling.scale_summary(chosen, table))
    return chosen, table, logits[chosen]


def reload_saved(run: Run):
    """The saved adapter folder loaded onto a fresh base with plain peft, unmerged, on this run's device."""
    from budgetune.loading import load_model

    model, _, _ = load_model(run.out / "adapter", merge=False)
    return run.accelerator.prepare_model(model, evaluation_mode=True)


def replica_digests(run: Run) -> list[float]:
    """One checksum of the trainable weights per process: under DDP they must all be equal."""
    total = sum(p.detach().double().abs().sum() for p in run.inner.parameters() if p.requires_grad)
    tensor = torch.as_tensor([float(total)], dtype=torch.float64, device=run.accelerator.device)
    return [float(x) for x in run.accelerator.gather(tensor).cpu()]


def plot(out: Path) -> None:
    try:
        from budgetune.plots import plot_run

        plot_run(out)
    except Exception as e:  # plots are a convenience: never lose a finished run over them
        print(f"warning: plots failed: {e}", file=sys.stderr)
