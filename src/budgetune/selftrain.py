"""Self-training on unlabelled target texts: rounds of confident, class-balanced pseudo-labels and fresh students.

Round 0 trains as `budgetune train` does. Each next round labels the unlabelled texts with the best model so far,
keeps those whose top probability reaches the threshold (no class above its labelled share x cap_factor), and
trains a fresh student on labelled + pseudo-labelled rows with dropout on. The best round is chosen on the labelled
validation split. Each round is a run folder (RUN/round-N); RUN itself holds the chosen round's adapter and files.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shutil
import sys
from pathlib import Path

import numpy as np

from budgetune import artifacts, unlabeled
from budgetune import data as data_lib
from budgetune import splits as splits_lib
from budgetune import train as train_lib
from budgetune.config import Config
from budgetune.devices import is_main_process
from budgetune.errors import ConfigError

DROPOUT_METHODS = ("lora", "dora", "adalora", "vera")  # methods whose adapters have an input dropout
COPIED = ("config.yaml", "budget.json", "evaluation.json", "evaluation.txt", "evaluation_test.json",
          "evaluation_test.txt")


def check_options(rounds: int, threshold: float, cap_factor: float, noise_dropout: float) -> None:
    if not 0 < threshold < 1:
        raise ConfigError(f"--pseudo_label_threshold must be between 0 and 1 (exclusive), got {threshold}")
    if not isinstance(rounds, int) or rounds < 0:
        raise ConfigError(f"--self_training_rounds must be a whole number >= 0, got {rounds!r}")
    if not cap_factor >= 1:
        raise ConfigError(f"--pseudo_label_class_cap must be at least 1 (x the class's labelled share), "
                          f"got {cap_factor}")
    if not 0 <= noise_dropout < 1:
        raise ConfigError(f"--self_training_dropout must be in [0, 1), got {noise_dropout}")


def class_shares(labels: list[int], n_classes: int) -> np.ndarray:
    return np.bincount(np.asarray(labels, dtype=np.int64), minlength=n_classes) / max(1, len(labels))


def select_confident(probs: np.ndarray, threshold: float, shares: np.ndarray,
                     cap_factor: float) -> tuple[np.ndarray, np.ndarray]:
    """(row indices, labels) of the pseudo-labels kept: top probability >= threshold, the most confident first,
    and no class holding more than cap_factor x its labelled share of the kept rows."""
    conf, pred = probs.max(-1), probs.argmax(-1)
    by_class = []
    for c in range(probs.shape[1]):
        rows = np.flatnonzero((pred == c) & (conf >= threshold))
        by_class.append(rows[np.argsort(-conf[rows], kind="stable")])
    keep = np.array([len(r) for r in by_class])
    while True:  # the cap depends on the total kept, which the cap lowers: shrink to the fixed point
        cap = np.floor(cap_factor * shares * keep.sum() + 1e-9).astype(int)
        new = np.minimum(keep, cap)
        if (new == keep).all():
            break
        keep = new
    rows = np.concatenate([r[:k] for r, k in zip(by_class, keep)]).astype(np.int64)
    rows.sort()
    return rows, pred[rows]


def round_config(cfg: Config, out: Path, r: int, noise_dropout: float) -> Config:
    """Round r's configuration: its own folder; from round 1 on, adapter dropout (noise) at least noise_dropout."""
    method = cfg.method
    if r > 0 and method.method in DROPOUT_METHODS and method.lora_dropout < noise_dropout:
        method = dataclasses.replace(method, lora_dropout=noise_dropout)
    output = dataclasses.replace(cfg.output, output_dir=str(out / f"round-{r}"),
                                 run_name=f"{cfg.output.run_name or out.name}-round-{r}")
    return dataclasses.replace(cfg, method=method, output=output)


def label_texts(run: Path, texts: list[str], batch_size: int) -> np.ndarray:
    """Probabilities of the run's best adapter on texts (the fast inference path)."""
    import torch

    from budgetune.devices import release_accelerator
    from budgetune.inference import table_logits
    from budgetune.loading import load_for_inference

    accelerator, model, tokenizer, info = load_for_inference(run)
    table = data_lib.TextTable(texts, None, info["label_names"], "unlabelled")
    logits = table_logits(model, tokenizer, table, accelerator, batch_size, info["max_seq_length"], None,
                          desc="pseudo-labels")
    release_accelerator()  # the next round's training starts its own accelerator
    return torch.softmax(torch.from_numpy(logits).double(), -1).numpy()


def write_pseudo_labels(path: Path, texts: list[str], rows: np.ndarray, labels: np.ndarray, probs: np.ndarray,
                        names: list[str]) -> None:
    """The round's pseudo-labelled rows, for inspection: text, label id, label name, probability."""
    import csv
    import io

    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["text", "label", "label_name", "probability"])
    w.writerows([texts[i], int(c), names[c], f"{probs[i, c]:.6f}"] for i, c in zip(rows, labels))
    artifacts.atomic_write_text(path, buf.getvalue())


def better(a: float, b: float | None, metric: str) -> bool:
    return b is None or (a < b if metric == "loss" else a > b)


