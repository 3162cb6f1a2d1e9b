"""The grouped preconditioned-update kernel (fastfoof.kernels.update) against float64 and the reference."""
import copy
import dataclasses

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fastfoof
from fastfoof import ops, reference
from fastfoof.kernels import update
from fastfoof.kernels.tables import Plans as KernelPlans
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
    monkeypatch.setattr(update, "reference_block", refuse)


def vec_spy(monkeypatch, name):
    """The VEC of every launch of update.<name> (1: scalar variant, 4 or 8: vector variant)."""
    seen = []
    kernel = getattr(update, name)

    class Spy:
        def __getitem__(self, grid):
            def launch(*args, **kwargs):
                seen.append(kwargs["VEC"])
                return kernel[grid](*args, **kwargs)
            return launch

    monkeypatch.setattr(update, name, Spy())
    return seen


@pytest.fixture
def launches(monkeypatch):
    """The VEC of every grouped launch."""
    return vec_spy(monkeypatch, "grouped_update_kernel")


def random_precond(groups, dim, dtype, gen):
    """A damped inverse plus an asymmetric part (so a transposed read would fail), row-major."""
    a = torch.randn(groups, dim, 2 * dim, generator=gen, dtype=torch.float64)
    p = torch.linalg.inv(a @ a.mT / (2 * dim) + 0.3 * torch.eye(dim, dtype=torch.float64))
    p = p + 0.2 * torch.randn(groups, dim, dim, generator=gen, dtype=torch.float64).mT
    return p.to(DEVICE, reference.stat_dtype(dtype)).contiguous()


