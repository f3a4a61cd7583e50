"""Adapter methods: peft configs for each method (target modules resolved per architecture), wrapping a base
model, the weight-decay rule, merging for inference."""

from __future__ import annotations

import re

import torch
from torch import nn

from budgetune.adalora import phases
from budgetune.config import Config, ConfigError, MethodConfig
from budgetune.modeling.classifier_heads import apply_head, head_modules

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
            sched = phases.schedule(m, total_step)
            return peft.AdaLoraConfig(init_r=m.rank, target_r=m.resolved_target_r(), lora_alpha=m.lora_alpha,
                                      lora_dropout=m.lora_dropout, bias=m.bias, tinit=sched.tinit,
                                      tfinal=sched.tfinal,
                                      deltaT=m.deltaT, beta1=m.beta1, beta2=m.beta2,
                                      orth_reg_weight=m.orth_reg_weight, total_step=total_step, **common, **opts)
        if m.method == "ia3":
            if "feedforward_modules" not in opts:
                # peft would fill in its per-architecture feed-forward modules even when they are not targeted,
                # and then refuse to reload the saved adapter (feedforward_modules must be within target_modules);
                # for a regex (all-linear) it has no defaults for some architectures (MPNet, DistilBERT, ELECTRA)
                feedforward = ia3_defaults(model.config.model_type)[1]
                opts["feedforward_modules"] = [t for t in feedforward if t in targets] if isinstance(
                    targets, list) else feedforward
            return peft.IA3Config(**common, **opts)
        if m.method == "vera":
            # save_projection: the frozen random matrices travel with the adapter, so reloading is exact.
            opts.setdefault("save_projection", True)
            return peft.VeraConfig(r=m.rank, vera_dropout=m.lora_dropout, bias=m.bias, **common, **opts)
        if m.method == "loha":
            return peft.LoHaConfig(r=m.rank, alpha=m.lora_alpha, **common, **opts)
        if m.method == "lokr":
            return peft.LoKrConfig(r=m.rank, alpha=m.lora_alpha, **common, **opts)
    except (TypeError, ValueError) as e:  # an unknown or ill-matched option (peft checks some values itself)
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




def merge_and_unload(peft_model) -> nn.Module:
    """The plain transformers model: every adapter folded into its base weights at its current scale, the trained
    head (modules_to_save) in place of the base model's, no peft module left.

    The trained head copies are put in place first: peft 0.21's merge_and_unload fails for IA3, VeRA, LoHa and LoKr
    on a saved module with no `weight` of its own (RoBERTa's classification head).
    """
    from peft.utils import ModulesToSaveWrapper

    for name, module in list(peft_model.named_modules()):
        if isinstance(module, ModulesToSaveWrapper):
            parent, _, attr = name.rpartition(".")
            trained = [module.modules_to_save[a] for a in module.active_adapters if a in module.modules_to_save]
            setattr(peft_model.get_submodule(parent), attr, trained[0] if trained else module.original_module)
    return peft_model.merge_and_unload()
