"""The damped inverse of fastfoof.linalg (the reference op's, and the kernels' for what they do not factor):
every method, buckets, P's layout, fallbacks, synchronisations."""
import math

import pytest
import torch

from fastfoof import linalg
from fastfoof.linalg import (INVERSE_METHODS, KEPT_PREVIOUS, OK, RETRIED, bucket_dim, bucket_inverses,
                             damped_inverse_with_status)

from helpers import damped_inverse64, random_spd, rel_error, with_condition

BOUND = {torch.float32: 1e-5, torch.float64: 1e-12}  # DESIGN §4 (fp32 IEEE) and float64


@pytest.fixture
def small_leaves(monkeypatch):
    """"blocked" recurses from 17 on, so that test-sized matrices take several levels."""
    monkeypatch.setattr(linalg, "BLOCKED_LEAF_MAX", 16)


@pytest.fixture
def emulated_tf32(monkeypatch):
    """The CUDA choice of product precisions on CPU, with TF32 products emulated: operands rounded to
    TF32's 10 mantissa bits (as tensor cores read them), float32 accumulation."""
    def matmul(a, b, *, tf32):
        return _to_tf32(a) @ _to_tf32(b) if tf32 else a @ b

    monkeypatch.setattr(linalg, "matmul", matmul)
    monkeypatch.setattr(linalg, "product_precision", lambda wanted, a: wanted if a.dtype == torch.float32 else "ieee")


def _to_tf32(x):
    """x rounded to 11 significant bits (TF32's 10 stored mantissa bits)."""
    mantissa, exponent = torch.frexp(x.double())
    return torch.ldexp(torch.round(mantissa * 2048) / 2048, exponent).float()


def count_host_reads(monkeypatch) -> dict:
    """Calls of the tensor methods that read device memory on the host."""
    counts = {"cpu": 0, "item": 0, "tolist": 0}
    for name in counts:
        original = getattr(torch.Tensor, name)

        def counting(self, *args, _name=name, _original=original, **kwargs):
            counts[_name] += 1
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, name, counting)
    return counts


def starts_near(mats, damping, scale=0.8):
    """Previous P's with residual I − A·P = (1 − scale)·I: what Newton–Schulz may start from."""
    return [(scale * damped_inverse64(m, damping)).to(m.dtype) for m in mats]


