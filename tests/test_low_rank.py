"""The low-rank preconditioner (DESIGN §1.3, `rank`): the randomized top eigenpairs against exact
float64 truncations, the dense P where the rank covers the statistic, the fallbacks, and FOOF and
KFAC with `rank` against their dense selves."""
import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fastfoof
from fastfoof import ops, reference
from fastfoof.reference import KEPT_PREVIOUS, OK, RETRIED
from helpers import damped_inverse64, rel_error


def rotated(groups, eigenvalues, gen):
    """[groups, D, D] float64 with the given spectrum in a random basis."""
    dim = eigenvalues.shape[-1]
    q, _ = torch.linalg.qr(torch.randn(groups, dim, dim, generator=gen, dtype=torch.float64))
    return (q * eigenvalues) @ q.mT


def relu_conv_gram(groups, dim, gen):
    """The patch gram of ReLU'd, spatially smoothed random images (a conv layer's Σ): 3×3 patches of
    (dim − 1) / 9 channels plus the bias row."""
    channels = (dim - 1) // 9
    x = torch.randn(groups * 24, channels, 13, 11, generator=gen, dtype=torch.float64)
    x = F.avg_pool2d(x, 3, 1, 1).relu()
    a = F.unfold(x, 3, padding=1).reshape(groups, 24, channels * 9, -1).transpose(1, 2)
    a = a.reshape(groups, channels * 9, -1)
    a = torch.cat([a, torch.ones(groups, 1, a.shape[-1], dtype=torch.float64)], 1)
    return a @ a.mT / 24


def wishart(groups, dim, samples, gen):
    """A·Aᵀ/dim of Gaussian A [dim, samples]: a flat spectrum, the hardest for a low-rank method."""
    a = torch.randn(groups, dim, samples, generator=gen, dtype=torch.float64)
    return a @ a.mT / dim


DIM = 397  # odd, 44 channels × 9 + 1
k = torch.arange(1, DIM + 1, dtype=torch.float64)
SPECTRA = {
    "wishart": lambda gen: wishart(2, DIM, 2 * DIM + 3, gen),
    "wishart-short": lambda gen: wishart(2, DIM, 301, gen),
    "power-0.5": lambda gen: rotated(2, k ** -0.5, gen),
    "power-1": lambda gen: rotated(2, k ** -1.0, gen),
    "power-2": lambda gen: rotated(2, k ** -2.0, gen),
    "exponential": lambda gen: rotated(2, torch.exp(-k / 30), gen),
    "relu-conv-gram": lambda gen: relu_conv_gram(2, DIM, gen),
}


@pytest.mark.parametrize("rank", [19, 64, 150])
@pytest.mark.parametrize("spectrum", list(SPECTRA))
def test_top_eigenpairs_within_1_05_of_the_exact_truncation(spectrum, rank):
    """float32 statistics, as FOOF keeps them: ‖s·M − Q diag(s) Qᵀ‖_F ≤ 1.05 × the best rank-r error."""
    gen = torch.Generator().manual_seed(list(SPECTRA).index(spectrum) * 1000 + rank)
    m = SPECTRA[spectrum](gen)
    scale = torch.tensor(1 / 0.64)  # a bias-corrected EMA: Σ̂ = Σ/n
    (s, q), = ops.top_eigenpairs_with_status([m.float()], rank, 0.1, scales=[scale])[0]
    assert s.shape == (2, rank) and q.shape == (2, DIM, rank) and s.dtype == q.dtype == torch.float32
    target = m * scale.double()
    error = torch.linalg.matrix_norm(target - (q.double() * s.double()[:, None]) @ q.double().mT)
    eigenvalues = torch.linalg.eigvalsh(target)
    best = eigenvalues[:, :-rank].pow(2).sum(-1).sqrt()
    assert (error <= 1.05 * best).all(), (error / best).tolist()
    assert (s[:, :-1] >= s[:, 1:]).all()  # descending
    assert rel_error(q.mT @ q, torch.eye(rank).expand(2, -1, -1)) <= 1e-5


def dense_from_pairs(s, q, damping):
    """(Q diag(s) Qᵀ + λI)⁻¹ in float64, for checks only."""
    m = (q.double() * s.double()[:, None]) @ q.double().mT
    return damped_inverse64(m, damping)


