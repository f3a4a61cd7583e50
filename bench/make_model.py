"""A randomly initialised model folder of a real architecture, for speed runs where the real weights are not at hand.

    python bench/make_model.py roberta-base /tmp/roberta-base-random
    python bench/speed.py --device cuda --model /tmp/roberta-base-random

Speed does not depend on the weights' values, only on their shapes: the folder holds the architecture's exact
config (budgetune's shipped numbers for `roberta-base`, `bert-base-uncased`, ... or any local folder's config.json),
random weights, and a real tokenizer copied from --tokenizer (default: the packaged MiniLM's WordPiece, which cuts
AG News into about as many tokens as RoBERTa's BPE does; the speed table prints the real tokens per text).
Accuracy from such a folder means nothing: it is for bench/speed.py and bench/gpu.sh only.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("architecture", help="a shipped architecture id (roberta-base, ...) or a local model folder")
    p.add_argument("output_dir", help="the folder to write (must not exist, or be empty)")
    p.add_argument("--tokenizer", default="packaged:all-MiniLM-L6-v2", help="tokenizer source (default: MiniLM's)")
    a = p.parse_args(argv)

    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from budgetune.data.readers import AG_NEWS_LABELS
    from budgetune.modeling import backbone

    out = Path(a.output_dir)
    if out.exists() and any(out.iterdir()):
        print(f"error: {out} exists and is not empty", file=sys.stderr)
        return 2
    tokenizer = AutoTokenizer.from_pretrained(backbone.resolve_model_path(a.tokenizer))
    config = backbone.load_hf_config(a.architecture, len(AG_NEWS_LABELS), AG_NEWS_LABELS)
    if len(tokenizer) > config.vocab_size:
        print(f"error: the tokenizer has {len(tokenizer)} tokens, more than {a.architecture}'s vocabulary "
              f"({config.vocab_size})", file=sys.stderr)
        return 2
    # The tokenizer's special ids: RoBERTa numbers positions from pad_token_id, so it must be the one the
    # tokenizer pads with.
    config.pad_token_id = tokenizer.pad_token_id
    config.bos_token_id = tokenizer.cls_token_id if tokenizer.cls_token_id is not None else tokenizer.bos_token_id
    config.eos_token_id = tokenizer.sep_token_id if tokenizer.sep_token_id is not None else tokenizer.eos_token_id
    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_config(config)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    n = sum(p.numel() for p in model.parameters())
    print(f"{out}: {config.model_type} with random weights, {n:,} parameters, tokenizer from {a.tokenizer}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
