"""The training code people write around an optimizer: model copies, optimizer lifetimes, torch.func,
activation checkpointing, in-place ops, GradScaler, accumulation, resumes, bad arguments and diverging
runs. Each behaves as with torch.optim.SGD: no crash, no leak, no silently wrong number."""
import copy
import gc
import io
import math
import pickle
import re
import warnings
import weakref

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, grad, vmap
from torch.multiprocessing.reductions import StorageWeakRef
from torch.optim.swa_utils import AveragedModel
from torch.utils.checkpoint import checkpoint

import fastfoof
from fastfoof import linalg, ops
from fastfoof.observe import LayerHook
from helpers import gram64, rel_error

BACKENDS = ["reference", "triton"]  # triton: the kernels under TRITON_INTERPRET=1 on CPU (conftest)


def small_net(seed=0, batch_norm=True):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(2, 4, 3, padding=1), nn.BatchNorm2d(4) if batch_norm else nn.Identity(), nn.ReLU(),
                         nn.Conv2d(4, 3, 3, stride=2), nn.Flatten(), nn.Linear(3 * 2 * 2, 5))


def batch(n=6, seed=1, dtype=None):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 2, 5, 5, generator=g, dtype=dtype), torch.randint(0, 5, (n,), generator=g)


def train_step(model, opt, x, y):
    opt.zero_grad()
    F.cross_entropy(model(x), y).backward()
    opt.step()


def observed_stat(opt, index):
    statistic = opt.statistics.of(opt.layers[index])
    return statistic.pending / statistic.samples


# ---- 1. the public ops on inputs that require grad ------------------------------------------------

@pytest.mark.parametrize("backend", BACKENDS)
def test_ops_compute_without_autograd_and_return_detached_tensors(backend):
    torch.manual_seed(0)
    lin, other = nn.Linear(4, 9), nn.Linear(9, 3)
    x = torch.randn(7, 4)
    h = lin(x)
    gram = ops.patch_gram(h, other, backend=backend)
    assert not gram.requires_grad and gram.grad_fn is None
    assert rel_error(gram, gram64(h.detach(), other, True)) <= 1e-5
    out = torch.randn(1, 10, 10)
    start = out.clone()
    result = ops.patch_gram_(out, h, other, beta=1.0, backend=backend)
    assert result is out and result.grad_fn is None and not result.requires_grad
    assert rel_error(out, start + gram64(h.detach(), other, True)) <= 1e-5
    a = torch.randn(2, 5, 11, requires_grad=True)
    mats = [a @ a.mT]
    inverse = ops.damped_inverse(mats, 0.5, backend=backend)[0]
    assert not inverse.requires_grad and inverse.grad_fn is None
    expected = torch.linalg.inv(mats[0].detach().double() + 0.5 * torch.eye(5, dtype=torch.float64))
    assert rel_error(inverse, expected) <= 1e-5


@pytest.mark.parametrize("shape, module", [
    ((6, 4), nn.Linear(8, 3)),
    ((2, 3, 5, 5), nn.Conv2d(4, 2, 3)),
    ((2, 4, 5), nn.Conv2d(4, 2, 3)),
    ((2, 4, 5, 5, 5), nn.Conv2d(4, 2, 3)),
])
def test_an_input_that_does_not_fit_the_module_is_a_value_error(shape, module):
    with pytest.raises(ValueError, match=r"does not fit .*" + type(module).__name__):
        ops.patch_gram(torch.randn(shape), module)


# ---- 2. copies of the model ----------------------------------------------------------------------

def _trains_as_a_plain_model(model):
    x, y = batch(seed=7)
    sgd = torch.optim.SGD(model.parameters(), lr=0.1)
    before = [p.detach().clone() for p in model.parameters()]
    train_step(model, sgd, x, y)
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters()))


