"""The fused EMA fold (fastfoof.kernels.fold_statistics) against float64 and the reference (DESIGN §1.2, §1.3).
The reference consumes its statistics (it zeroes non-finite entries and scales them in place): each
implementation gets its own copy."""
import pytest
import torch

from fastfoof import ops, reference
from fastfoof.kernels import fold_statistics
from fastfoof.kernels.tables import Plans as KernelPlans
from helpers import rel_error

# CPU runs the kernel in Triton's interpreter (conftest); a GPU runs it compiled.
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

# [groups, D', D'] of odd sizes; (3, 41, 41) spans two or three blocks of fold_statistics.BLOCK.
SHAPES = [(1, 7, 7), (3, 41, 41), (2, 5, 5), (1, 1, 1), (4, 13, 13)]
SCALES = [1 / 3, 1 / 7, 0.25, 1 / 11, 1 / 96]
DECAY = 0.95


def make_layers(dtype, gen, shapes=SHAPES):
    """Random EMAs (symmetric, as the optimizer's), counts in (0, 1), statistics of another scale."""
    emas, counts, stats = [], [], []
    for shape in shapes:
        e = torch.randn(shape, generator=gen, dtype=torch.float64)
        s = torch.randn(shape, generator=gen, dtype=torch.float64)
        emas.append((e + e.mT).to(DEVICE, dtype))
        stats.append((5 * (s + s.mT)).to(DEVICE, dtype))
        counts.append(torch.rand((), generator=gen, dtype=torch.float64).to(DEVICE, dtype))
    return emas, counts, stats


def clone(tensors):
    return [t.clone() for t in tensors]


def fold64(emas, counts, stats, scales, decay):
    """The fold in float64, written from DESIGN §1.2 independently of both implementations."""
    out_emas, out_counts = [], []
    for ema, count, stat, scale in zip(emas, counts, stats, scales):
        ema, count, stat = ema.double().cpu(), count.double().cpu(), stat.double().cpu()
        if torch.isfinite(stat).all():
            ema = decay * ema + (1 - decay) * scale * stat
            count = decay * count + (1 - decay)
        out_emas.append(ema)
        out_counts.append(count)
    return out_emas, out_counts


def test_fold_matches_reference_bitwise_and_float64():
    gen = torch.Generator().manual_seed(1)
    emas, counts, stats = make_layers(torch.float32, gen)
    ref_emas, ref_counts = clone(emas), clone(counts)
    exact_emas, exact_counts = fold64(emas, counts, stats, SCALES, DECAY)

    dropped = fold_statistics.fold_statistics_(emas, counts, clone(stats), SCALES, DECAY)
    ref_dropped = reference.fold_statistics_(ref_emas, ref_counts, clone(stats), SCALES, DECAY)

    assert dropped.dtype == torch.int64 and dropped.shape == () and dropped.device.type == DEVICE
    assert dropped.item() == ref_dropped.item() == 0
    for out, ref, exact in zip(emas, ref_emas, exact_emas):
        assert torch.equal(out, ref)  # same formula, same rounding of each product
        assert rel_error(out, exact) <= 1e-6
    for out, ref, exact in zip(counts, ref_counts, exact_counts):
        assert torch.equal(out, ref)
        assert rel_error(out, exact) <= 1e-6


@pytest.mark.smoke
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_nonfinite_statistics_are_dropped(dtype):
    gen = torch.Generator().manual_seed(2)
    emas, counts, stats = make_layers(dtype, gen)
    stats[1][2, 40, 3] = float("nan")  # in the layer's last block: the flag must reach block 0
    stats[4][0, 12, 12] = -float("inf")
    before_emas, before_counts = clone(emas), clone(counts)
    ref_emas, ref_counts = clone(emas), clone(counts)
    exact_emas, exact_counts = fold64(emas, counts, stats, SCALES, DECAY)

    dropped = fold_statistics.fold_statistics_(emas, counts, clone(stats), SCALES, DECAY)
    ref_dropped = reference.fold_statistics_(ref_emas, ref_counts, clone(stats), SCALES, DECAY)

    assert dropped.item() == ref_dropped.item() == 2
    for i in (1, 4):
        assert torch.equal(emas[i], before_emas[i]) and torch.equal(counts[i], before_counts[i])
    for i in (0, 2, 3):
        assert not torch.equal(emas[i], before_emas[i])
    for out, ref, exact in zip(emas + counts, ref_emas + ref_counts, exact_emas + exact_counts):
        assert torch.equal(out, ref)
        assert rel_error(out, exact) <= (1e-6 if dtype == torch.float32 else 1e-14)


