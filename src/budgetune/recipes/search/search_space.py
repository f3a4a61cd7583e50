"""The search space of `budgetune search`: the YAML `search:` group, and the planner's fits turned into Optuna draws.

Every adapter shape (method x target modules x head) comes from `budget.plan`, with only the ranks that fit the budget,
so a sampled point fits by construction; `driver.py` still checks each point before training.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
from dataclasses import dataclass, field
from typing import Any

from budgetune.budget.plan import HEADS, plan
from budgetune.config import METHODS, Config
from budgetune.errors import BudgetError, ConfigError

# key -> (kind, default); kind "choice" takes a list or one value, "int"/"float" a range {low, high[, log]}, a list
# of values or one value.
KEYS: dict[str, tuple[str, Any]] = {
    "method": ("choice", None),  # None: every method the planner finds
    "target_modules": ("choice", None),
    "head": ("choice", None),
    "rank": ("int", None),  # None: powers of two up to the largest rank that fits, and that rank
    "learning_rate": ("float", {"low": 1e-4, "high": 3e-3, "log": True}),
    "alpha_ratio": ("float", [1.0, 2.0, 4.0]),  # lora_alpha = alpha_ratio x rank
    "lora_dropout": ("float", [0.0, 0.1]),
    "target_r_fraction": ("float", {"low": 0.25, "high": 0.75}),  # AdaLoRA: target_r = fraction x init_r
    "tinit_fraction": ("float", {"low": 0.0, "high": 0.3}),  # AdaLoRA: warmup steps / total steps
    "tfinal_fraction": ("float", {"low": 0.1, "high": 0.5}),  # AdaLoRA: final fixed-rank steps / total steps
}
HELP = """search: group of the YAML (every key optional; a list = choices, {low, high, log} = a range, a value = fixed):
  method, target_modules, head   choices among what the planner finds (default: every method, target set, head)
  rank                           ranks to try; only those that fit the budget are kept (default: 1, 2, 4, ... max)
  learning_rate                  default {low: 1e-4, high: 3e-3, log: true}
  alpha_ratio                    lora_alpha / rank; default [1, 2, 4]
  lora_dropout                   default [0.0, 0.1]
  target_r_fraction              AdaLoRA target_r / init_r; default {low: 0.25, high: 0.75}
  tinit_fraction, tfinal_fraction   AdaLoRA warmup / final phase as fractions of the trial's steps (the final
                                 phase is at least one step: the pruner judges AdaLoRA only on its final rank
                                 pattern's validations)"""


@dataclass
class Dim:
    """One dimension: choices (a list) or a range."""

    name: str
    choices: list | None = None
    low: float | None = None
    high: float | None = None
    log: bool = False
    integer: bool = False

    def suggest(self, trial, name: str | None = None):
        name = name or self.name
        if self.choices is not None:
            return self.choices[0] if len(self.choices) == 1 else trial.suggest_categorical(name, self.choices)
        if self.low == self.high:
            return self.low
        if self.integer:
            return trial.suggest_int(name, int(self.low), int(self.high), log=self.log)
        return trial.suggest_float(name, self.low, self.high, log=self.log)

    def contains(self, value: float) -> bool:
        if self.choices is not None:
            return value in self.choices
        return self.low <= value <= self.high


@dataclass
class Shape:
    """An adapter shape from the planner, with the ranks of it that fit (empty for IA3, which has no rank)."""

    method: str
    targets: Any
    head: str
    ranks: list[int]
    trainable_at_max: int

    @property
    def key(self) -> str:
        return f"{self.method}|{targets_text(self.targets)}|{self.head}"


@dataclass
class Space:
    shapes: list[Shape]
    dims: dict[str, Dim] = field(default_factory=dict)
    budget: int = 0


def targets_text(targets) -> str:
    if targets is None:
        return "null"
    names = targets.split(",") if isinstance(targets, str) else targets
    return ",".join(str(t).strip() for t in names)


