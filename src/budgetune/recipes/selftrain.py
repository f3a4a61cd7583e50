"""Self-training on unlabelled target texts: rounds of confident, class-balanced pseudo-labels and fresh students.

Round 0 trains as `budgetune train` does. Each next round labels the unlabelled texts (text pairs, read from the
unlabelled file's pair column) with the best model so far and keeps the confident ones, per task
(recipes.pseudo_labels: single-label: top probability >= threshold, no class above its labelled share x cap_factor;
multi-label: label sets by their smallest margin from the tuned thresholds; regression: every predicted value), and
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
from budgetune.budget.plan import resolve_auto_rank
from budgetune.config import Config
from budgetune.data import readers as data_lib
from budgetune.data import splits as splits_lib
from budgetune.data import unlabeled
from budgetune.errors import ConfigError, DataError, RunFolderError
from budgetune.hardware.devices import is_main_process
from budgetune.metrics import lower_is_better
from budgetune.modeling import backbone
from budgetune.modeling.scaling import near_best
from budgetune.recipes import pseudo_labels
from budgetune.recipes.pseudo_labels import Pseudo, select_confident  # noqa: F401 (re-exported)
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
    if not 1 <= cap_factor < float("inf"):
        raise ConfigError(f"--pseudo_label_class_cap must be a number of at least 1 (x the class's labelled share), "
                          f"got {cap_factor}")
    if not 0 <= noise_dropout < 1:
        raise ConfigError(f"--self_training_dropout must be in [0, 1), got {noise_dropout}")
    if not 0 <= round_tolerance <= 100:
        raise ConfigError(f"--round_tolerance must be between 0 and 100 points, got {round_tolerance}")


def unlabelled_pairs(cfg: Config, path: str, text_column: str | None) -> dict[str, tuple[str, str]] | None:
    """With --text_pair_column_name: the unlabelled file's (text, text_pair) rows, keyed as drop_heldout sees them
    (both texts); the file must have the pair column (same name). None without text pairs."""
    column = cfg.data.text_pair_column_name
    if not column:
        return None
    try:
        table = data_lib.load_table(path, split="train", text_column=text_column, require_labels=False,
                                    text_pair_column=column)
    except DataError as e:
        raise DataError(f"--unlabeled_file {path}: with --text_pair_column_name {column} the unlabelled file needs "
                        f"that column too: {e}") from None
    return {pair_key(t, q): (t, q) for t, q in zip(table.texts, table.text_pairs)}


def pair_key(text: str, pair: str) -> str:
    return f"{text}\n\n{pair}"


def pair_keys(table: data_lib.TextTable) -> data_lib.TextTable:
    """A table whose texts are its (text, text_pair) keys, for dropping held-out pairs."""
    if table.text_pairs is None:
        return table
    return data_lib.TextTable([pair_key(t, q) for t, q in zip(table.texts, table.text_pairs)], table.labels,
                              table.label_names, table.source)


def load_unlabelled(cfg: Config, splits: splits_lib.Splits, path: str,
                    text_column: str | None) -> tuple[unlabeled.Dedup, list[str], list[str] | None]:
    """(what was dropped, texts, text pairs or None): held-out and labelled texts (pairs: both texts) dropped."""
    pairs = unlabelled_pairs(cfg, path, text_column)
    if pairs is None:
        dedup = unlabeled.load_unlabeled(path, splits.validation, splits.test, splits.train, text_column)
        return dedup, dedup.kept, None
    found = unlabeled.drop_heldout(list(pairs), [pair_keys(t) for t in
                                                 unlabeled.heldout_tables(splits.validation, splits.test)],
                                   pair_keys(splits.train))
    if not found.kept:
        raise DataError(f"--unlabeled_file: {path}: no text pair left after dropping validation/test duplicates "
                        f"({found.summary(path)})")
    return found, [pairs[k][0] for k in found.kept], [pairs[k][1] for k in found.kept]


def round_config(cfg: Config, out: Path, r: int, noise_dropout: float) -> Config:
    """Round r's configuration: its own folder; from round 1 on, adapter dropout (noise) at least noise_dropout."""
    method = cfg.method
    if r > 0 and method.method in DROPOUT_METHODS and method.lora_dropout < noise_dropout:
        method = dataclasses.replace(method, lora_dropout=noise_dropout)
    output = dataclasses.replace(cfg.output, output_dir=str(out / f"round-{r}"),
                                 run_name=f"{cfg.output.run_name or out.name}-round-{r}")
    return dataclasses.replace(cfg, method=method, output=output)