def assert_layout(p: torch.Tensor):
    """DESIGN-level contract for the update kernel: rows 16-byte aligned, padding zero."""
    groups, dim = p.shape[0], p.shape[-1]
    row = -(-dim // 4) * 4
    assert p.stride() == (dim * row, row, 1) and p.data_ptr() % 16 == 0
    padded = torch.as_strided(p, (groups, dim, row), p.stride())
    assert torch.equal(padded[..., dim:], torch.zeros_like(padded[..., dim:]))


def test_bucket_sizes():
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert [bucket_dim(d, cpu) for d in (1, 10, 65, 577)] == [1, 10, 65, 577]
    assert [bucket_dim(d, cuda) for d in (1, 10, 16, 17, 33, 64, 65, 128, 129, 577)] == \
        [16, 16, 16, 32, 64, 64, 128, 128, 129, 577]


def test_identity_padded_bucket_matches_exact_sizes():
    gen = torch.Generator().manual_seed(0)
    mats = [random_spd(3, 5, gen), random_spd(2, 17, gen), random_spd(1, 30, gen)]
    scales = [torch.tensor(0.5), None, torch.tensor(3.0)]
    padded, failed = bucket_inverses(mats, 0.3, scales, 32)
    for m, s, p, f in zip(mats, scales, padded, failed):
        expected = damped_inverse64(m.double() * (1.0 if s is None else s.double()), 0.3)
        assert p.shape == m.shape
        assert rel_error(p, expected) < 1e-5
        assert not f.any()


@pytest.mark.smoke
@pytest.mark.parametrize("method", INVERSE_METHODS)
def test_every_method_mixed_sizes_dtypes_scales(method, small_leaves):
    gen = torch.Generator().manual_seed(1)
    mats = [random_spd(2, 7, gen), random_spd(1, 7, gen, torch.float64), random_spd(3, 131, gen),
            random_spd(1, 37, gen), random_spd(2, 64, gen, torch.float64), random_spd(1, 1, gen)]
    scales = [None, torch.tensor(0.5, dtype=torch.float64), torch.tensor(2.0), None, torch.tensor(3.0), None]
    truth = [damped_inverse64(m.double() * (1.0 if s is None else s.double()), 0.05) for m, s in zip(mats, scales)]
    previous = [(0.8 * t).to(m.dtype) for m, t in zip(mats, truth)]
    inverses, status = damped_inverse_with_status(mats, 0.05, scales=scales, previous=previous, method=method)
    for m, p, code, t in zip(mats, inverses, status, truth):
        assert p.dtype == m.dtype and p.shape == m.shape
        assert rel_error(p, t) < BOUND[m.dtype], (method, m.shape, m.dtype)
        assert torch.equal(p, p.mT)
        assert code.dtype == torch.int8 and code.tolist() == [OK] * m.shape[0]
        assert_layout(p)


@pytest.mark.parametrize("method", INVERSE_METHODS)
def test_lower_triangle_rules(method, small_leaves):
    gen = torch.Generator().manual_seed(2)
    m = random_spd(2, 41, gen)
    m = m + 1e-3 * torch.randn(m.shape, generator=gen)  # not symmetric: the lower triangle is the matrix
    lower = torch.tril(m) + torch.tril(m, -1).mT
    (p,), _ = damped_inverse_with_status([m], 0.1, previous=starts_near([lower], 0.1), method=method)
    assert torch.equal(p, p.mT)
    assert rel_error(p, damped_inverse64(lower, 0.1)) < 1e-5


@pytest.mark.parametrize("cond", [1e2, 1e4, 1e6])
def test_blocked_as_accurate_as_lapack(cond, small_leaves):
    """Recursive block Cholesky with explicit triangular inverses: potri's error (about cond·u), not
    the cond^1.5 growth of a Schur-complement recursion."""
    gen = torch.Generator().manual_seed(3)
    m = with_condition(2, 97, cond, 1e-4, gen)
    truth = damped_inverse64(m, 1e-4)
    errors = {method: rel_error(damped_inverse_with_status([m], 1e-4, method=method)[0][0], truth)
              for method in ("cholesky", "blocked")}
    assert errors["blocked"] < max(3 * errors["cholesky"], 1e-6), errors


@pytest.mark.parametrize("cond", [1e2, 1e4, 1e6])
def test_tf32x3_products_keep_float32_accuracy(cond, small_leaves, emulated_tf32):
    """With tensor-core rounding emulated, split-TF32 products keep the blocked inverse as accurate as
    IEEE float32, and plain TF32 ones would not (so the emulation bites)."""
    gen = torch.Generator().manual_seed(4)
    m = with_condition(2, 97, cond, 1e-4, gen)
    truth = damped_inverse64(m, 1e-4)
    a = m.clone()
    a.diagonal(dim1=-2, dim2=-1).add_(1e-4)
    ieee, tf32x3, tf32 = (rel_error(linalg.blocked_inverse(a, precision, [])[0], truth)
                          for precision in ("ieee", "tf32x3", "tf32"))
    assert tf32x3 < max(2 * ieee, 1e-6), (ieee, tf32x3)
    assert tf32 > 50 * max(ieee, 1e-6), (ieee, tf32)
    (p,), (code,) = damped_inverse_with_status([m], 1e-4, method="blocked_tf32x3")
    assert rel_error(p, truth) == pytest.approx(tf32x3) and code.tolist() == [OK, OK]


def test_newton_schulz_serves_good_starts_without_cholesky(monkeypatch):
    gen = torch.Generator().manual_seed(5)
    mats = [random_spd(3, 29, gen), random_spd(1, 70, gen)]
    calls = []
    factor = linalg.factor_inverses
    monkeypatch.setattr(linalg, "factor_inverses", lambda ms, *a: calls.append(len(ms)) or factor(ms, *a))
    reads = count_host_reads(monkeypatch)
    inverses, status = damped_inverse_with_status(mats, 0.2, previous=starts_near(mats, 0.2), method="newton_schulz")
    assert calls == [] and reads == {"cpu": 1, "item": 0, "tolist": 0}
    for m, p, code in zip(mats, inverses, status):
        a = m.double() + 0.2 * torch.eye(m.shape[-1], dtype=torch.float64)
        residual = torch.linalg.matrix_norm(a @ p.double() - torch.eye(m.shape[-1], dtype=torch.float64))
        assert (residual / math.sqrt(m.shape[-1]) <= linalg.NEWTON_SCHULZ_TOLERANCE).all()
        assert rel_error(p, damped_inverse64(m, 0.2)) < 1e-5  # (0.2)^(2^3) from these starts
        assert code.tolist() == [OK] * m.shape[0]


def test_newton_schulz_misses_take_cholesky_per_matrix(monkeypatch):
    gen = torch.Generator().manual_seed(6)
    m = random_spd(3, 29, gen)
    starts = starts_near([m], 0.2)[0]
    starts[1] = torch.randn(29, 29, generator=gen)  # diverges
    starts[2] = starts[2] * 1e-3  # converges, too slowly for NEWTON_SCHULZ_STEPS
    calls = []
    factor = linalg.factor_inverses
    monkeypatch.setattr(linalg, "factor_inverses",
                        lambda ms, *a: calls.append([x.shape[0] for x in ms]) or factor(ms, *a))
    reads = count_host_reads(monkeypatch)
    (p,), (code,) = damped_inverse_with_status([m], 0.2, previous=[starts], method="newton_schulz")
    assert calls == [[2]]  # the two missed matrices, together
    assert reads == {"cpu": 2, "item": 0, "tolist": 0}  # the second read decides Cholesky's fallbacks
    assert code.tolist() == [OK, OK, OK]
    for k in range(3):  # only a Cholesky result is accurate from those starts
        assert rel_error(p[k], damped_inverse64(m[k], 0.2)) < 1e-5


def test_newton_schulz_only_for_float32_starts_of_the_same_shape(monkeypatch):
    gen = torch.Generator().manual_seed(7)
    mats = [random_spd(1, 9, gen, torch.float64), random_spd(2, 9, gen), random_spd(1, 9, gen)]
    previous = [damped_inverse64(mats[0], 0.1), starts_near(mats[1:2], 0.1)[0][:1], None]
    served = []
    ns = linalg.newton_schulz_inverses
    monkeypatch.setattr(linalg, "newton_schulz_inverses", lambda ms, *a: served.append(len(ms)) or ns(ms, *a))
    inverses, status = damped_inverse_with_status(mats, 0.1, previous=previous, method="newton_schulz")
    assert served == []
    for m, p in zip(mats, inverses):
        assert rel_error(p, damped_inverse64(m, 0.1)) < BOUND[m.dtype]


@pytest.mark.smoke
@pytest.mark.parametrize("method", INVERSE_METHODS)
def test_fallbacks_per_matrix_and_one_synchronisation(method, monkeypatch, small_leaves):
    gen = torch.Generator().manual_seed(2)
    dim = 19  # > the blocked leaves of the fixture: failures inside the recursion
    good = random_spd(1, dim, gen)
    indefinite = random_spd(1, dim, gen) - 50.0 * torch.eye(dim)
    nan = random_spd(1, dim, gen)
    nan[0, dim - 1, 4] = nan[0, 4, dim - 1] = float("nan")  # in the second half's block row
    u = torch.randint(0, 2, (1, dim, 1), generator=gen).float() * 2 - 1
    rank_one = u @ u.mT  # fp32: (1 + 1e-9) rounds to 1, the second pivot is 0; float64 factors it
    other = random_spd(2, 40, gen)
    mats = [torch.cat([good, indefinite, nan, rank_one]), other]
    # Positive definite starts, as every P is: Newton–Schulz cannot converge to an indefinite inverse.
    previous = [torch.cat(starts_near([good, random_spd(3, dim, gen)], 1e-9)), starts_near([other], 1e-9)[0]]
    reads = count_host_reads(monkeypatch)
    (p, q), (code, code_q) = damped_inverse_with_status(mats, 1e-9, previous=previous, method=method)
    # Newton–Schulz: the three bad matrices miss, then Cholesky's fallbacks need a second read.
    assert reads == {"cpu": 2 if method == "newton_schulz" else 1, "item": 0, "tolist": 0}
    assert code.tolist() == [OK, KEPT_PREVIOUS, KEPT_PREVIOUS, RETRIED] and code_q.tolist() == [OK, OK]
    assert torch.isfinite(p).all()
    assert torch.equal(p[1], previous[0][1]) and torch.equal(p[2], previous[0][2])
    assert rel_error(p[0], damped_inverse64(good[0], 1e-9)) < 1e-5
    assert rel_error(p[3], damped_inverse64(rank_one[0], 1e-9)) < 1e-6
    assert rel_error(q, damped_inverse64(other, 1e-9)) < 1e-5
    assert_layout(p)
    assert_layout(q)
    (p,), (code,) = damped_inverse_with_status([indefinite], 0.5, method=method)
    assert code.tolist() == [KEPT_PREVIOUS] and torch.equal(p[0], torch.eye(dim) / 0.5)


@pytest.mark.parametrize("method", INVERSE_METHODS)
def test_non_finite_factor_fails_even_where_the_inverse_is_finite(method, small_leaves):
    m = torch.eye(20).unsqueeze(0)
    m[0, 17, 17] = float("inf")  # cholesky: L = inf there, the inverse's entry 1/inf = 0 looks finite
    (p,), (code,) = damped_inverse_with_status([m], 1.0, previous=[torch.eye(20).unsqueeze(0) / 2], method=method)
    assert code.tolist() == [KEPT_PREVIOUS] and torch.equal(p[0], torch.eye(20) / 2)


def test_cpu_inverse_routes_agree():
    gen = torch.Generator().manual_seed(3)
    for dim in (linalg.TRIANGULAR_SOLVE_MAX_CPU, linalg.TRIANGULAR_SOLVE_MAX_CPU + 3):
        m = random_spd(1, dim, gen, torch.float64)
        inv, failed = linalg.cholesky_inverse(m + torch.eye(dim, dtype=torch.float64))
        assert failed.tolist() == [False]
        assert rel_error(inv, damped_inverse64(m, 1.0)) < 1e-12


def test_large_matrices_factored_one_by_one():
    gen = torch.Generator().manual_seed(4)
    dim = linalg.BATCHED_FACTOR_MAX + 3  # one by one on CPU and CUDA
    m = random_spd(2, dim, gen)
    m[1] -= 100.0 * torch.eye(dim)
    previous = torch.randn(2, dim, dim, generator=gen)
    (p, q), (code, code_q) = damped_inverse_with_status([m, m[:1]], 0.1, scales=[torch.tensor(0.5), None],
                                            previous=[previous, None], method="cholesky")
    assert code.tolist() == [OK, KEPT_PREVIOUS] and code_q.tolist() == [OK]
    assert rel_error(p[0], damped_inverse64(0.5 * m[0].double(), 0.1)) < 1e-5
    assert torch.equal(p[1], previous[1])
    assert rel_error(q, damped_inverse64(m[:1], 0.1)) < 1e-5
    assert_layout(p)
    assert_layout(q)


def test_blocked_at_its_real_leaf_size():
    """One level of the recursion with the library's BLOCKED_LEAF_MAX, odd size."""
    gen = torch.Generator().manual_seed(8)
    m = random_spd(1, linalg.BLOCKED_LEAF_MAX + 5, gen)
    (p,), (code,) = damped_inverse_with_status([m], 0.3, method="blocked")
    assert rel_error(p, damped_inverse64(m, 0.3)) < 1e-5 and code.tolist() == [OK]
    assert_layout(p)


def test_method_from_the_environment(monkeypatch, small_leaves):
    gen = torch.Generator().manual_seed(9)
    m = random_spd(1, 30, gen)
    calls = []
    blocked = linalg.blocked_inverses
    monkeypatch.setattr(linalg, "blocked_inverses", lambda ms, *a: calls.append(len(ms)) or blocked(ms, *a))
    monkeypatch.setenv("FASTFOOF_INVERSE", "blocked")
    damped_inverse_with_status([m], 0.1)
    assert calls == [1]
    damped_inverse_with_status([m], 0.1, method="cholesky")
    assert calls == [1]
    monkeypatch.setenv("FASTFOOF_INVERSE", "lu")
    with pytest.raises(ValueError, match="method"):
        damped_inverse_with_status([m], 0.1)


def test_matmul_precision_switch_restores_the_callers_setting():
    """The CUDA products force their precision through torch's global flag, then put it back."""
    saved, saved_cuda = torch.get_float32_matmul_precision(), torch.backends.cuda.matmul.fp32_precision
    try:
        torch.set_float32_matmul_precision("high")
        with linalg.float32_matmul_precision("highest"):
            assert torch.get_float32_matmul_precision() == "highest"
            assert torch.backends.cuda.matmul.fp32_precision == "ieee"
        assert torch.get_float32_matmul_precision() == "high"
        assert torch.backends.cuda.matmul.fp32_precision == "tf32"
    finally:
        torch.set_float32_matmul_precision(saved)
        torch.backends.cuda.matmul.fp32_precision = saved_cuda


def test_tf32_split_is_exact():
    gen = torch.Generator().manual_seed(10)
    x = torch.randn(7, 9, generator=gen) * torch.logspace(-20, 20, 9)
    hi, lo = linalg.split_tf32(x.mT)
    assert torch.equal(hi + lo, x.mT)
    assert torch.equal(hi, _to_tf32(hi)) and (lo.abs() <= 2.0 ** -11 * x.mT.abs()).all()


def test_optimizer_state_holds_p_in_its_layout():
    """P as the optimizer keeps it (D' = 6 pads, D' = 12 does not), through torch.save and load."""
    import io

    import fastfoof
    from torch import nn

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 11), nn.Tanh(), nn.Linear(11, 3))
    opt = fastfoof.FOOF(model, lr=0.1, damping=0.5, inv_period=1, stats_steps=1, backend="reference")
    x = torch.randn(8, 5)
    model(x).square().sum().backward()
    opt.step()
    for layer in opt.layers:
        assert_layout(opt.state[layer.weight]["precond"])
    buffer = io.BytesIO()
    torch.save(opt.state_dict(), buffer)
    twin = fastfoof.FOOF(model, lr=0.1, damping=0.5, inv_period=1, stats_steps=1, backend="reference")
    twin.load_state_dict(torch.load(io.BytesIO(buffer.getvalue())))
    for layer in opt.layers:
        assert torch.equal(twin.state[layer.weight]["precond"], opt.state[layer.weight]["precond"])
