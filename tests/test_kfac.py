"""fastfoof.KFAC against curvlinops' KFAC (DESIGN §6), and KFAC's own arguments and corners.

curvlinops treats a grouped convolution as one weight matrix whose groups share an input factor;
fastfoof's KFAC is block-diagonal over the groups (each group its own A and G, as FOOF's Σ). The
oracle for a grouped convolution is therefore curvlinops on the same network with that layer split
into one convolution per group: the same function, the same gradients, per-group factors.
"""
import copy

import pytest
import torch
import torch.nn.functional as F
from curvlinops import KFACInverseLinearOperator, KFACLinearOperator
from torch import nn

import fastfoof
from helpers import rel_error


class SplitConv(nn.Module):
    """A grouped Conv2d written as one Conv2d per group on its slice of the channels."""

    def __init__(self, conv: nn.Conv2d):
        super().__init__()
        g = conv.groups
        self.groups = g
        self.convs = nn.ModuleList()
        rows = conv.out_channels // g
        for i in range(g):
            part = nn.Conv2d(conv.in_channels // g, rows, conv.kernel_size, conv.stride, conv.padding, conv.dilation,
                             bias=conv.bias is not None, dtype=conv.weight.dtype)
            with torch.no_grad():
                part.weight.copy_(conv.weight[i * rows:(i + 1) * rows])
                if conv.bias is not None:
                    part.bias.copy_(conv.bias[i * rows:(i + 1) * rows])
            self.convs.append(part)

    def forward(self, x):
        return torch.cat([conv(part) for conv, part in zip(self.convs, x.chunk(self.groups, 1))], 1)


def make_net():
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 6, 3, stride=2, padding=1), nn.Tanh(),
        nn.Conv2d(6, 4, (3, 2), padding=(1, 0), groups=2), nn.Tanh(), nn.Flatten(),
        nn.Linear(4 * 4 * 2, 7), nn.Tanh(), nn.Linear(7, 5, bias=False),
    ).double()


def split_twin(model):
    twin = copy.deepcopy(model)
    twin[2] = SplitConv(model[2])
    return twin


def batch(seed=1, n=6):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, 8, 5, generator=g, dtype=torch.float64), torch.randint(0, 5, (n,), generator=g)


def kfac_step(model, x, y, damping, damping_mode, fisher="empirical"):
    """One KFAC step of DESIGN §6's oracle setting: U = W_before − W_after for every parameter."""
    opt = fastfoof.KFAC(model, lr=1.0, damping=damping, damping_mode=damping_mode, fisher=fisher, ema_decay=0.0,
                        inv_period=1, stats_steps=1, graft=None, backend="reference")
    before = [p.detach().clone() for p in model.parameters()]
    logits = model(x)
    targets = opt.backward_fisher(logits) if fisher == "mc" else None
    F.cross_entropy(logits, y).backward()
    opt.step()
    return [b - p.detach() for b, p in zip(before, model.parameters())], targets, opt


def curvlinops_step(twin, x, y, damping, damping_mode, targets=None):
    """curvlinops' damped inverse KFAC (empirical Fisher; `targets` as the labels it is computed
    with) applied to the gradient of the loss on y, per parameter of `twin`."""
    params = list(twin.parameters())
    labels = y if targets is None else targets
    kfac = KFACLinearOperator(twin, nn.CrossEntropyLoss(), params, [(x, labels)], fisher_type="empirical",
                              kfac_approx="expand", separate_weight_and_bias=False, check_deterministic=False)
    inverse = KFACInverseLinearOperator(kfac, damping=damping, use_heuristic_damping=damping_mode == "heuristic",
                                        use_exact_damping=damping_mode == "exact")
    grads = torch.autograd.grad(F.cross_entropy(twin(x), y), params)
    return inverse @ list(grads)


