"""Models and adapters: the base encoder, its classification head, and the peft method on top."""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import re
import types
from importlib import resources
from pathlib import Path

import torch
from torch import nn

from budgetune import adalora, packaged
from budgetune.config import PACKAGED_MINILM, Config, ConfigError, MethodConfig  # noqa: F401 (methods.PACKAGED_MINILM)
from budgetune.errors import ModelLoadError

# The seed's module names (BERT's, which RoBERTa, XLM-R and ELECTRA share) in each other architecture's own, so that
# `--target_modules query,value` (or key, dense, output.dense) adapts the same layers on every encoder. `dense` is
# BERT's attention output + both feed-forward layers; `output.dense` the Linear layers whose name ends so in BERT
# (attention output and feed-forward output: peft's IA3 default). Names not listed pass to peft unchanged.
SEED_NAMES = {
    "mpnet": {"query": ["q"], "key": ["k"], "value": ["v"], "dense": ["o", "dense"], "output.dense": ["o", "output.dense"]},
    "distilbert": {"query": ["q_lin"], "key": ["k_lin"], "value": ["v_lin"], "dense": ["out_lin", "lin1", "lin2"],
                   "output.dense": ["out_lin", "lin2"]},
    "deberta-v2": {"query": ["query_proj"], "key": ["key_proj"], "value": ["value_proj"]},
    "deberta": {"query": ["in_proj"], "key": ["in_proj"], "value": ["in_proj"]},  # one fused q,k,v projection
}
DEFAULT_TARGETS = ["query", "value"]  # target_modules null: the attention query and value projections


def native_names(names: list[str], model_type: str) -> list[str]:
    """The seed's module names in `model_type`'s own (e.g. MPNet: query,value -> q,v), in order, without repeats."""
    table = SEED_NAMES.get(model_type, {})
    out: list[str] = []
    for name in names:
        out += [n for n in table.get(name, [name]) if n not in out]
    return out


def resolve_model_path(name: str) -> str:
    """`packaged:all-MiniLM-L6-v2` (or `packaged:all-mpnet-base-v2`) -> its folder here; anything else unchanged."""
    return packaged.resolve(name)


def architecture_file(name: str) -> Path | None:
    """The shipped config.json numbers for a well-known model id (or packaged name), or None."""
    safe = name.replace("/", "--").replace(":", "--")
    ref = resources.files("budgetune") / "resources" / "architectures" / f"{safe}.json"
    return Path(str(ref)) if ref.is_file() else None


def load_hf_config(name: str, num_labels: int, label_names: list[str] | None = None, revision: str | None = None,
                   shipped_ok: bool = True):
    """The transformers config of `name`: a local folder, shipped numbers (counting only), or the Hub (network).

    shipped_ok=False (real training) never uses the shipped numbers: the model's own config.json decides.
    """
    from transformers import AutoConfig

    try:
        path = resolve_model_path(name)
    except ModelLoadError:  # a packaged model whose extra is not installed: counting needs only its numbers
        if not (shipped_ok and architecture_file(name)):
            raise
        path = name
    kwargs = {"num_labels": num_labels}
    if label_names:
        kwargs["id2label"] = dict(enumerate(label_names))
        kwargs["label2id"] = {n: i for i, n in enumerate(label_names)}
    if os.path.isdir(path):
        if not os.path.isfile(os.path.join(path, "config.json")):
            raise ModelLoadError(f"{path}: no config.json in this model folder")
        return AutoConfig.from_pretrained(path, **kwargs)
    shipped = architecture_file(name) if shipped_ok else None
    if shipped is not None:
        data = json.loads(shipped.read_text())
        model_type = data.pop("model_type")
        return AutoConfig.for_model(model_type, **data, **kwargs)
    try:
        return AutoConfig.from_pretrained(path, revision=revision, **kwargs)
    except OSError as e:
        raise ModelLoadError(_download_hint(name, "model config", e)) from None


def _download_hint(name: str, what: str, err: Exception) -> str:
    return (f"could not load the {what} of {name!r} from the Hugging Face Hub ({type(err).__name__}: "
            f"{str(err).splitlines()[0][:200]}). Without internet, download it elsewhere "
            f"(`huggingface-cli download {name} --local-dir DIR`) and pass --model_name_or_path DIR.")


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


