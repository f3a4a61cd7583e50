"""The inference fast paths: the last layer computed for the first token only, and CPU batches capped in tokens."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from transformers import (
    AutoModelForSequenceClassification,
    AutoTokenizer,
    BertConfig,
    DebertaV2Config,
    DebertaV2ForSequenceClassification,
    DistilBertConfig,
    DistilBertForSequenceClassification,
)

from budgetune.config import PACKAGED_MINILM
from budgetune.hardware.devices import CPU_BATCH_TOKENS, token_cap
from budgetune.modeling import backbone, classifier_heads, fast_forward

TEXTS = ["Stocks rally", "Rookie scores 38 in debut win as the home side storms back in the final quarter",
         "New chip ships with faster cores", "Peace talks resume in Geneva after a week of shelling"]


def load(folder, **kw):
    torch.manual_seed(0)
    return AutoModelForSequenceClassification.from_pretrained(folder, num_labels=4, **kw).eval()


def check_same_logits(folder, **kw):
    tok = AutoTokenizer.from_pretrained(folder)
    batch = tok(TEXTS, padding=True, return_tensors="pt")  # padded: the mask must reach the trimmed layer
    model = load(folder, **kw)
    with torch.inference_mode():
        full = model(**batch, output_hidden_states=True)
        assert fast_forward.first_token_last_layer(model)
        fast = model(**batch, output_hidden_states=True)
        alone = torch.cat([model(**tok([t], return_tensors="pt")).logits for t in TEXTS])
    assert torch.allclose(full.logits, fast.logits, atol=1e-5), (full.logits - fast.logits).abs().max()
    assert torch.allclose(alone, fast.logits, atol=1e-5)
    # it really did less: the last layer's output holds one position, the layer before it all of them
    assert fast.hidden_states[-1].shape[1] == 1 and fast.hidden_states[-2].shape[1] == batch["input_ids"].shape[1]
    assert torch.allclose(fast.hidden_states[-1][:, 0], full.hidden_states[-1][:, 0], atol=1e-5)
    return model, batch


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_first_token_last_layer_roberta(tiny_roberta: Path, attn):
    check_same_logits(tiny_roberta, attn_implementation=attn)


def test_first_token_last_layer_real_minilm():
    check_same_logits(backbone.resolve_model_path(PACKAGED_MINILM))


def test_first_token_last_layer_linear_head_and_adapters(tiny_roberta: Path):
    """budgetune's own heads and unmerged adapters in the last layer go through the trimmed path too."""
    from peft import LoraConfig, TaskType, get_peft_model

    tok = AutoTokenizer.from_pretrained(tiny_roberta)
    batch = tok(TEXTS, padding=True, return_tensors="pt")
    base = load(tiny_roberta)
    classifier_heads.apply_head(base, "linear")
    model = get_peft_model(base, LoraConfig(task_type=TaskType.SEQ_CLS, r=4, target_modules=["query", "value",
                                                                                               "dense"]))
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_()  # nonzero adapters, or they would change nothing
    model.eval()
    with torch.inference_mode():
        full = model(**batch).logits
        assert fast_forward.first_token_last_layer(model)
        fast = model(**batch).logits
    assert torch.allclose(full, fast, atol=1e-5)


def test_train_mode_runs_the_full_layer_and_deepcopy_rebinds(tiny_roberta: Path):
    model = load(tiny_roberta)
    tok = AutoTokenizer.from_pretrained(tiny_roberta)
    batch = tok(TEXTS, padding=True, return_tensors="pt")
    assert fast_forward.first_token_last_layer(model)
    model.train()
    out = model(**batch, output_hidden_states=True)
    assert out.hidden_states[-1].shape[1] == batch["input_ids"].shape[1]  # every position, for training
    model.eval()
    twin = copy.deepcopy(model)
    with torch.no_grad():
        twin.roberta.encoder.layer[-1].output.dense.weight.mul_(3)
        a, b = model(**batch).logits, twin(**batch).logits
    assert not torch.allclose(a, b)  # the copy's trimmed layer runs the copy's weights, not the original's


def test_first_token_last_layer_leaves_other_architectures():
    torch.manual_seed(0)
    small = dict(vocab_size=100, hidden_size=32, num_attention_heads=2, intermediate_size=64, num_labels=4)
    distil = DistilBertForSequenceClassification(DistilBertConfig(vocab_size=100, dim=32, n_layers=2, n_heads=2,
                                                                  hidden_dim=64, num_labels=4))
    deberta = DebertaV2ForSequenceClassification(DebertaV2Config(num_hidden_layers=2, **small))
    relative = AutoModelForSequenceClassification.from_config(  # transformers 4.x adds relative position scores
        BertConfig(num_hidden_layers=2, position_embedding_type="relative_key", **small))
    for model in (distil, deberta, relative):
        before = {k: v for k, v in vars(model).items()}
        assert fast_forward.first_token_last_layer(model) is False
        assert vars(model) == before


def test_token_cap_only_on_cpu():
    assert token_cap("cpu") == CPU_BATCH_TOKENS == 2048
    assert token_cap(torch.device("cuda")) is None and token_cap("mps") is None
