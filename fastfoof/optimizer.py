"""FOOF as a torch.optim.Optimizer: the paper's Algorithm 1 with DESIGN §1's schedule."""
from __future__ import annotations

import contextlib
import warnings
from functools import partial
from itertools import chain

import torch
from torch import nn
from torch.optim import Optimizer

from . import distributed, ops
from .geometry import batch_size
from .layers import Block, Layer, Skip, find_layers, in_backward
from .reference import KEPT_PREVIOUS, OK, stat_dtype

DIAGNOSTICS = ("dropped_stats", "cholesky_retries", "cholesky_failures")


class FOOF(Optimizer):
    """FOOF ("gradient descent on neurons", Benzing 2022): each Linear/Conv layer's weight gradient
    is preconditioned by the damped inverse of a running average of its input patches' second
    moment, U = Ĝ·(Σ̂ + λI)⁻¹, then stepped like torch.optim.SGD with decoupled weight decay.

    Args:
        model: the module whose Linear/Conv layers are observed through forward hooks.
        params: parameters or param-group dicts (default `model.parameters()`); a layer is
            preconditioned iff its weight is among them.
        lr, momentum, dampening, nesterov, weight_decay: as torch.optim.SGD, per param group
            (weight decay is decoupled, as AdamW).
        damping: λ > 0, added to the averaged statistic before inversion.
        ema_decay: m in Σ ← mΣ + (1−m)C (bias-corrected).
        inv_period: T, steps between inversions; stats_steps: S, steps observed before each.
        precondition_bias: treat a layer's bias as the last column of [Ŵ | b].
        skip: module names, module types, or a predicate(name, module) not to precondition.
        backend: "auto", "reference" or "triton" (see `fastfoof.ops`).
        process_group: the torch.distributed group whose ranks share statistics and inversions
            (default: the default group, when one is initialised).
    """

    def __init__(self, model: nn.Module, params=None, *, lr: float, damping: float = 1.0,
                 momentum: float = 0.0, dampening: float = 0.0, nesterov: bool = False,
                 weight_decay: float = 0.0, ema_decay: float = 0.95, inv_period: int = 100,
                 stats_steps: int = 10, precondition_bias: bool = True, skip: Skip = None,
                 backend: str = "auto", process_group=None):
        if not isinstance(model, nn.Module):
            raise ValueError(f"model: expected an nn.Module, got {type(model).__name__}")
        if not damping > 0:
            raise ValueError(f"damping: must be > 0, got {damping}")
        if not 0 <= ema_decay < 1:
            raise ValueError(f"ema_decay: must be in [0, 1), got {ema_decay}")
        if not (isinstance(inv_period, int) and inv_period >= 1):
            raise ValueError(f"inv_period: must be an integer ≥ 1, got {inv_period}")
        if not (isinstance(stats_steps, int) and 1 <= stats_steps <= inv_period):
            raise ValueError(f"stats_steps: must be an integer in [1, inv_period={inv_period}], got {stats_steps}")
        self.backend = ops.check_backend(backend)
        defaults = dict(lr=lr, momentum=momentum, dampening=dampening, nesterov=nesterov,
                        weight_decay=weight_decay)
        super().__init__(model.parameters() if params is None else params, defaults)
        devices = {p.device for group in self.param_groups for p in group["params"]}
        if len(devices) > 1:
            raise ValueError(f"params: FOOF needs all parameters on one device, found {sorted(map(str, devices))}")
        self.damping = damping
        self.ema_decay = ema_decay
        self.inv_period = inv_period
        self.stats_steps = stats_steps
        self.precondition_bias = precondition_bias
        self.process_group = process_group
        self.layers = find_layers(model, skip)
        self._hooks = [layer.module.register_forward_hook(partial(self._observe, layer), with_kwargs=True)
                       for layer in self.layers]
        self._steps = 0  # t of DESIGN §1.5: step() calls so far
        self._warming_up = False
        self._counters = torch.zeros(len(DIAGNOSTICS), dtype=torch.int64)  # on the device: read once per round
        self._warned: set[str] = set()
        self._build_blocks()

    @staticmethod
    def _check_group(group: dict) -> None:
        for name in ("lr", "momentum", "dampening", "weight_decay"):
            if not group[name] >= 0:
                raise ValueError(f"{name}: must be ≥ 0, got {group[name]}")
        if group["nesterov"] and (group["momentum"] <= 0 or group["dampening"] != 0):
            raise ValueError("nesterov: requires momentum > 0 and dampening = 0")

    def add_param_group(self, param_group: dict) -> None:
        super().add_param_group(param_group)
        self._check_group(self.param_groups[-1])
        if hasattr(self, "layers"):
            self._build_blocks()

    def _build_blocks(self) -> None:
        """Pair each handed layer weight (and bias) with its layer; the rest are single blocks."""
        group_of = {p: group for group in self.param_groups for p in group["params"]}
        self._active: list[Layer] = []
        self._blocks: list[Block] = []
        in_layer = set()
        for layer in self.layers:
            weight, bias = layer.weight, layer.module.bias
            layer.bias_row = self.precondition_bias and bias is not None and bias in group_of
            layer.active = weight in group_of and weight.requires_grad
            if not layer.active:
                continue
            params = [weight, bias] if layer.bias_row else [weight]
            in_layer.update(params)
            self._active.append(layer)
            self._blocks.append(Block(params, [group_of[p] for p in params], layer.groups))
        self._blocks += [Block([p], [group_of[p]]) for p in group_of if p not in in_layer]
        self._layer_of_block = {id(b): layer for b, layer in zip(self._blocks, self._active)}

    # ---- statistics -------------------------------------------------------------------------

    def _has_precond(self, layer: Layer) -> bool:
        precond = self.state[layer.weight].get("precond")
        return precond is not None and precond.shape[-1] == layer.dim + layer.bias_row

    def _observing(self, layer: Layer) -> bool:
        """Whether the layer's forwards now feed the statistic of the coming step (DESIGN §1.5)."""
        if self._warming_up or not self._has_precond(layer):
            return True
        r = (self._steps + 1) % self.inv_period
        return r == 0 or r > self.inv_period - self.stats_steps

    def _observe(self, layer: Layer, module: nn.Module, args, kwargs, output) -> None:
        if not (module.training and torch.is_grad_enabled() and layer.active):
            return
        if not self._observing(layer):
            return
        if in_backward():
            # A checkpointed forward re-run during backward: count it only if the original forward
            # was not observed (reentrant checkpointing runs the original under no_grad).
            if layer.seen_in_forward:
                return
        else:
            layer.seen_in_forward = True
        x = (args[0] if args else kwargs["input"]).detach()
        dim = layer.dim + layer.bias_row
        if layer.stat is None or layer.stat.shape[-1] != dim:  # the bias row may come with a new group
            layer.stat = torch.empty(layer.groups, dim, dim, dtype=stat_dtype(layer.weight.dtype),
                                     device=layer.weight.device)
        with torch.autocast(x.device.type, enabled=False):  # statistics stay in float32
            ops.patch_gram_(layer.stat, x, module, beta=1.0 if layer.samples else 0.0, bias=layer.bias_row,
                            backend=self.backend)
        layer.samples += batch_size(x, module)

    def _fold_statistics(self) -> None:
        """Σ ← mΣ + (1−m)C for every layer observed since the last step; C = Σ aaᵀ / Σ B."""
        observed = [layer for layer in self._active if layer.samples]
        emas, counts = [], []
        for layer in observed:
            state = self._layer_state(layer)
            emas.append(state["ema"])
            counts.append(state["ema_count"])
        if observed:
            dropped = ops.fold_statistics_(emas, counts, [layer.stat for layer in observed],
                                           [1.0 / layer.samples for layer in observed], self.ema_decay,
                                           backend=self.backend)
            self._count("dropped_stats", dropped)
        self._clear_statistics()

    def _clear_statistics(self) -> None:
        for layer in self.layers:
            layer.clear()

    def _layer_state(self, layer: Layer) -> dict:
        """The layer's optimizer state, with a zero EMA (weight n = 0) if it has none yet."""
        state = self.state[layer.weight]
        dim = layer.dim + layer.bias_row
        if "ema" not in state or state["ema"].shape != (layer.groups, dim, dim):
            dtype, device = stat_dtype(layer.weight.dtype), layer.weight.device
            state["ema"] = torch.zeros(layer.groups, dim, dim, dtype=dtype, device=device)
            state["ema_count"] = torch.zeros((), dtype=dtype, device=device)
            state.pop("precond", None)
        return state

    def _invert(self, layers: list[Layer]) -> None:
        """P = (Σ/n + λI)⁻¹ for the given layers, all at once (DESIGN §1.3).

        Across ranks, the EMAs are averaged first and each rank inverts its share of the layers.
        """
        states = [self._layer_state(layer) for layer in layers]
        group = distributed.active_group(self.process_group)
        if group is not None:
            distributed.average_(chain.from_iterable((s["ema"], s["ema_count"]) for s in states), group)
        owner = distributed.owners([s["ema"].shape[0] * s["ema"].shape[-1] ** 3 for s in states], group)
        mine = [i for i, r in enumerate(owner) if r == distributed.rank(group)]
        counts = [states[i]["ema_count"] for i in mine]
        inverses, status = ops.damped_inverse_with_status(
            [states[i]["ema"] for i in mine], self.damping,
            scales=[torch.where(n > 0, 1 / n, torch.zeros_like(n)) for n in counts],
            previous=[states[i].get("precond") for i in mine], backend=self.backend)
        codes = [torch.zeros(s["ema"].shape[0], dtype=torch.int8, device=s["ema"].device) for s in states]
        for i, inverse, code in zip(mine, inverses, status):
            states[i]["precond"], codes[i] = inverse, code
        if group is not None:
            for s in states:
                s.setdefault("precond", torch.empty_like(s["ema"]))
            distributed.share_([s["precond"] for s in states] + codes, owner + owner, group)
        if codes:
            codes = torch.cat(codes)
            self._count("cholesky_retries", (codes != OK).sum())
            self._count("cholesky_failures", (codes == KEPT_PREVIOUS).sum())
        self._warn_new_diagnostics()

    def _count(self, name: str, value: torch.Tensor) -> None:
        self._counters = self._counters.to(value.device)
        self._counters[DIAGNOSTICS.index(name)] += value

    def _warn_new_diagnostics(self) -> None:
        for name, value in self.diagnostics.items():
            if value and name not in self._warned:
                self._warned.add(name)
                warnings.warn(f"FOOF: {name} = {value} (see FOOF.diagnostics and DESIGN §1.3)", RuntimeWarning,
                              stacklevel=3)

    @property
    def diagnostics(self) -> dict[str, int]:
        """Counters of DESIGN §5: dropped_stats, cholesky_retries, cholesky_failures."""
        return dict(zip(DIAGNOSTICS, self._counters.tolist()))

    # ---- the step ---------------------------------------------------------------------------

    # GradScaler hands this optimizer `grad_scale` and `found_inf` instead of unscaling the grads.
    _step_supports_amp_scaling = True

    @torch.no_grad()
    def step(self, closure=None):
        """One FOOF step: fold this step's statistics, invert for layers without P, update, invert
        every T steps."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        found_inf = getattr(self, "found_inf", None)
        if found_inf is not None and found_inf.item():
            self._clear_statistics()  # a step the scaler skips leaves every state untouched
            return loss
        self._steps += 1
        self._fold_statistics()
        fresh = [layer for layer in self._active if not self._has_precond(layer)]
        if fresh:  # a layer's first P comes from its own first statistics, before its first update
            self._invert(fresh)
        self._update(getattr(self, "grad_scale", None))
        if self._steps % self.inv_period == 0:
            self._invert([layer for layer in self._active if layer not in fresh])
        return loss

    def _update(self, grad_scale: torch.Tensor | None) -> None:
        for block in self._blocks:
            layer = self._layer_of_block.get(id(block))
            block.precond = None if layer is None else self.state[layer.weight]["precond"]
        params = [p for block in self._blocks for p in block.params]
        buffers = [self.state[p].get("momentum_buffer") for p in params]
        ops.preconditioned_update_(self._blocks, buffers, damping=self.damping, grad_scale=grad_scale,
                                   backend=self.backend)
        for p, buf in zip(params, buffers):
            if buf is not None:
                self.state[p]["momentum_buffer"] = buf

    # ---- the rest of the API ----------------------------------------------------------------

    @contextlib.contextmanager
    def warm_up(self):
        """Observe the training-mode forwards inside without stepping; compute P on exit (App. K)."""
        self._clear_statistics()
        self._warming_up = True
        try:
            yield self
        finally:
            self._warming_up = False
        self._fold_statistics()
        self._invert(self._active)

    def remove_hooks(self) -> None:
        """Detach the forward hooks: no statistic is observed afterwards."""
        for hook in self._hooks:
            hook.remove()
        self._hooks = []

    def state_dict(self) -> dict:
        state_dict = super().state_dict()
        state_dict["foof"] = {"steps": self._steps, "diagnostics": self.diagnostics}
        return state_dict

    def load_state_dict(self, state_dict: dict) -> None:
        state_dict = dict(state_dict)
        foof = state_dict.pop("foof")
        super().load_state_dict(state_dict)
        # torch casts floating state to each parameter's dtype; FOOF's statistics keep their own.
        ids = chain.from_iterable(group["params"] for group in state_dict["param_groups"])
        params = chain.from_iterable(group["params"] for group in self.param_groups)
        for idx, p in zip(ids, params):
            for key, value in state_dict["state"].get(idx, {}).items():
                if isinstance(value, torch.Tensor):
                    self.state[p][key] = value.to(p.device, copy=True)
        self._steps = foof["steps"]
        self._counters = torch.tensor([foof["diagnostics"].get(name, 0) for name in DIAGNOSTICS])
        self._warned = {name for name, value in foof["diagnostics"].items() if value}
        self._build_blocks()
        self._clear_statistics()
