"""The patch-gram kernel against float64 oracles and the reference op (TRITON_INTERPRET on CPU)."""
import pytest
import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from torch import nn

from fastfoof import ops, reference
from fastfoof.geometry import patch_dim, patch_input
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


def paths_of(x, module):
    return pg.applicable_paths(*patch_input(x, module))


# every (geometry, path) the input admits but channels_last (tested on channels_last inputs below)
GEOMETRY_PATHS = [(name, path) for name, (make, shape) in sorted(GEOMETRIES.items())
                  for path in paths_of(torch.empty(shape), make()) if path != "channels_last"]


@pytest.mark.smoke
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("name,path", GEOMETRY_PATHS)
def test_geometries_match_float64_oracle(name, path, bias):
    make, shape = GEOMETRIES[name]
    module = make().to(DEVICE)
    x = torch.randn(shape, device=DEVICE)
    out = make_out(module, x, bias)  # NaN: β = 0 must overwrite
    run_kernel(out, x, module, bias=bias, splits=2, path=path)
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


def channels_last(x):
    """x with its channels contiguous (NHWC / NLC memory), same shape and values."""
    return x.movedim(1, -1).contiguous().movedim(-1, 1)


# channels_last path geometries (few kernel offsets: its tiles are per offset, slow to interpret)
CHANNELS_LAST = {
    "conv2d_odd_geometry_groups": (conv(nn.Conv2d, 4, 6, (3, 2), stride=(2, 1), padding=(1, 2), dilation=(1, 2),
                                        groups=2), (2, 4, 7, 9)),
    "conv2d_unpadded_channels": (conv(nn.Conv2d, 16, 3, 2, padding=1), (2, 16, 5, 4)),  # bias in its own tile
    "conv2d_two_channel_blocks": (conv(nn.Conv2d, 20, 3, (1, 2), stride=2), (3, 20, 5, 7)),
    "conv2d_depthwise": (conv(nn.Conv2d, 4, 4, 2, padding=1, groups=4), (2, 4, 5, 6)),
    "conv2d_reflect": (conv(nn.Conv2d, 3, 5, 2, padding=1, padding_mode="reflect"), (2, 3, 6, 5)),
    "conv1d_dilated": (conv(nn.Conv1d, 3, 2, 3, dilation=2, padding=3), (2, 3, 13)),
    "conv2d_1x1": (conv(nn.Conv2d, 5, 3, 1), (2, 5, 4, 3)),
}


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("name", sorted(CHANNELS_LAST))
def test_channels_last_path_matches_float64_oracle(name, bias):
    make, shape = CHANNELS_LAST[name]
    module = make().to(DEVICE)
    x = channels_last(torch.randn(shape, device=DEVICE))
    assert x.stride(1) == 1
    out = make_out(module, x, bias)
    run_kernel(out, x, module, bias=bias, splits=2, path="channels_last", config=TILE_16)
    assert rel_error(out.cpu(), gram64(x.cpu(), module.cpu(), bias)) <= BOUND[torch.float32]
    assert torch.equal(out, out.transpose(1, 2))


def test_strided_view_input():
    module = nn.Conv2d(3, 2, 2, stride=1).to(DEVICE)
    x = torch.randn(2, 6, 9, 7, device=DEVICE)[:, ::2, 1:, ::2]  # no copy: odd strides everywhere
    out = make_out(module, x, False)
    run_kernel(out, x, module, bias=False, splits=2)
    assert rel_error(out.cpu(), gram64(x.cpu(), module.cpu(), False)) <= BOUND[torch.float32]


# one input per path, with groups where the path has them: (layer, shape, channels_last memory)
PATH_CASES = {
    "implicit": (conv(nn.Conv2d, 4, 3, 3, padding=1), (3, 4, 5, 6), False),
    "channels_last": (conv(nn.Conv2d, 4, 6, 2, stride=(1, 2), padding=1, groups=2), (3, 4, 5, 6), True),
    "dense": (conv(nn.Conv2d, 6, 4, 1, groups=2), (3, 6, 4, 3), False),
    "matmul": (conv(nn.Conv2d, 6, 4, 1, groups=2), (3, 6, 4, 3), True),
}


