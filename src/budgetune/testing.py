"""A tiny random RoBERTa model folder with its own byte-level BPE tokenizer, for tests and benchmarks (no weights)."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path


def tiny_roberta(folder: Path, corpus: Iterable[str], vocab_size: int, min_frequency: int) -> Path:
    """Train the BPE on `corpus`, save it with a random 2-layer RoBERTa (hidden 32) into the existing `folder`."""
    import torch
    from tokenizers import ByteLevelBPETokenizer
    from transformers import RobertaConfig, RobertaForMaskedLM, RobertaTokenizerFast

    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(list(corpus), vocab_size=vocab_size, min_frequency=min_frequency,
                            special_tokens=["<s>", "<pad>", "</s>", "<unk>", "<mask>"])
    bpe.save_model(str(folder))
    # from_pretrained reads vocab.json + merges.txt under transformers 4 and 5 alike; transformers 5's constructor
    # ignores vocab_file/merges_file and leaves a tokenizer of the 5 special tokens, which maps every text to <unk>.
    tok = RobertaTokenizerFast.from_pretrained(folder, model_max_length=64)
    tok.save_pretrained(folder)
    torch.manual_seed(0)
    config = RobertaConfig(vocab_size=len(tok), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                           intermediate_size=64, max_position_embeddings=72, type_vocab_size=1, pad_token_id=1,
                           bos_token_id=0, eos_token_id=2)
    RobertaForMaskedLM(config).save_pretrained(folder)
    return folder
