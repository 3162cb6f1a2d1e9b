"""The reference operations against independent float64 computations (DESIGN §1.1–§1.4)."""
import pytest
import torch
from torch import nn

from fastfoof import ops, reference
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


def test_patch_gram_accumulates_with_alpha_beta():
    torch.manual_seed(1)
    module = nn.Conv2d(3, 4, 3, padding=1, groups=1)
    x = torch.randn(2, 3, 5, 6)
    start = torch.randn(1, 28, 28, dtype=torch.float64)
    out = start.clone()
    ops.patch_gram_(out, x.double(), module.double(), alpha=0.3, beta=0.7, backend="reference")
    expected = 0.7 * start + 0.3 * gram64(x, module, True)
    assert rel_error(out, expected) <= 1e-12
    nan = torch.full_like(start, float("nan"))
    ops.patch_gram_(nan, x.double(), module, beta=0.0, backend="reference")  # β = 0 overwrites
    assert torch.isfinite(nan).all()


def test_patch_gram_chunks_large_batches(monkeypatch):
    torch.manual_seed(2)
    module = nn.Conv2d(3, 4, 3, stride=2)
    x = torch.randn(7, 3, 9, 9)
    monkeypatch.setattr(reference, "CHUNK_ELEMENTS", 3 * 27 * 16)  # 3 samples per chunk
    calls = []
    original = reference.unfold_patches
    monkeypatch.setattr(reference, "unfold_patches", lambda x, g: calls.append(x.shape[0]) or original(x, g))
    out = ops.patch_gram(x, module, backend="reference")
    assert calls == [3, 3, 1]
    assert rel_error(out, gram64(x, module, True)) <= 1e-5


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
    dropped = ops.fold_statistics_(emas, counts, stats, [0.25, 0.5], 0.9, backend="reference")
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


@pytest.mark.parametrize("momentum,dampening,nesterov", [(0, 0, False), (0.9, 0.1, False), (0.8, 0, True)])
def test_preconditioned_update_matches_float64(momentum, dampening, nesterov):
    torch.manual_seed(4)
    dtype = torch.float64
    conv = nn.Conv2d(4, 6, 3, groups=2).to(dtype)
    lin = nn.Linear(5, 3, bias=False).to(dtype)
    norm = nn.LayerNorm(3).to(dtype)
    group = dict(lr=0.3, momentum=momentum, dampening=dampening, nesterov=nesterov, weight_decay=0.01)
    other = dict(group, lr=0.05, weight_decay=0.0)
    for p in [*conv.parameters(), *lin.parameters(), *norm.parameters()]:
        p.grad = torch.randn_like(p)
    p_conv = torch.randn(2, 19, 19, dtype=dtype)
    p_lin = torch.randn(1, 5, 5, dtype=dtype)
    blocks = [Block([conv.weight, conv.bias], [group, other], 2, p_conv), Block([lin.weight], [group], 1, p_lin),
              Block([norm.weight], [other]), Block([norm.bias], [group])]
    params = [p for b in blocks for p in b.params]
    damping = 0.7
    expected_u = []
    gw = conv.weight.grad.reshape(2, 3, 18)
    joint = torch.cat([gw, conv.bias.grad.reshape(2, 3, 1)], -1) @ p_conv
    expected_u += [joint[..., :18].reshape(conv.weight.shape), joint[..., 18].reshape(6)]
    expected_u.append((lin.weight.grad @ p_lin[0]))
    expected_u += [norm.weight.grad / damping, norm.bias.grad / damping]
    options = [group, other, group, other, group]
    buffers = [None] * len(params)
    state = [(p.detach().clone(), None) for p in params]
    for step in range(3):
        ops.preconditioned_update_(blocks, buffers, damping=damping, backend="reference")
        for i, (p, opt) in enumerate(zip(params, options)):
            state[i] = _sgd_reference(state[i][0], expected_u[i], state[i][1], opt["lr"], momentum, dampening,
                                      nesterov, opt["weight_decay"])
            assert rel_error(p.detach(), state[i][0]) <= 1e-13
            if momentum:
                assert rel_error(buffers[i], state[i][1]) <= 1e-13
            else:
                assert buffers[i] is None