def padded(p):
    """P as the inverse returns it: rows padded to a multiple of 4 fp32 (16 bytes), aligned base."""
    groups, dim, _ = p.shape
    out = torch.empty(groups, dim, -(-dim // 4) * 4, dtype=p.dtype, device=p.device)[..., :dim]
    return out.copy_(p)


def channels_last(t):
    return t.to(memory_format=torch.channels_last if t.dim() == 4 else torch.channels_last_3d)


def make_blocks(dtype, hyper, gen, layers=LAYERS, layout=None):
    """Preconditioned blocks plus unpreconditioned ones (a norm weight, a lone bias), two groups.
    `layout(weight)`, if given, lays out every conv weight (e.g. channels_last)."""
    g1, g2 = dict(hyper[0]), dict(hyper[1])
    blocks = []
    for i, (shape, groups, has_bias) in enumerate(layers):
        weight = torch.randn(shape, generator=gen).to(DEVICE, dtype)
        if layout is not None and weight.dim() > 3:
            weight = layout(weight)
        params = [weight] + ([torch.randn(shape[0], generator=gen).to(DEVICE, dtype)] if has_bias else [])
        options = [g1 if i % 2 == 0 else g2, g2 if i % 3 == 0 else g1][:len(params)]
        dim = weight[0].numel()
        blocks.append(Block(params, options, groups, random_precond(groups, dim + has_bias, dtype, gen)))
    blocks.append(Block([torch.randn(11, generator=gen).to(DEVICE, dtype)], [g1]))
    blocks.append(Block([torch.randn(3, 5, generator=gen).to(DEVICE, dtype)], [g2]))
    blocks.append(Block([torch.randn(13, generator=gen).to(DEVICE, dtype)], [g1]))
    return blocks


def fresh_grads(blocks, gen, scale=1.0):
    """Random gradients laid out like their parameters (as autograd makes them)."""
    for block in blocks:
        for p in block.params:
            p.grad = torch.empty_like(p).copy_(torch.randn(p.shape, generator=gen) * scale)


def step64(blocks, buffers, damping, graft=None, squares=None):
    """DESIGN §1.4 in float64, written independently of fastfoof.reference. graft = κ: each
    preconditioned block's U rescaled to its gradient's Frobenius norm (weight and bias together), by at
    most κλ, U = G for the others; `squares` (a list), if given, gets the grafted blocks' (‖Ĝ‖², ‖U‖²) in order."""
    new_params, new_buffers, slot = [], [], 0
    for block in blocks:
        grads = [None if p.grad is None else p.grad.double() for p in block.params]
        if block.precond is None and block.eigvecs is None:
            us = [None if g is None else g / (1.0 if graft else damping) for g in grads]
        elif grads[0] is None:
            us = [None] * len(grads)
        else:
            w = block.params[0]
            rows = w.shape[0] // block.groups
            g = grads[0].reshape(w.shape[0], -1)
            if len(grads) == 2:
                g = torch.cat([g, (grads[1] if grads[1] is not None else g.new_zeros(w.shape[0]))[:, None]], 1)
            u = torch.cat([g[i * rows:(i + 1) * rows] @ right_factor64(block, i, damping) for i in range(block.groups)])
            us = [u[:, :w[0].numel()].reshape(w.shape)]
            if len(grads) == 2:
                us.append(None if grads[1] is None else u[:, -1])
            if graft:
                g2, u2 = (sum(float((t * t).sum()) for t in ts if t is not None) for ts in (grads, us))
                if squares is not None:
                    squares.append((g2, u2))
                scale = min(g2 ** 0.5 / u2 ** 0.5, graft * damping) if u2 > 0 else 0.0
                us = [None if u is None else u * scale for u in us]
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


def right_factor64(block, group, damping):
    """P of one group in float64: the dense one, or (Q diag(s) Qᵀ + λI)⁻¹ of a low-rank block, inverted as
    a dense matrix (not by the Woodbury form the kernel uses)."""
    if block.eigvecs is None:
        return block.precond[group].double()
    q, s = block.eigvecs[group].double(), block.eigvals[group].double()
    return torch.linalg.inv((q * s) @ q.T + damping * torch.eye(q.shape[0], dtype=torch.float64))


def flat(blocks):
    return [p for block in blocks for p in block.params]


def check_step(blocks, buffers, damping, tol, grad_scale=None, **options):
    """One kernel step, compared parameter by parameter (its change) and buffer by buffer with float64.
    `options`: the kernel's graft and reduce_norms (the oracle grafts as the kernel does)."""
    before = [p.detach().clone() for p in flat(blocks)]
    grads = [None if p.grad is None else p.grad.clone() for p in flat(blocks)]
    if grad_scale is not None:  # the oracle sees the unscaled gradients
        for p in flat(blocks):
            if p.grad is not None:
                p.grad /= grad_scale
    want_params, want_buffers = step64(blocks, buffers, damping, options.get("graft"))
    for p, g in zip(flat(blocks), grads):
        if g is not None:
            p.grad.copy_(g)  # in place: the gradients keep their addresses, as after a backward
    update.preconditioned_update_(blocks, buffers, damping=damping, grad_scale=grad_scale, **options)
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


def check_steps(blocks, gen, steps, damping, tol, **options):
    """`steps` kernel steps on fresh gradients, each checked by `check_step`; returns the buffers."""
    buffers = [None] * len(flat(blocks))
    for _ in range(steps):
        fresh_grads(blocks, gen)
        check_step(blocks, buffers, damping=damping, tol=tol, **options)
    return buffers


def assert_skipped_step_writes_nothing(blocks, buffers, gen, damping, **options):
    """GradScaler's skipped step on non-finite gradients leaves parameters and buffers bitwise as they were."""
    before = [p.clone() for p in flat(blocks)]
    kept = [None if b is None else b.clone() for b in buffers]
    fresh_grads(blocks, gen, scale=float("inf"))
    update.preconditioned_update_(blocks, buffers, damping=damping, found_inf=torch.ones((), device=DEVICE),
                                  **options)
    for p, old in zip(flat(blocks), before):
        assert torch.equal(p, old)
    for b, old in zip(buffers, kept):
        assert (b is None and old is None) or torch.equal(b, old)


def assert_transformed_gradient_tracks_reference(blocks, damping, **options):
    """Blocks with a left-transformed gradient (Block.left_transformed_grad): the kernel and the reference op
    on copies."""
    twins = [dataclasses.replace(b, params=[p.detach().clone() for p in b.params]) for b in blocks]
    for twin, block in zip(twins, blocks):
        for q, p in zip(twin.params, block.params):
            q.grad = p.grad.clone()
    buffers, twin_buffers = [None] * len(flat(blocks)), [None] * len(flat(blocks))
    for _ in range(2):
        update.preconditioned_update_(blocks, buffers, damping=damping, **options)
        reference.preconditioned_update_(twins, twin_buffers, damping=damping, **options)
    for p, q in zip(flat(blocks), flat(twins)):
        assert rel_error(p, q) <= 1e-6


@pytest.mark.parametrize("hyper", [HYPER[:2], HYPER[1:], [HYPER[2], HYPER[0]]], ids=["nesterov+dampening",
                                                                                    "dampening+no-momentum",
                                                                                    "no-momentum+nesterov"])
def test_grouped_update_matches_float64_over_steps(hyper, fused_only):
    gen = torch.Generator().manual_seed(0)
    blocks = make_blocks(torch.float32, hyper, gen)
    blocks[2].precond = blocks[2].precond.mT.contiguous().mT  # column-major P: copied, then fused
    # the first step creates the buffers (V = U), the later ones update them
    check_steps(blocks, gen, 3, damping=0.7, tol=1e-5)


def assert_tracks_reference(blocks, gen, damping, steps=2, tol=1e-6, **options):
    """The kernel and the reference op on copies of the same blocks, step by step (`options`: both ops'
    graft, grad_scale, …)."""
    twin = copy.deepcopy(blocks)
    bufs, twin_bufs = [None] * len(flat(blocks)), [None] * len(flat(blocks))
    for _ in range(steps):
        fresh_grads(blocks, gen)
        for p, q in zip(flat(blocks), flat(twin)):
            q.grad = p.grad.clone()
        update.preconditioned_update_(blocks, bufs, damping=damping, **options)
        reference.preconditioned_update_(twin, twin_bufs, damping=damping, **options)
        for p, q in zip(flat(blocks), flat(twin)):
            assert rel_error(p, q) <= tol
        for b, c in zip(bufs, twin_bufs):
            assert (b is None) == (c is None) and (b is None or rel_error(b, c) <= 1e-5)


@pytest.mark.smoke
def test_grouped_update_agrees_with_reference(fused_only):
    gen = torch.Generator().manual_seed(1)
    assert_tracks_reference(make_blocks(torch.float32, HYPER[:2], gen), gen, damping=0.5)


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
    check_steps(blocks, gen, 2, damping=0.8, tol=2e-2)


def reference_spy(monkeypatch):
    """The blocks that take update.reference_block (which still runs), in order."""
    referenced = []
    reference_block = update.reference_block
    monkeypatch.setattr(update, "reference_block", lambda block, *args, **kwargs: (
        referenced.append(block), reference_block(block, *args, **kwargs)))
    return referenced


def mixed_layout_conv(gen):
    """A conv block with a channels_last weight: with a contiguous gradient it takes the reference path."""
    conv = make_blocks(torch.float32, HYPER[:2], gen, layers=[((6, 3, 3, 3), 1, True)])[0]
    conv.params[0].data = channels_last(conv.params[0].data)
    return conv


def check_mixed_layout_steps(blocks, conv, gen, **options):
    """Two `check_step`s on fresh gradients, `conv`'s weight channels_last and its gradient not."""
    buffers = [None] * len(flat(blocks))
    for _ in range(2):
        fresh_grads(blocks, gen)
        conv.params[0].grad = conv.params[0].grad.contiguous()
        check_step(blocks, buffers, damping=0.6, tol=1e-5, **options)


def test_float64_and_mixed_layout_blocks_take_the_reference_path(monkeypatch):
    gen = torch.Generator().manual_seed(5)
    blocks = make_blocks(torch.float64, HYPER[:2], gen, layers=LAYERS[2:4])
    conv = mixed_layout_conv(gen)
    blocks.append(conv)
    referenced = reference_spy(monkeypatch)
    check_mixed_layout_steps(blocks, conv, gen)
    assert [b for b in referenced if b.precond is not None] == [blocks[0], blocks[1], conv] * 2


def test_tables_are_cached_and_lr_changes_only_the_scalars(fused_only):
    gen = torch.Generator().manual_seed(6)
    blocks = make_blocks(torch.float32, HYPER[:2], gen)
    buffers = [None] * len(flat(blocks))
    fresh_grads(blocks, gen)
    plans = KernelPlans()
    check_step(blocks, buffers, damping=0.5, tol=1e-5, plans=plans)
    name = (blocks[0].params[0].device, torch.float32)
    problems = plans.held(name + ("problems", 1))
    scalars = plans.held(name + ("scalars",))
    for lr in (0.3, 0.01):  # gradients refilled in place: same addresses, new values
        for p in flat(blocks):
            p.grad.copy_(torch.randn(p.shape, generator=gen).to(DEVICE))
        blocks[0].options[0]["lr"] = lr
        check_step(blocks, buffers, damping=0.5, tol=1e-5, plans=plans)
        assert plans.held(name + ("problems", 1)) is problems
        assert plans.held(name + ("scalars",)) is not scalars
        scalars = plans.held(name + ("scalars",))
    check_step(blocks, buffers, damping=0.5, tol=1e-5, plans=plans)  # nothing changed: both tables reused
    assert plans.held(name + ("scalars",)) is scalars


def test_cuda_tensors_dispatch_to_the_grouped_kernel():
    assert ops.implementation("preconditioned_update_", "auto", torch.device("cuda")) is update.preconditioned_update_
    assert ops.implementation("preconditioned_update_", "reference", torch.device("cuda")) is \
        reference.preconditioned_update_


@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last])
def test_foof_with_triton_update_tracks_reference(memory_format, fused_only, monkeypatch):
    # Only the update goes to Triton: the other ops' kernels (TF32 on a GPU) have their own tests.
    monkeypatch.setattr(ops, "TRITON_KERNELS", {"preconditioned_update_": "fastfoof.kernels.update"})
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.BatchNorm2d(6), nn.Tanh(),
                          nn.Conv2d(6, 6, (3, 2), stride=2, groups=3, bias=False), nn.Tanh(), nn.Flatten(),
                          nn.Linear(6 * 3 * 4, 5)).to(DEVICE, torch.float32, memory_format=memory_format)
    twin = copy.deepcopy(model)
    kw = dict(lr=0.05, damping=0.5, momentum=0.9, nesterov=True, weight_decay=1e-3, inv_period=2, stats_steps=1)
    fused = fastfoof.FOOF(model, backend="triton", **kw)
    oracle = fastfoof.FOOF(twin, backend="reference", **kw)
    gen = torch.Generator().manual_seed(1)
    for _ in range(5):
        x = torch.randn(4, 3, 7, 9, generator=gen).to(DEVICE, torch.float32, memory_format=memory_format)
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
        if "precond" in fused.state[p]:  # the state stays in DESIGN order: the same P as the reference's
            assert rel_error(fused.state[p]["precond"], oracle.state[q]["precond"]) <= 1e-5
    assert model[0].weight.is_contiguous(memory_format=memory_format)


