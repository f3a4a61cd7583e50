"""Inference over a tokenized dataset, and the classification metrics."""

from __future__ import annotations

import numpy as np
import torch
from torch.utils.data import DataLoader

from budgetune import batching


def make_accelerator(**kwargs):
    """An Accelerator that joins the launcher's process group on CPU-only machines too.

    Under torchrun, accelerate only forms a (gloo) group on CPU when asked for cpu=True; without it every process
    would silently run alone on all the data. A launch of several processes that did not form a group is an error.
    """
    import os

    from accelerate import Accelerator

    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and "cpu" not in kwargs:
        dev = getattr(torch, "accelerator", None)
        kwargs["cpu"] = not (dev.is_available() if dev is not None else torch.cuda.is_available())
    accelerator = Accelerator(**kwargs)
    if accelerator.num_processes != world:
        raise RuntimeError(f"launched as {world} processes (WORLD_SIZE) but accelerate formed a group of "
                           f"{accelerator.num_processes}; check the launcher and `accelerate config`")
    return accelerator


# On CPU, batches of more padded tokens than this can run slower per token: the feed-forward's activations (tokens
# x 4 x hidden floats) no longer fit in the cache. bench/inference_parts.py on 2 cores, MiniLM, AG News: 0 to 17 %
# more texts/s than 256 texts per batch, run to run. A GPU wants the largest batch: no cap there.
CPU_BATCH_TOKENS = 2048


def token_cap(device) -> int | None:
    """Padded tokens per inference batch on this device (None: batch_size alone decides)."""
    return CPU_BATCH_TOKENS if torch.device(device).type == "cpu" else None


def inference_loader(dataset, tokenizer, batch_size: int, pad_to_multiple_of: int | None, num_workers: int = 0,
                     pin_memory: bool = False, max_tokens: int | None = None) -> DataLoader:
    """Length-sorted batches (least padding); the `idx` column puts outputs back in input order."""
    sampler = batching.SortedBatchSampler(dataset["length"], batch_size, max_tokens=max_tokens)
    return DataLoader(dataset, batch_sampler=sampler, collate_fn=batching.make_collator(tokenizer, pad_to_multiple_of),
                      num_workers=num_workers, pin_memory=pin_memory)


@torch.inference_mode()
def predict_logits(model, loader, accelerator, n_rows: int, desc: str = "eval") -> np.ndarray:
    """Logits in input order (float32 numpy, [n_rows, num_labels]), complete on every process.

    Under several processes each one sees a shard of the batches, and the shards' last batches may repeat rows
    or differ in size: rows are padded with idx -1, gathered, and placed by idx, so nothing counts twice.
    """
    from tqdm.auto import tqdm

    was_training = model.training
    model.eval()
    out, seen, pending = None, np.zeros(n_rows, dtype=bool), []
    for batch in tqdm(loader, desc=desc, disable=not accelerator.is_main_process, leave=False):
        idx = batch.pop("idx")
        batch.pop("labels", None)
        logits = model(**batch).logits.float()
        if accelerator.num_processes > 1:
            idx = accelerator.gather(accelerator.pad_across_processes(idx, dim=0, pad_index=-1))
            logits = accelerator.gather(accelerator.pad_across_processes(logits, dim=0))
        pending.append((idx, logits))  # copied to the host at the end: a GPU runs ahead while the host collates
    for idx, logits in pending:
        idx, logits = idx.cpu().numpy(), logits.cpu().numpy()
        if out is None:
            out = np.zeros((n_rows, logits.shape[-1]), dtype=np.float32)
        # The first copy of a row wins: accelerate's even_batches recycles early rows at the end, in other
        # batches (other padding), so a later copy could differ in the last bits from the single-process value.
        keep = np.flatnonzero(idx >= 0)
        keep = keep[np.unique(idx[keep], return_index=True)[1]]
        keep = keep[~seen[idx[keep]]]
        out[idx[keep]] = logits[keep]
        seen[idx[keep]] = True
    if was_training:
        model.train()
    if out is None or not seen.all():
        raise RuntimeError(f"inference covered {int(seen.sum())} of {n_rows} rows")
    return out


def cross_entropy(logits: np.ndarray, labels) -> float:
    """Mean cross-entropy of logits against integer labels."""
    t = torch.from_numpy(logits)
    return float(torch.nn.functional.cross_entropy(t, torch.as_tensor(np.asarray(labels), dtype=torch.long)))


def classification_metrics(labels, preds, label_names: list[str]) -> dict:
    """Accuracy, macro-F1, per-class precision/recall/F1/support and the confusion matrix (rows: true)."""
    labels = np.asarray(labels)
    preds = np.asarray(preds)
    k = len(label_names)
    cm = np.zeros((k, k), dtype=np.int64)
    np.add.at(cm, (labels, preds), 1)
    per_class = {}
    f1s = []
    for i, name in enumerate(label_names):
        tp = int(cm[i, i])
        p_den, r_den = int(cm[:, i].sum()), int(cm[i, :].sum())
        precision = tp / p_den if p_den else 0.0
        recall = tp / r_den if r_den else 0.0
        f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
        f1s.append(f1)
        per_class[name] = {"precision": precision, "recall": recall, "f1": f1, "support": r_den}
    return {"accuracy": float((labels == preds).mean()) if len(labels) else 0.0, "macro_f1": float(np.mean(f1s)),
            "n": int(len(labels)), "label_names": list(label_names), "per_class": per_class,
            "confusion_matrix": cm.tolist()}


def metrics_text(m: dict, title: str = "evaluation") -> str:
    """The metrics as a plain-text report."""
    names = m["label_names"]
    width = max(10, *(len(n) for n in names))
    lines = [f"{title}: {m['n']} examples", f"accuracy  {m['accuracy']:.4f}", f"macro-F1  {m['macro_f1']:.4f}", "",
             f"{'class':<{width}}  precision  recall  f1      support"]
    for n in names:
        c = m["per_class"][n]
        lines.append(f"{n:<{width}}  {c['precision']:.4f}     {c['recall']:.4f}  {c['f1']:.4f}  {c['support']}")
    lines += ["", "confusion matrix (rows: true, columns: predicted)",
              " " * (width + 2) + " ".join(f"{n[:8]:>8}" for n in names)]
    for n, row in zip(names, m["confusion_matrix"]):
        lines.append(f"{n:<{width}}  " + " ".join(f"{v:>8}" for v in row))
    return "\n".join(lines) + "\n"
