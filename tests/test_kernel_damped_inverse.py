"""The Triton damped-inverse kernel (interpreter on CPU) against float64 torch.linalg.inv."""
import pytest
import torch

from fastfoof import linalg, ops
from fastfoof.kernels import damped_inverse as kernel
from fastfoof.linalg import INVERSE_METHODS, KEPT_PREVIOUS, OK, RETRIED

from helpers import damped_inverse64, random_spd, rel_error, with_condition
from test_damped_inverse import assert_layout


DEVICE = "cuda" if torch.cuda.is_available() else "cpu"  # CPU: through TRITON_INTERPRET=1 (conftest)


def run_kernel(mats, damping, *, scales=None, previous=None, method=None):
    """The Triton launcher on DEVICE; results back on the CPU."""
    to = (lambda ts: None if ts is None else [None if t is None else t.to(DEVICE) for t in ts])
    inverses, status = kernel.damped_inverse_with_status(to(mats), damping, scales=to(scales),
                                                         previous=to(previous), method=method)
    return [p.cpu() for p in inverses], [c.cpu() for c in status]


def bound(cond: float) -> float:
    """DESIGN §4's fp32 bound, grown with the conditioning as fp32 Cholesky's error does (≈ cond·u/6)."""
    return 1e-5 + cond * 2.0 ** -26


def test_mixed_sizes_scales_and_damping_in_one_call():
    gen = torch.Generator().manual_seed(0)
    shapes = [(3, 1), (2, 5), (4, 10), (1, 16), (2, 17), (1, 31), (1, 33), (1, 64), (1, 70)]
    mats = [random_spd(g, d, gen) for g, d in shapes]
    scales = [torch.rand((), generator=gen) + 0.5 if i % 2 else None for i in range(len(mats))]
    for damping in (1e-3, 0.37, 10.0):
        inverses, status = run_kernel(mats, damping, scales=scales)
        for m, s, p, code in zip(mats, scales, inverses, status):
            expected = damped_inverse64(m.double() * (1.0 if s is None else s.double()), damping)
            assert p.shape == m.shape and p.dtype == torch.float32
            assert rel_error(p, expected) < 1e-5, (m.shape, damping)
            assert code.dtype == torch.int8 and code.tolist() == [OK] * m.shape[0]


@pytest.mark.smoke
@pytest.mark.parametrize("cond", [1.0, 1e2, 1e4, 1e6])
@pytest.mark.parametrize("dim", [7, 33, 64])
def test_conditioning(dim, cond):
    gen = torch.Generator().manual_seed(dim)
    damping = 1e-4
    m = with_condition(2, dim, cond, damping, gen)
    (p,), (code,) = run_kernel([m], damping)
    assert rel_error(p, damped_inverse64(m, damping)) < bound(cond)
    assert code.tolist() == [OK, OK]


def test_output_exactly_symmetric():
    gen = torch.Generator().manual_seed(1)
    m = random_spd(3, 23, gen)
    m = m + 1e-3 * torch.randn(m.shape, generator=gen)  # slightly asymmetric input: lower triangle rules
    (p,), _ = run_kernel([m], 0.1)
    assert torch.equal(p, p.mT)
    lower = torch.tril(m) + torch.tril(m, -1).mT
    assert rel_error(p, damped_inverse64(lower, 0.1)) < 1e-5


@pytest.mark.parametrize("dim,padded", [(11, 16), (17, 32), (40, 64)])
def test_identity_padding_changes_nothing(dim, padded):
    """blockdiag(M, (1−λ)I) + λI = blockdiag(M + λI, I): its inverse's top-left block is the answer."""
    gen = torch.Generator().manual_seed(dim)
    damping = 0.25
    m = random_spd(2, dim, gen)
    explicit = torch.zeros(2, padded, padded)
    explicit[:, :dim, :dim] = m
    explicit[:, dim:, dim:] = (1 - damping) * torch.eye(padded - dim)
    (p, p_padded), _ = run_kernel([m, explicit], damping)
    assert rel_error(p_padded[:, :dim, :dim], p) < 1e-6
    assert rel_error(p_padded[:, dim:, dim:], torch.eye(padded - dim).expand(2, -1, -1)) < 1e-6
    assert rel_error(p, damped_inverse64(m, damping)) < 1e-5


def test_non_positive_definite_falls_back_and_stays_finite():
    gen = torch.Generator().manual_seed(2)
    damping = 0.5
    good = random_spd(1, 13, gen)
    indefinite = random_spd(1, 13, gen) - 50.0 * torch.eye(13)  # fails in float64 too
    nan = random_spd(1, 13, gen)
    nan[0, 3, 3] = float("nan")
    u = torch.randint(0, 2, (1, 13, 1), generator=gen).float() * 2 - 1
    rank_one = u @ u.mT  # fp32 pivots (1 + 1e-9) − 1 round to 0; float64 factors it
    previous = torch.randn(1, 13, 13, generator=gen)
    mats = torch.cat([good, indefinite, nan, rank_one])
    (p,), (code,) = run_kernel([mats], damping,
                                          previous=[previous.expand(4, -1, -1).contiguous()])
    assert torch.isfinite(p).all()
    assert code.tolist() == [OK, KEPT_PREVIOUS, KEPT_PREVIOUS, OK]
    assert torch.equal(p[1], previous[0]) and torch.equal(p[2], previous[0])

    (p,), (code,) = run_kernel([torch.cat([rank_one, indefinite, good])], 1e-9)
    assert code.tolist() == [RETRIED, KEPT_PREVIOUS, OK]
    assert torch.isfinite(p).all()
    assert rel_error(p[0], damped_inverse64(rank_one[0], 1e-9)) < 1e-6
    assert torch.equal(p[1], torch.eye(13) / 1e-9)  # no previous: identity/λ


