"""The reference operations against independent float64 computations (DESIGN §1.1–§1.4)."""
import json
import math
import tempfile
from pathlib import Path

import pytest
import torch
from torch import nn

from fastfoof import ops, reference
from fastfoof.geometry import patch_input
from fastfoof.layers import Block
from helpers import gram64, rel_error

GEOMETRIES = [
    ("linear", lambda: nn.Linear(7, 5), (3, 7)),
    ("linear-leading-dims", lambda: nn.Linear(9, 3), (2, 5, 9)),
    ("linear-no-bias", lambda: nn.Linear(6, 4, bias=False), (5, 6)),
    ("conv1d-stride-dilation", lambda: nn.Conv1d(4, 6, 3, stride=2, padding=1, dilation=2), (3, 4, 13)),
    ("conv2d-groups-nonsquare", lambda: nn.Conv2d(6, 9, (3, 2), stride=(2, 1), padding=(1, 2), dilation=(1, 2),
                                                  groups=3), (2, 6, 9, 8)),
    ("conv2d-depthwise-reflect-same", lambda: nn.Conv2d(5, 5, 3, padding="same", padding_mode="reflect", groups=5),
     (2, 5, 7, 6)),
    ("conv2d-same-even-kernel", lambda: nn.Conv2d(3, 5, 4, padding="same"), (2, 3, 7, 6)),
    ("conv2d-circular", lambda: nn.Conv2d(3, 5, 3, padding=2, padding_mode="circular"), (2, 3, 7, 6)),
    ("conv2d-replicate-valid", lambda: nn.Conv2d(3, 4, 3, padding="valid", padding_mode="replicate"), (2, 3, 6, 5)),
    ("conv2d-unbatched", lambda: nn.Conv2d(3, 5, 3, padding=1), (3, 7, 6)),
    ("conv3d", lambda: nn.Conv3d(2, 4, (2, 3, 2), stride=(1, 2, 1), padding=1, dilation=(2, 1, 1)), (2, 2, 5, 6, 4)),
    ("conv3d-groups-no-bias", lambda: nn.Conv3d(4, 6, 3, padding=1, groups=2, bias=False), (1, 4, 3, 4, 5)),
]


@pytest.mark.smoke
@pytest.mark.parametrize("name,make,shape", GEOMETRIES, ids=[g[0] for g in GEOMETRIES])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_patch_gram_matches_float64_unfold(name, make, shape, dtype):
    torch.manual_seed(hash(name) % 1000)
    module = make().to(dtype)
    x = torch.randn(shape, dtype=dtype)
    bias = module.bias is not None
    out = ops.patch_gram(x, module, backend="reference")
    assert out.dtype == dtype
    assert rel_error(out, gram64(x, module, bias)) <= (1e-5 if dtype == torch.float32 else 1e-12)
    assert torch.equal(out, out.transpose(1, 2))


@pytest.mark.parametrize("block", [reference.GRAM_BLOCK, 8], ids=["one-block", "blocks-of-8"])
def test_patch_gram_accumulates_with_alpha_beta(monkeypatch, block):
    # blocks of 8 rows: D' = 28 is four block rows, the last partial, and the strict lower block
    # region carries β·out through the mirror
    monkeypatch.setattr(reference, "GRAM_BLOCK", block)
    torch.manual_seed(1)
    module = nn.Conv2d(3, 4, 3, padding=1, groups=1)
    x = torch.randn(2, 3, 5, 6)
    start = torch.randn(1, 28, 28, dtype=torch.float64)  # not symmetric: β applies elementwise
    out = start.clone()
    ops.patch_gram_(out, x.double(), module.double(), alpha=0.3, beta=0.7, backend="reference")
    expected = 0.7 * start + 0.3 * gram64(x, module, True)
    assert rel_error(out, expected) <= 1e-12
    symmetric = start + start.mT
    out = symmetric.clone()
    ops.patch_gram_(out, x.double(), module.double(), alpha=-0.5, beta=2.0, backend="reference")
    assert rel_error(out, 2.0 * symmetric - 0.5 * gram64(x, module, True)) <= 1e-12
    assert torch.equal(out, out.mT)  # a symmetric out stays bitwise symmetric
    nan = torch.full_like(start, float("nan"))
    ops.patch_gram_(nan, x.double(), module, beta=0.0, backend="reference")  # β = 0 overwrites
    assert torch.isfinite(nan).all()


