"""Self-training on unlabelled target texts: rounds of confident, class-balanced pseudo-labels and fresh students.

Round 0 trains as `budgetune train` does. Each next round labels the unlabelled texts with the best model so far,
keeps those whose top probability reaches the threshold (no class above its labelled share x cap_factor), and
trains a fresh student on labelled + pseudo-labelled rows with dropout on. The round kept is chosen on the labelled
validation split: the latest round within `round_tolerance` points of the best (later rounds have adapted to more
target text; 0: the best). Each round is a run folder (RUN/round-N); RUN itself holds the chosen round's adapter and
files. The same command run again continues a killed run: each finished round whose configuration and pseudo-labels
are the same is reused, not trained again.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import sys
from pathlib import Path

import numpy as np

from budgetune import fileio, tasks
from budgetune.config import Config
from budgetune.data import readers as data_lib
from budgetune.data import splits as splits_lib
from budgetune.data import unlabeled
from budgetune.errors import ConfigError, RunFolderError
from budgetune.hardware.devices import is_main_process
from budgetune.metrics import lower_is_better, softmax
from budgetune.modeling import backbone
from budgetune.modeling.scaling import near_best
from budgetune.training import checkpoint
from budgetune.training import finish as finish_lib
from budgetune.training import train as train_lib
from budgetune.training.runlog import read_metrics

DROPOUT_METHODS = ("lora", "dora", "adalora", "vera")  # methods whose adapters have an input dropout
# options that do not change a finished round's files (unlike checkpoint.RESUME_MAY_DIFFER: resuming re-runs finish,
# which a reused round does not, so e.g. robust_tolerance must match)
REUSE_MAY_DIFFER = {("output", "overwrite_output_dir"), ("train", "resume_from_checkpoint")}
COPIED = ("config.yaml", "budget.json", "evaluation.json", "evaluation.txt", "evaluation_test.json",
          "evaluation_test.txt")


def check_options(rounds: int, threshold: float, cap_factor: float, noise_dropout: float,
                  round_tolerance: float = 0.0) -> None:
    if not 0 < threshold < 1:
        raise ConfigError(f"--pseudo_label_threshold must be between 0 and 1 (exclusive), got {threshold}")
    if not isinstance(rounds, int) or rounds < 0:
        raise ConfigError(f"--self_training_rounds must be a whole number >= 0, got {rounds!r}")
    if not cap_factor >= 1:
        raise ConfigError(f"--pseudo_label_class_cap must be at least 1 (x the class's labelled share), "
                          f"got {cap_factor}")
    if not 0 <= noise_dropout < 1:
        raise ConfigError(f"--self_training_dropout must be in [0, 1), got {noise_dropout}")
    if not 0 <= round_tolerance <= 100:
        raise ConfigError(f"--round_tolerance must be between 0 and 100 points, got {round_tolerance}")


def check_task(cfg: Config) -> None:
    """Refuse what self-training does not handle yet: a task other than single_label (its pseudo-labels are one
    confident class per text), and text pairs (the unlabelled file holds single texts)."""
    task = cfg.data.task
    if task != tasks.SINGLE_LABEL:
        raise ConfigError(f"budgetune selftrain handles --task single_label only so far, not --task {task}: its "
                          "pseudo-labels are one confident class per text; to learn from unlabelled texts with "
                          f"--task {task}, use `budgetune distill --teacher RUN --unlabeled_file FILE`")
    if cfg.data.text_pair_column_name:
        raise ConfigError(f"budgetune selftrain does not read text pairs yet (--text_pair_column_name "
                          f"{cfg.data.text_pair_column_name}): the unlabelled file holds single texts")


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
    from budgetune.hardware.devices import release_accelerator
    from budgetune.inference.loading import load_for_inference
    from budgetune.inference.runner import table_logits

    accelerator, model, tokenizer, info = load_for_inference(run)
    table = data_lib.TextTable(texts, None, info["label_names"], "unlabelled")
    logits = table_logits(model, tokenizer, table, accelerator, batch_size, info["max_seq_length"], None,
                          desc="pseudo-labels")
    release_accelerator()  # the next round's training starts its own accelerator
    return softmax(logits)


def pseudo_labels_csv(texts: list[str], rows: np.ndarray, labels: np.ndarray, probs: np.ndarray,
                      names: list[str]) -> str:
    """The round's pseudo-labelled rows, for inspection: text, label id, label name, probability."""
    import csv
    import io

    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["text", "label", "label_name", "probability"])
    w.writerows([texts[i], int(c), names[c], f"{probs[i, c]:.6f}"] for i, c in zip(rows, labels))
    return buf.getvalue()