@pytest.mark.parametrize("make_copy", ["deepcopy", "averaged_model", "torch_save", "pickle"])
def test_a_copy_of_the_model_trains_as_a_plain_model_and_carries_no_optimizer(make_copy):
    model = small_net()
    opt = fastfoof.FOOF(model, lr=0.1, inv_period=3, stats_steps=1)
    x, y = batch()
    train_step(model, opt, x, y)
    stats = [(opt.statistics.of(layer).samples, opt.statistics.of(layer).pending) for layer in opt.layers]
    if make_copy == "deepcopy":
        twin = copy.deepcopy(model)
    elif make_copy == "averaged_model":
        twin = AveragedModel(model)
    elif make_copy == "torch_save":
        buffer = io.BytesIO()
        torch.save(model, buffer)
        assert b"FOOF" not in buffer.getvalue() and b"momentum_buffer" not in buffer.getvalue()
        twin = torch.load(io.BytesIO(buffer.getvalue()), weights_only=False)
    else:
        data = pickle.dumps(model)
        assert b"FOOF" not in data
        twin = pickle.loads(data)
    _trains_as_a_plain_model(twin)
    for layer, (samples, stat) in zip(opt.layers, stats):  # the copy's forwards did not reach the optimizer
        assert opt.statistics.of(layer).samples == samples and opt.statistics.of(layer).pending is stat
    train_step(model, opt, x, y)  # and the original still trains with it
    assert all(opt.statistics.of(layer).samples == 0 for layer in opt.layers)  # folded at the step
    if make_copy == "averaged_model":
        twin.update_parameters(model)


# ---- 3. optimizer lifetime -----------------------------------------------------------------------

def test_an_unreferenced_optimizer_is_collected_with_its_hooks(monkeypatch):
    model = small_net()
    x, y = batch()
    calls = []
    original = ops.patch_gram_
    monkeypatch.setattr(ops, "patch_gram_", lambda *a, **k: calls.append(1) or original(*a, **k))
    alive = []
    for lr in (0.1, 0.03, 0.01, 0.003):  # an lr sweep on one model
        opt = fastfoof.FOOF(model, lr=lr, inv_period=5, stats_steps=1)
        alive.append(weakref.ref(opt))
        calls.clear()
        train_step(model, opt, x, y)
        assert len(calls) == 3  # this optimizer's three layers, none of the earlier optimizers'
        del opt
        gc.collect()
        assert all(ref() is None for ref in alive)
        assert not any(isinstance(h, LayerHook) for m in model.modules() for h in m._forward_hooks.values())


def test_remove_hooks_still_detaches_a_live_optimizer():
    model = small_net()
    opt = fastfoof.FOOF(model, lr=0.1)
    opt.remove_hooks()
    x, y = batch()
    train_step(model, opt, x, y)
    assert all(not m._forward_hooks for m in model.modules())
    assert all(opt.statistics.of(layer).samples == 0 for layer in opt.layers)


# ---- 4. torch.func -------------------------------------------------------------------------------

def test_forwards_inside_torch_func_transforms_are_not_observed(float64):
    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3))
    opt = fastfoof.FOOF(model, lr=0.1, inv_period=3, stats_steps=1)
    x, y = torch.randn(5, 4), torch.randint(0, 3, (5,))
    params = {k: v.detach() for k, v in model.named_parameters()}

    def loss(p, xi, yi):
        return F.cross_entropy(functional_call(model, p, (xi[None],)), yi[None])

    per_sample = vmap(grad(loss), in_dims=(None, 0, 0))(params, x, y)  # per-sample gradients, train mode
    assert per_sample["0.weight"].shape == (5, 6, 4)
    assert all(opt.statistics.of(layer).samples == 0 for layer in opt.layers)
    opt.zero_grad()
    F.cross_entropy(model(x), y).backward()  # the next normal step works and sees only its own batch
    assert rel_error(observed_stat(opt, 0), gram64(x, model[0], True) / 5) <= 1e-12
    opt.step()


# ---- 5. activation checkpointing memory ----------------------------------------------------------

class Blocks(nn.Module):
    def __init__(self, reentrant):
        super().__init__()
        torch.manual_seed(0)
        self.inner = nn.Sequential(*[nn.Sequential(nn.Linear(16, 16), nn.Tanh()) for _ in range(4)])
        self.reentrant = reentrant

    def forward(self, x):
        return checkpoint(self.inner, x, use_reentrant=self.reentrant)


