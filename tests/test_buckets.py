"""Length buckets (--pad_to_buckets), the --cuda_graphs fallback on CPU and old checkpoints under new options (issue 13,
item 4's CPU-checkable part)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import AG_TRAIN, headline_rows, tiny_train_args, write_csv

from budgetune.config import Config, resolve
from budgetune.data import batching
from budgetune.errors import CheckpointError
from budgetune.hardware.devices import release_accelerator
from budgetune.training import checkpoint
from budgetune.training.train import setup, train_step


def token_lengths(tiny_roberta: Path) -> np.ndarray:
    """Token lengths of real texts: AG News (first 20,000 rows) where present, else the built-in headlines."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_roberta)
    if AG_TRAIN.is_file():
        import pandas as pd

        texts = pd.read_csv(AG_TRAIN, nrows=20_000)["text"].astype(str).tolist()
    else:
        texts = [t for _, t in headline_rows()]
    return np.asarray([len(ids) for ids in tok(texts, truncation=True, max_length=256)["input_ids"]])


def padded_tokens(lengths: np.ndarray, batches: list[list[int]], buckets: list[int], multiple: int) -> int:
    return sum(batching.bucket_length(int(lengths[b].max()), buckets, multiple) * len(b) for b in batches)


def test_bucket_length_is_the_smallest_bucket_that_holds_the_batch():
    assert batching.bucket_length(17, [16, 24, 64], 8) == 24
    assert batching.bucket_length(16, [16, 24, 64], 8) == 16
    assert batching.bucket_length(65, [16, 24, 64], 8) == 72  # beyond the last: as without buckets
    assert batching.bucket_length(13, [], 8) == 16 and batching.bucket_length(13, [], None) == 13
    assert batching.length_buckets([5, 9, 30, 31, 200], 0) == []
    assert batching.length_buckets(np.arange(1, 101), 4) == [24, 48, 72, 100]  # uniform lengths: even steps
    assert batching.length_buckets([5, 9, 30, 31, 200], 2) == [32, 200]  # the longest row's length is always one
    assert batching.length_buckets([5, 5, 6], 3) == [6]  # never more lengths than the data has


@pytest.mark.parametrize("n,extra", [(4, 0.12), (6, 0.08)])
def test_buckets_keep_padding_low_with_few_shapes(tiny_roberta, n, extra):
    """On real text lengths, length-grouped batches of 32 padded to n buckets: at most n shapes, and padded tokens
    per real token at most `extra` above padding each batch to its longest row (rounded to 8), far below one
    length for all."""
    lengths = token_lengths(tiny_roberta)
    batches = list(batching.LengthGroupedBatchSampler(lengths, 32, seed=0, mega_batch_mult=50))
    buckets = batching.length_buckets(batching.batch_maxima(lengths, batches), n)  # as train.train_buckets
    assert len(buckets) <= n
    shapes = {batching.bucket_length(int(lengths[b].max()), buckets, 8) for b in batches}
    assert shapes <= set(buckets)
    real = int(lengths.sum())
    dynamic = padded_tokens(lengths, batches, [], 8) / real
    bucketed = padded_tokens(lengths, batches, buckets, 8) / real
    print(f"{len(lengths)} rows, buckets {buckets}: padded/real {bucketed:.3f} vs {dynamic:.3f} per batch "
          f"({len(shapes)} shapes instead of {len({batching.bucket_length(int(lengths[b].max()), [], 8) for b in batches})})")
    assert bucketed <= dynamic + extra
    # the longest rows alone decide the last bucket: one bucket is the seed's pad-to-max, far worse
    one = batching.length_buckets(batching.batch_maxima(lengths, batches), 1)
    print(f"one length for all ({one}): padded/real {padded_tokens(lengths, batches, one, 8) / real:.3f}")
    assert padded_tokens(lengths, batches, one, 8) / real > bucketed + 0.3