def chosen_round(values: list[float], metric: str, tolerance: float) -> int:
    """The latest round whose metric is within `tolerance` points of the best (loss: the lowest, no tolerance)."""
    if lower_is_better(metric):
        return int(np.argmin(values))
    return max(near_best(dict(enumerate(values)), tolerance))


def same_pseudo_labels(path: Path, csv_text: str) -> bool:
    """The same rows and labels, probabilities equal to 1e-4 (another thread count may change the last digit)."""
    import csv
    import io

    if not path.is_file():
        return False
    old = list(csv.reader(io.StringIO(path.read_text(encoding="utf-8"))))
    new = list(csv.reader(io.StringIO(csv_text)))
    return len(old) == len(new) and old[:1] == new[:1] and all(
        a[:3] == b[:3] and abs(float(a[3]) - float(b[3])) <= 1e-4 for a, b in zip(old[1:], new[1:]))


def finished_round(folder: Path, cfg: Config, pseudo_csv: str | None) -> dict | None:
    """train()'s result for a round already trained in `folder` with this configuration and these pseudo-labels
    (a run continued after a kill), else None."""
    import yaml

    if not (folder / "evaluation.json").is_file() or not (folder / "metrics.jsonl").is_file():
        return None
    events = read_metrics(folder / "metrics.jsonl")
    evals = {ev["step"]: ev for ev in events if ev.get("event") == "eval"}
    end = next((ev for ev in reversed(events) if ev.get("event") == "end"), None)
    if end is None or end.get("best_step") not in evals:
        return None
    saved = yaml.safe_load((folder / "config.yaml").read_text(encoding="utf-8"))
    recorded, _ = backbone.resolve_attention(cfg)  # config.yaml holds the kernel that attn_implementation auto meant
    if checkpoint.config_differences(saved, recorded.to_dict(), REUSE_MAY_DIFFER, defaults=Config().to_dict()):
        return None
    if pseudo_csv is not None and not same_pseudo_labels(folder / "pseudo_labels.csv", pseudo_csv):
        return None
    best = evals[end["best_step"]]
    return {"best_metric": end["best_metric"], "best_step": end["best_step"],
            **{k: v for k, v in best.items() if k.startswith("eval_")}}


@dataclasses.dataclass
class Pseudo:
    """One round's pseudo-labelled rows."""

    rows: np.ndarray
    labels: np.ndarray
    confident: int
    csv: str


def pseudo_label(labeler: Path, texts: list[str], names: list[str], shares: np.ndarray, threshold: float,
                 cap_factor: float, batch_size: int) -> Pseudo:
    probs = label_texts(labeler, texts, batch_size)
    rows, labels = select_confident(probs, threshold, shares, cap_factor)
    return Pseudo(rows, labels, int((probs.max(-1) >= threshold).sum()),
                  pseudo_labels_csv(texts, rows, labels, probs, names))


def run_round(rcfg: Config, splits: splits_lib.Splits, pseudo: Pseudo | None) -> tuple[dict, bool]:
    """(train()'s result, whether it was reused): a finished round with this config and these pseudo-labels is
    reused; an unfinished one (killed) is trained again; one finished otherwise needs --overwrite_output_dir."""
    folder = Path(rcfg.output.output_dir)
    done = finished_round(folder, rcfg, pseudo.csv if pseudo else None)
    if done is not None and not rcfg.output.overwrite_output_dir:
        return done, True
    if (folder / "evaluation.json").is_file() and not rcfg.output.overwrite_output_dir:
        raise RunFolderError(f"{folder} holds a round trained with another configuration or other pseudo-labels; "
                             "pass --overwrite_output_dir to train every round again, or choose another --output_dir")
    if (folder / "metrics.jsonl").is_file():  # a round killed before it finished: train it again
        rcfg = dataclasses.replace(rcfg, output=dataclasses.replace(rcfg.output, overwrite_output_dir=True))
    if pseudo is not None and is_main_process():
        fileio.atomic_write_text(folder / "pseudo_labels.csv", pseudo.csv)
    return train_lib.train(rcfg, splits=splits), False


