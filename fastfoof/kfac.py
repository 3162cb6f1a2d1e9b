"""KFAC (Martens & Grosse 2015; Grosse & Martens 2016 for convolutions, "expand" form) on FOOF's
core and operations (DESIGN §6).

Per preconditioned layer and group, with A its input patches (and bias row) and ĝ = B·∂L/∂s the
scaled gradients of its output s at every output position:
    every observed step      A ← EMA of A·Aᵀ/(B·R),   G ← EMA of Σ ĝĝᵀ/B      (`_observe`,
                                                                                `_take_output_grad`)
    every T steps            (G + d_G I)⁻¹ and (A + d_A I)⁻¹ (`preconditioners.KroneckerFactors`),
                             or both factors' eigendecompositions ("exact": `preconditioners.Eigenbases`)
    every step               U = (G + d_G I)⁻¹ Ĝ (A + d_A I)⁻¹, then SGD with momentum on U
Grouped convolutions are block-diagonal over their groups: each group has its own A and G.
"""
from __future__ import annotations

import math
from functools import partial
from itertools import chain

import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd.graph import get_gradient_edge
from torch.optim.optimizer import required

from .core import KroneckerOptimizer, on_itself
from .geometry import batch_size, output_module, positions_per_sample
from .layers import Layer, Skip
from .observe import first_samples, in_backward, watchable_output
from .preconditioners import DAMPING_MODES, MIN_DAMPING, Eigenbases, KroneckerFactors, Preconditioner  # noqa: F401
from .statistics import INPUTS, OUTPUT_GRADS, Statistic

FISHERS = ("empirical", "mc")
FISHER_LOSSES = ("cross_entropy", "mse")


class _OutputGradient:
    """Tensor hook on one observed forward's output: its gradient enters the layer's G. Empirical
    Fisher: raw Σ ggᵀ, the forward's batch counted once (scaled at the fold); a second backward
    through the same forward is warned about. Monte Carlo: α = B² of the sampled loss's mean."""

    def __init__(self, owner: "KFAC", layer: Layer, batch: int, empirical: bool):
        self.owner, self.layer, self.batch, self.empirical = owner, layer, batch, empirical
        self.taken = False

    def __call__(self, grad: torch.Tensor) -> None:
        if not self.empirical:
            self.owner._take_output_grad(self.layer, grad, float(self.batch) ** 2)
            return
        if self.taken:
            self.owner._warn_once("several_backwards", "KFAC(fisher='empirical'): several backwards through one "
                                  "forward; G then sums the second moments of each backward's output gradients, "
                                  "not that of their sum")
        else:
            self.owner.statistics.of(self.layer, OUTPUT_GRADS).batch += self.batch
        self.taken = True
        self.owner._take_output_grad(self.layer, grad, 1.0)


def _edge_gradient(index: int, hook: _OutputGradient, grad_outputs: tuple) -> None:
    """A node pre-hook handing the gradient of its output `index` to `hook`."""
    if grad_outputs[index] is not None:
        hook(grad_outputs[index])


class LabelGenerators:
    """The generators Monte Carlo labels are drawn from: the optimizer's own, one per device, seeded alike,
    whose states a state dict carries, so that a resumed run draws the same labels."""

    def __init__(self):
        self.seed = torch.initial_seed()
        self.by_device: dict[torch.device, torch.Generator] = {}

    def on(self, device: torch.device) -> torch.Generator:
        if device not in self.by_device:
            self.by_device[device] = torch.Generator(device).manual_seed(self.seed)
        return self.by_device[device]

    def states(self, device: torch.device) -> dict[str, torch.Tensor]:
        """Every generator's state, `device`'s made now if no label was drawn yet: a fresh optimizer's state
        dict, into which torch.distributed.checkpoint loads, must hold it too."""
        self.on(device)
        return {str(d): g.get_state() for d, g in self.by_device.items()}

    def load(self, states: dict[str, torch.Tensor]) -> None:
        self.by_device = {}
        for device, state in states.items():
            self.on(torch.device(device)).set_state(state)


def predictive_probabilities(scores: torch.Tensor) -> torch.Tensor:
    """softmax(scores) per row, to draw Monte Carlo labels from; a row with a non-finite score (a diverging
    run) is uniform instead, so that drawing never raises: its gradients are not finite whatever the label."""
    probs = scores.softmax(-1)
    return torch.where(probs.isfinite().all(-1, keepdim=True), probs, torch.full_like(probs, 1 / probs.shape[-1]))