def label_texts(run: Path, texts: list[str], pairs: list[str] | None, batch_size: int) -> tuple[np.ndarray, list | None]:
    """(logits, multi-label thresholds or None) of the run's best adapter on texts (the fast inference path)."""
    from budgetune.hardware.devices import release_accelerator
    from budgetune.inference.loading import bundle_thresholds, load_for_inference
    from budgetune.inference.runner import require_finite, table_logits

    accelerator, model, tokenizer, info = load_for_inference(run)
    table = data_lib.TextTable(texts, None, info["label_names"], "unlabelled", text_pairs=pairs)
    logits = table_logits(model, tokenizer, table, accelerator, batch_size, info["max_seq_length"], None,
                          desc="pseudo-labels")
    require_finite(logits, f"the unlabelled texts by {run}", info["precision"]["precision"], unit="unlabelled text",
                   advice="Check the run with `budgetune evaluate RUN --precision fp32`; BUDGETUNE_MIXED_PRECISION=fp32 "
                   "makes selftrain compute in fp32")
    release_accelerator()  # the next round's training starts its own accelerator
    return logits, bundle_thresholds(info)


def chosen_round(values: list[float], metric: str, tolerance: float) -> int:
    """The latest round whose metric is within `tolerance` points of the best; for loss, mse and mae (no points) the
    latest of the lowest, without a tolerance."""
    if lower_is_better(metric):
        return max(i for i, v in enumerate(values) if v == min(values))
    return max(near_best(dict(enumerate(values)), tolerance))


def same_pseudo_labels(path: Path, csv_text: str) -> bool:
    """The same rows and labels, numbers equal to 1e-4 (another thread count may change the last digit)."""
    return path.is_file() and pseudo_labels.same_csv(path.read_text(encoding="utf-8"), csv_text)


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


def round_ended(folder: Path) -> bool:
    """Whether a round in `folder` ran to its end: evaluation.json and the `end` event after it (one killed while
    finishing has written evaluation.json but not that event, and is trained again)."""
    path = folder / "metrics.jsonl"
    return ((folder / "evaluation.json").is_file() and path.is_file()
            and any(ev.get("event") == "end" for ev in read_metrics(path)))


def run_round(rcfg: Config, splits: splits_lib.Splits, pseudo: Pseudo | None) -> tuple[dict, bool]:
    """(train()'s result, whether it was reused): a finished round with this config and these pseudo-labels is
    reused; an unfinished one (killed) is trained again; one finished otherwise needs --overwrite_output_dir."""
    folder = Path(rcfg.output.output_dir)
    done = finished_round(folder, rcfg, pseudo.csv if pseudo else None)
    if done is not None and not rcfg.output.overwrite_output_dir:
        return done, True
    if round_ended(folder) and not rcfg.output.overwrite_output_dir:
        raise RunFolderError(f"{folder} holds a round trained with another configuration or other pseudo-labels; "
                             "pass --overwrite_output_dir to train every round again, or choose another --output_dir")
    if (folder / "metrics.jsonl").is_file():  # a round killed before it finished: train it again
        rcfg = dataclasses.replace(rcfg, output=dataclasses.replace(rcfg.output, overwrite_output_dir=True))
    if pseudo is not None and is_main_process():
        fileio.atomic_write_text(folder / "pseudo_labels.csv", pseudo.csv)
    hint = ("the same `budgetune selftrain` command: the finished rounds are reused and this round trains again "
            "from its start")
    return train_lib.train(rcfg, splits=splits, resume_hint=hint), False


