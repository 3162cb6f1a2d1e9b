"""fastfoof.FOOF against hand-computed numbers and a minimal float64 implementation of DESIGN §1: the update
of every kind of parameter, param groups, LR schedules, gradient accumulation, and the fallbacks."""
import copy

import pytest
import torch
from torch import nn

import fastfoof
from helpers import gram64, position_mean_gram64
from nets import assert_same_params, grouped_net, grouped_net_batches, loss_fn, run_foof

pytestmark = pytest.mark.usefixtures("float64")


class MiniFOOF:
    """DESIGN §1 written out in float64, one layer at a time, with no code from fastfoof."""

    def __init__(self, model, lr, damping, momentum=0.0, dampening=0.0, nesterov=False, weight_decay=0.0,
                 ema_decay=0.95, inv_period=100, stats_steps=10, graft="sgd"):
        self.model, self.lr, self.damping, self.graft = model, lr, damping, graft
        self.momentum, self.dampening, self.nesterov, self.wd = momentum, dampening, nesterov, weight_decay
        self.m, self.T, self.S = ema_decay, inv_period, stats_steps
        self.layers = [m for m in model.modules() if isinstance(m, (nn.Linear, nn.Conv2d))]
        self.inputs = {m: [] for m in self.layers}
        for m in self.layers:
            m.register_forward_hook(lambda mod, inp, out: self.inputs[mod].append(inp[0].detach()))
        self.ema = {m: 0.0 for m in self.layers}
        self.n = {m: 0.0 for m in self.layers}
        self.P = None
        self.buf = {}
        self.t = 0

    def observing(self):
        r = (self.t + 1) % self.T
        return self.P is None or r == 0 or r > self.T - self.S

    def step(self, observed):
        self.t += 1
        if observed:
            for m in self.layers:
                xs = self.inputs[m]
                gram = position_mean_gram64 if self.graft else gram64  # grafted: a mean over positions (§1.2)
                stat = sum(gram(x, m, m.bias is not None) for x in xs) / sum(x.shape[0] for x in xs)
                self.ema[m] = self.m * self.ema[m] + (1 - self.m) * stat
                self.n[m] = self.m * self.n[m] + (1 - self.m)
        for m in self.layers:
            self.inputs[m].clear()
        fresh = self.P is None
        if fresh:
            self.invert()
        updates = {}
        for m in self.layers:
            g = m.weight.grad.reshape(m.weight.shape[0], -1)
            if m.bias is not None:
                g = torch.cat([g, m.bias.grad[:, None]], 1)
            groups = getattr(m, "groups", 1)
            rows = g.shape[0] // groups
            u = torch.cat([g[i * rows:(i + 1) * rows] @ self.P[m][i] for i in range(groups)])
            if self.graft:  # the layer's U with its gradient's Frobenius norm, scaled by at most κλ, κ = 1.5
                u = u * min(torch.linalg.norm(g) / torch.linalg.norm(u), 1.5 * self.damping)
            updates[m.weight] = u[:, :m.weight[0].numel()].reshape(m.weight.shape)
            if m.bias is not None:
                updates[m.bias] = u[:, -1]
        with torch.no_grad():
            for p in self.model.parameters():
                u = updates.get(p, p.grad if self.graft else p.grad / self.damping)
                if self.momentum:
                    b = self.buf.get(p)
                    b = u.clone() if b is None else self.momentum * b + (1 - self.dampening) * u
                    self.buf[p] = b
                    u = u + self.momentum * b if self.nesterov else b
                p.copy_(p * (1 - self.lr * self.wd) - self.lr * u)
        if self.t % self.T == 0 and not fresh:
            self.invert()

    def invert(self):
        self.P = {}
        for m in self.layers:
            ema = self.ema[m] / self.n[m]
            self.P[m] = torch.linalg.inv(ema + self.damping * torch.eye(ema.shape[-1]))


def run_mini(model, batches, **kw):
    mini = MiniFOOF(model, **kw)
    for x, y in batches:
        model.zero_grad()
        observed = mini.observing()
        loss_fn(model, x, y).backward()
        mini.step(observed)
    return mini