def test_the_collator_pads_to_the_bucket_and_the_model_ignores_it(tiny_roberta):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_roberta)
    texts = [t for _, t in headline_rows()[:6]]
    rows = [{"input_ids": ids, "attention_mask": [1] * len(ids), "labels": 0}
            for ids in tok(texts, truncation=True, max_length=48)["input_ids"]]
    longest = max(len(r["input_ids"]) for r in rows)
    plain = batching.make_collator(tok, 8)(rows)
    bucketed = batching.make_collator(tok, 8, [longest + 20, 64])(rows)
    assert bucketed["input_ids"].shape[1] == longest + 20 and plain["input_ids"].shape[1] < longest + 20
    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_pretrained(tiny_roberta, num_labels=4).eval()
    with torch.no_grad():
        a = model(**{k: v for k, v in plain.items() if k != "labels"}).logits
        b = model(**{k: v for k, v in bucketed.items() if k != "labels"}).logits
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


@pytest.fixture
def build(tiny_roberta, tmp_path):
    """setup() of a short LoRA run on headlines cut to 2-13 words (lengths vary, unlike whole headlines, which the
    tiny tokenizer makes longer than max_seq_length)."""
    rows = [(label, " ".join(text.split()[: 2 + i % 12])) for i, (label, text) in enumerate(headline_rows())]
    data = write_csv(tmp_path / "short.csv", ["label", "text"], rows)

    def make(name: str, **extra):
        flags = {"max_train_samples": 64, "per_device_train_batch_size": 8, "num_train_epochs": 1,
                 "lora_dropout": 0.0, "max_seq_length": 64, **extra}
        return setup(resolve(None, tiny_train_args(tiny_roberta, data, tmp_path / name, "lora", **flags)[1:]))

    yield make
    release_accelerator()


def losses(run, n: int = 3, dropout: bool = True) -> tuple[list[float], list[int]]:
    torch.manual_seed(0)
    if not dropout:  # dropout draws its masks over the padded shape: other padding, other draws
        for m in run.inner.modules():
            if isinstance(m, torch.nn.Dropout):
                m.p = 0.0
    run.model.train()
    out, widths = [], []
    for i, batch in enumerate(run.train_loader):
        if i == n:
            break
        batch.pop("idx", None)
        widths.append(batch["input_ids"].shape[1])
        out.append(float(train_step(run, batch, i)[0]))
    return out, widths


@pytest.mark.slow
def test_training_on_buckets_computes_the_same_losses(build):
    plain, plain_widths = losses(build("plain"), dropout=False)
    release_accelerator()
    run = build("buckets", pad_to_buckets=3)
    run.sampler.set_epoch(0)
    lengths = run.train_loader.dataset["length"]
    buckets = batching.length_buckets(batching.batch_maxima(lengths, run.sampler), 3)
    bucketed, widths = losses(run, dropout=False)
    print(f"buckets {buckets}; widths {plain_widths} -> {widths}; losses {plain} -> {bucketed}")
    assert set(widths) <= set(buckets) and widths != plain_widths
    assert bucketed == pytest.approx(plain, abs=1e-5)  # padding is masked out: the same batches, the same losses


@pytest.mark.slow
def test_cuda_graphs_on_cpu_falls_back_to_eager_in_one_line(build, capsys):
    run = build("graphs", cuda_graphs="true", pad_to_buckets=3)
    printed = [line for line in capsys.readouterr().out.splitlines() if "--cuda_graphs" in line]
    assert printed == ["--cuda_graphs: no CUDA device (training on cpu); training eagerly"]
    assert len(losses(run, 2)[0]) == 2  # and it trains
    release_accelerator()
    build("eager")
    assert "--cuda_graphs" not in capsys.readouterr().out


def test_checkpoints_older_than_an_option_resume_at_its_default(tmp_path):
    """A checkpoint written before pad_to_buckets and cuda_graphs existed lacks them: it resumes when they are at
    their defaults (its behaviour), and is refused, naming the key, when they are not."""
    old = Config().to_dict()
    del old["data"]["pad_to_buckets"], old["train"]["cuda_graphs"]
    current = Config().to_dict()
    checkpoint.check_compatible(old, current, tmp_path, defaults=Config().to_dict())
    current["data"]["pad_to_buckets"] = 4
    with pytest.raises(CheckpointError, match="data.pad_to_buckets"):
        checkpoint.check_compatible(old, current, tmp_path, defaults=Config().to_dict())
