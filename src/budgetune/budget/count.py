"""Exact counts of trainable parameters: of a live model (count_trainable), and of a configuration on the meta device
with no weights (config_breakdown); the live check that the two agree and stay within the budget."""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import json
import re
from dataclasses import dataclass, field

import torch.nn.init

from budgetune.config import Config, ConfigError
from budgetune.errors import BudgetError, CountMismatchError
from budgetune.modeling import backbone, methods

# Peft's tensors of AdaLoRA: what pruning to target_r shrinks.
ADALORA_KINDS = ("lora_A", "lora_B", "lora_E")


@dataclass
class Breakdown:
    total_trainable: int
    by_kind: dict[str, int]
    by_module: dict[str, int]
    head: int
    all_params_once: int
    peft_trainable: int
    peft_all: int
    budget: int | None = None
    saved_after_pruning: int | None = None  # exact where every adapted module is as wide; else an estimate
    saved_range: tuple[int, int] | None = None  # then: the fewest and most that can be saved, as the ranks land
    head_copy: int = 0  # parameters of the second head copy peft keeps for modules_to_save (in peft_all only)
    ranknum: int = 0  # AdaLoRA's ranknum scalars (in peft_all; never trained)
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        """JSON-ready; `fits` is None when no budget is set."""
        d = dataclasses.asdict(self)
        d["fits"] = None if self.budget is None else self.total_trainable <= self.budget
        return d

    def table(self) -> str:
        """Human-readable; adapted modules are grouped across layers (layer.*.attention.self.query)."""
        rows = [("trainable parameters", self.total_trainable)]
        rows += [(f"  {kind}", n) for kind, n in self.by_kind.items()]
        groups: dict[str, list[int]] = {}
        for name, n in self.by_module.items():
            groups.setdefault(re.sub(r"\.\d+\.", ".*.", name), []).append(n)
        rows.append(("by module", None))
        rows += [(f"  {g}" + (f" (x{len(ns)})" if len(ns) > 1 else ""), sum(ns)) for g, ns in groups.items()]
        rows.append(("model parameters, counted once", self.all_params_once))
        rows.append(("peft: trainable params", self.peft_trainable))
        rows.append(("peft: all params", self.peft_all))
        if self.saved_after_pruning is not None and self.saved_range is None:
            rows.append(("saved after AdaLoRA pruning to target_r", self.saved_after_pruning))
        elif self.saved_after_pruning is not None:
            low, high = self.saved_range
            rows.append((f"saved after AdaLoRA pruning to target_r, about ({low:,} to {high:,} as the ranks land)",
                         self.saved_after_pruning))
        width = max(len(k) for k, _ in rows) + 2
        lines = [k if n is None else f"{k:<{width}}{n:>14,}" for k, n in rows]
        if self.budget is not None:
            verdict = "fits" if self.total_trainable <= self.budget else "OVER BUDGET"
            lines.append(f"budget {self.budget:,}: {verdict} ({self.budget - self.total_trainable:+,} to spare)")
        why = []
        if self.head_copy:
            why.append(f"the second copy of the head peft keeps for modules_to_save ({self.head_copy:,})")
        if self.ranknum:
            why.append(f"AdaLoRA's ranknum scalars ({self.ranknum:,}, never trained)")
        if why:
            lines.append("peft's all params = counted once + " + " + ".join(why))
        if self.peft_trainable != self.total_trainable:
            lines.append(f"peft's trainable differs by {self.peft_trainable - self.total_trainable:+,}: it counts "
                         "trainable ranknum scalars, which never change")
        if self.saved_after_pruning is not None:
            lines.append("the budget gate uses the trainable count at init_r; the saved count is a second figure")
        return "\n".join(lines + self.notes)


def _short(name: str, prefix: str | None) -> str:
    """Module path without the peft and encoder prefixes: 'layer.0.attention.self.query'."""
    name = name.removeprefix("base_model.model.")
    if prefix:
        name = name.removeprefix(f"{prefix}.")
    return re.sub(r"^(encoder|transformer)\.", "", name)


