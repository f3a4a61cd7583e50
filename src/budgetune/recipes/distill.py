"""Knowledge distillation: big (unbudgeted) teachers' outputs train a student under the budget, for every task.

Per row i of a batch of N rows: alpha x the task's loss on the gold label (0 for an unlabelled row) + (1 - alpha) x
the soft-target loss (single-label: T^2 x KL(teacher_T || student_T); multi-label: T^2 x BCE on the teachers'
sigmoid probabilities at T; regression: squared error to the teachers' values); the loss is the mean over all N rows,
plus AdaLoRA's orthogonal regulariser at its configured weight (recipes.soft_targets.kd_loss). Teacher logits are
computed once per text (or text pair) with the fast inference path and cached on disk, keyed by the teacher's files,
the task, the texts and the precision the pass computes in; temperature and ensembling are applied afterwards.
ensemble_log_probs and kd_loss are re-exported from recipes.soft_targets.
"""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch

from budgetune import fileio, tasks
from budgetune.budget.plan import check_budget, resolve_auto_rank
from budgetune.config import Config
from budgetune.data import readers as data_lib
from budgetune.data import splits as splits_lib
from budgetune.data import unlabeled
from budgetune.errors import AdapterError, ConfigError
from budgetune.hardware.devices import default_device_type, is_main_process
from budgetune.inference import adapter_bundle, precisions
from budgetune.inference.loading import adapter_dir, bundle_info, bundle_task, is_full_model
from budgetune.recipes.soft_targets import ensemble_log_probs, kd_loss, placeholder, teacher_targets  # noqa: F401
from budgetune.training import train as train_lib
from budgetune.training.checkpoint import NOTED

CACHE_VERSION = "budgetune-teacher-logits-v2"
SKIP_IN_FINGERPRINT = {"README.md"}  # the model card may be rewritten (e.g. by distil) without changing a logit
BASE_FILES = ("config.json", "*.safetensors", "*.bin", "*.safetensors.index.json", "*.bin.index.json")


def fingerprint(teacher: str | Path) -> str | None:
    """The teacher's identity by content: every file of its bundle (weights, configs, tokenizer, labels) and, for an
    adapter, its base model's weights (`base_fingerprint`). None when the base is a Hub model not downloaded yet."""
    folder = adapter_dir(teacher)
    h = hashlib.sha256(CACHE_VERSION.encode())
    hash_files(h, folder, [p for p in folder.rglob("*") if p.is_file() and p.name not in SKIP_IN_FINGERPRINT])
    if is_full_model(folder):  # every weight is in the folder
        return h.hexdigest()
    info = bundle_info(folder)
    base = base_fingerprint(info["base_model_name_or_path"], info.get("revision"))
    if base is None:
        return None
    h.update(f"base={base}".encode())
    return h.hexdigest()


def base_fingerprint(name: str, revision: str | None) -> str | None:
    """An adapter's base model by content: the weight and config files of a local (or the packaged) model folder;
    for a Hub id, the commit its revision resolves to in the local Hub cache (a commit fixes every file's content),
    None when the model is not in that cache yet."""
    from huggingface_hub import try_to_load_from_cache

    from budgetune.modeling.backbone import resolve_model_path

    folder = Path(resolve_model_path(name))
    if folder.is_dir():
        h = hashlib.sha256()
        hash_files(h, folder, list({p for pattern in BASE_FILES for p in folder.glob(pattern) if p.is_file()}))
        return h.hexdigest()
    found = try_to_load_from_cache(name, "config.json", revision=revision)
    return f"{name}@{Path(found).parent.name}" if isinstance(found, str) else None


