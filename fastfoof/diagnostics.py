"""The optimizers' diagnostics (DESIGN §5): counters kept on the device and read once per round, and the
warnings that each condition gives once."""
from __future__ import annotations

import warnings

import torch

DIAGNOSTICS = ("dropped_stats", "cholesky_retries", "cholesky_failures")


class Diagnostics:
    """dropped_stats (statistics with a non-finite entry, never folded), cholesky_retries (factorisations
    retried in float64) and cholesky_failures (the previous preconditioner kept), and which warnings were
    given."""

    def __init__(self, kind: str, names: tuple[str, ...] = DIAGNOSTICS):
        self.kind, self.names = kind, names
        self.counters = torch.zeros(len(names), dtype=torch.int64)  # on the device: read once per round
        self.warned: set[str] = set()

    def count(self, name: str, value: torch.Tensor) -> None:
        self.counters = self.counters.to(value.device)
        self.counters[self.names.index(name)] += value

    def warn_once(self, name: str, message: str, stacklevel: int) -> None:
        if name not in self.warned:
            self.warned.add(name)
            warnings.warn(message, RuntimeWarning, stacklevel=stacklevel + 1)

    def warn_new(self, stacklevel: int) -> None:
        """Warn about each counter that became non-zero (a host read)."""
        for name, value in self.as_dict().items():
            if value:
                self.warn_once(name, f"{self.kind}: {name} = {value} (see {self.kind}.diagnostics and DESIGN §1.3)",
                               stacklevel + 1)

    def as_dict(self) -> dict[str, int]:
        return dict(zip(self.names, self.counters.tolist()))

    def load(self, saved: dict[str, int]) -> None:
        """Counters as a state dict saved them; those already non-zero warn no more."""
        self.counters = torch.tensor([saved.get(name, 0) for name in self.names])
        self.warned = {name for name, value in saved.items() if value}
