"""The patch-gram kernel against float64 oracles and the reference op (TRITON_INTERPRET on CPU)."""
import pytest
import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from torch import nn

from fastfoof import ops, reference
from fastfoof.geometry import patch_dim
from fastfoof.kernels import patch_gram as pg

from helpers import gram64, rel_error

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
BOUND = {torch.float32: 1e-5, torch.float16: 2e-2, torch.bfloat16: 2e-2}  # DESIGN §4, IEEE dots
TILE_16 = pg.CONFIGS[0]  # forces several tile pairs on small D'


def conv(cls, *args, **kwargs):
    return lambda: cls(*args, **kwargs)


# (layer, input shape): odd sizes, every geometry the kernel handles
GEOMETRIES = {
    "linear_leading_dims": (conv(nn.Linear, 37, 4), (3, 5, 37)),
    "linear_unbatched": (conv(nn.Linear, 11, 4), (11,)),
    "conv1d_stride_pad": (conv(nn.Conv1d, 4, 3, 3, stride=2, padding=1), (2, 4, 11)),
    "conv1d_unbatched_dilated": (conv(nn.Conv1d, 3, 2, 3, dilation=2, padding=3), (3, 13)),
    "conv2d_odd_geometry": (conv(nn.Conv2d, 3, 5, (3, 2), stride=(2, 1), padding=(1, 2), dilation=(1, 2)), (2, 3, 7, 9)),
    "conv2d_groups": (conv(nn.Conv2d, 8, 6, 3, padding=1, groups=2), (2, 8, 6, 5)),
    "conv2d_depthwise": (conv(nn.Conv2d, 6, 6, 3, padding=1, groups=6), (3, 6, 5, 6)),
    "conv2d_same": (conv(nn.Conv2d, 3, 4, (2, 3), padding="same"), (2, 3, 5, 7)),
    "conv2d_reflect": (conv(nn.Conv2d, 3, 5, 3, padding=1, padding_mode="reflect"), (2, 3, 6, 5)),
    "conv2d_circular_strided": (conv(nn.Conv2d, 2, 3, 3, stride=2, padding=2, padding_mode="circular"), (2, 2, 7, 6)),
    "conv2d_kernel_larger_than_stride_pad": (conv(nn.Conv2d, 2, 3, 5, stride=3, padding=3), (2, 2, 9, 8)),
}


def run_kernel(out, x, module, *, alpha=1.0, beta=0.0, bias, **knobs):
    knobs.setdefault("input_precision", "ieee")
    return pg.launch_patch_gram(out, x, module, alpha=alpha, beta=beta, bias=bias, **knobs)


def make_out(module, x, bias, fill=float("nan")):
    groups, dim = patch_dim(module)
    return torch.full((groups, dim + bias, dim + bias), fill, dtype=torch.float32, device=x.device)


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("name", sorted(GEOMETRIES))
def test_geometries_match_float64_oracle(name, bias):
    make, shape = GEOMETRIES[name]
    module = make().to(DEVICE)
    x = torch.randn(shape, device=DEVICE)
    out = make_out(module, x, bias)  # NaN: β = 0 must overwrite
    run_kernel(out, x, module, bias=bias, splits=2)
    assert rel_error(out.cpu(), gram64(x.cpu(), module.cpu(), bias)) <= BOUND[torch.float32]
    assert torch.equal(out, out.transpose(1, 2))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("channels_last", [False, True])
def test_dtypes_and_channels_last(dtype, channels_last):
    module = nn.Conv2d(5, 4, 3, stride=(1, 2), padding=1).to(DEVICE)
    x = torch.randn(2, 5, 7, 6, device=DEVICE).to(dtype)
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
        assert not x.is_contiguous()
    out = make_out(module, x, True)
    run_kernel(out, x, module, bias=True, splits=3, config=TILE_16)
    assert rel_error(out.cpu(), gram64(x.cpu(), module.cpu(), True)) <= BOUND[dtype]


def test_strided_view_input():
    module = nn.Conv2d(3, 2, 2, stride=1).to(DEVICE)
    x = torch.randn(2, 6, 9, 7, device=DEVICE)[:, ::2, 1:, ::2]  # no copy: odd strides everywhere
    out = make_out(module, x, False)
    run_kernel(out, x, module, bias=False, splits=2)
    assert rel_error(out.cpu(), gram64(x.cpu(), module.cpu(), False)) <= BOUND[torch.float32]


@pytest.mark.parametrize("alpha,beta", [(0.37, 0.0), (1.0, 1.0), (-0.5, 0.73)])
def test_alpha_beta_match_reference(alpha, beta):
    module = nn.Conv2d(4, 3, 3, padding=1).to(DEVICE)
    x = torch.randn(3, 4, 5, 6, device=DEVICE)
    start = torch.randn(1, 37, 37, device=DEVICE)  # not symmetric: β applies elementwise
    out = start.clone()
    run_kernel(out, x, module, alpha=alpha, beta=beta, bias=True, splits=2, config=TILE_16)
    expected = beta * start.cpu().double() + alpha * gram64(x.cpu(), module.cpu(), True)
    assert rel_error(out.cpu(), expected) <= BOUND[torch.float32]
    ref = reference.patch_gram_(start.clone(), x, module, alpha=alpha, beta=beta, bias=True)
    assert rel_error(out.cpu(), ref.cpu()) <= BOUND[torch.float32]