def self_train(cfg: Config, unlabeled_file: str, rounds: int, threshold: float, *, cap_factor: float = 1.5,
               text_column: str | None = None, noise_dropout: float = 0.1, round_tolerance: float = 0.5) -> dict:
    """Rounds 0..rounds in RUN/round-N; the chosen round (see chosen_round) is copied into RUN. Returns a summary."""
    check_task(cfg)
    check_options(rounds, threshold, cap_factor, noise_dropout, round_tolerance)
    out = Path(cfg.output.output_dir)
    continuing = (out / "round-0").is_dir() and not cfg.output.overwrite_output_dir
    fileio.guard_output_dir(out, cfg.output.overwrite_output_dir, resuming=continuing, clear=False)
    splits = splits_lib.load_splits(cfg)
    names = splits.label_names
    dedup = unlabeled.load_unlabeled(unlabeled_file, splits.validation, splits.test, splits.train, text_column)
    print(dedup.summary(unlabeled_file))
    texts, shares, metric = dedup.kept, class_shares(splits.train.labels, len(names)), cfg.train.metric_for_best_model
    summary: list[dict] = []
    values: list[float] = []
    for r in range(rounds + 1):
        rcfg = round_config(cfg, out, r, noise_dropout)
        pseudo, train_table = None, splits.train
        if r > 0:
            labeler = out / f"round-{chosen_round(values, metric, round_tolerance)}"
            pseudo = pseudo_label(labeler, texts, names, shares, threshold, cap_factor,
                                  cfg.train.per_device_eval_batch_size)
            if not len(pseudo.rows):
                why = (f"none of the {pseudo.confident} texts at probability >= {threshold} fits the class-balance "
                       "cap" if pseudo.confident else f"no unlabelled text reaches probability {threshold}")
                print(f"round {r}: {why}; stopping", file=sys.stderr)
                summary.append({"round": r, "pseudo_labels": 0, "pseudo_per_class": [0] * len(names),
                                "trained": False, "confident": pseudo.confident})
                break
            train_table = unlabeled.with_unlabeled(splits.train, [texts[i] for i in pseudo.rows],
                                                   pseudo.labels.tolist())
        result, reused = run_round(rcfg, splits_lib.Splits(train_table, splits.validation, splits.test, names),
                                   pseudo)
        values.append(result["best_metric"])
        counts = np.bincount(pseudo.labels, minlength=len(names)).tolist() if pseudo else [0] * len(names)
        summary.append({"round": r, "pseudo_labels": len(pseudo.rows) if pseudo else 0, "pseudo_per_class": counts,
                        "trained": True, "reused": reused, "confident": pseudo.confident if pseudo else None,
                        "labeled_by": int(labeler.name.split("-")[1]) if pseudo else None,
                        "best_metric": values[-1], "eval_accuracy": result.get("eval_accuracy"),
                        "eval_macro_f1": result.get("eval_macro_f1"), "eval_loss": result.get("eval_loss"),
                        "lora_dropout": rcfg.method.lora_dropout})
        print(f"round {r}{' (reused: finished before with the same configuration and pseudo-labels)' if reused else ''}"
              f": {summary[-1]['pseudo_labels']} pseudo-labels {counts}; validation {metric} {values[-1]:.4f}; "
              f"chosen so far: round {chosen_round(values, metric, round_tolerance)}")
    best_round = chosen_round(values, metric, round_tolerance)
    record = {"unlabeled_file": unlabeled_file, "threshold": threshold, "class_cap_factor": cap_factor,
              "round_tolerance": round_tolerance, "labelled_shares": shares.tolist(), "label_names": names,
              "best_round": best_round, "metric_for_best_model": metric, "rounds": summary,
              "unlabeled": dedup.to_dict()}
    if is_main_process():
        finish(out, best_round, summary, record)
    return record


def finish(out: Path, best_round: int, summary: list[dict], record: dict) -> None:
    """RUN/adapter and evaluation files from the best round; RUN/metrics.jsonl: every round's events, then rounds."""
    best = out / f"round-{best_round}"
    with fileio.atomic_dir(out / "adapter") as tmp:
        shutil.copytree(best / "adapter", tmp, dirs_exist_ok=True)
    for name in COPIED:
        if (best / name).is_file():
            shutil.copy2(best / name, out / name)
    lines, offset = [], 0
    for s in summary:
        if not s["trained"]:
            continue
        last = offset
        for ev in read_metrics(out / f"round-{s['round']}" / "metrics.jsonl"):
            if isinstance(ev.get("step"), int):  # rounds one after another on the plots' step axis
                ev["step"] += offset
                last = max(last, ev["step"])
            lines.append(json.dumps({**ev, "round": s["round"]}))
        lines.append(json.dumps({"event": "round", "step": last, **s, "best": s["round"] == best_round}))
        offset = last
    fileio.atomic_write_text(out / "metrics.jsonl", "".join(line + "\n" for line in lines))
    fileio.atomic_write_json(out / "selftrain.json", record)
    finish_lib.plot(out)  # plots are a convenience: a failure is a warning, the finished rounds stay
