"""Configuration: dataclass groups, YAML files and command-line overrides.

Every field's docstring is its help text. Field names are unique across groups, so a flag can be given flat
(`--learning_rate 1e-3`, Hugging Face style) or dotted (`--train.learning_rate 1e-3`).
"""

from __future__ import annotations

import ast
import dataclasses
import difflib
import inspect
import math
import textwrap
import types
import typing
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from budgetune.errors import ConfigError
from budgetune.textcheck import lone_surrogate

PACKAGED_MINILM = "packaged:all-MiniLM-L6-v2"
PACKAGED_MPNET = "packaged:all-mpnet-base-v2"  # the `mpnet` extra (budgetune.packaged)
BUILTIN_DATA = "builtin:headlines"



@dataclass
class ModelConfig:
    model_name_or_path: str = PACKAGED_MINILM
    """Hub id or local folder of the pretrained encoder; `packaged:all-MiniLM-L6-v2` is the MiniLM shipped with pip,
    `packaged:all-mpnet-base-v2` the base-size MPNet whose weights the `mpnet` extra installs."""
    head: str = "default"
    """Classification head: `default` (the model's own, trained), `linear` (one Linear on the first token, in place
    of a dense+out_proj head; where the dense layer sits beside the output layer, DeBERTa's pooler or DistilBERT's
    pre_classifier, only the output layer trains), or `frozen_dense` (the model's own head with its dense layer
    frozen: only the output projection trains)."""
    revision: str | None = None
    """Hub revision (branch, tag or commit) of the model."""
    attn_implementation: str = "auto"
    """Attention kernel: `auto` (SDPA where transformers has it for the architecture, eager otherwise, e.g. for
    MPNet and DeBERTa), `sdpa` (PyTorch fused attention) or `eager`; the run's header says which it used."""
    attention_dropout: float | None = None
    """Dropout on the attention probabilities while training (the model config's attention_probs_dropout_prob or
    attention_dropout); null: the model's own (0.1 for BERT, MiniLM, RoBERTa, MPNet). SDPA runs its fused kernel
    only without it: on a CPU a dropout above 0 falls back to the unfused math path, with a random mask as large
    as the attention matrix (see the benchmarks page)."""

    def __post_init__(self):
        if self.head not in ("default", "linear", "frozen_dense"):
            raise ConfigError(f"--head must be default, linear or frozen_dense, got {self.head!r}")
        if self.attn_implementation not in ("auto", "sdpa", "eager"):
            raise ConfigError(f"--attn_implementation must be auto, sdpa or eager, got {self.attn_implementation!r}")
        if self.attention_dropout is not None and not 0 <= self.attention_dropout < 1:
            raise ConfigError(f"--attention_dropout must be in [0, 1) or null, got {self.attention_dropout}")


@dataclass
class DataConfig:
    dataset_name: str = BUILTIN_DATA
    """Hub dataset id, a local file (csv, tsv, json, jsonl, parquet, pkl) or folder, or `builtin:headlines`."""
    dataset_config_name: str | None = None
    """Hub dataset configuration name."""
    validation_file: str | None = None
    """Optional separate validation file; when absent, a stratified split is carved from the training data."""
    test_file: str | None = None
    """Optional labelled test file, evaluated once with the best adapter at the end (never used for selection)."""
    text_column_name: str | None = None
    """Column holding the text (default: the first of text, sentence, content, review)."""
    label_column_name: str | None = None
    """Column holding the label (default: the first of label, labels, class; regression also score, target);
    regression on several targets names them all, comma-separated (e.g. `valence,arousal`)."""
    label_names: list[str] | None = None
    """Names of the classes (multi_label: of the labels) in label order; default: from the data."""
    task: str = "single_label"
    """What a row's label is: `single_label` (one class per text, softmax and cross-entropy), `multi_label` (a set
    of labels per text: a JSON array per cell, or names joined by --label_delimiter; one sigmoid per label, BCE, a
    threshold per label tuned on validation) or `regression` (a number per text in the label column, MSE); see the
    Tasks page of the docs."""
    text_pair_column_name: str | None = None
    """A second text column: each row is encoded as a true pair (the tokenizer's text, text_pair with longest_first
    truncation), as for NLI or duplicate questions; every row needs one. Default: single texts."""
    label_delimiter: str | None = None
    """multi_label: the string that separates a cell's labels (e.g. `;` for `sports;politics`); default: each cell
    is a JSON array such as ["sports", "politics"]."""
    validation_split_percentage: float = 10.0
    """Percent of the training data held out for validation when the data has no validation split."""
    max_seq_length: int = 128
    """Texts are truncated to this many tokens; batches are padded only to their longest text."""
    max_train_samples: int | None = None
    """Use only the first N training rows (after the validation split), for quick runs."""
    max_eval_samples: int | None = None
    """Use only the first N validation rows."""
    group_by_length: bool = True
    """Batch training texts of similar length together (shuffled buckets) to cut padding."""
    pad_to_buckets: int = 0
    """Pad each training batch up to one of this many fixed lengths, those that pad the first epoch's batches least
    (a few shapes, for CUDA graphs or a compiled step); 0: pad each batch to its longest text."""
    cache_dir: str | None = None
    """Where tokenized data is cached, and the int8 graphs of `--precision int8` by onnxruntime (under onnx-int8/;
    default: ~/.cache/budgetune)."""

    def __post_init__(self):
        if not 0 < self.validation_split_percentage < 100:
            raise ConfigError(
                f"--validation_split_percentage must be between 0 and 100, got {self.validation_split_percentage}"
            )
        if self.max_seq_length < 8:
            raise ConfigError(f"--max_seq_length must be at least 8, got {self.max_seq_length}")
        if self.pad_to_buckets < 0:
            raise ConfigError(f"--pad_to_buckets must be 0 (off) or a number of lengths, got {self.pad_to_buckets}")
        for flag in ("max_train_samples", "max_eval_samples"):
            value = getattr(self, flag)
            if value is not None and value < 1:
                raise ConfigError(f"--{flag} must be a positive number, got {value}")
        check_task_fields(self)