def grouped(updates, model):
    """The split twin's per-group updates back in the grouped model's parameter order."""
    conv = model[2]
    out = []
    params = list(model.named_parameters())
    twin_names = [n for n, _ in split_twin(model).named_parameters()]
    by_name = dict(zip(twin_names, updates))
    for name, _ in params:
        if name.startswith("2."):
            kind = name.split(".")[1]
            out.append(torch.cat([by_name[f"2.convs.{i}.{kind}"] for i in range(conv.groups)]))
        else:
            out.append(by_name[name])
    return out


@pytest.mark.smoke
@pytest.mark.parametrize("damping_mode", ["heuristic", "exact", "factor"])
@pytest.mark.parametrize("damping", [0.3, 1e-3])
def test_empirical_step_equals_curvlinops(damping_mode, damping):
    model = make_net()
    twin = split_twin(model)
    x, y = batch()
    ours, _, opt = kfac_step(model, x, y, damping, damping_mode)
    expected = grouped(curvlinops_step(twin, x, y, damping, damping_mode), model)
    for (name, _), u, e in zip(model.named_parameters(), ours, expected):
        assert rel_error(u, e) <= 1e-8, (name, rel_error(u, e))
    assert opt.diagnostics == {"dropped_stats": 0, "cholesky_retries": 0, "cholesky_failures": 0}


@pytest.mark.parametrize("damping_mode", ["heuristic", "exact"])
def test_monte_carlo_fisher_equals_curvlinops_with_the_sampled_labels(damping_mode):
    model = make_net()
    twin = split_twin(model)
    x, y = batch()
    torch.manual_seed(5)
    ours, targets, _ = kfac_step(model, x, y, 0.1, damping_mode, fisher="mc")
    assert targets.shape == y.shape and not torch.equal(targets, y)  # labels drawn from the model
    expected = grouped(curvlinops_step(twin, x, y, 0.1, damping_mode, targets=targets), model)
    for u, e in zip(ours, expected):
        assert rel_error(u, e) <= 1e-8


def test_monte_carlo_mse_factor_is_the_gauss_newton_scale():
    # mse: targets ~ N(f, C/2·I), so the sampled G has the expectation of F.mse_loss's Gauss–Newton
    # matrix; curvlinops' MSELoss("mean") scales its loss by sqrt(C), i.e. G by C.
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3)).double()
    x = torch.randn(9, 4, dtype=torch.float64)
    twin = copy.deepcopy(model)
    opt = fastfoof.KFAC(model, lr=0.1, fisher="mc", ema_decay=0.0, inv_period=1, stats_steps=1)
    out = model(x)
    targets = opt.backward_fisher(out, loss="mse")
    assert all(p.grad is None for p in model.parameters())  # .grad untouched
    F.mse_loss(out, torch.zeros_like(out)).backward()  # the graph was retained
    opt.step()
    kfac = KFACLinearOperator(twin, nn.MSELoss(), list(twin.parameters()), [(x, targets)],
                              fisher_type="empirical", separate_weight_and_bias=False, check_deterministic=False)
    kfac.compute_kronecker_factors()
    for layer, name in zip(opt.layers, ("0", "2")):
        g = opt.state[layer.weight]["grad_ema"][0]
        assert rel_error(g, kfac._gradient_covariances[name] / 3) <= 1e-10
        assert rel_error(opt.state[layer.weight]["ema"][0], kfac._input_covariances[name]) <= 1e-10