def count_trainable(peft_model, budget: int | None = None) -> Breakdown:
    """Count requires_grad parameters; the head's modules_to_save copy counts once, ranknum never."""
    pcfgs = getattr(peft_model, "peft_config", {}) or {}
    adapters = set(pcfgs) or {"default"}
    base = peft_model.get_base_model() if hasattr(peft_model, "get_base_model") else peft_model
    prefix = getattr(base, "base_model_prefix", None)
    by_kind: dict[str, int] = {}
    by_module: dict[str, int] = {}
    total_all = head_copy = ranknum = 0
    for name, p in peft_model.named_parameters():
        n = p.numel()
        if "ranknum" in name:
            ranknum += n
            continue
        if ".modules_to_save." in name:  # peft's trainable copy of a head part; the frozen original counts in all
            head_copy += n
        else:
            total_all += n
        if not p.requires_grad:
            continue
        parts = _short(name, prefix).split(".")
        idx = next((i for i, part in enumerate(parts) if i > 0 and part in adapters), None)
        if ".modules_to_save." in name or parts[0] in ("classifier", "score"):
            kind, module = "head", "head"
        elif idx is not None:
            kind, module = parts[idx - 1], ".".join(parts[: idx - 1])
        else:
            low = name.lower()
            kind = "bias" if parts[-1] == "bias" else "LayerNorm" if "layernorm" in low or "layer_norm" in low else "other"
            module = ".".join(parts[:-1])
        by_kind[kind] = by_kind.get(kind, 0) + n
        by_module[module] = by_module.get(module, 0) + n
    if hasattr(peft_model, "get_nb_trainable_parameters"):
        peft_trainable, peft_all = peft_model.get_nb_trainable_parameters()
    else:
        peft_trainable = sum(p.numel() for p in peft_model.parameters() if p.requires_grad)
        peft_all = sum(p.numel() for p in peft_model.parameters())
    total = sum(by_kind.values())
    saved, saved_range = None, None
    pcfg = next(iter(pcfgs.values()), None)
    if pcfg is not None and str(getattr(pcfg, "peft_type", "")).endswith("ADALORA"):
        ada = sum(by_kind.get(k, 0) for k in ADALORA_KINDS)
        # Each rank of a module costs in + out + 1 (a row of A, a column of B, one singular value).
        saved = total - ada + ada * pcfg.target_r // pcfg.init_r
        saved_range = pruned_range(peft_model, pcfg.init_r, pcfg.target_r, total - ada)
    head = by_kind.get("head", 0)
    by_kind = dict(sorted(by_kind.items(), key=lambda kv: (kv[0] == "head", kv[0])))
    return Breakdown(total, by_kind, by_module, head, total_all, int(peft_trainable), int(peft_all), budget, saved,
                     saved_range, head_copy, ranknum)


def pruned_range(peft_model, init_r: int, target_r: int, rest: int) -> tuple[int, int] | None:
    """AdaLoRA keeps target_r x modules ranks over all modules together, where they score best: the fewest and the
    most parameters that can be saved (None where every module is as wide, and the count is exact)."""
    costs = sorted(int(p.shape[1]) + int(b.shape[0]) + 1  # a row of A (in), a column of B (out), one value of E
                   for name, p in peft_model.named_parameters() if ".lora_A." in name
                   for b in [peft_model.get_parameter(name.replace(".lora_A.", ".lora_B."))])
    if len(set(costs)) <= 1:
        return None
    ranks = sorted(c for c in costs for _ in range(init_r))
    kept = target_r * len(costs)
    return rest + sum(ranks[:kept]), rest + sum(ranks[-kept:])


