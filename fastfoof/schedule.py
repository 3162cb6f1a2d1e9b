"""When the optimizers observe, fold and invert (DESIGN §1.5)."""
from __future__ import annotations


class Schedule:
    """t counts `step()` calls from 1 (steps GradScaler skips included). The forwards before step t are
    observed iff t mod T ∈ {T−S+1, …, T−1, 0}, and always for a layer that has no preconditioner yet or
    inside `warm_up()`; every step folds what was observed into the running averages; the preconditioners
    are recomputed at the steps with t mod T = 0, and a layer's first one right after its first non-empty
    fold (the optimizer decides that one: it knows which layers have one)."""

    def __init__(self, inv_period: int, stats_steps: int):
        self.inv_period = inv_period  # T
        self.stats_steps = stats_steps  # S
        self.steps = 0  # t
        self.warming_up = False

    def observes(self, ready: bool) -> bool:
        """Whether the forwards seen now feed the coming step's statistic, for a layer that has (`ready`) a
        preconditioner or not."""
        if self.warming_up or not ready:
            return True
        r = (self.steps + 1) % self.inv_period
        return r == 0 or r > self.inv_period - self.stats_steps

    def advance(self) -> None:
        """Step t begins."""
        self.steps += 1

    @property
    def inverts(self) -> bool:
        """Whether this step recomputes the preconditioners (after its update)."""
        return self.steps % self.inv_period == 0

    @property
    def period_passed(self) -> bool:
        """Whether a whole period of steps has passed (a layer never observed in it is named)."""
        return self.steps >= self.inv_period
