"""A lean AdaLoRA step: peft's modules, allocator state and saved format, with far fewer operators per step.

peft's AdaLoraModel computes the orthogonal regulariser with a Python loop over every lora_A/lora_B matrix
(~5 operators each, forward and backward), updates the allocator's averages tensor by tensor (~8 operators each)
and, on masking steps, reads the threshold and every mask back to the host (`.item()`, `.tolist()`); in the final
phase it rebuilds every mask from Python lists on every step. On a GPU each operator costs a launch, each read a
sync. Here:

* the regulariser stacks same-shaped matrices and computes all their covariances with one `bmm` per shape;
* the sensitivity/uncertainty averages are updated with `torch._foreach_*` over all tensors at once;
* the budget mask stays on the device (`kthvalue`, a comparison, one `_foreach_mul_`); the rank pattern is read
  back only when something reads `peft_config.rank_pattern` (logging, saving, validation);
* the final phase's masks are built once and re-applied with one `_foreach_mul_` per step.

`install(peft_model)` switches a peft AdaLoRA model over in place by changing the classes of its AdaLoraModel,
RankAllocator and AdaLoraConfig to the subclasses below; parameters, names, state dicts, the saved adapter and its
config are peft's own (plain peft reloads them). Numerically the step matches peft's in fp32 up to float rounding
(tests/test_lean_adalora.py: same rank pattern at every step, loss and weights within 1e-6 over hundreds of steps).
Two knowing differences: a pruned singular value becomes -0.0 instead of 0.0 when it was negative (x * 0), and a
NaN one stays NaN (peft's masked_fill would zero it; a NaN there means the run has diverged anyway).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from peft import AdaLoraConfig
from peft.tuners.adalora import AdaLoraModel, RankAllocator

from budgetune.adalora import rank_masks

ADAPTER = "default"


# ---------------------------------------------------------------- the config: a rank pattern read back lazily


class LeanAdaLoraConfig(AdaLoraConfig):
    """AdaLoraConfig whose rank_pattern may be held on the device until read.

    `rank_pattern` is a dataclass field of AdaLoraConfig; a property of the same name on this subclass takes over
    reads and writes (asdict, hence the saved adapter_config.json, reads it through getattr). Every assignment
    from outside (peft renaming keys at save, a checkpoint restored) bumps `pattern_version`, so the allocator
    knows its device masks no longer describe the pattern.
    """

    @property
    def rank_pattern(self) -> dict | None:
        pending = self.__dict__.pop("pending_pattern", None)
        if pending is not None:  # the one host read of a mask: only when someone asks for the pattern
            self.__dict__["rank_pattern"] = pending.to_host()
        return self.__dict__.get("rank_pattern")

    @rank_pattern.setter
    def rank_pattern(self, value: dict | None) -> None:
        self.__dict__.pop("pending_pattern", None)
        self.__dict__["rank_pattern"] = value
        self.__dict__["pattern_version"] = self.__dict__.get("pattern_version", 0) + 1

    def hold(self, pending: PendingPattern) -> None:
        """Set the pattern from a device mask without reading it (no version bump: the allocator made it)."""
        self.__dict__["pending_pattern"] = pending

    @property
    def pattern_version(self) -> int:
        return self.__dict__.get("pattern_version", 0)


@dataclass(frozen=True)
class PendingPattern:
    """A keep mask on the device (modules in layout order, concatenated) and how to split it into peft's dict."""

    keep: torch.Tensor
    names: tuple[str, ...]
    ranks: tuple[int, ...]
    order: tuple[str, ...]  # peft's dict lists the modules in named_parameters order

    def to_host(self) -> dict[str, list[bool]]:
        flat = self.keep.tolist()
        out, start = {}, 0
        for name, r in zip(self.names, self.ranks):
            out[name] = flat[start:start + r]
            start += r
        return {name: out[name] for name in self.order}


# ---------------------------------------------------------------- the adapted modules, grouped by shape


@dataclass
class Triplet:
    """One adapted matrix's triplet (peft's parameter names, relative to the inner model)."""

    e_name: str
    a_name: str
    b_name: str
    A: torch.nn.Parameter
    E: torch.nn.Parameter
    B: torch.nn.Parameter


@dataclass
class Layout:
    """The triplets in named_parameters order, their lora_* tensors for the allocator, and shape groups."""

    modules: list[Triplet]
    groups: list[list[int]]  # indices into modules with the same (A.shape, B.shape): stacked together

    @property
    def order(self) -> list[int]:
        """Module indices in the order their scores are concatenated (group by group)."""
        return [i for g in self.groups for i in g]


def layout(model: torch.nn.Module, adapter: str = ADAPTER) -> Layout:
    params = {n: p for n, p in model.named_parameters() if f".lora_E.{adapter}" in n or
              f".lora_A.{adapter}" in n or f".lora_B.{adapter}" in n}
    modules = []
    for name, p in params.items():
        if f".lora_E.{adapter}" in name:
            a, b = name.replace("lora_E", "lora_A"), name.replace("lora_E", "lora_B")
            modules.append(Triplet(name, a, b, params[a], p, params[b]))
    groups: dict[tuple, list[int]] = {}
    for i, m in enumerate(modules):
        groups.setdefault((tuple(m.A.shape), tuple(m.B.shape)), []).append(i)
    return Layout(modules, list(groups.values()))