@pytest.mark.smoke
def test_hand_computed_two_steps():
    # a = [1, 2, 1] (input plus bias row), C = aaᵀ, P = (C + I)⁻¹ = I − aaᵀ/7, so U = Ĝ·P = Ĝ/7.
    layer = nn.Linear(2, 1)
    with torch.no_grad():
        layer.weight.copy_(torch.tensor([[1.0, -1.0]]))
        layer.bias.fill_(0.5)
    opt = fastfoof.FOOF(layer, lr=0.7, damping=1.0, ema_decay=0.0, graft=None)
    x = torch.tensor([[1.0, 2.0]])
    expected = [([1.05, -0.9], 0.55), ([1.07, -0.86], 0.57)]  # out = −0.5, then −0.2; Δ = −0.7·out/7·a
    for weight, bias in expected:
        opt.zero_grad()
        (0.5 * layer(x).pow(2).sum()).backward()
        opt.step()
        assert torch.allclose(layer.weight, torch.tensor([weight]), atol=1e-12, rtol=0)
        assert layer.bias.item() == pytest.approx(bias, abs=1e-12)


@pytest.mark.smoke
@pytest.mark.parametrize("kw", [
    dict(lr=0.3, damping=0.5, inv_period=3, stats_steps=2),
    dict(lr=0.2, damping=2.0, momentum=0.9, dampening=0.1, weight_decay=0.05, inv_period=2, stats_steps=1,
         ema_decay=0.8),
    dict(lr=0.1, damping=1.0, momentum=0.8, nesterov=True, inv_period=4, stats_steps=4, ema_decay=0.5),
    dict(lr=0.1, damping=0.3, momentum=0.5, inv_period=1, stats_steps=1),
], ids=["plain", "momentum-wd", "nesterov-S=T", "T=1"])
@pytest.mark.parametrize("graft", [None, "sgd"])
def test_matches_minimal_float64_implementation(kw, graft):
    batches = grouped_net_batches(9)
    model, twin = grouped_net(), grouped_net()
    opt = run_foof(model, batches, graft=graft, **kw)
    mini = run_mini(twin, batches, graft=graft, **kw)
    assert opt.schedule.steps == 9
    assert_same_params(model, twin, 1e-10)
    assert opt.diagnostics == {"dropped_stats": 0, "cholesky_retries": 0, "cholesky_failures": 0}


def test_gradient_accumulation_equals_big_batch():
    # Statistics of unequal micro-batches combine as the concatenated batch's (DESIGN §1.2). No
    # BatchNorm here: its batch statistics would differ per micro-batch.
    torch.manual_seed(3)
    model = nn.Sequential(nn.Conv2d(3, 4, 3, stride=2), nn.Tanh(), nn.Flatten(), nn.Linear(4 * 3 * 4, 5))
    twin = copy.deepcopy(model)
    kw = dict(lr=0.2, damping=0.5, momentum=0.9, inv_period=2, stats_steps=2)
    batches = grouped_net_batches(4, batch=6)
    run_foof(model, batches, **kw)
    opt = fastfoof.FOOF(twin, backend="reference", **kw)
    for x, y in batches:
        opt.zero_grad()
        for part in (slice(0, 2), slice(2, 6)):  # losses weighted by micro-batch size
            (loss_fn(twin, x[part], y[part]) * (part.stop - part.start) / 6).backward()
        opt.step()
    assert_same_params(twin, model, 1e-12)


def test_lr_scheduler_drives_the_step():
    batches = grouped_net_batches(5)
    kw = dict(damping=0.5, momentum=0.9, inv_period=2, stats_steps=1)
    lrs = [0.3 * 0.5 ** t for t in range(5)]
    model, twin = grouped_net(), grouped_net()
    opt = fastfoof.FOOF(model, lr=0.3, backend="reference", **kw)
    sched = torch.optim.lr_scheduler.ExponentialLR(opt, gamma=0.5)
    mini = MiniFOOF(twin, lr=0.3, **kw)
    for (x, y), lr in zip(batches, lrs):
        opt.zero_grad()
        loss_fn(model, x, y).backward()
        opt.step()
        sched.step()
        twin.zero_grad()
        observed = mini.observing()
        loss_fn(twin, x, y).backward()
        mini.lr = lr
        mini.step(observed)
    assert_same_params(model, twin, 1e-10)


