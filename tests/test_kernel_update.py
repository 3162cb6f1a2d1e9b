"""The grouped preconditioned-update kernel (fastfoof.kernels.update) against float64 and the reference."""
import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fastfoof
from fastfoof import ops, reference
from fastfoof.kernels import update
from fastfoof.layers import Block
from helpers import rel_error

# CPU runs the kernel in Triton's interpreter (conftest); a GPU runs it compiled.
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

HYPER = [dict(lr=0.1, momentum=0.9, dampening=0.0, nesterov=True, weight_decay=1e-2),
         dict(lr=0.05, momentum=0.5, dampening=0.3, nesterov=False, weight_decay=0.0),
         dict(lr=0.2, momentum=0.0, dampening=0.0, nesterov=False, weight_decay=0.1)]

# (out, in-shape per output row, groups, bias): Linear, no-bias Linear spanning several tiles in M and
# N, conv, grouped conv, Conv1d, a depthwise-like layer with tiny problems.
LAYERS = [((5, 7), 1, True), ((70, 150), 1, False), ((6, 3, 3, 3), 1, True), ((9, 2, 3, 2), 3, True),
          ((4, 5, 3), 1, False), ((6, 1, 3), 6, True)]


@pytest.fixture(autouse=True)
def ieee_dots(monkeypatch):
    monkeypatch.setattr(update, "DOT_PRECISION", "ieee")


@pytest.fixture
def fused_only(monkeypatch):
    """Fail if a block silently takes the reference path instead of the grouped kernel."""
    def refuse(*args):
        raise AssertionError("a block fell back to the reference path")
    monkeypatch.setattr(update, "_reference_block", refuse)


def random_precond(groups, dim, dtype, gen):
    """A damped inverse plus an asymmetric part (so a transposed read would fail), row-major."""
    a = torch.randn(groups, dim, 2 * dim, generator=gen, dtype=torch.float64)
    p = torch.linalg.inv(a @ a.mT / (2 * dim) + 0.3 * torch.eye(dim, dtype=torch.float64))
    p = p + 0.2 * torch.randn(groups, dim, dim, generator=gen, dtype=torch.float64).mT
    return p.to(DEVICE, reference.stat_dtype(dtype)).contiguous()


def make_blocks(dtype, hyper, gen, layers=LAYERS):
    """Preconditioned blocks plus unpreconditioned ones (a norm weight, a lone bias), two groups."""
    g1, g2 = dict(hyper[0]), dict(hyper[1])
    blocks = []
    for i, (shape, groups, has_bias) in enumerate(layers):
        weight = torch.randn(shape, generator=gen).to(DEVICE, dtype)
        params = [weight] + ([torch.randn(shape[0], generator=gen).to(DEVICE, dtype)] if has_bias else [])
        options = [g1 if i % 2 == 0 else g2, g2 if i % 3 == 0 else g1][:len(params)]
        dim = weight[0].numel()
        blocks.append(Block(params, options, groups, random_precond(groups, dim + has_bias, dtype, gen)))
    blocks.append(Block([torch.randn(11, generator=gen).to(DEVICE, dtype)], [g1]))
    blocks.append(Block([torch.randn(3, 5, generator=gen).to(DEVICE, dtype)], [g2]))
    blocks.append(Block([torch.randn(13, generator=gen).to(DEVICE, dtype)], [g1]))
    return blocks


def fresh_grads(blocks, gen, scale=1.0):
    for block in blocks:
        for p in block.params:
            p.grad = (torch.randn(p.shape, generator=gen) * scale).to(DEVICE, p.dtype)


def step64(blocks, buffers, damping):
    """DESIGN §1.4 in float64, written independently of fastfoof.reference."""
    new_params, new_buffers, slot = [], [], 0
    for block in blocks:
        grads = [None if p.grad is None else p.grad.double() for p in block.params]
        if block.precond is None:
            us = [None if g is None else g / damping for g in grads]
        elif grads[0] is None:
            us = [None] * len(grads)
        else:
            w = block.params[0]
            rows = w.shape[0] // block.groups
            g = grads[0].reshape(w.shape[0], -1)
            if len(grads) == 2:
                g = torch.cat([g, (grads[1] if grads[1] is not None else g.new_zeros(w.shape[0]))[:, None]], 1)
            u = torch.cat([g[i * rows:(i + 1) * rows] @ block.precond[i].double() for i in range(block.groups)])
            us = [u[:, :w[0].numel()].reshape(w.shape)]
            if len(grads) == 2:
                us.append(None if grads[1] is None else u[:, -1])
        for p, u, h in zip(block.params, us, block.options):
            buf = buffers[slot] if buffers[slot] is None else buffers[slot].double()
            p = p.double()
            if u is not None:
                d = u
                if h["momentum"]:
                    buf = u if buf is None else h["momentum"] * buf + (1 - h["dampening"]) * u
                    d = u + h["momentum"] * buf if h["nesterov"] else buf
                p = p * (1 - h["lr"] * h["weight_decay"]) - h["lr"] * d
            new_params.append(p)
            new_buffers.append(buf)
            slot += 1
    return new_params, new_buffers


