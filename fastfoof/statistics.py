"""The statistics store (DESIGN §1.2): per layer and factor one `Statistic`, the sum of what was observed
since the last step and the running average it is folded into."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from . import ops
from .layers import Layer
from .linalg import stat_dtype


@dataclass(frozen=True)
class Factor:
    """A second moment a layer keeps (FOOF's Σ, KFAC's A and G): the optimizer-state keys of its running
    average and of the average's weight n (what state_dict saves), and its shape."""

    average: str
    count: str
    shape: Callable[[Layer], tuple]  # [groups, d, d]


# FOOF's Σ and KFAC's A: the layer's input patches (with the bias row)
INPUTS = Factor("ema", "ema_count", lambda layer: (layer.groups, layer.dim_p, layer.dim_p))
# KFAC's G: the second moment of the scaled output gradients
OUTPUT_GRADS = Factor("grad_ema", "grad_ema_count", lambda layer: (layer.groups, layer.rows, layer.rows))


class Statistic:
    """One layer's one factor: the pending sum Σ α·a aᵀ of what was observed since the last step, the samples
    it holds (and, for KFAC's empirical G, the batch of the forwards its gradients came from), and the running
    average Σ with its weight n that it is folded into, kept in the optimizer state (`bind`)."""

    def __init__(self, layer: Layer, factor: Factor):
        self.layer, self.factor = layer, factor
        self.pending: torch.Tensor | None = None  # reused from step to step (a fixed address for the kernels)
        self.samples = 0
        self.batch = 0
        self._state: dict | None = None

    @property
    def shape(self) -> tuple:
        return self.factor.shape(self.layer)

    @property
    def observed(self) -> bool:
        """Whether the pending sum holds samples of the layer's current shape."""
        return bool(self.samples) and tuple(self.pending.shape) == self.shape

    @property
    def average(self) -> torch.Tensor:
        return self._state[self.layer.weight][self.factor.average]

    @property
    def count(self) -> torch.Tensor:
        return self._state[self.layer.weight][self.factor.count]

    def add(self, x: torch.Tensor, module: nn.Module, *, bias: bool, alpha: float, samples: int,
            backend: str) -> None:
        """Add α·Σ a aᵀ over the patch vectors of `x` (an input of `module`) and `samples` samples."""
        layer, shape = self.layer, self.shape
        dtype, device = stat_dtype(layer.weight.dtype), layer.weight.device
        stat, count = self.pending, self.samples
        if stat is None or tuple(stat.shape) != shape:
            count = 0  # a bias row came or went since these samples: they are dropped
        if not count:
            if stat is None or tuple(stat.shape) != shape or stat.dtype != dtype or stat.device != device:
                stat = torch.empty(shape, dtype=dtype, device=device)
        elif stat.dtype != dtype or stat.device != device:
            stat = stat.to(device, dtype)  # the model moved between two forwards
        with torch.no_grad(), torch.autocast(device.type, enabled=False):  # statistics stay in float32
            ops.patch_gram_(stat, x.to(device), module, alpha=alpha, beta=1.0 if count else 0.0, bias=bias,
                            backend=backend)
        self.pending, self.samples = stat, count + samples

    def start_average(self) -> bool:
        """Make the running average a zero of the layer's shape (weight n = 0) where it has none of that
        shape; returns whether it did (the layer's preconditioner, of the old shape, must go too)."""
        entries = self._state[self.layer.weight]
        average = entries.get(self.factor.average)
        if average is not None and tuple(average.shape) == self.shape:
            return False
        dtype, device = stat_dtype(self.layer.weight.dtype), self.layer.weight.device
        entries[self.factor.average] = torch.zeros(self.shape, dtype=dtype, device=device)
        entries[self.factor.count] = torch.zeros((), dtype=dtype, device=device)
        return True

    def templates(self) -> dict[str, torch.Tensor]:
        """Zeros shaped as the running average and its weight (a state dict's placeholders)."""
        dtype, device = stat_dtype(self.layer.weight.dtype), self.layer.weight.device
        return {self.factor.average: torch.zeros(self.shape, dtype=dtype, device=device),
                self.factor.count: torch.zeros((), dtype=dtype, device=device)}

    def clear(self) -> None:
        self.samples = self.batch = 0


