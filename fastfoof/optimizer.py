"""FOOF as a torch.optim.Optimizer: the paper's Algorithm 1 with DESIGN §1's schedule.

Per preconditioned layer, with A the layer's input patches (and a bias row of ones), R per sample:
    every observed step      Σ ← mΣ + (1−m)·A·Aᵀ/(B·R),  n ← m·n + (1−m)    (`statistics.INPUTS`; eq. 6: /B)
    every T steps            P ← (Σ/n + λI)⁻¹                                  (`preconditioners.DenseInverse`)
    every step               U = Ĝ·P,  U ← U·min(‖Ĝ‖/‖U‖, 1.5λ) (graft="sgd"),  then SGD with momentum on U
With `rank` = r, a layer with D' > 2r keeps the top r eigenpairs (Q, s) of Σ/n instead of P, and
steps with U = (Ĝ − (Ĝ·Q)·diag(s/(s+λ))·Qᵀ)/λ = Ĝ·(Q diag(s) Qᵀ + λI)⁻¹ (`preconditioners.LowRank`,
DESIGN §1.3). `KroneckerOptimizer` runs the schedule; FOOF says what it observes and inverts.
"""
from __future__ import annotations

from .core import KroneckerOptimizer
from .layers import Layer
from .preconditioners import DenseInverse, LowRank, Preconditioner, input_inverse
from .statistics import INPUTS


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
        damping: λ > 0 (default 3), added to the averaged statistic before inversion: with grafting it
            shapes the direction only (larger: closer to SGD's), against a statistic averaged over the
            layer's positions, so the same λ suits every layer.
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
            norm (weight and bias together), U ← U·min(‖Ĝ‖/‖U‖, 1.5λ), and the other parameters step with
            U = G, so the step has SGD's size per layer and FOOF's direction (DESIGN §1.4). None: the
            paper's eq. 6 with its statistic (a sum over positions), U = Ĝ·P and U = G/λ, for which
            lr = λ × your SGD lr.
        inverse: how the inversion round factors (Σ̂ + λI): "cholesky" (default: batched LAPACK/cuSOLVER),
            "blocked" (recursive blocked Cholesky, matmuls past 512×512 leaves), "blocked_tf32x3" (those
            matmuls as three TF32 products on CUDA) or "newton_schulz" (refines the previous P, kept only
            where its residual is ≤ 1e-3, else Cholesky). The environment variable FASTFOOF_INVERSE, where
            set, overrides it.
        process_group: the torch.distributed group whose ranks share statistics and inversions
            (default: the default group, when one is initialised).
    """

    KIND = "FOOF"
    FACTORS = (INPUTS,)  # Σ, of the layer's input patches
    GRAFT_BOUND = 1.5

    def _preconditioner(self, layer: Layer) -> Preconditioner:
        """P, or (Q, s) for a layer with D' > 2r."""
        return input_inverse(layer, self.rank)

    def _preconditioner_types(self) -> list[Preconditioner]:
        return [DenseInverse()] + ([LowRank(self.rank)] if self.rank is not None else [])