def check_task_fields(d: DataConfig) -> None:
    """The task's own fields, and the combinations of data fields a task refuses."""
    from budgetune import tasks

    tasks.check_task(d.task)
    if d.label_delimiter is not None:
        if d.task != tasks.MULTI_LABEL:
            raise ConfigError(f"--label_delimiter separates the labels of a multi_label cell; with --task {d.task} "
                              "leave it out (or set --task multi_label)")
        if d.label_delimiter == "" or any(c in d.label_delimiter for c in '\n\r"[]'):
            raise ConfigError(f"--label_delimiter must be a non-empty string without quotes, brackets or line "
                              f"breaks, got {d.label_delimiter!r}")
    if d.task == tasks.REGRESSION and d.label_names is not None:
        raise ConfigError("--label_names names classes; --task regression predicts a number from the label column "
                          "(--label_column_name): leave --label_names out")
    if d.text_pair_column_name is not None and d.text_pair_column_name == d.text_column_name:
        raise ConfigError(f"--text_pair_column_name {d.text_pair_column_name!r} is the text column itself; name the "
                          "column of the second text")


OPTIMIZERS = ("adamw_torch", "adamw_torch_fused", "adafactor", "sgd")


def scheduler_names() -> tuple[str, ...]:
    """Every schedule transformers.get_scheduler offers."""
    from transformers.trainer_utils import SchedulerType

    return tuple(s.value for s in SchedulerType)


METHODS = ("adalora", "lora", "dora", "ia3", "vera", "loha", "lokr", "full")


