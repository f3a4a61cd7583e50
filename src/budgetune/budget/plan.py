"""The plan of what fits a budget: the largest fitting rank of each method, target set and head (plan), rank auto
(resolve_auto_rank), the gate before training with its suggestions (check_budget), and the `params` and `plan` commands.
Counts come from budget.count."""

from __future__ import annotations

import contextlib
import dataclasses

from budgetune.budget.count import Breakdown, config_breakdown, meta_base, over_budget_message
from budgetune.config import Config, ConfigError
from budgetune.errors import BudgetError
from budgetune.modeling import classifier_heads, methods

HEADS = ("default", "linear", "frozen_dense")
RANK_METHODS = ("adalora", "lora", "dora", "vera", "loha", "lokr")
# LoKr's cost is not linear in rank (w2 turns full once r >= half its larger side), so its search is bisection
# over ranks up to this cap; every other method's cost is affine in rank and is extrapolated from two counts.
NONLINEAR_RANK_CAP = 64


def _with(cfg: Config, method: str | None = None, rank: int | None = None, targets=..., head: str | None = None):
    """A copy of cfg with some method/head fields changed (options of another method are dropped)."""
    m = cfg.method
    changes: dict = {}
    if method is not None and method != m.method:
        changes.update(method=method, method_options={}, target_r=m.target_r if method == "adalora" else None)
    if rank is not None:
        changes["rank"] = rank
    if targets is not ...:
        changes["target_modules"] = targets
    new = dataclasses.replace(cfg, method=dataclasses.replace(m, **changes))
    return dataclasses.replace(new, model=dataclasses.replace(cfg.model, head=head)) if head else new


def _rank_cap(cfg: Config, num_labels: int) -> int:
    # A rank above the hidden size adds no expressiveness to a low-rank update of these layers.
    hidden = int(getattr(meta_base(cfg, num_labels, False).config, "hidden_size", 1024))
    return NONLINEAR_RANK_CAP if cfg.method.method == "lokr" else hidden


def _lowest(cfg: Config) -> int:
    """The lowest rank worth counting: AdaLoRA trains only above its target_r (phases.check_ranks: at least 2);
    target_r means nothing to the other methods."""
    if cfg.method.method != "adalora":
        return 1
    return cfg.method.target_r + 1 if cfg.method.target_r is not None else 2