@pytest.mark.parametrize("name,make,shape", [GEOMETRIES[1], GEOMETRIES[4], GEOMETRIES[10]],
                         ids=["linear-leading-dims", "conv2d-groups", "conv3d"])
def test_patch_gram_chunks_samples_and_blocks_rows(monkeypatch, name, make, shape):
    """Chunks of 2 samples (a Linear's samples are its rows) and blocks of 3 rows, against float64."""
    torch.manual_seed(2)
    module = make()
    x = torch.randn((5 * shape[0],) + shape[1:])
    patches, geom = patch_input(x, module)
    padding = reference.zero_padding(geom)
    padded = geom.channels * math.prod(n + lo + hi for n, (lo, hi) in zip(geom.in_size, padding))
    per_sample = (geom.groups * (geom.dim + 1) * geom.positions + padded) * 4
    monkeypatch.setattr(reference, "GRAM_WORKSPACE_BYTES", 2 * per_sample + 1)
    monkeypatch.setattr(reference, "GRAM_BLOCK", 3)
    chunks = []
    original = reference.patch_rows_
    monkeypatch.setattr(reference, "patch_rows_", lambda a, x, g: chunks.append(x.shape[0]) or original(a, x, g))
    out = ops.patch_gram(x, module, backend="reference")
    samples = patches.shape[0]
    assert chunks == [2] * (samples // 2) + [1] * (samples % 2)
    assert rel_error(out, gram64(x, module, module.bias is not None)) <= 1e-5
    assert torch.equal(out, out.mT)


def allocated_peak(fn) -> int:
    """The CPU allocator's peak during fn() above its level when fn starts, from the profiler's memory
    events ("Total Allocated" counts from the profiler's start)."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    with tempfile.TemporaryDirectory() as tmp:
        trace = Path(tmp) / "trace.json"
        prof.export_chrome_trace(str(trace))
        events = json.loads(trace.read_text())["traceEvents"]
    return max((e["args"]["Total Allocated"] for e in events if e.get("name") == "[memory]"), default=0)


def test_patch_gram_workspace_stays_bounded_whatever_the_batch():
    """A batch whose patch vectors take 290 MiB: the call allocates under 64 MiB besides `out`."""
    torch.manual_seed(3)
    module = nn.Conv2d(16, 8, 3, padding=1)
    x = torch.randn(512, 16, 32, 32)  # 145 × 524288 patch entries
    out = torch.empty(1, 145, 145)
    peak = allocated_peak(lambda: ops.patch_gram_(out, x, module, backend="reference"))
    assert 2 * x.element_size() * x[0].numel() < peak < 64 << 20  # chunks of samples, and none of the whole
    sample = x[:3]
    assert rel_error(ops.patch_gram(sample, module, backend="reference"), gram64(sample, module, True)) <= 1e-5


def test_patch_gram_rejects_wrong_out_shape():
    with pytest.raises(ValueError, match="out"):
        ops.patch_gram_(torch.zeros(1, 3, 3), torch.randn(2, 4), nn.Linear(4, 2))


def test_fold_statistics_drops_non_finite():
    torch.manual_seed(3)
    emas = [torch.randn(1, 3, 3, dtype=torch.float64) for _ in range(2)]
    counts = [torch.tensor(0.5, dtype=torch.float64) for _ in range(2)]
    stats = [torch.randn(1, 3, 3, dtype=torch.float64), torch.randn(1, 3, 3, dtype=torch.float64)]
    stats[1][0, 1, 2] = float("inf")
    before = [e.clone() for e in emas]
    dropped = ops.fold_statistics_(emas, counts, [s.clone() for s in stats], [0.25, 0.5], 0.9,
                                   backend="reference")  # the fold consumes its statistics
    assert int(dropped) == 1
    assert torch.allclose(emas[0], 0.9 * before[0] + 0.1 * 0.25 * stats[0], rtol=0, atol=1e-15)
    assert counts[0].item() == pytest.approx(0.9 * 0.5 + 0.1)
    assert torch.equal(emas[1], before[1]) and counts[1].item() == 0.5


def _sgd_reference(p, u, buf, lr, momentum, dampening, nesterov, wd):
    """torch.optim.SGD's documented algorithm, written out, with decoupled weight decay."""
    if momentum:
        buf = u.clone() if buf is None else momentum * buf + (1 - dampening) * u
        u = u + momentum * buf if nesterov else buf
    return p * (1 - lr * wd) - lr * u, buf


def _update_case(dtype=torch.float64):
    """Blocks of every kind with fresh random gradients and preconditioners, and their U by DESIGN §1.3–§1.4
    in float64 without grafting: (blocks, params, U per parameter, the parameters of each preconditioned
    block, damping). A grouped conv with bias, a Linear without bias, a low-rank Linear (U = Ĝ·(QsQᵀ +
    λI)⁻¹), a Linear whose gradient is zero, a KFAC block (U = block.left_transformed_grad·P; grafting takes
    the raw Ĝ's norm), a Linear whose P = 0.02·I (grafting would scale it by 50 > κλ: bounded), and a LayerNorm's
    parameters without a preconditioner."""
    torch.manual_seed(4)
    damping = 0.7
    group = dict(lr=0.3, momentum=0.0, dampening=0.0, nesterov=False, weight_decay=0.01)
    other = dict(group, lr=0.05, weight_decay=0.0)
    conv = nn.Conv2d(4, 6, 3, groups=2).to(dtype)
    lin = nn.Linear(5, 3, bias=False).to(dtype)
    low = nn.Linear(8, 4).to(dtype)
    still = nn.Linear(3, 2).to(dtype)
    kfac = nn.Linear(4, 3).to(dtype)
    bounded = nn.Linear(3, 4, bias=False).to(dtype)
    norm = nn.LayerNorm(3).to(dtype)
    for p in [*conv.parameters(), *lin.parameters(), *low.parameters(), *kfac.parameters(), bounded.weight,
              *norm.parameters()]:
        p.grad = torch.randn_like(p)
    for p in still.parameters():
        p.grad = torch.zeros_like(p)
    p_conv, p_lin, p_still, p_kfac = (torch.randn(g, d, d, dtype=dtype)
                                      for g, d in ((2, 19), (1, 5), (1, 4), (1, 5)))
    q = torch.linalg.qr(torch.randn(1, 9, 2, dtype=dtype))[0]
    s = torch.rand(1, 2, dtype=dtype) + 0.5
    transformed = torch.randn(1, 3, 5, dtype=dtype)
    blocks = [Block([conv.weight, conv.bias], [group, other], 2, p_conv), Block([lin.weight], [group], 1, p_lin),
              Block([low.weight, low.bias], [group, group], 1, None, eigvecs=q, eigvals=s),
              Block([still.weight, still.bias], [group, group], 1, p_still),
              Block([kfac.weight, kfac.bias], [other, group], 1, p_kfac, left_transformed_grad=transformed),
              Block([bounded.weight], [group], 1, 0.02 * torch.eye(3, dtype=dtype)[None]),
              Block([norm.weight], [other]), Block([norm.bias], [group])]
    params = [p for b in blocks for p in b.params]
    joint = torch.cat([conv.weight.grad.reshape(2, 3, 18), conv.bias.grad.reshape(2, 3, 1)], -1) @ p_conv
    u_low = torch.cat([low.weight.grad, low.bias.grad[:, None]], 1) @ torch.linalg.inv(
        (q[0] * s[0]) @ q[0].T + damping * torch.eye(9, dtype=dtype))
    u_kfac = transformed[0] @ p_kfac[0]
    expected = [joint[..., :18].reshape(conv.weight.shape), joint[..., 18].reshape(6), lin.weight.grad @ p_lin[0],
                u_low[:, :8], u_low[:, 8], torch.zeros_like(still.weight), torch.zeros_like(still.bias),
                u_kfac[:, :4], u_kfac[:, 4], 0.02 * bounded.weight.grad, norm.weight.grad / damping,
                norm.bias.grad / damping]
    layers = [[0, 1], [2], [3, 4], [5, 6], [7, 8], [9]]
    return blocks, params, expected, layers, damping


# grafting's bound κ in the op tests: a value neither optimizer uses, so that none is built into the ops
KAPPA = 2.5


def _grafted64(params, expected, layers, damping, g_factor=1.0):
    """U grafted by DESIGN §1.4 in float64: each layer's U (weight and bias) times min(‖Ĝ‖_F/‖U‖_F, κλ)
    (0 where U = 0; ‖Ĝ‖_F times g_factor), the other parameters' U = G."""
    grafted = [p.grad.clone() for p in params]
    for members in layers:
        g = g_factor * torch.cat([params[i].grad.reshape(-1) for i in members]).norm()
        u = torch.cat([expected[i].reshape(-1) for i in members]).norm()
        for i in members:
            grafted[i] = expected[i] * (min(g / u, KAPPA * damping) if u > 0 else 0.0)
    return grafted


def _close(out, ref):
    return torch.equal(out, ref) or rel_error(out, ref) <= 1e-13


@pytest.mark.smoke
@pytest.mark.parametrize("graft", [None, KAPPA])
@pytest.mark.parametrize("momentum,dampening,nesterov", [(0, 0, False), (0.9, 0.1, False), (0.8, 0, True)])
def test_preconditioned_update_matches_float64(momentum, dampening, nesterov, graft):
    blocks, params, expected_u, layers, damping = _update_case()
    if graft is not None:
        expected_u = _grafted64(params, expected_u, layers, damping)
    options = [o for b in blocks for o in b.options]
    for opt in options:
        opt.update(momentum=momentum, dampening=dampening, nesterov=nesterov)
    buffers = [None] * len(params)
    state = [(p.detach().clone(), None) for p in params]
    for step in range(3):
        ops.preconditioned_update_(blocks, buffers, damping=damping, graft=graft, backend="reference")
        for i, (p, opt) in enumerate(zip(params, options)):
            state[i] = _sgd_reference(state[i][0], expected_u[i], state[i][1], opt["lr"], momentum, dampening,
                                      nesterov, opt["weight_decay"])
            assert _close(p.detach(), state[i][0])
            if momentum:
                assert _close(buffers[i], state[i][1])
            else:
                assert buffers[i] is None


def test_graft_norms_go_through_reduce_norms():
    """reduce_norms sees [‖Ĝ‖², ‖U‖²] of each grafted block once, in block order, and what it returns sets
    the scale: ‖Ĝ‖² × 4 doubles every grafted U but the bounded one's."""
    blocks, params, expected_u, layers, damping = _update_case()
    seen = []

    def reduce_norms(squares, grafted):
        seen.append((squares.clone(), list(grafted)))
        return squares * torch.tensor([4.0, 1.0], dtype=squares.dtype)

    before = [p.detach().clone() for p in params]
    ops.preconditioned_update_(blocks, [None] * len(params), damping=damping, graft=KAPPA, reduce_norms=reduce_norms,
                               backend="reference")
    (squares, grafted), = seen
    assert grafted == blocks[:6]
    for row, members in zip(squares, layers):
        g = sum(params[i].grad.square().sum() for i in members)
        u = sum(expected_u[i].square().sum() for i in members)
        assert _close(row[0], g) and (u == 0 and row[1] == 0 or rel_error(row[1], u) <= 1e-13)
    grafted_u = _grafted64(params, expected_u, layers, damping, g_factor=2.0)
    options = [o for b in blocks for o in b.options]
    for i, (p, b, opt) in enumerate(zip(params, before, options)):
        assert _close(p.detach(), b * (1 - opt["lr"] * opt["weight_decay"]) - opt["lr"] * grafted_u[i])
