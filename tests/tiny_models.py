"""Tiny random encoders (2 layers, hidden 32) saved as model folders with tokenizers trained here, for tests and
benchmarks (no pretrained weights): RoBERTa, BERT, ELECTRA, DistilBERT, MPNet and DeBERTa-v2."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

WORDPIECE = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
# model_type -> (tokenizer class in transformers, its special tokens in id order; None: a SentencePiece unigram)
TOKENIZERS = {"bert": ("BertTokenizerFast", WORDPIECE), "electra": ("ElectraTokenizerFast", WORDPIECE),
              "distilbert": ("DistilBertTokenizerFast", WORDPIECE),
              "mpnet": ("MPNetTokenizerFast", ["<s>", "<pad>", "</s>", "[UNK]", "<mask>"]),
              "deberta-v2": ("DebertaV2TokenizerFast", None)}
TINY = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 64,
        "max_position_embeddings": 72}
# Each architecture's own names for the tiny sizes, and what makes it like its released checkpoints.
SIZES = {"distilbert": {"dim": 32, "n_layers": 2, "n_heads": 2, "hidden_dim": 64, "max_position_embeddings": 72},
         "electra": {**TINY, "embedding_size": 16},  # like electra-small: a projection from the embeddings
         "deberta-v2": {**TINY, "type_vocab_size": 0, "relative_attention": True, "position_buckets": 16,
                        "norm_rel_ebd": "layer_norm", "share_att_key": True, "pos_att_type": ["p2c", "c2p"],
                        "position_biased_input": False, "max_relative_positions": -1, "pooler_hidden_size": 32}}


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


def tiny_encoder(folder: Path, model_type: str, corpus: Iterable[str], vocab_size: int = 400,
                 min_frequency: int = 2) -> Path:
    """A random 2-layer encoder of `model_type` (hidden 32) saved as a masked-LM checkpoint (so the classification
    head is missing from it, as from a released one) with a tokenizer of the architecture's own kind."""
    import torch
    from transformers import AutoConfig, AutoModelForMaskedLM

    corpus = list(corpus)
    if model_type == "roberta":
        return tiny_roberta(folder, corpus, vocab_size, min_frequency)
    tok = _tokenizer(folder, model_type, corpus, vocab_size, min_frequency)
    special = {k: getattr(tok, f"{k}_id") for k in ("pad_token", "bos_token", "eos_token") if getattr(tok, f"{k}_id") is not None}
    config = AutoConfig.for_model(model_type, vocab_size=len(tok), **special, **SIZES.get(model_type, TINY))
    torch.manual_seed(0)
    AutoModelForMaskedLM.from_config(config).save_pretrained(folder)
    return folder


def _tokenizer(folder: Path, model_type: str, corpus: list[str], vocab_size: int, min_frequency: int):
    """Train a WordPiece (or, for DeBERTa-v2, a SentencePiece unigram) on corpus; saved in folder in transformers'
    class for the architecture, so that AutoTokenizer gives the inputs the model takes (no token_type_ids for MPNet)."""
    import transformers
    from tokenizers import BertWordPieceTokenizer, SentencePieceUnigramTokenizer

    cls_name, specials = TOKENIZERS[model_type]
    cls = getattr(transformers, cls_name)
    if specials is None:
        names = {"pad_token": "[PAD]", "cls_token": "[CLS]", "sep_token": "[SEP]", "unk_token": "[UNK]",
                 "mask_token": "[MASK]"}
        spm = SentencePieceUnigramTokenizer()
        spm.train_from_iterator(corpus, vocab_size=vocab_size, special_tokens=list(names.values()), unk_token="[UNK]")
        tok = cls(tokenizer_object=spm._tokenizer, model_max_length=64, **names)
    else:
        wordpiece = BertWordPieceTokenizer(lowercase=True)
        wordpiece.train_from_iterator(corpus, vocab_size=vocab_size, min_frequency=min_frequency, special_tokens=specials)
        wordpiece.save_model(str(folder))
        tok = cls.from_pretrained(folder, model_max_length=64)
    tok.save_pretrained(folder)
    return tok