def flat(blocks):
    return [p for block in blocks for p in block.params]


def check_step(blocks, buffers, damping, tol, grad_scale=None):
    """One kernel step, compared parameter by parameter (its change) and buffer by buffer with float64."""
    before = [p.detach().clone() for p in flat(blocks)]
    grads = [None if p.grad is None else p.grad.clone() for p in flat(blocks)]
    if grad_scale is not None:  # the oracle sees the unscaled gradients
        for p in flat(blocks):
            if p.grad is not None:
                p.grad /= grad_scale
    want_params, want_buffers = step64(blocks, buffers, damping)
    for p, g in zip(flat(blocks), grads):
        if g is not None:
            p.grad.copy_(g)  # in place: the gradients keep their addresses, as after a backward
    update.preconditioned_update_(blocks, buffers, damping=damping, grad_scale=grad_scale)
    for p, g in zip(flat(blocks), grads):
        assert (p.grad is None and g is None) or torch.equal(p.grad, g), "the update wrote into .grad"
    for p, old, want, g in zip(flat(blocks), before, want_params, grads):
        if torch.equal(want, old.double()):  # no gradient, or a bias whose weight has none
            assert torch.equal(p, old)
        elif p.dtype in (torch.bfloat16, torch.float16):  # storage rounding dominates the change
            slack = torch.finfo(p.dtype).eps * want.abs() + tol * (want - old.double()).abs()
            assert ((p.double() - want).abs() <= slack).all()
        else:
            assert rel_error(p.double() - old.double(), want - old.double()) <= tol
    for buf, want, p in zip(buffers, want_buffers, flat(blocks)):
        assert (buf is None) == (want is None)
        if buf is not None:
            assert buf.dtype == reference.stat_dtype(p.dtype) and buf.shape == p.shape
            assert rel_error(buf, want) <= tol


@pytest.mark.parametrize("hyper", [HYPER[:2], HYPER[1:], [HYPER[2], HYPER[0]]], ids=["nesterov+dampening",
                                                                                    "dampening+no-momentum",
                                                                                    "no-momentum+nesterov"])
def test_grouped_update_matches_float64_over_steps(hyper, fused_only):
    gen = torch.Generator().manual_seed(0)
    blocks = make_blocks(torch.float32, hyper, gen)
    blocks[2].precond = blocks[2].precond.mT.contiguous().mT  # column-major P: copied, then fused
    buffers = [None] * len(flat(blocks))
    for _ in range(3):  # the first step creates the buffers (V = U), the later ones update them
        fresh_grads(blocks, gen)
        check_step(blocks, buffers, damping=0.7, tol=1e-5)


def test_grouped_update_agrees_with_reference(fused_only):
    gen = torch.Generator().manual_seed(1)
    blocks = make_blocks(torch.float32, HYPER[:2], gen)
    twin = copy.deepcopy(blocks)
    bufs, twin_bufs = [None] * len(flat(blocks)), [None] * len(flat(blocks))
    for _ in range(2):
        fresh_grads(blocks, gen)
        for p, q in zip(flat(blocks), flat(twin)):
            q.grad = p.grad.clone()
        update.preconditioned_update_(blocks, bufs, damping=0.5)
        reference.preconditioned_update_(twin, twin_bufs, damping=0.5)
        for p, q in zip(flat(blocks), flat(twin)):
            assert rel_error(p, q) <= 1e-6
        for b, c in zip(bufs, twin_bufs):
            assert (b is None) == (c is None) and (b is None or rel_error(b, c) <= 1e-5)


def test_missing_gradients_leave_parameters_untouched(fused_only):
    gen = torch.Generator().manual_seed(2)
    blocks = make_blocks(torch.float32, HYPER[:2], gen)
    buffers = [None] * len(flat(blocks))
    fresh_grads(blocks, gen)
    blocks[0].params[1].grad = None  # bias without grad: a zero column, the bias is not stepped
    blocks[2].params[0].grad = None  # weight without grad: the whole block is skipped
    blocks[-1].params[0].grad = None
    check_step(blocks, buffers, damping=0.9, tol=1e-5)
    assert buffers[1] is None and buffers[3] is None and buffers[4] is None


