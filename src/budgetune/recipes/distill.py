"""Knowledge distillation: big (unbudgeted) teachers' probabilities train a student under the budget.

Per row i of a batch of N rows: alpha x cross-entropy on the gold label (0 for an unlabelled row) + (1 - alpha) x T^2 x
KL(teacher_T || student_T); the loss is the mean over all N rows, plus AdaLoRA's orthogonal regulariser at its
configured weight (see kd_loss). Teacher logits are computed once per text with the fast inference path and
cached on disk, keyed by the teacher's files and the texts; temperature and ensembling are applied afterwards.
"""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from budgetune import fileio, tasks
from budgetune.adalora import lean_step
from budgetune.budget.plan import check_budget, resolve_auto_rank
from budgetune.config import Config
from budgetune.data import readers as data_lib
from budgetune.data import splits as splits_lib
from budgetune.data import unlabeled
from budgetune.errors import AdapterError, ConfigError
from budgetune.hardware.devices import is_main_process, resolve_precision
from budgetune.inference import adapter_bundle
from budgetune.inference.loading import adapter_dir, bundle_info, is_full_model
from budgetune.metrics import softmax
from budgetune.training import train as train_lib

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


def texts_digest(texts: list[str], max_seq_length: int) -> str:
    h = hashlib.sha256(f"{max_seq_length}\0".encode())
    data_lib.hash_texts(h, texts)
    return h.hexdigest()


def cache_path(cache_dir: str | Path, teacher_fp: str, texts_fp: str) -> Path:
    return Path(cache_dir) / "teacher-logits" / f"{teacher_fp[:24]}-{texts_fp[:24]}.npy"


def teacher_logits(teacher: str | Path, texts: list[str], cache_dir: str | Path,
                   batch_size: int = 128) -> tuple[np.ndarray, Path | None, bool]:
    """(logits [n, labels] in text order, cache file, whether it was a cache hit); computed once per text and
    teacher content (`fingerprint`). No cache file (None) when the teacher's base cannot be fingerprinted."""
    from budgetune.hardware.devices import release_accelerator
    from budgetune.inference.loading import load_for_inference
    from budgetune.inference.runner import table_logits

    info = bundle_info(teacher)
    digest = texts_digest(texts, info["max_seq_length"])
    teacher_fp = fingerprint(teacher)
    if teacher_fp is not None and (path := cache_path(cache_dir, teacher_fp, digest)).is_file():
        logits = np.load(path)
        if logits.shape == (len(texts), len(info["label_names"])):
            return logits, path, True
    accelerator, model, tokenizer, info = load_for_inference(teacher)
    table = data_lib.TextTable(texts, None, info["label_names"], str(teacher))
    logits = table_logits(model, tokenizer, table, accelerator, batch_size, info["max_seq_length"], None,
                          desc=f"teacher {Path(teacher).name}")
    del model
    release_accelerator()  # the student's training starts its own accelerator in this process
    teacher_fp = teacher_fp or fingerprint(teacher)  # a Hub base is in the Hub cache now that it has loaded
    if teacher_fp is None:
        return logits, None, False
    path = cache_path(cache_dir, teacher_fp, digest)
    with fileio.atomic_path(path) as tmp, open(tmp, "wb") as f:
        np.save(f, logits.astype(np.float32))
    return logits, path, False


def ensemble_log_probs(logits: list[np.ndarray], temperature: float) -> np.ndarray:
    """log of the teachers' averaged probabilities at temperature T (averaging probabilities, not logits)."""
    probs = np.mean([softmax(z, temperature) for z in logits], axis=0)
    return np.log(np.clip(probs, 1e-12, None)).astype(np.float32)


def kd_loss(teacher_log_probs: torch.Tensor, alpha: float, temperature: float):
    """loss_fn(model, batch) for train(): rows are looked up in teacher_log_probs by the batch's `idx`.

    Defined per row and averaged over all N rows of the batch, labelled or not:

        loss = 1/N sum_i [alpha x CE_i + (1 - alpha) x T^2 x KL_i] + orth_reg_weight x R

    CE_i: cross-entropy on row i's gold label (0 for an unlabelled row); KL_i: KL(teacher_T || student_T) of row i;
    R: AdaLoRA's orthogonal regulariser (absent for other methods), at its configured weight on every batch,
    whatever alpha and whether or not the batch has a labelled row. A labelled row weighs the same in a batch of
    labelled rows as among unlabelled ones. With alpha = 1 and every row labelled it is the model's own loss
    (transformers' mean cross-entropy, plus AdaLoRA's regulariser), so such a run equals ordinary training.
    """
    t2 = temperature * temperature

    def loss_fn(model, batch: dict) -> torch.Tensor:
        out = model(**{k: v for k, v in batch.items() if k not in ("idx", "labels")})
        rows, labels = out.logits.shape[0], batch.get("labels")
        terms = []
        if alpha > 0 and labels is not None:  # unlabelled rows (ignored) add 0 to the sum
            ce = F.cross_entropy(out.logits, labels.view(-1), ignore_index=unlabeled.UNLABELED, reduction="sum")
            terms.append(alpha * ce / rows)
        if alpha < 1:
            log_q = F.log_softmax(out.logits.float() / temperature, dim=-1)
            log_p = teacher_log_probs[batch["idx"].to(teacher_log_probs.device)].to(log_q.device)
            terms.append((1 - alpha) * t2 * F.kl_div(log_q, log_p, reduction="sum", log_target=True) / rows)
        if (penalty := lean_step.orth_penalty(model)) is not None:
            terms.append(penalty)
        return sum(terms[1:], terms[0]) if terms else out.logits.sum() * 0.0

    return loss_fn


