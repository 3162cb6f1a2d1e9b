"""The optimizer that FOOF and KFAC are: a torch.optim.Optimizer whose `step()` runs DESIGN §1.5's schedule by
calling its parts, which a subclass configures with its statistics (`FACTORS`) and preconditioner types.

The parts: `observe` (the hooks), `statistics` (what was observed, and the running averages), `schedule`
(when), `distributed` (who, across ranks), `preconditioners` (what is inverted and how it applies), `ops`
(the update and every other operation, on the Triton kernels or the reference), `state` (the state dict's
layout) and `diagnostics`.
"""
from __future__ import annotations

import contextlib
import functools
import sys
import warnings
import weakref

import torch
import torch._dynamo
from torch import nn
from torch.optim import Optimizer
from torch.optim.optimizer import required

from . import ops, state
from .arguments import (check_model_and_damping, check_param_group, check_preconditioning, check_statistics,
                        inverse_method)
from .diagnostics import Diagnostics
from .distributed import Distributor
from .geometry import batch_size, positions_per_sample
from .layers import Block, Layer, Skip, find_layers
from .linalg import KEPT_PREVIOUS, OK, aligned, stat_dtype
from .observe import Hooks, LayerHook, in_checkpoint_recompute, in_transform, layer_input
from .preconditioners import Preconditioner, Round
from .schedule import Schedule
from .state import OWN_ENTRIES
from .statistics import INPUTS, Factor, Statistic, Statistics


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


