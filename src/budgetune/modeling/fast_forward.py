"""The fast inference forward: the last attention layer computed for the first token only, where the head reads
nothing else."""

from __future__ import annotations

import functools
import types

import torch

# The seed's module names (BERT's, which RoBERTa, XLM-R and ELECTRA share) in each other architecture's own, so that
# `--target_modules query,value` (or key, dense, output.dense) adapts the same layers on every encoder. `dense` is
# BERT's attention output + both feed-forward layers; `output.dense` the Linear layers whose name ends so in BERT
# (attention output and feed-forward output: peft's IA3 default). Names not listed pass to peft unchanged.


FIRST_TOKEN_HEADS = {"bert", "roberta", "xlm-roberta", "camembert"}


def first_token_last_layer(model) -> bool:
    """Compute the last encoder layer for the first token only (inference; 14 % fewer weight FLOPs for MiniLM's 6 layers).

    Keys and values still come from every token, so the logits are the same up to float rounding; the hidden
    states the model returns then hold one position in their last layer. Returns False where it does not apply.
    """
    base = getattr(model, "get_base_model", lambda: model)()
    if getattr(base.config, "model_type", None) not in FIRST_TOKEN_HEADS or base.config.is_decoder:
        return False
    if getattr(base.config, "position_embedding_type", "absolute") != "absolute":  # 4.x relative attention
        return False
    encoder = getattr(getattr(base, base.base_model_prefix, None), "encoder", None)
    layers = getattr(encoder, "layer", None)
    if not layers or getattr(layers[-1], "chunk_size_feed_forward", 0):
        return False
    layer = layers[-1]
    if not all(hasattr(layer, n) for n in ("attention", "intermediate", "output")):
        return False
    layer.forward = types.MethodType(_first_token_forward, layer)  # a bound method: deepcopy rebinds it
    return True


def _first_token_forward(self, hidden_states, attention_mask=None, *args, **kwargs):
    if self.training:  # attention dropout, and every position's output for whoever trains: the full layer
        return type(self).forward(self, hidden_states, attention_mask, *args, **kwargs)
    sa, ao = self.attention.self, self.attention.output
    b, t, _ = hidden_states.shape
    heads, size = sa.num_attention_heads, sa.attention_head_size
    first = hidden_states[:, :1]
    q = sa.query(first).view(b, 1, heads, size).transpose(1, 2)
    k = sa.key(hidden_states).view(b, t, heads, size).transpose(1, 2)
    v = sa.value(hidden_states).view(b, t, heads, size).transpose(1, 2)
    mask = attention_mask
    if mask is not None:
        if mask.dim() == 2:  # [batch, keys] of 1/0
            mask = mask[:, None, None, :].bool()
        elif mask.shape[-2] > 1:  # [batch, 1, queries, keys]: the first query's row
            mask = mask[:, :, :1, :]
    ctx = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=size**-0.5)
    attn = ao.LayerNorm(ao.dropout(ao.dense(ctx.transpose(1, 2).reshape(b, 1, heads * size))) + first)
    out = self.output(self.intermediate(attn), attn)
    return out if _transformers_major() >= 5 else (out,)  # 4.x encoder layers return tuples


@functools.cache
def _transformers_major() -> int:
    import transformers

    return int(transformers.__version__.split(".")[0])
