"""The training code people write around an optimizer, beyond what the capability files cover (arguments,
schedule, state, AMP, hooks): the public ops on inputs that require grad, KFAC inside checkpoints, under
accumulation and several backwards, diverging runs, layers FOOF cannot precondition as it believes, and
weights that are not a layer's own or are shared. Each behaves as with torch.optim.SGD: no crash, no leak,
no silently wrong number."""
import copy
import math
import re
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

import fastfoof
from fastfoof import linalg, ops
from helpers import gram64, position_mean_gram64, rel_error
from nets import small_batch, small_net, train_step

BACKENDS = ["reference", "triton"]  # triton: the kernels under TRITON_INTERPRET=1 on CPU (conftest)


# ---- the public ops on inputs that require grad ------------------------------------------------

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


# ---- KFAC(fisher="mc") inside reentrant checkpoints ---------------------------------------------

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
    x, y = small_batch(n=5)
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


# ---- KFAC under gradient accumulation and several backwards ----------------------------------------

@pytest.mark.parametrize("fisher", ["empirical", "mc"])
def test_kfac_gradient_accumulation_equals_the_concatenated_batch(fisher, float64):
    x, y = small_batch(n=9)
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
    x, y = small_batch()
    logits = model(x)
    with pytest.warns(RuntimeWarning, match="several backwards through one forward"):
        F.cross_entropy(logits, y).backward(retain_graph=True)
        logits.square().mean().backward()
    opt.step()


# ---- a diverging run falls back instead of crashing ---------------------------------------------

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
    x, y = small_batch()
    logits = model(x) * float("inf")
    opt.backward_fisher(logits)
    F.cross_entropy(logits, y).backward()
    with pytest.warns(RuntimeWarning, match="dropped_stats"):
        opt.step()
    assert opt.diagnostics["dropped_stats"] > 0


@pytest.mark.parametrize("damping_mode,fisher", [("heuristic", "empirical"), ("factor", "empirical"),
                                                  ("exact", "empirical"), ("heuristic", "mc")])
def test_a_diverging_kfac_run_falls_back_instead_of_crashing(damping_mode, fisher):
    from sklearn.datasets import load_digits

    digits = load_digits()
    x = torch.tensor(digits.images[:256], dtype=torch.float32)[:, None] / 16
    y = torch.tensor(digits.target[:256])
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 32, 3, stride=2, padding=1),
                          nn.ReLU(), nn.Flatten(), nn.Linear(32 * 16, 10))
    opt = fastfoof.KFAC(model, lr=3.0, damping=0.1, damping_mode=damping_mode, fisher=fisher, momentum=0.9,
                        inv_period=10, stats_steps=10)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        for step in range(40):
            opt.zero_grad()
            logits = model(x[step % 4 * 64:][:64])
            if fisher == "mc":  # labels drawn from NaN logits too, once it diverged
                opt.backward_fisher(logits)
            F.cross_entropy(logits, y[step % 4 * 64:][:64]).backward()
            opt.step()
    assert sum(opt.diagnostics.values()) > 0  # it diverged, and the fallbacks caught it
    assert not all(p.isfinite().all() for p in model.parameters())


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
    assert rel_error(state["ema"] / state["ema_count"], position_mean_gram64(padded, model.same, True) / 3) <= 1e-12
    assert all(torch.isfinite(p).all() for p in model.parameters())
    with pytest.warns(RuntimeWarning, match="no training forward of attn.out_proj, unused was observed"):
        train_step(model, opt, x, y)  # t = 2 = T: a whole period without a forward of `unused`


def test_kfac_counts_the_positions_of_a_same_padded_conv_as_it_convolves(float64):
    """KFAC's A = C/R with R the output positions of the padded input: on a 4×4 map a 5×5 stride-2 conv
    has no position without its "SAME" padding (timm's tf_mobilenetv3 raised ZeroDivisionError), 2×2 with it."""
    torch.manual_seed(0)
    same = SamePaddedConv(3, 4, 5, stride=2)
    model = nn.Sequential(same, nn.Flatten(), nn.Linear(16, 5))
    opt = fastfoof.KFAC(model, lr=0.1, inv_period=2, stats_steps=1)
    x, y = torch.randn(3, 3, 4, 4), torch.randint(0, 5, (3,))
    train_step(model, opt, x, y)
    padded = F.pad(x, (1, 2, 1, 2))
    state = opt.state[same.weight]
    assert rel_error(state["ema"] / state["ema_count"], position_mean_gram64(padded, same, True) / 3) <= 1e-12
    assert all(torch.isfinite(p).all() for p in model.parameters())


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
    x, y = small_batch(n=4)
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
    opt = fastfoof.FOOF(model, lr=0.1, damping=1.0, ema_decay=0.0, graft=None)
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
