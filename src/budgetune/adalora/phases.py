"""AdaLoRA's schedule: warm-up, pruning and the final phase, resolved against the computed total step, and the
checks that a schedule can prune."""

from __future__ import annotations

from dataclasses import dataclass

from budgetune.config import MethodConfig
from budgetune.errors import ConfigError


@dataclass(frozen=True)
class Schedule:
    """Optimizer steps (0-based, as update_and_allocate counts them) of AdaLoRA's three phases."""

    total_step: int
    tinit: int
    tfinal: int
    deltaT: int

    @property
    def final_from(self) -> int:
        """The step at which peft fixes the rank pattern (update_and_allocate's `total_step - tfinal`)."""
        return self.total_step - self.tfinal

    def is_final(self, steps_done: int) -> bool:
        """After `steps_done` optimizer steps, is the rank pattern the final one?"""
        return steps_done > self.final_from

    @property
    def reaches_final(self) -> bool:
        """Whether the run's last step has the final rank pattern (not with --tfinal 0)."""
        return self.is_final(self.total_step)

    def may_be_best(self, steps_done: int) -> bool:
        """Whether a validation after `steps_done` steps may give the shipped adapter: one with the final rank
        pattern; in a run that never reaches it, only the last validation (the fewest ranks there are)."""
        return self.is_final(steps_done) or (not self.reaches_final and steps_done >= self.total_step)

    def describe(self) -> str:
        head = (f"AdaLoRA schedule over {self.total_step} optimizer steps: warm-up steps 1-{self.tinit + 1} (all "
                f"ranks), pruning steps {self.tinit + 2}-{min(self.final_from + 1, self.total_step)} (every "
                f"{self.deltaT}), ")
        if self.tfinal == 0:
            return head + ("no final phase (--tfinal 0: the rank pattern is never fixed, early stopping never counts, "
                           "the last validation's adapter is shipped)")
        if self.final_from + 2 > self.total_step:  # --tfinal 1: the last step's allocation fixes the pattern
            return (head + f"rank pattern fixed by step {self.total_step}'s allocation, no step trains under it; the "
                    "best adapter and early stopping count only validations from then on")
        return (head + f"final steps {self.final_from + 2}-{self.total_step} (rank pattern fixed); the best adapter "
                "and early stopping count only validations in the final phase")


def steps_of(value: int | float, total_step: int) -> int:
    """A step count, or a fraction (0 < value < 1) of total_step."""
    return int(round(value * total_step)) if isinstance(value, float) and value < 1 else int(value)


def check_ranks(m: MethodConfig) -> None:
    """Training needs something to prune: peft's allocator fails (kthvalue out of range) when target_r >= init_r.
    (Counting parameters does not: the planner may list rank 1.)"""
    if m.resolved_target_r() >= m.rank:
        raise ConfigError(f"AdaLoRA needs --target_r below --rank (init_r) to re-allocate anything: --rank {m.rank}, "
                          f"--target_r {m.resolved_target_r()}; use --rank 2 or more")


def schedule(m: MethodConfig, total_step: int) -> Schedule:
    """Resolve tinit/tfinal (counts or fractions) against the computed total_step; refuse schedules with no pruning."""
    tinit, tfinal = steps_of(m.tinit, total_step), steps_of(m.tfinal, total_step)
    if tinit + tfinal >= total_step:
        raise ConfigError(
            f"AdaLoRA's schedule leaves no pruning phase: --tinit {m.tinit} ({tinit} steps) + --tfinal {m.tfinal} "
            f"({tfinal} steps) >= {total_step} total optimizer steps; lower --tinit/--tfinal (fractions such as "
            "--tinit 0.1 --tfinal 0.3 scale with the run) or train longer")
    return Schedule(total_step, tinit, tfinal, m.deltaT)