SPLIT_KEYS = (("data", "validation_file"), ("data", "validation_split_percentage"), ("train", "seed"))


def same_split(teacher: str | Path, cfg: Config) -> bool | None:
    """Whether a teacher run held out the student's validation rows too (None: unknown, e.g. a bare bundle).

    A teacher trained on the student's validation rows would make the student's validation figures optimistic.
    """
    import yaml

    path = Path(teacher) / "config.yaml"
    if not path.is_file():
        return None
    tcfg = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    s = cfg.to_dict()
    if tcfg.get("data", {}).get("dataset_name") != s["data"]["dataset_name"]:
        return None
    keys = SPLIT_KEYS[:1] if s["data"]["validation_file"] else SPLIT_KEYS
    return all(tcfg.get(g, {}).get(k) == s[g][k] for g, k in keys)


def unknown_split(teacher: str | Path) -> str:
    """Why `same_split` cannot tell (it returned None)."""
    path = Path(teacher) / "config.yaml"
    return f"{path} is missing (a bare bundle)" if not path.is_file() else "it trained on another dataset"


def check_teachers(teachers: list[str], label_names: list[str], student_tokenizer, cfg: Config) -> list[dict]:
    """Each teacher's identity; other label names or another label order is refused, another tokenizer noted."""
    out = []
    for t in teachers:
        info = bundle_info(t)
        if info["label_names"] != list(label_names):
            raise AdapterError(
                f"--teacher {t}: its labels are {info['label_names']} but the training data's are {list(label_names)} "
                "(names and order must match: a teacher's class k must be the student's class k)")
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
    tasks.require_single_label(cfg.data.task, "distill")
    from transformers import AutoTokenizer

    from budgetune.modeling.backbone import resolve_model_path

    out = Path(cfg.output.output_dir)
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
        splits.train = unlabeled.with_unlabeled(splits.train, dedup.kept)
    cache = Path(splits_lib.cache_dir(cfg))
    all_logits = []
    for entry in identities:
        logits, path, hit = teacher_logits(entry["path"], splits.train.texts, cache,
                                           batch_size or cfg.train.per_device_eval_batch_size)
        entry.update(cache_file=str(path) if path else None, cache_hit=hit,
                     precision=None if hit else resolve_precision("auto").name,
                     agreement_with_gold=_agreement(logits[:n_labelled], splits.train.labels[:n_labelled]))
        all_logits.append(logits)
    log_p = torch.from_numpy(ensemble_log_probs(all_logits, temperature))
    result = train_lib.train(cfg, splits=splits, loss_fn=kd_loss(log_p, alpha, temperature))
    record = {"teachers": identities, "alpha": alpha, "temperature": temperature, "labelled_rows": n_labelled,
              "unlabeled_file": unlabeled_file, "unlabeled": dedup.to_dict() if dedup else None}
    if is_main_process():
        write_record(out, record)
    return result


def _agreement(logits: np.ndarray, labels: list[int]) -> float:
    return float(np.mean(logits.argmax(-1) == np.asarray(labels))) if len(labels) else float("nan")


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


def card_section(record: dict) -> str:
    lines = ["## Distilled from", "",
             f"Trained by `budgetune distill`: loss = mean over a batch's rows of {record['alpha']} x cross-entropy "
             f"on the gold label (0 for an unlabelled row) + {1 - record['alpha']:g} x T^2 x KL(teacher || student), "
             f"T = {record['temperature']} (+ AdaLoRA's orthogonal regulariser at its configured weight)"
             + ("; the teachers' probabilities are averaged." if len(record["teachers"]) > 1 else "."), ""]
    for t in record["teachers"]:
        acc = (t.get("validation") or {}).get("eval_accuracy")
        lines.append(f"- `{t['path']}` ({t['method']} on {t['base_model']}"
                     + (f", validation accuracy {acc:.4f}" if isinstance(acc, float) else "") + ")")
    u = record.get("unlabeled")
    if u:
        lines += ["", f"Unlabelled texts: {record['unlabeled_file']} ({u['kept']} used of {u['read']}; "
                  f"{u['dropped_exact_validation_or_test'] + u['dropped_normalised_validation_or_test']} dropped as "
                  "duplicates of validation/test texts)."]
    return "\n".join(lines)