def parse_dim(key: str, value: Any, kind: str) -> Dim:
    """One `search:` entry; errors name `search.KEY`."""
    where = f"search.{key}"
    if isinstance(value, dict):
        if kind == "choice":
            raise ConfigError(f"{where}: expected a list of choices or one value, got a range {value}")
        unknown = set(value) - {"low", "high", "log"}
        if unknown:
            raise ConfigError(f"{where}: unknown range key {sorted(unknown)[0]!r}; a range is {{low, high, log}}")
        if not value:
            raise ConfigError(f"{where}: empty range; give {{low: ..., high: ...}}")
        if "low" not in value or "high" not in value:
            raise ConfigError(f"{where}: a range needs both low and high, got {value}")
        low, high = (_number(value[k], f"{where}.{k}", kind == "int") for k in ("low", "high"))
        if low > high:
            raise ConfigError(f"{where}: lower bound {low} > upper bound {high}")
        log = value.get("log", False)
        if not isinstance(log, bool):
            raise ConfigError(f"{where}.log: expected true or false, got {log!r}")
        if log and low <= 0:
            raise ConfigError(f"{where}: a log range needs low > 0, got {low}")
        return Dim(key, low=low, high=high, log=log, integer=kind == "int")
    values = value if isinstance(value, list) else [value]
    if not values:
        raise ConfigError(f"{where}: empty list of choices")
    if kind != "choice":
        values = [_number(v, where, kind == "int") for v in values]
    elif key == "target_modules":
        values = [targets_text(v) if isinstance(v, (list, str)) else str(v) for v in values]
    if len(set(map(str, values))) != len(values):
        raise ConfigError(f"{where}: repeated choices in {values}")
    return Dim(key, choices=values, integer=kind == "int")


def _number(value: Any, where: str, integer: bool) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise ConfigError(f"{where}: expected a number, got {value!r}")
    try:
        number = float(value)
    except ValueError:
        raise ConfigError(f"{where}: expected a number, got {value!r}") from None
    if not math.isfinite(number):
        raise ConfigError(f"{where}: expected a finite number, got {value!r}")
    if integer:
        if not number.is_integer() or number < 1:
            raise ConfigError(f"{where}: expected a positive integer, got {value!r}")
        return int(number)
    return number


def parse_search_group(group: Any, source: str | None = None) -> dict[str, Dim]:
    """The YAML `search:` mapping -> validated dimensions (defaults for absent keys; method/targets/head/rank: None).

    Errors name `search.KEY`, after `source` (the YAML file) when given.
    """
    try:
        return _parse_group(group)
    except ConfigError as e:
        raise ConfigError(f"{source}: {e}" if source else str(e)) from None