def path_case(path, dtype=torch.float32):
    make, shape, nhwc = PATH_CASES[path]
    x = torch.randn(shape, device=DEVICE).to(dtype)
    return make().to(DEVICE), channels_last(x) if nhwc else x


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("path", ["channels_last", "dense", "matmul"])
def test_paths_take_16_bit_inputs(path, dtype):
    module, x = path_case(path, dtype)
    out = make_out(module, x, True)
    run_kernel(out, x, module, bias=True, splits=2, path=path)
    assert rel_error(out.cpu(), gram64(x.cpu(), module.cpu(), True)) <= BOUND[dtype]
    assert torch.equal(out, out.transpose(1, 2))


@pytest.mark.parametrize("alpha,beta", [(0.37, 0.0), (1.0, 1.0), (-0.5, 0.73)])
@pytest.mark.parametrize("path", pg.PATHS)
def test_alpha_beta_match_reference(path, alpha, beta):
    module, x = path_case(path)
    start = torch.randn_like(make_out(module, x, True))  # not symmetric: β applies elementwise
    out = start.clone()
    run_kernel(out, x, module, alpha=alpha, beta=beta, bias=True, splits=2, path=path, config=TILE_16)
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


@pytest.mark.parametrize("path", pg.PATHS)
def test_deterministic_bitwise(path):
    module, x = path_case(path)
    first, second = (run_kernel(make_out(module, x, True), x, module, bias=True, splits=4, path=path,
                                config=TILE_16) for _ in range(2))
    assert torch.equal(first, second)


def test_kernel_path_never_unfolds(monkeypatch):
    def forbidden(*args, **kwargs):
        raise AssertionError("the kernel path must not materialise patches")

    monkeypatch.setattr(F, "unfold", forbidden)
    monkeypatch.setattr(torch.Tensor, "unfold", forbidden)
    monkeypatch.setattr(reference, "patch_rows_", forbidden)
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


def meta_input(module, shape, nhwc=False):
    """(x, geom) of `patch_input` for an input of this shape, without allocating it."""
    x = torch.empty(shape, device="meta")
    return patch_input(channels_last(x) if nhwc else x, module)


@pytest.mark.parametrize("make,shape,nhwc,path", [
    (conv(nn.Linear, 8, 3), (4, 5, 8), False, "matmul"),
    (conv(nn.Conv2d, 64, 8, 1), (2, 64, 7, 7), False, "dense"),
    (conv(nn.Conv1d, 32, 8, 1), (2, 32, 9), False, "dense"),
    (conv(nn.Conv2d, 64, 8, 1), (1, 64, 7, 7), False, "matmul"),  # one sample: one row level
    (conv(nn.Conv2d, 64, 8, 1), (2, 64, 7, 7), True, "matmul"),
    (conv(nn.Conv2d, 64, 8, 1, stride=2), (2, 64, 7, 7), False, "implicit"),
    (conv(nn.Conv2d, 64, 8, 1, stride=2), (2, 64, 7, 7), True, "channels_last"),
    (conv(nn.Conv2d, 64, 8, 3, padding=1), (2, 64, 7, 7), True, "channels_last"),
    (conv(nn.Conv2d, 64, 8, 3, padding=1), (2, 64, 7, 7), False, "implicit"),
    (conv(nn.Conv2d, 3, 8, 3, padding=1), (2, 3, 7, 7), True, "implicit"),  # 3 channels: mostly padding
    (conv(nn.Conv2d, 64, 64, 3, padding=1, groups=64), (2, 64, 7, 7), True, "implicit"),  # depthwise
])
def test_choose_path_rule(make, shape, nhwc, path):
    x, geom = meta_input(make(), shape, nhwc)
    assert pg.choose_path(x, geom) == path
    assert path in pg.applicable_paths(x, geom)


def test_dense_rows_views():
    assert pg.dense_rows(*meta_input(nn.Linear(37, 2), (3, 5, 37))) == pg.DenseRows(1, 15, 0, 37, 1)
    assert pg.dense_rows(*meta_input(nn.Conv2d(5, 2, 1), (2, 5, 4, 3))) == pg.DenseRows(2, 12, 60, 1, 12)
    assert pg.dense_rows(*meta_input(nn.Conv2d(5, 2, 1), (2, 5, 4, 3), True)) == pg.DenseRows(1, 24, 0, 5, 1)
    cropped = torch.empty(2, 5, 4, 4, device="meta")[..., 1:]  # rows of 3 every 4: three stride levels
    assert pg.dense_rows(*patch_input(cropped, nn.Conv2d(5, 2, 1))) is None
    assert pg.dense_rows(*meta_input(nn.Conv2d(5, 2, 1, padding=1), (2, 5, 4, 3))) is None
    assert pg.dense_rows(*meta_input(nn.Conv2d(5, 2, 2), (2, 5, 4, 3))) is None


