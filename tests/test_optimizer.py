"""fastfoof.FOOF against hand-computed numbers and a minimal float64 implementation of DESIGN §1."""
import copy
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

import fastfoof
from helpers import gram64



pytestmark = pytest.mark.usefixtures("float64")


def make_model(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(3, 6, 3, padding=1), nn.BatchNorm2d(6), nn.Tanh(),
        nn.Conv2d(6, 6, (3, 2), stride=2, groups=3, bias=False), nn.Tanh(), nn.Flatten(),
        nn.Linear(6 * 3 * 4, 5),
    )


def make_batches(n, batch=4, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(batch, 3, 7, 9, generator=g), torch.randint(0, 5, (batch,), generator=g)) for _ in range(n)]


def loss_fn(model, x, y):
    return F.cross_entropy(model(x), y)


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
                stat = sum(gram64(x, m, m.bias is not None) for x in xs) / sum(x.shape[0] for x in xs)
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
            if self.graft:  # the layer's U with its gradient's Frobenius norm, scaled by at most 10λ
                u = u * min(torch.linalg.norm(g) / torch.linalg.norm(u), 10 * self.damping)
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


def run_foof(model, batches, **kw):
    opt = fastfoof.FOOF(model, backend="reference", **kw)
    for x, y in batches:
        opt.zero_grad()
        loss_fn(model, x, y).backward()
        opt.step()
    return opt


def run_mini(model, batches, **kw):
    mini = MiniFOOF(model, **kw)
    for x, y in batches:
        model.zero_grad()
        observed = mini.observing()
        loss_fn(model, x, y).backward()
        mini.step(observed)
    return mini


def assert_same_params(a, b, tol):
    for (name, p), q in zip(a.named_parameters(), b.parameters()):
        err = ((p - q).norm() / q.norm()).item()
        assert err <= tol, (name, err)


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


@pytest.mark.parametrize("kw", [
    dict(lr=0.3, damping=0.5, inv_period=3, stats_steps=2),
    dict(lr=0.2, damping=2.0, momentum=0.9, dampening=0.1, weight_decay=0.05, inv_period=2, stats_steps=1,
         ema_decay=0.8),
    dict(lr=0.1, damping=1.0, momentum=0.8, nesterov=True, inv_period=4, stats_steps=4, ema_decay=0.5),
    dict(lr=0.1, damping=0.3, momentum=0.5, inv_period=1, stats_steps=1),
], ids=["plain", "momentum-wd", "nesterov-S=T", "T=1"])
@pytest.mark.parametrize("graft", [None, "sgd"])
def test_matches_minimal_float64_implementation(kw, graft):
    batches = make_batches(9)
    model, twin = make_model(), make_model()
    opt = run_foof(model, batches, graft=graft, **kw)
    mini = run_mini(twin, batches, graft=graft, **kw)
    assert opt.schedule.steps == 9
    assert_same_params(model, twin, 1e-10)
    assert opt.diagnostics == {"dropped_stats": 0, "cholesky_retries": 0, "cholesky_failures": 0}


def test_schedule_observes_only_the_stats_window():
    model = make_model()
    opt = fastfoof.FOOF(model, lr=0.1, inv_period=5, stats_steps=2, backend="reference")
    observed = []
    for x, y in make_batches(12):
        opt.zero_grad()
        loss_fn(model, x, y).backward()
        observed.append(bool(opt.statistics.of(opt.layers[0]).samples))
        opt.step()
    # step 1 (no P yet), then steps t with t mod 5 ∈ {4, 0}
    assert [t for t, seen in enumerate(observed, 1) if seen] == [1, 4, 5, 9, 10]


def test_gradient_accumulation_equals_big_batch():
    # Statistics of unequal micro-batches combine as the concatenated batch's (DESIGN §1.2). No
    # BatchNorm here: its batch statistics would differ per micro-batch.
    torch.manual_seed(3)
    model = nn.Sequential(nn.Conv2d(3, 4, 3, stride=2), nn.Tanh(), nn.Flatten(), nn.Linear(4 * 3 * 4, 5))
    twin = copy.deepcopy(model)
    kw = dict(lr=0.2, damping=0.5, momentum=0.9, inv_period=2, stats_steps=2)
    batches = make_batches(4, batch=6)
    run_foof(model, batches, **kw)
    opt = fastfoof.FOOF(twin, backend="reference", **kw)
    for x, y in batches:
        opt.zero_grad()
        for part in (slice(0, 2), slice(2, 6)):  # losses weighted by micro-batch size
            (loss_fn(twin, x[part], y[part]) * (part.stop - part.start) / 6).backward()
        opt.step()
    assert_same_params(twin, model, 1e-12)