# ---- vector variant, channels_last weights, 32-bit offsets ------------------------------------

# D a multiple of 4 (fp32 vectors) and of 8 (bf16 vectors) or not: Linear spanning two tiles in M and N
# (D' = 69), grouped conv, Linear with D = 36, and D = 7 (always scalar).
VECTOR_LAYERS = [((66, 68), 1, True), ((12, 4, 2, 2), 2, False), ((9, 36), 1, True), ((5, 7), 1, True)]
# channels_last conv weights: bias, groups, C = 1 (both orders agree), Conv3d, and a 1×1 conv.
CHANNELS_LAST_LAYERS = [((8, 4, 3, 3), 1, True), ((12, 2, 3, 2), 3, True), ((6, 1, 3, 3), 6, False),
                        ((4, 2, 2, 3, 2), 1, True), ((7, 5, 1, 1), 1, False)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_vector_and_scalar_variants_match_float64(dtype, fused_only, launches):
    """Padded, aligned P (as the inverse returns it) takes the vector variant where D allows; the
    others take the scalar one in a second launch, all in one call."""
    gen = torch.Generator().manual_seed(7)
    blocks = make_blocks(dtype, HYPER[:2], gen, layers=VECTOR_LAYERS)
    for block in blocks[:len(VECTOR_LAYERS)]:
        block.precond = padded(block.precond)
    plans = KernelPlans()
    check_steps(blocks, gen, 2, damping=0.7, tol=1e-5 if dtype == torch.float32 else 2e-2, plans=plans)
    vec = update.vector_width(dtype)
    assert sorted(launches) == [1, 1, vec, vec]
    # fp32: D = 68, 16 (two groups) and 36 are multiples of 4; bf16: only D = 16 is one of 8
    vector_rows = plans.key((blocks[0].params[0].device, dtype, "problems", vec))
    assert len(vector_rows) == (4 if dtype == torch.float32 else 2)


def test_unaligned_precond_takes_the_scalar_variant(fused_only, launches):
    """A P with D % 4 == 0 at an odd offset (e.g. sliced out of a loaded state) is read element-wise."""
    gen = torch.Generator().manual_seed(8)
    blocks = make_blocks(torch.float32, HYPER[:2], gen, layers=[((9, 36), 1, False)])
    p = blocks[0].precond
    blocks[0].precond = torch.empty(p.numel() + 1).to(DEVICE)[1:].view(p.shape).copy_(p)
    assert update._precond_vector_cols(blocks[0].precond) is None
    buffers = [None] * len(flat(blocks))
    fresh_grads(blocks, gen)
    check_step(blocks, buffers, damping=0.7, tol=1e-5)
    assert launches == [1]


def test_precond_vector_cols_checks_every_condition():
    base = torch.empty(2 * 5 * 8 + 8)
    assert update._precond_vector_cols(base[:80].view(2, 5, 8)[..., :5]) == 8  # rows padded to 8
    assert update._precond_vector_cols(base[:64].view(2, 4, 8)[..., :4]) == 4
    assert update._precond_vector_cols(base[4:84].view(2, 5, 8)[..., :5]) == 8  # offset 16 bytes
    assert update._precond_vector_cols(base[1:81].view(2, 5, 8)[..., :5]) is None  # misaligned base
    assert update._precond_vector_cols(base[:50].view(2, 5, 5)) is None  # row stride 5
    assert update._precond_vector_cols(base[:60].view(2, 5, 6)[..., :5]) is None  # row stride 6
    # storage ends right after the last row's last element: its padded vector would read past it
    assert update._precond_vector_cols(torch.empty(77).as_strided((2, 5, 5), (40, 8, 1))) is None
    assert update._precond_vector_cols(torch.empty(80).as_strided((2, 5, 5), (40, 8, 1))) == 8


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_channels_last_weights_take_the_fused_update(dtype, fused_only, launches):
    gen = torch.Generator().manual_seed(9)
    blocks = make_blocks(dtype, HYPER[1:], gen, layers=CHANNELS_LAST_LAYERS, layout=channels_last)
    assert not blocks[0].params[0].is_contiguous() and not blocks[3].params[0].is_contiguous()
    originals = [b.precond.clone() for b in blocks[:len(CHANNELS_LAST_LAYERS)]]
    buffers = check_steps(blocks, gen, 3, damping=0.5, tol=1e-5 if dtype == torch.float32 else 2e-2)
    for block, original in zip(blocks, originals):  # the state stays in DESIGN order
        assert torch.equal(block.precond, original)
    for p, buf in zip(flat(blocks), buffers):
        assert buf is None or buf.stride() == p.stride()
    assert 1 in launches and (dtype != torch.float32 or 4 in launches)


def test_channels_last_permuted_precond_is_made_once_per_p():
    gen = torch.Generator().manual_seed(10)
    p = random_precond(2, 3 * 4 + 1, torch.float32, gen)
    plans = KernelPlans()
    first = update._memory_order_precond(p, 3, 4, plans)
    assert update._memory_order_precond(p, 3, 4, plans) is first
    order = [c * 4 + k for k in range(4) for c in range(3)] + [12]  # memory index k·C + c -> c·K + k
    assert torch.equal(first, p[:, order][:, :, order])
    assert first.stride(1) % 4 == 0 and first.data_ptr() % 16 == 0
    p.mul_(2)  # a new P written in place (as a broadcast does): a new copy
    second = update._memory_order_precond(p, 3, 4, plans)
    assert second is not first and torch.equal(second, p[:, order][:, :, order])
    key = id(p)
    del p, first, second
    assert ("permuted", key) not in plans.names()  # dropped with its P


def test_offsets_fit_int32_guards_the_32_bit_kernel():
    config = dict(BLOCK_M=64, BLOCK_N=64, BLOCK_K=32)
    # ResNet-50's largest: layer4 3×3 (512 rows, D = 4608) and the fc (1000 × 2049)
    assert update.offsets_fit_int32(512, 4608, 4608, 4608, config)
    assert update.offsets_fit_int32(1000, 2049, 2048, 2052, config)
    # 2**31 elements of Ĝ (largest offset 2**31 − 1) fit, one more row does not; nor does a P of D' = 46341
    assert update.offsets_fit_int32(2 ** 16, 2 ** 15, 2 ** 15, 2 ** 15, config)
    assert not update.offsets_fit_int32(2 ** 16 + 1, 2 ** 15, 2 ** 15, 2 ** 15, config)
    assert not update.offsets_fit_int32(8, 46341, 46341, 46341, config)
    # 32705 rows: the masked rows of the last tile (up to 32767) count too
    assert 32704 * 65538 + 15 < 2 ** 31 and 32767 * 65538 + 63 >= 2 ** 31
    assert not update.offsets_fit_int32(32705, 16, 65538, 16, config)
    assert update.offsets_fit_int32(32705, 16, 65537, 16, config)


def test_problems_past_int32_take_the_reference_path(monkeypatch):
    """The host routes a block whose offsets would overflow to the reference (the guard made strict)."""
    monkeypatch.setattr(update, "offsets_fit_int32", lambda *args: False)
    gen = torch.Generator().manual_seed(11)
    blocks = make_blocks(torch.float32, HYPER[:2], gen, layers=LAYERS[:2])
    referenced = reference_spy(monkeypatch)
    buffers = [None] * len(flat(blocks))
    fresh_grads(blocks, gen)
    check_step(blocks, buffers, damping=0.5, tol=1e-5)
    assert referenced == blocks[:2]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_found_inf_skips_every_write_on_the_device(dtype, fused_only, launches):
    # GradScaler's skipped step: the grouped and the plain kernel leave parameters and buffers as they
    # were (bitwise), however non-finite the gradients; the next clean step is the usual one
    gen = torch.Generator().manual_seed(9)
    blocks = make_blocks(dtype, HYPER[:2], gen, layers=VECTOR_LAYERS)
    for block in blocks[:len(VECTOR_LAYERS)]:
        block.precond = padded(block.precond)
    buffers = [None] * len(flat(blocks))
    fresh_grads(blocks, gen)
    update.preconditioned_update_(blocks, buffers, damping=0.8)  # creates the momentum buffers
    assert_skipped_step_writes_nothing(blocks, buffers, gen, damping=0.8)
    assert set(launches) == {1, update.vector_width(dtype)}  # both variants ran (and skipped)
    fresh_grads(blocks, gen)
    check_step(blocks, buffers, damping=0.8, tol=1e-5 if dtype == torch.float32 else 2e-2)


def test_transformed_gradient_takes_the_fused_update(fused_only):
    # KFAC's left-transformed gradient (Block.left_transformed_grad, [groups, rows, D'] in DESIGN order)
    # replaces the parameters' own gradients in the grouped kernel
    gen = torch.Generator().manual_seed(10)
    blocks = [b for b in make_blocks(torch.float32, HYPER[:2], gen) if b.precond is not None]
    fresh_grads(blocks, gen)
    for block in blocks:
        w = block.params[0]
        rows, dim_p = w.shape[0] // block.groups, block.precond.shape[-1]
        block.left_transformed_grad = torch.randn(block.groups, rows, dim_p, generator=gen).to(DEVICE)
    assert_transformed_gradient_tracks_reference(blocks, damping=0.8)


# ---- the low-rank update: U = (Ĝ − (Ĝ·Q)·diag(s/(s+λ))·Qᵀ)/λ (DESIGN §1.3) ----------------------

# (weight shape, groups, bias, rank): D = 37 with an odd rank (scalar variant); a Linear over two row
# and two column tiles of U, D' = 69 and r = 8 (vector for fp32); a grouped conv (D = 16) and a Conv1d
# (D = 15, r = 5).
LOW_RANK_LAYERS = [((5, 37), 1, True, 3), ((70, 68), 1, True, 8), ((12, 4, 2, 2), 2, False, 4),
                   ((4, 5, 3), 1, False, 5)]
CHANNELS_LAST_LOW_RANK = [((8, 4, 3, 3), 1, True, 4), ((12, 2, 3, 2), 3, True, 5), ((4, 2, 2, 3, 2), 1, True, 8)]


@pytest.fixture
def low_rank_launches(monkeypatch):
    """The VEC of every launch of the low-rank update's second pass."""
    return vec_spy(monkeypatch, "low_rank_update_kernel")


def make_low_rank_blocks(dtype, hyper, gen, layers=LOW_RANK_LAYERS, layout=None):
    """Low-rank blocks (orthonormal Q, eigenvalues around λ so that no term dominates), then the dense
    and unpreconditioned blocks of `make_blocks`: all kinds in one call."""
    blocks = make_blocks(dtype, hyper, gen, layers=[(shape, groups, bias) for shape, groups, bias, _ in layers],
                         layout=layout)
    for block, (_, groups, bias, rank) in zip(blocks, layers):
        dim_p = block.params[0][0].numel() + bias
        q = torch.linalg.qr(torch.randn(groups, dim_p, rank, generator=gen, dtype=torch.float64)).Q
        block.precond = None
        block.eigvecs = q.to(DEVICE, torch.float32).contiguous()
        block.eigvals = (3 * torch.rand(groups, rank, generator=gen)).to(DEVICE)
    return blocks + make_blocks(dtype, hyper, gen, layers=LAYERS[:2])


@pytest.mark.parametrize("hyper", [HYPER[:2], [HYPER[2], HYPER[0]]], ids=["nesterov+dampening", "no-momentum+nesterov"])
def test_low_rank_update_matches_float64_over_steps(hyper, fused_only, low_rank_launches):
    gen = torch.Generator().manual_seed(12)
    blocks = make_low_rank_blocks(torch.float32, hyper, gen)
    check_steps(blocks, gen, 3, damping=0.7, tol=1e-5)
    assert sorted(set(low_rank_launches)) == [1, 4]  # D = 68 and 16 with r = 8 and 4 take the vector variant


def test_low_rank_update_agrees_with_reference(fused_only):
    gen = torch.Generator().manual_seed(13)
    assert_tracks_reference(make_low_rank_blocks(torch.float32, HYPER[:2], gen), gen, damping=0.4)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_rank_update_of_low_precision_params(dtype, fused_only):
    gen = torch.Generator().manual_seed(14)
    blocks = make_low_rank_blocks(dtype, HYPER[:2], gen, layers=LOW_RANK_LAYERS[1:3])
    check_steps(blocks, gen, 2, damping=0.8, tol=2e-2)


def test_low_rank_update_of_channels_last_weights(fused_only):
    """Q's rows are permuted to the weight's memory order once per Q; the state keeps DESIGN order."""
    gen = torch.Generator().manual_seed(15)
    blocks = make_low_rank_blocks(torch.float32, HYPER[1:], gen, layers=CHANNELS_LAST_LOW_RANK, layout=channels_last)
    assert not blocks[0].params[0].is_contiguous()
    originals = [b.eigvecs.clone() for b in blocks[:len(CHANNELS_LAST_LOW_RANK)]]
    check_steps(blocks, gen, 2, damping=0.5, tol=1e-5)
    for block, original in zip(blocks, originals):
        assert torch.equal(block.eigvecs, original)


def test_low_rank_update_with_grad_scale_and_a_skipped_step(fused_only):
    gen = torch.Generator().manual_seed(16)
    blocks = make_low_rank_blocks(torch.float32, HYPER[:2], gen)
    buffers = [None] * len(flat(blocks))
    fresh_grads(blocks, gen, scale=512.0)
    check_step(blocks, buffers, damping=0.6, tol=1e-5, grad_scale=torch.tensor(512.0, device=DEVICE))
    assert_skipped_step_writes_nothing(blocks, buffers, gen, damping=0.6)


def test_low_rank_update_of_a_transformed_gradient(fused_only):
    """KFAC's left-transformed gradient (Block.left_transformed_grad) with a low-rank A: the same two products."""
    gen = torch.Generator().manual_seed(17)
    blocks = [b for b in make_low_rank_blocks(torch.float32, HYPER[:2], gen) if b.eigvecs is not None]
    fresh_grads(blocks, gen)
    for block in blocks:
        rows, dim_p = block.params[0].shape[0] // block.groups, block.eigvecs.shape[1]
        block.left_transformed_grad = torch.randn(block.groups, rows, dim_p, generator=gen).to(DEVICE)
    assert_transformed_gradient_tracks_reference(blocks, damping=0.8)


def test_foof_with_rank_and_triton_update_tracks_reference(fused_only, monkeypatch):
    monkeypatch.setattr(ops, "TRITON_KERNELS", {"preconditioned_update_": "fastfoof.kernels.update"})
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.Tanh(), nn.Conv2d(6, 6, 3, stride=2, bias=False),
                          nn.Tanh(), nn.Flatten(), nn.Linear(6 * 3 * 4, 5)).to(DEVICE)
    twin = copy.deepcopy(model)
    kw = dict(lr=0.05, damping=0.5, momentum=0.9, inv_period=2, stats_steps=1, rank=6)
    fused, oracle = fastfoof.FOOF(model, backend="triton", **kw), fastfoof.FOOF(twin, backend="reference", **kw)
    gen = torch.Generator().manual_seed(1)
    for _ in range(4):
        x = torch.randn(4, 3, 7, 9, generator=gen).to(DEVICE)
        y = torch.randint(0, 5, (4,), generator=gen).to(DEVICE)
        for m, opt in ((model, fused), (twin, oracle)):
            opt.zero_grad()
            F.cross_entropy(m(x), y).backward()
            opt.step()
    assert all("top_eigvecs" in fused.state[layer.weight] for layer in fused.layers)  # D' = 28, 54 and 73 > 12
    for p, q in zip(model.parameters(), twin.parameters()):
        assert rel_error(p, q) <= 1e-5