@pytest.mark.parametrize("make,shape,path", [
    (conv(nn.Conv2d, 3, 2, 3), (2, 3, 5, 5), "dense"),
    (conv(nn.Conv2d, 3, 2, 1), (2, 3, 5, 5), "matmul"),  # two row levels
    (conv(nn.Linear, 3, 2), (4, 3), "channels_last"),
    (conv(nn.Linear, 3, 2), (4, 3), "fastest"),
])
def test_forced_path_must_apply(make, shape, path):
    module = make().to(DEVICE)
    x = torch.randn(shape, device=DEVICE)
    with pytest.raises(ValueError, match="path"):
        run_kernel(make_out(module, x, True), x, module, bias=True, path=path)


def test_int32_guard_decisions():
    # a sample of 2³¹ elements just fits int32 offsets (the last one is 2³¹ − 1); more takes the reference
    assert pg.samples_per_launch(*meta_input(nn.Conv2d(4, 4, 3), (2, 4, 2 ** 15, 2 ** 14))) > 0
    assert pg.samples_per_launch(*meta_input(nn.Conv2d(5, 4, 3), (2, 5, 2 ** 15, 2 ** 14))) == 0
    assert pg.samples_per_launch(*meta_input(nn.Conv2d(4, 4, 3), (2, 4, 2 ** 15 + 1, 2 ** 14))) == 0
    # one sample with more patch rows than a launch may number: the reference
    assert pg.samples_per_launch(*meta_input(nn.Conv1d(1, 1, 1), (2, 1, 2 ** 31 - 1))) == 0
    # a long Conv1d batch (2³¹ positions in all) is launched in chunks of 32 samples
    assert pg.samples_per_launch(*meta_input(nn.Conv1d(2, 4, 3), (64, 2, 2 ** 25 + 2))) == 32
    # a Linear input of 2³² elements: rows are int64 offsets, 2³⁰ of them per launch
    assert pg.samples_per_launch(*meta_input(nn.Linear(4096, 8), (2 ** 20, 4096))) == 2 ** 30


@pytest.mark.parametrize("path", ["implicit", "dense", "channels_last"])
def test_batch_chunks_accumulate(monkeypatch, path):
    module, x = path_case(path)
    positions = patch_input(x, module)[1].positions
    monkeypatch.setattr(pg, "MAX_LAUNCH_POSITIONS", 2 * positions)  # 3 samples: launches of 2 and 1
    launches = []
    for name in ("launch_positions", "launch_dense"):
        launch = getattr(pg, name)
        monkeypatch.setattr(pg, name, lambda *args, launch=launch, **kwargs: launches.append(1) or launch(*args, **kwargs))
    start = torch.randn_like(make_out(module, x, True))
    out = run_kernel(start.clone(), x, module, alpha=0.7, beta=0.4, bias=True, path=path)
    assert len(launches) == 2
    expected = 0.4 * start.cpu().double() + 0.7 * gram64(x.cpu(), module.cpu(), True)
    assert rel_error(out.cpu(), expected) <= BOUND[torch.float32]


def test_oversized_sample_takes_reference(monkeypatch):
    module = nn.Conv2d(3, 2, 3).to(DEVICE)
    x = torch.randn(2, 3, 6, 5, device=DEVICE)
    monkeypatch.setattr(pg, "INT32_MAX", 50)  # stands in for 2³¹ − 1: one sample spans 89
    calls = []
    monkeypatch.setattr(reference, "patch_gram_", lambda *args, **kwargs: calls.append(1))
    pg.patch_gram_(make_out(module, x, True), x, module, bias=True)
    assert calls == [1]
    with pytest.raises(ValueError, match="int32"):
        run_kernel(make_out(module, x, True), x, module, bias=True)