def test_repeated_calls_reuse_tables_and_forget_old_drops():
    """Several steps on the same tensors: a layer dropped once is folded again once finite, the
    counter restarts at 0 every call, and a changed scale or decay is picked up."""
    gen = torch.Generator().manual_seed(3)
    emas, counts, stats = make_layers(torch.float32, gen)
    ref_emas, ref_counts = clone(emas), clone(counts)
    bad = [{0, 1}, set(), {1}, set()]
    decays = [DECAY, DECAY, 0.9, 0.9]
    for step, (bad_layers, decay) in enumerate(zip(bad, decays)):
        scales = [s * (step + 1) for s in SCALES]
        for i, shape in enumerate(SHAPES):  # refill in place: the statistics' buffers are long-lived
            stats[i].copy_(torch.randn(shape, generator=gen).to(DEVICE))
            if i in bad_layers:
                stats[i][0, 0, -1] = float("inf")
        dropped = fold_statistics.fold_statistics_(emas, counts, clone(stats), scales, decay)
        ref_dropped = reference.fold_statistics_(ref_emas, ref_counts, clone(stats), scales, decay)
        assert dropped.item() == ref_dropped.item() == len(bad_layers)
        for out, ref in zip(emas + counts, ref_emas + ref_counts):
            assert torch.equal(out, ref)


def test_deterministic():
    gen = torch.Generator().manual_seed(4)
    emas, counts, stats = make_layers(torch.float32, gen)
    stats[2][1, 4, 0] = float("nan")
    results = []
    for _ in range(2):
        e, c = clone(emas), clone(counts)
        dropped = fold_statistics.fold_statistics_(e, c, clone(stats), SCALES, DECAY)
        results.append((e, c, dropped))
    (e1, c1, d1), (e2, c2, d2) = results
    assert d1.item() == d2.item() == 1
    assert all(torch.equal(a, b) for a, b in zip(e1 + c1, e2 + c2))


def test_mixed_dtypes_and_non_contiguous_layers_through_dispatch():
    """ops.fold_statistics_ with backend="triton": float32 and float64 layers take one launch pair
    each, a non-contiguous EMA the reference; the dropped counts of all of them add up."""
    gen = torch.Generator().manual_seed(5)
    emas32, counts32, stats32 = make_layers(torch.float32, gen, SHAPES[:2])
    emas64, counts64, stats64 = make_layers(torch.float64, gen, SHAPES[2:4])
    strided_ema = torch.randn(2, 9, 9, generator=gen).to(DEVICE).mT  # a transposed view
    emas = emas32 + emas64 + [strided_ema]
    counts = counts32 + counts64 + [torch.rand((), generator=gen).to(DEVICE)]
    stats = stats32 + stats64 + [torch.randn(2, 9, 9, generator=gen).to(DEVICE)]
    stats[0][0, 3, 3] = float("nan")
    stats[3][0, 0, 0] = float("inf")
    stats[4][1, 8, 2] = float("nan")
    scales = SCALES[:4] + [0.5]
    ref_emas, ref_counts = clone(emas), clone(counts)
    exact_emas, exact_counts = fold64(emas, counts, stats, scales, DECAY)

    dropped = ops.fold_statistics_(emas, counts, clone(stats), scales, DECAY, backend="triton")
    ref_dropped = reference.fold_statistics_(ref_emas, ref_counts, clone(stats), scales, DECAY)

    assert dropped.item() == ref_dropped.item() == 3
    assert strided_ema.stride() != strided_ema.contiguous().stride()  # still the caller's view
    for out, ref, exact in zip(emas + counts, ref_emas + ref_counts, exact_emas + exact_counts):
        assert torch.equal(out, ref)
        assert rel_error(out, exact) <= 1e-6


def test_dispatch_picks_the_kernel():
    assert ops.implementation("fold_statistics_", "triton", torch.device(DEVICE)) is fold_statistics.fold_statistics_


