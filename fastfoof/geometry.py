"""Which layers FOOF preconditions and how their inputs become patch vectors (DESIGN §1.1)."""
from __future__ import annotations

import math
import weakref
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

CONV_TYPES = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
LAYER_TYPES = (nn.Linear,) + CONV_TYPES


@dataclass(frozen=True)
class PatchGeometry:
    """Implicit im2col of one input: patch vectors of length `dim` (bias row excluded) per group.

    Linear layers are the 0-d case: no spatial dims, one patch per row of the flattened input.
    For convolutions, `padding` is the zero padding before each spatial dim (after any non-zeros
    padding mode was applied to the input), `out_size` the number of output positions per dim.
    """

    channels: int  # input channels (Linear: in_features)
    groups: int
    kernel: tuple[int, ...]
    stride: tuple[int, ...]
    dilation: tuple[int, ...]
    padding: tuple[int, ...]
    in_size: tuple[int, ...]
    out_size: tuple[int, ...]

    @property
    def dim(self) -> int:
        return self.channels // self.groups * math.prod(self.kernel)

    @property
    def positions(self) -> int:
        return math.prod(self.out_size)


def patch_dim(module: nn.Module) -> tuple[int, int]:
    """(groups, D) of a layer's weight matrix Ŵ = W.reshape(O, D) per group."""
    if isinstance(module, nn.Linear):
        return 1, module.in_features
    if isinstance(module, CONV_TYPES):
        return module.groups, module.in_channels // module.groups * math.prod(module.kernel_size)
    raise TypeError(f"FOOF preconditions Linear and Conv1d/2d/3d layers, not {type(module).__name__}")


def batch_size(x: torch.Tensor, module: nn.Module) -> int:
    """B of DESIGN §1.2: the leading dim of a batched input, 1 for an unbatched one."""
    spatial = len(module.kernel_size) if isinstance(module, CONV_TYPES) else 0
    return x.shape[0] if x.dim() > spatial + 1 else 1


def check_input(x: torch.Tensor, module: nn.Module) -> None:
    """ValueError unless `x` is an input `module` accepts: features (channels) and dims that fit."""
    name = type(module).__name__
    if isinstance(module, nn.Linear):
        if x.dim() < 1 or x.shape[-1] != module.in_features:
            raise ValueError(f"x: shape {tuple(x.shape)} does not fit {name}(in_features={module.in_features})")
        return
    nd = len(module.kernel_size)
    if x.dim() not in (nd + 1, nd + 2) or x.shape[-nd - 1] != module.in_channels:
        raise ValueError(f"x: shape {tuple(x.shape)} does not fit {name}(in_channels={module.in_channels}): "
                         f"expected [B, {module.in_channels}, <{nd} spatial dims>]")


def patch_input(x: torch.Tensor, module: nn.Module) -> tuple[torch.Tensor, PatchGeometry]:
    """The tensor whose zero-padded patches are the layer's patch vectors, and their geometry.

    Linear inputs are flattened to [N, in_features]; conv inputs get a batch dim if unbatched and
    are padded here only for non-`zeros` padding modes (zero padding stays implicit).
    """
    if isinstance(module, nn.Linear):
        x = x.reshape(-1, module.in_features)
        return x, PatchGeometry(module.in_features, 1, (), (), (), (), (), ())
    if not isinstance(module, CONV_TYPES):
        raise TypeError(f"FOOF preconditions Linear and Conv1d/2d/3d layers, not {type(module).__name__}")
    nd = len(module.kernel_size)
    if x.dim() == nd + 1:
        x = x.unsqueeze(0)
    # reversed_padding_repeated_twice is [left_last, right_last, ..., left_first, right_first],
    # and resolves string padding ("same" pads the odd extra on the right) as the module does.
    pads = module._reversed_padding_repeated_twice
    left = tuple(pads[2 * (nd - 1 - i)] for i in range(nd))
    right = tuple(pads[2 * (nd - 1 - i) + 1] for i in range(nd))
    if module.padding_mode != "zeros":
        x = F.pad(x, pads, mode=module.padding_mode)
        left = right = (0,) * nd
    in_size = tuple(x.shape[2:])
    out_size = tuple(
        (n + lo + hi - d * (k - 1) - 1) // s + 1
        for n, lo, hi, k, s, d in zip(in_size, left, right, module.kernel_size, module.stride, module.dilation)
    )
    geom = PatchGeometry(module.in_channels, module.groups, tuple(module.kernel_size), tuple(module.stride),
                         tuple(module.dilation), left, in_size, out_size)
    return x, geom


def positions_per_sample(x: torch.Tensor, module: nn.Module) -> int:
    """R of DESIGN §6: patch vectors per sample (output positions, of the input as the layer convolves it:
    TF "SAME" padded where its forward pads; rows per sample of a Linear input)."""
    if isinstance(module, nn.Linear):
        return x.numel() // (module.in_features * batch_size(x, module))
    return patch_input(layer_patches_input(x, module), module)[1].positions