@pytest.mark.parametrize("observed", [True, False])
def test_non_reentrant_checkpointing_holds_no_inner_inputs(observed):
    model = Blocks(reentrant=False)
    opt = fastfoof.FOOF(model, lr=0.1, inv_period=4, stats_steps=1)
    seen = []  # the storage of each inner layer's input, weakly
    for block in model.inner:
        block[0].register_forward_hook(lambda m, args, out: seen.append(StorageWeakRef(args[0].untyped_storage())))
    x = torch.randn(8, 16, requires_grad=True)
    for step in range(3 if observed else 1):  # step 1 observes (first P); steps 2–3 do not (T=4, S=1)
        opt.zero_grad()
        seen.clear()
        out = model(x)
        gc.collect()
        alive = [ref for ref in seen[1:] if not ref.expired()]  # the first inner input is the segment's input
        assert not alive, f"{len(alive)} inner layer inputs held after the forward"
        out.square().sum().backward()
        opt.step()
    assert all(opt._ready(layer) for layer in opt.layers)


def test_checkpointed_statistics_equal_the_plain_ones(float64):
    for reentrant in (False, True):
        plain, ckpt = Blocks(reentrant), Blocks(reentrant)
        opts = [fastfoof.FOOF(m, lr=0.1) for m in (plain, ckpt)]
        x = torch.randn(8, 16, requires_grad=True)
        plain.inner(x).square().sum().backward()
        ckpt(x).square().sum().backward()
        for a, b in zip(*([opt.statistics.of(layer) for layer in opt.layers] for opt in opts)):
            assert a.samples == b.samples == 8
            assert rel_error(b.pending, a.pending) <= 1e-12


# ---- 6. inputs changed in place after the forward ------------------------------------------------