def test_compile_specs_cover_the_launcher():
    """Both kernels for both dtypes at the launcher's block size, elementwise (no tensor cores); the
    build itself is checked for every module by test_compile_check."""
    specs = fold_statistics.compile_specs()
    configs = {(spec["kernel"], spec["constexprs"]["FP64"], spec["constexprs"]["BLOCK"], spec["num_warps"])
               for spec in specs}
    assert configs == {(name, fp64, fold_statistics.BLOCK[dtype], fold_statistics.NUM_WARPS)
                       for name in ("nonfinite_flags_kernel", "fold_kernel")
                       for dtype, fp64 in ((torch.float32, False), (torch.float64, True))}
    assert not any(spec["mma"] for spec in specs)


def unaligned(t):
    """t's values in a tensor whose data starts 4 bytes past a 16-byte boundary."""
    return torch.empty(t.numel() + 1, dtype=t.dtype, device=t.device)[1:].view(t.shape).copy_(t)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_vector_tails_and_the_scalar_variant(dtype):
    """Vector layers whose numel is not a multiple of VEC fold their tail element-wise (a tail right
    after a block boundary included) and see a non-finite entry there; unaligned layers take the
    scalar variant in their own launches; all bitwise equal to the reference."""
    launched = []  # the VEC of each launch pair
    gen = torch.Generator().manual_seed(6)
    # numel = one block + a one-element tail, 5043 (tail of 3 or 1), 49, 16 (no tail)
    block = fold_statistics.BLOCK[dtype]
    shapes = [(block + 1, 1, 1), (3, 41, 41), (1, 7, 7), (1, 4, 4), (block + 1, 1, 1), (2, 5, 5)]
    emas, counts, stats = make_layers(dtype, gen, shapes)
    for i in (4, 5):  # the last two unaligned
        emas[i], stats[i] = unaligned(emas[i]), unaligned(stats[i])
        assert emas[i].data_ptr() % 16 and stats[i].data_ptr() % 16
    stats[0].view(-1)[block] = float("nan")  # the tail after the block boundary
    stats[1].view(-1)[-1] = float("inf")  # the tail
    stats[4].view(-1)[-1] = float("nan")
    scales = [0.5, 0.25, 1 / 3, 0.125, 0.75, 1 / 9]
    for step in range(2):
        ref_emas, ref_counts = clone(emas), clone(counts)
        plans = KernelPlans()  # a plan per (device, dtype, VEC), each with its count of launch pairs
        dropped = fold_statistics.fold_statistics_(emas, counts, clone(stats), scales, DECAY, plans=plans)
        launched += [name[3] for name in plans.names() if name[0] == "fold" for _ in range(plans.held(name).epoch)]
        ref_dropped = reference.fold_statistics_(ref_emas, ref_counts, clone(stats), scales, DECAY)
        assert dropped.item() == ref_dropped.item() == (3 if step == 0 else 0)
        for out, ref in zip(emas + counts, ref_emas + ref_counts):
            assert torch.equal(out, ref)
        for stat in (stats[0], stats[1], stats[4]):
            stat.nan_to_num_(nan=1.0, posinf=2.0)
    assert sorted(launched) == sorted([fold_statistics.vector_width(dtype), 1] * 2)


@pytest.mark.parametrize("found", [0.0, 1.0])
def test_found_inf_skips_the_whole_fold_on_the_device(found):
    # GradScaler's skipped step: nothing folds, nothing counts as dropped; a clean step folds as usual
    gen = torch.Generator().manual_seed(6)
    emas, counts, stats = make_layers(torch.float32, gen)
    stats[2][1, 0, 0] = float("inf")
    before_emas, before_counts = clone(emas), clone(counts)
    ref_emas, ref_counts = clone(emas), clone(counts)
    found_inf = torch.tensor(found, device=DEVICE)
    dropped = fold_statistics.fold_statistics_(emas, counts, clone(stats), SCALES, DECAY, found_inf)
    ref_dropped = reference.fold_statistics_(ref_emas, ref_counts, clone(stats), SCALES, DECAY, found_inf)
    assert dropped.item() == ref_dropped.item() == (0 if found else 1)
    for out, ref, before in zip(emas + counts, ref_emas + ref_counts, before_emas + before_counts):
        assert torch.equal(out, ref)
        if found:
            assert torch.equal(out, before)
    if not found:
        exact_emas, _ = fold64(before_emas, before_counts, stats, SCALES, DECAY)
        assert rel_error(emas[0], exact_emas[0]) <= 1e-6