def legacy(state_dict):
    """A state dict as FOOF saved it before 2026-12-06: its own entries at the top as "foof", no placeholders."""
    groups = [dict(group) for group in state_dict["param_groups"]]
    own = [group.pop("fastfoof") for group in groups][0]
    state = {}
    for i, entry in state_dict["state"].items():
        entry = dict(entry)
        for key in filter(None, entry.pop("fastfoof_placeholders").split(",")):
            del entry[key]
        state[i] = entry
    return {"state": state, "param_groups": groups, "foof": own}


@pytest.mark.parametrize("saved_as", ["today", "before 2026-12-06"])
def test_resume_is_bit_for_bit(saved_as):
    batches = make_batches(8)
    kw = dict(lr=0.2, damping=0.5, momentum=0.9, nesterov=True, weight_decay=0.01, inv_period=3, stats_steps=2)
    model = make_model()
    opt = fastfoof.FOOF(model, backend="reference", **kw)
    saved = None
    for i, (x, y) in enumerate(batches):
        if i == 4:
            saved = copy.deepcopy((model.state_dict(), opt.state_dict()))
        opt.zero_grad()
        loss_fn(model, x, y).backward()
        opt.step()
    resumed = make_model(seed=7)
    resumed.load_state_dict(saved[0])
    opt2 = fastfoof.FOOF(resumed, backend="reference", **kw)
    opt2.load_state_dict(saved[1] if saved_as == "today" else legacy(saved[1]))
    for x, y in batches[4:]:
        opt2.zero_grad()
        loss_fn(resumed, x, y).backward()
        opt2.step()
    for p, q in zip(model.parameters(), resumed.parameters()):
        assert torch.equal(p, q)
    assert opt2.state_dict()["param_groups"][0]["fastfoof"]["steps"] == 8


def test_resume_keeps_float32_state_of_low_precision_params():
    model = nn.Linear(4, 3).to(torch.bfloat16)
    opt = fastfoof.FOOF(model, lr=0.1, momentum=0.9)
    model(torch.randn(5, 4, dtype=torch.bfloat16)).float().pow(2).sum().backward()
    opt.step()
    twin = fastfoof.FOOF(model, lr=0.1, momentum=0.9)
    twin.load_state_dict(opt.state_dict())
    for key in ("ema", "precond", "momentum_buffer"):
        assert twin.state[model.weight][key].dtype == torch.float32
        assert torch.equal(twin.state[model.weight][key], opt.state[model.weight][key])


def test_lr_scheduler_drives_the_step():
    batches = make_batches(5)
    kw = dict(damping=0.5, momentum=0.9, inv_period=2, stats_steps=1)
    lrs = [0.3 * 0.5 ** t for t in range(5)]
    model, twin = make_model(), make_model()
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


def test_eval_and_no_grad_forwards_are_not_observed():
    batches = make_batches(6)
    kw = dict(lr=0.2, damping=0.5, inv_period=2, stats_steps=2)
    model, twin = make_model(), make_model()
    run_foof(model, batches, **kw)
    opt = fastfoof.FOOF(twin, backend="reference", **kw)
    junk = 1e3 * torch.randn(4, 3, 7, 9)
    for x, y in batches:
        opt.zero_grad()
        with torch.no_grad():
            twin(junk)
        twin.eval()
        twin(junk)
        twin.train()
        with torch.inference_mode():
            twin(junk)
        loss_fn(twin, x, y).backward()
        opt.step()
    assert_same_params(model, twin, 1e-12)


@pytest.mark.parametrize("reentrant", [False, True])
def test_activation_checkpointing_counts_forwards_once(reentrant):
    model = make_model()
    twin = copy.deepcopy(model)
    x, y = make_batches(1)[0]
    opt = fastfoof.FOOF(model, lr=0.1, ema_decay=0.0, backend="reference")
    opt2 = fastfoof.FOOF(twin, lr=0.1, ema_decay=0.0, backend="reference")
    loss_fn(model, x, y).backward()
    opt.step()
    x2 = x.clone().requires_grad_(reentrant)  # reentrant checkpointing needs an input that requires grad
    h = checkpoint(lambda t: twin[:3](t), x2, use_reentrant=reentrant)
    F.cross_entropy(twin[3:](h), y).backward()
    opt2.step()
    for layer, layer2 in zip(opt.layers, opt2.layers):
        assert torch.allclose(opt2.state[layer2.weight]["ema"], opt.state[layer.weight]["ema"], rtol=1e-12, atol=0)