# ---- grafting (graft = κ, DESIGN §1.4): U rescaled per preconditioned block to ‖Ĝ‖_F (by at most κλ), U = G for
# the rest; κ a value neither optimizer uses, so that none is built into the kernels ----

KAPPA = 2.5

def grafted_blocks(blocks):
    return [b for b in blocks if (b.precond is not None or b.eigvecs is not None) and b.params[0].grad is not None]


def test_grafted_scale_is_bounded_by_kappa_damping(fused_only):
    """A preconditioner that shrinks every direction 1000-fold: the graft would scale U by about 1000 · ‖P‖,
    the bound κλ takes over (the float64 oracle bounds it the same way)."""
    gen = torch.Generator().manual_seed(26)
    blocks = make_blocks(torch.float32, HYPER[:2], gen)
    for block in grafted_blocks(blocks):
        block.precond.mul_(1e-3)
    check_steps(blocks, gen, 2, damping=0.7, tol=1e-5, graft=KAPPA)


@pytest.mark.parametrize("layers,layout,hyper", [(LAYERS, None, HYPER[:2]),
                                                 (CHANNELS_LAST_LAYERS, channels_last, [HYPER[2], HYPER[0]])],
                         ids=["contiguous", "channels_last"])
def test_grafted_update_matches_float64_and_the_reference(layers, layout, hyper, fused_only):
    # odd sizes, grouped convs, bias and no bias, plain parameters (U = G); the second step updates the
    # momentum buffers the first created
    gen = torch.Generator().manual_seed(20)
    blocks = make_blocks(torch.float32, hyper, gen, layers=layers, layout=layout)
    check_steps(blocks, gen, 2, damping=0.7, tol=1e-5, graft=KAPPA)
    assert_tracks_reference(blocks, gen, damping=0.7, graft=KAPPA)