class KroneckerOptimizer(Optimizer):
    """The optimizer core shared by `fastfoof.FOOF` and `fastfoof.KFAC` (see those for the arguments).

    A subclass sets `KIND` and `FACTORS` (its statistics) and implements `_preconditioner` (a layer's
    preconditioner type); KFAC also observes its layers' outputs (`_observe`).
    """

    FACTORS: tuple[Factor, ...] = (INPUTS,)
    KIND = ""  # written into state_dict: a state dict loads only into the kind that saved it
    GRAFT_BOUND: float  # κ: graft="sgd" scales a layer's U by at most κλ (DESIGN §1.4)

    def __init__(self, model: nn.Module, params=None, *, lr: float = required, damping: float = 3.0,
                 momentum: float = 0.0, dampening: float = 0.0, nesterov: bool = False,
                 weight_decay: float = 0.0, ema_decay: float = 0.95, inv_period: int = 100,
                 stats_steps: int = 10, precondition_bias: bool = True, skip: Skip = None,
                 backend: str = "auto", stats_batch: int | None = None, rank: int | None = None,
                 graft: str | None = "sgd", inverse: str = "cholesky", process_group=None):
        if lr is required:
            raise TypeError(f"{self.KIND}(): missing the keyword argument 'lr' (the SGD learning rate you use)")
        check_model_and_damping(model, damping)
        check_statistics(ema_decay, inv_period, stats_steps, stats_batch)
        check_preconditioning(rank, graft, inverse)
        self.backend = ops.check_backend(backend)
        defaults = dict(lr=lr, momentum=momentum, dampening=dampening, nesterov=nesterov, weight_decay=weight_decay)
        super().__init__(model.parameters() if params is None else params, defaults)
        devices = {p.device for group in self.param_groups for p in group["params"]}
        if len(devices) > 1:
            raise ValueError(f"params: {self.KIND} needs all parameters on one device, "
                             f"found {sorted(map(str, devices))}")
        for device in devices:
            ops.resolve_backend(self.backend, device)  # a forced backend that cannot run here fails now
        self.damping, self.ema_decay, self.stats_batch, self.rank = damping, ema_decay, stats_batch, rank
        self.precondition_bias, self.graft, self.inverse = precondition_bias, graft, inverse
        self.schedule = Schedule(inv_period, stats_steps)
        self.distributor = Distributor(process_group, (p for group in self.param_groups for p in group["params"]))
        self._diagnostics = Diagnostics(self.KIND)
        # the Triton kernels' tables and workspaces for this optimizer's layers, kept between its steps
        self.kernel_plans = ops.KernelPlans()
        self.layers, excluded = find_layers(model, skip)
        self.statistics = Statistics(self.layers, self.FACTORS)
        self.statistics.bind(self.state)
        self._hook(model)
        self._itself = weakref.ref(self)  # what a forwarding wrapper finds (`on_itself`)
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

    def _hook(self, model: nn.Module) -> None:
        """Forward hooks on the layers' modules, holding this optimizer weakly: it is collected when
        unreferenced, and its hooks with it (the weights' gradient hooks come with `_refresh_blocks`)."""
        self._hooks = Hooks(self)
        for layer in self.layers:
            for module in layer.modules:
                self._hooks.add(module.register_forward_hook(LayerHook(self, "_record", layer), with_kwargs=True))
        self._grad_hooked: set[int] = set()  # id(layer) of layers whose weight has the grad hook
        if torch._dynamo.config.skip_nnmodule_hook_guards and torch._dynamo.utils.counters["stats"]["unique_graphs"]:
            # torch.compile does not guard on module hooks: code compiled before these hooks existed would
            # run without them. Drop compiled code so that it is traced again, with the hooks.
            torch.compiler.reset()

    @property
    def inv_period(self) -> int:
        return self.schedule.inv_period

    @property
    def stats_steps(self) -> int:
        return self.schedule.stats_steps

    @on_itself
    def add_param_group(self, param_group: dict) -> None:
        check_param_group({**self.defaults, **param_group})  # before it joins param_groups
        super().add_param_group(param_group)
        if hasattr(self, "layers"):
            self._assign_params()

    def _assign_params(self) -> None:
        """Which layers' weights (and biases, as the row of [Ŵ | b]) are handed to the optimizer."""
        self._group_of = {p: group for group in self.param_groups for p in group["params"]}
        self.distributor.follow(self._group_of)
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
                    LayerHook(self, "_take_recorded", layer)))
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

    # ---- what a subclass defines ------------------------------------------------------------

    def _preconditioner(self, layer: Layer) -> Preconditioner:
        """The layer's preconditioner type (it may depend on the layer's current D′)."""
        raise NotImplementedError

    def _preconditioner_types(self) -> list[Preconditioner]:
        """Every preconditioner type a layer of this optimizer can have."""
        raise NotImplementedError

    def _observe(self, layer: Layer, module: nn.Module, x: torch.Tensor, output, batch: int) -> torch.Tensor | None:
        """An observed eager training forward of `layer` by `module` (one of its modules): `x` its input
        (`layer_input`), `output` its output, `batch` the forward's whole batch size; returns what the
        module should return instead of `output`, or None. FOOF takes the input statistic; KFAC also
        watches the output's gradient. A forward inside backward here is a reentrant checkpoint's re-run,
        which stands for its original (run under no_grad, so not observed)."""
        self._take_input(layer, module, x)
        return None

    def _input_scale(self, x: torch.Tensor, module: nn.Module) -> float:
        """Weight of one forward's Σ a aᵀ in the input statistic (DESIGN §1.2): grafted, a mean over the
        layer's positions R; under eq. 6 (graft=None) their sum, the paper's scale for its dampings."""
        return 1.0 if self.graft is None else 1.0 / positions_per_sample(x, module)

    def _fold_scale(self, statistic: Statistic) -> float:
        """s in C = s·(pending sum): the mean over the samples taken."""
        return 1.0 / statistic.samples

    # ---- observation (DESIGN §1.2) ------------------------------------------------------------

    def _ready(self, layer: Layer) -> bool:
        """Whether the layer has a preconditioner computed from observed statistics of its shape."""
        return self._preconditioner(layer).ready(layer, self.state[layer.weight])

    def _observing(self, layer: Layer) -> bool:
        """Whether the layer's forwards now feed the statistic of the coming step (DESIGN §1.5)."""
        return self.schedule.observes(self._ready(layer))

    def _record(self, layer: Layer, module: nn.Module, args, kwargs, output) -> torch.Tensor | None:
        """Forward hook of a layer (DESIGN §1.2). Eager: an observed forward's statistic is computed
        here, so no input is held past the hook (nor changed in place before it is read). Compiled:
        the input is recorded every step and its statistic computed when the weight's gradient is
        ready, so that the graph holds no statistics op and no branch on t; it is recorded as the
        layer computes with it (`layer_input`), which autograd keeps for the weight's gradient anyway."""
        self.statistics.called.add(layer)
        if not (module.training and torch.is_grad_enabled() and layer.active):
            return None
        x = args[0] if args else kwargs["input"]
        if torch.compiler.is_compiling():
            self.statistics.record(layer, module, layer_input(x, module, self.stats_batch))
        elif not in_transform() and not in_checkpoint_recompute() and self._observing(layer):
            return self._observe(layer, module, layer_input(x, module, self.stats_batch), output,
                                 batch_size(x, module))
        return None

    def _take_input(self, layer: Layer, module: nn.Module, x: torch.Tensor) -> None:
        self.statistics.of(layer, INPUTS).add(x, module, bias=layer.bias_row, alpha=self._input_scale(x, module),
                                              samples=batch_size(x, module), backend=self.backend)

    @torch.compiler.disable  # eager work, also where autograd calls it inside a compiled training step
    def _take_recorded(self, layer: Layer, weight: torch.Tensor | None = None) -> None:
        """Turn the inputs a compiled forward recorded into the layer's pending statistic if the
        coming step observes them, else drop them. Runs as the weight's post-accumulate-grad hook
        (`weight` is the hook's argument), so that the inputs are released during backward, and at
        step() for forwards that had no backward."""
        inputs = self.statistics.take_recorded(layer)
        if inputs and layer.active and self._observing(layer):
            for module, x in inputs:
                self._take_input(layer, module, x)

    def _fold_statistics(self, found_inf: torch.Tensor | None = None, grad_scale: torch.Tensor | None = None) -> int:
        """Σ ← mΣ + (1−m)C for every statistic observed since the last step; C = Σ aaᵀ / Σ B (none
        where found_inf ≠ 0; `grad_scale`: GradScaler's scale of this step's gradients). Returns the
        number of statistics offered to the fold."""
        for layer in self._active:
            self._take_recorded(layer)  # forwards without a backward
        offered, dropped, restarted = self.statistics.fold(
            self._active, self.ema_decay, self._fold_scale, found_inf=found_inf, backend=self.backend,
            plans=self.kernel_plans)
        for layer in restarted:  # a new shape (a bias row came or went): the old preconditioner goes
            self._forget_preconditioner(layer)
        if dropped is not None:
            self._diagnostics.count("dropped_stats", dropped)
        self._clear_statistics()
        return offered

    def _clear_statistics(self) -> None:
        self.statistics.clear()

    def _running_averages(self, layer: Layer) -> dict:
        """The layer's optimizer state, with a zero running average (weight n = 0) for each statistic it has
        none of the layer's shape for (which also drops its preconditioner)."""
        if self.statistics.start_averages(layer):
            self._forget_preconditioner(layer)
        return self.state[layer.weight]

    def _forget_preconditioner(self, layer: Layer) -> None:
        entries = self.state[layer.weight]
        for key in [k for k in entries if k not in self.statistics.keys and k != "momentum_buffer"]:
            del entries[key]

    def _follow_params(self) -> None:
        """State tensors follow their parameter's device and dtype (DESIGN §1.2: float64 statistics for
        float64 parameters) after `model.to(...)`, `model.double()` and the like: converted in place."""
        for p, entries in self.state.items():
            dtype = stat_dtype(p.dtype)
            for key, value in entries.items():
                if isinstance(value, torch.Tensor) and value.is_floating_point() and \
                        (value.dtype != dtype or value.device != p.device):
                    entries[key] = value.to(p.device, dtype)

    # ---- inversion (DESIGN §1.3, §7) ----------------------------------------------------------

    def _invert(self, layers: list[Layer]) -> None:
        """Preconditioners of the given layers from their running averages, all at once, one batched
        computation per preconditioner type. Across ranks, the averages are averaged first and each rank
        computes its share of the layers, then shares the results."""
        states = [self._running_averages(layer) for layer in layers]
        self.distributor.average_([s[key] for s in states for f in self.FACTORS for key in (f.average, f.count)])
        owner, mine = self.distributor.assign([sum(s[f.average].shape[0] * s[f.average].shape[-1] ** 3
                                                   for f in self.FACTORS) for s in states])
        kinds = [self._preconditioner(layer) for layer in layers]
        by_kind: dict[type, list[int]] = {}
        for i in mine:
            by_kind.setdefault(type(kinds[i]), []).append(i)
        results: list[dict] = [{} for _ in layers]
        codes: list[torch.Tensor | None] = [None] * len(layers)
        round = Round(self.damping, self.backend, inverse_method(self.inverse), self.kernel_plans)
        for members in by_kind.values():
            computed, status = kinds[members[0]].compute([layers[i] for i in members], [states[i] for i in members],
                                                         round)
            for i, result, code in zip(members, computed, status):
                results[i], codes[i] = result, code
        self.distributor.share_(results, codes, owner, lambda i: kinds[i].like(layers[i]))
        for entries, result in zip(states, results):
            entries.update(result)
        if codes:
            codes = torch.cat(codes)
            self._diagnostics.count("cholesky_retries", (codes != OK).sum())
            self._diagnostics.count("cholesky_failures", (codes == KEPT_PREVIOUS).sum())
        self._diagnostics.warn_new(2)

    def _invert_observed(self, layers: list[Layer]) -> None:
        """Preconditioners for layers that may have none yet; a layer with an empty running average
        (nothing observed, every statistic dropped, or a skipped step) stays without one and is observed
        again (DESIGN §1.5)."""
        self._invert(layers)
        counts = torch.stack([self.state[layer.weight][f.count].to(self._diagnostics.counters.device)
                              for layer in layers for f in self.FACTORS]).reshape(len(layers), -1)
        for layer, observed in zip(layers, (counts > 0).all(1).tolist()):
            if not observed:
                self._forget_preconditioner(layer)

    # ---- diagnostics ------------------------------------------------------------------------

    def _warn_once(self, name: str, message: str) -> None:
        self._diagnostics.warn_once(name, message, 4)

    @property
    def diagnostics(self) -> dict[str, int]:
        """Counters of DESIGN §5: dropped_stats, cholesky_retries, cholesky_failures."""
        return self._diagnostics.as_dict()

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
        self.schedule.advance()  # t counts every call, steps that GradScaler skips included (DESIGN §1.5)
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
        if self.schedule.inverts:
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
                 if layer not in self.statistics.called and layer.weight.grad is not None and not self._ready(layer)]
        if names and self._hooks:  # (after remove_hooks() no forward is seen at all)
            self._warn_once("bypassed", f"{self.KIND}: the weights of {', '.join(names)} have gradients but their "
                            "forward did not run (the model uses the weight directly, e.g. F.linear(x, "
                            f"layer.weight)); FOOF cannot see their inputs, so they step with {self._plain_update}")

    def _warn_unobserved(self) -> None:
        """Name, once, the layers that a whole period of training did not give one observed sample."""
        names = [layer.name or type(layer.module).__name__ for layer in self._active if not self._ready(layer)]
        if names and self.schedule.period_passed:
            self._warn_once("unobserved", f"{self.KIND}: no training forward of {', '.join(names)} was observed in "
                            f"{self.schedule.steps} steps, so they step with {self._plain_update} (a branch that never "
                            "runs, or runs only in eval mode or under no_grad)")

    def _creates_buffers(self) -> bool:
        """Whether this step's update creates a momentum buffer (a parameter's first step with momentum)."""
        return any(p.grad is not None and group["momentum"] != 0 and "momentum_buffer" not in self.state.get(p, {})
                   for p, group in self._group_of.items())

    def _first_inversions(self) -> list[Layer]:
        """Layers without a preconditioner that get their first one at this step: those observed now.
        Across ranks the set must agree before the statistics are averaged: every layer without one
        whose weight has a gradient (the same on every rank under DDP)."""
        waiting = [layer for layer in self._active if not self._ready(layer)]
        if self.distributor.group is None:
            for layer in waiting:
                self._take_recorded(layer)
            return [layer for layer in waiting if self.statistics.observed(layer)]
        return [layer for layer in waiting if layer.weight.grad is not None]

    def _update(self, grad_scale: torch.Tensor | None, found_inf: torch.Tensor | None) -> None:
        """DESIGN §1.4 for every block: a layer with a preconditioner as its type applies it, every other
        parameter alone (P = I/λ); under FSDP2 on this rank's rows."""
        blocks = []
        for block in self._blocks:
            layer = self._layer_of_block.get(id(block))
            if layer is None:
                blocks.append(block)
            elif self._ready(layer) and block.params[0].grad is not None:
                block.precond = block.eigvecs = block.eigvals = block.left_transformed_grad = None
                self._preconditioner(layer).apply(block, self.state[layer.weight], self.damping, self.distributor)
                blocks.append(block)
            else:  # no preconditioner yet (P = I/λ), or a weight without a gradient: one block per parameter
                blocks += [Block([p], [group]) for p, group in zip(block.params, block.options)]
        self.distributor.update_(blocks, self.state, damping=self.damping,
                                 graft=None if self.graft is None else self.GRAFT_BOUND, grad_scale=grad_scale,
                                 found_inf=found_inf, backend=self.backend, plans=self.kernel_plans)

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
        self.schedule.warming_up = True
        try:
            yield self
        finally:
            self.schedule.warming_up = False
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
        """torch's optimizer state dict in the layout of `fastfoof.state` (DESIGN §9): every key a parameter's
        entry can hold, placeholders where it has not made them yet, the optimizer's own entries in each param
        group; under FSDP2 the statistics one row per rank."""
        state_dict = super().state_dict()
        params = [p for group in self.param_groups for p in group["params"]]
        state.add_placeholders(state_dict, params, self._state_templates())
        index = {id(p): i for i, p in enumerate(params)}
        for layer in self.layers:
            if layer.handed:  # under FSDP2 what each rank observed since the last round is its own
                entry = state_dict["state"][index[id(layer.weight)]]
                entry.update({key: self.distributor.saved(entry[key]) for key in self.statistics.keys})
        state.add_own_entries(state_dict, self._own_entries())
        return state_dict

    def _own_entries(self) -> dict:
        """What the optimizer keeps beyond torch's state and param groups (a param group's OWN_ENTRIES)."""
        return {"kind": self.KIND, "steps": self.schedule.steps, "diagnostics": self.diagnostics}

    def _load_own_entries(self, entries: dict) -> None:
        self.schedule.steps = entries["steps"]
        self._diagnostics.load(entries["diagnostics"])

    def _state_templates(self) -> dict[torch.Tensor, dict[str, torch.Tensor]]:
        """Zeros shaped as every state entry each parameter can hold, from the optimizer's settings now."""
        templates: dict[torch.Tensor, dict[str, torch.Tensor]] = {}
        for p, group in self._group_of.items():
            if group["momentum"] != 0:
                templates[p] = {"momentum_buffer": torch.zeros_like(p, dtype=stat_dtype(p.dtype))}
        for layer in self.layers:
            if layer.handed:
                entries = templates.setdefault(layer.weight, {})
                for statistic in self.statistics.of_layer(layer):
                    entries.update(statistic.templates())
                entries.update(self._preconditioner(layer).like(layer)[0])
        return templates

    @on_itself
    def load_state_dict(self, state_dict: dict) -> None:
        """Load a state dict saved by `state_dict()` of the same optimizer kind; any other (e.g. one
        from torch.optim.SGD, whose momentum holds gradients rather than U) raises ValueError."""
        loaded, own = state.split(state_dict, self.KIND)
        super().load_state_dict(loaded)
        self.statistics.bind(self.state)  # torch made a new state
        # torch casts floating state to each parameter's dtype; the statistics keep their own.
        ids = (i for group in loaded["param_groups"] for i in group["params"])
        params = (p for group in self.param_groups for p in group["params"])
        aligned_keys = {key for kind in self._preconditioner_types() for key in kind.aligned_keys}
        for idx, p in zip(ids, params):
            for key, value in loaded["state"].get(idx, {}).items():
                if key in self.statistics.keys:
                    value = self.distributor.loaded(value)
                if isinstance(value, torch.Tensor):
                    self.state[p][key] = value.to(p.device, copy=True)
            for key in aligned_keys & set(self.state.get(p, {})):  # the update reads P in its padded layout
                self.state[p][key] = aligned(self.state[p][key])
        self._load_own_entries(own)
        self._assign_params()  # torch replaced the param group dicts the blocks read
        self._clear_statistics()