@pytest.mark.parametrize("graft, damping", [(None, 2.0), ("sgd", 1.0)])  # U = G/λ, or U = G when grafting
def test_param_groups_and_unhooked_params(graft, damping):
    model = make_model()
    extra = nn.Parameter(torch.randn(3))
    convs = [model[0].weight, model[3].weight]
    groups = [
        {"params": convs + [model[6].weight], "lr": 0.1, "weight_decay": 0.1},
        {"params": [model[0].bias, model[6].bias], "lr": 0.0},
        {"params": list(model[1].parameters()) + [extra], "lr": 0.05, "momentum": 0.9},
    ]
    opt = fastfoof.FOOF(model, groups, lr=1.0, damping=2.0, graft=graft, backend="reference")
    before = {p: p.detach().clone() for g in groups for p in g["params"]}
    x, y = make_batches(1)[0]
    (loss_fn(model, x, y) + extra.sum()).backward()
    opt.step()
    assert torch.equal(model[0].bias, before[model[0].bias])  # lr 0: untouched, though preconditioned jointly
    assert not torch.equal(model[0].weight, before[model[0].weight])
    # BatchNorm and the extra parameter have no preconditioner: SGD with momentum (first step V = U)
    assert torch.allclose(extra, before[extra] - 0.05 * torch.ones(3) / damping, atol=1e-15, rtol=0)
    assert "momentum_buffer" in opt.state[extra]
    assert {id(layer.module) for layer in opt._active} == {id(model[0]), id(model[3]), id(model[6])}


def test_layer_only_preconditioned_when_its_weight_is_handed():
    model = make_model()
    opt = fastfoof.FOOF(model, [model[0].weight], lr=0.1, backend="reference")
    x, y = make_batches(1)[0]
    loss_fn(model, x, y).backward()
    before = model[6].weight.detach().clone()
    opt.step()
    assert [layer.module for layer in opt._active] == [model[0]]
    assert torch.equal(model[6].weight, before)
    assert opt.layers[0].bias_row is False  # its bias was not handed


@pytest.mark.parametrize("skip", ["3", nn.Linear, lambda name, m: name == "0", ["0", nn.Linear]])
def test_skip(skip):
    model = make_model()
    opt = fastfoof.FOOF(model, lr=0.1, skip=skip, backend="reference")
    kept = {name for name, m in model.named_modules() if any(layer.module is m for layer in opt.layers)}
    expected = {"0", "3", "6"} - {"3" if skip == "3" else None} - ({"6"} if skip is nn.Linear else set())
    if callable(skip) and not isinstance(skip, type):
        expected = {"3", "6"}
    if isinstance(skip, list):
        expected = {"3"}
    assert kept == expected


def test_warm_up_computes_p_before_training():
    model = make_model()
    opt = fastfoof.FOOF(model, lr=0.1, damping=0.5, backend="reference")
    batches = make_batches(3, batch=5)
    with opt.warm_up():
        for x, _ in batches:
            model(x)
    layer = opt.layers[-1]
    xs = []
    hook = layer.module.register_forward_hook(lambda m, i, o: xs.append(i[0]))
    with torch.no_grad():
        model.train()
        for x, _ in batches:
            model(x)
    hook.remove()
    stat = sum(gram64(x, layer.module, True) for x in xs) / 15
    expected = torch.linalg.inv(stat + 0.5 * torch.eye(stat.shape[-1]))
    assert torch.allclose(opt.state[layer.weight]["precond"], expected, rtol=1e-9, atol=1e-12)
    x, y = make_batches(1, seed=9)[0]
    loss_fn(model, x, y).backward()
    assert opt.statistics.of(opt.layers[0]).samples == 0  # step 1 is outside the stats window once P exists
    opt.step()
    assert opt.schedule.steps == 1


def test_remove_hooks_stops_observation():
    model = make_model()
    opt = fastfoof.FOOF(model, lr=0.1, backend="reference")
    opt.remove_hooks()
    x, y = make_batches(1)[0]
    loss_fn(model, x, y).backward()
    assert all(opt.statistics.of(layer).samples == 0 and not opt.statistics.recorded(layer) for layer in opt.layers)
    before = model[0].weight.detach().clone()
    opt.step()  # without statistics there is no P: U = G/λ
    assert "precond" not in opt.state[model[0].weight]
    assert torch.allclose(model[0].weight, before - 0.1 * model[0].weight.grad, rtol=0, atol=1e-15)


