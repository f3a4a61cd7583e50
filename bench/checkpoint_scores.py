"""Score the model as it stood at a run's resumable checkpoints (for instance each epoch's end, which a run keeps
only for its best step) on labelled files, at adapter scale 1. Run it from the folder the run was trained in (the
run's config.yaml may hold relative data paths):

    python bench/checkpoint_scores.py RUN CHECKPOINT [CHECKPOINT ...] --data_file FILE [--data_file FILE ...] \
        [--recheck all|first]

It rebuilds the run's model exactly as `train` does (RUN/config.yaml, in a scratch output folder: nothing is
written into RUN), loads each checkpoint's trainable tensors and AdaLoRA rank pattern, and scores with pruned AdaLoRA ranks zeroed, as
validation does. For each checkpoint it prints the step, the validation accuracy recomputed next to the run's own
eval line at that step (they must agree: the check that the model is rebuilt as it trained; with --recheck first,
only at the first checkpoint that has an eval line, since validation is the slow part), and each file's accuracy
and macro-F1.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path


def logged_evals(run: Path) -> dict[int, dict]:
    """The run's own validation lines per step (metrics.jsonl eval events)."""
    lines = [json.loads(line) for line in (run / "metrics.jsonl").read_text(encoding="utf-8").splitlines()]
    return {ev["step"]: ev for ev in lines if ev.get("event") == "eval"}


def file_scores(run_state, data_file: str) -> dict:
    """Accuracy and macro-F1 of the model as it stands now on a labelled file (pruned ranks zeroed)."""
    from budgetune import tasks
    from budgetune.adalora import rank_masks
    from budgetune.data import readers as data_lib
    from budgetune.inference.runner import table_logits

    cfg, names = run_state.cfg, run_state.splits.label_names
    table = data_lib.load_table(data_file, split="test", task=cfg.data.task, label_names=names)
    with rank_masks.as_saved(run_state.inner):
        logits = table_logits(run_state.model, run_state.tokenizer, table, run_state.accelerator,
                              cfg.train.per_device_eval_batch_size, cfg.data.max_seq_length, desc=Path(data_file).name)
    m = tasks.task_metrics(cfg.data.task, logits, table.labels, names, None)
    return {"rows": len(table.texts), "accuracy": m["accuracy"], "macro_f1": m["macro_f1"]}


def main(run: Path, checkpoints: list[str], data_files: list[str], recheck: str = "all") -> None:
    from budgetune.cli.quiet import library_output
    from budgetune.config import resolve
    from budgetune.training import checkpoint
    from budgetune.training import train as train_lib

    evals = logged_evals(run)
    with tempfile.TemporaryDirectory() as scratch, library_output(verbose=False):
        cfg = resolve(str(run / "config.yaml"), ["--output_dir", scratch, "--resume_from_checkpoint", "null"])
        state = train_lib.setup(cfg)
        checked = False
        for folder in checkpoints:
            saved = checkpoint.load(Path(folder))
            checkpoint.restore_model(state.inner, saved["model"])
            checkpoint.restore_allocator(state.inner, saved["allocator"])  # AdaLoRA's rank pattern: which rows count
            step = saved["progress"]["step"]
            logged = evals.get(step)
            ran = ("no eval at this step" if logged is None else
                   f"{logged['eval_accuracy']:.4%}, loss {logged['eval_loss']:.6f}")
            if recheck == "all" or (logged is not None and not checked):
                checked = checked or logged is not None
                val = train_lib.validate(state)
                print(f"step {step} (epoch {step / state.per_epoch:g}): validation accuracy {val['accuracy']:.4%}, "
                      f"loss {val['loss']:.6f}; the run logged {ran}")
            else:
                print(f"step {step} (epoch {step / state.per_epoch:g}): the run logged {ran} (not recomputed)")
            for f in data_files:
                s = file_scores(state, f)
                print(f"  {f}: {s['rows']} rows, accuracy {s['accuracy']:.4%}, macro-F1 {s['macro_f1']:.4f}")
        if recheck == "first" and not checked:
            print("warning: no checkpoint given has an eval line in the run's metrics.jsonl: nothing was rechecked")


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("run", type=Path)
    p.add_argument("checkpoints", nargs="+")
    p.add_argument("--data_file", action="append", default=[], help="a labelled file to score (repeatable)")
    p.add_argument("--recheck", choices=("all", "first"), default="all",
                   help="recompute validation at every checkpoint (default) or only at the first with an eval line "
                   "(the check that the model is rebuilt as it trained; validation is the slow part)")
    a = p.parse_args()
    main(a.run, a.checkpoints, a.data_file, a.recheck)