def test_fallback_covers_the_torch_buckets_and_float64():
    gen = torch.Generator().manual_seed(4)
    large = random_spd(2, 67, gen)
    large[1] -= 100.0 * torch.eye(67)
    small64 = random_spd(2, 9, gen).double()
    small64[0, 0, 0] = float("inf")
    inverses, status = run_kernel([large, small64], 0.2)
    assert [c.tolist() for c in status] == [[OK, KEPT_PREVIOUS], [KEPT_PREVIOUS, OK]]
    assert inverses[1].dtype == torch.float64
    assert rel_error(inverses[0][0], damped_inverse64(large[0], 0.2)) < 1e-5
    assert rel_error(inverses[1][1], damped_inverse64(small64[1], 0.2)) < 1e-12
    assert all(torch.isfinite(p).all() for p in inverses)


def test_dispatch_runs_the_kernel_with_device_scales():
    gen = torch.Generator().manual_seed(6)
    mats = [random_spd(2, 12, gen), random_spd(1, 30, gen)]
    scales = [torch.tensor(0.25), torch.tensor(2.0)]
    mats, scales = [m.to(DEVICE) for m in mats], [s.to(DEVICE) for s in scales]
    inverses, status = ops.damped_inverse_with_status(mats, 0.1, scales=scales, backend="triton")
    for m, s, p in zip(mats, scales, inverses):
        assert rel_error(p.cpu(), damped_inverse64(m.cpu().double() * s.cpu().double(), 0.1)) < 1e-5
    plain = ops.damped_inverse(mats, 0.1, backend="triton")
    assert rel_error(plain[0].cpu(), damped_inverse64(mats[0].cpu(), 0.1)) < 1e-5


def test_compile_specs_cover_every_bucket():
    blocks = {spec["constexprs"]["BLOCK"] for spec in kernel.compile_specs()}
    assert blocks == {kernel.kernel_block(d) for d in range(1, kernel.KERNEL_MAX_DIM + 1)}


def test_kernel_writes_p_layout():
    """Rows padded to 16 bytes by the kernel itself: D = 5, 10, 33 pad, D = 12, 64 do not."""
    gen = torch.Generator().manual_seed(7)
    mats = [random_spd(g, d, gen) for g, d in [(3, 5), (2, 10), (1, 33), (2, 12), (1, 64)]]
    inverses, _ = kernel.damped_inverse_with_status([m.to(DEVICE) for m in mats], 0.3)
    for m, p in zip(mats, inverses):
        assert_layout(p)
        assert rel_error(p.cpu(), damped_inverse64(m, 0.3)) < 1e-5


@pytest.mark.parametrize("method", INVERSE_METHODS)
def test_every_method_with_the_kernel_and_fallbacks(method, monkeypatch):
    """Kernel-sized and larger matrices, starts for Newton–Schulz, a failure in each route."""
    monkeypatch.setattr(linalg, "BLOCKED_LEAF_MAX", 16)
    gen = torch.Generator().manual_seed(8)
    small, large = random_spd(3, 13, gen), random_spd(2, 67, gen)
    previous = [(0.8 * damped_inverse64(m, 0.4)).float() for m in (small, large)]  # positive definite
    small[1] -= 50.0 * torch.eye(13)
    large[0] -= 50.0 * torch.eye(67)
    mats = [small, large]
    truth = [damped_inverse64(m, 0.4) for m in mats]
    inverses, status = run_kernel(mats, 0.4, previous=previous, method=method)
    assert [c.tolist() for c in status] == [[OK, KEPT_PREVIOUS, OK], [KEPT_PREVIOUS, OK]]
    for p, t, good in zip(inverses, truth, ([0, 2], [1])):
        assert rel_error(p[good], t[good]) < 1e-5
    assert torch.equal(inverses[0][1], previous[0][1]) and torch.equal(inverses[1][0], previous[1][0])


@pytest.mark.parametrize("cond", [1e2, 1e5])
def test_matmul_methods_on_the_device(cond):
    """On CUDA: real TF32 tensor cores in the split products, and IEEE products forced while the
    caller has TF32 on globally. One level of the blocked recursion at its real leaf size."""
    gen = torch.Generator().manual_seed(9)
    dim = linalg.BLOCKED_LEAF_MAX + 37
    m = with_condition(1, dim, cond, 1e-3, gen)
    truth = damped_inverse64(m, 1e-3)
    saved, saved_cuda = torch.get_float32_matmul_precision(), torch.backends.cuda.matmul.fp32_precision
    try:
        torch.set_float32_matmul_precision("high")  # TF32 for the caller's float32 matmuls
        cholesky = rel_error(run_kernel([m], 1e-3, method="cholesky")[0][0], truth)
        previous = [(0.8 * truth).float()]
        errors = {method: rel_error(run_kernel([m], 1e-3, previous=previous, method=method)[0][0], truth)
                  for method in ("blocked", "blocked_tf32x3", "newton_schulz")}
    finally:
        torch.set_float32_matmul_precision(saved)
        torch.backends.cuda.matmul.fp32_precision = saved_cuda
    assert cholesky < bound(cond)
    assert errors["blocked"] < max(3 * cholesky, 1e-6) and errors["blocked_tf32x3"] < max(3 * cholesky, 1e-6)
    assert errors["newton_schulz"] < (1e-5 if cond < 1e3 else bound(cond))