def test_grafted_low_rank_update_matches_float64_and_the_reference(fused_only):
    """Low-rank, dense and plain blocks in one call: one scale computation for both GEMM kinds."""
    gen = torch.Generator().manual_seed(21)
    blocks = make_low_rank_blocks(torch.float32, HYPER[:2], gen)
    check_steps(blocks, gen, 2, damping=0.6, tol=1e-5, graft=KAPPA)
    assert_tracks_reference(blocks, gen, damping=0.6, graft=KAPPA)


def test_grafted_update_of_bf16_params(fused_only):
    gen = torch.Generator().manual_seed(22)
    blocks = make_low_rank_blocks(torch.bfloat16, HYPER[:2], gen, layers=LOW_RANK_LAYERS[1:3])
    check_steps(blocks, gen, 2, damping=0.8, tol=2e-2, graft=KAPPA)


def test_grafted_transformed_gradient_takes_the_norm_of_the_raw_gradient(fused_only):
    # KFAC's Block.left_transformed_grad feeds U; ‖Ĝ‖ is still that of the parameters' own gradients
    gen = torch.Generator().manual_seed(23)
    blocks = [b for b in make_blocks(torch.float32, HYPER[:2], gen, layers=LAYERS[:4]) if b.precond is not None]
    fresh_grads(blocks, gen)
    for block in blocks:
        rows, dim_p = block.params[0].shape[0] // block.groups, block.precond.shape[-1]
        block.left_transformed_grad = torch.randn(block.groups, rows, dim_p, generator=gen).to(DEVICE)
    assert_transformed_gradient_tracks_reference(blocks, damping=0.8, graft=KAPPA)