def self_train(cfg: Config, unlabeled_file: str, rounds: int, threshold: float, *, cap_factor: float = 1.5,
               text_column: str | None = None, noise_dropout: float = 0.1) -> dict:
    """Rounds 0..rounds in RUN/round-N; the best on validation is copied into RUN. Returns a summary."""
    check_options(rounds, threshold, cap_factor, noise_dropout)
    out = Path(cfg.output.output_dir)
    artifacts.guard_output_dir(out, cfg.output.overwrite_output_dir, resuming=False, clear=False)
    splits = splits_lib.load_splits(cfg)
    names = splits.label_names
    dedup = unlabeled.load_unlabeled(unlabeled_file, splits.validation, splits.test, splits.train, text_column)
    print(dedup.summary(unlabeled_file))
    texts = dedup.kept
    shares = class_shares(splits.train.labels, len(names))
    metric = cfg.train.metric_for_best_model
    summary: list[dict] = []
    best_round, best_value = None, None
    for r in range(rounds + 1):
        rcfg = round_config(cfg, out, r, noise_dropout)
        counts, kept = [0] * len(names), 0
        train_table = splits.train
        if r > 0:
            probs = label_texts(out / f"round-{best_round}", texts, cfg.train.per_device_eval_batch_size)
            rows, labels = select_confident(probs, threshold, shares, cap_factor)
            counts, kept = np.bincount(labels, minlength=len(names)).tolist(), len(rows)
            confident = int((probs.max(-1) >= threshold).sum())
            if not kept:
                why = (f"none of the {confident} texts at probability >= {threshold} fits the class-balance cap"
                       if confident else f"no unlabelled text reaches probability {threshold}")
                print(f"round {r}: {why}; stopping", file=sys.stderr)
                summary.append({"round": r, "pseudo_labels": 0, "pseudo_per_class": counts, "trained": False,
                                "confident": confident})
                break
            train_table = unlabeled.with_unlabeled(splits.train, [texts[i] for i in rows], labels.tolist())
            if is_main_process():
                write_pseudo_labels(out / f"round-{r}" / "pseudo_labels.csv", texts, rows, labels, probs, names)
        result = train_lib.train(rcfg, splits=splits_lib.Splits(train_table, splits.validation, splits.test, names))
        value = result["best_metric"]
        summary.append({"round": r, "pseudo_labels": kept, "pseudo_per_class": counts, "trained": True,
                        "confident": None if r == 0 else confident,
                        "best_metric": value, "eval_accuracy": result.get("eval_accuracy"),
                        "eval_macro_f1": result.get("eval_macro_f1"), "eval_loss": result.get("eval_loss"),
                        "lora_dropout": rcfg.method.lora_dropout})
        if better(value, best_value, metric):
            best_round, best_value = r, value
        print(f"round {r}: {kept} pseudo-labels {counts}; validation {metric} {value:.4f}"
              + (" (best so far)" if best_round == r else ""))
    record = {"unlabeled_file": unlabeled_file, "threshold": threshold, "class_cap_factor": cap_factor,
              "labelled_shares": shares.tolist(), "label_names": names, "best_round": best_round,
              "metric_for_best_model": metric, "rounds": summary, "unlabeled": dedup.to_dict()}
    if is_main_process():
        finish(out, best_round, summary, record)
    return record


def finish(out: Path, best_round: int, summary: list[dict], record: dict) -> None:
    """RUN/adapter and evaluation files from the best round; RUN/metrics.jsonl: every round's events, then rounds."""
    best = out / f"round-{best_round}"
    with artifacts.atomic_dir(out / "adapter") as tmp:
        shutil.copytree(best / "adapter", tmp, dirs_exist_ok=True)
    for name in COPIED:
        if (best / name).is_file():
            shutil.copy2(best / name, out / name)
    lines, offset = [], 0
    for s in summary:
        if not s["trained"]:
            continue
        last = offset
        for line in (out / f"round-{s['round']}" / "metrics.jsonl").read_text(encoding="utf-8").splitlines():
            try:
                ev = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(ev.get("step"), int):  # rounds one after another on the plots' step axis
                ev["step"] += offset
                last = max(last, ev["step"])
            lines.append(json.dumps({**ev, "round": s["round"]}))
        lines.append(json.dumps({"event": "round", "step": last, **s, "best": s["round"] == best_round}))
        offset = last
    artifacts.atomic_write_text(out / "metrics.jsonl", "".join(line + "\n" for line in lines))
    artifacts.atomic_write_json(out / "selftrain.json", record)
    try:
        from budgetune.plots import plot_run

        plot_run(out)
    except Exception as e:  # plots are a convenience: never lose finished rounds over them
        print(f"warning: plots failed: {e}", file=sys.stderr)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="budgetune selftrain", allow_abbrev=False,
        description="Train, then rounds of pseudo-labelling unlabelled texts and training a fresh student. Any "
                    "other --flag is a training option (see `budgetune train --help`).")
    p.add_argument("--config", help="configuration YAML")
    p.add_argument("--unlabeled_file", required=True, help="unlabelled target texts (validation/test duplicates "
                                                           "are dropped)")
    p.add_argument("--unlabeled_text_column", help="text column of --unlabeled_file (default: text, sentence, ...)")
    p.add_argument("--self_training_rounds", type=int, default=2, help="rounds after round 0 (default 2)")
    p.add_argument("--pseudo_label_threshold", type=float, default=0.9,
                   help="keep a pseudo-label when its probability is at least this, in (0, 1) (default 0.9)")
    p.add_argument("--pseudo_label_class_cap", type=float, default=1.5,
                   help="no class may exceed its labelled share x this among the kept pseudo-labels (default 1.5)")
    p.add_argument("--self_training_dropout", type=float, default=0.1,
                   help="adapter dropout (noise) from round 1 on, where the method has one (default 0.1)")
    return p


def command(argv: list[str]) -> int:
    """`budgetune selftrain`."""
    from budgetune.config import resolve

    a, rest = parser().parse_known_args(argv)
    cfg = resolve(a.config, rest)
    self_train(cfg, a.unlabeled_file, a.self_training_rounds, a.pseudo_label_threshold,
               cap_factor=a.pseudo_label_class_cap, text_column=a.unlabeled_text_column,
               noise_dropout=a.self_training_dropout)
    return 0
