"""FOOF as a torch.optim.Optimizer: the paper's Algorithm 1 with DESIGN §1's schedule.

Per preconditioned layer, with A the layer's input patches (and a bias row of ones):
    every observed step      Σ ← mΣ + (1−m)·A·Aᵀ/B,  n ← m·n + (1−m)        (`KroneckerOptimizer`)
    every T steps            P ← (Σ/n + λI)⁻¹                                  (`_preconditioners`)
    every step               U = Ĝ·P,  then SGD with momentum on U             (`_prepare_block`)
"""
from __future__ import annotations

import torch

from . import ops
from .core import KroneckerOptimizer
from .layers import Block, Layer
from .reference import padded_zeros


class FOOF(KroneckerOptimizer):
    """FOOF ("gradient descent on neurons", Benzing 2022): each Linear/Conv layer's weight gradient
    is preconditioned by the damped inverse of a running average of its input patches' second
    moment, U = Ĝ·(Σ̂ + λI)⁻¹, then stepped like torch.optim.SGD with decoupled weight decay.

    Args:
        model: the module whose Linear/Conv layers are observed through forward hooks (a
            `torch.compile`d module works too).
        params: parameters or param-group dicts (default `model.parameters()`); a layer is
            preconditioned iff its weight is among them (and requires grad, at step time).
        lr, momentum, dampening, nesterov, weight_decay: as torch.optim.SGD, per param group
            (weight decay is decoupled, as AdamW).
        damping: λ > 0, added to the averaged statistic before inversion.
        ema_decay: m in Σ ← mΣ + (1−m)C (bias-corrected).
        inv_period: T, steps between inversions; stats_steps: S, steps observed before each.
        precondition_bias: treat a layer's bias as the last column of [Ŵ | b].
        skip: module names, module types, or a predicate(name, module) not to precondition.
        backend: "auto", "reference" or "triton" (see `fastfoof.ops`).
        stats_batch: take the statistics from the first k samples of each observed forward (None:
            all); still a mean over the samples used.
        process_group: the torch.distributed group whose ranks share statistics and inversions
            (default: the default group, when one is initialised).
    """

    KIND = "FOOF"

    def _ready(self, layer: Layer) -> bool:
        precond = self.state[layer.weight].get("precond")
        return precond is not None and precond.shape[-1] == layer.dim_out

    def _preconditioners(self, layers: list[Layer], states: list[dict]) -> tuple[list[dict], list[torch.Tensor]]:
        """P = (Σ/n + λI)⁻¹ (DESIGN §1.3), one batched call for all layers."""
        counts = [s["ema_count"] for s in states]
        inverses, status = ops.damped_inverse_with_status(
            [s["ema"] for s in states], self.damping,
            scales=[torch.where(n > 0, 1 / n, torch.zeros_like(n)) for n in counts],
            previous=[s.get("precond") for s in states], backend=self.backend)
        return [{"precond": p} for p in inverses], status

    def _preconditioners_like(self, layers: list[Layer], states: list[dict]) -> list[tuple[dict, torch.Tensor]]:
        return [({"precond": padded_zeros(s["ema"].shape[0], s["ema"].shape[-1], s["ema"].dtype, s["ema"].device)},
                 torch.empty(s["ema"].shape[0], dtype=torch.int8, device=s["ema"].device)) for s in states]

    def _prepare_block(self, block: Block, layer: Layer, state: dict) -> None:
        block.precond = state["precond"]