def _parse_group(group: Any) -> dict[str, Dim]:
    if group is None:
        group = {}
    if not isinstance(group, dict):
        raise ConfigError("section 'search' must be a mapping of keys to values")
    dims: dict[str, Dim] = {}
    for key in group:
        if key not in KEYS:
            close = difflib.get_close_matches(str(key), KEYS, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ConfigError(f"unknown key {key!r} in section 'search'{hint}; keys are {', '.join(KEYS)}")
    for key, (kind, default) in KEYS.items():
        value = group.get(key, default)
        if value is not None:
            dims[key] = parse_dim(key, value, kind)
    bad = [m for m in (dims["method"].choices if "method" in dims else []) if m not in METHODS]
    if bad:
        raise ConfigError(f"search.method: unknown method {bad[0]!r}; choose among {', '.join(METHODS)}")
    bad_heads = [h for h in (dims["head"].choices if "head" in dims else []) if h not in HEADS]
    if bad_heads:
        raise ConfigError(f"search.head: unknown head {bad_heads[0]!r}; choose among {', '.join(HEADS)}")
    for key in ("learning_rate", "alpha_ratio"):
        d = dims[key]
        values = d.choices if d.choices is not None else [d.low, d.high]
        if any(v <= 0 for v in values):
            raise ConfigError(f"search.{key}: values must be above 0, got {values}")
    for key in ("lora_dropout", "target_r_fraction", "tinit_fraction", "tfinal_fraction"):
        d = dims[key]
        values = d.choices if d.choices is not None else [d.low, d.high]
        top = 1.0 if key == "target_r_fraction" else 0.95
        if any(not 0 <= v <= top for v in values) or (key == "target_r_fraction" and 0 in values):
            raise ConfigError(f"search.{key}: values must be in {'(0, 1]' if top == 1 else '[0, 0.95]'}, got {values}")
    return dims


def default_ranks(largest: int) -> list[int]:
    """1, 2, 4, ... below the largest rank that fits, and that rank."""
    out, r = [], 1
    while r < largest:
        out.append(r)
        r *= 2
    return out + [largest]


def build_space(cfg: Config, num_labels: int, dims: dict[str, Dim], budget_cap: int) -> Space:
    """The planner's shapes narrowed by the `search:` choices, each with its ranks that fit; refuses an empty space."""
    base = dataclasses.replace(cfg, budget=dataclasses.replace(cfg.budget, max_trainable_params=budget_cap))
    rows = plan(base, num_labels, budget_cap)
    wanted = {k: dims[k] for k in ("method", "target_modules", "head") if k in dims}
    rank_dim = dims.get("rank")
    shapes = []
    for row in rows:
        values = {"method": row["method"], "target_modules": targets_text(row["targets"]), "head": row["head"]}
        if any(not d.contains(values[k]) for k, d in wanted.items()):
            continue
        if row["rank"] is None:  # IA3
            shapes.append(Shape(row["method"], row["targets"], row["head"], [], row["trainable"]))
            continue
        largest = row["rank"]
        if rank_dim is None:
            ranks = default_ranks(largest)
        elif rank_dim.choices is not None:
            ranks = [r for r in rank_dim.choices if r <= largest]
        else:
            ranks = list(range(int(rank_dim.low), min(int(rank_dim.high), largest) + 1))
        if row["method"] == "adalora":  # it needs target_r < init_r: at init_r 1 peft's allocator fails (kthvalue)
            ranks = [r for r in ranks if r >= 2]
        if ranks:
            shapes.append(Shape(row["method"], row["targets"], row["head"], ranks, row["trainable"]))
    if not shapes:
        asked = ", ".join(f"{k}={d.choices or [d.low, d.high]}" for k, d in {**wanted, **(
            {"rank": rank_dim} if rank_dim else {})}.items()) or "the default space"
        raise BudgetError(f"nothing in the search space ({asked}) fits the budget of {budget_cap:,} trainable "
                          f"parameters (--budget); `budgetune plan --budget {budget_cap}` lists what fits")
    return Space(shapes, dims, budget_cap)


def sample(trial, space: Space, cfg: Config, total_steps: int) -> Config:
    """Draw one point and return the trial's complete Config (rank and schedule in the adapter's own terms)."""
    by_key = {s.key: s for s in space.shapes}
    shape = by_key[trial.suggest_categorical("shape", list(by_key))] if len(by_key) > 1 else space.shapes[0]
    m: dict[str, Any] = {"method": shape.method, "target_modules": shape.targets,
                         "method_options": cfg.method.method_options if shape.method == cfg.method.method else {}}
    d = space.dims
    rank = 1
    if shape.ranks:  # a parameter per shape: each keeps a fixed distribution, as Optuna's samplers want
        rank = shape.ranks[0] if len(shape.ranks) == 1 else trial.suggest_categorical(f"rank|{shape.key}", shape.ranks)
        m["lora_alpha"] = float(d["alpha_ratio"].suggest(trial)) * rank
        if shape.method in ("lora", "dora", "adalora", "vera"):
            m["lora_dropout"] = float(d["lora_dropout"].suggest(trial))
    m["rank"] = rank
    m["target_r"] = None
    if shape.method == "adalora":
        m["target_r"] = min(rank - 1, max(1, round(rank * float(d["target_r_fraction"].suggest(trial)))))
        tinit = float(d["tinit_fraction"].suggest(trial))
        tfinal = min(float(d["tfinal_fraction"].suggest(trial)), 0.95 - tinit)  # leave steps to re-allocate
        # at least one final step: the last validation then has the final rank pattern, which the pruner sees
        m["tfinal"] = max(1, int(tfinal * total_steps))
        m["tinit"] = max(0, min(int(tinit * total_steps), total_steps - m["tfinal"] - 1))
        m["deltaT"] = max(1, min(cfg.method.deltaT, total_steps // 20))
    lr = float(d["learning_rate"].suggest(trial))
    return dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, head=shape.head),
                               method=dataclasses.replace(cfg.method, **m),
                               train=dataclasses.replace(cfg.train, learning_rate=lr))


def base_point(space: Space, cfg: Config) -> dict | None:
    """The base config's own adapter as Optuna params, when the space holds it (the search then starts from it)."""
    m = cfg.method
    shape = next((s for s in space.shapes if s.key == f"{m.method}|{targets_text(m.target_modules)}|{cfg.model.head}"),
                 None)
    if shape is None or (shape.ranks and m.rank not in shape.ranks):
        return None
    d = space.dims
    point: dict[str, Any] = {"learning_rate": cfg.train.learning_rate}
    if len(space.shapes) > 1:
        point["shape"] = shape.key
    if shape.ranks:
        if len(shape.ranks) > 1:
            point[f"rank|{shape.key}"] = m.rank
        point["alpha_ratio"] = m.lora_alpha / m.rank
        if shape.method in ("lora", "dora", "adalora", "vera"):
            point["lora_dropout"] = m.lora_dropout
    if shape.method == "adalora":
        return None  # its schedule is in steps, the space's in fractions: let the sampler draw it
    for name, value in point.items():
        dim = d.get(name)
        if dim is not None and not dim.contains(value):
            return None
    return point