@pytest.mark.parametrize("graft, damping", [(None, 2.0), ("sgd", 1.0)])  # U = G/λ, or U = G when grafting
def test_param_groups_and_unhooked_params(graft, damping):
    model = grouped_net()
    extra = nn.Parameter(torch.randn(3))
    convs = [model[0].weight, model[3].weight]
    groups = [
        {"params": convs + [model[6].weight], "lr": 0.1, "weight_decay": 0.1},
        {"params": [model[0].bias, model[6].bias], "lr": 0.0},
        {"params": list(model[1].parameters()) + [extra], "lr": 0.05, "momentum": 0.9},
    ]
    opt = fastfoof.FOOF(model, groups, lr=1.0, damping=2.0, graft=graft, backend="reference")
    before = {p: p.detach().clone() for g in groups for p in g["params"]}
    x, y = grouped_net_batches(1)[0]
    (loss_fn(model, x, y) + extra.sum()).backward()
    opt.step()
    assert torch.equal(model[0].bias, before[model[0].bias])  # lr 0: untouched, though preconditioned jointly
    assert not torch.equal(model[0].weight, before[model[0].weight])
    # BatchNorm and the extra parameter have no preconditioner: SGD with momentum (first step V = U)
    assert torch.allclose(extra, before[extra] - 0.05 * torch.ones(3) / damping, atol=1e-15, rtol=0)
    assert "momentum_buffer" in opt.state[extra]
    assert {id(layer.module) for layer in opt._active} == {id(model[0]), id(model[3]), id(model[6])}


def test_layer_only_preconditioned_when_its_weight_is_handed():
    model = grouped_net()
    opt = fastfoof.FOOF(model, [model[0].weight], lr=0.1, backend="reference")
    x, y = grouped_net_batches(1)[0]
    loss_fn(model, x, y).backward()
    before = model[6].weight.detach().clone()
    opt.step()
    assert [layer.module for layer in opt._active] == [model[0]]
    assert torch.equal(model[6].weight, before)
    assert opt.layers[0].bias_row is False  # its bias was not handed


def test_non_finite_statistics_are_dropped_and_counted():
    model = grouped_net()
    opt = fastfoof.FOOF(model, lr=0.1, inv_period=1, stats_steps=1, backend="reference")
    x, y = grouped_net_batches(1)[0]
    loss_fn(model, x, y).backward()
    opt.step()
    ema = {layer: opt.state[layer.weight]["ema"].clone() for layer in opt.layers}
    opt.zero_grad()
    bad = x.clone()
    bad[0, 0, 0, 0] = float("inf")
    model(bad)  # observed, non-finite: must not reach the EMA
    loss_fn(model, x, y).backward()
    with pytest.warns(RuntimeWarning, match="dropped_stats"):
        opt.step()
    assert opt.diagnostics["dropped_stats"] == 3
    for layer in opt.layers:
        assert torch.equal(opt.state[layer.weight]["ema"], ema[layer])
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_failed_factorisation_keeps_previous_preconditioner():
    model = grouped_net()
    opt = fastfoof.FOOF(model, lr=0.1, inv_period=2, stats_steps=1, damping=0.1, backend="reference")
    x, y = grouped_net_batches(1)[0]
    loss_fn(model, x, y).backward()
    opt.step()
    layer = opt.layers[0]
    previous = opt.state[layer.weight]["precond"].clone()
    opt.state[layer.weight]["ema"].copy_(-5 * torch.eye(28))  # not positive definite even after damping
    opt.zero_grad()
    loss_fn(model, x, y).backward()
    with pytest.warns(RuntimeWarning):
        opt.step()  # t = 2: inversion
    assert opt.diagnostics["cholesky_failures"] == 1
    assert opt.diagnostics["cholesky_retries"] == 1
    assert torch.equal(opt.state[layer.weight]["precond"], previous)
    assert all(torch.isfinite(p).all() for p in model.parameters())


@pytest.mark.parametrize("graft, damping", [(None, 4.0), ("sgd", 1.0)])  # U = G/λ, or U = G when grafting
def test_unsupported_layers_are_updated_without_preconditioner(graft, damping):
    torch.manual_seed(0)
    model = nn.ModuleDict({"emb": nn.Embedding(5, 3), "bil": nn.Bilinear(3, 3, 2), "lin": nn.Linear(3, 2)})
    opt = fastfoof.FOOF(model, lr=0.5, damping=4.0, graft=graft, backend="reference")
    assert [layer.module for layer in opt.layers] == [model["lin"]]
    e = model["emb"](torch.tensor([1, 2]))
    (model["bil"](e, e).sum() + model["lin"](e).sum()).backward()
    before = model["bil"].weight.detach().clone()
    grad = model["bil"].weight.grad.clone()
    opt.step()
    assert torch.allclose(model["bil"].weight, before - 0.5 * grad / damping, rtol=0, atol=1e-15)


def test_closure_is_evaluated_with_grad():
    model = grouped_net()
    opt = fastfoof.FOOF(model, lr=0.1, backend="reference")
    x, y = grouped_net_batches(1)[0]

    def closure():
        opt.zero_grad()
        loss = loss_fn(model, x, y)
        loss.backward()
        return loss

    loss = opt.step(closure)
    assert loss.requires_grad and opt.schedule.steps == 1 and "precond" in opt.state[model[0].weight]