def target_modules(method: MethodConfig, model_type: str, model: nn.Module | None = None):
    """The peft target_modules for a method config, in the model's own names; `all-linear` becomes a regex over the
    encoder's Linear layers; null: query,value (IA3: peft's defaults for the architecture)."""
    if method.target_modules == "all-linear":
        if model is None:
            raise ConfigError("--target_modules all-linear needs the model structure")
        return all_linear_regex(model)
    if method.target_modules:
        return native_names(method.target_modules, model_type)
    if method.method == "ia3":
        return ia3_defaults(model_type)[0]
    return native_names(DEFAULT_TARGETS, model_type)


def ia3_defaults(model_type: str) -> tuple[list[str], list[str]]:
    """(IA3's target modules, those of them that are feed-forward): peft's for the architecture, else its BERT
    defaults (key, value, output.dense) in the architecture's own names."""
    from peft.utils import TRANSFORMERS_MODELS_TO_IA3_FEEDFORWARD_MODULES_MAPPING as FEEDFORWARD
    from peft.utils import TRANSFORMERS_MODELS_TO_IA3_TARGET_MODULES_MAPPING as TARGETS

    if model_type in TARGETS:
        return list(TARGETS[model_type]), list(FEEDFORWARD.get(model_type, []))
    return native_names(TARGETS["bert"], model_type), native_names(FEEDFORWARD["bert"], model_type)


def check_targets(model: nn.Module, targets, given) -> None:
    """Every named target must match a module (peft only fails when none does); the error lists the layers' own."""
    if not isinstance(targets, list):
        return
    names = [n for n, _ in model.named_modules()]
    for t in targets:
        if not any(n == t or n.endswith(f".{t}") for n in names):
            given_text = given if isinstance(given, str) else ",".join(given or DEFAULT_TARGETS)
            raise ConfigError(f"--target_modules {given_text}: {type(model).__name__} has no module {t!r}; its "
                              f"layers' Linear modules are {', '.join(layer_linears(model))} (seed names query, key, "
                              "value, dense and all-linear work on every architecture)")


def layer_linears(model: nn.Module) -> list[str]:
    """The names (after `layer.N.`) of the Linear modules inside the numbered encoder layers."""
    suffixes = set()
    for name, module in model.named_modules():
        m = re.match(r".*\.layers?\.\d+\.(.+)$", name)
        if m and isinstance(module, nn.Linear):
            suffixes.add(m.group(1))
    return sorted(suffixes)


def all_linear_regex(model: nn.Module) -> str:
    """A regex that full-matches every Linear inside the encoder layers (never the head or pooler)."""
    suffixes = layer_linears(model)
    if not suffixes:
        raise ConfigError("--target_modules all-linear: found no Linear layers inside numbered encoder layers")
    alt = "|".join(re.escape(s) for s in suffixes)
    return rf".*\.layers?\.\d+\.({alt})"


def peft_config(cfg: Config, model: nn.Module, total_step: int | None, modules_to_save: list[str]):
    """The peft config object for cfg.method (rank must already be an integer)."""
    import peft

    m = cfg.method
    if not isinstance(m.rank, int):
        raise ConfigError("--rank auto must be resolved against the budget before building the model")
    targets = target_modules(m, model.config.model_type, model)
    check_targets(model, targets, m.target_modules)
    common = {"task_type": peft.TaskType.SEQ_CLS, "target_modules": targets, "modules_to_save": modules_to_save}
    opts = dict(m.method_options)
    try:
        if m.method in ("lora", "dora"):
            return peft.LoraConfig(r=m.rank, lora_alpha=m.lora_alpha, lora_dropout=m.lora_dropout, bias=m.bias,
                                   use_dora=m.method == "dora", **common, **opts)
        if m.method == "adalora":
            if total_step is None:
                raise ConfigError("AdaLoRA needs total_step (computed from the data)")
            sched = adalora.schedule(m, total_step)
            return peft.AdaLoraConfig(init_r=m.rank, target_r=m.resolved_target_r(), lora_alpha=m.lora_alpha,
                                      lora_dropout=m.lora_dropout, bias=m.bias, tinit=sched.tinit,
                                      tfinal=sched.tfinal,
                                      deltaT=m.deltaT, beta1=m.beta1, beta2=m.beta2,
                                      orth_reg_weight=m.orth_reg_weight, total_step=total_step, **common, **opts)
        if m.method == "ia3":
            if isinstance(targets, list) and "feedforward_modules" not in opts:
                # peft would fill in its per-architecture feed-forward modules even when they are not targeted,
                # and then refuse to reload the saved adapter (feedforward_modules must be within target_modules).
                feedforward = ia3_defaults(model.config.model_type)[1]
                opts["feedforward_modules"] = [t for t in feedforward if t in targets]
            return peft.IA3Config(**common, **opts)
        if m.method == "vera":
            # save_projection: the frozen random matrices travel with the adapter, so reloading is exact.
            opts.setdefault("save_projection", True)
            return peft.VeraConfig(r=m.rank, vera_dropout=m.lora_dropout, bias=m.bias, **common, **opts)
        if m.method == "loha":
            return peft.LoHaConfig(r=m.rank, alpha=m.lora_alpha, **common, **opts)
        if m.method == "lokr":
            return peft.LoKrConfig(r=m.rank, alpha=m.lora_alpha, **common, **opts)
    except TypeError as e:
        raise ConfigError(f"--method_options: {e}") from None
    raise ConfigError(f"--method {m.method!r} is unknown")