# ---------------------------------------------------------------- the orthogonal regulariser


def orth_regulariser(lay: Layout, eyes: dict) -> torch.Tensor:
    """Mean over all lora_A and lora_B of ||A A^T - I||_F and ||B^T B - I||_F, one bmm per group of shapes.

    peft's AdaLoraModel.forward computes the same mean with one matmul, eye, subtraction and norm per matrix.
    """
    norms = []
    for group in lay.groups:
        A = torch.stack([lay.modules[i].A for i in group])  # (G, r, in)
        B = torch.stack([lay.modules[i].B for i in group])  # (G, out, r)
        covs = (torch.bmm(A, A.transpose(1, 2)), torch.bmm(B.transpose(1, 2), B))
        for cov in covs:
            key = (cov.shape[-1], cov.dtype, cov.device)
            if key not in eyes:  # built once per size: peft builds one per matrix per forward
                eyes[key] = torch.eye(cov.shape[-1], dtype=cov.dtype, device=cov.device)
            norms.append(torch.linalg.vector_norm(cov - eyes[key], dim=(1, 2)))
    return torch.cat(norms).sum() / (2 * len(lay.modules))


# ---------------------------------------------------------------- the allocator


class LeanRankAllocator(RankAllocator):
    """peft's RankAllocator (same ipt/exp_avg_ipt/exp_avg_unc dicts, same budget schedule), batched."""

    def update_lean(self, lay: Layout) -> None:
        """Sensitivity (|p * grad|) and its two moving averages for every lora_* tensor, with _foreach ops.

        The same operations in the same order as peft's update_ipt, so the values agree to the bit.
        """
        params = [p for m in lay.modules for p in (m.A, m.E, m.B)]
        names = [n for m in lay.modules for n in (m.a_name, m.e_name, m.b_name)]
        for n, p in zip(names, params):
            if n not in self.ipt:  # the first step, or after reset_ipt / a restore without state
                self.ipt[n], self.exp_avg_ipt[n], self.exp_avg_unc[n] = (torch.zeros_like(p) for _ in range(3))
        avg_ipt = [self.exp_avg_ipt[n] for n in names]
        avg_unc = [self.exp_avg_unc[n] for n in names]
        with torch.no_grad():
            ipt = torch._foreach_mul(params, [p.grad for p in params])
            torch._foreach_abs_(ipt)
            torch._foreach_mul_(avg_ipt, self.beta1)
            torch._foreach_add_(avg_ipt, torch._foreach_mul(ipt, 1 - self.beta1))
            spread = torch._foreach_sub(ipt, avg_ipt)
            torch._foreach_abs_(spread)
            torch._foreach_mul_(spread, 1 - self.beta2)
            torch._foreach_mul_(avg_unc, self.beta2)
            torch._foreach_add_(avg_unc, spread)
        self.ipt.update(zip(names, ipt))

    def keep_mask(self, lay: Layout, budget: int) -> torch.Tensor:
        """Which singular values stay (bool, modules in lay.order), the lowest init_bgt - budget triplets out.

        A triplet's score is peft's: mean score of its lora_A row + mean of its lora_B column + its lora_E entry.
        """
        with torch.no_grad():
            flat = []
            for group in lay.groups:
                ms = [lay.modules[i] for i in group]
                score = torch._foreach_mul([self.exp_avg_ipt[n] for m in ms for n in (m.a_name, m.e_name, m.b_name)],
                                           [self.exp_avg_unc[n] for m in ms for n in (m.a_name, m.e_name, m.b_name)])
                a, e, b = (torch.stack(score[k::3]) for k in range(3))  # (G, r, in), (G, r, 1), (G, out, r)
                flat.append((e.squeeze(2) + (a.mean(dim=2) + b.mean(dim=1))).view(-1))
            scores = torch.cat(flat)
            threshold = torch.kthvalue(scores, k=self.init_bgt - budget).values
            return torch.logical_not(scores <= threshold)  # peft's `~(ipt <= threshold)`, kept on the device

    def apply(self, lay: Layout, masks: list[torch.Tensor]) -> None:
        """Zero the pruned singular values: one multiply over all lora_E (masks in lay.order)."""
        with torch.no_grad():
            torch._foreach_mul_([lay.modules[i].E for i in lay.order], masks)

    def masks_of(self, lay: Layout, keep: torch.Tensor, dtype: torch.dtype) -> list[torch.Tensor]:
        """Per-module (r, 1) masks, in lay.order, as views of one tensor."""
        ranks = [lay.modules[i].E.shape[0] for i in lay.order]
        return list(keep.to(dtype).unsqueeze(1).split(ranks))

    def masks_from_pattern(self, lay: Layout, pattern: dict, dtype: torch.dtype) -> list[torch.Tensor]:
        """Masks from a host pattern (a restored checkpoint, or peft renamed the keys when saving): built once."""
        rows = []
        for i in lay.order:
            name = lay.modules[i].e_name
            rows += pattern[rank_masks.pattern_key(pattern, name, self.adapter_name)]
        device = lay.modules[0].E.device
        return self.masks_of(lay, torch.tensor(rows, dtype=torch.bool).to(device, non_blocking=True), dtype)