class Statistics:
    """Every layer's statistics (a `Statistic` per layer and factor), the inputs compiled forwards recorded
    for them, and which layers' forwards ran since the last step."""

    def __init__(self, layers: list[Layer], factors: tuple[Factor, ...]):
        self.factors = factors
        self._of = {(layer, factor): Statistic(layer, factor) for layer in layers for factor in factors}
        # (module, input) a compiled forward recorded, not yet turned into statistics (an eager forward's
        # statistic is taken in its hook); lists kept for good: a compiled forward appends to this very list
        self._recorded: dict[Layer, list] = {layer: [] for layer in layers}
        self.called: set[Layer] = set()  # layers with a forward since the last step (in any mode)

    def bind(self, state: dict) -> None:
        """Keep the running averages in `state` (the optimizer's, keyed by layer weight)."""
        for statistic in self._of.values():
            statistic._state = state

    @property
    def keys(self) -> set[str]:
        """The state keys of the running averages."""
        return {key for factor in self.factors for key in (factor.average, factor.count)}

    def of(self, layer: Layer, factor: Factor = INPUTS) -> Statistic:
        return self._of[(layer, factor)]

    def of_layer(self, layer: Layer) -> list[Statistic]:
        return [self._of[(layer, factor)] for factor in self.factors]

    def record(self, layer: Layer, module: nn.Module, x: torch.Tensor) -> None:
        """A compiled forward's input, to be taken later (`take_recorded`)."""
        self._recorded[layer].append((module, x))

    def take_recorded(self, layer: Layer) -> list[tuple[nn.Module, torch.Tensor]]:
        """The inputs compiled forwards recorded, now forgotten."""
        records = list(self._recorded[layer])
        self._recorded[layer].clear()  # in place: a compiled forward's side effects append to this very list
        return records

    def recorded(self, layer: Layer) -> bool:
        return bool(self._recorded[layer])

    def observed(self, layer: Layer) -> bool:
        """Whether every factor of the layer has pending samples."""
        return all(statistic.samples for statistic in self.of_layer(layer))

    def start_averages(self, layer: Layer) -> bool:
        """`Statistic.start_average` for each factor of the layer; whether any started over."""
        return any([statistic.start_average() for statistic in self.of_layer(layer)])

    def fold(self, layers: list[Layer], decay: float, scale: Callable[[Statistic], float], *,
             found_inf: torch.Tensor | None, backend: str, plans) -> tuple[int, torch.Tensor | None, list[Layer]]:
        """Σ ← mΣ + (1−m)·s·C and n ← m·n + (1−m) for every observed statistic of the layers, C its pending
        sum and s = `scale(statistic)` (nothing folds where found_inf ≠ 0; a non-finite C is dropped). Returns
        the number of statistics offered, the number dropped (a device tensor, None if none was offered) and
        the layers whose running averages started over (a new shape)."""
        observed = [s for layer in layers for s in self.of_layer(layer) if s.observed]
        restarted = [layer for layer in dict.fromkeys(s.layer for s in observed) if self.start_averages(layer)]
        dropped = None
        if observed:
            dropped = ops.fold_statistics_([s.average for s in observed], [s.count for s in observed],
                                           [s.pending for s in observed], [scale(s) for s in observed], decay,
                                           found_inf=found_inf, backend=backend, plans=plans)
        return len(observed), dropped, restarted

    def clear(self) -> None:
        """Forget everything observed since the last step."""
        for statistic in self._of.values():
            statistic.clear()
        for records in self._recorded.values():
            records.clear()
        self.called.clear()
