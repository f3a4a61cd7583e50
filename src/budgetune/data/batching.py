"""Batches: length-grouped shuffled batches for training, length-sorted batches for inference, per-batch padding."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence

import numpy as np
import torch


class LengthGroupedBatchSampler(torch.utils.data.Sampler[list[int]]):
    """Shuffled length-grouped batches; call set_epoch each epoch or every epoch repeats the same order."""

    def __init__(self, lengths: Sequence[int], batch_size: int, seed: int, mega_batch_mult: int = 50,
                 drop_last: bool = False):
        if batch_size < 1 or mega_batch_mult < 1:
            raise ValueError("batch_size and mega_batch_mult must be >= 1")
        self.lengths = np.asarray(lengths, dtype=np.int64)
        self.batch_size, self.seed, self.mega, self.drop_last = batch_size, seed, mega_batch_mult, drop_last
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        n = len(self.lengths)
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    def __iter__(self) -> Iterator[list[int]]:
        rng = np.random.default_rng(self.seed + self.epoch)
        perm = rng.permutation(len(self.lengths))
        size = self.batch_size * self.mega
        batches = []
        for start in range(0, len(perm), size):
            mega = perm[start:start + size]
            mega = mega[np.argsort(-self.lengths[mega], kind="stable")]
            batches += [mega[i:i + self.batch_size] for i in range(0, len(mega), self.batch_size)]
        if self.drop_last and batches and len(batches[-1]) < self.batch_size:
            batches.pop()  # only the last mega-batch's tail can be short
        batches = [batches[i] for i in rng.permutation(len(batches))]
        if batches:  # longest batch first: an out-of-memory error shows at step 1, not hours in
            first = max(range(len(batches)), key=lambda b: self.lengths[batches[b]].max())
            batches[0], batches[first] = batches[first], batches[0]
        for b in batches:
            yield b.tolist()


class SortedBatchSampler(torch.utils.data.Sampler[list[int]]):
    """Batches by descending length, cut early where lengths fall fast; restore input order with the idx column.

    A batch closes at batch_size texts, at max_tokens padded tokens (texts x its longest; None: no cap), or (once
    it holds min_batch) when the next text is shorter than (1 - slack) x the batch's longest: padding stays near
    `slack` even in the long tail, where fixed-size batches of sorted texts still pad a lot. `batch_size` is None,
    as accelerate expects of batches of varying size (with a number there it would drop a group of batches that
    ends in a short one).
    """

    batch_size = None

    def __init__(self, lengths: Sequence[int], batch_size: int, slack: float = 0.1, min_batch: int = 8,
                 max_tokens: int | None = None):
        if batch_size < 1 or (max_tokens is not None and max_tokens < 1):
            raise ValueError("batch_size and max_tokens must be >= 1")
        lengths = np.asarray(lengths, dtype=np.int64)
        self.order = np.argsort(-lengths, kind="stable")
        ordered = lengths[self.order]
        starts, start = [], 0
        while start < len(ordered):
            starts.append(start)
            size = batch_size if max_tokens is None else max(1, min(batch_size, max_tokens // max(1, ordered[start])))
            end = min(start + size, len(ordered))
            if end - start > min_batch:  # the first index past min_batch whose length falls below the bound
                below = np.nonzero(ordered[start + min_batch:end] < (1 - slack) * ordered[start])[0]
                if len(below):
                    end = start + min_batch + int(below[0])
            start = end
        self.bounds = np.append(np.asarray(starts, dtype=np.int64), len(ordered))

    def __len__(self) -> int:
        return len(self.bounds) - 1

    def __iter__(self) -> Iterator[list[int]]:
        for a, b in zip(self.bounds[:-1], self.bounds[1:]):
            yield self.order[a:b].tolist()


class GlobalBatchSplitter(torch.utils.data.Sampler[list[int]]):
    """Split each global batch of `batch_sampler` into `num_processes` per-device parts, yielded in turn.

    accelerate shards a batch sampler by giving process i every num_processes-th batch, so process i trains on part
    i of every global batch: N processes x per-device B form exactly the batches of one process with batch N x B
    (same seed), whatever the sampler (length-grouped or random). `batch_size` is None so that accelerate neither
    drops nor recycles batches (the parts of a short last batch differ by at most one row); a global batch with
    fewer rows than processes (an epoch's tail of at most num_processes - 1 rows) is dropped.
    """

    batch_size = None
    drop_last = False

    def __init__(self, batch_sampler, num_processes: int, n_rows: int, global_batch_size: int):
        self.batch_sampler, self.num_processes = batch_sampler, num_processes
        tail = n_rows % global_batch_size
        self._dropped = int(0 < tail < num_processes and not getattr(batch_sampler, "drop_last", False))

    def set_epoch(self, epoch: int) -> None:
        self.batch_sampler.set_epoch(epoch)

    def __len__(self) -> int:
        return (len(self.batch_sampler) - self._dropped) * self.num_processes

    def __iter__(self) -> Iterator[list[int]]:
        for b in self.batch_sampler:
            if len(b) < self.num_processes:
                continue
            for part in np.array_split(np.asarray(b, dtype=np.int64), self.num_processes):
                yield part.tolist()


def length_buckets(lengths: Sequence[int], n: int, multiple: int = 8) -> list[int]:
    """At most n fixed padded lengths for training batches, from the data's length histogram (issue 13, item 4).

    A fixed set of shapes is what a captured CUDA graph (or a compiled step) needs. The lengths are chosen to pad
    the rows least: candidates are the rows' lengths rounded up to `multiple` (tensor cores), the longest row's
    length is always one, and a dynamic programme over the histogram picks the n that minimise the padding of
    every row up to its bucket (length-grouped batches pad close to their rows' own lengths).
    """
    lens = np.asarray(lengths, dtype=np.int64)
    if n < 1 or not len(lens):
        return []
    top = int(lens.max())
    cands = np.unique(np.minimum(-(-lens // multiple) * multiple, top))
    counts = np.array([np.sum((lens > lo) & (lens <= hi)) for lo, hi in zip(np.r_[0, cands[:-1]], cands)])
    sums = np.array([lens[(lens > lo) & (lens <= hi)].sum() for lo, hi in zip(np.r_[0, cands[:-1]], cands)])
    cum_n, cum_s = np.r_[0, np.cumsum(counts)], np.r_[0, np.cumsum(sums)]

    def cost(i: int, j: int) -> int:  # rows of candidates i..j (inclusive) padded to cands[j]
        return int(cands[j] * (cum_n[j + 1] - cum_n[i]) - (cum_s[j + 1] - cum_s[i]))

    k_max, inf = min(n, len(cands)), float("inf")
    # best[k][j]: least padding of the rows up to cands[j] with k buckets, the last at cands[j]
    best = [[inf] * len(cands) for _ in range(k_max + 1)]
    back = [[-1] * len(cands) for _ in range(k_max + 1)]
    for j in range(len(cands)):
        best[1][j] = cost(0, j)
    for k in range(2, k_max + 1):
        for j in range(k - 1, len(cands)):
            for i in range(k - 2, j):
                c = best[k - 1][i] + cost(i + 1, j)
                if c < best[k][j]:
                    best[k][j], back[k][j] = c, i
    out, j = [], len(cands) - 1
    for k in range(k_max, 0, -1):
        out.append(int(cands[j]))
        j = back[k][j]
    return sorted(out)


def batch_maxima(lengths: Sequence[int], batches: Iterable[Sequence[int]]) -> np.ndarray:
    """Each batch's longest row, once per row of the batch: the lengths the rows are padded to without buckets,
    so that length_buckets of these minimises the padding of these very batches."""
    lens = np.asarray(lengths, dtype=np.int64)
    parts = [np.full(len(b), lens[np.asarray(b)].max()) for b in batches if len(b)]
    return np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)


def bucket_length(longest: int, buckets: Sequence[int], multiple: int | None) -> int:
    """The padded length of a batch whose longest row is `longest`: the smallest bucket that holds it (beyond the
    last, as without buckets)."""
    for b in buckets:
        if b >= longest:
            return b
    return -(-longest // multiple) * multiple if multiple else longest


def make_collator(tokenizer, pad_to_multiple_of: int | None,
                  buckets: Sequence[int] | None = None) -> Callable[[list[dict]], dict]:
    """Pad per batch on the tokenizer's side with its pad ids; `idx` and `labels` become tensors, `length` is dropped.

    Plain numpy, not `tokenizer.pad`: that walks the rows in Python and, with a GPU waiting, cost more than the
    forward pass (bench/speed.py inference on an H200).
    """
    pad_values = {"input_ids": tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0,
                  "attention_mask": 0, "token_type_ids": getattr(tokenizer, "pad_token_type_id", 0) or 0,
                  "special_tokens_mask": 1}
    left = getattr(tokenizer, "padding_side", "right") == "left"

    def collate(features: list[dict]) -> dict:
        if not features:
            return {}
        longest = bucket_length(max(len(f["input_ids"]) for f in features), buckets or (), pad_to_multiple_of)
        batch = {}
        for key, value in pad_values.items():
            if key not in features[0]:
                continue
            out = np.full((len(features), longest), value, dtype=np.int64)
            for row, f in enumerate(features):
                seq = f[key]
                if len(seq):
                    if left:
                        out[row, longest - len(seq):] = seq
                    else:
                        out[row, :len(seq)] = seq
            batch[key] = torch.from_numpy(out)
        for key in ("labels", "idx"):
            if key in features[0]:  # multi-label rows and regression values are float targets
                whole = isinstance(features[0][key], int)
                batch[key] = torch.tensor([f[key] for f in features], dtype=torch.long if whole else torch.float32)
        return batch

    return collate


def padding_stats(lengths: Sequence[int], batches: Sequence[Sequence[int]]) -> tuple[int, int]:
    """(pad tokens added, real tokens) when each batch pads to its longest row; ignores pad_to_multiple_of."""
    lens = np.asarray(lengths, dtype=np.int64)
    pad = real = 0
    for b in batches:
        if len(b):
            part = lens[np.asarray(b)]
            real += int(part.sum())
            pad += int(part.max()) * len(part) - int(part.sum())
    return pad, real
