"""The preconditioner types (DESIGN §1.3, §6): what a layer's preconditioner is made of, when a layer has
one, how an inversion round computes it for many layers at once, the empty tensors another rank's result
is received into and a state dict's placeholders are made of, and how it applies to the layer's block.

Each type owns its keys in the layer weight's optimizer state (the keys state_dict saves):
- `DenseInverse`: FOOF's P = (Σ̂ + λI)⁻¹ ("precond", in P's padded layout);
- `LowRank`: the top r eigenpairs (s, Q) of Σ̂, for layers with D′ > 2r ("top_eigvals", "top_eigvecs");
- `KroneckerFactors`: KFAC's (G + d_G I)⁻¹ ("grad_precond") beside A's dense or low-rank inverse;
- `Eigenbases`: KFAC's exact damping, both factors' eigendecompositions ("precond" holds Q_Aᵀ, in P's
  layout, "eigvals", "grad_eigvecs", "grad_eigvals").
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from . import ops
from .layers import Block, Layer
from .linalg import aligned, padded_zeros, stat_dtype

DAMPING_MODES = ("heuristic", "exact", "factor")
MIN_DAMPING = 1e-8  # Martens & Grosse's heuristic damping is clamped from below (as curvlinops does)


@dataclass(frozen=True)
class Round:
    """What an inversion round's computations take from the optimizer."""

    damping: float
    backend: str
    method: str  # the damped inverse's method (`linalg.INVERSE_METHODS`)
    plans: object  # the optimizer's kernel plans


def bias_corrections(states: list[dict], key: str) -> list[torch.Tensor]:
    """1/n of each running average (0 for an empty one, n = 0: its preconditioner is then dropped)."""
    return [torch.where(n > 0, 1 / n, torch.zeros_like(n)) for n in (s[key] for s in states)]


def _zeros(layer: Layer, *shape: int) -> torch.Tensor:
    return torch.zeros(shape, dtype=stat_dtype(layer.weight.dtype), device=layer.weight.device)


def _status(layer: Layer, factors: int = 1) -> torch.Tensor:
    """A status template: one int8 per group and factor."""
    return torch.zeros(factors * layer.groups, dtype=torch.int8, device=layer.weight.device)


class Preconditioner:
    """A preconditioner type (the module docstring lists them)."""

    keys: tuple[str, ...] = ()  # its entries in the layer weight's optimizer state
    aligned_keys: tuple[str, ...] = ()  # those kept in P's padded layout (`linalg.aligned`)

    def ready(self, layer: Layer, state: dict) -> bool:
        """Whether the layer has this preconditioner, for its current shape."""
        raise NotImplementedError

    def compute(self, layers: list[Layer], states: list[dict], round: Round) -> tuple[list[dict], list[torch.Tensor]]:
        """For each layer its new entries (computed from the running averages in its state) and status codes
        ([groups] int8 per factor: OK, RETRIED, KEPT_PREVIOUS): one batched computation for all layers."""
        raise NotImplementedError

    def like(self, layer: Layer) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        """Zeros shaped as `compute`'s entries and status for the layer."""
        raise NotImplementedError

    def apply(self, block: Block, state: dict, damping: float, distributor) -> None:
        """Set what the update applies to the layer's block (DESIGN §1.4): its P, or (Q, s), and KFAC's
        left-transformed gradient."""
        raise NotImplementedError


class DenseInverse(Preconditioner):
    """P = (Σ̂ + λI)⁻¹ per group (DESIGN §1.3), U = Ĝ·P."""

    keys = aligned_keys = ("precond",)

    def ready(self, layer: Layer, state: dict) -> bool:
        p = state.get("precond")
        return p is not None and p.shape[1] == layer.dim_p

    def compute(self, layers, states, round):
        inverses, codes = ops.damped_inverse_with_status(
            [s["ema"] for s in states], round.damping, scales=bias_corrections(states, "ema_count"),
            previous=[s.get("precond") for s in states], backend=round.backend, method=round.method,
            plans=round.plans)
        return [{"precond": p} for p in inverses], codes

    def like(self, layer):
        return {"precond": padded_zeros(layer.groups, layer.dim_p, stat_dtype(layer.weight.dtype),
                                        layer.weight.device)}, _status(layer)

    def apply(self, block, state, damping, distributor):
        block.precond = state["precond"]