def test_equals_the_dense_inverse_where_the_rank_covers_the_statistic():
    """float64: a statistic of rank 9 ≤ r = 12 (D' = 53) gives (Σ̂_r + λI)⁻¹ = (Σ̂ + λI)⁻¹, and the update
    (Ĝ − (Ĝ·Q)·diag(s/(s+λ))·Qᵀ)/λ is Ĝ·P."""
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(3, 53, 9, generator=gen, dtype=torch.float64)
    m = a @ a.mT
    (s, q), = ops.top_eigenpairs_with_status([m], 12, 0.3)[0]
    assert rel_error(dense_from_pairs(s, q, 0.3), damped_inverse64(m, 0.3)) <= 1e-12
    weight = torch.randn(15, 52, generator=gen, dtype=torch.float64)
    bias = torch.randn(15, generator=gen, dtype=torch.float64)
    weight.grad, bias.grad = torch.randn_like(weight), torch.randn_like(bias)
    group = dict(lr=1.0, momentum=0.0, dampening=0.0, nesterov=False, weight_decay=0.0)
    block = fastfoof.layers.Block([weight, bias], [group, group], 3, eigvecs=q, eigvals=s)
    expected = torch.cat([weight.grad, bias.grad[:, None]], 1).reshape(3, 5, 53) @ damped_inverse64(m, 0.3)
    before = [weight.clone(), bias.clone()]
    ops.preconditioned_update_([block], [None, None], damping=0.3, backend="reference")
    assert rel_error(before[0] - weight, expected[..., :52].reshape(15, 52)) <= 1e-12
    assert rel_error(before[1] - bias, expected[..., 52].reshape(15)) <= 1e-12


def test_failed_decompositions_retry_then_keep_the_previous_pairs():
    """Non-finite, or Σ̂_r + λI indefinite (top eigenvalue −5 ≤ −λ): retried in float64, then the previous
    (s, Q), or (0, I[:, :r]) — P = I/λ — where there is none. Nothing raises."""
    gen = torch.Generator().manual_seed(1)
    good = (lambda a: a @ a.mT)(torch.randn(2, 31, 40, generator=gen))
    nan = good.clone()
    nan[1, 3, 4] = float("nan")
    negative = -5 * torch.eye(31).expand(2, -1, -1).clone()
    previous = (torch.rand(2, 6, generator=gen), torch.linalg.qr(torch.randn(2, 31, 6, generator=gen)).Q)
    pairs, status = ops.top_eigenpairs_with_status([good, nan, negative, negative], 6, 0.5,
                                                   previous=[None, previous, previous, None])
    # LAPACK may fail the NaN matrix's whole batch: its finite group then comes from the float64 retry
    assert [code.tolist() for code in status] in ([[OK, OK], [code, KEPT_PREVIOUS], [KEPT_PREVIOUS] * 2,
                                                   [KEPT_PREVIOUS] * 2] for code in (OK, RETRIED))
    assert torch.equal(pairs[1][0][1], previous[0][1]) and torch.equal(pairs[1][1][1], previous[1][1])
    assert torch.equal(pairs[2][0], previous[0]) and torch.equal(pairs[2][1], previous[1])
    assert torch.equal(pairs[3][0], torch.zeros(2, 6)) and torch.equal(pairs[3][1], torch.eye(31, 6).expand(2, -1, -1))
    assert rel_error(pairs[1][0][0], torch.linalg.eigvalsh(good[0].double()).flip(-1)[:6]) <= 1e-2
    # a float32 failure that float64 settles: eigenvalues that overflow float32 after the scale
    huge = good * 1e30
    _, status = ops.top_eigenpairs_with_status([huge], 6, 0.5, scales=[torch.tensor(1e10)])
    assert status[0].tolist() == [RETRIED, RETRIED]


# ---- FOOF and KFAC ---------------------------------------------------------------------------


def small_model(seed=0):
    """float64; D' = 19 (conv, one position per 3×3 input), 5 and 31: with rank 4 the conv and the last
    Linear are low rank; batches of 3 give statistics of rank ≤ 3."""
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(2, 4, 3), nn.Tanh(), nn.Flatten(), nn.Linear(4, 30), nn.Tanh(),
                         nn.Linear(30, 3)).double()


def batches(n, seed=1):
    gen = torch.Generator().manual_seed(seed)
    return [(torch.randn(3, 2, 3, 3, generator=gen, dtype=torch.float64), torch.randint(0, 3, (3,), generator=gen))
            for _ in range(n)]


def train(model, opt, data):
    for x, y in data:
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()


# T = 2, S = 1, m = 0: every inversion sees one batch, so the rank covers every statistic
SCHEDULE = dict(lr=0.3, damping=0.5, momentum=0.9, nesterov=True, weight_decay=0.01, inv_period=2, stats_steps=1,
                ema_decay=0.0, backend="reference")


@pytest.mark.smoke
def test_foof_with_rank_covering_the_statistics_equals_dense_foof():
    model, twin = small_model(), small_model()
    low, dense = fastfoof.FOOF(model, rank=4, **SCHEDULE), fastfoof.FOOF(twin, **SCHEDULE)
    data = batches(7)
    train(model, low, data)
    train(twin, dense, data)
    for p, q in zip(model.parameters(), twin.parameters()):
        assert rel_error(p, q) <= 1e-12
    for layer in low.layers:
        state = low.state[layer.weight]
        if layer.dim_p > 8:  # D' > 2r: (Q, s) and no D'×D' P
            assert "precond" not in state
            assert state["top_eigvecs"].shape == (1, layer.dim_p, 4) and state["top_eigvals"].shape == (1, 4)
        else:
            assert "top_eigvecs" not in state and state["precond"].shape == (1, 5, 5)
    assert low.diagnostics == {"dropped_stats": 0, "cholesky_retries": 0, "cholesky_failures": 0}