def output_module(module: nn.Module) -> nn.Module:
    """A stand-in whose patch vectors are the rows of the layer's output gradient: a 1×1 convolution
    with the layer's groups (a Linear for a Linear), so that the patch gram computes KFAC's G."""
    if isinstance(module, nn.Linear):
        return nn.Linear(module.out_features, module.out_features, bias=False, device="meta")
    conv = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}[len(module.kernel_size)]
    return conv(module.out_channels, module.out_channels, 1, groups=module.groups, bias=False, device="meta")


# ---- layers whose forward is not what FOOF believes ------------------------------------------------
#
# FOOF's patch vectors are right for a module that computes F.linear / the stock convolution of its
# own weight and bias on its input. Subclasses that override forward may not (weight standardisation,
# padding computed in forward); `computation` runs such a forward once on a random input and says
# what it computes.

_STOCK_FORWARDS = (nn.Linear.forward,) + tuple(cls.forward for cls in CONV_TYPES)
_STOCK_CONV_FORWARDS = tuple(cls._conv_forward for cls in CONV_TYPES)
STOCK, SAME_PADDING = "stock", "same"


def stock_forward(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """What FOOF's patch vectors assume `module` computes on `x`."""
    if isinstance(module, nn.Linear):
        return F.linear(x, module.weight, module.bias)
    base = next(cls for cls in CONV_TYPES if isinstance(module, cls))
    return base._conv_forward(module, x, module.weight, module.bias)


def same_padding(x: torch.Tensor, module: nn.Module) -> list[int]:
    """F.pad's pads for TensorFlow's "SAME" padding of `x` (timm's Conv2dSame, computed in forward
    from the input size): total max((⌈n/s⌉ − 1)·s + (k − 1)·d + 1 − n, 0) per dim, the odd one after."""
    pads = []
    for n, k, s, d in zip(reversed(x.shape[2:]), reversed(module.kernel_size), reversed(module.stride),
                          reversed(module.dilation)):
        total = max((-(-n // s) - 1) * s + (k - 1) * d + 1 - n, 0)
        pads += [total // 2, total - total // 2]
    return pads


_KINDS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # module -> computation(module)


def layer_kind(module: nn.Module) -> str:
    """`computation(module)`, checked once per module: what the optimizer and the public ops take a
    layer's patch vectors to be (DESIGN §1.1)."""
    kind = _KINDS.get(module)
    if kind is None:
        kind = _KINDS[module] = computation(module)
    return kind


def layer_patches_input(x: torch.Tensor, module: nn.Module) -> torch.Tensor:
    """The input whose patch vectors, with the module's own geometry, are the layer's: `x`, or `x` padded
    where the module's forward pads it to TF "SAME" first; ValueError where its forward does not compute
    a convolution or F.linear of its weight."""
    kind = layer_kind(module)
    if kind == SAME_PADDING:
        return F.pad(x, same_padding(x, module))
    if kind != STOCK:
        raise ValueError(f"module: FOOF takes no patch vectors of this {type(module).__name__}: {kind}")
    return x


def computation(module: nn.Module) -> str:
    """STOCK if the module computes `stock_forward` (checked on a random input where its class
    overrides forward), SAME_PADDING if it does so after TF "SAME" padding of its input, else why not."""
    cls = type(module)
    if cls.forward in _STOCK_FORWARDS and (isinstance(module, nn.Linear) or cls._conv_forward in _STOCK_CONV_FORWARDS):
        return STOCK
    weight = module.weight
    if weight.is_meta:
        return STOCK  # nothing to run on: trusted (a model materialised later is checked by its user)
    generator = torch.Generator().manual_seed(0)
    if isinstance(module, nn.Linear):
        shape = (3, module.in_features)
    else:  # sizes that make "SAME" padding differ from the module's own, odd and unaligned to the stride
        shape = (2, module.in_channels) + tuple((k - 1) * d + 2 * s + 1 for k, s, d in
                                                zip(module.kernel_size, module.stride, module.dilation))
    x = torch.randn(shape, generator=generator).to(weight.device, weight.dtype)
    tolerance = 1e-4 if weight.dtype in (torch.float32, torch.float64) else 2e-2
    buffers = [(b, b.clone()) for b in module.buffers()]  # a forward may update them: the probe leaves none changed
    try:
        with torch.no_grad():
            out = cls.forward(module, x)
            candidates = [(STOCK, stock_forward(module, x))]
            if not isinstance(module, nn.Linear):
                candidates.append((SAME_PADDING, stock_forward(module, F.pad(x, same_padding(x, module)))))
    except Exception as error:  # noqa: BLE001 — any failure means the layer cannot be checked
        return f"its forward could not be checked on a random input ({type(error).__name__}: {error})"
    finally:
        with torch.no_grad():
            for buffer, saved in buffers:
                buffer.copy_(saved)
    for kind, expected in candidates:
        if isinstance(out, torch.Tensor) and out.shape == expected.shape and \
                (out - expected).norm() <= tolerance * expected.norm():
            return kind
    return (f"{cls.__name__}.forward does not compute {'F.linear' if isinstance(module, nn.Linear) else 'a convolution'}"
            " of its weight on its input (e.g. a standardised or reparametrised weight)")