class LowRank(Preconditioner):
    """(Σ̂_r + λI)⁻¹ from the top r eigenpairs (s, Q) of Σ̂ (DESIGN §1.3), never a D′×D′ matrix:
    U = (Ĝ − (Ĝ·Q)·diag(s/(s+λ))·Qᵀ)/λ."""

    keys = ("top_eigvals", "top_eigvecs")

    def __init__(self, rank: int):
        self.rank = rank

    def ready(self, layer: Layer, state: dict) -> bool:
        q = state.get("top_eigvecs")
        return q is not None and q.shape[1] == layer.dim_p

    def compute(self, layers, states, round):
        pairs, codes = self.pairs([s["ema"] for s in states], states, round, bias_corrections(states, "ema_count"))
        return [{"top_eigvals": s, "top_eigvecs": q} for s, q in pairs], codes

    def pairs(self, mats: list[torch.Tensor], states: list[dict], round: Round, scales=None):
        """The top eigenpairs of each s·M (`scales`, None: 1), the layer's previous ones where they fail."""
        return ops.top_eigenpairs_with_status(
            mats, self.rank, round.damping, scales=scales, backend=round.backend,
            previous=[(s["top_eigvals"], s["top_eigvecs"]) if "top_eigvecs" in s else None for s in states])

    def like(self, layer):
        return {"top_eigvals": _zeros(layer, layer.groups, self.rank),
                "top_eigvecs": _zeros(layer, layer.groups, layer.dim_p, self.rank)}, _status(layer)

    def apply(self, block, state, damping, distributor):
        block.eigvecs, block.eigvals = state["top_eigvecs"], state["top_eigvals"]


def input_inverse(layer: Layer, rank: int | None) -> DenseInverse | LowRank:
    """The input factor's preconditioner type of a layer: low rank where D′ > 2r (DESIGN §1.3)."""
    return LowRank(rank) if rank is not None and layer.dim_p > 2 * rank else DenseInverse()


class KroneckerFactors(Preconditioner):
    """KFAC's U = (G + d_G I)⁻¹ Ĝ (A + d_A I)⁻¹ (DESIGN §6), damping_mode "factor" (d_A = d_G = λ) or
    "heuristic" (π = sqrt((tr A/dim A)/(tr G/dim G)), d_A = π√λ, d_G = √λ/π); A's inverse dense or, with
    `rank`, from A's top eigenpairs."""

    keys = ("precond", "top_eigvals", "top_eigvecs", "grad_precond")
    aligned_keys = ("precond",)

    def __init__(self, damping_mode: str, rank: int | None):
        self.damping_mode, self.rank = damping_mode, rank

    def ready(self, layer, state):
        return input_inverse(layer, self.rank).ready(layer, state) and "grad_precond" in state

    def compute(self, layers, states, round):
        a_scale, g_scale = bias_corrections(states, "ema_count"), bias_corrections(states, "grad_ema_count")
        d_a, d_g = self.factor_damping(states, a_scale, g_scale, round.damping)
        low = [isinstance(input_inverse(layer, self.rank), LowRank) for layer in layers]
        dense = [i for i in range(len(states)) if not low[i]]
        # (M/n + dI)⁻¹ = (M/(n·d) + I)⁻¹ / d: one batched inversion with damping 1 serves every d
        mats = [states[i]["ema"] * (a_scale[i] / d_a[i])[:, None, None] for i in dense] + \
               [s["grad_ema"] * (g / d)[:, None, None] for s, g, d in zip(states, g_scale, d_g)]
        previous = [None if states[i].get("precond") is None else states[i]["precond"] * d_a[i][:, None, None]
                    for i in dense] + \
                   [None if s.get("grad_precond") is None else s["grad_precond"] * d[:, None, None]
                    for s, d in zip(states, d_g)]
        inverses, status = ops.damped_inverse_with_status(mats, 1.0, previous=previous, backend=round.backend,
                                                          method=round.method, plans=round.plans)
        a_inverses, a_status = iter(inverses[:len(dense)]), iter(status[:len(dense)])
        g_inverses, g_status = inverses[len(dense):], status[len(dense):]
        # A low rank: (Â_r + d_A I)⁻¹ = (λ/d_A)·((λ/d_A)·Â_r + λI)⁻¹, so the top eigenpairs of (λ/d_A)·Â
        # let the update's λ serve every d_A, and λ/d_A joins (G + d_G I)⁻¹
        ratios = [round.damping / d for d in d_a]
        lows = [i for i in range(len(states)) if low[i]]
        pairs, pair_status = LowRank(self.rank).pairs(
            [states[i]["ema"] * (a_scale[i] * ratios[i])[:, None, None] for i in lows], [states[i] for i in lows],
            round)
        pairs, pair_status = iter(pairs), iter(pair_status)
        results, codes = [], []
        for i in range(len(states)):
            p_g = g_inverses[i].div_(d_g[i][:, None, None])  # in place: P's layout stays
            if low[i]:
                s, q = next(pairs)
                results.append({"top_eigvals": s, "top_eigvecs": q,
                                "grad_precond": p_g.mul_(ratios[i][:, None, None])})
                codes.append(torch.cat([next(pair_status), g_status[i]]))
            else:
                results.append({"precond": next(a_inverses).div_(d_a[i][:, None, None]), "grad_precond": p_g})
                codes.append(torch.cat([next(a_status), g_status[i]]))
        return results, codes

    def factor_damping(self, states: list[dict], a_scale: list, g_scale: list, damping: float):
        """(d_A, d_G) per layer, [groups] each, on the device (DESIGN §6)."""
        d_a, d_g = [], []
        for s, a, g in zip(states, a_scale, g_scale):
            full = torch.full((s["ema"].shape[0],), damping, dtype=s["ema"].dtype, device=s["ema"].device)
            if self.damping_mode == "factor":
                d_a.append(full)
                d_g.append(full)
                continue
            mean_a = s["ema"].diagonal(dim1=-2, dim2=-1).mean(-1) * a
            mean_g = s["grad_ema"].diagonal(dim1=-2, dim2=-1).mean(-1) * g
            usable = (mean_a >= 0) & (mean_g > 0)  # else factor damping, as curvlinops
            pi = torch.where(usable, mean_a / torch.where(usable, mean_g, 1.0), 1.0).sqrt()
            root = math.sqrt(damping)
            d_a.append(torch.where(usable, (pi * root).clamp_min(MIN_DAMPING), full))
            d_g.append(torch.where(usable, (root / pi).clamp_min(MIN_DAMPING), full))
        return d_a, d_g

    def like(self, layer):
        entries, _ = input_inverse(layer, self.rank).like(layer)
        return {**entries, "grad_precond": _zeros(layer, layer.groups, layer.rows, layer.rows)}, _status(layer, 2)

    def apply(self, block, state, damping, distributor):
        # The left factor mixes a layer's rows: under FSDP2 it takes the gradient's rows from every
        # rank (one all-gather) and computes the rows this rank holds (DESIGN §7).
        block.left_transformed_grad = distributor.left_product(block, state["grad_precond"],
                                                               distributor.joint_gradient(block))
        block.precond = state.get("precond")
        block.eigvecs, block.eigvals = state.get("top_eigvecs"), state.get("top_eigvals")