@pytest.mark.parametrize("damping_mode", ["heuristic", "factor"])
def test_kfac_with_rank_covering_the_statistics_equals_dense_kfac(damping_mode):
    model, twin = small_model(), small_model()
    low = fastfoof.KFAC(model, rank=4, damping_mode=damping_mode, **SCHEDULE)
    dense = fastfoof.KFAC(twin, damping_mode=damping_mode, **SCHEDULE)
    data = batches(7)
    train(model, low, data)
    train(twin, dense, data)
    for p, q in zip(model.parameters(), twin.parameters()):
        assert rel_error(p, q) <= 1e-12
    assert "precond" not in low.state[model[5].weight] and "top_eigvecs" in low.state[model[5].weight]


@pytest.mark.parametrize("graft", [None, "sgd"])
def test_low_rank_steps_are_the_truncated_preconditioner(graft):
    """With r below the statistic's rank, each step is Ĝ·(Σ̂_r + λI)⁻¹ from the stored (Q, s) (grafted: with
    Ĝ's Frobenius norm), and (Q, s) are the top eigenpairs of Σ̂ (to the randomized method's accuracy)."""
    model = small_model()
    opt = fastfoof.FOOF(model, rank=2, lr=1.0, damping=0.5, inv_period=1, stats_steps=1, graft=graft,
                        backend="reference")
    x, y = batches(1)[0]
    F.cross_entropy(model(x), y).backward()
    layer = opt.layers[-1]
    weight, bias = layer.module.weight, layer.module.bias
    grads = torch.cat([weight.grad, bias.grad[:, None]], 1)
    before = [weight.detach().clone(), bias.detach().clone()]
    opt.step()  # the first inversion, then the update
    state = opt.state[weight]
    top = torch.linalg.eigvalsh(state["ema"] / state["ema_count"]).flip(-1)[:, :2]
    assert rel_error(state["top_eigvals"], top) <= 1e-8  # 3 batch vectors: the spectrum has a gap after 3
    expected = grads @ dense_from_pairs(state["top_eigvals"], state["top_eigvecs"], 0.5)[0]
    if graft == "sgd":
        expected *= min(grads.norm() / expected.norm(), fastfoof.FOOF.GRAFT_BOUND * 0.5)
    assert rel_error(before[0] - weight, expected[:, :-1]) <= 1e-12
    assert rel_error(before[1] - bias, expected[:, -1]) <= 1e-12


def test_resume_with_rank_is_bit_for_bit():
    data = batches(8)
    kw = dict(lr=0.2, damping=0.5, momentum=0.9, inv_period=3, stats_steps=2, rank=3, backend="reference")
    model = small_model()
    opt = fastfoof.FOOF(model, **kw)
    train(model, opt, data[:4])
    saved = copy.deepcopy((model.state_dict(), opt.state_dict()))
    train(model, opt, data[4:])
    resumed = small_model(seed=5)
    resumed.load_state_dict(saved[0])
    opt2 = fastfoof.FOOF(resumed, **kw)
    opt2.load_state_dict(saved[1])
    train(resumed, opt2, data[4:])
    for p, q in zip(model.parameters(), resumed.parameters()):
        assert torch.equal(p, q)
    assert "top_eigvecs" in saved[1]["state"][4]  # the last Linear's weight


def test_failed_decomposition_keeps_the_previous_pairs_and_is_counted():
    model = small_model().float()
    opt = fastfoof.FOOF(model, rank=4, lr=0.1, damping=0.1, inv_period=2, stats_steps=1, backend="reference")
    x, y = batches(1)[0]
    x = x.float()
    F.cross_entropy(model(x), y).backward()
    opt.step()
    layer = opt.layers[-1]
    state = opt.state[layer.weight]
    kept = state["top_eigvals"].clone(), state["top_eigvecs"].clone()
    state["ema"].copy_(-5 * torch.eye(31))  # Σ̂_r + λI indefinite, in float32 and float64
    opt.zero_grad()
    F.cross_entropy(model(x), y).backward()
    with pytest.warns(RuntimeWarning, match="cholesky"):
        opt.step()  # t = 2: inversion
    assert opt.diagnostics == {"dropped_stats": 0, "cholesky_retries": 1, "cholesky_failures": 1}
    assert torch.equal(state["top_eigvals"], kept[0]) and torch.equal(state["top_eigvecs"], kept[1])
    assert all(torch.isfinite(p).all() for p in model.parameters())
