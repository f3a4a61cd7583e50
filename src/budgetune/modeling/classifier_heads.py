"""Classification heads: which head modules train or stay frozen for --head default|linear|frozen_dense, and the
linear first-token head."""

from __future__ import annotations

from torch import nn

from budgetune.config import ConfigError

# The seed's module names (BERT's, which RoBERTa, XLM-R and ELECTRA share) in each other architecture's own, so that
# `--target_modules query,value` (or key, dense, output.dense) adapts the same layers on every encoder. `dense` is
# BERT's attention output + both feed-forward layers; `output.dense` the Linear layers whose name ends so in BERT
# (attention output and feed-forward output: peft's IA3 default). Names not listed pass to peft unchanged.


def head_modules(model: nn.Module, head: str) -> tuple[list[str], list[str]]:
    """(trainable head modules, frozen head modules that must still be saved) for a head choice."""
    roberta_style = _roberta_style(model)
    top = "classifier" if hasattr(model, "classifier") else "score"
    # The dense layer before the output projection, where it sits beside it: DeBERTa's pooler, DistilBERT's
    # pre_classifier (RoBERTa-style heads hold theirs as classifier.dense; BERT's pooler is the encoder's).
    pooler = [n for n in ("pooler", "pre_classifier") if isinstance(getattr(model, n, None), nn.Module)]
    if head == "default":
        return pooler + [top], []
    if head == "frozen_dense":
        if roberta_style:  # the whole head is saved (peft wraps `classifier` anyway); its dense part is frozen
            return [top], [f"{top}.dense"]
        if pooler:
            return [top], pooler
        raise ConfigError(f"--head frozen_dense: {type(model).__name__}'s head has no dense layer to freeze; "
                          "use --head default")
    if head == "linear":  # a dense layer beside the output layer stays as loaded, frozen (and saved: peft's
        return [top], pooler  # modules_to_save matches `classifier` in `pre_classifier` too)
    raise ConfigError(f"--head must be default, linear or frozen_dense, got {head!r}")


def _roberta_style(model: nn.Module) -> bool:
    cls = getattr(model, "classifier", None)
    return cls is not None and hasattr(cls, "dense") and hasattr(cls, "out_proj")


class FirstTokenLinear(nn.Module):
    """A linear head on the first token's hidden state (replaces RoBERTa's dense+tanh head)."""

    def __init__(self, hidden_size: int, num_labels: int, dropout: float):
        super().__init__()
        self.dropout = nn.Dropout(dropout)
        self.out_proj = nn.Linear(hidden_size, num_labels)

    def forward(self, features, **kwargs):
        return self.out_proj(self.dropout(features[:, 0, :]))


def apply_head(model: nn.Module, head: str) -> None:
    """Swap in the linear head where the model's own head is not already linear; needed again before reloading."""
    if head == "linear" and _roberta_style(model):
        cfg = model.config
        dropout = cfg.classifier_dropout if getattr(cfg, "classifier_dropout", None) is not None else cfg.hidden_dropout_prob
        model.classifier = FirstTokenLinear(cfg.hidden_size, cfg.num_labels, dropout)