class Eigenbases(Preconditioner):
    """KFAC's exact damping (DESIGN §6): Â = Q_A diag(α) Q_Aᵀ and Ĝ = Q_G diag(γ) Q_Gᵀ, and
    U = (Q_G [(Q_Gᵀ Ĝ Q_A) ⊘ (γαᵀ + λ)])·Q_Aᵀ = (A ⊗ G + λI)⁻¹ applied to Ĝ: "precond" holds
    Q_Aᵀ, so that the update's last product is the dense one's."""

    keys = ("precond", "eigvals", "grad_eigvecs", "grad_eigvals")
    aligned_keys = ("precond",)

    def ready(self, layer, state):
        return DenseInverse().ready(layer, state) and "grad_eigvecs" in state

    def compute(self, layers, states, round):
        previous = [None if s.get("precond") is None else (s["eigvals"], s["precond"].mT) for s in states] + \
                   [None if s.get("grad_eigvecs") is None else (s["grad_eigvals"], s["grad_eigvecs"]) for s in states]
        decompositions, status = ops.eigh_with_status(
            [s["ema"] for s in states] + [s["grad_ema"] for s in states], previous=previous, backend=round.backend,
            scales=bias_corrections(states, "ema_count") + bias_corrections(states, "grad_ema_count"))
        n = len(states)
        results = [{"precond": aligned(q_a.mT), "eigvals": w_a, "grad_eigvecs": q_g, "grad_eigvals": w_g}
                   for (w_a, q_a), (w_g, q_g) in zip(decompositions[:n], decompositions[n:])]
        return results, [torch.cat([a, g]) for a, g in zip(status[:n], status[n:])]

    def like(self, layer):
        entries, _ = DenseInverse().like(layer)
        return {**entries, "eigvals": _zeros(layer, layer.groups, layer.dim_p),
                "grad_eigvecs": _zeros(layer, layer.groups, layer.rows, layer.rows),
                "grad_eigvals": _zeros(layer, layer.groups, layer.rows)}, _status(layer, 2)

    def apply(self, block, state, damping, distributor):
        left = state["grad_eigvecs"]
        rotated = left.mT @ distributor.joint_gradient(block) @ state["precond"].mT  # Q_Gᵀ Ĝ Q_A
        right = rotated / (state["grad_eigvals"][:, :, None] * state["eigvals"][:, None, :] + damping)
        block.left_transformed_grad = distributor.left_product(block, left, right)
        block.precond = state["precond"]