def hash_files(h, folder: Path, files: list[Path]) -> None:
    """Feed each file's path (relative to `folder`) and bytes into hash `h`, in path order."""
    for f in sorted(files):
        h.update(str(f.relative_to(folder)).encode() + b"\0")
        with open(f, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                h.update(block)


def texts_digest(texts: list[str], max_seq_length: int, task: str = tasks.SINGLE_LABEL,
                 text_pairs: list[str] | None = None) -> str:
    """The texts (and text pairs), the truncation length and the task the logits are read as."""
    h = hashlib.sha256(f"{max_seq_length}\0{task}\0".encode())
    data_lib.hash_texts(h, texts)
    if text_pairs is not None:
        h.update(b"text_pairs")
        data_lib.hash_texts(h, text_pairs)
    return h.hexdigest()


FINITE_ADVICE = {"unit": "training text", "advice": "Check the teacher alone with `budgetune evaluate TEACHER "
                 "--precision fp32`; BUDGETUNE_MIXED_PRECISION=fp32 makes distill compute it in fp32 (the training "
                 "texts are numbered in the order distill reads them: the split's training rows, then the kept "
                 "unlabelled texts)"}


def cache_path(cache_dir: str | Path, teacher_fp: str, texts_fp: str, precision: str) -> Path:
    """Where a teacher's logits are cached. int8 names its backend: onnxruntime's and torch's int8 give different
    logits, and which one computes depends on what is installed."""
    return Path(cache_dir) / "teacher-logits" / f"{teacher_fp[:24]}-{texts_fp[:24]}-{cache_precision(precision)}.npy"


def cache_precision(precision: str) -> str:
    """A precision as the cache and a resume tell them apart: int8 with its backend (int8-onnxruntime)."""
    return f"int8-{precisions.int8_backend()[0]}" if precision == "int8" else precision


class TeacherPass(NamedTuple):
    logits: np.ndarray  # [n, labels or targets], in text order
    cache_file: Path | None  # None: the teacher's base cannot be fingerprinted, nothing cached
    cache_hit: bool
    precision: str  # what the teacher computed in: fp32, bf16 or int8
    fingerprint: str | None = None  # the teacher's content hash (`fingerprint`); None where it cannot be had


def teacher_precision(info: dict) -> str:
    """What the teacher's pass computes in on this machine: `--precision auto` of its bundle (the bundle's measured
    choice where it can compute here, else the hardware rule), as load_for_inference resolves it."""
    return precisions.resolve("auto", info, default_device_type()).name


def teacher_logits(teacher: str | Path, texts: list[str], cache_dir: str | Path, batch_size: int = 128,
                   text_pairs: list[str] | None = None) -> TeacherPass:
    """The teacher's logits, computed once per text (text pair: tokenized as a true pair), task, teacher content
    (`fingerprint`) and precision (the same bundle computes in bf16 on one machine, fp32 on another)."""
    from budgetune.hardware.devices import release_accelerator
    from budgetune.inference.loading import load_for_inference
    from budgetune.inference.runner import require_finite, table_logits

    info = bundle_info(teacher)
    digest = texts_digest(texts, info["max_seq_length"], bundle_task(info), text_pairs)
    teacher_fp, precision = fingerprint(teacher), teacher_precision(info)
    if teacher_fp is not None and (path := cache_path(cache_dir, teacher_fp, digest, precision)).is_file():
        logits = np.load(path)
        if logits.shape == (len(texts), len(info["label_names"])):
            require_finite(logits, f"--teacher {teacher} (cached in {path})", precision, **FINITE_ADVICE)
            return TeacherPass(logits, path, True, precision, teacher_fp)
    accelerator, model, tokenizer, info = load_for_inference(teacher)
    precision = info["precision"]["precision"]  # as computed (an unmerged model may not take int8)
    table = data_lib.TextTable(texts, None, info["label_names"], str(teacher), text_pairs=text_pairs)
    logits = table_logits(model, tokenizer, table, accelerator, batch_size, info["max_seq_length"], None,
                          desc=f"teacher {Path(teacher).name}")
    require_finite(logits, f"--teacher {teacher}", precision, **FINITE_ADVICE)
    del model
    release_accelerator()  # the student's training starts its own accelerator in this process
    teacher_fp = teacher_fp or fingerprint(teacher)  # a Hub base is in the Hub cache now that it has loaded
    logits = logits.astype(np.float32)  # as the cache keeps them: a resume reading the cache gets the same targets
    if teacher_fp is None:
        return TeacherPass(logits, None, False, precision, None)
    path = cache_path(cache_dir, teacher_fp, digest, precision)
    with fileio.atomic_path(path) as tmp, open(tmp, "wb") as f:
        np.save(f, logits)
    return TeacherPass(logits, path, False, precision, teacher_fp)


SPLIT_KEYS = (("data", "validation_file"), ("data", "validation_split_percentage"), ("train", "seed"))


def same_split(teacher: str | Path, cfg: Config) -> bool | None:
    """Whether a teacher run held out the student's validation rows too (None: unknown, e.g. a bare bundle).

    A teacher trained on the student's validation rows would make the student's validation figures optimistic.
    """
    import yaml

    path = run_config(teacher)
    if not path.is_file():
        return None
    tcfg = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    s = cfg.to_dict()
    if not same_source(tcfg.get("data", {}).get("dataset_name"), s["data"]["dataset_name"]):
        return None
    keys = SPLIT_KEYS[:1] if s["data"]["validation_file"] else SPLIT_KEYS
    return all(same_source(tcfg.get(g, {}).get(k), s[g][k]) for g, k in keys)


def same_source(a, b) -> bool:
    """Two config values equal, or two spellings of one local file or folder (relative and absolute, say; a relative
    path is read from the current folder)."""
    if a == b:
        return True
    if not (isinstance(a, str) and isinstance(b, str)):
        return False
    pa, pb = Path(a), Path(b)
    return pa.exists() and pb.exists() and pa.resolve() == pb.resolve()


def run_config(teacher: str | Path) -> Path:
    """The config.yaml of the run a teacher comes from: in the run folder given, or beside the run's adapter/
    folder when that is what was given (RUN/adapter)."""
    folder = Path(teacher)
    own = folder / "config.yaml"
    if not own.is_file() and folder.name == "adapter" and (folder.parent / "config.yaml").is_file():
        return folder.parent / "config.yaml"
    return own


def unknown_split(teacher: str | Path) -> str:
    """Why `same_split` cannot tell (it returned None)."""
    path = run_config(teacher)
    return f"{path} is missing (a bare bundle)" if not path.is_file() else "it trained on another dataset"


def check_teachers(teachers: list[str], label_names: list[str], student_tokenizer, cfg: Config) -> list[dict]:
    """Each teacher's identity; another task, other label names or order (another number of regression targets),
    pairs against single texts are refused; another tokenizer noted."""
    out = []
    for t in teachers:
        info = bundle_info(t)
        check_same_task(t, info, cfg, label_names)
        same = _same_tokenizer(adapter_dir(t), student_tokenizer)
        entry = {"path": str(t), "folder": str(adapter_dir(t)), "method": info.get("method"),
                 "base_model": info["base_model_name_or_path"], "label_names": info["label_names"],
                 "max_seq_length": info["max_seq_length"], "validation": info.get("metrics"),
                 "same_tokenizer_as_student": same, "same_validation_split": same_split(t, cfg)}
        if entry["same_validation_split"] is False:
            print(f"warning: teacher {t} held out another validation split (seed or split settings differ): it "
                  "may have trained on the student's validation rows, so the student's validation figures may be "
                  "optimistic", file=sys.stderr)
        elif entry["same_validation_split"] is None:
            print(f"warning: teacher {t}: {unknown_split(t)}, so budgetune cannot check that it held out the "
                  "student's validation rows: if it trained on them, the student's validation figures are optimistic",
                  file=sys.stderr)
        if not same:
            print(f"note: teacher {t} has another tokenizer than the student: allowed, each model tokenizes the "
                  "texts for itself", file=sys.stderr)
        out.append(entry)
    return out


def check_same_task(teacher: str, info: dict, cfg: Config, label_names: list[str]) -> None:
    """Refuse a teacher that answers another question than the student learns, naming the teacher."""
    task, theirs = cfg.data.task, bundle_task(info)
    if theirs != task:
        raise AdapterError(f"--teacher {teacher}: it is a --task {theirs} model but the student trains --task {task} "
                           "(teacher and student must have the same task)")
    if task == tasks.REGRESSION and len(info["label_names"]) != len(label_names):
        raise AdapterError(f"--teacher {teacher}: it predicts {len(info['label_names'])} target(s) "
                           f"{info['label_names']} but the student trains on {len(label_names)} {list(label_names)}")
    if task == tasks.REGRESSION and info["label_names"] != list(label_names):
        print(f"warning: teacher {teacher} predicts the targets {info['label_names']}, the student trains on "
              f"{list(label_names)}: the teacher's target k is taught as the student's target k, in that order",
              file=sys.stderr)
    if task != tasks.REGRESSION and info["label_names"] != list(label_names):
        raise AdapterError(
            f"--teacher {teacher}: its labels are {info['label_names']} but the training data's are "
            f"{list(label_names)} (names and order must match: a teacher's class k must be the student's class k)")
    pair, student_pair = info.get("text_pair_column_name"), cfg.data.text_pair_column_name
    if bool(pair) != bool(student_pair):
        raise AdapterError(f"--teacher {teacher}: it {_reads(pair)} but the student {_reads(student_pair)} "
                           "(both must read text pairs, or neither)")


def _reads(pair_column: str | None) -> str:
    return f"reads text pairs (--text_pair_column_name {pair_column})" if pair_column else "reads single texts"


def _same_tokenizer(folder: Path, student_tokenizer) -> bool:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(folder)
    return type(tok).__name__ == type(student_tokenizer).__name__ and tok.get_vocab() == student_tokenizer.get_vocab()


def check_options(teachers: list[str], alpha: float, temperature: float, output_dir: Path) -> None:
    if not teachers:
        raise ConfigError("--teacher: name at least one teacher run or adapter folder")
    if not 0 <= alpha <= 1:
        raise ConfigError(f"--alpha must be between 0 and 1 (weight of the gold-label loss), got {alpha}")
    if not temperature > 0 or not np.isfinite(temperature):
        raise ConfigError(f"--temperature must be a positive number, got {temperature}")
    for t in teachers:
        folder = adapter_dir(t)  # a missing or foreign folder is refused before any data loads
        if output_dir.resolve() in (Path(t).resolve(), folder.resolve(), folder.resolve().parent):
            raise ConfigError(f"--output_dir {output_dir} is the teacher {t}: the student would overwrite it")


def distill(cfg: Config, teachers: list[str], *, unlabeled_file: str | None = None, text_column: str | None = None,
            temperature: float = 2.0, alpha: float = 0.5, batch_size: int | None = None) -> dict:
    """Train cfg's student on its labelled rows (+ unlabelled texts) against the teachers; returns train()'s result."""
    from transformers import AutoTokenizer

    from budgetune.modeling.backbone import resolve_model_path

    out, task = Path(cfg.output.output_dir), cfg.data.task
    if unlabeled_file and cfg.data.text_pair_column_name:
        raise ConfigError(f"--unlabeled_file {unlabeled_file}: unlabelled texts cannot be used with "
                          f"--text_pair_column_name (budgetune reads no unlabelled text pairs yet)")
    check_options(teachers, alpha, temperature, out)
    fileio.guard_output_dir(out, cfg.output.overwrite_output_dir,
                               resuming=bool(cfg.train.resume_from_checkpoint), clear=False)
    splits = splits_lib.load_splits(cfg)
    names = splits.label_names
    resolved, _ = resolve_auto_rank(cfg, len(names))
    check_budget(resolved, len(names))  # before the teachers' pass: an over-budget student fails at once
    student_tok = AutoTokenizer.from_pretrained(resolve_model_path(cfg.model.model_name_or_path),
                                                revision=cfg.model.revision)
    identities = check_teachers(teachers, names, student_tok, cfg)
    n_labelled = len(splits.train.texts)
    dedup = None
    if unlabeled_file:
        dedup = unlabeled.load_unlabeled(unlabeled_file, splits.validation, splits.test, splits.train, text_column)
        print(dedup.summary(unlabeled_file))
        splits.train = unlabeled.with_unlabeled(splits.train, dedup.kept,
                                                [placeholder(task, len(names))] * len(dedup.kept))
    all_logits = teachers_logits(identities, splits, cfg, batch_size, n_labelled)
    targets = torch.from_numpy(teacher_targets(task, all_logits, temperature))
    result = train_lib.train(cfg, splits=splits, loss_fn=kd_loss(targets, alpha, temperature, task),
                             resume_hint="the same `budgetune distill` command (the same teachers, --alpha, "
                             "--temperature and --unlabeled_file) with --resume_from_checkpoint auto",
                             loss_identity=loss_identity(identities, all_logits, splits, cfg, alpha, temperature))
    record = {"task": task, "teachers": identities, "alpha": alpha, "temperature": temperature,
              "labelled_rows": n_labelled, "unlabeled_file": unlabeled_file,
              "unlabeled": dedup.to_dict() if dedup else None}
    if is_main_process():
        write_record(out, record)
    return result


def loss_identity(identities: list[dict], logits: list[np.ndarray], splits, cfg: Config, alpha: float,
                  temperature: float) -> dict:
    """What the student's loss is made of, kept in its checkpoints: a resume with other teachers (by content: their
    files and base weights; a teacher whose base cannot be fingerprinted, by its logits), other training texts
    (another --unlabeled_file), alpha or T would change the loss in the middle of a run, and is refused. The
    teachers' precision (int8 with its backend) is only noted: another machine may compute them in another one,
    which moves the targets by rounding only."""
    train = splits.train
    teachers = [t["fingerprint"] or "logits " + hashlib.sha256(np.ascontiguousarray(z).tobytes()).hexdigest()
                for t, z in zip(identities, logits)]
    return {"recipe": "budgetune distill", "alpha": alpha, "temperature": temperature,
            "teachers (content hashes)": teachers,
            "training texts (hash)": texts_digest(train.texts, cfg.data.max_seq_length, splits.task, train.text_pairs),
            NOTED: {"teacher precisions": [cache_precision(t["precision"]) for t in identities]}}


def teachers_logits(identities: list[dict], splits, cfg: Config, batch_size: int | None,
                    n_labelled: int) -> list[np.ndarray]:
    """Each teacher's logits on the training rows (cached), its cache entry and its fit to the gold labels recorded
    in its identity."""
    cache = Path(splits_lib.cache_dir(cfg))
    train, out = splits.train, []
    for entry in identities:
        got = teacher_logits(entry["path"], train.texts, cache, batch_size or cfg.train.per_device_eval_batch_size,
                             train.text_pairs)
        entry.update(cache_file=str(got.cache_file) if got.cache_file else None, cache_hit=got.cache_hit,
                     precision=got.precision, fingerprint=got.fingerprint, **gold_fit(splits.task, got.logits[:n_labelled],
                                                         train.labels[:n_labelled], splits.label_names, entry["path"]))
        out.append(got.logits)
    return out


def gold_fit(task: str, logits: np.ndarray, labels: list, names: list[str], teacher: str) -> dict:
    """How well a teacher answers the labelled training rows: single-label, `agreement_with_gold` (its accuracy);
    other tasks, `teacher_on_gold` {the task's default metric: value} (multi-label at the teacher's thresholds)."""
    if task == tasks.SINGLE_LABEL:
        agree = float(np.mean(logits.argmax(-1) == np.asarray(labels))) if len(labels) else float("nan")
        return {"agreement_with_gold": agree}
    if not len(labels):
        return {"teacher_on_gold": None}
    from budgetune.inference.loading import bundle_thresholds

    metric = tasks.DEFAULT_METRIC[task]
    m = tasks.task_metrics(task, logits, labels, names, bundle_thresholds(bundle_info(teacher)))
    return {"teacher_on_gold": {metric: m[metric]}}


def write_record(out: Path, record: dict) -> None:
    """distill.json, a `distill` event in metrics.jsonl, and the teachers named in the student's model card."""
    fileio.atomic_write_json(out / "distill.json", record)
    with open(out / "metrics.jsonl", "a", encoding="utf-8") as f:
        f.write(json.dumps({"event": "distill", **{k: v for k, v in record.items() if k != "teachers"},
                            "teachers": [t["path"] for t in record["teachers"]]}) + "\n")
    bundle = out / "adapter"
    if (bundle / adapter_bundle.BUNDLE_FILE).is_file():
        fileio.update_json(bundle / adapter_bundle.BUNDLE_FILE, {"distilled_from": [
            {k: t[k] for k in ("path", "method", "base_model")} for t in record["teachers"]]})
        card = (bundle / "README.md").read_text(encoding="utf-8")
        fileio.atomic_write_text(bundle / "README.md", card.rstrip("\n") + "\n\n" + card_section(record) + "\n")


CARD_LOSS = {  # the gold-label loss and the soft-target loss, in words, per task
    tasks.SINGLE_LABEL: ("cross-entropy", "T^2 x KL(teacher || student)"),
    tasks.MULTI_LABEL: ("binary cross-entropy", "T^2 x binary cross-entropy on the teachers' sigmoid probabilities"),
    tasks.REGRESSION: ("squared error", "squared error to the teachers' values"),
}


def card_section(record: dict) -> str:
    task = record.get("task", tasks.SINGLE_LABEL)
    hard, soft = CARD_LOSS[task]
    at = f", T = {record['temperature']}" if task != tasks.REGRESSION else ""
    averaged = "values" if task == tasks.REGRESSION else "probabilities"
    lines = ["## Distilled from", "",
             f"Trained by `budgetune distill`: loss = mean over a batch's rows of {record['alpha']} x {hard} "
             f"on the gold label (0 for an unlabelled row) + {1 - record['alpha']:g} x {soft}"
             f"{at} (+ AdaLoRA's orthogonal regulariser at its configured weight)"
             + (f"; the teachers' {averaged} are averaged." if len(record["teachers"]) > 1 else "."), ""]
    metric = tasks.DEFAULT_METRIC[task]
    for t in record["teachers"]:
        value = (t.get("validation") or {}).get(f"eval_{metric}")
        lines.append(f"- `{t['path']}` ({t['method']} on {t['base_model']}"
                     + (f", validation {metric} {value:.4f}" if isinstance(value, float) else "") + ")")
    u = record.get("unlabeled")
    if u:
        lines += ["", f"Unlabelled texts: {record['unlabeled_file']} ({u['kept']} used of {u['read']}; "
                  f"{u['dropped_exact_validation_or_test'] + u['dropped_normalised_validation_or_test']} dropped as "
                  "duplicates of validation/test texts)."]
    return "\n".join(lines)