def test_grafted_reference_blocks_join_the_fused_blocks_norms(monkeypatch):
    """Blocks the kernels cannot take (float64; a channels_last weight with a contiguous grad), between
    fused ones: their U comes from the reference, their norms go through the same reduce_norms call,
    and each is grafted with its own norm."""
    gen = torch.Generator().manual_seed(24)
    fused = make_blocks(torch.float32, HYPER[:2], gen, layers=LAYERS[:4])
    conv = mixed_layout_conv(gen)
    wide = make_blocks(torch.float64, HYPER[:2], gen, layers=[((9, 2, 3, 2), 3, True)])[0]
    blocks = fused[:2] + [conv] + fused[2:4] + [wide] + fused[4:]
    referenced, calls = reference_spy(monkeypatch), []
    check_mixed_layout_steps(blocks, conv, gen, graft=KAPPA,
                             reduce_norms=lambda squares, rows: (calls.append(rows), squares)[1])
    assert referenced == [conv, wide] * 2
    assert [[id(b) for b in rows] for rows in calls] == [[id(b) for b in grafted_blocks(blocks)]] * 2


def test_grafted_zero_gradient_steps_only_the_weight_decay(fused_only):
    """‖U‖ = 0: scale 0, no NaN (a dense and a low-rank block); the other blocks step as usual."""
    gen = torch.Generator().manual_seed(25)
    blocks = make_low_rank_blocks(torch.float32, HYPER[:2], gen, layers=LOW_RANK_LAYERS[1:2])
    buffers = [None] * len(flat(blocks))
    fresh_grads(blocks, gen)
    zero = [blocks[0], blocks[1]]  # low rank (with bias), dense (with bias)
    for block in zero:
        for p in block.params:
            p.grad.zero_()
    before = [p.clone() for p in flat(blocks)]
    update.preconditioned_update_(blocks, buffers, damping=0.5, graft=KAPPA)
    slot = 0
    for block in blocks:
        for p, old, group in zip(block.params, before[slot:], block.options):
            assert torch.isfinite(p).all() and (buffers[slot] is None or torch.isfinite(buffers[slot]).all())
            if block in zero:
                assert torch.allclose(p, old * (1 - group["lr"] * group["weight_decay"]), rtol=1e-6, atol=0)
                assert buffers[slot] is None or torch.equal(buffers[slot], torch.zeros_like(buffers[slot]))
            else:
                assert not torch.equal(p, old)
            slot += 1