def _has_reentrant_checkpoint(node) -> bool:
    """Whether the autograd graph behind `node` holds a reentrant checkpoint (use_reentrant=True)."""
    seen, todo = set(), [node]
    while todo:
        node = todo.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        if type(node).__name__ == "CheckpointFunctionBackward":
            return True
        todo.extend(next_node for next_node, _ in node.next_functions)
    return False


class KFAC(KroneckerOptimizer):
    """KFAC with FOOF's schedule, statistics, fallbacks and update (DESIGN §6): U = (G + d_G I)⁻¹ Ĝ
    (A + d_A I)⁻¹ per layer and group, then SGD with momentum and decoupled weight decay.

    Args (beyond `fastfoof.FOOF`'s, which all apply):
        damping_mode: "heuristic" (Martens & Grosse 2015 §6.3: π = sqrt((tr A/dim A)/(tr G/dim G)),
            d_A = π√λ, d_G = √λ/π), "factor" (d_A = d_G = λ) or "exact" ((A ⊗ G + λI)⁻¹ through
            eigendecompositions of both factors, recomputed every T steps).
        fisher: "empirical" (G from the gradients of your own loss, recorded in your backward) or
            "mc" (the paper's choice: G from a loss on labels sampled from the model; call
            `backward_fisher(logits)` before your own backward on observed steps).
        rank: as FOOF's, for A: layers with D' > 2r use (Â_r + d_A I)⁻¹ from the top r eigenpairs of
            Â (heuristic and factor damping; damping_mode="exact" takes no rank).
        graft: as FOOF's: "sgd" (default) rescales each layer's U to its gradient's Frobenius norm, by at
            most 3λ (FOOF's bound is 1.5λ: DESIGN §1.4).
        grad_scaler: the GradScaler of an fp16 run whose gradients are unscaled before step() (to clip
            them: `scaler.unscale_(opt)`, Lightning's and accelerate's clipping), for fisher="empirical":
            G is recorded from the scaled backward, and this is where its scale is read then (on the
            device). Not needed where `scaler.step(opt)` unscales (GradScaler hands KFAC its scale).

    The diagnostics `cholesky_retries` / `cholesky_failures` count the factorisations of either
    factor (eigendecompositions for "exact"). `warm_up()` observes A only: G needs a backward, so
    a layer's first preconditioner comes with its first training step's G.
    """

    KIND = "KFAC"
    FACTORS = (INPUTS, OUTPUT_GRADS)  # A, of the layer's input patches, and G, of its output gradients
    GRAFT_BOUND = 3.0

    def __init__(self, model: nn.Module, params=None, *, lr: float = required, damping: float = 1.0,
                 damping_mode: str = "heuristic", fisher: str = "empirical", momentum: float = 0.0,
                 dampening: float = 0.0, nesterov: bool = False, weight_decay: float = 0.0,
                 ema_decay: float = 0.95, inv_period: int = 100, stats_steps: int = 10,
                 precondition_bias: bool = True, skip: Skip = None, backend: str = "auto",
                 stats_batch: int | None = None, rank: int | None = None, graft: str | None = "sgd",
                 inverse: str = "cholesky", grad_scaler: torch.amp.GradScaler | None = None, process_group=None):
        if damping_mode not in DAMPING_MODES:
            raise ValueError(f"damping_mode: expected one of {DAMPING_MODES}, got {damping_mode!r}")
        if rank is not None and damping_mode == "exact":
            raise ValueError("rank: a low-rank A is not available with damping_mode='exact'")
        if fisher not in FISHERS:
            raise ValueError(f"fisher: expected one of {FISHERS}, got {fisher!r}")
        self.damping_mode = damping_mode
        self._kronecker = Eigenbases() if damping_mode == "exact" else KroneckerFactors(damping_mode, rank)
        self.fisher = fisher
        self.grad_scaler = grad_scaler
        super().__init__(model, params, lr=lr, damping=damping, momentum=momentum, dampening=dampening,
                         nesterov=nesterov, weight_decay=weight_decay, ema_decay=ema_decay, inv_period=inv_period,
                         stats_steps=stats_steps, precondition_bias=precondition_bias, skip=skip, backend=backend,
                         stats_batch=stats_batch, rank=rank, graft=graft, inverse=inverse,
                         process_group=process_group)
        self._output_modules = {id(layer): output_module(layer.module) for layer in self.layers}
        # fisher="mc": the gradient edges of the observed forwards' outputs and their batch sizes, for
        # `backward_fisher`, per layer
        self._outputs: dict[Layer, list] = {layer: [] for layer in self.layers}
        self._generators = LabelGenerators()  # backward_fisher's
        self._fisher_backward = False  # backward_fisher's own backward is running (see there)

    # ---- statistics -------------------------------------------------------------------------

    def _input_scale(self, x: torch.Tensor, module: nn.Module) -> float:
        return 1.0 / positions_per_sample(x, module)  # A = C / R (DESIGN §6)

    def _observe(self, layer: Layer, module: nn.Module, x: torch.Tensor, output, batch: int):
        output = watchable_output(output)  # None: nothing to take G from
        if self._fisher_backward:  # backward_fisher's backward re-runs a reentrant checkpoint: G only
            self._watch_output(layer, output, batch)
            return output
        super()._observe(layer, module, x, output, batch)
        if self.schedule.warming_up or output is None:
            return output  # warm-up observes A only: no backward follows
        if self.fisher == "empirical":
            self._watch_output(layer, output, batch)
        elif not in_backward():  # a reentrant checkpoint's re-run in the user's backward: G came already
            # the edge into the layer's own node: its gradient is that of the output as the layer
            # returned it, even after an in-place change of the output
            self._outputs[layer].append((get_gradient_edge(output), batch))
        return output

    def _watch_output(self, layer: Layer, output: torch.Tensor | None, batch: int) -> None:
        """G from the gradient that reaches this forward's output in backward (a tensor hook fires
        with the gradient of the output as it was before any in-place change)."""
        if output is not None:
            output.register_hook(_OutputGradient(self, layer, batch, empirical=not self._fisher_backward))

    def _take_output_grad(self, layer: Layer, grad: torch.Tensor, alpha: float) -> None:
        """G's pending sum gains α·Σ ggᵀ over the output gradient's first `stats_batch` samples."""
        if layer.active:
            module = self._output_modules[id(layer)]
            g = first_samples(grad.detach(), module, self.stats_batch)
            self.statistics.of(layer, OUTPUT_GRADS).add(g, module, bias=False, alpha=alpha,
                                                        samples=batch_size(g, module), backend=self.backend)

    def _fold_scale(self, statistic: Statistic) -> float:
        if statistic.factor is OUTPUT_GRADS and self.fisher == "empirical":
            # ĝ = B·∂L/∂s with B the whole batch behind the loss: every forward of the step (gradient
            # accumulation), so known only now; G = B²/k·Σ ggᵀ over the k samples taken
            return statistic.batch ** 2 / statistic.samples
        return super()._fold_scale(statistic)

    def _clear_statistics(self) -> None:
        super()._clear_statistics()
        for outputs in self._outputs.values():
            outputs.clear()

    @on_itself
    def backward_fisher(self, logits: torch.Tensor, loss: str = "cross_entropy",
                        generator: torch.Generator | None = None) -> torch.Tensor | None:
        """Record G of the Monte Carlo Fisher (fisher="mc"): sample one label per input from the
        model's predictive distribution given `logits` ([B, C]) and backpropagate that loss to the
        observed layers' outputs only. Parameters' `.grad` stay untouched and the graph is retained
        for your own backward. Returns the sampled targets, or None on a step that observes nothing.

        loss: "cross_entropy" (labels from softmax(logits)) or "mse" (targets from N(logits, C/2·I),
        the Gaussian whose Fisher is the Gauss–Newton matrix of `F.mse_loss`'s mean over B·C).
        generator: what the samples are drawn from; default the optimizer's own, whose state the
        state_dict carries (a resumed run draws the same labels).

        With reentrant activation checkpointing (`use_reentrant=True`) in the graph, the layers
        inside a checkpoint have no recorded outputs (their forward ran under no_grad): the sampled
        loss then takes a whole backward, which re-runs those forwards, with every parameter's
        `.grad` set aside and restored after. Gradient hooks of parameters (DDP's among them) see
        that backward too: under DDP, use `use_reentrant=False`.
        """
        if self.fisher != "mc":
            raise ValueError(f"backward_fisher: needs fisher='mc', this KFAC has fisher={self.fisher!r}")
        if loss not in FISHER_LOSSES:
            raise ValueError(f"loss: expected one of {FISHER_LOSSES}, got {loss!r}")
        recorded = [(layer, output, batch) for layer in self._active for output, batch in self._outputs[layer]]
        for outputs in self._outputs.values():
            outputs.clear()
        if not recorded and not any(self._observing(layer) for layer in self._active):
            return None
        reentrant = logits.grad_fn is not None and _has_reentrant_checkpoint(logits.grad_fn)
        if not recorded and not reentrant:
            return None
        generator = generator if generator is not None else self._generators.on(logits.device)
        dtype = torch.promote_types(logits.dtype, torch.float32)  # bf16/fp16 logits: sample in fp32
        with torch.no_grad():
            scores = logits.detach().to(dtype)
            if loss == "cross_entropy":
                targets = torch.multinomial(predictive_probabilities(scores), 1, generator=generator).squeeze(-1)
            else:
                noise = torch.randn(scores.shape, generator=generator, dtype=dtype, device=scores.device)
                targets = scores + math.sqrt(scores.shape[-1] / 2) * noise
        with torch.enable_grad():
            sampled = (F.cross_entropy if loss == "cross_entropy" else F.mse_loss)(logits.to(dtype), targets)
            if reentrant:
                self._backward_whole(sampled, recorded)
            else:
                grads = torch.autograd.grad(sampled, [edge for _, edge, _ in recorded], retain_graph=True,
                                            allow_unused=True)
                for (layer, _, batch), grad in zip(recorded, grads):
                    if grad is not None:
                        self._take_output_grad(layer, grad, float(batch) ** 2)
        return targets

    def _backward_whole(self, sampled: torch.Tensor, recorded: list) -> None:
        """The sampled loss's backward through reentrant checkpoints (which refuse `autograd.grad`):
        a plain backward whose re-run forwards report their outputs (`_fisher_backward`), with the
        parameters' gradients set aside and restored."""
        params = {id(p): p for p in chain(self._group_of, (q for layer in self.layers
                                                            for m in layer.modules for q in m.parameters()))}.values()
        kept = [(p, p.grad) for p in params]
        handles = [edge.node.register_prehook(partial(_edge_gradient, edge.output_nr,
                                                      _OutputGradient(self, layer, batch, empirical=False)))
                   for layer, edge, batch in recorded]
        for p in params:
            p.grad = None
        self._fisher_backward = True
        try:
            torch.autograd.backward(sampled, retain_graph=True)
        finally:
            self._fisher_backward = False
            for handle in handles:
                handle.remove()
            for p, grad in kept:
                p.grad = grad

    def _fold_statistics(self, found_inf: torch.Tensor | None = None, grad_scale: torch.Tensor | None = None) -> int:
        inputs = [self.statistics.of(layer, INPUTS) for layer in self._active]
        grads = [self.statistics.of(layer, OUTPUT_GRADS) for layer in self._active]
        if self.fisher == "mc" and any(a.samples and not g.samples for a, g in zip(inputs, grads)):
            self._warn_once("backward_fisher", "KFAC(fisher='mc'): a step observed layer inputs but no Fisher "
                                               "gradients; call opt.backward_fisher(logits) before loss.backward()")
        if self.fisher == "empirical" and any(g.samples for g in grads):
            # GradScaler scaled the output gradients: G by scale² (exact for 2^k). Gradients unscaled before
            # step() come with no grad_scale, but found_inf: their scale is the grad_scaler's.
            if grad_scale is None and found_inf is not None:
                grad_scale = self.grad_scaler._get_scale_async() if self.grad_scaler is not None else None
                if grad_scale is None:
                    self._warn_once("unscaled_fisher", "KFAC(fisher='empirical'): the gradients were unscaled "
                                    "before step() (scaler.unscale_), and G, recorded in the scaled backward, "
                                    "cannot be: pass KFAC(..., grad_scaler=scaler)")
            for g in grads:
                if grad_scale is not None and g.samples:
                    g.pending.mul_(grad_scale.to(g.pending).reciprocal().square())
        return super()._fold_statistics(found_inf, grad_scale)

    def _own_entries(self) -> dict:
        return {**super()._own_entries(), "generators": self._generators.states(next(iter(self._group_of)).device)}

    def _load_own_entries(self, entries: dict) -> None:
        super()._load_own_entries(entries)
        self._generators.load(entries.get("generators", {}))  # (none in older state dicts)

    # ---- preconditioners --------------------------------------------------------------------

    def _preconditioner(self, layer: Layer) -> Preconditioner:
        """(G + d_G I)⁻¹ with A's inverse, or, damping_mode="exact", both factors' eigenbases."""
        return self._kronecker

    def _preconditioner_types(self) -> list[Preconditioner]:
        return [self._kronecker]
