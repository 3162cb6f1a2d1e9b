"""What FOOF and KFAC share: layers observed through hooks, running statistics on DESIGN §1.5's
schedule, batched inversions with their fallbacks, the grouped SGD-style update, state, GradScaler,
DDP and warm-up. A subclass says which statistics it keeps and what preconditioner it makes of them.
"""
from __future__ import annotations

import contextlib
import functools
import numbers
import sys
import warnings
import weakref
from dataclasses import dataclass
from itertools import chain
from typing import Callable

import torch
import torch._dynamo
from torch import nn
from torch.optim import Optimizer
from torch.optim.optimizer import required

from . import distributed, ops, sharded
from .geometry import batch_size
from .layers import Block, Layer, Skip, find_layers
from .observe import Hooks, LayerHook, in_checkpoint_recompute, in_transform, layer_input
from .linalg import KEPT_PREVIOUS, OK, aligned, stat_dtype
from .reference import GRAFTS

DIAGNOSTICS = ("dropped_stats", "cholesky_retries", "cholesky_failures")
# state_dict(): the optimizer's own entries in each param group, and, in a parameter's state, the keys whose
# values only stand in for entries it has not made yet
OWN_ENTRIES = "fastfoof"
PLACEHOLDERS = "fastfoof_placeholders"


def _is_number(value) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _is_int(value) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def on_itself(method):
    """Run `method` on the optimizer itself when it is called through a wrapper that forwards attribute
    access: Lightning's LightningOptimizer takes the optimizer's class as a base and forwards what it lacks,
    so `wrapper.warm_up()` ran FOOF's code with the wrapper as `self`, and the state it wrote (the warm-up
    flag, the step count) stayed on the wrapper, out of the hooks' sight."""

    @functools.wraps(method)
    def run(self, *args, **kwargs):
        itself = getattr(self, "_itself", None)  # absent while the optimizer is being built
        return method(self if itself is None else itself(), *args, **kwargs)

    return run


@dataclass(frozen=True)
class Statistic:
    """A running second moment of a layer: its pending sum lives on the Layer (`stat`, `samples`
    attributes), its EMA and weight n in the optimizer state (`ema`, `count` keys)."""

    stat: str
    samples: str
    ema: str
    count: str
    shape: Callable[[Layer], tuple]  # [groups, d, d]


# FOOF's Σ and KFAC's A: the layer's input patches (with the bias row)
INPUTS = Statistic("stat", "samples", "ema", "ema_count", lambda layer: (layer.groups, layer.dim_p, layer.dim_p))