def _largest_rank(cfg: Config, num_labels: int, budget: int) -> tuple[int, Breakdown] | None:
    """The largest rank of cfg's method that fits; None if the lowest rank does not."""
    lo, head = _lowest(cfg), cfg.model.head
    cap = max(lo, _rank_cap(cfg, num_labels))

    def count(r: int, h: str = "default") -> int:
        # Extrapolation uses the default head for every head choice, so plan() shares these counts across heads.
        return config_breakdown(_with(cfg, rank=r, head=h), num_labels).total_trainable

    offset = count(lo, head) - count(lo)  # what this head costs beyond the default head
    if count(lo) + offset > budget:
        return None
    if lo < cap and (slope := count(lo + 1) - count(lo)) > 0:
        r = min(cap, lo + (budget - count(lo) - offset) // slope)
        if count(r, head) == count(lo) + offset + slope * (r - lo):  # affine: r is the largest that fits
            return r, config_breakdown(_with(cfg, rank=r, head=head), num_labels)
    # Not affine (LoKr): bisection, assuming more rank never costs less, verified below by a real count.
    for cost in (lambda r: count(r) + offset, lambda r: count(r, head)):
        good, bad = lo, cap + 1
        while bad - good > 1:
            mid = (good + bad) // 2
            good, bad = (mid, bad) if cost(mid) <= budget else (good, mid)
        low, high = lo, good  # higher ranks that cost the same (saturated) are pointless: take the smallest
        if good > lo and cost(good - 1) < cost(good):
            low = high = good
        while low < high:
            mid = (low + high) // 2
            low, high = (low, mid) if cost(mid) == cost(good) else (mid + 1, high)
        if count(low, head) <= budget:
            return low, config_breakdown(_with(cfg, rank=low, head=head), num_labels)
    return None


def resolve_auto_rank(cfg: Config, num_labels: int) -> tuple[Config, str]:
    """Replace rank auto by the largest rank within the budget; a rank already set comes back unchanged with ''."""
    if cfg.method.rank != "auto":
        return cfg, ""
    budget = cfg.budget.max_trainable_params
    if budget is None:
        raise ConfigError("--rank auto needs a budget: set --max_trainable_params")
    if cfg.method.method == "ia3":
        new = _with(cfg, rank=1)  # IA3 has no rank; any integer builds the same model
        bd = config_breakdown(new, num_labels)
        return new, f"rank auto: rank does not apply to ia3 ({bd.total_trainable:,} trainable)"
    found = _largest_rank(_with(cfg, rank=_lowest(cfg)), num_labels, budget)
    if found is None:
        lowest = config_breakdown(_with(cfg, rank=_lowest(cfg)), num_labels)
        raise BudgetError(f"--rank auto: even the lowest rank needs {lowest.total_trainable:,} trainable "
                          f"parameters > budget {budget:,}\n{lowest.table()}", lowest, _suggest(cfg, num_labels, budget))
    rank, bd = found
    return _with(cfg, rank=rank), f"rank auto: picked {rank} ({bd.total_trainable:,} trainable <= {budget:,})"


def _target_sets(cfg: Config) -> list:
    """Configured targets, query+value, query+key+value and all-linear (the seed's names, which every architecture
    maps to its own: methods.native_names), deduplicated."""
    qv = methods.DEFAULT_TARGETS
    out: list = []
    for t in (cfg.method.target_modules or qv, qv, ["query", "key", "value"], "all-linear"):
        if t not in out:
            out.append(t)
    return out


def _heads(cfg: Config, num_labels: int) -> list[str]:
    """Head choices that differ on this model (linear only replaces a dense+out_proj head)."""
    model = meta_base(cfg, num_labels, False)
    heads = ["default"]
    if hasattr(getattr(model, "classifier", None), "out_proj"):
        heads.append("linear")
    with contextlib.suppress(ConfigError):
        classifier_heads.head_modules(model, "frozen_dense")
        heads.append("frozen_dense")
    return heads


def _override(method: str, rank: int | None, targets, head: str, options: bool) -> str:
    t = "null" if targets is None else targets if isinstance(targets, str) else ",".join(targets)
    rank_part = f" --rank {rank}" if rank is not None else ""
    return f"--method {method}{rank_part} --target_modules {t} --head {head}" + (" --method_options {}" * options)


def plan(cfg: Config, num_labels: int, budget: int) -> list[dict]:
    """Every method x target set x head at its largest fitting rank, most trainable first; rows over budget are left out."""
    rows = []
    heads = _heads(cfg, num_labels)
    for method in RANK_METHODS + ("ia3",):
        for targets in _target_sets(cfg) if method != "ia3" else [None]:
            for head in heads:
                try:
                    c = _with(cfg, method=method, targets=targets, head=head)
                    c = _with(c, rank=_lowest(c))
                    if method == "ia3":
                        bd = config_breakdown(c, num_labels)
                        found = (None, bd) if bd.total_trainable <= budget else None
                    else:
                        found = _largest_rank(c, num_labels, budget)
                except (ConfigError, ValueError):
                    continue  # e.g. target names this model lacks (peft raises ValueError)
                if found is None:
                    continue
                rank, bd = found
                options = bool(cfg.method.method_options) and method != cfg.method.method
                rows.append({"method": method, "rank": rank, "targets": targets, "head": head,
                             "trainable": bd.total_trainable, "override": _override(method, rank, targets, head, options)})
    return sorted(rows, key=lambda r: -r["trainable"])


def _suggest(cfg: Config, num_labels: int, budget: int, n: int = 5) -> list[dict]:
    """Nearest fits: a lower rank, another head, then other methods, each with the fewest flags that select it."""
    heads = [cfg.model.head] + [h for h in _heads(cfg, num_labels) if h != cfg.model.head]
    methods_ = [cfg.method.method] + [m for m in RANK_METHODS + ("ia3",) if m != cfg.method.method]
    out = []
    for method in methods_:
        for head in heads:
            try:
                c = _with(cfg, method=method, head=head)
                c = _with(c, rank=_lowest(c))
                found = _largest_rank(c, num_labels, budget) if method != "ia3" else (None, config_breakdown(c, num_labels))
            except (ConfigError, ValueError):
                continue
            if found is None or found[1].total_trainable > budget:
                continue
            rank, bd = found
            flags = [f"--method {method}"] * (method != cfg.method.method) + [f"--rank {rank}"] * (rank is not None)
            # another method would be handed this one's options (plan() clears them too)
            flags += ["--method_options {}"] * (method != cfg.method.method and bool(cfg.method.method_options))
            flags += [f"--head {head}"] * (head != cfg.model.head)
            out.append({"method": method, "rank": rank, "head": head, "trainable": bd.total_trainable,
                        "override": " ".join(flags)})
            if len(out) >= n:
                return out
    return out



def check_budget(cfg: Config, num_labels: int) -> Breakdown:
    """The gate before any weight is loaded; raises BudgetError when over (no budget set: never raises)."""
    bd = config_breakdown(cfg, num_labels)
    budget = cfg.budget.max_trainable_params
    if budget is not None and bd.total_trainable > budget:
        suggestions = _suggest(cfg, num_labels, budget)
        message = over_budget_message(bd, budget, suggestions)
        if cfg.method.method == "full":  # a teacher for `budgetune distill` is meant to be unbudgeted
            message += "\n--method full trains every weight: for an unbudgeted teacher pass --max_trainable_params null"
        raise BudgetError(message, bd, suggestions)
    return bd