@pytest.mark.parametrize("graft", ["sgd", None])
def test_grafted_foof_statistic_is_kfacs_a(graft):
    """Grafted FOOF averages each forward's patch gram over its positions, as KFAC's A does (DESIGN §1.2, §6);
    under eq. 6 FOOF keeps the sum, R times A (R = 12 positions of the conv, 1 of the Linear)."""
    torch.manual_seed(3)
    model = nn.Sequential(nn.Conv2d(2, 3, 3, stride=2), nn.Tanh(), nn.Flatten(), nn.Linear(3 * 3 * 4, 4))
    x, y = torch.randn(5, 2, 7, 9, dtype=torch.float64), torch.randint(0, 4, (5,))
    model = model.double()
    foof = fastfoof.FOOF(model, lr=0.1, graft=graft, backend="reference")
    kfac = fastfoof.KFAC(model, lr=0.1, backend="reference")
    F.cross_entropy(model(x), y).backward()
    for layer_f, layer_k, positions in zip(foof.layers, kfac.layers, (12, 1)):
        stat_f, stat_k = foof.statistics.of(layer_f), kfac.statistics.of(layer_k)
        scale = 1 if graft else positions
        assert rel_error(stat_f.pending / stat_f.samples, scale * stat_k.pending / stat_k.samples) <= 1e-13


def test_kfac_trains_like_its_schedule_says():
    # Several periods with momentum and weight decay: finite, every layer preconditioned, no fallbacks.
    model = make_net().float()
    opt = fastfoof.KFAC(model, lr=0.1, damping=0.5, momentum=0.9, weight_decay=1e-3, inv_period=3, stats_steps=2)
    losses = []
    for step in range(9):
        x, y = batch(step)
        opt.zero_grad()
        loss = F.cross_entropy(model(x.float()), y)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert all(opt._ready(layer) for layer in opt.layers)
    assert opt.diagnostics == {"dropped_stats": 0, "cholesky_retries": 0, "cholesky_failures": 0}
    state = copy.deepcopy(opt.state_dict())
    twin = fastfoof.KFAC(model, lr=0.1, damping=0.5, momentum=0.9, weight_decay=1e-3, inv_period=3, stats_steps=2)
    twin.load_state_dict(state)
    with pytest.raises(ValueError, match="KFAC"):
        fastfoof.FOOF(model, lr=0.1).load_state_dict(state)


def test_non_finite_output_gradient_statistic_is_dropped():
    model = make_net()
    opt = fastfoof.KFAC(model, lr=0.1, inv_period=1, stats_steps=1, backend="reference")
    x, y = batch()
    F.cross_entropy(model(x), y).backward()
    opt.step()
    head = model[7]
    g_before = opt.state[head.weight]["grad_ema"].clone()
    opt.zero_grad()
    (F.cross_entropy(model(x), y) * float("inf")).backward()  # the output gradients blow up, not the inputs
    with pytest.warns(RuntimeWarning, match="dropped_stats"):
        opt.step()
    assert opt.diagnostics["dropped_stats"] >= 1
    assert torch.equal(opt.state[head.weight]["grad_ema"], g_before)


def test_backward_fisher_returns_at_once_when_nothing_is_observed():
    model = make_net()
    opt = fastfoof.KFAC(model, lr=0.1, fisher="mc", inv_period=4, stats_steps=1)
    for _ in range(2):  # step 1 observes (no preconditioner yet); step 2 does not (t mod 4 = 2)
        x, y = batch()
        opt.zero_grad()
        logits = model(x)
        sampled = opt.backward_fisher(logits)
        F.cross_entropy(logits, y).backward()
        opt.step()
    assert sampled is None


def test_triton_backend_tracks_reference():
    # every KFAC mode through the Triton dispatch (interpreter on CPU) against the reference backend
    for damping_mode in ("heuristic", "exact"):
        model = make_net().float()
        twin = copy.deepcopy(model)
        kw = dict(lr=0.1, damping=0.5, momentum=0.9, damping_mode=damping_mode, inv_period=2, stats_steps=1)
        opt, ref = fastfoof.KFAC(model, backend="triton", **kw), fastfoof.KFAC(twin, backend="reference", **kw)
        for step in range(3):
            x, y = batch(step)
            for m, o in ((model, opt), (twin, ref)):
                o.zero_grad()
                F.cross_entropy(m(x.float()), y).backward()
                o.step()
        for p, q in zip(model.parameters(), twin.parameters()):
            assert rel_error(p, q) < 1e-5
