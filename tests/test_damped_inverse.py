"""The reference damped inverse: buckets, identity padding, fallbacks, one synchronisation."""
import torch

from fastfoof import reference
from fastfoof.reference import KEPT_PREVIOUS, OK, RETRIED, bucket_dim, bucket_inverses, damped_inverse

from helpers import damped_inverse64, random_spd, rel_error



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
        assert p.shape == m.shape and p.is_contiguous()
        assert rel_error(p, expected) < 1e-5
        assert not f.any()


def test_mixed_sizes_and_dtypes():
    gen = torch.Generator().manual_seed(1)
    mats = [random_spd(2, 7, gen), random_spd(1, 7, gen, torch.float64), random_spd(3, 131, gen),
            random_spd(1, 7, gen)]
    inverses, status = damped_inverse(mats, 0.05)
    for m, p, code in zip(mats, inverses, status):
        assert p.dtype == m.dtype and p.shape == m.shape
        assert rel_error(p, damped_inverse64(m, 0.05)) < (1e-12 if m.dtype == torch.float64 else 1e-5)
        assert torch.equal(p, p.mT)
        assert code.dtype == torch.int8 and code.tolist() == [OK] * m.shape[0]


def test_fallbacks_per_matrix_and_one_synchronisation(monkeypatch):
    gen = torch.Generator().manual_seed(2)
    good = random_spd(1, 9, gen)
    indefinite = random_spd(1, 9, gen) - 50.0 * torch.eye(9)
    nan = random_spd(1, 9, gen)
    nan[0, 0, 4] = nan[0, 4, 0] = float("nan")
    u = torch.randint(0, 2, (1, 9, 1), generator=gen).float() * 2 - 1
    rank_one = u @ u.mT  # fp32: (1 + 1e-9) rounds to 1, the second pivot is 0; float64 factors it
    previous = torch.randn(4, 9, 9, generator=gen)
    syncs = []
    cpu = torch.Tensor.cpu
    monkeypatch.setattr(torch.Tensor, "cpu", lambda self, *a, **k: syncs.append(1) or cpu(self, *a, **k))
    (p, q), (code, code_q) = damped_inverse([torch.cat([good, indefinite, nan, rank_one]), random_spd(2, 40, gen)],
                                            1e-9, previous=[previous, None])
    assert len(syncs) == 1
    assert code.tolist() == [OK, KEPT_PREVIOUS, KEPT_PREVIOUS, RETRIED] and code_q.tolist() == [OK, OK]
    assert torch.isfinite(p).all()
    assert torch.equal(p[1], previous[1]) and torch.equal(p[2], previous[2])
    assert rel_error(p[3], damped_inverse64(rank_one[0], 1e-9)) < 1e-6
    (p,), (code,) = damped_inverse([indefinite], 0.5)
    assert code.tolist() == [KEPT_PREVIOUS] and torch.equal(p[0], torch.eye(9) / 0.5)


def test_non_finite_factor_fails_even_where_the_inverse_is_finite():
    m = torch.eye(4).unsqueeze(0)
    m[0, 0, 0] = float("inf")  # cholesky: L00 = inf, the inverse's entry 1/inf = 0 looks finite
    (p,), (code,) = damped_inverse([m], 1.0)
    assert code.tolist() == [KEPT_PREVIOUS] and torch.equal(p[0], torch.eye(4))


def test_cpu_inverse_routes_agree():
    gen = torch.Generator().manual_seed(3)
    for dim in (reference.TRIANGULAR_SOLVE_MAX_CPU, reference.TRIANGULAR_SOLVE_MAX_CPU + 3):
        m = random_spd(1, dim, gen, torch.float64)
        inv, info = reference._cholesky_inverse(m + torch.eye(dim, dtype=torch.float64))
        assert info.tolist() == [0]
        assert rel_error(inv, damped_inverse64(m, 1.0)) < 1e-12


def test_large_matrices_factored_one_by_one():
    gen = torch.Generator().manual_seed(4)
    dim = reference.BATCHED_FACTOR_MAX + 3  # one by one on CPU and CUDA
    m = random_spd(2, dim, gen)
    m[1] -= 100.0 * torch.eye(dim)
    previous = torch.randn(2, dim, dim, generator=gen)
    (p, q), (code, code_q) = damped_inverse([m, m[:1]], 0.1, scales=[torch.tensor(0.5), None],
                                            previous=[previous, None])
    assert code.tolist() == [OK, KEPT_PREVIOUS] and code_q.tolist() == [OK]
    assert rel_error(p[0], damped_inverse64(0.5 * m[0].double(), 0.1)) < 1e-5
    assert torch.equal(p[1], previous[1])
    assert rel_error(q, damped_inverse64(m[:1], 0.1)) < 1e-5
