"""The exact damped natural gradient of the mini-batch (DESIGN §8; Benzing 2022 §2.1 and App. I, after Ren &
Goldfarb 2019 and Agarwal et al. 2019): U = (λI + F)⁻¹ g, then torch.optim.SGD's step on U (DESIGN §1.4's
epilogue, no grafting).

F is the Fisher of the current mini-batch of B samples, F = G Gᵀ with one column of G per datapoint:
    empirical    g_i / √B            g_i the gradient of sample i's cross-entropy at its true label
    mc           g_i / √B            at one label per sample drawn from the model's p(·|x_i)
    full         g_ic · √(p_ic / B)  at every class c: K = B·C columns (else K = B)
Woodbury turns the P×P system into a K×K one:
    (λI + G Gᵀ)⁻¹ g = (g − G·c) / λ,    c = (λI + GᵀG)⁻¹ Gᵀg,
so a step needs the Gram GᵀG, the products Gᵀg and one combination G·c, each a sum over layers; the K×K
system goes through the package's damped Cholesky inverse with its fallbacks (float64 retry, then I/λ),
so no number raises. block_diagonal=True zeroes F's blocks between layers: the same per layer, each with
its own c.

Per layer, column k's gradient of [Ŵ | b] (DESIGN §1.1) is Ĝ_k = Σ_r e_kr a_rᵀ over its sample's R output
positions r: a_r the patch vectors (with the bias 1), e_kr the output gradients. So, from the layer's
input patches A and its output gradients E, without per-example gradients:
    Gram    Ĝ_k·Ĝ_l = Σ_{r,s} (a_r·a_s)(e_kr·e_ls)    the position-pair form; Linear (R = 1): (AAᵀ)∘(EEᵀ)
    Gᵀg     Ĝ_k·Ĝ   = Σ_r e_kr·(Ĝ a_r)
    G·c     Σ_k c_k Ĝ_k = Σ_r (Σ_k c_k e_kr) a_rᵀ    what one backward of the output gradients Σ_k c_k e_k
                                                     computes for the weight, taken from the kept E and A
                                                     (the graph need not live until step())
Cost per group (O outputs per group, D' the patch length, multiply-adds):
    pair form      B²R²·D' + K²R²·(O + 1), in blocks of b samples whose b·R·K·R pair products fit
    per example    K·R·O·D' to form the K gradients, K²·O·D' for their Gram, K·O·D' memory
Linear layers (R = 1) always take the pair form: B²D' + K²(O + 1) against K²·O·D'. For a convolution R²
competes with O·D', and either may win (B = K = 100): MNIST-1D's CNN's first conv (R = 19, D' = 6, O = 25)
costs 1.2e8 paired and 1.8e6 per example, its third (R = 5, D' = 76) 2.6e7 against 2.0e7, while a 3×3 conv
of 512 channels on a 4×4 map (a ResNet's last stage) costs 1.3e10 paired and 2.7e10 per example, whose
gradients would also hold 2.4e8 values. So each layer takes the cheaper form at each step, per example only
where its K·O·D' values fit in WORKSPACE_ELEMENTS.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd.graph import get_gradient_edge
from torch.optim import Optimizer
from torch.optim.optimizer import required

from . import ops
from .arguments import check_model_and_damping, check_param_group
from .diagnostics import Diagnostics
from .geometry import CONV_TYPES, batch_size, layer_patches_input, patch_input
from .kfac import LabelGenerators, predictive_probabilities
from .layers import Layer, find_layers
from .observe import Hooks, LayerHook, in_backward, in_transform, watchable_output
from .linalg import KEPT_PREVIOUS, RETRIED, stat_dtype
from .reference import patch_rows_, sgd_step_
from .state import OWN_ENTRIES

FISHERS = ("mc", "full", "empirical")
DIAGNOSTICS = ("cholesky_retries", "cholesky_failures")
# Values a layer's Gram may hold in temporaries at once: the per-example form only where its K gradients
# fit, the pair form in blocks of samples that fit (at least one sample per block).
WORKSPACE_ELEMENTS = 1 << 25


class NaturalGradient(Optimizer):
    """The exact damped natural gradient of each mini-batch, U = (λI + F)⁻¹ g (DESIGN §8), through Woodbury
    on the per-datapoint gradients, then stepped like torch.optim.SGD with decoupled weight decay.

    Use (the Fisher needs the logits, so it is recorded between the forward and your backward, as for
    `fastfoof.KFAC(fisher="mc")`):

        opt = fastfoof.NaturalGradient(model, lr=0.1, damping=1e-3, fisher="mc")
        for x, y in loader:
            opt.zero_grad()
            logits = model(x)                       # [B, C]
            opt.backward_fisher(logits, y)          # the Fisher's output gradients, .grad untouched
            F.cross_entropy(logits, y).backward()   # g: the gradient of your loss (a mean over the B samples)
            opt.step()

    `step(closure)` works as for any torch optimizer, with the closure doing the four lines above.

    Args:
        model: the module whose Linear/Conv1d/2d/3d layers are observed through forward hooks. Its forward
            must treat samples independently (per-sample gradients: no BatchNorm in training mode).
        params: parameters or param-group dicts (default `model.parameters()`); each must be the weight or
            bias of one of the model's Linear/Conv layers (ValueError otherwise: a BatchNorm, LayerNorm or
            embedding parameter has no per-example gradient here). Parameters whose `.grad` is None at
            step() are left out of F and g, and not stepped.
        lr, momentum, dampening, nesterov, weight_decay: as torch.optim.SGD, per param group (weight
            decay decoupled, as AdamW).
        damping: λ > 0.
        fisher: "mc" (one label per sample drawn from softmax(logits), from the optimizer's own generator,
            whose state `state_dict()` carries), "full" (every class, weighted by its probability: B·C
            columns), or "empirical" (the labels given to `backward_fisher`). The loss is cross-entropy.
        block_diagonal: F with the blocks between layers zeroed (a layer: its weight and bias).

    `diagnostics`: counts of K×K factorisations that were retried in float64 (`cholesky_retries`) and
    that failed there too and took U = (g − G Gᵀg/λ)/λ (`cholesky_failures`: non-finite numbers).
    """

    KIND = "NaturalGradient"

    def __init__(self, model: nn.Module, params=None, *, lr: float = required, damping: float = required,
                 fisher: str = "mc", block_diagonal: bool = False, momentum: float = 0.0,
                 dampening: float = 0.0, nesterov: bool = False, weight_decay: float = 0.0):
        for name, value in (("lr", lr), ("damping", damping)):
            if value is required:
                raise TypeError(f"{self.KIND}(): missing the keyword argument '{name}'")
        check_model_and_damping(model, damping)
        if fisher not in FISHERS:
            raise ValueError(f"fisher: expected one of {FISHERS}, got {fisher!r}")
        if not isinstance(block_diagonal, bool):
            raise ValueError(f"block_diagonal: expected True or False, got {block_diagonal!r}")
        self.damping = damping
        self.fisher = fisher
        self.block_diagonal = block_diagonal
        self.layers, _ = find_layers(model, None)
        # what each parameter is: (layer, "weight" | "bias"); read by add_param_group, which torch's
        # __init__ calls
        self._roles: dict[torch.Tensor, tuple[Layer, str]] = {}
        for layer in self.layers:
            self._roles[layer.weight] = (layer, "weight")
            bias = layer.module.bias
            if bias is not None and all(module.bias is bias for module in layer.modules):
                self._roles[bias] = (layer, "bias")
        self._names = {p: name for name, p in model.named_parameters()}
        defaults = dict(lr=lr, momentum=momentum, dampening=dampening, nesterov=nesterov, weight_decay=weight_decay)
        super().__init__(model.parameters() if params is None else params, defaults)
        self._hooks = Hooks(self)  # they hold the optimizer weakly (fastfoof.observe)
        for layer in self.layers:
            for module in layer.modules:
                self._hooks.add(module.register_forward_hook(LayerHook(self, "_record", layer), with_kwargs=True))
        self._forwards: dict[int, list] = {}  # id(layer) -> [(module, input, output edge)] since backward_fisher
        self._fisher_data: dict[int, list] | None = None  # id(layer) -> [(module, input, E)] for the next step
        self._fisher_batch = 0  # B of the logits they came from
        self._generators = LabelGenerators()  # mc's
        self._diagnostics = Diagnostics(self.KIND, DIAGNOSTICS)

    def add_param_group(self, param_group: dict) -> None:
        check_param_group({**self.defaults, **param_group})
        params = param_group["params"]
        params = [params] if isinstance(params, torch.Tensor) else list(params)
        foreign = [self._names.get(p, f"a {tuple(p.shape)} tensor") for p in params if p not in self._roles]
        if foreign:
            raise ValueError(f"params: {self.KIND} takes the weights and biases of Linear/Conv layers only (their "
                             f"per-example gradients come from the layers' inputs and output gradients); not "
                             f"{', '.join(foreign)}")
        super().add_param_group({**param_group, "params": params})
        # the layers whose forwards count: those with a parameter here
        self._handed = {id(self._roles[p][0]) for group in self.param_groups for p in group["params"]}

    # ---- the Fisher's datapoints --------------------------------------------------------------

    def _record(self, layer: Layer, module: nn.Module, args, kwargs, output):
        """Forward hook: keep a training forward's input and the edge its output's gradient arrives at."""
        if not (module.training and torch.is_grad_enabled()) or in_transform() or in_backward() or \
                id(layer) not in self._handed:
            return None
        output = watchable_output(output)
        if output is None:
            return None
        x = args[0] if args else kwargs["input"]
        self._forwards.setdefault(id(layer), []).append((module, x.detach(), get_gradient_edge(output)))
        return output

    def backward_fisher(self, logits: torch.Tensor, targets: torch.Tensor | None = None) -> torch.Tensor | None:
        """Record the output gradients of the Fisher's datapoints for the next step(): backpropagate the
        cross-entropy of `logits` ([B, C]) to the observed layers' outputs at the labels `fisher` says (mc:
        drawn from softmax(logits); empirical: `targets`; full: every class). Parameters' `.grad` stay
        untouched and the graph is retained for your own backward. Returns the labels used (mc: the
        sampled ones; empirical: `targets`; full: None). A row of non-finite logits draws its label
        uniformly: its gradients are not finite whatever the label, and nothing raises on them."""
        if not (isinstance(logits, torch.Tensor) and logits.dim() == 2):
            raise ValueError(f"logits: expected a [B, C] tensor, got {getattr(logits, 'shape', type(logits))}")
        if self.fisher == "empirical" and targets is None:
            raise ValueError("targets: fisher='empirical' needs the true labels, backward_fisher(logits, targets)")
        forwards, self._forwards = self._forwards, {}
        records = [(key, module, x, edge) for key, entries in forwards.items() for module, x, edge in entries]
        batch, classes = logits.shape
        self._fisher_batch = batch
        dtype = torch.promote_types(logits.dtype, torch.float32)
        with torch.no_grad():
            probs = predictive_probabilities(logits.detach().to(dtype))
            if self.fisher == "mc":
                labels = torch.multinomial(probs, 1, generator=self._generators.on(logits.device)).squeeze(-1)
            else:
                labels = targets if self.fisher == "empirical" else None
            # ∂ cross-entropy(logits_i, c) / ∂ logits_i = p_i − e_c, per column set, scaled so that F = G Gᵀ
            if labels is None:
                eye = torch.eye(classes, dtype=dtype, device=logits.device)
                seeds = [(probs[:, c:c + 1] / batch).sqrt() * (probs - eye[c]) for c in range(classes)]
            else:
                chosen = F.one_hot(labels.to(logits.device, torch.int64), classes).to(dtype)
                seeds = [(probs - chosen) / math.sqrt(batch)]
        columns: list[list[torch.Tensor | None]] = [[] for _ in records]
        if records:
            for seed in seeds:
                grads = torch.autograd.grad(logits, [edge for *_, edge in records], seed.to(logits.dtype),
                                            retain_graph=True, allow_unused=True)
                for column, grad in zip(columns, grads):
                    column.append(grad)
        self._fisher_data = {}
        for (key, module, x, _), grads in zip(records, columns):
            if grads[0] is not None:  # a forward the logits do not depend on is not this batch's
                self._fisher_data.setdefault(key, []).append((module, x, torch.stack(grads)))
        return labels

    # ---- the step ---------------------------------------------------------------------------

    @torch.no_grad()
    def step(self, closure=None):
        """U = (λI + F)⁻¹ g over the parameters that have a gradient, F from the last `backward_fisher`,
        then each parameter's SGD step (DESIGN §8, §1.4)."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        fisher_data, self._fisher_data = self._fisher_data, None
        layers = [layer for layer in self.layers if any(p.grad is not None for p in self._layer_params(layer))]
        if not layers:
            return loss
        missing = [layer.name or type(layer.module).__name__ for layer in layers
                   if fisher_data is None or id(layer) not in fisher_data]
        if missing:
            raise RuntimeError(f"{self.KIND}: no Fisher data for {', '.join(missing)}: call "
                               "opt.backward_fisher(logits, targets) after the forward and before step() (a layer's "
                               "forward must run in training mode with grad enabled, and its output reach the logits)")
        parts = [self._factors(layer, fisher_data[id(layer)]) for layer in layers]
        grams = [layer_gram(a, e) for a, e, _ in parts]
        products = [gradient_products(a, e, g) for a, e, g in parts]
        if self.block_diagonal:
            coefficients = self._solve(grams, products)
        else:
            coefficients = self._solve([sum(grams)], [sum(products)]) * len(parts)  # one c for every layer
        for layer, (a, e, g), c in zip(layers, parts, coefficients):
            update = (g - combination(a, e, c)) / self.damping
            self._step_layer(layer, update)
        return loss

    def _layer_params(self, layer: Layer) -> list[torch.Tensor]:
        """The layer's parameters handed to this optimizer, weight first."""
        return [p for p in (layer.weight, layer.module.bias) if p is not None and p in self._group_of]

    @property
    def _group_of(self) -> dict[torch.Tensor, dict]:
        return {p: group for group in self.param_groups for p in group["params"]}

    def _factors(self, layer: Layer, forwards: list) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(A, E, Ĝ) of a layer: patch vectors [G, B, R, D'] (the columns of the parameters that have a
        gradient: the weight's, then the bias 1), output gradients [G, S, B, R, O] (S column sets of B
        samples) and the gradient [G, O, D'], in the statistics' dtype. A weight called by several
        forwards (shared modules) takes all their positions."""
        params = [p for p in self._layer_params(layer) if p.grad is not None]
        weight = any(p is layer.weight for p in params)
        bias = len(params) == 1 + weight
        dtype = stat_dtype(layer.weight.dtype)
        patches, grads = [], []
        for module, x, e in forwards:
            e = _output_gradients(e, module, layer.groups, dtype)
            if e.shape[2] != self._fisher_batch:
                raise ValueError(f"{self.KIND}: {layer.name or type(module).__name__} saw a batch of {e.shape[2]} "
                                 f"samples, the logits one of {self._fisher_batch}; F is of one mini-batch")
            if weight:
                a = _patches(x, module, layer.groups, layer.dim, dtype)
            else:  # a bias alone: no patch columns
                a = e.new_empty(e.shape[0], *e.shape[2:4], 0)
            if bias:  # the last column of [Ŵ | b]: a trailing 1
                a = torch.cat([a, a.new_ones(*a.shape[:-1], 1)], -1)
            patches.append(a)
            grads.append(e)
        g = torch.cat([p.grad.reshape(layer.groups, layer.rows, -1).to(dtype) for p in params], -1)
        return torch.cat(patches, 2), torch.cat(grads, 3), g

    def _solve(self, grams: list[torch.Tensor], products: list[torch.Tensor]) -> list[torch.Tensor]:
        """c = (λI + M)⁻¹ v for each Gram M and products v, through the damped Cholesky inverse."""
        inverses, status = ops.damped_inverse_with_status([m[None] for m in grams], self.damping)
        codes = torch.cat(status)
        for name, code in zip(DIAGNOSTICS, (RETRIED, KEPT_PREVIOUS)):
            self._diagnostics.count(name, (codes == code).sum())
        self._diagnostics.warn_new(5)  # past step, no_grad and torch.optim's step wrapper
        return [p[0] @ v for p, v in zip(inverses, products)]

    def _step_layer(self, layer: Layer, update: torch.Tensor) -> None:
        """Split a layer's U [G, O, D'] into its parameters and step each (DESIGN §1.4)."""
        group_of = self._group_of
        start = 0
        for p in self._layer_params(layer):
            if p.grad is None:
                continue
            width = layer.dim if p is layer.weight else 1
            u = update[..., start:start + width].reshape(p.shape)
            start += width
            state = self.state[p]
            buf = sgd_step_(p, u, state.get("momentum_buffer"), group_of[p])
            if buf is not None:
                state["momentum_buffer"] = buf

    # ---- the rest of the API ----------------------------------------------------------------

    @property
    def diagnostics(self) -> dict[str, int]:
        return self._diagnostics.as_dict()

    def remove_hooks(self) -> None:
        """Detach the forward hooks: backward_fisher sees no layer afterwards."""
        self._hooks.remove()
        self._forwards.clear()

    def state_dict(self) -> dict:
        """torch's state dict (momentum buffers, param groups), and in each param group the optimizer's own
        entries: its kind, diagnostics and generator states (a resumed mc run draws the same labels)."""
        state_dict = super().state_dict()
        own = {"kind": self.KIND, "diagnostics": self.diagnostics,
               "generators": self._generators.states(next(iter(self._group_of)).device)}
        for group in state_dict["param_groups"]:
            group[OWN_ENTRIES] = own
        return state_dict

    def load_state_dict(self, state_dict: dict) -> None:
        """Load a state dict saved by `NaturalGradient.state_dict()`; any other raises ValueError."""
        groups = [dict(group) for group in state_dict["param_groups"]]
        own = [group.pop(OWN_ENTRIES, None) for group in groups][0] if groups else None
        if own is None or own.get("kind") != self.KIND:
            saved = "another optimizer" if own is None else own.get("kind")
            raise ValueError(f"state_dict: saved by {saved}, not {self.KIND}")
        super().load_state_dict({**state_dict, "param_groups": groups})
        self._diagnostics.load(own["diagnostics"])
        self._generators.load(own["generators"])


def _patches(x: torch.Tensor, module: nn.Module, groups: int, dim: int, dtype: torch.dtype) -> torch.Tensor:
    """[G, B, R, D]: the patch vectors of input `x` of `module` per sample (DESIGN §1.1)."""
    batch = batch_size(x, module)
    x, geom = patch_input(layer_patches_input(x, module), module)  # conv: [B, C, ...]; Linear: [B·R, F]
    a = torch.empty(groups, dim, x.shape[0] * geom.positions, dtype=dtype, device=x.device)
    patch_rows_(a, x, geom)
    return a.view(groups, dim, batch, -1).permute(0, 2, 3, 1)


def _output_gradients(e: torch.Tensor, module: nn.Module, groups: int, dtype: torch.dtype) -> torch.Tensor:
    """[G, S, B, R, O/G] from the output gradients [S, *output shape] of one forward."""
    sets = e.shape[0]
    if isinstance(module, CONV_TYPES):
        nd = len(module.kernel_size)
        if e.dim() == nd + 2:  # an unbatched input
            e = e.unsqueeze(1)
        e = e.reshape(sets, e.shape[1], groups, e.shape[2] // groups, -1)  # [S, B, G, O/G, R]
        return e.permute(2, 0, 1, 4, 3).to(dtype)
    batch = e.shape[1] if e.dim() > 2 else 1
    return e.reshape(1, sets, batch, -1, e.shape[-1]).to(dtype)


def per_example_cheaper(a: torch.Tensor, e: torch.Tensor) -> bool:
    """Whether a layer's Gram costs fewer multiply-adds through its per-example gradients than in the
    position-pair form (module docstring), with those gradients fitting in WORKSPACE_ELEMENTS."""
    groups, sets, batch, positions, outputs = e.shape
    dim = a.shape[-1]
    columns = sets * batch
    if groups * columns * outputs * dim > WORKSPACE_ELEMENTS:
        return False
    paired = (batch * positions) ** 2 * dim + (columns * positions) ** 2 * (outputs + 1)
    per_example = columns * positions * outputs * dim + columns ** 2 * outputs * dim
    return per_example < paired


def layer_gram(a: torch.Tensor, e: torch.Tensor) -> torch.Tensor:
    """GᵀG of one layer, [K, K] with K = S·B (column s·B + i: set s of sample i), from its patch vectors
    `a` [G, B, R, D'] and output gradients `e` [G, S, B, R, O]."""
    groups, sets, batch, positions, outputs = e.shape
    columns = sets * batch
    if per_example_cheaper(a, e):
        grads = torch.einsum("gsbro,gbrd->gsbod", e, a).reshape(groups, columns, -1)
        return (grads @ grads.mT).sum(0)
    a_all = a.flatten(1, 2)  # [G, BR, D']
    e_all = e.flatten(1, 3)  # [G, SBR, O]
    gram = a.new_empty(sets, batch, sets, batch)
    step = max(1, WORKSPACE_ELEMENTS // (groups * sets * sets * batch * positions * positions))
    for start in range(0, batch, step):
        rows = slice(start, start + step)
        count = min(step, batch - start)
        # (a_ir·a_js) and (e_kr·e_ls) for the block's samples i (every set) against all
        patch_pairs = (a[:, rows].flatten(1, 2) @ a_all.mT).view(groups, 1, count, positions, 1, batch, positions)
        grad_pairs = (e[:, :, rows].flatten(1, 3) @ e_all.mT).view(groups, sets, count, positions, sets, batch,
                                                                  positions)
        gram[:, rows] = (grad_pairs * patch_pairs).sum((0, 3, 6))
    return gram.view(columns, columns)


def gradient_products(a: torch.Tensor, e: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """Gᵀg of one layer, [K]: Σ_r e_kr·(Ĝ a_r) for its gradient `g` [G, O, D']."""
    outputs = a @ g.mT.unsqueeze(1)  # [G, B, R, O]: Ĝ a_r
    return torch.einsum("gsbro,gbro->sb", e, outputs).flatten()


def combination(a: torch.Tensor, e: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """G·c of one layer, [G, O, D']: the weight gradient of the output gradients Σ_k c_k e_k."""
    groups, sets, batch = e.shape[:3]
    weighted = torch.einsum("sb,gsbro->gbro", c.view(sets, batch), e)
    return weighted.flatten(1, 2).mT @ a.flatten(1, 2)