@contextlib.contextmanager
def _no_init():
    """Skip torch.nn.init while building meta models: random init is a third of the counting time and moot on meta."""
    # transformers (and peft) record torch.nn.init's functions when first imported: import them before the patch,
    # or every later model (a real head, non-persistent buffers) would keep the no-ops and start uninitialised.
    with contextlib.suppress(ImportError):
        import peft  # noqa: F401
        import transformers.initialization  # noqa: F401
        import transformers.modeling_utils  # noqa: F401
    names = [n for n in dir(torch.nn.init) if n.endswith("_") and not n.startswith("_")]
    saved = {n: getattr(torch.nn.init, n) for n in names}
    for n in names:
        setattr(torch.nn.init, n, lambda t, *a, **k: t)
    try:
        yield
    finally:
        for n, f in saved.items():
            setattr(torch.nn.init, n, f)


_META: dict[tuple, object] = {}
_COUNTS: dict[str, Breakdown] = {}


def meta_base(cfg: Config, num_labels: int, fresh: bool = True):
    """The cached meta model; fresh: a copy to wrap (copying is cheaper than rebuilding), else read it only."""
    key = (cfg.model.model_name_or_path, cfg.model.revision, num_labels)
    if key not in _META:
        with _no_init():
            _META[key] = backbone.meta_model(cfg, num_labels)
    return copy.deepcopy(_META[key]) if fresh else _META[key]


def _counting_schedule(cfg: Config) -> tuple[Config, int]:
    """A schedule with a pruning phase: every AdaLoRA schedule builds the same tensors, so the count (made before
    total_step is known) does not depend on it; the real schedule is checked when training starts."""
    if cfg.method.method != "adalora":
        return cfg, 1000
    return dataclasses.replace(cfg, method=dataclasses.replace(cfg.method, tinit=1, tfinal=1)), 1000


def config_breakdown(cfg: Config, num_labels: int) -> Breakdown:
    """Count from the config alone on the meta device; the rank must be an integer (resolve auto first)."""
    if not isinstance(cfg.method.rank, int):
        raise ConfigError("--rank auto: resolve it against the budget before counting (resolve_auto_rank)")
    key = json.dumps([dataclasses.asdict(cfg.model), dataclasses.asdict(cfg.method), num_labels], default=str)
    if key not in _COUNTS:
        with _no_init():
            counted, total = _counting_schedule(cfg)
            base = meta_base(cfg, num_labels)
            # head parts the checkpoint lacks are saved frozen in a live run (methods.wrap): counted the same way
            missing = backbone.checkpoint_missing(cfg.model.model_name_or_path, base)
            model = methods.wrap(counted, base, total, missing)
        _COUNTS[key] = count_trainable(model)
    return dataclasses.replace(_COUNTS[key], budget=cfg.budget.max_trainable_params)


def over_budget_message(bd: Breakdown, budget: int, suggestions: list[dict]) -> str:
    """The error over the budget: the breakdown, then the suggestions that fit (the planner's, or none)."""
    lines = [f"{bd.total_trainable:,} trainable parameters is over the budget of {budget:,} "
             f"(--max_trainable_params)", "", bd.table(), ""]
    if suggestions:
        lines.append("configurations that fit:")
        lines += [f"  {s['override']:<40} {s['trainable']:>12,} trainable" for s in suggestions]
    else:
        lines.append("nothing fits this budget: raise --max_trainable_params")
    return "\n".join(lines)



def check_live(peft_model, cfg: Config, expected: Breakdown) -> Breakdown:
    """Recount on the live model; raises if over budget or if it disagrees with the config-only count."""
    budget = cfg.budget.max_trainable_params
    live = count_trainable(peft_model, budget)
    if live.total_trainable != expected.total_trainable or live.by_kind != expected.by_kind:
        raise CountMismatchError(
            f"the live model has {live.total_trainable:,} trainable parameters but the config-only count said "
            f"{expected.total_trainable:,} (live by kind {live.by_kind}, expected {expected.by_kind})", live)
    if budget is not None and live.total_trainable > budget:
        raise BudgetError(over_budget_message(live, budget, []), live)
    return live

