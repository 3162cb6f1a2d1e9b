"""How the optimizers watch their layers: hooks that hold the optimizer weakly, and which forwards
count (DESIGN §1.2, §5).

A hook holds its optimizer through a weak reference, so an optimizer nobody references is collected
and takes its hooks with it (`Hooks`). A copy of the model (deepcopy, AveragedModel, pickling)
gets an inert hook in its place: the copy trains as a plain model and carries no optimizer.
"""
from __future__ import annotations

import weakref

import torch
from torch import nn

from .geometry import batch_size


def inert_hook(*args, **kwargs) -> None:
    """What a copied model's hooks become: nothing."""


def _inert() -> object:
    return inert_hook


class LayerHook:
    """Calls `owner.<method>(layer, *hook_args)` while the owner lives. Used as a layer's forward
    hook and as its weight's post-accumulate-grad hook."""

    def __init__(self, owner: object, method: str, layer: object):
        self._owner = weakref.ref(owner)
        self._method = method
        self.layer = layer

    def __call__(self, *args):
        owner = self._owner()
        if owner is not None:
            return getattr(owner, self._method)(self.layer, *args)
        return None

    def __deepcopy__(self, memo) -> object:
        return inert_hook

    def __reduce__(self):
        return _inert, ()


class Hooks:
    """The removable handles of one optimizer's hooks; removed by `remove()` or when the optimizer
    is collected (the finalizer holds the handles, not the optimizer)."""

    def __init__(self, owner: object):
        self._handles: list = []
        self._finalizer = weakref.finalize(owner, _remove_all, self._handles)

    def add(self, handle) -> None:
        self._handles.append(handle)

    def remove(self) -> None:
        _remove_all(self._handles)

    def __bool__(self) -> bool:
        return bool(self._handles)


def _remove_all(handles: list) -> None:
    for handle in handles:
        handle.remove()
    handles.clear()


def in_backward() -> bool:
    """True while the autograd engine runs a backward pass (checkpointing may re-run forwards)."""
    return torch._C._current_graph_task_id() != -1


def in_transform() -> bool:
    """True inside a torch.func transform (vmap, grad, ...): its tensors must not escape it."""
    return torch._C._functorch.peek_interpreter_stack() is not None


def in_checkpoint_recompute() -> bool:
    """True while non-reentrant activation checkpointing re-runs a forward in backward to rebuild
    saved tensors (its original forward was observed; a reentrant checkpoint's original ran under
    no_grad, so its re-run is the one that counts). Told by the saved-tensor hooks it runs under."""
    hooks = torch._C._autograd._top_saved_tensors_default_hooks(True)
    return hooks is not None and getattr(hooks[0], "__qualname__", "").startswith("_recomputation_hook.")


def layer_input(x: torch.Tensor, module: nn.Module, stats_batch: int | None) -> torch.Tensor:
    """The input as the layer computes with it: cast to the autocast dtype where autocast casts it
    (so that the statistic is of what the layer saw, and a later in-place change of `x` cannot
    reach it), and cut to the first `stats_batch` samples of `module` (the one of the layer's
    modules that ran; DESIGN §1.2). A TF "SAME" padding in its forward is the patch gram's
    (`geometry.layer_patches_input`)."""
    device = x.device.type
    if x.dtype in (torch.float32, torch.float16, torch.bfloat16) and torch.is_autocast_enabled(device):
        x = x.to(torch.get_autocast_dtype(device))
    return first_samples(x, module, stats_batch).detach()


def watchable_output(output) -> torch.Tensor | None:
    """A forward's output whose gradient can be watched, for the forward hook to return: None where it has no
    gradient; a copy of a view (a Linear on a [B, N, F] input returns one, and a hook or gradient edge on a
    view that is then changed in place, as by an inplace ReLU, never sees its gradient)."""
    if not (isinstance(output, torch.Tensor) and output.requires_grad):
        return None
    return output.clone() if output._is_view() else output


def first_samples(x: torch.Tensor, module: nn.Module, count: int | None) -> torch.Tensor:
    """The first `count` samples of a batched input of `module` (None: all)."""
    return x[:count] if count is not None and batch_size(x, module) > count else x