@pytest.mark.parametrize("kw,name", [
    (dict(lr=-0.1), "lr"), (dict(damping=0.0), "damping"), (dict(damping=-1.0), "damping"),
    (dict(ema_decay=1.0), "ema_decay"), (dict(ema_decay=-0.1), "ema_decay"), (dict(inv_period=0), "inv_period"),
    (dict(stats_steps=0), "stats_steps"), (dict(inv_period=5, stats_steps=6), "stats_steps"),
    (dict(backend="cuda"), "backend"), (dict(momentum=-0.5), "momentum"), (dict(weight_decay=-1), "weight_decay"),
    (dict(nesterov=True), "nesterov"), (dict(skip=[3]), "skip"),
])
def test_invalid_arguments_raise_value_error_naming_them(kw, name):
    kw = {"lr": 0.1, **kw}
    with pytest.raises(ValueError, match=name):
        fastfoof.FOOF(make_model(), **kw)


def test_parameters_on_several_devices_are_rejected():
    model = nn.Sequential(nn.Linear(3, 3), nn.Linear(3, 3, device="meta"))
    with pytest.raises(ValueError, match="device"):
        fastfoof.FOOF(model, lr=0.1)


def test_non_finite_statistics_are_dropped_and_counted():
    model = make_model()
    opt = fastfoof.FOOF(model, lr=0.1, inv_period=1, stats_steps=1, backend="reference")
    x, y = make_batches(1)[0]
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
    model = make_model()
    opt = fastfoof.FOOF(model, lr=0.1, inv_period=2, stats_steps=1, damping=0.1, backend="reference")
    x, y = make_batches(1)[0]
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


def test_grad_scaler_skipped_step_touches_nothing():
    torch.set_default_dtype(torch.float32)  # restored by the fixture
    model, twin = make_model().float(), make_model().float()
    (x, y), (x2, y2) = make_batches(2)
    x, x2 = x.float(), x2.float()
    opt = fastfoof.FOOF(model, lr=0.1, momentum=0.9, backend="reference")
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 8)
    (loss_fn(model, x, y) * float("inf")).backward()  # overflow: the scaler must skip this step
    scaler.scale(torch.zeros((), requires_grad=True)).backward()
    scaler.step(opt)
    scaler.update()
    assert opt.schedule.steps == 1  # t counts the skipped step; nothing else moved
    state = opt.state[model[0].weight]
    assert state["ema_count"].item() == 0 and "precond" not in state and "momentum_buffer" not in state
    assert all("momentum_buffer" not in opt.state[p] for p in model.parameters())
    opt.zero_grad()
    scaler.scale(loss_fn(model, x2, y2)).backward()
    scaler.step(opt)
    scaler.update()
    ref = fastfoof.FOOF(twin, lr=0.1, momentum=0.9, backend="reference")
    loss_fn(twin, x2, y2).backward()
    ref.step()
    for p, q in zip(model.parameters(), twin.parameters()):
        assert torch.allclose(p, q, rtol=1e-5, atol=1e-6)


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
    model = make_model()
    opt = fastfoof.FOOF(model, lr=0.1, backend="reference")
    x, y = make_batches(1)[0]

    def closure():
        opt.zero_grad()
        loss = loss_fn(model, x, y)
        loss.backward()
        return loss

    loss = opt.step(closure)
    assert loss.requires_grad and opt.schedule.steps == 1 and "precond" in opt.state[model[0].weight]


def test_statistics_under_autocast_stay_float32():
    torch.set_default_dtype(torch.float32)  # restored by the fixture
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten(), nn.Linear(4 * 5 * 7, 3))
    x = torch.randn(4, 3, 7, 9)
    opt = fastfoof.FOOF(model, lr=0.1, backend="reference")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        h = model[0](input=x).flatten(1)  # inputs passed by keyword reach the hooks too
        out = model[2](input=h)
    out.float().sum().backward()
    for layer, inp in zip(opt.layers, (x, h)):
        stat = opt.statistics.of(layer).pending
        assert stat.dtype == torch.float32
        ref = gram64(inp.bfloat16(), layer.module, True)  # of what the layer saw: its autocast input
        assert ((stat - ref).norm() / ref.norm()).item() <= 1e-5


def test_bias_handed_later_joins_its_layer():
    model = make_model()
    opt = fastfoof.FOOF(model, [p for n, p in model.named_parameters() if n != "6.bias"], lr=0.1, inv_period=2,
                        stats_steps=2, backend="reference")
    x, y = make_batches(1)[0]
    for step in range(3):
        if step == 1:
            opt.add_param_group({"params": [model[6].bias]})
        opt.zero_grad()
        loss_fn(model, x, y).backward()
        opt.step()
    layer = opt.layers[-1]
    assert layer.bias_row and opt.state[layer.weight]["precond"].shape == (1, 73, 73)
