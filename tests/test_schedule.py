"""The schedule (DESIGN §1.5): which steps observe, when a layer gets its first preconditioner (its first
observed batch, also after it is unfrozen, after its bias joins it, or after steps that observed nothing),
and warm_up()."""
import warnings

import pytest
import torch
import torch.nn.functional as F

import fastfoof
from helpers import gram64, preconditioner64
from nets import conv_net, conv_net_batch, conv_net_step, grouped_net, grouped_net_batches, loss_fn

BACKENDS = ["reference", "triton"]  # triton: Triton's interpreter on CPU (conftest)


@pytest.mark.smoke
@pytest.mark.usefixtures("float64")
def test_schedule_observes_only_the_stats_window():
    model = grouped_net()
    opt = fastfoof.FOOF(model, lr=0.1, inv_period=5, stats_steps=2, backend="reference")
    observed = []
    for x, y in grouped_net_batches(12):
        opt.zero_grad()
        loss_fn(model, x, y).backward()
        observed.append(bool(opt.statistics.of(opt.layers[0]).samples))
        opt.step()
    # step 1 (no P yet), then steps t with t mod 5 ∈ {4, 0}
    assert [t for t, seen in enumerate(observed, 1) if seen] == [1, 4, 5, 9, 10]


@pytest.mark.parametrize("case", ["eval-mode", "warm-up-no-grad", "dropped-non-finite", "unused-branch"])
def test_layer_without_samples_is_observed_until_it_has_them(case):
    model = conv_net()
    opt = fastfoof.FOOF(model, lr=0.1, damping=0.5, backend="reference")  # T = 100, S = 10
    x, y = conv_net_batch(0)
    if case == "warm-up-no-grad":
        with pytest.warns(RuntimeWarning, match="warm_up"):
            with opt.warm_up(), torch.no_grad():
                model(x)
    opt.zero_grad()
    if case == "eval-mode":
        model.eval()
        F.cross_entropy(model(x), y).backward()
        model.train()
    elif case == "dropped-non-finite":
        bad = x.clone()
        bad[0, 0, 0, 0] = float("nan")
        model(bad)  # observed, and dropped for its NaN
        F.cross_entropy(model(x), y).backward()
    elif case == "unused-branch":
        # the conv is skipped at step 1: it gets no samples and no gradient
        F.cross_entropy(model[3](torch.randn(5, 120)), y).backward()
    else:
        F.cross_entropy(model(x), y).backward()
    if case == "dropped-non-finite":
        with pytest.warns(RuntimeWarning, match="dropped_stats"):
            opt.step()
        assert opt.diagnostics["dropped_stats"] == 2
    else:
        opt.step()
    conv = model[0]
    if case == "warm-up-no-grad":  # the warm-up gave no P, so step 1 observed its own batch
        p = preconditioner64(x, conv, 0.5)
        assert torch.allclose(opt.state[conv.weight]["precond"].double(), p, rtol=1e-4, atol=1e-6)
        return
    assert "precond" not in opt.state[conv.weight]  # still P = I/λ: nothing observed yet
    x2 = conv_net_step(model, opt, 1)  # t = 2, outside the stats window of T = 100, S = 10
    p = preconditioner64(x2, conv, 0.5)
    assert torch.allclose(opt.state[conv.weight]["precond"].double(), p, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("graft", [None, "sgd"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_frozen_weight_still_steps_its_bias(backend, graft):
    model = conv_net()
    opt = fastfoof.FOOF(model, lr=0.3, damping=2.0, inv_period=1, stats_steps=1, graft=graft, backend=backend)
    conv_net_step(model, opt, 0)
    conv = model[0]
    conv.weight.requires_grad_(False)  # fine-tuning: freeze a layer's weight after the optimizer was built
    weight, bias = conv.weight.detach().clone(), conv.bias.detach().clone()
    x, y = conv_net_batch(1)
    opt.zero_grad()
    F.cross_entropy(model(x), y).backward()
    grad = conv.bias.grad.clone()
    opt.step()
    assert torch.equal(conv.weight, weight)
    # a parameter without a preconditioner: U = g/λ, or U = g when grafting (DESIGN §1.4)
    assert torch.allclose(conv.bias, bias - 0.3 * grad / (2.0 if graft is None else 1.0), rtol=0, atol=1e-7)


@pytest.mark.parametrize("graft", [None, "sgd"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_layer_unfrozen_later_is_preconditioned(backend, graft):
    model = conv_net()
    model[3].weight.requires_grad_(False)
    opt = fastfoof.FOOF(model, lr=0.2, damping=0.5, graft=graft, backend=backend)
    conv_net_step(model, opt, 0)
    assert "precond" not in opt.state[model[3].weight]
    model[3].weight.requires_grad_(True)
    before = model[3].weight.detach().double().clone()
    h = []
    hook = model[3].register_forward_hook(lambda m, i, o: h.append(i[0].detach()))
    conv_net_step(model, opt, 1)
    hook.remove()
    # its first P comes from its first observed batch, and serves that very step (DESIGN §1.5)
    p = preconditioner64(h[0], model[3], 0.5, graft)
    assert torch.allclose(opt.state[model[3].weight]["precond"].double(), p, rtol=1e-4, atol=1e-6)
    g = torch.cat([model[3].weight.grad, model[3].bias.grad[:, None]], 1).double()
    u = g @ p[0]
    if graft == "sgd":  # the layer's U with its gradient's norm, scaled by at most κλ (a Linear: R = 1, §1.2)
        u *= min(g.norm() / u.norm(), fastfoof.FOOF.GRAFT_BOUND * 0.5)
    expected = before - 0.2 * u[:, :-1]
    assert ((model[3].weight.double() - expected).norm() / expected.norm()).item() < 1e-5


@pytest.mark.parametrize("joins", ["before a forward", "after a forward", "after a forward, before another"])
def test_a_bias_handed_later_joins_its_layer(joins):
    """A layer's bias handed to the optimizer after its weight (a param group added at a step boundary, or
    between a forward and its step) turns the layer's bias row on: a statistic observed without it is dropped,
    not mixed, and the layer's next P has the bias row."""
    model = conv_net()
    head = model[3]
    opt = fastfoof.FOOF(model, [p for p in model.parameters() if p is not head.bias], lr=0.1, damping=0.5,
                        inv_period=3, stats_steps=3, backend="reference")
    conv_net_step(model, opt, 0)
    if joins == "before a forward":
        opt.add_param_group({"params": [head.bias]})
        for seed in (1, 2):
            conv_net_step(model, opt, seed)
        layer = opt.layers[-1]
        assert layer.bias_row and opt.state[layer.weight]["precond"].shape == (1, 121, 121)
        return
    second_forward = joins == "after a forward, before another"
    x, y = conv_net_batch(1)
    opt.zero_grad()
    F.cross_entropy(model(x), y).backward()  # observed without the bias row
    opt.add_param_group({"params": [head.bias]})  # the bias row turns on before the step
    if second_forward:
        x, y = conv_net_batch(2)
        opt.zero_grad()
        h = []
        hook = head.register_forward_hook(lambda m, i, o: h.append(i[0].detach()))
        F.cross_entropy(model(x), y).backward()
        hook.remove()
    opt.step()
    state = opt.state[head.weight]
    assert state["ema"].shape == (1, 121, 121)
    assert torch.isfinite(state["ema"]).all()
    if second_forward:  # the pending statistic is the second batch's, with its bias row
        expected = gram64(h[0], head, True) / 5
        assert torch.allclose((state["ema"] / state["ema_count"]).double(), expected[None], rtol=1e-4, atol=1e-5)
        assert state["precond"].shape == (1, 121, 121)
    else:  # the statistic without a bias row is dropped: no P yet, observed at the next step
        assert state["ema_count"].item() == 0 and "precond" not in state
        conv_net_step(model, opt, 3)
        assert state["precond"].shape == (1, 121, 121)
    assert all(torch.isfinite(p).all() for p in model.parameters())


@pytest.mark.usefixtures("float64")
def test_warm_up_computes_p_before_training():
    model = grouped_net()
    opt = fastfoof.FOOF(model, lr=0.1, damping=0.5, backend="reference")
    batches = grouped_net_batches(3, batch=5)
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
    x, y = grouped_net_batches(1, seed=9)[0]
    loss_fn(model, x, y).backward()
    assert opt.statistics.of(opt.layers[0]).samples == 0  # step 1 is outside the stats window once P exists
    opt.step()
    assert opt.schedule.steps == 1


def test_warm_up_that_observes_nothing_warns_once():
    model = conv_net()
    opt = fastfoof.FOOF(model, lr=0.1, backend="reference")
    with pytest.warns(RuntimeWarning, match="warm_up"):
        with opt.warm_up():
            model.eval()
            model(conv_net_batch(0)[0])
    model.train()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with opt.warm_up(), torch.no_grad():
            model(conv_net_batch(0)[0])