def test_grafted_update_with_grad_scale_and_a_skipped_step(fused_only):
    gen = torch.Generator().manual_seed(26)
    blocks = make_low_rank_blocks(torch.float32, HYPER[:2], gen, layers=LOW_RANK_LAYERS[:2])
    buffers = [None] * len(flat(blocks))
    scale = torch.tensor(1024.0, device=DEVICE)
    fresh_grads(blocks, gen, scale=1024.0)
    check_step(blocks, buffers, damping=0.6, tol=1e-5, grad_scale=scale, graft=KAPPA)
    calls = []
    assert_skipped_step_writes_nothing(blocks, buffers, gen, damping=0.6, graft=KAPPA,
                                       reduce_norms=lambda squares, rows: (calls.append(rows), squares)[1])
    assert len(calls) == 1  # FSDP's all-reduce runs on a skipped step too
    fresh_grads(blocks, gen, scale=1024.0)
    check_step(blocks, buffers, damping=0.6, tol=1e-5, grad_scale=scale, graft=KAPPA)


def test_reduce_norms_gets_the_grafted_blocks_squares_once_and_its_result_is_used(fused_only):
    gen = torch.Generator().manual_seed(27)
    plain_sgd = dict(lr=0.1, momentum=0.0, dampening=0.0, nesterov=False, weight_decay=0.0)
    blocks = make_low_rank_blocks(torch.float32, [plain_sgd, plain_sgd], gen, layers=LOW_RANK_LAYERS[:2])
    fresh_grads(blocks, gen)
    for i in (0, 5):  # low rank, dense: a bias without a gradient is left out of both norms (and not stepped)
        blocks[i].params[1].grad = None
    want = []
    step64(blocks, [None] * len(flat(blocks)), 0.5, graft=KAPPA, squares=want)
    twin = copy.deepcopy(blocks)
    before = [p.clone() for p in flat(blocks)]
    calls = []

    def record(squares, rows):
        calls.append((squares.clone(), rows))
        return squares

    update.preconditioned_update_(blocks, [None] * len(flat(blocks)), damping=0.5, graft=KAPPA, reduce_norms=record)
    (squares, rows), = calls
    grafted = grafted_blocks(blocks)
    assert len(grafted) == 4 and [id(b) for b in rows] == [id(b) for b in grafted]  # two low-rank, two dense
    assert squares.shape == (4, 2) and squares.dtype == torch.float32
    assert rel_error(squares[:, 0], torch.tensor(want)[:, 0]) <= 1e-6
    assert rel_error(squares[:, 1], torch.tensor(want)[:, 1]) <= 1e-6
    # the returned squares are the ones used: doubling ‖Ĝ‖² scales every grafted U by √2, nothing else
    update.preconditioned_update_(twin, [None] * len(flat(twin)), damping=0.5, graft=KAPPA,
                                  reduce_norms=lambda squares, rows: squares * squares.new_tensor([2.0, 1.0]))
    for block, twin_block in zip(blocks, twin):
        for p, q, old in zip(block.params, twin_block.params, before[:len(block.params)]):
            if block in grafted and p.grad is not None:
                assert rel_error(q - old, (p - old) * 2 ** 0.5) <= 1e-6
            else:
                assert torch.equal(p, q)
        before = before[len(block.params):]
    # no grafted block: called once all the same, with [0, 2]
    calls.clear()
    plain = [b for b in blocks if b not in grafted]
    update.preconditioned_update_(plain, [None] * len(flat(plain)), damping=0.5, graft=KAPPA, reduce_norms=record)
    (squares, rows), = calls
    assert squares.shape == (0, 2) and rows == []
    for wrong in ("adam", "sgd", 0.0, -1.0):  # the ops take grafting's bound κ > 0 (the optimizers map "sgd")
        with pytest.raises(ValueError, match="graft"):
            update.preconditioned_update_(blocks, [None] * len(flat(blocks)), damping=0.5, graft=wrong)