def wrap(cfg: Config, model: nn.Module, total_step: int | None, frozen_saved: list[str] | None = None):
    """Put the configured adapter on `model`; trainable = adapters + head (frozen head parts are saved, not trained)."""
    import peft

    apply_head(model, cfg.model.head)
    if cfg.method.method == "full":  # no adapter: the plain model, every weight trains (a teacher, unbudgeted)
        for p in model.parameters():
            p.requires_grad_(True)
        return model
    trainable, frozen = head_modules(model, cfg.model.head)
    # Head parts missing from the checkpoint but not trained (e.g. BERT's pooler from a masked-LM checkpoint) are
    # still saved, so that the adapter reproduces the model on a fresh base.
    # frozen: the head's own frozen parts (may sit inside a saved module, like classifier.dense) + missing extras.
    frozen = sorted(set(frozen) | {f for f in frozen_saved or [] if not _within(f, trainable)})
    # peft saves each module once: not one inside another saved one (DeBERTa's pooler holds the missing pooler.dense)
    saved = [f for f in frozen if not _within(f, trainable) and not _within(f, [g for g in frozen if g != f])]
    pcfg = peft_config(cfg, model, total_step, trainable + saved)
    peft_model = peft.get_peft_model(model, pcfg)
    freeze_saved_copies(peft_model, frozen)
    return peft_model


def _within(name: str, modules: list[str]) -> bool:
    """Whether module `name` is one of `modules` or inside one of them."""
    return any(name == m or name.startswith(m + ".") for m in modules)


# Adapter parameters that scale rather than project: AdaLoRA's singular values, IA3's vectors (initialised at 1),
# VeRA's scaling vectors, DoRA's magnitudes. Weight decay would pull them toward 0, i.e. switch the adapter off
# (IA3) or shrink every weight (DoRA), whatever their shape (IA3's vectors are 2-D).
SCALE_ROLES = ("lora_E", "ia3_l", "vera_lambda_b", "vera_lambda_d", "lora_magnitude_vector", "ranknum")


def decays(name: str, param: torch.Tensor) -> bool:
    """Whether AdamW's weight decay applies: projection matrices yes; scale vectors, biases and norms no."""
    if any(f".{role}." in f".{name}." or name.endswith(f".{role}") for role in SCALE_ROLES):
        return False
    return param.ndim >= 2


def freeze_saved_copies(peft_model: nn.Module, frozen: list[str]) -> None:
    """Freeze the saved copies of head parts that must not train (peft makes every modules_to_save trainable)."""
    for name, p in peft_model.named_parameters():
        plain = "." + name.replace(".modules_to_save.default", "")
        if ".modules_to_save." in name and any(f".{f}." in plain for f in frozen):
            p.requires_grad_(False)
        if "ranknum" in name:  # AdaLoRA's scale scalars: never trained (peft leaves them trainable on meta)
            p.requires_grad_(False)