# ---------------------------------------------------------------- the model


class LeanAdaLoraModel(AdaLoraModel):
    """AdaLoraModel with the batched regulariser and allocator; everything else (and the saved format) is peft's."""

    def lean_layout(self) -> Layout:
        # Parameters are created once, before training; peft replaces them only when it resizes on loading.
        if getattr(self, "_lean_layout", None) is None:
            self._lean_layout = layout(self.model, self.trainable_adapter_name)
            self._lean_eyes = {}
            self._lean_final = None
        return self._lean_layout

    def forward(self, *args, **kwargs):
        outputs = self.model.forward(*args, **kwargs)
        loss = getattr(outputs, "loss", None)
        if isinstance(loss, torch.Tensor):
            penalty = self.orth_penalty()
            if penalty is not None:
                outputs.loss = loss + penalty
        return outputs

    def orth_penalty(self) -> torch.Tensor | None:
        """orth_reg_weight x the regulariser (None without adapted modules): what forward adds to a loss."""
        weight = self.peft_config[self.trainable_adapter_name].orth_reg_weight
        if weight < 0:
            raise ValueError("orth_reg_weight should be greater than or equal to 0. ")
        lay = self.lean_layout()
        return weight * orth_regulariser(lay, self._lean_eyes) if lay.modules else None

    def update_and_allocate(self, global_step: int) -> None:
        """peft's three phases: averages (+ a mask every deltaT), the fixing step, then the fixed pattern."""
        config = self.peft_config[self.trainable_adapter_name]
        alloc, lay = self.rankallocator, self.lean_layout()
        fix_at = config.total_step - config.tfinal
        if global_step < fix_at:
            alloc.update_lean(lay)
            budget, mask_now = alloc.budget_schedule(global_step)
            if mask_now:
                self.mask(config, lay, budget)
        elif global_step == fix_at:
            budget, _ = alloc.budget_schedule(global_step)
            self._lean_final = (config.pattern_version, self.mask(config, lay, budget))
            alloc.reset_ipt()
        else:
            alloc.apply(lay, self.final_masks(config, lay))

    def mask(self, config: LeanAdaLoraConfig, lay: Layout, budget: int) -> list[torch.Tensor]:
        keep = self.rankallocator.keep_mask(lay, budget)
        masks = self.rankallocator.masks_of(lay, keep, lay.modules[0].E.dtype)
        self.rankallocator.apply(lay, masks)
        ms = [lay.modules[i] for i in lay.order]
        config.hold(PendingPattern(keep, tuple(m.e_name for m in ms), tuple(m.E.shape[0] for m in ms),
                                   tuple(m.e_name for m in lay.modules)))
        return masks

    def final_masks(self, config: LeanAdaLoraConfig, lay: Layout) -> list[torch.Tensor]:
        """The fixed pattern's masks, rebuilt from the host pattern only when it was set from outside."""
        if self._lean_final is None or self._lean_final[0] != config.pattern_version:
            masks = self.rankallocator.masks_from_pattern(lay, config.rank_pattern, lay.modules[0].E.dtype)
            self._lean_final = (config.pattern_version, masks)
        return self._lean_final[1]


def orth_penalty(model: torch.nn.Module) -> torch.Tensor | None:
    """The term AdaLoRA's forward adds to a loss it computes (orth_reg_weight x the orthogonal regulariser), for a
    loss computed outside the model (distillation); None for any other model. `model` may be wrapped (DDP,
    torch.compile); a peft AdaLoRA model that is not lean gets the same mean from `orth_regulariser`."""
    from accelerate.utils import extract_model_from_parallel

    tuner = getattr(extract_model_from_parallel(model, keep_torch_compile=False), "base_model", None)
    if isinstance(tuner, LeanAdaLoraModel):
        return tuner.orth_penalty()
    if not isinstance(tuner, AdaLoraModel):
        return None
    weight = tuner.peft_config[tuner.trainable_adapter_name].orth_reg_weight
    lay = layout(tuner.model, tuner.trainable_adapter_name)
    return weight * orth_regulariser(lay, {}) if lay.modules else None


def install(peft_model) -> bool:
    """Switch a peft AdaLoRA model to the lean step in place; False (and nothing changed) for other methods."""
    tuner = getattr(peft_model, "base_model", None)
    if not isinstance(tuner, AdaLoraModel):
        return False
    config = tuner.peft_config[tuner.trainable_adapter_name]
    pattern = config.rank_pattern
    tuner.__class__ = LeanAdaLoraModel
    tuner.rankallocator.__class__ = LeanRankAllocator
    config.__class__ = LeanAdaLoraConfig
    config.rank_pattern = pattern  # into the property's storage
    return True