@dataclass
class MethodConfig:
    method: str = "lora"
    """Adapter method: adalora, lora, dora, ia3, vera, loha or lokr; `full` trains every weight (no adapter: an
    unbudgeted teacher for `budgetune distill`; needs --max_trainable_params null)."""
    rank: int | str = 16
    """Rank (AdaLoRA: the initial rank init_r); `auto` picks the largest rank that fits the budget."""
    target_modules: list[str] | str | None = "all-linear"
    """Modules to adapt, e.g. [query, value], or `all-linear` (every Linear inside the encoder layers); null:
    query,value (IA3: peft's defaults). The seed's (BERT's) names query, key, value, dense work on every encoder,
    mapped to its own (MPNet q,k,v,o; DistilBERT q_lin,k_lin,v_lin,out_lin; DeBERTa query_proj,...); the
    architecture's own names work too."""
    lora_alpha: float = 32
    """Scaling numerator (LoRA, DoRA, AdaLoRA, LoHa, LoKr)."""
    lora_dropout: float = 0.0
    """Dropout on the adapter input (LoRA, DoRA, AdaLoRA, VeRA); each adapted layer pays for its own copy of the
    activations, a fifth of a CPU step with all-linear targets, so the default is off."""
    bias: str = "none"
    """Which biases train: none, all or lora_only (LoRA family)."""
    target_r: int | None = None
    """AdaLoRA: average rank kept at the end; default rank // 2 (equal to rank would re-allocate nothing)."""
    tinit: int | float = 200
    """AdaLoRA: optimizer steps of warm-up before any rank is pruned, or a fraction of all steps (e.g. 0.1)."""
    tfinal: int | float = 1000
    """AdaLoRA: final optimizer steps with the rank pattern fixed, or a fraction of all steps (e.g. 0.3); early
    stopping counts only in this phase."""
    deltaT: int = 10
    """AdaLoRA: optimizer steps between two budget allocations."""
    beta1: float = 0.85
    """AdaLoRA: EMA factor of the sensitivity."""
    beta2: float = 0.85
    """AdaLoRA: EMA factor of the uncertainty."""
    orth_reg_weight: float = 0.5
    """AdaLoRA: weight of the orthogonality regulariser on P and Q."""
    lean_adalora: bool = True
    """AdaLoRA: budgetune's batched step (regulariser, allocator and masks with a fraction of peft's operators and
    no host sync per step; the same numbers, modules and saved adapter); false: peft's own AdaLoraModel step."""
    method_options: dict[str, Any] = field(default_factory=dict)
    """Any further keyword of the peft config class of the method (e.g. {projection_prng_key: 1} for VeRA)."""

    def __post_init__(self):
        if self.method not in METHODS:
            close = difflib.get_close_matches(str(self.method), METHODS, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ConfigError(f"--method {self.method!r} is unknown{hint}; choose one of {', '.join(METHODS)}")
        if isinstance(self.rank, str):
            if self.rank.strip().isdigit():
                self.rank = int(self.rank)
            elif self.rank != "auto":
                raise ConfigError(f"--rank must be a positive integer or auto, got {self.rank!r}")
        if isinstance(self.rank, int) and self.rank < 1:
            raise ConfigError(f"--rank must be a positive integer or auto, got {self.rank}")
        if isinstance(self.target_modules, str) and self.target_modules != "all-linear":
            self.target_modules = [m.strip() for m in self.target_modules.split(",") if m.strip()]
        if self.bias not in ("none", "all", "lora_only"):
            raise ConfigError(f"--bias must be none, all or lora_only, got {self.bias!r}")
        if not 0 <= self.lora_dropout < 1:
            raise ConfigError(f"--lora_dropout must be in [0, 1), got {self.lora_dropout}")
        if not (self.lora_alpha > 0 and math.isfinite(self.lora_alpha)):
            raise ConfigError(f"--lora_alpha must be a positive number, got {self.lora_alpha}")
        for flag in ("beta1", "beta2"):
            if not 0 <= getattr(self, flag) < 1:
                raise ConfigError(f"--{flag} must be in [0, 1), got {getattr(self, flag)}")
        if self.bias != "none" and self.method in ("ia3", "loha", "lokr"):
            raise ConfigError(f"--bias {self.bias}: peft's {self.method} has no bias option (it would be ignored, "
                              "and no bias would train); leave --bias none")
        for flag in ("tinit", "tfinal"):
            value = getattr(self, flag)
            if isinstance(value, float) and value.is_integer() and value >= 1:
                setattr(self, flag, int(value))
            elif isinstance(value, float) and not 0 < value < 1:
                raise ConfigError(f"--{flag} must be a step count or a fraction between 0 and 1, got {value}")
            if getattr(self, flag) < 0:
                raise ConfigError(f"--{flag} must not be negative, got {value}")
        if self.deltaT < 1:
            raise ConfigError(f"--deltaT must be at least 1 optimizer step, got {self.deltaT}")
        if (self.method == "adalora" and self.target_r is not None and isinstance(self.rank, int)
                and not 1 <= self.target_r <= self.rank):
            raise ConfigError(f"--target_r must be between 1 and --rank ({self.rank}), got {self.target_r}")

    def resolved_target_r(self) -> int:
        """AdaLoRA's target_r; half the initial rank unless set."""
        assert isinstance(self.rank, int), "resolve rank: auto first"
        return self.target_r if self.target_r is not None else max(1, self.rank // 2)


@dataclass
class BudgetConfig:
    max_trainable_params: int | str | None = 1_000_000  # a str ('1M', '250k') becomes an int in __post_init__
    """Hard cap on trainable parameters (adapters + head + anything unfrozen); null switches the gate off."""

    def __post_init__(self):
        if isinstance(self.max_trainable_params, str):
            self.max_trainable_params = parse_count(self.max_trainable_params, "--max_trainable_params")
        if self.max_trainable_params is not None and self.max_trainable_params < 1:
            raise ConfigError(f"--max_trainable_params must be positive or null, got {self.max_trainable_params}")


def metric_names() -> tuple[str, ...]:
    """Every task's validation metrics (Config checks that the task has the one chosen)."""
    from budgetune.tasks import METRICS

    return tuple(dict.fromkeys(m for names in METRICS.values() for m in names))


@dataclass
class TrainConfig:
    learning_rate: float = 1e-3
    """Peak learning rate of the optimizer."""
    weight_decay: float = 0.01
    """Weight decay of the optimizer (not applied to biases, LayerNorm or AdaLoRA's singular values)."""
    optim: str = "adamw_torch"
    """Optimizer: adamw_torch (torch's AdamW, with its fused kernel on a GPU), adamw_torch_fused (the fused kernel
    on every device, CPU too), adafactor (transformers' Adafactor as Hugging Face's Trainer sets it: the learning
    rate is --learning_rate, no relative step or parameter scaling) or sgd (torch's SGD, no momentum unless
    --optim_args says, as in Hugging Face's Trainer). --cuda_graphs captures AdamW only."""
    optim_args: str | None = None
    """Extra optimizer arguments as KEY=VALUE,...; sgd takes momentum, dampening and nesterov (e.g.
    `momentum=0.9,nesterov=true`)."""
    class_weights: str | list[float] | None = None
    """Weights of the classes in the training cross entropy: `balanced` (sklearn's compute_class_weight on the training
    split's labels, n / (classes x count)) or one weight above 0 per label in label order, e.g. 1,4,1,1. The
    resolved weights are in metrics.jsonl's `loss` event; validation loss stays unweighted."""
    label_smoothing_factor: float = 0.0
    """Label smoothing of the training cross entropy (0 <= x < 1): the target is (1 - x) on the label and x spread
    evenly over all labels; validation loss stays plain."""
    per_device_train_batch_size: int = 32
    """Batch size on each process; the global batch is this x processes x gradient_accumulation_steps."""
    per_device_eval_batch_size: int = 256
    """Batch size for evaluation and prediction on each process (on CPU also capped at 2048 padded tokens)."""
    gradient_accumulation_steps: int = 1
    """Micro-batches per optimizer step."""
    num_train_epochs: float = 4
    """Epochs to train (early stopping may end sooner)."""
    max_steps: int = -1
    """If positive, stop after this many optimizer steps (overrides num_train_epochs)."""
    warmup_ratio: float = 0.06
    """Fraction of all optimizer steps spent warming the learning rate up (rounded down: transformers rounds up, so
    a run here may warm up one step less)."""
    warmup_steps: int | float = 0
    """Optimizer steps of warmup, or a fraction of all steps (0 < x < 1, as transformers 5 reads it, but rounded
    down); when above 0 it overrides --warmup_ratio (as in Hugging Face's Trainer)."""
    lr_scheduler_type: str = "linear"
    """Learning rate schedule, any of transformers.get_scheduler's: linear (decay to 0 after warmup), cosine,
    cosine_with_restarts, polynomial, constant (no warmup), constant_with_warmup, inverse_sqrt,
    reduce_lr_on_plateau and greedy (these two step after each evaluation on --metric_for_best_model),
    cosine_with_min_lr and cosine_warmup_with_min_lr (need min_lr or min_lr_rate in --lr_scheduler_kwargs),
    warmup_stable_decay (needs num_decay_steps)."""
    lr_scheduler_kwargs: dict[str, Any] = field(default_factory=dict)
    """Extra keyword arguments of the schedule, e.g. {num_cycles: 2} for cosine_with_restarts, {min_lr_rate: 0.1}
    for cosine_with_min_lr, {num_decay_steps: 20} for warmup_stable_decay, {factor: 0.5, patience: 1} for
    reduce_lr_on_plateau (whose mode follows --metric_for_best_model unless given)."""
    max_grad_norm: float = 1.0
    """Gradient clipping norm; 0 switches clipping off."""
    seed: int = 42
    """Seed for the split, the head's initialisation, adapters, dropout and batch order."""
    eval_strategy: str = "epoch"
    """When to evaluate on the validation split: epoch, steps or no (no validation while training: the last step's
    adapter is shipped, early stopping and --metric_for_best_model do not apply; the end of the run still scores
    it on validation and chooses its adapter scale there)."""
    eval_steps: int = 100
    """Optimizer steps between evaluations when eval_strategy is steps."""
    logging_steps: int = 10
    """Optimizer steps between two training-loss lines in metrics.jsonl."""
    save_strategy: str | None = None
    """When to write resumable checkpoints: no (never, not even on a stop signal), epoch (at the end of each
    epoch), steps (every --save_steps); null: at every evaluation, and every --save_steps when above 0."""
    save_steps: int = 0
    """Optimizer steps between resumable checkpoints (with --save_strategy steps, or besides every evaluation when
    --save_strategy is null); 0: only at evaluations."""
    save_total_limit: int = 2
    """Resumable checkpoints kept (the newest); the best adapter is kept separately."""
    early_stopping_patience: int | None = 2
    """Stop after this many evaluations without improvement of the metric; null: never stop early."""
    metric_for_best_model: str = "accuracy"
    """Validation metric that selects the best adapter. single_label: accuracy, macro_f1 or loss; multi_label:
    micro_f1, macro_f1, subset_accuracy or loss (the default, accuracy, means micro_f1); regression: mse, mae,
    pearson, spearman or loss (the default means mse)."""
    mixed_precision: str = "auto"
    """auto, no (fp32), bf16 or fp16. auto: bf16 on a GPU that has it (else fp16); on CPU bf16 where torch
    detects native bf16 matrix instructions (AMX or AVX512-BF16), else fp32; the environment variable
    BUDGETUNE_MIXED_PRECISION=fp32|bf16|fp16 overrides what auto picks. The run's first line and its
    metrics.jsonl (a `precision` event) say which, and why. Saved adapters are fp32 either way."""
    frozen_in_compute_dtype: bool = True
    """Under bf16 mixed precision, store the frozen base's Linear weights in bf16 once instead of autocast
    re-casting them on every forward (same numbers); adapters, head and optimizer state stay fp32. No effect
    otherwise."""
    cuda_graphs: bool = False
    """Capture the training step (forward, backward, clipping, AdamW) in a CUDA graph per batch shape and replay
    it (GPU only; needs --pad_to_buckets). Where capture is impossible (CPU, several processes, accumulation, fp16,
    a custom loss) the run says why in one line and trains eagerly, with the same fused AdamW."""
    torch_compile: bool = False
    """Compile the model with torch.compile (GPU; slower start, faster steps)."""
    dataloader_num_workers: int = 0
    """DataLoader worker processes."""
    resume_from_checkpoint: str | None = None
    """A checkpoint folder, a run folder (its latest checkpoint), or auto (the latest in output_dir)."""
    deterministic: bool = False
    """Use deterministic algorithms (slower; for exact resume comparisons)."""
    robust_tolerance: float | None = 0.5
    """At the end, the adapter's default scale toward the pretrained model (0.5 to 1, see `evaluate
    --adapter_scale`): the smallest whose validation accuracy is within this many points of the best; it is what
    evaluate, predict and serve use unless --adapter_scale says otherwise. null: always 1 (the raw adapter)."""
    inference_precision_tolerance: float | None = 0.2
    """At the end, the saved adapter (merged, at its scale) runs the validation split in each precision this
    machine computes in (fp32, bf16, int8); the fastest whose accuracy is within this many points of fp32's is
    recorded in the bundle with the table: what `--precision auto` of evaluate, predict and serve uses. null: not
    measured (auto then follows the hardware)."""

    def __post_init__(self):
        positive = ("per_device_train_batch_size", "per_device_eval_batch_size", "gradient_accumulation_steps",
                    "logging_steps", "eval_steps")
        for flag in positive:
            if getattr(self, flag) < 1:
                raise ConfigError(f"--{flag} must be at least 1, got {getattr(self, flag)}")
        if not self.learning_rate > 0 or not math.isfinite(self.learning_rate):
            raise ConfigError(f"--learning_rate must be a positive number, got {self.learning_rate}")
        if self.max_steps <= 0 and not (self.num_train_epochs > 0 and math.isfinite(self.num_train_epochs)):
            raise ConfigError(f"--num_train_epochs must be a positive number (or set --max_steps), got "
                              f"{self.num_train_epochs}")
        for flag in ("weight_decay", "max_grad_norm"):  # 0: none; a negative or not-a-number value trains nonsense
            if not (getattr(self, flag) >= 0 and math.isfinite(getattr(self, flag))):
                raise ConfigError(f"--{flag} must be a number of at least 0, got {getattr(self, flag)}")
        if not 0 <= self.warmup_ratio < 1:
            raise ConfigError(f"--warmup_ratio must be in [0, 1), got {self.warmup_ratio}")
        choices = {"eval_strategy": ("epoch", "steps", "no"), "metric_for_best_model": metric_names(),
                   "mixed_precision": ("auto", "no", "bf16", "fp16"), "optim": OPTIMIZERS,
                   "save_strategy": (None, "no", "epoch", "steps")}
        if self.lr_scheduler_type != "linear":  # transformers' names (importing it costs seconds: only when asked)
            choices["lr_scheduler_type"] = scheduler_names()
        for flag, allowed in choices.items():
            if getattr(self, flag) not in allowed:
                names = ", ".join("null" if a is None else a for a in allowed)
                raise ConfigError(f"--{flag} must be one of {names}, got {getattr(self, flag)!r}")
        self.check_training_options()
        if self.robust_tolerance is not None and not 0 <= self.robust_tolerance <= 100:
            raise ConfigError(f"--robust_tolerance must be between 0 and 100 points (or null), got {self.robust_tolerance}")
        if self.inference_precision_tolerance is not None and not 0 <= self.inference_precision_tolerance <= 100:
            raise ConfigError("--inference_precision_tolerance must be between 0 and 100 points (or null), got "
                              f"{self.inference_precision_tolerance}")
        if self.early_stopping_patience is not None and self.early_stopping_patience < 1:
            raise ConfigError(f"--early_stopping_patience must be at least 1 or null, got {self.early_stopping_patience}")

    def check_training_options(self) -> None:
        """--warmup_steps, --save_strategy/--save_steps, --class_weights, --label_smoothing_factor and how they meet
        --eval_strategy and --lr_scheduler_type."""
        for flag in ("warmup_steps", "save_steps"):
            if getattr(self, flag) < 0:
                raise ConfigError(f"--{flag} must be 0 or a number of optimizer steps, got {getattr(self, flag)}")
        if isinstance(self.warmup_steps, float) and self.warmup_steps >= 1:
            if not self.warmup_steps.is_integer():
                raise ConfigError(f"--warmup_steps must be a step count or a fraction between 0 and 1, got "
                                  f"{self.warmup_steps}")
            self.warmup_steps = int(self.warmup_steps)
        if self.save_strategy == "steps" and self.save_steps < 1:
            raise ConfigError("--save_strategy steps needs --save_steps N (optimizer steps between checkpoints)")
        if self.eval_strategy == "no" and self.lr_scheduler_type in ("reduce_lr_on_plateau", "greedy"):
            raise ConfigError(f"--lr_scheduler_type {self.lr_scheduler_type} steps on the validation metric, which "
                              "--eval_strategy no never computes; choose another schedule or evaluate")
        if not 0 <= self.label_smoothing_factor < 1:
            raise ConfigError(f"--label_smoothing_factor must be in [0, 1), got {self.label_smoothing_factor}")
        if isinstance(self.class_weights, str) and self.class_weights != "balanced":
            self.class_weights = [_to_float(w, "--class_weights") for w in self.class_weights.split(",") if w.strip()]
        if isinstance(self.class_weights, list):
            bad = [w for w in self.class_weights if not (math.isfinite(w) and w > 0)]
            if bad or not self.class_weights:
                raise ConfigError(f"--class_weights must be `balanced` or one number above 0 per label, got "
                                  f"{bad[0] if bad else 'no weights'}")


@dataclass
class OutputConfig:
    output_dir: str = "runs/default"
    """Run folder: config, metrics, checkpoints, best adapter, plots, evaluation."""
    overwrite_output_dir: bool = False
    """Allow writing into a folder that already holds a run."""
    report_to: list[str] = field(default_factory=list)
    """Trackers besides metrics.jsonl: tensorboard, wandb, mlflow (off by default)."""
    run_name: str | None = None
    """Name shown in trackers and the model card (default: the output folder's name)."""

    def __post_init__(self):
        if isinstance(self.report_to, str):
            self.report_to = [] if self.report_to in ("", "none") else self.report_to.split(",")
        bad = [t for t in self.report_to if t not in ("tensorboard", "wandb", "mlflow")]
        if bad:
            raise ConfigError(f"--report_to: unknown tracker {bad[0]!r}; choose tensorboard, wandb or mlflow")


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    method: MethodConfig = field(default_factory=MethodConfig)
    budget: BudgetConfig = field(default_factory=BudgetConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    output: OutputConfig = field(default_factory=OutputConfig)

    def __post_init__(self):
        from budgetune import tasks

        if self.data.task != tasks.SINGLE_LABEL and self.train.metric_for_best_model == "accuracy":
            self.train.metric_for_best_model = tasks.DEFAULT_METRIC[self.data.task]  # the default, for this task
        tasks.check_metric(self.data.task, self.train.metric_for_best_model)
        if self.data.task == tasks.REGRESSION and self.train.class_weights is not None:
            raise ConfigError("--class_weights: a regression target has no classes to weigh (--task regression); "
                              "leave it unset")
        if self.data.task != tasks.SINGLE_LABEL and self.train.label_smoothing_factor:
            raise ConfigError(f"--label_smoothing_factor smooths one class per row; --task {self.data.task} has "
                              "none: leave it 0")
        if self.train.cuda_graphs and not self.data.pad_to_buckets:
            raise ConfigError("--cuda_graphs true needs --pad_to_buckets N (e.g. 6): a graph is captured per batch "
                              "shape, and without fixed lengths nearly every batch would have a shape of its own")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


GROUPS: dict[str, type] = {f.name: f.default_factory for f in dataclasses.fields(Config)}  # type: ignore[misc]
FLAT: dict[str, str] = {f.name: group for group, cls in GROUPS.items() for f in dataclasses.fields(cls)}


def parse_count(text: str | int, flag: str) -> int:
    """'1M', '1_000_000', '250k' -> int."""
    if isinstance(text, int):
        return text
    s = str(text).strip().replace("_", "").replace(",", "").lower()
    mult = {"k": 1_000, "m": 1_000_000, "b": 1_000_000_000}.get(s[-1:], 1)
    try:
        value = float(s[:-1] if mult > 1 else s) * mult
    except ValueError:
        raise ConfigError(f"{flag}: expected a count like 1000000, 1M or 250k, got {text!r}") from None
    if not math.isfinite(value) or value != int(value):
        raise ConfigError(f"{flag}: expected a whole count like 1000000, 1M or 250k, got {text!r}")
    return int(value)


def field_docs(cls: type) -> dict[str, str]:
    """Attribute docstrings of a dataclass, read from its source (they are the help text)."""
    tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    body = tree.body[0].body  # type: ignore[attr-defined]
    docs = {}
    for node, nxt in zip(body, body[1:]):
        if isinstance(node, ast.AnnAssign) and isinstance(nxt, ast.Expr) and isinstance(nxt.value, ast.Constant):
            docs[node.target.id] = " ".join(str(nxt.value.value).split())  # type: ignore[union-attr]
    return docs


def _coerce(value: Any, annotation: Any, where: str) -> Any:
    """Convert a YAML or command-line value to the field's type; errors name `where`."""
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType):
        return _coerce_union(value, args, where)
    if annotation is Any:
        return value
    if origin is list:
        if value is None or (isinstance(value, str) and value.strip().lower() in ("", "none")):
            value = []  # `--report_to none` (Hugging Face's spelling) and a YAML null: an empty list
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(value, list):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        return [_coerce(v, args[0], where) for v in value] if args else value
    if origin is dict:
        if isinstance(value, str):
            try:
                value = yaml.safe_load(value)
            except yaml.YAMLError as e:
                raise ConfigError(f"{where}: not a YAML mapping ({' '.join(str(e).split())[:200]})") from None
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        return value
    scalar = _SCALARS.get(annotation)
    return scalar(value, where) if scalar is not None else value


def _coerce_union(value: Any, args: tuple, where: str) -> Any:
    """The first member of the union (`int | None`, `str | list[str]`) that accepts the value."""
    if value is None or (isinstance(value, str) and value.lower() in ("null", "none") and type(None) in args):
        if type(None) in args:
            return None
    if value is not None and type(value) in args:  # already the right type: "all-linear" stays a str
        return value
    for arg in [a for a in args if a is not type(None)]:
        try:
            return _coerce(value, arg, where)
        except ConfigError:
            continue  # the next member of the union may accept it; the message below names them all
    names = " or ".join(_type_name(a) for a in args)
    raise ConfigError(f"{where}: expected {names}, got {value!r}")


def _to_bool(value: Any, where: str) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.lower() in ("true", "1", "yes", "false", "0", "no"):
        return value.lower() in ("true", "1", "yes")
    raise ConfigError(f"{where}: expected true or false, got {value!r}")


def _to_int(value: Any, where: str) -> int:
    if isinstance(value, bool):
        raise ConfigError(f"{where}: expected an integer, got {value!r}")
    if isinstance(value, int):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, str):
        try:
            return int(value.replace("_", ""))
        except ValueError:
            pass
    raise ConfigError(f"{where}: expected an integer, got {value!r}")


def _to_float(value: Any, where: str) -> float:
    if isinstance(value, bool):
        raise ConfigError(f"{where}: expected a number, got {value!r}")
    try:
        return float(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{where}: expected a number, got {value!r}") from None


def _to_str(value: Any, where: str) -> str:
    if isinstance(value, (dict, list)) or value is None:
        raise ConfigError(f"{where}: expected a string, got {value!r}")
    return str(value)


_SCALARS: dict[Any, Callable[[Any, str], Any]] = {bool: _to_bool, int: _to_int, float: _to_float, str: _to_str}


def _type_name(t: Any) -> str:
    return {int: "an integer", float: "a number", str: "a string", bool: "true/false",
            type(None): "null"}.get(t, getattr(t, "__name__", str(t)))


def build_config(sections: dict[str, dict[str, Any]], source: str = "config") -> Config:
    """Build a validated Config from {group: {field: value}}; unknown keys and wrong types are errors."""
    groups = {}
    for group, values in sections.items():
        if group not in GROUPS:
            close = difflib.get_close_matches(str(group), GROUPS, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ConfigError(f"{source}: unknown section {group!r}{hint}; sections are {', '.join(GROUPS)}")
        if values is None:
            values = {}
        if not isinstance(values, dict):
            raise ConfigError(f"{source}: section {group!r} must be a mapping of keys to values")
        cls = GROUPS[group]
        hints = typing.get_type_hints(cls)
        kwargs = {}
        for key, value in values.items():
            if key not in hints:
                close = difflib.get_close_matches(str(key), hints, n=1)
                hint = f" (did you mean {close[0]!r}?)" if close else ""
                raise ConfigError(f"{source}: unknown key {key!r} in section {group!r}{hint}")
            kwargs[key] = _coerce(value, hints[key], f"{source}: {group}.{key}")
        try:
            groups[group] = cls(**kwargs)
        except ConfigError as e:
            raise ConfigError(f"{source}: {e}" if source != "command line" else str(e)) from None
    try:  # the checks across sections (--cuda_graphs needs --pad_to_buckets, a task's metric, ...)
        return Config(**groups)
    except ConfigError as e:
        raise ConfigError(f"{source}: {e}" if source != "command line" else str(e)) from None


def refuse_lone_surrogate(value: object, source: str) -> None:
    """A config value (from a YAML file or the command line) must be Unicode text: name the key that is not."""
    found = lone_surrogate(value)
    if found is not None:
        key = "".join(f"{p}: " for p in [".".join(str(p) for p in found.path)] if p)
        raise ConfigError(f"{source}: {key}{'a key' if found.in_key else 'the value'} is not valid Unicode "
                          f"({found.describe()})")


def load_yaml(path: str | Path) -> dict[str, dict[str, Any]]:
    """Read a config YAML into sections; errors name the file."""
    path = Path(path)
    try:
        data = path.read_bytes()
        raw = yaml.safe_load(data.decode("utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"--config: no such file {path}") from None
    except IsADirectoryError:
        raise ConfigError(f"--config: {path} is a folder, not a YAML file") from None
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        raise ConfigError(f"{path}, line {line}: not UTF-8 text (byte {data[e.start]:#04x} at offset "
                          f"{e.start})") from None
    except RecursionError:
        raise ConfigError(f"{path}: YAML nested too deeply") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML ({e})") from None
    refuse_lone_surrogate(raw, str(path))
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected sections (model, data, method, budget, train, output) at the top level")
    return raw


def parse_overrides(args: list[str]) -> dict[str, dict[str, Any]]:
    """`--learning_rate 1e-3 --train.seed=1` -> {"train": {"learning_rate": "1e-3", "seed": "1"}}."""
    out: dict[str, dict[str, Any]] = {}
    i = 0
    while i < len(args):
        arg = args[i]
        if not arg.startswith("--"):
            raise ConfigError(f"unexpected argument {arg!r}; options look like --learning_rate 1e-3")
        key, eq, value = arg[2:].partition("=")
        if not eq:
            if i + 1 < len(args) and not args[i + 1].startswith("--"):
                value = args[i + 1]
                i += 1
            else:
                value = None  # a bare flag: --overwrite_output_dir
        group, _, name = key.rpartition(".")
        if not group:
            if name not in FLAT:
                close = difflib.get_close_matches(name, FLAT, n=1)
                hint = f" (did you mean --{close[0]}?)" if close else ""
                raise ConfigError(f"unknown option --{name}{hint}")
            group = FLAT[name]
        if value is None:
            if group in GROUPS and typing.get_type_hints(GROUPS[group]).get(name) is not bool:
                raise ConfigError(f"--{name} needs a value, e.g. --{name} VALUE (budgetune train --help)")
            value = "true"
        refuse_lone_surrogate(value, f"--{name}")
        out.setdefault(group, {})[name] = value
        i += 1
    return out


def merge(base: dict[str, dict[str, Any]], over: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    merged = {k: dict(v or {}) for k, v in base.items()}
    for group, values in over.items():
        merged.setdefault(group, {}).update(values)
    return merged


def resolve(config_file: str | None, overrides: list[str]) -> Config:
    """The config a command runs with: defaults <- YAML file <- command-line overrides."""
    sections = load_yaml(config_file) if config_file else {}
    source = str(config_file) if config_file else "command line"
    return build_merged(sections, overrides, source)


def build_merged(sections: dict, overrides: list[str], source: str) -> Config:
    """The file's sections with the overrides on top; a flag may complete or correct the file (--pad_to_buckets
    beside the file's cuda_graphs). When that fails, an error the file makes on its own is the one reported, naming
    the file."""
    try:
        return build_config(merge(sections, parse_overrides(overrides)), "command line" if overrides else source)
    except ConfigError:
        if overrides:
            build_config(sections, source)
        raise


def save_yaml(config: Config, path: str | Path, header: str = "") -> None:
    from budgetune.fileio import atomic_write_text

    text = header + yaml.safe_dump(config.to_dict(), sort_keys=False)
    atomic_write_text(path, text)


def help_text() -> str:
    """All options, grouped, with their docstrings and defaults."""
    lines = []
    for group, cls in GROUPS.items():
        lines.append(f"{group}:")
        docs = field_docs(cls)
        for f in dataclasses.fields(cls):
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
            lines.append(f"  --{f.name} (default: {default!r})")
            lines.append(textwrap.fill(docs.get(f.name, ""), 100, initial_indent="      ", subsequent_indent="      "))
    return "\n".join(lines)