class Residual(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.l1, self.l2 = nn.Linear(8, 8), nn.Linear(8, 3)

    def forward(self, x):
        h = x * 1.0
        h += self.l1(h).float()  # under autocast: autograd saved l1's bf16 cast, so this is legal
        return self.l2(h)


@pytest.mark.parametrize("compiled", [False, True])
def test_an_input_changed_in_place_after_the_layer_gives_the_statistic_of_what_it_saw(compiled):
    model = Residual()
    opt = fastfoof.FOOF(model, lr=0.1, backend="reference")
    run = torch.compile(model, fullgraph=True) if compiled else model
    x = torch.randn(6, 8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = run(x)
    x.mul_(3.0)  # the user changes the batch in place before backward
    out.float().sum().backward()
    opt.step()  # the first fold: Σ/n is this batch's statistic
    expected = gram64((x / 3.0).bfloat16(), model.l1, True) / 6
    state = opt.state[model.l1.weight]
    assert rel_error(state["ema"] / state["ema_count"], expected) <= 1e-5


# ---- 7. reentrant checkpointing plus an ordinary call ----------------------------------------------

def test_reentrant_recompute_and_an_ordinary_call_each_count_once(float64):
    torch.manual_seed(0)
    lin = nn.Linear(5, 5)
    opt = fastfoof.FOOF(lin, lr=0.1)
    x = torch.randn(4, 5)
    h1 = lin(x)
    checkpoint(lin, h1, use_reentrant=True).sum().backward()
    assert opt.statistics.of(opt.layers[0]).samples == 8
    expected = (gram64(x, lin, True) + gram64(h1.detach(), lin, True)) / 8
    assert rel_error(observed_stat(opt, 0), expected) <= 1e-12


# ---- 8. KFAC(fisher="mc") inside reentrant checkpoints ---------------------------------------------

class CheckpointedConvNet(nn.Module):
    def __init__(self, mode):
        super().__init__()
        torch.manual_seed(0)
        self.c0, self.c1 = nn.Conv2d(2, 4, 3, padding=1), nn.Conv2d(4, 4, 3, padding=1)
        self.head = nn.Linear(4, 5)
        self.mode = mode

    def block(self, h):
        return torch.tanh(self.c1(h))

    def forward(self, x):
        h = torch.tanh(self.c0(x))
        h = self.block(h) if self.mode is None else checkpoint(self.block, h, use_reentrant=self.mode == "reentrant")
        return self.head(h.mean((2, 3)))


@pytest.mark.parametrize("mode", ["reentrant", "non_reentrant"])
def test_kfac_mc_inside_checkpoints_equals_the_plain_model(mode, float64):
    x, y = batch(n=5)
    runs = {}
    for m in (None, mode):
        model = CheckpointedConvNet(m)
        opt = fastfoof.KFAC(model, lr=0.3, fisher="mc", inv_period=2, stats_steps=1)
        before = [p.grad for p in model.parameters()]
        for _ in range(3):
            opt.zero_grad()
            logits = model(x)
            opt.backward_fisher(logits)
            assert all(p.grad is None for p in model.parameters())  # .grad untouched
            F.cross_entropy(logits, y).backward()
            opt.step()
        assert all(opt._ready(layer) for layer in opt.layers)
        runs[m] = [p.detach().clone() for p in model.parameters()]
        del before
    for a, b in zip(runs[None], runs[mode]):
        assert rel_error(b, a) <= 1e-12


# ---- 9. KFAC under GradScaler ----------------------------------------------------------------------

@pytest.mark.parametrize("damping_mode, backend", [("heuristic", "reference"), ("factor", "reference"),
                                                   ("exact", "reference"), ("heuristic", "triton")])
def test_kfac_under_a_power_of_two_grad_scale_changes_nothing(damping_mode, backend):
    x, y = batch(n=8)
    results = []
    for scale in (None, 2.0 ** 16):
        model = small_net()
        opt = fastfoof.KFAC(model, lr=0.3, damping_mode=damping_mode, inv_period=2, stats_steps=2, backend=backend)
        scaler = torch.amp.GradScaler("cpu", init_scale=scale, growth_interval=2) if scale else None
        for _ in range(4):
            opt.zero_grad()
            loss = F.cross_entropy(model(x), y)
            if scaler is None:
                loss.backward()
                opt.step()
            else:
                scaler.scale(loss).backward()
                scaler.step(opt)
                scaler.update()  # the scale grows every 2 steps: G must not jump with it
        if scaler is not None:
            assert scaler.get_scale() > scale
        results.append([p.detach().clone() for p in model.parameters()])
    for a, b in zip(*results):
        assert torch.equal(a, b)


# ---- 10. KFAC under gradient accumulation and several backwards ----------------------------------------

@pytest.mark.parametrize("fisher", ["empirical", "mc"])
def test_kfac_gradient_accumulation_equals_the_concatenated_batch(fisher, float64):
    x, y = batch(n=9)
    results = []
    for micro in (1, 3):
        model = small_net(batch_norm=False)  # BatchNorm's batch statistics would differ per micro-batch
        opt = fastfoof.KFAC(model, lr=0.3, fisher=fisher, inv_period=2, stats_steps=2)
        gen = torch.Generator().manual_seed(5)
        for _ in range(2):
            opt.zero_grad()
            for xs, ys in zip(x.chunk(micro), y.chunk(micro)):
                logits = model(xs)
                if fisher == "mc":
                    # one label per sample from the same stream, whatever the split
                    opt.backward_fisher(logits, generator=gen)
                (F.cross_entropy(logits, ys) * len(ys) / len(y)).backward()
            opt.step()
        results.append([p.detach().clone() for p in model.parameters()])
    for a, b in zip(*results):
        assert rel_error(b, a) <= 1e-12


def test_kfac_several_backwards_through_one_forward_warn_once():
    model = small_net()
    opt = fastfoof.KFAC(model, lr=0.1)
    x, y = batch()
    logits = model(x)
    with pytest.warns(RuntimeWarning, match="several backwards through one forward"):
        F.cross_entropy(logits, y).backward(retain_graph=True)
        logits.square().mean().backward()
    opt.step()


# ---- 11. KFAC(fisher="mc") resume ------------------------------------------------------------------

def test_kfac_mc_resume_is_bit_exact_without_saving_rng_state():
    x, y = batch(n=8)

    def run(model, opt, steps):
        for _ in range(steps):
            opt.zero_grad()
            logits = model(x)
            opt.backward_fisher(logits)
            F.cross_entropy(logits, y).backward()
            opt.step()

    model = small_net()
    opt = fastfoof.KFAC(model, lr=0.3, fisher="mc", inv_period=2, stats_steps=2)
    run(model, opt, 3)
    saved = copy.deepcopy((model.state_dict(), opt.state_dict()))
    run(model, opt, 3)
    torch.manual_seed(1234)  # a fresh process's global RNG: the optimizer's own generator decides
    resumed = small_net(seed=9)
    resumed.load_state_dict(saved[0])
    ropt = fastfoof.KFAC(resumed, lr=0.3, fisher="mc", inv_period=2, stats_steps=2)
    ropt.load_state_dict(saved[1])
    run(resumed, ropt, 3)
    for a, b in zip(model.parameters(), resumed.parameters()):
        assert torch.equal(a, b)


# ---- 12. arguments ----------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["FOOF", "KFAC"])
@pytest.mark.parametrize("kw, name", [
    (dict(skip="nonexistent"), "skip"), (dict(skip=["0", "typo"]), "skip"), (dict(lr="0.1"), "lr"),
    (dict(lr=-1.0), "lr"), (dict(momentum="0.9"), "momentum"), (dict(inv_period=True), "inv_period"),
    (dict(inv_period=2.0), "inv_period"), (dict(stats_steps=True), "stats_steps"),
    (dict(damping="1"), "damping"), (dict(ema_decay=None), "ema_decay"), (dict(stats_batch=0), "stats_batch"),
    (dict(stats_batch=True), "stats_batch"), (dict(backend="cuda"), "backend"), (dict(graft="adam"), "graft"),
    (dict(graft=True), "graft"),
])
def test_invalid_arguments_are_value_errors_naming_them(kind, kw, name):
    kw = {"lr": 0.1, **kw}
    with pytest.raises(ValueError, match=name):
        getattr(fastfoof, kind)(small_net(), **kw)


@pytest.mark.parametrize("kind", ["FOOF", "KFAC"])
def test_a_missing_lr_is_named_in_the_optimizers_own_words(kind):
    with pytest.raises(TypeError, match=rf"^{kind}\(\): .*'lr'"):
        getattr(fastfoof, kind)(small_net())


def test_a_triton_backend_that_cannot_run_here_fails_at_construction(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(ValueError, match="backend"):
        fastfoof.FOOF(small_net(), lr=0.1, backend="triton")
    monkeypatch.setenv("FASTFOOF_BACKEND", "triton")
    with pytest.raises(ValueError, match="backend"):
        fastfoof.FOOF(small_net(), lr=0.1)


# ---- 13. a diverging run falls back instead of crashing ---------------------------------------------

def bad_matrices(dim, damping):
    """[spd, singular, NaN, ∞, negative definite, −λI] float32 matrices of size dim (the last one
    damps to zero: a zero pivot, which LAPACK's potri refuses)."""
    g = torch.Generator().manual_seed(dim)
    a = torch.randn(dim, dim + 3, generator=g)
    spd = a @ a.mT / dim
    singular = torch.zeros(dim, dim)
    singular[: dim // 2, : dim // 2] = spd[: dim // 2, : dim // 2]
    nan, inf = spd.clone(), spd.clone()
    nan[1, 1] = float("nan")
    inf[0, dim - 1] = inf[dim - 1, 0] = float("inf")
    return torch.stack([spd, singular, nan, inf, -spd, -damping * torch.eye(dim)])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("method", linalg.INVERSE_METHODS)
@pytest.mark.parametrize("dim", [7, 45, 130])
def test_the_inversion_round_never_raises_on_bad_numbers(backend, method, dim):
    mats = bad_matrices(dim, 1e-6)
    kept = torch.eye(dim).expand(len(mats), dim, dim) * 0.25
    inverses, status = ops.damped_inverse_with_status([mats], 1e-6, previous=[linalg.aligned(kept)],
                                                      backend=backend, method=method)
    assert torch.isfinite(inverses[0]).all()
    assert status[0][0] == linalg.OK
    assert (status[0][2:5] == linalg.KEPT_PREVIOUS).all()  # NaN, ∞, negative: float64 fails too
    assert torch.equal(inverses[0][2:5], kept[2:5])
    assert status[0][5] != linalg.OK


def test_kfac_mc_on_non_finite_logits_raises_nothing():
    """backward_fisher on logits gone non-finite (a diverging run, an fp16 overflow): their G is dropped."""
    model = small_net(batch_norm=False)
    opt = fastfoof.KFAC(model, lr=0.1, fisher="mc")
    x, y = batch()
    logits = model(x) * float("inf")
    opt.backward_fisher(logits)
    F.cross_entropy(logits, y).backward()
    with pytest.warns(RuntimeWarning, match="dropped_stats"):
        opt.step()
    assert opt.diagnostics["dropped_stats"] > 0


@pytest.mark.parametrize("damping_mode", ["heuristic", "factor", "exact"])
def test_a_diverging_kfac_run_falls_back_instead_of_crashing(damping_mode):
    from sklearn.datasets import load_digits

    digits = load_digits()
    x = torch.tensor(digits.images[:256], dtype=torch.float32)[:, None] / 16
    y = torch.tensor(digits.target[:256])
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 32, 3, stride=2, padding=1),
                          nn.ReLU(), nn.Flatten(), nn.Linear(32 * 16, 10))
    opt = fastfoof.KFAC(model, lr=3.0, damping=0.1, damping_mode=damping_mode, momentum=0.9, inv_period=10,
                        stats_steps=10)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        for step in range(40):
            train_step(model, opt, x[step % 4 * 64:][:64], y[step % 4 * 64:][:64])
    assert sum(opt.diagnostics.values()) > 0  # it diverged, and the fallbacks caught it


# ---- layers FOOF cannot precondition as it believes ---------------------------------------------------

class SamePaddedConv(nn.Conv2d):
    """timm's Conv2dSame: padding 0, TensorFlow's "SAME" padding computed in forward."""

    def forward(self, x):
        ih, iw = x.shape[-2:]
        kh, kw = self.kernel_size
        sh, sw = self.stride
        pad_h = max((math.ceil(ih / sh) - 1) * sh + (kh - 1) + 1 - ih, 0)
        pad_w = max((math.ceil(iw / sw) - 1) * sw + (kw - 1) + 1 - iw, 0)
        x = F.pad(x, (pad_w // 2, pad_w - pad_w // 2, pad_h // 2, pad_h - pad_h // 2))
        return F.conv2d(x, self.weight, self.bias, self.stride, 0, self.dilation, self.groups)


class StandardisedConv(nn.Conv2d):
    """timm's StdConv2d: the weight is standardised per output channel in forward."""

    def forward(self, x):
        w = self.weight
        w = (w - w.mean((1, 2, 3), keepdim=True)) / (w.std((1, 2, 3), keepdim=True) + 1e-5)
        return F.conv2d(x, w, self.bias, self.stride, self.padding, self.dilation, self.groups)


class CastingLinear(nn.Linear):
    """timm's Linear: overrides forward, computes F.linear all the same."""

    def forward(self, x):
        return F.linear(x, self.weight.to(x.dtype), self.bias)


class Zoo(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.same = SamePaddedConv(2, 4, 3, stride=2)
        self.std = StandardisedConv(4, 4, 3, padding=1)
        self.attn = nn.MultiheadAttention(4, 2, batch_first=True)
        self.head = CastingLinear(4, 5)
        self.unused = nn.Linear(4, 4)  # a branch that never runs

    def forward(self, x):
        h = torch.relu(self.std(torch.relu(self.same(x))))
        t = h.flatten(2).mT
        t = self.attn(t, t, t, need_weights=False)[0]
        return self.head(t.mean(1))


def test_layers_whose_forward_is_not_what_foof_believes_are_handled_or_named(float64):
    model = Zoo()
    with pytest.warns(RuntimeWarning) as record:
        opt = fastfoof.FOOF(model, lr=0.1, inv_period=2, stats_steps=1)
    message = " ".join(str(w.message) for w in record)
    assert re.search(r"StandardisedConv\.forward does not compute a convolution[^;]*: std(;|$)", message)
    assert [layer.name for layer in opt.layers] == ["same", "attn.out_proj", "head", "unused"]
    x, y = torch.randn(3, 2, 7, 6), torch.randint(0, 5, (3,))
    with pytest.warns(RuntimeWarning, match=r"weights of attn.out_proj have gradients but their forward did not run"):
        train_step(model, opt, x, y)  # nn.MultiheadAttention computes out_proj with F.linear on its weight
    assert [layer.name for layer in opt.layers if opt._ready(layer)] == ["same", "head"]
    # Conv2dSame's patches are those of the padded input it convolved
    padded = F.pad(x, (0, 1, 1, 1))  # 7×6 at stride 2, kernel 3: "SAME" pads rows (1, 1) and columns (0, 1)
    state = opt.state[model.same.weight]
    assert rel_error(state["ema"] / state["ema_count"], gram64(padded, model.same, True) / 3) <= 1e-12
    assert all(torch.isfinite(p).all() for p in model.parameters())
    with pytest.warns(RuntimeWarning, match="no training forward of attn.out_proj, unused was observed"):
        train_step(model, opt, x, y)  # t = 2 = T: a whole period without a forward of `unused`


@pytest.mark.parametrize("backend", BACKENDS)
def test_the_public_patch_gram_takes_a_layer_as_the_optimizer_does(backend, float64):
    """fastfoof.ops on a TF-"SAME" conv (tf_efficientnet's depthwise 5×5, stride 2, on a 4×4 map): the patches
    of the padded input; on a conv whose forward is no convolution of its weight: ValueError saying why."""
    torch.manual_seed(0)
    same = SamePaddedConv(3, 3, 5, stride=2, groups=3)
    x = torch.randn(2, 3, 4, 4)
    padded = F.pad(x, (1, 2, 1, 2))  # 4 at stride 2, kernel 5: (⌈4/2⌉ − 1)·2 + 5 − 4 = 3, the odd one after
    x, padded = (t.float() if backend == "triton" else t for t in (x, padded))
    assert rel_error(ops.patch_gram(x, same, backend=backend), gram64(padded, same, True)) <= 1e-5
    with pytest.raises(ValueError, match=r"StandardisedConv.forward does not compute a convolution"):
        ops.patch_gram(x, StandardisedConv(3, 4, 3), backend=backend)


# ---- KFAC's G when the layer's output is changed in place ---------------------------------------------

class InplaceAfterLayers(nn.Module):
    """A conv (plain output) and a Linear on [B, N, F] (its output a view), each followed by an
    activation that may work in place on the layer's output."""

    def __init__(self, inplace):
        super().__init__()
        torch.manual_seed(0)
        self.conv, self.token, self.head = nn.Conv2d(2, 4, 3), nn.Linear(4, 6), nn.Linear(6, 5)
        self.act = nn.ReLU(inplace=inplace)
        self.inplace = inplace

    def forward(self, x):
        h = self.act(self.conv(x)).flatten(2).mT.contiguous()  # [B, 9, 4]: the Linear returns a view
        t = self.token(h)
        t = t.mul_(2.0) if self.inplace else t * 2.0
        return self.head(t.mean(1))


@pytest.mark.parametrize("fisher", ["empirical", "mc"])
def test_kfac_takes_g_of_the_layer_output_before_an_in_place_change(fisher, float64):
    x, y = batch(n=4)
    results = []
    for inplace in (False, True):
        model = InplaceAfterLayers(inplace)
        opt = fastfoof.KFAC(model, lr=0.3, fisher=fisher, inv_period=2, stats_steps=2)
        for _ in range(3):
            opt.zero_grad()
            logits = model(x)
            if fisher == "mc":
                opt.backward_fisher(logits)
            F.cross_entropy(logits, y).backward()
            opt.step()
        assert all(opt._ready(layer) for layer in opt.layers)
        results.append([p.detach().clone() for p in model.parameters()])
    for a, b in zip(*results):
        assert rel_error(b, a) <= 1e-12


# ---- weights that are not the layer's own parameter, and weights shared between layers ------------------

def parametrized_net():
    """Convolutions with weight_norm and spectral_norm, by the parametrizations and by the older hook APIs,
    and a plain Linear head."""
    from torch.nn.utils import parametrizations

    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # nn.utils.weight_norm is deprecated
        return nn.Sequential(parametrizations.weight_norm(nn.Conv1d(2, 4, 3)), nn.ReLU(),
                             parametrizations.spectral_norm(nn.Conv1d(4, 4, 3)), nn.ReLU(),
                             nn.utils.weight_norm(nn.Conv1d(4, 4, 3)), nn.ReLU(),
                             nn.utils.spectral_norm(nn.Conv1d(4, 3, 3)), nn.Flatten(), nn.Linear(3 * 2, 2))


@pytest.mark.parametrize("kind", ["FOOF", "KFAC"])
def test_parametrized_weights_are_named_and_the_model_untouched(kind):
    """A weight computed from other parameters is not preconditioned: one warning names its layers, building
    the optimizer changes no buffer (spectral_norm's power iteration runs on every read of `weight`), and
    training steps them as SGD would."""
    model = parametrized_net()
    before = copy.deepcopy(model.state_dict())
    with pytest.warns(RuntimeWarning, match=r"computed from other parameters.*: 0, 2, 4, 6$") as record:
        opt = getattr(fastfoof, kind)(model, lr=0.1, momentum=0.9)
    assert len([w for w in record if "does not precondition" in str(w.message)]) == 1
    assert [layer.name for layer in opt.layers] == ["8"]
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]), key
    x, y = torch.randn(5, 2, 10), torch.randint(0, 2, (5,))
    twin = parametrized_net()
    twin.load_state_dict(before)
    train_step(model, opt, x, y)
    train_step(twin, torch.optim.SGD(twin.parameters(), lr=0.1, momentum=0.9), x, y)
    for (name, p), q in zip(model.named_parameters(), twin.parameters()):
        if not name.startswith("8."):  # grafting: U = G for the parameters without a preconditioner
            assert rel_error(p, q) <= 1e-6, name
    for _ in range(3):
        train_step(model, opt, x, y)
    assert all(torch.isfinite(p).all() for p in model.parameters())


class SharedWeights(nn.Module):
    """Two Linear layers multiplying by one weight Parameter (`b.weight = a.weight`), with their own biases
    or one shared bias, and a grouped conv pair whose weights alike split into different groups."""

    def __init__(self, shared_bias: bool):
        super().__init__()
        torch.manual_seed(0)
        self.a, self.b = nn.Linear(5, 5), nn.Linear(5, 5)
        self.b.weight = self.a.weight
        if shared_bias:
            self.b.bias = self.a.bias
        self.head = nn.Linear(5, 3)

    def forward(self, x):
        return self.head(torch.tanh(self.b(torch.tanh(self.a(x)))))


@pytest.mark.parametrize("shared_bias", [False, True])
def test_a_weight_shared_by_two_layers_takes_the_inputs_of_both(shared_bias, float64):
    """DESIGN §1.2: every forward that multiplies a weight feeds its statistic, a module's or another's; the
    bias is its row where both layers add the same bias, else it steps without a preconditioner."""
    model = SharedWeights(shared_bias)
    opt = fastfoof.FOOF(model, lr=0.1, ema_decay=0.0, graft=None)
    assert [(layer.name, len(layer.modules)) for layer in opt.layers] == [("a", 2), ("head", 1)]
    inputs = {}
    for name in ("a", "b"):
        getattr(model, name).register_forward_pre_hook(lambda m, i, name=name: inputs.update({name: i[0].detach()}))
    x, y = torch.randn(4, 5), torch.randint(0, 3, (4,))
    F.cross_entropy(model(x), y).backward()
    grads = [model.a.weight.grad.clone()] + ([model.a.bias.grad[:, None].clone()] if shared_bias else [])
    before = model.a.weight.detach().clone()
    opt.step()
    stat = (gram64(inputs["a"], model.a, shared_bias) + gram64(inputs["b"], model.b, shared_bias)) / 8  # 2 calls of 4
    state = opt.state[model.a.weight]
    assert rel_error(state["ema"] / state["ema_count"], stat) <= 1e-12
    p = torch.linalg.inv(stat[0] + torch.eye(stat.shape[-1]))
    assert rel_error(model.a.weight - before, -0.1 * (torch.cat(grads, 1) @ p)[:, :5]) <= 1e-12


def test_layers_sharing_a_weight_in_different_groups_are_named():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(4, 4, 3, padding=1), nn.Conv2d(16, 4, 3, padding=1, groups=4))
    model[1].weight = model[0].weight  # [4, 4, 3, 3] both: groups 1 and 4
    with pytest.warns(RuntimeWarning, match=r"different groups: 0, 1"):
        opt = fastfoof.FOOF(nn.ModuleList(model), lr=0.1)
    assert opt.layers == []