def test_grad_scale_is_divided_out_on_the_device(fused_only):
    gen = torch.Generator().manual_seed(3)
    blocks = make_blocks(torch.float32, HYPER[:2], gen)
    buffers = [None] * len(flat(blocks))
    for _ in range(2):
        fresh_grads(blocks, gen, scale=1024.0)
        check_step(blocks, buffers, damping=0.4, tol=1e-5, grad_scale=torch.tensor(1024.0, device=DEVICE))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_params_keep_float32_buffers(dtype, fused_only):
    gen = torch.Generator().manual_seed(4)
    blocks = make_blocks(dtype, HYPER[:2], gen, layers=LAYERS[:4])
    buffers = [None] * len(flat(blocks))
    for _ in range(2):
        fresh_grads(blocks, gen)
        check_step(blocks, buffers, damping=0.8, tol=2e-2)


def test_float64_and_channels_last_blocks_take_the_reference_path():
    gen = torch.Generator().manual_seed(5)
    blocks = make_blocks(torch.float64, HYPER[:2], gen, layers=LAYERS[2:4])
    conv = make_blocks(torch.float32, HYPER[:2], gen, layers=[((6, 3, 3, 3), 1, True)])[0]
    conv.params[0].data = conv.params[0].data.to(memory_format=torch.channels_last)
    blocks.append(conv)
    buffers = [None] * len(flat(blocks))
    for _ in range(2):
        fresh_grads(blocks, gen)
        conv.params[0].grad = conv.params[0].grad.to(memory_format=torch.channels_last)
        check_step(blocks, buffers, damping=0.6, tol=1e-5)


def test_tables_are_cached_and_lr_changes_only_the_scalars(fused_only):
    gen = torch.Generator().manual_seed(6)
    blocks = make_blocks(torch.float32, HYPER[:2], gen)
    buffers = [None] * len(flat(blocks))
    fresh_grads(blocks, gen)
    check_step(blocks, buffers, damping=0.5, tol=1e-5)
    name = (blocks[0].params[0].device, torch.float32)
    problems = update._TABLES[name + ("problems",)][1]
    scalars = update._TABLES[name + ("scalars",)][1]
    for lr in (0.3, 0.01):  # gradients refilled in place: same addresses, new values
        for p in flat(blocks):
            p.grad.copy_(torch.randn(p.shape, generator=gen).to(DEVICE))
        blocks[0].options[0]["lr"] = lr
        check_step(blocks, buffers, damping=0.5, tol=1e-5)
        assert update._TABLES[name + ("problems",)][1] is problems
        assert update._TABLES[name + ("scalars",)][1] is not scalars
        scalars = update._TABLES[name + ("scalars",)][1]
    check_step(blocks, buffers, damping=0.5, tol=1e-5)  # nothing changed: both tables reused
    assert update._TABLES[name + ("scalars",)][1] is scalars


def test_cuda_tensors_dispatch_to_the_grouped_kernel():
    assert ops.implementation("preconditioned_update_", "auto", torch.device("cuda")) is update.preconditioned_update_
    assert ops.implementation("preconditioned_update_", "reference", torch.device("cuda")) is \
        reference.preconditioned_update_


def test_foof_with_triton_update_tracks_reference(fused_only, monkeypatch):
    # Only the update goes to Triton: the other ops' kernels (TF32 on a GPU) have their own tests.
    monkeypatch.setattr(ops, "TRITON_KERNELS", {"preconditioned_update_": "fastfoof.kernels.update"})
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.BatchNorm2d(6), nn.Tanh(),
                          nn.Conv2d(6, 6, (3, 2), stride=2, groups=3, bias=False), nn.Tanh(), nn.Flatten(),
                          nn.Linear(6 * 3 * 4, 5)).to(DEVICE, torch.float32)
    twin = copy.deepcopy(model)
    kw = dict(lr=0.05, damping=0.5, momentum=0.9, nesterov=True, weight_decay=1e-3, inv_period=2, stats_steps=1)
    fused = fastfoof.FOOF(model, backend="triton", **kw)
    oracle = fastfoof.FOOF(twin, backend="reference", **kw)
    gen = torch.Generator().manual_seed(1)
    for _ in range(5):
        x = torch.randn(4, 3, 7, 9, generator=gen).to(DEVICE, torch.float32)
        y = torch.randint(0, 5, (4,), generator=gen).to(DEVICE)
        for m, opt in ((model, fused), (twin, oracle)):
            opt.zero_grad()
            F.cross_entropy(m(x), y).backward()
            opt.step()
    for p, q in zip(model.parameters(), twin.parameters()):
        assert rel_error(p, q) <= 1e-5
    for p, q in zip(model.parameters(), twin.parameters()):
        a, b = fused.state[p].get("momentum_buffer"), oracle.state[q].get("momentum_buffer")
        assert rel_error(a, b) <= 1e-5