class KroneckerOptimizer(Optimizer):
    """The optimizer core shared by `fastfoof.FOOF` and `fastfoof.KFAC` (see those for the arguments).

    A subclass sets `STATISTICS` and `KIND`, and implements `_preconditioners` (the inversion round's
    math), `_ready` and `_prepare_block` (how a layer's block is preconditioned at the update).
    """

    STATISTICS: tuple[Statistic, ...] = (INPUTS,)
    KIND = ""  # written into state_dict: a state dict loads only into the kind that saved it

    def __init__(self, model: nn.Module, params=None, *, lr: float = required, damping: float = 1.0,
                 momentum: float = 0.0, dampening: float = 0.0, nesterov: bool = False,
                 weight_decay: float = 0.0, ema_decay: float = 0.95, inv_period: int = 100,
                 stats_steps: int = 10, precondition_bias: bool = True, skip: Skip = None,
                 backend: str = "auto", stats_batch: int | None = None,
                 rank: int | None = None, graft: str | None = "sgd", process_group=None):
        if lr is required:
            raise TypeError(f"{self.KIND}(): missing the keyword argument 'lr' (the SGD learning rate you use)")
        if not isinstance(model, nn.Module):
            raise ValueError(f"model: expected an nn.Module, got {type(model).__name__}")
        if not (_is_number(damping) and damping > 0):
            raise ValueError(f"damping: must be a number > 0, got {damping!r}")
        if not (_is_number(ema_decay) and 0 <= ema_decay < 1):
            raise ValueError(f"ema_decay: must be a number in [0, 1), got {ema_decay!r}")
        if not (_is_int(inv_period) and inv_period >= 1):
            raise ValueError(f"inv_period: must be an integer ≥ 1, got {inv_period!r}")
        if not (_is_int(stats_steps) and 1 <= stats_steps <= inv_period):
            raise ValueError(f"stats_steps: must be an integer in [1, inv_period={inv_period}], got {stats_steps!r}")
        if stats_batch is not None and not (_is_int(stats_batch) and stats_batch >= 1):
            raise ValueError(f"stats_batch: must be None or an integer ≥ 1, got {stats_batch!r}")
        if rank is not None and not (_is_int(rank) and rank >= 1):
            raise ValueError(f"rank: must be None or an integer ≥ 1, got {rank!r}")
        if graft not in GRAFTS:
            raise ValueError(f"graft: expected one of {GRAFTS}, got {graft!r}")
        self.backend = ops.check_backend(backend)
        # the Triton kernels' tables and workspaces for this optimizer's layers, kept between its steps
        self.kernel_plans = ops.KernelPlans()
        defaults = dict(lr=lr, momentum=momentum, dampening=dampening, nesterov=nesterov,
                        weight_decay=weight_decay)
        super().__init__(model.parameters() if params is None else params, defaults)
        devices = {p.device for group in self.param_groups for p in group["params"]}
        if len(devices) > 1:
            raise ValueError(f"params: {self.KIND} needs all parameters on one device, found {sorted(map(str, devices))}")
        for device in devices:
            ops.resolve_backend(self.backend, device)  # a forced backend that cannot run here fails now
        self.damping = damping
        self.ema_decay = ema_decay
        self.inv_period = inv_period
        self.stats_steps = stats_steps
        self.stats_batch = stats_batch
        self.precondition_bias = precondition_bias
        self.rank = rank
        self.graft = graft
        # under FSDP2 the ranks of the parameters' mesh share statistics and inversions
        mesh_group = sharded.mesh_group(p for group in self.param_groups for p in group["params"])
        self.process_group = process_group if process_group is not None else mesh_group
        self.layers, excluded = find_layers(model, skip)
        # Hooks hold this optimizer weakly: it is collected when unreferenced, and its hooks with it.
        self._hooks = Hooks(self)
        for layer in self.layers:
            for module in layer.modules:
                self._hooks.add(module.register_forward_hook(LayerHook(self, "_record", layer), with_kwargs=True))
        self._grad_hooked: set[int] = set()  # id(layer) of layers whose weight has the grad hook
        if torch._dynamo.config.skip_nnmodule_hook_guards and torch._dynamo.utils.counters["stats"]["unique_graphs"]:
            # torch.compile does not guard on module hooks: code compiled before these hooks existed would
            # run without them. Drop compiled code so that it is traced again, with the hooks.
            torch.compiler.reset()
        self._itself = weakref.ref(self)  # what a forwarding wrapper finds (`on_itself`)
        self._steps = 0  # t of DESIGN §1.5: step() calls so far
        self._warming_up = False
        self._counters = torch.zeros(len(DIAGNOSTICS), dtype=torch.int64)  # on the device: read once per round
        self._warned: set[str] = set()
        self._blocks_key = None
        self._assign_params()
        self._refresh_blocks()
        if excluded:  # their parameters step without P; one line per reason (a model has many alike)
            reasons: dict[str, list[str]] = {}
            for name, why in excluded:
                reasons.setdefault(why, []).append(name or type(model).__name__)
            listed = "; ".join(f"{why}: {', '.join(names)}" for why, names in reasons.items())
            warnings.warn(f"{self.KIND} does not precondition these layers, which step with {self._plain_update}: "
                          f"{listed}", RuntimeWarning, stacklevel=3)

    @staticmethod
    def _check_group(group: dict) -> None:
        for name in ("lr", "momentum", "dampening", "weight_decay"):
            value = group[name]
            if not (_is_number(value) or (isinstance(value, torch.Tensor) and value.numel() == 1)) or not value >= 0:
                raise ValueError(f"{name}: must be a number ≥ 0, got {value!r}")
        if group["nesterov"] and (group["momentum"] <= 0 or group["dampening"] != 0):
            raise ValueError("nesterov: requires momentum > 0 and dampening = 0")

    @on_itself
    def add_param_group(self, param_group: dict) -> None:
        self._check_group({**self.defaults, **param_group})  # before it joins param_groups
        super().add_param_group(param_group)
        if hasattr(self, "layers"):
            self._assign_params()

    def _assign_params(self) -> None:
        """Which layers' weights (and biases, as the row of [Ŵ | b]) are handed to the optimizer."""
        self._group_of = {p: group for group in self.param_groups for p in group["params"]}
        self._sharded = any(map(sharded.is_sharded, self._group_of))
        for layer in self.layers:
            bias = layer.module.bias  # a bias row only where every module of a shared weight adds this bias
            layer.handed = layer.weight in self._group_of
            layer.bias_row = self.precondition_bias and bias is not None and bias in self._group_of and \
                all(module.bias is bias for module in layer.modules)
        self._blocks_key = None

    def _refresh_blocks(self) -> None:
        """Pair each active layer's weight (and bias) in a block; the rest are single blocks. Rebuilt
        only when the set of active layers changed (a weight frozen or unfrozen, a new param group)."""
        key = tuple(layer.active for layer in self.layers)
        if key == self._blocks_key:
            return
        self._blocks_key = key
        self._active: list[Layer] = [layer for layer in self.layers if layer.active]
        for layer in self._active:  # a weight that does not require grad cannot take the hook
            if id(layer) not in self._grad_hooked and self._hooks:
                self._grad_hooked.add(id(layer))
                self._hooks.add(layer.weight.register_post_accumulate_grad_hook(
                    LayerHook(self, "_take_statistics", layer)))
        self._blocks: list[Block] = []
        in_layer = set()
        for layer in self._active:
            params = [layer.weight, layer.module.bias] if layer.bias_row else [layer.weight]
            in_layer.update(params)
            self._blocks.append(Block(params, [self._group_of[p] for p in params], layer.groups))
        self._blocks += [Block([p], [group]) for p, group in self._group_of.items() if p not in in_layer]
        self._layer_of_block = {id(b): layer for b, layer in zip(self._blocks, self._active)}

    @property
    def _plain_update(self) -> str:
        """How a parameter without a preconditioner steps (DESIGN §1.4), for warnings."""
        return "their plain gradient (U = G, as SGD)" if self.graft else "U = G/λ"

    def _low_rank(self, layer: Layer) -> bool:
        """Whether the layer's input factor is kept as its top `rank` eigenpairs (DESIGN §1.3)."""
        return self.rank is not None and layer.dim_p > 2 * self.rank

    def _has_input_factor(self, layer: Layer) -> bool:
        """Whether the layer's state holds its input factor's preconditioner for its current D': P
        (KFAC exact: Q_Aᵀ), or the top eigenvectors of a low-rank layer."""
        factor = self.state[layer.weight].get("top_eigvecs" if self._low_rank(layer) else "precond")
        return factor is not None and factor.shape[1] == layer.dim_p

    def _top_eigenpairs_like(self, ema: torch.Tensor) -> dict:
        """Empty (s, Q) of a low-rank layer with the input statistic `ema`, for `_preconditioners_like`."""
        return {"top_eigvals": ema.new_empty(ema.shape[0], self.rank),
                "top_eigvecs": ema.new_empty(ema.shape[0], ema.shape[-1], self.rank)}

    # ---- what a subclass defines ------------------------------------------------------------

    def _ready(self, layer: Layer) -> bool:
        """Whether the layer has a preconditioner computed from observed statistics of its shape."""
        raise NotImplementedError

    def _preconditioners(self, layers: list[Layer], states: list[dict]) -> tuple[list[dict], list[torch.Tensor]]:
        """The inversion round's math for the given layers: their new preconditioner tensors (a dict
        of state entries per layer) and a status code tensor per layer (OK, RETRIED, KEPT_PREVIOUS)."""
        raise NotImplementedError

    def _prepare_block(self, block: Block, layer: Layer, state: dict) -> None:
        """Set what the update applies to a layer's block: `precond` (U = Ĝ·precond), and `grad`
        when the gradient is transformed first."""
        raise NotImplementedError

    def _input_scale(self, x: torch.Tensor, module: nn.Module) -> float:
        """Weight of one forward's Σ a aᵀ in the input statistic (FOOF: 1)."""
        return 1.0

    def _observe(self, layer: Layer, module: nn.Module, x: torch.Tensor, output, batch: int) -> torch.Tensor | None:
        """An observed eager training forward of `layer` by `module` (one of its modules): `x` its input
        (`layer_input`), `output` its output, `batch` the forward's whole batch size; returns what the
        module should return instead of `output`, or None. FOOF takes the input statistic; KFAC also
        watches the output's gradient. A forward inside backward here is a reentrant checkpoint's re-run,
        which stands for its original (run under no_grad, so not observed)."""
        self._take_input(layer, module, x)
        return None

    # ---- statistics -------------------------------------------------------------------------

    def _observing(self, layer: Layer) -> bool:
        """Whether the layer's forwards now feed the statistic of the coming step (DESIGN §1.5)."""
        if self._warming_up or not self._ready(layer):
            return True
        r = (self._steps + 1) % self.inv_period
        return r == 0 or r > self.inv_period - self.stats_steps

    def _record(self, layer: Layer, module: nn.Module, args, kwargs, output) -> torch.Tensor | None:
        """Forward hook of a layer (DESIGN §1.2). Eager: an observed forward's statistic is computed
        here, so no input is held past the hook (nor changed in place before it is read). Compiled:
        the input is recorded every step and its statistic computed when the weight's gradient is
        ready, so that the graph holds no statistics op and no branch on t; it is recorded as the
        layer computes with it (`layer_input`), which autograd keeps for the weight's gradient anyway."""
        layer.called = True
        if not (module.training and torch.is_grad_enabled() and layer.active):
            return None
        x = args[0] if args else kwargs["input"]
        if torch.compiler.is_compiling():
            layer.inputs.append((module, layer_input(x, module, self.stats_batch)))
        elif not in_transform() and not in_checkpoint_recompute() and self._observing(layer):
            return self._observe(layer, module, layer_input(x, module, self.stats_batch), output,
                                 batch_size(x, module))
        return None

    def _take_input(self, layer: Layer, module: nn.Module, x: torch.Tensor) -> None:
        self._accumulate(layer, INPUTS, x, module, layer.bias_row, self._input_scale(x, module),
                         batch_size(x, module))

    def _take_statistics(self, layer: Layer, weight: torch.Tensor | None = None) -> None:
        """Turn the inputs a compiled forward recorded into the layer's pending statistic if the
        coming step observes them, else drop them. Runs as the weight's post-accumulate-grad hook
        (`weight` is the hook's argument), so that the inputs are released during backward, and at
        step() for forwards that had no backward."""
        inputs = layer.take_inputs()
        if inputs and layer.active and self._observing(layer):
            for module, x in inputs:
                self._take_input(layer, module, x)

    def _accumulate(self, layer: Layer, statistic: Statistic, x: torch.Tensor, module: nn.Module, bias: bool,
                    alpha: float, samples: int) -> None:
        """Add α·Σ a aᵀ over the patch vectors of `x` (an input of `module`) to a pending statistic."""
        dtype, device = stat_dtype(layer.weight.dtype), layer.weight.device
        shape = statistic.shape(layer)
        stat = getattr(layer, statistic.stat)
        count = getattr(layer, statistic.samples)
        if stat is None or tuple(stat.shape) != shape:
            count = 0  # a bias row came or went since these samples: they are dropped
        if not count:
            if stat is None or tuple(stat.shape) != shape or stat.dtype != dtype or stat.device != device:
                stat = torch.empty(shape, dtype=dtype, device=device)
        elif stat.dtype != dtype or stat.device != device:
            stat = stat.to(device, dtype)  # the model moved between two forwards
        with torch.no_grad(), torch.autocast(device.type, enabled=False):  # statistics stay in float32
            ops.patch_gram_(stat, x.to(device), module, alpha=alpha, beta=1.0 if count else 0.0, bias=bias,
                            backend=self.backend)
        setattr(layer, statistic.stat, stat)
        setattr(layer, statistic.samples, count + samples)

    def _fold_statistics(self, found_inf: torch.Tensor | None = None, grad_scale: torch.Tensor | None = None) -> int:
        """Σ ← mΣ + (1−m)C for every statistic observed since the last step; C = Σ aaᵀ / Σ B (none
        where found_inf ≠ 0; `grad_scale`: GradScaler's scale of this step's gradients). Returns the
        number of statistics offered to the fold."""
        for layer in self._active:
            self._take_statistics(layer)  # forwards without a backward
        emas, counts, stats, scales = [], [], [], []
        for layer in self._active:
            for statistic in self.STATISTICS:
                samples, stat = getattr(layer, statistic.samples), getattr(layer, statistic.stat)
                if samples and tuple(stat.shape) == statistic.shape(layer):
                    state = self._layer_state(layer)
                    emas.append(state[statistic.ema])
                    counts.append(state[statistic.count])
                    stats.append(stat)
                    scales.append(self._fold_scale(layer, statistic))
        if emas:
            self._count("dropped_stats", ops.fold_statistics_(emas, counts, stats, scales, self.ema_decay,
                                                              found_inf=found_inf, backend=self.backend,
                                                              plans=self.kernel_plans))
        self._clear_statistics()
        return len(emas)

    def _fold_scale(self, layer: Layer, statistic: Statistic) -> float:
        """s in C = s·(pending sum): the mean over the samples taken."""
        return 1.0 / getattr(layer, statistic.samples)

    def _clear_statistics(self) -> None:
        for layer in self.layers:
            layer.clear()

    def _layer_state(self, layer: Layer) -> dict:
        """The layer's optimizer state, with a zero EMA (weight n = 0) for each statistic it has none
        of the layer's shape for (which also drops its preconditioner)."""
        state = self.state[layer.weight]
        dtype, device = stat_dtype(layer.weight.dtype), layer.weight.device
        for statistic in self.STATISTICS:
            shape = statistic.shape(layer)
            if statistic.ema not in state or tuple(state[statistic.ema].shape) != shape:
                state[statistic.ema] = torch.zeros(shape, dtype=dtype, device=device)
                state[statistic.count] = torch.zeros((), dtype=dtype, device=device)
                self._forget_preconditioner(layer)
        return state

    def _forget_preconditioner(self, layer: Layer) -> None:
        state = self.state[layer.weight]
        for key in [k for k in state if k not in self._statistic_keys() and k != "momentum_buffer"]:
            del state[key]

    def _statistic_keys(self) -> set[str]:
        return {key for s in self.STATISTICS for key in (s.ema, s.count)}

    def _follow_params(self) -> None:
        """State tensors follow their parameter's device and dtype (DESIGN §1.2: float64 statistics for
        float64 parameters) after `model.to(...)`, `model.double()` and the like: converted in place."""
        for p, state in self.state.items():
            dtype = stat_dtype(p.dtype)
            for key, value in state.items():
                if isinstance(value, torch.Tensor) and value.is_floating_point() and \
                        (value.dtype != dtype or value.device != p.device):
                    state[key] = value.to(p.device, dtype)

    # ---- inversion --------------------------------------------------------------------------

    def _invert(self, layers: list[Layer]) -> None:
        """Preconditioners of the given layers from their EMAs, all at once (DESIGN §1.3).

        Across ranks, the EMAs are averaged first and each rank inverts its share of the layers,
        then shares the results.
        """
        states = [self._layer_state(layer) for layer in layers]
        group = distributed.active_group(self.process_group)
        if group is not None:
            distributed.average_(chain.from_iterable((s[st.ema], s[st.count]) for s in states
                                                     for st in self.STATISTICS), group)
        costs = [sum(s[st.ema].shape[0] * s[st.ema].shape[-1] ** 3 for st in self.STATISTICS) for s in states]
        owner = distributed.owners(costs, group)
        mine = [i for i, r in enumerate(owner) if r == distributed.rank(group)]
        results, status = self._preconditioners([layers[i] for i in mine], [states[i] for i in mine])
        codes: list[torch.Tensor | None] = [None] * len(layers)
        for i, result, code in zip(mine, results, status):
            states[i].update(result)
            codes[i] = code
        if group is not None:
            # every rank holds buffers of the same shapes for what the others computed
            template = self._preconditioners_like(layers, states)
            for i in range(len(layers)):
                if codes[i] is None:
                    states[i].update(template[i][0])
                    codes[i] = template[i][1]
            keys = [sorted(template[i][0]) for i in range(len(layers))]
            tensors = [states[i][k] for i in range(len(layers)) for k in keys[i]] + codes
            owners = [owner[i] for i in range(len(layers)) for _ in keys[i]] + owner
            distributed.share_(tensors, owners, group)
        if codes:
            codes = torch.cat(codes)
            self._count("cholesky_retries", (codes != OK).sum())
            self._count("cholesky_failures", (codes == KEPT_PREVIOUS).sum())
        self._warn_new_diagnostics()

    def _preconditioners_like(self, layers: list[Layer], states: list[dict]) -> list[tuple[dict, torch.Tensor]]:
        """Empty tensors shaped as `_preconditioners`' results, for the layers another rank inverts."""
        raise NotImplementedError

    def _invert_observed(self, layers: list[Layer]) -> None:
        """Preconditioners for layers that may have none yet; a layer with an empty EMA (nothing
        observed, every statistic dropped, or a skipped step) stays without one and is observed
        again (DESIGN §1.5)."""
        self._invert(layers)
        counts = torch.stack([self.state[layer.weight][st.count].to(self._counters.device)
                              for layer in layers for st in self.STATISTICS]).reshape(len(layers), -1)
        for layer, observed in zip(layers, (counts > 0).all(1).tolist()):
            if not observed:
                self._forget_preconditioner(layer)

    # ---- diagnostics ------------------------------------------------------------------------

    def _count(self, name: str, value: torch.Tensor) -> None:
        self._counters = self._counters.to(value.device)
        self._counters[DIAGNOSTICS.index(name)] += value

    def _warn_once(self, name: str, message: str) -> None:
        if name not in self._warned:
            self._warned.add(name)
            warnings.warn(message, RuntimeWarning, stacklevel=4)

    def _warn_new_diagnostics(self) -> None:
        for name, value in self.diagnostics.items():
            if value:
                self._warn_once(name, f"{self.KIND}: {name} = {value} (see {self.KIND}.diagnostics and DESIGN §1.3)")

    @property
    def diagnostics(self) -> dict[str, int]:
        """Counters of DESIGN §5: dropped_stats, cholesky_retries, cholesky_failures."""
        return dict(zip(DIAGNOSTICS, self._counters.tolist()))

    # ---- the step ---------------------------------------------------------------------------

    @property
    def _step_supports_amp_scaling(self) -> bool:
        """True: GradScaler hands this optimizer `grad_scale` and `found_inf` instead of unscaling the grads
        and reading found_inf on the host to skip step() (DESIGN §1.5). FOOF takes grads that were unscaled
        before step() too (`scaler.unscale_(opt)` to clip them: grad_scale is then None). Lightning's
        precision plugins read this flag as "its grads cannot be unscaled before step" and refuse gradient
        clipping, so they alone are told False: they unscale (on the device) and clip, and GradScaler's
        step, which reads True, still hands FOOF the device-side found_inf."""
        caller = sys._getframe(1)  # the function whose getattr asked
        return not (caller.f_code.co_name == "_optimizer_handles_unscaling"
                    and caller.f_globals.get("__name__", "").startswith(("lightning", "pytorch_lightning")))

    # Under torch.compile (`torch.compile(opt.step)`, or a compiled training step that calls it) the step
    # runs eagerly: dynamo dropped its host-side state changes (the step count), and eager is exact.
    @on_itself
    @torch.compiler.disable
    @torch.no_grad()
    def step(self, closure=None):
        """One step (the paper's Algorithm 1 with DESIGN §1.5's schedule): fold this step's
        statistics, give layers their first preconditioner, update, invert every T steps."""
        if closure is None and not self.state and self._makes_state_for_a_checkpoint():
            return None
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self._steps += 1  # t counts every call, steps that GradScaler skips included (DESIGN §1.5)
        self._refresh_blocks()
        self._follow_params()
        self._warn_bypassed()
        # GradScaler's flag of non-finite gradients: the fold and the update are masked on the device,
        # except where this step would create momentum buffers, which a skipped step must not leave
        found_inf, grad_scale = getattr(self, "found_inf", None), getattr(self, "grad_scale", None)
        update = not (found_inf is not None and self._creates_buffers() and found_inf.item())
        first = self._first_inversions()
        self._fold_statistics(found_inf, grad_scale)
        if first:  # a layer's first preconditioner comes from its own first statistics, before its first update
            self._invert_observed(first)
        if update:
            self._update(grad_scale, found_inf)
        if self._steps % self.inv_period == 0:
            self._invert([layer for layer in self._active if layer not in first and self._ready(layer)])
            self._warn_unobserved()
        return loss

    def _makes_state_for_a_checkpoint(self) -> bool:
        """Whether this step of a fresh optimizer is torch.distributed.checkpoint's way of making its state
        (`get_optimizer_state_dict` and `set_optimizer_state_dict` step an optimizer that has none with
        zero gradients at lr 0): a step that must not count, since taking a checkpoint must not change
        training; `state_dict()` has every key without it. Reads the gradients only at lr 0."""
        return all(group["lr"] == 0 for group in self.param_groups) and \
            all(p.grad is None or not p.grad.any() for p in self._group_of)

    def _warn_bypassed(self) -> None:
        """Name, once, the layers whose weight has a gradient though their forward did not run: the
        model uses the weight some other way (F.linear on `layer.weight`), so FOOF never sees its
        inputs, and it steps without a preconditioner."""
        names = [layer.name or type(layer.module).__name__ for layer in self._active
                 if not layer.called and layer.weight.grad is not None and not self._ready(layer)]
        if names and self._hooks:  # (after remove_hooks() no forward is seen at all)
            self._warn_once("bypassed", f"{self.KIND}: the weights of {', '.join(names)} have gradients but their "
                            "forward did not run (the model uses the weight directly, e.g. F.linear(x, "
                            f"layer.weight)); FOOF cannot see their inputs, so they step with {self._plain_update}")

    def _warn_unobserved(self) -> None:
        """Name, once, the layers that a whole period of training did not give one observed sample."""
        names = [layer.name or type(layer.module).__name__ for layer in self._active if not self._ready(layer)]
        if names and self._steps >= self.inv_period:
            self._warn_once("unobserved", f"{self.KIND}: no training forward of {', '.join(names)} was observed in "
                            f"{self._steps} steps, so they step with {self._plain_update} (a branch that never runs, "
                            "or runs only in eval mode or under no_grad)")

    def _creates_buffers(self) -> bool:
        """Whether this step's update creates a momentum buffer (a parameter's first step with momentum)."""
        return any(p.grad is not None and group["momentum"] != 0 and "momentum_buffer" not in self.state.get(p, {})
                   for p, group in self._group_of.items())

    def _first_inversions(self) -> list[Layer]:
        """Layers without a preconditioner that get their first one at this step: those observed now.
        Across ranks the set must agree before the statistics are averaged: every layer without one
        whose weight has a gradient (the same on every rank under DDP)."""
        waiting = [layer for layer in self._active if not self._ready(layer)]
        if distributed.active_group(self.process_group) is None:
            for layer in waiting:
                self._take_statistics(layer)
            return [layer for layer in waiting if all(getattr(layer, st.samples) for st in self.STATISTICS)]
        return [layer for layer in waiting if layer.weight.grad is not None]

    def _update(self, grad_scale: torch.Tensor | None, found_inf: torch.Tensor | None) -> None:
        blocks = []
        for block in self._blocks:
            layer = self._layer_of_block.get(id(block))
            if layer is None:
                blocks.append(block)
            elif self._ready(layer) and block.params[0].grad is not None:
                self._prepare_block(block, layer, self.state[layer.weight])
                blocks.append(block)
            else:  # no preconditioner yet (P = I/λ), or a weight without a gradient: one block per parameter
                blocks += [Block([p], [group]) for p, group in zip(block.params, block.options)]
        options = dict(damping=self.damping, graft=self.graft, grad_scale=grad_scale, found_inf=found_inf,
                       backend=self.backend, plans=self.kernel_plans)
        if self._sharded:  # FSDP2: each rank updates the rows it holds (DESIGN §7)
            group = distributed.active_group(self.process_group)  # grafting sums each layer's norms over it
            sharded.preconditioned_update_(blocks, self.state, group, **options)
            return
        params = [p for block in blocks for p in block.params]
        buffers = [self.state[p].get("momentum_buffer") for p in params]
        ops.preconditioned_update_(blocks, buffers, **options)
        for p, buf in zip(params, buffers):
            if buf is not None:
                self.state[p]["momentum_buffer"] = buf

    # ---- the rest of the API ----------------------------------------------------------------

    @on_itself
    @contextlib.contextmanager
    def warm_up(self):
        """Observe the training-mode forwards inside without stepping; compute the preconditioners on
        exit (paper App. K). Eager forwards are turned into statistics at once; compiled ones keep
        their inputs until exit."""
        self._refresh_blocks()
        self._follow_params()
        self._clear_statistics()
        self._warming_up = True
        try:
            yield self
        finally:
            self._warming_up = False
        if not self._fold_statistics():
            self._warn_once("warm_up", f"{self.KIND}.warm_up(): no training-mode forward with grad enabled was "
                                       "observed, so no preconditioner was computed")
        self._invert_observed(self._active)

    @on_itself
    def remove_hooks(self) -> None:
        """Detach the hooks: no statistic is observed afterwards."""
        self._hooks.remove()
        self._clear_statistics()

    def state_dict(self) -> dict:
        """torch's optimizer state dict, in a form that torch.distributed.checkpoint keeps whole: every
        parameter's entry holds every key it can ever hold (its momentum buffer where its group has
        momentum; a layer's statistics and preconditioner), zeros standing in for those it has not made
        yet and named under PLACEHOLDERS (comma-separated), so that the state dict of a fresh optimizer, into which DCP
        loads, has the keys and shapes of a trained one; and the optimizer's own entries (kind, step
        count, diagnostics) in each param group, the only other part DCP keeps. Under FSDP2 the statistics,
        each rank's own between inversion rounds, are `sharded.rank_stacked`."""
        state_dict = super().state_dict()
        index = {id(p): i for i, p in enumerate(chain.from_iterable(g["params"] for g in self.param_groups))}
        templates = self._state_templates()
        for p in self._group_of:
            i = index[id(p)]
            entry = state_dict["state"][i] = dict(state_dict["state"].get(i, {}))  # (torch's is self.state's)
            missing = [key for key in templates.get(p, {}) if key not in entry]
            entry.update({key: templates[p][key] for key in missing})
            entry[PLACEHOLDERS] = ",".join(missing)  # one string, present in every entry: DCP wants fixed keys
        if self._sharded:  # FSDP2: what each rank observed since the last inversion round is its own
            mesh = next(p.device_mesh for p in self._group_of if sharded.is_sharded(p))
            for layer in self.layers:
                if layer.handed:
                    entry = state_dict["state"][index[id(layer.weight)]]
                    entry.update({key: sharded.rank_stacked(entry[key], mesh) for key in self._statistic_keys()})
        for group in state_dict["param_groups"]:
            group[OWN_ENTRIES] = self._own_entries()
        return state_dict

    def _own_entries(self) -> dict:
        """What the optimizer keeps beyond torch's state and param groups (a param group's OWN_ENTRIES)."""
        return {"kind": self.KIND, "steps": self._steps, "diagnostics": self.diagnostics}

    def _load_own_entries(self, entries: dict) -> None:
        self._steps = entries["steps"]
        self._counters = torch.tensor([entries["diagnostics"].get(name, 0) for name in DIAGNOSTICS])
        self._warned = {name for name, value in entries["diagnostics"].items() if value}

    def _state_templates(self) -> dict[torch.Tensor, dict[str, torch.Tensor]]:
        """Zeros shaped as every state entry each parameter can hold, from the optimizer's settings now."""
        templates: dict[torch.Tensor, dict[str, torch.Tensor]] = {}
        for p, group in self._group_of.items():
            if group["momentum"] != 0:
                templates[p] = {"momentum_buffer": torch.zeros_like(p, dtype=stat_dtype(p.dtype))}
        layers = [layer for layer in self.layers if layer.handed]
        states = []
        for layer in layers:
            dtype, device = stat_dtype(layer.weight.dtype), layer.weight.device
            states.append({key: torch.zeros(shape, dtype=dtype, device=device) for statistic in self.STATISTICS
                           for key, shape in ((statistic.ema, statistic.shape(layer)), (statistic.count, ()))})
        for layer, state, (preconditioner, _) in zip(layers, states, self._preconditioners_like(layers, states)):
            templates.setdefault(layer.weight, {}).update(state, **preconditioner)
        return templates

    @on_itself
    def load_state_dict(self, state_dict: dict) -> None:
        """Load a state dict saved by `state_dict()` of the same optimizer kind; any other (e.g. one
        from torch.optim.SGD, whose momentum holds gradients rather than U) raises ValueError."""
        groups = [dict(group) for group in state_dict["param_groups"]]
        own = [group.pop(OWN_ENTRIES, None) for group in groups][0] if groups else None
        own = state_dict.get("foof", own)  # where state dicts saved before 2026-12-06 kept them
        if own is None:
            raise ValueError(f"state_dict: no '{OWN_ENTRIES}' entry in its param groups; {self.KIND} loads only "
                             f"state dicts saved by {self.KIND}.state_dict()")
        if own.get("kind", "FOOF") != self.KIND:
            raise ValueError(f"state_dict: saved by {own['kind']}, not {self.KIND}")
        state = {}
        for i, entry in state_dict["state"].items():
            entry = dict(entry)
            for key in filter(None, entry.pop(PLACEHOLDERS, "").split(",")):
                del entry[key]
            state[i] = entry
        super().load_state_dict({"state": state, "param_groups": groups})
        # torch casts floating state to each parameter's dtype; the statistics keep their own.
        ids = chain.from_iterable(group["params"] for group in groups)
        params = chain.from_iterable(group["params"] for group in self.param_groups)
        for idx, p in zip(ids, params):
            for key, value in state.get(idx, {}).items():
                if sharded.is_sharded(value) and key in self._statistic_keys():
                    value = sharded.own_row(value)
                if isinstance(value, torch.Tensor):
                    self.state[p][key] = value.to(p.device, copy=True)
            if "precond" in self.state.get(p, {}):  # the update reads P in its padded, aligned layout
                self.state[p]["precond"] = aligned(self.state[p]["precond"])
        self._load_own_entries(own)
        self._assign_params()  # torch replaced the param group dicts the blocks read
        self._clear_statistics()