def attention(hf_config, requested: str) -> tuple[str, str]:
    """(the attention kernel to load with, the run header's line saying so). `auto`: SDPA where transformers has it
    for the architecture, eager otherwise (MPNet, DeBERTa); an explicit sdpa where it has none is an error."""
    from transformers import __version__
    from transformers.models.auto.modeling_auto import MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING as CLASSES

    cls = CLASSES[type(hf_config)] if type(hf_config) in CLASSES else None
    name = cls.__name__ if cls is not None else f"model type {hf_config.model_type!r}"
    has_sdpa = bool(getattr(cls, "_supports_sdpa", False))
    if requested == "sdpa" and not has_sdpa:
        raise ConfigError(f"--attn_implementation sdpa: {name} has no SDPA attention in transformers {__version__}; "
                          "use --attn_implementation auto (which picks eager for it) or eager")
    if requested != "auto":
        return requested, f"attention: {requested} (--attn_implementation {requested})"
    if has_sdpa:
        return "sdpa", "attention: sdpa (auto)"
    return "eager", f"attention: eager (auto: {name} has no SDPA attention in transformers {__version__})"


def resolve_attention(cfg: Config) -> tuple[Config, str]:
    """cfg with --attn_implementation auto replaced by the kernel it means for this model, and the header line."""
    hf_config = load_hf_config(cfg.model.model_name_or_path, 2, revision=cfg.model.revision, shipped_ok=False)
    kernel, line = attention(hf_config, cfg.model.attn_implementation)
    return dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, attn_implementation=kernel)), line


def load_base(cfg: Config, label_names: list[str]) -> tuple[nn.Module, list[str]]:
    """Pretrained encoder + fresh head (seeded by the caller); also the head modules missing from the checkpoint."""
    from transformers import AutoModelForSequenceClassification

    path = resolve_model_path(cfg.model.model_name_or_path)
    hf_config = load_hf_config(cfg.model.model_name_or_path, len(label_names), label_names, cfg.model.revision,
                               shipped_ok=False)
    if os.path.isdir(path) and not any(
        f.endswith((".safetensors", ".bin")) or f.endswith(".safetensors.index.json") for f in os.listdir(path)
    ):
        raise ModelLoadError(f"{path}: no model weights (model.safetensors or pytorch_model.bin) in this folder")
    kernel, _ = attention(hf_config, cfg.model.attn_implementation)
    try:
        model, info = AutoModelForSequenceClassification.from_pretrained(
            path, config=hf_config, revision=cfg.model.revision, attn_implementation=kernel, output_loading_info=True)
    except OSError as e:
        raise ModelLoadError(_download_hint(cfg.model.model_name_or_path, "weights", e)) from None
    # Head parts missing from the checkpoint are freshly initialised: they must be saved with the adapter.
    missing = {k.rsplit(".", 1)[0] for k in info.get("missing_keys", [])}
    return model, sorted(missing)


def meta_model(cfg: Config, num_labels: int):
    """The model's structure on the meta device: no weights loaded, no memory used."""
    from transformers import AutoModelForSequenceClassification

    hf_config = load_hf_config(cfg.model.model_name_or_path, num_labels, None, cfg.model.revision)
    with torch.device("meta"):
        return AutoModelForSequenceClassification.from_config(hf_config)


def rank_pattern_masks(peft_model) -> dict[str, list[bool]] | None:
    """AdaLoRA's current rank masks per adapted module (None before the first allocation or for other methods)."""
    pcfg = peft_model.peft_config.get("default") if hasattr(peft_model, "peft_config") else None
    pattern = getattr(pcfg, "rank_pattern", None)
    if not pattern:
        return None
    return {name: [bool(x) for x in (v.tolist() if hasattr(v, "tolist") else v)] for name, v in pattern.items()}


def rank_pattern(peft_model) -> dict[str, int] | None:
    """AdaLoRA's current rank per adapted module (None before the first allocation or for other methods)."""
    masks = rank_pattern_masks(peft_model)
    # peft keys the pattern "<module>.lora_E.default" or, once an adapter was saved, "<module>.lora_E": one name each.
    return {name.replace(".default", "").removesuffix(".lora_E"): sum(m) for name, m in masks.items()} if masks else None


def merge_for_inference(peft_model) -> bool:
    """Fold the adapters into the base weights (a quarter less CPU time per text); only for a model that won't train.

    Logits move by float rounding (~1e-8). Returns False where the method cannot merge; the model then runs as is.
    """
    try:
        peft_model.merge_adapter()
    except (NotImplementedError, ValueError, AttributeError):
        return False
    return True


# BERT-style encoders whose sequence-classification heads read the first token alone (BERT's pooler, RoBERTa's
# head, FirstTokenLinear): in their last layer every other token's output is computed and thrown away.
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
