"""FOOF as a torch.optim.Optimizer: the paper's Algorithm 1 with DESIGN §1's schedule.

Per preconditioned layer, with A the layer's input patches (and a bias row of ones):
    every observed step      Σ ← mΣ + (1−m)·A·Aᵀ/B,  n ← m·n + (1−m)        (`KroneckerOptimizer`)
    every T steps            P ← (Σ/n + λI)⁻¹                                  (`_preconditioners`)
    every step               U = Ĝ·P,  U ← U·min(‖Ĝ‖/‖U‖, 10λ) (graft="sgd"),  then SGD with momentum on U
With `rank` = r, a layer with D' > 2r keeps the top r eigenpairs (Q, s) of Σ/n instead of P, and
steps with U = (Ĝ − (Ĝ·Q)·diag(s/(s+λ))·Qᵀ)/λ = Ĝ·(Q diag(s) Qᵀ + λI)⁻¹ (DESIGN §1.3).
"""
from __future__ import annotations

import torch

from . import ops
from .core import KroneckerOptimizer
from .layers import Block, Layer
from .linalg import padded_zeros


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
            (weight decay is decoupled, as AdamW). With the default `graft="sgd"`, lr is the SGD learning
            rate (and schedule) you already use.
        damping: λ > 0, added to the averaged statistic before inversion: with grafting it shapes the
            direction only (larger: closer to SGD's).
        ema_decay: m in Σ ← mΣ + (1−m)C (bias-corrected).
        inv_period: T, steps between inversions; stats_steps: S, steps observed before each.
        precondition_bias: treat a layer's bias as the last column of [Ŵ | b].
        skip: module names, module types, or a predicate(name, module) not to precondition.
        backend: "auto", "reference" or "triton" (see `fastfoof.ops`).
        stats_batch: take the statistics from the first k samples of each observed forward (None:
            all); still a mean over the samples used.
        rank: None, or r ≥ 1: layers with D' > 2r are preconditioned by the best rank-r approximation
            of their statistic plus λI (its top r eigenpairs, by a randomized method), so that the
            update costs 4·O·D'·r flops instead of 2·O·D'² and no D'×D' P is kept.
        graft: "sgd" (default): each preconditioned layer's U is rescaled to its gradient's Frobenius
            norm (weight and bias together), U ← U·min(‖Ĝ‖/‖U‖, 10λ), and the other parameters step with
            U = G, so the step has SGD's size per layer and FOOF's direction (DESIGN §1.4). None: the
            paper's eq. 6, U = Ĝ·P and U = G/λ, for which lr = λ × your SGD lr.
        process_group: the torch.distributed group whose ranks share statistics and inversions
            (default: the default group, when one is initialised).
    """

    KIND = "FOOF"

    def _ready(self, layer: Layer) -> bool:
        return self._has_input_factor(layer)

    def _preconditioners(self, layers: list[Layer], states: list[dict]) -> tuple[list[dict], list[torch.Tensor]]:
        """P = (Σ/n + λI)⁻¹ (DESIGN §1.3), one batched call for all dense layers; the top `rank`
        eigenpairs of Σ/n for the low-rank ones."""
        scales = [torch.where(n > 0, 1 / n, torch.zeros_like(n)) for n in (s["ema_count"] for s in states)]
        low = [i for i, layer in enumerate(layers) if self._low_rank(layer)]
        dense = [i for i in range(len(layers)) if i not in low]
        results, status = [None] * len(layers), [None] * len(layers)
        inverses, codes = ops.damped_inverse_with_status(
            [states[i]["ema"] for i in dense], self.damping, scales=[scales[i] for i in dense],
            previous=[states[i].get("precond") for i in dense], backend=self.backend, plans=self.kernel_plans)
        for i, p, code in zip(dense, inverses, codes):
            results[i], status[i] = {"precond": p}, code
        pairs, codes = ops.top_eigenpairs_with_status(
            [states[i]["ema"] for i in low], self.rank, self.damping, scales=[scales[i] for i in low],
            previous=[(states[i]["top_eigvals"], states[i]["top_eigvecs"]) if "top_eigvecs" in states[i] else None
                      for i in low], backend=self.backend)
        for i, (s, q), code in zip(low, pairs, codes):
            results[i], status[i] = {"top_eigvals": s, "top_eigvecs": q}, code
        return results, status

    def _preconditioners_like(self, layers: list[Layer], states: list[dict]) -> list[tuple[dict, torch.Tensor]]:
        templates = []
        for layer, s in zip(layers, states):
            ema = s["ema"]
            tensors = self._top_eigenpairs_like(ema) if self._low_rank(layer) else \
                {"precond": padded_zeros(ema.shape[0], ema.shape[-1], ema.dtype, ema.device)}
            templates.append((tensors, torch.empty(ema.shape[0], dtype=torch.int8, device=ema.device)))
        return templates

    def _prepare_block(self, block: Block, layer: Layer, state: dict) -> None:
        block.precond = state.get("precond")
        block.eigvecs, block.eigvals = state.get("top_eigvecs"), state.get("top_eigvals")
