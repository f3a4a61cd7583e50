"""Inference over a tokenized dataset: length-sorted batches, logits back in input order."""

from __future__ import annotations

import numpy as np
import torch
from torch.utils.data import DataLoader

from budgetune.data import batching
from budgetune.errors import AdapterError


def inference_loader(dataset, tokenizer, batch_size: int, pad_to_multiple_of: int | None, num_workers: int = 0,
                     pin_memory: bool = False, max_tokens: int | None = None) -> DataLoader:
    """Length-sorted batches (least padding); the `idx` column puts outputs back in input order."""
    sampler = batching.SortedBatchSampler(dataset["length"], batch_size, max_tokens=max_tokens)
    # its own generator: each pass over a DataLoader draws a seed, and from the global generator that draw would
    # shift the training run's random stream (dropout, data order), so evaluating more often would train another model
    return DataLoader(dataset, batch_sampler=sampler, collate_fn=batching.make_collator(tokenizer, pad_to_multiple_of),
                      num_workers=num_workers, pin_memory=pin_memory, generator=torch.Generator())


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


def nonfinite_rows(logits: np.ndarray) -> np.ndarray:
    """The indices of the rows with a NaN or infinite logit."""
    return np.flatnonzero(~np.isfinite(logits).all(axis=-1))


def require_finite(logits: np.ndarray, source: str, precision: str, first_row: int = 1, unit: str = "row",
                   advice: str = "Try --precision fp32") -> None:
    """Refuse logits with a NaN or infinite row: its argmax (class 0) or probabilities would be arbitrary, and
    would reach a file or a teacher's soft targets without a word. first_row: the number of the table's first row;
    unit: what a row is to the user (a file's row, a training text); advice: what to try, in the caller's flags."""
    bad = nonfinite_rows(logits)
    if bad.size:
        raise AdapterError(f"{source}: the model's logits are not finite (NaN or inf) for {bad.size} of {len(logits)} "
                           f"{unit}s (the first: {unit} {first_row + int(bad[0])}), computing in {precision}; their "
                           f"predictions would be arbitrary. {advice}; if fp32 gives them too, the model's weights are "
                           "broken (a run that diverged)")


def shard(loader: DataLoader, accelerator) -> DataLoader:
    """The loader sharded over processes and put on the device, without registering it with the accelerator.

    `accelerator.prepare` keeps every loader it prepared (for checkpointing) for the accelerator's lifetime: a
    prediction of many chunks would keep every chunk's tokenized data alive.
    """
    from accelerate.data_loader import prepare_data_loader

    return prepare_data_loader(loader, device=accelerator.device, num_processes=accelerator.num_processes,
                               process_index=accelerator.process_index, put_on_device=True)


def table_logits(model, tokenizer, table, accelerator, batch_size: int, max_seq_length: int,
                 cache_dir: str | None = None, desc: str = "predict") -> np.ndarray:
    """Tokenize a TextTable (cached), run it in length-sorted batches, return its logits in input order."""
    from budgetune.data import readers as data_lib
    from budgetune.hardware.devices import token_cap

    with accelerator.main_process_first():
        ds = data_lib.tokenize(table, tokenizer, max_seq_length, cache_dir)
    pad = 8 if accelerator.device.type == "cuda" else None
    loader = shard(inference_loader(ds, tokenizer, batch_size, pad, max_tokens=token_cap(accelerator.device)),
                   accelerator)
    return predict_logits(model, loader, accelerator, len(ds), desc=desc)
