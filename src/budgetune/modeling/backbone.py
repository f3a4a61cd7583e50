"""Base models: Hub names, local folders and packaged models resolved; configs and base models loaded (or built
on the meta device for counting), with a clear hint offline."""

from __future__ import annotations

import dataclasses
import json
import os
from importlib import resources
from pathlib import Path

import torch
from torch import nn

from budgetune.config import Config, ConfigError
from budgetune.errors import ModelLoadError
from budgetune.modeling import packaged

# The seed's module names (BERT's, which RoBERTa, XLM-R and ELECTRA share) in each other architecture's own, so that
# `--target_modules query,value` (or key, dense, output.dense) adapts the same layers on every encoder. `dense` is
# BERT's attention output + both feed-forward layers; `output.dense` the Linear layers whose name ends so in BERT
# (attention output and feed-forward output: peft's IA3 default). Names not listed pass to peft unchanged.


def resolve_model_path(name: str) -> str:
    """`packaged:all-MiniLM-L6-v2` (or `packaged:all-mpnet-base-v2`) -> its folder here; anything else unchanged."""
    return packaged.resolve(name)


def architecture_file(name: str) -> Path | None:
    """The shipped config.json numbers for a well-known model id (or packaged name), or None."""
    safe = name.replace("/", "--").replace(":", "--")
    ref = resources.files("budgetune") / "resources" / "architectures" / f"{safe}.json"
    return Path(str(ref)) if ref.is_file() else None


def load_hf_config(name: str, num_labels: int, label_names: list[str] | None = None, revision: str | None = None,
                   shipped_ok: bool = True, problem_type: str | None = None):
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
    kwargs: dict = {"num_labels": num_labels}
    if problem_type is not None:  # the loss transformers computes: multi_label_classification, regression
        kwargs["problem_type"] = problem_type
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


def problem_type_of(task: str | None) -> str | None:
    """transformers' problem_type for a budgetune task; None for single_label (transformers infers it, as always)."""
    from budgetune import tasks

    return None if task in (None, tasks.SINGLE_LABEL) else tasks.problem_type(task)


def load_base(cfg: Config, label_names: list[str]) -> tuple[nn.Module, list[str]]:
    """Pretrained encoder + fresh head (seeded by the caller); also the head modules missing from the checkpoint.
    The head has one output per label (multi_label) or per target (regression: label_names is the target column)."""
    return load_pretrained(cfg.model.model_name_or_path, label_names, cfg.model.revision, cfg.model.attn_implementation,
                           cfg.model.attention_dropout, problem_type_of(cfg.data.task))


ATTENTION_DROPOUT_KEYS = ("attention_probs_dropout_prob", "attention_dropout")  # BERT-likes; DistilBERT, ...


def set_attention_dropout(hf_config, p: float) -> None:
    """Set the attention-probability dropout of `hf_config` to p, under whichever name its architecture uses."""
    keys = [k for k in ATTENTION_DROPOUT_KEYS if hasattr(hf_config, k)]
    if not keys:
        raise ConfigError(f"--attention_dropout: model type {hf_config.model_type!r} has no attention dropout "
                          f"setting ({' or '.join(ATTENTION_DROPOUT_KEYS)}); leave it null")
    for k in keys:
        setattr(hf_config, k, p)


def load_pretrained(name: str, label_names: list[str], revision: str | None = None,
                    attn_implementation: str = "auto",
                    attention_dropout: float | None = None,
                    problem_type: str | None = None) -> tuple[nn.Module, list[str]]:
    """The pretrained model `name` with a fresh sequence-classification head for `label_names`, loaded with the
    attention kernel `attn_implementation` means for it (and `attention_dropout` if not None); also the head
    modules missing from the checkpoint."""
    from transformers import AutoModelForSequenceClassification

    path = resolve_model_path(name)
    hf_config = load_hf_config(name, len(label_names), label_names, revision, shipped_ok=False,
                               problem_type=problem_type)
    if attention_dropout is not None:
        set_attention_dropout(hf_config, attention_dropout)
    if os.path.isdir(path) and not any(
        f.endswith((".safetensors", ".bin")) or f.endswith(".safetensors.index.json") for f in os.listdir(path)
    ):
        raise ModelLoadError(f"{path}: no model weights (model.safetensors or pytorch_model.bin) in this folder")
    kernel, _ = attention(hf_config, attn_implementation)
    try:
        model, info = AutoModelForSequenceClassification.from_pretrained(
            path, config=hf_config, revision=revision, attn_implementation=kernel, output_loading_info=True)
    except OSError as e:
        raise ModelLoadError(_download_hint(name, "weights", e)) from None
    # Head parts missing from the checkpoint are freshly initialised: they must be saved with the adapter.
    missing = {k.rsplit(".", 1)[0] for k in info.get("missing_keys", [])}
    return model, sorted(missing)


def checkpoint_missing(name: str, model: nn.Module) -> list[str]:
    """The modules of `model` whose parameters a local folder's checkpoint lacks (as load_pretrained reports them:
    e.g. BERT's pooler in a masked-LM checkpoint), read from the safetensors header or shard index, no weights; []
    where that cannot be read without loading (a Hub id, a packaged name, pytorch_model.bin)."""
    folder = Path(name)
    if name.startswith("packaged:") or not folder.is_dir():
        return []
    keys = checkpoint_keys(folder)
    if keys is None:
        return []
    prefix = f"{model.base_model_prefix}."

    def plain(key: str) -> str:  # transformers' renames: the base model's prefix, LayerNorm's gamma/beta
        key = key.removeprefix(prefix)
        return key[: -len(".gamma")] + ".weight" if key.endswith(".gamma") else (
            key[: -len(".beta")] + ".bias" if key.endswith(".beta") else key)

    have = {plain(k) for k in keys}
    return sorted({n.rsplit(".", 1)[0] for n, _ in model.named_parameters() if plain(n) not in have})


def checkpoint_keys(folder: Path) -> set[str] | None:
    """The tensor names of a folder's safetensors checkpoint (one file or shards), or None."""
    from safetensors import safe_open

    if (folder / "model.safetensors").is_file():
        with safe_open(str(folder / "model.safetensors"), framework="pt") as f:
            return set(f.keys())
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        return set(json.loads(index.read_text(encoding="utf-8")).get("weight_map", {}))
    return None


def meta_model(cfg: Config, num_labels: int):
    """The model's structure on the meta device: no weights loaded, no memory used."""
    from transformers import AutoModelForSequenceClassification

    hf_config = load_hf_config(cfg.model.model_name_or_path, num_labels, None, cfg.model.revision)
    with torch.device("meta"):
        return AutoModelForSequenceClassification.from_config(hf_config)