def self_train(cfg: Config, unlabeled_file: str, rounds: int, threshold: float, *, cap_factor: float = 1.5,
               text_column: str | None = None, noise_dropout: float = 0.1, round_tolerance: float = 0.5) -> dict:
    """Rounds 0..rounds in RUN/round-N; the chosen round (see chosen_round) is copied into RUN. Returns a summary."""
    check_options(rounds, threshold, cap_factor, noise_dropout, round_tolerance)
    task, out = cfg.data.task, Path(cfg.output.output_dir)
    continuing = (out / "round-0").is_dir() and not cfg.output.overwrite_output_dir
    fileio.guard_output_dir(out, cfg.output.overwrite_output_dir, resuming=continuing, clear=False)
    splits = splits_lib.load_splits(cfg)
    names = splits.label_names
    cfg = with_resolved_rank(cfg, len(names))
    dedup, texts, pairs = load_unlabelled(cfg, splits, unlabeled_file, text_column)
    print(dedup.summary(unlabeled_file))
    if task == tasks.REGRESSION:
        print("note: --task regression: every unlabelled text is pseudo-labelled with its predicted value "
              "(--pseudo_label_threshold and --pseudo_label_class_cap apply to probabilities, which regression has "
              "not)", file=sys.stderr)
    shares = pseudo_labels.labelled_shares(task, splits.train.labels, len(names))
    metric = cfg.train.metric_for_best_model
    summary: list[dict] = []
    values: list[float] = []
    for r in range(rounds + 1):
        rcfg = round_config(cfg, out, r, noise_dropout)
        pseudo, train_table = None, splits.train
        if r > 0:
            labeler = out / f"round-{chosen_round(values, metric, round_tolerance)}"
            logits, thresholds = label_texts(labeler, texts, pairs, cfg.train.per_device_eval_batch_size)
            pseudo = pseudo_labels.pseudo_label(task, logits, thresholds, texts, pairs, names, shares, threshold,
                                                cap_factor)
            if not len(pseudo.rows):
                print(f"round {r}: {no_pseudo_labels(task, pseudo, threshold)}; stopping", file=sys.stderr)
                summary.append({"round": r, "pseudo_labels": 0, "pseudo_per_class": [0] * len(names),
                                "trained": False, "confident": pseudo.confident})
                break
            train_table = unlabeled.with_unlabeled(
                splits.train, [texts[i] for i in pseudo.rows], pseudo_labels.train_labels(task, pseudo),
                None if pairs is None else [pairs[i] for i in pseudo.rows])
        result, reused = run_round(rcfg, dataclasses.replace(splits, train=train_table), pseudo)
        values.append(result["best_metric"])
        counts = pseudo_labels.per_label_counts(task, pseudo, len(names))
        summary.append({"round": r, "pseudo_labels": len(pseudo.rows) if pseudo else 0, "pseudo_per_class": counts,
                        "trained": True, "reused": reused, "confident": pseudo.confident if pseudo else None,
                        "labeled_by": int(labeler.name.split("-")[1]) if pseudo else None,
                        "best_metric": values[-1],
                        **{f"eval_{m}": result.get(f"eval_{m}") for m in tasks.METRICS[task]},
                        "lora_dropout": rcfg.method.lora_dropout})
        print(f"round {r}{' (reused: finished before with the same configuration and pseudo-labels)' if reused else ''}"
              f": {summary[-1]['pseudo_labels']} pseudo-labels{'' if counts is None else f' {counts}'}; validation "
              f"{metric} {values[-1]:.4f}; chosen so far: round {chosen_round(values, metric, round_tolerance)}")
    best_round = chosen_round(values, metric, round_tolerance)
    record = {"unlabeled_file": unlabeled_file, "task": task,
              "threshold": None if task == tasks.REGRESSION else threshold,
              "class_cap_factor": None if task == tasks.REGRESSION else cap_factor,
              "round_tolerance": None if lower_is_better(metric) else round_tolerance, "labelled_shares": None if shares is None else shares.tolist(),
              "label_names": names, "best_round": best_round, "metric_for_best_model": metric, "rounds": summary,
              "unlabeled": dedup.to_dict()}
    if is_main_process():
        finish(out, best_round, summary, record)
    return record


def with_resolved_rank(cfg: Config, num_labels: int) -> Config:
    """--rank auto resolved once for every round: each round's config.yaml holds the resolved rank, which a continued
    run compares its configuration against (finished_round)."""
    cfg, note = resolve_auto_rank(cfg, num_labels)
    if note:
        print(note)
    return cfg


def no_pseudo_labels(task: str, pseudo: Pseudo, threshold: float) -> str:
    """Why a round kept no pseudo-label."""
    what = "probability" if task == tasks.SINGLE_LABEL else "confidence"
    if pseudo.confident:
        return f"none of the {pseudo.confident} texts at {what} >= {threshold} fits the class-balance cap"
    return f"no unlabelled text reaches {what} {threshold}"


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