def test_beta_zero_ignores_nan_and_empty_batch():
    module = nn.Linear(7, 3).to(DEVICE)
    out = torch.full((1, 8, 8), float("nan"), device=DEVICE)
    run_kernel(out, torch.randn(0, 7, device=DEVICE), module, bias=True)
    assert torch.equal(out, torch.zeros_like(out))
    start = torch.randn(1, 8, 8, device=DEVICE)
    out = start.clone()
    run_kernel(out, torch.randn(0, 7, device=DEVICE), module, beta=0.5, bias=True)
    assert torch.equal(out, start * 0.5)


@pytest.mark.parametrize("splits", [1, 2, 5])
def test_split_counts_agree(splits):
    module = nn.Conv2d(3, 4, 3, padding=1).to(DEVICE)
    x = torch.randn(3, 3, 9, 7, device=DEVICE)
    out = make_out(module, x, True)
    run_kernel(out, x, module, bias=True, splits=splits, config=TILE_16)
    assert rel_error(out.cpu(), gram64(x.cpu(), module.cpu(), True)) <= BOUND[torch.float32]


def test_deterministic_bitwise():
    module = nn.Conv2d(4, 4, 3, padding=1, groups=2).to(DEVICE)
    x = torch.randn(4, 4, 9, 8, device=DEVICE)
    first, second = (run_kernel(make_out(module, x, True), x, module, bias=True, splits=4, config=TILE_16)
                     for _ in range(2))
    assert torch.equal(first, second)


def test_kernel_path_never_unfolds(monkeypatch):
    def forbidden(*args, **kwargs):
        raise AssertionError("the kernel path must not materialise patches")

    monkeypatch.setattr(F, "unfold", forbidden)
    monkeypatch.setattr(torch.Tensor, "unfold", forbidden)
    monkeypatch.setattr(reference, "unfold_patches", forbidden)
    module = nn.Conv2d(3, 4, 3, padding=1).to(DEVICE)
    x = torch.randn(2, 3, 5, 6, device=DEVICE)
    out = ops.patch_gram(x, module, backend="triton")
    bound = 5e-3 if x.is_cuda else BOUND[torch.float32]  # TF32 dots on a GPU
    assert rel_error(out.cpu(), gram64(x.cpu(), module.cpu(), True)) <= bound
    with pytest.raises(AssertionError, match="materialise"):
        ops.patch_gram(x, module, backend="reference")  # the patch shows: the reference does unfold


def test_dispatch_picks_kernel_and_falls_back():
    assert ops.implementation("patch_gram_", "triton", torch.device(DEVICE)) is pg.patch_gram_
    # float64 and Conv3d stay on the reference, with the same results
    module = nn.Conv3d(2, 3, 2, padding=1).to(DEVICE)
    x = torch.randn(2, 2, 3, 4, 3, device=DEVICE)
    out = pg.patch_gram_(torch.empty(1, 17, 17, device=DEVICE), x, module, bias=True)
    assert rel_error(out.cpu(), gram64(x.cpu(), module.cpu(), True)) <= BOUND[torch.float32]
    module = nn.Linear(5, 2).double().to(DEVICE)
    x = torch.randn(4, 5, dtype=torch.float64, device=DEVICE)
    out = pg.patch_gram_(torch.empty(1, 6, 6, dtype=torch.float64, device=DEVICE), x, module, bias=True)
    assert rel_error(out.cpu(), gram64(x.cpu(), module.cpu(), True)) <= 1e-12


def test_splits_fill_the_gpu_with_bounded_workspace():
    # ResNet stem on CIFAR at batch 128: D' = 28, N = 128·32·32
    config = pg.choose_config(28)
    splits = pg.choose_splits(128 * 32 * 32, 1, config, sm_count=132)
    assert splits >= 2 * 132
    # a huge layer never gets a workspace past the bound
    config = pg.choose_config(4609)
    pairs = 37 * 38 // 2
    splits = pg.choose_splits(10 ** 7, pairs, config, sm_count=132)
    assert 1 <= splits and splits * pairs * config.block_d ** 2 <= pg.WORKSPACE_ELEMENTS
    # tiny problems are not split into slivers
    assert pg.choose_splits(50, 1, pg.choose_config(10), sm_count=132) == 1


@triton.jit
def _decode_probe(pairs_ptr, ti_ptr, tj_ptr, n, BLOCK: tl.constexpr):
    i = tl.arange(0, BLOCK)
    pair = tl.load(pairs_ptr + i, mask=i < n, other=0)
    ti, tj = pg._tile_pair(pair)
    tl.store(ti_ptr + i, ti, mask=i < n)
    tl.store(tj_ptr + i, tj, mask=i < n)


def test_tile_pair_decode_covers_upper_triangle():
    tiles = 120
    expected = [(i, j) for j in range(tiles) for i in range(j + 1)]
    pairs = torch.arange(len(expected), dtype=torch.int32, device=DEVICE)
    ti, tj = torch.empty_like(pairs), torch.empty_like(pairs)
    _decode_probe[(1,)](pairs, ti, tj, len(expected), BLOCK=triton.next_power_of_2(len(expected)))
    assert list(zip(ti.tolist(), tj.tolist())) == expected
