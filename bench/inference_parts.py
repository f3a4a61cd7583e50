"""What each inference change buys, side by side in one process: the packaged MiniLM on real AG News texts.

    python bench/inference_parts.py                   # 1,024 texts, 3 repeats: about 4 minutes on 2 CPU cores
    python bench/inference_parts.py --texts 4096 --repeats 5

Measures, alternating the variants in every repeat and reporting medians:
1. tokenization: `data.readers.tokenize` against the same `datasets.map` with datasets' own fingerprint (which pickles the
   tokenizer to hash it);
2. padding: `data.batching.make_collator` (numpy) against transformers' `DataCollatorWithPadding`, on the same batches;
3. the forward pass over all texts (collation included) with the full last layer or the first token only, with
   batches of 256 texts or capped at `hardware.devices.CPU_BATCH_TOKENS` padded tokens (the cap applies on CPU only).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_DATA = ROOT.parent / "shared" / "data" / "ag_news" / "train.csv"


def timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--texts", type=int, default=1024, help="AG News texts (default 1024)")
    p.add_argument("--repeats", type=int, default=3, help="times each variant runs (default 3)")
    p.add_argument("--data", default=str(DEFAULT_DATA), help="AG News CSV (label,text)")
    a = p.parse_args(argv)
    os.environ["CUDA_VISIBLE_DEVICES"] = ""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if not Path(a.data).is_file():
        print(f"skipped: {a.data} not found (AG News train.csv from ../shared/data/ag_news; pass --data FILE)")
        return 0

    import datasets
    import numpy as np
    import torch
    import transformers
    from transformers import AutoModelForSequenceClassification, AutoTokenizer, DataCollatorWithPadding

    from budgetune.config import PACKAGED_MINILM
    from budgetune.data import batching
    from budgetune.data import readers as data_lib
    from budgetune.hardware.devices import CPU_BATCH_TOKENS
    from budgetune.modeling import backbone, fast_forward

    datasets.disable_progress_bars()
    transformers.logging.set_verbosity_error()
    path = backbone.resolve_model_path(PACKAGED_MINILM)
    tokenizer = AutoTokenizer.from_pretrained(path)
    table = data_lib.load_table(a.data)
    order = np.random.default_rng(0).permutation(len(table.texts))[:a.texts]
    texts = data_lib.TextTable([table.texts[i] for i in order], None, None, "bench")

    def tokenize_datasets_fingerprint():  # data.tokenize as it was: the same map, datasets' fingerprint
        def encode(batch):
            enc = tokenizer(batch["text"], truncation=True, max_length=256, padding=False)
            return {**{k: enc[k] for k in ("input_ids", "attention_mask", "token_type_ids")},
                    "length": [len(x) for x in enc["input_ids"]]}

        ds = datasets.Dataset.from_dict({"text": texts.texts, "idx": list(range(len(texts.texts)))})
        return ds.map(encode, batched=True, batch_size=1000, remove_columns=["text"], load_from_cache_file=False)

    ds = data_lib.tokenize(texts, tokenizer, 256, None)
    rows = [ds[i] for i in range(len(ds))]
    reference = DataCollatorWithPadding(tokenizer, return_tensors="pt")
    ours = batching.make_collator(tokenizer, None)
    model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=4).eval()
    trimmed = AutoModelForSequenceClassification.from_pretrained(path, num_labels=4).eval()
    assert fast_forward.first_token_last_layer(trimmed)

    def batches(cap):
        return [[rows[i] for i in b] for b in batching.SortedBatchSampler(ds["length"], 256, max_tokens=cap)]

    def forward(m, cap):
        with torch.inference_mode():
            for b in batches(cap):
                m(**{k: v for k, v in ours(b).items() if k != "idx"})

    def strip(b):
        return [{k: v for k, v in r.items() if k not in ("idx", "length")} for r in b]

    capped = batches(CPU_BATCH_TOKENS)
    variants = {
        "tokenize: data.tokenize": lambda: data_lib.tokenize(texts, tokenizer, 256, None),
        "tokenize: datasets' fingerprint": tokenize_datasets_fingerprint,
        "pad: make_collator (numpy)": lambda: [ours(b) for b in capped],
        "pad: DataCollatorWithPadding": lambda: [reference(strip(b)) for b in capped],
        "forward: full layer, 256 texts": lambda: forward(model, None),
        f"forward: full layer, cap {CPU_BATCH_TOKENS}": lambda: forward(model, CPU_BATCH_TOKENS),
        "forward: first token, 256 texts": lambda: forward(trimmed, None),
        f"forward: first token, cap {CPU_BATCH_TOKENS}": lambda: forward(trimmed, CPU_BATCH_TOKENS),
    }
    for fn in variants.values():  # untimed warmup
        fn()
    seconds = {k: [] for k in variants}
    for _ in range(a.repeats):
        for name, fn in variants.items():
            seconds[name].append(timed(fn))
    print(f"{len(texts.texts)} AG News texts, MiniLM, {torch.get_num_threads()} threads, torch {torch.__version__}, "
          f"medians of {a.repeats}")
    print("| variant | seconds (median) | texts/s | per repeat (s) |")
    print("|---|---|---|---|")
    for name, xs in seconds.items():
        m = statistics.median(xs)
        print(f"| {name} | {m:.3f} | {len(texts.texts) / m:.1f} | {', '.join(f'{x:.3f}' for x in xs)} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
