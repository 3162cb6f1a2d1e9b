"""Corners that torch.optim users hit and torch.optim.SGD handles (issue 10): freezing, late
observations, param groups added mid-step, dtype and device moves, foreign state dicts, bf16 rounding."""
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fastfoof
from fastfoof import reference
from helpers import gram64

BACKENDS = ["reference", "triton"]  # triton: Triton's interpreter on CPU (conftest)


def make_net(dtype=torch.float32, seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.Tanh(), nn.Flatten(), nn.Linear(4 * 5 * 6, 3)).to(dtype)


def batch(seed, n=5, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, 5, 6, generator=g).to(dtype), torch.randint(0, 3, (n,), generator=g)


def train_step(model, opt, seed, dtype=torch.float32):
    x, y = batch(seed, dtype=dtype)
    opt.zero_grad()
    F.cross_entropy(model(x), y).backward()
    opt.step()
    return x


def preconditioner64(x, module, damping):
    """(C/B + λI)⁻¹ of one batch, [groups, D', D'] float64: a layer's first P (the EMA is bias corrected)."""
    stat = gram64(x, module, module.bias is not None) / x.shape[0]
    return torch.linalg.inv(stat + damping * torch.eye(stat.shape[-1], dtype=torch.float64))


@pytest.mark.parametrize("graft", [None, "sgd"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_frozen_weight_still_steps_its_bias(backend, graft):
    model = make_net()
    opt = fastfoof.FOOF(model, lr=0.3, damping=2.0, inv_period=1, stats_steps=1, graft=graft, backend=backend)
    train_step(model, opt, 0)
    conv = model[0]
    conv.weight.requires_grad_(False)  # fine-tuning: freeze a layer's weight after the optimizer was built
    weight, bias = conv.weight.detach().clone(), conv.bias.detach().clone()
    x, y = batch(1)
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
    model = make_net()
    model[3].weight.requires_grad_(False)
    opt = fastfoof.FOOF(model, lr=0.2, damping=0.5, graft=graft, backend=backend)
    train_step(model, opt, 0)
    assert "precond" not in opt.state[model[3].weight]
    model[3].weight.requires_grad_(True)
    before = model[3].weight.detach().double().clone()
    h = []
    hook = model[3].register_forward_hook(lambda m, i, o: h.append(i[0].detach()))
    train_step(model, opt, 1)
    hook.remove()
    # its first P comes from its first observed batch, and serves that very step (DESIGN §1.5)
    p = preconditioner64(h[0], model[3], 0.5)
    assert torch.allclose(opt.state[model[3].weight]["precond"].double(), p, rtol=1e-4, atol=1e-6)
    g = torch.cat([model[3].weight.grad, model[3].bias.grad[:, None]], 1).double()
    u = g @ p[0]
    if graft == "sgd":  # the layer's U with its gradient's norm, scaled by at most 10λ
        u *= min(g.norm() / u.norm(), 10 * 0.5)
    expected = before - 0.2 * u[:, :-1]
    assert ((model[3].weight.double() - expected).norm() / expected.norm()).item() < 1e-5


@pytest.mark.parametrize("case", ["eval-mode", "warm-up-no-grad", "dropped-non-finite", "unused-branch"])
def test_layer_without_samples_is_observed_until_it_has_them(case):
    model = make_net()
    opt = fastfoof.FOOF(model, lr=0.1, damping=0.5, backend="reference")  # T = 100, S = 10
    x, y = batch(0)
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
    x2 = train_step(model, opt, 1)  # t = 2, outside the stats window of T = 100, S = 10
    p = preconditioner64(x2, conv, 0.5)
    assert torch.allclose(opt.state[conv.weight]["precond"].double(), p, rtol=1e-4, atol=1e-6)


def test_warm_up_that_observes_nothing_warns_once():
    model = make_net()
    opt = fastfoof.FOOF(model, lr=0.1, backend="reference")
    with pytest.warns(RuntimeWarning, match="warm_up"):
        with opt.warm_up():
            model.eval()
            model(batch(0)[0])
    model.train()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with opt.warm_up(), torch.no_grad():
            model(batch(0)[0])


@pytest.mark.parametrize("second_forward", [False, True])
def test_bias_added_between_forward_and_step(second_forward):
    model = make_net()
    head = model[3]
    opt = fastfoof.FOOF(model, [p for p in model.parameters() if p is not head.bias], lr=0.1, damping=0.5,
                        inv_period=3, stats_steps=3, backend="reference")
    train_step(model, opt, 0)
    x, y = batch(1)
    opt.zero_grad()
    F.cross_entropy(model(x), y).backward()  # observed without the bias row
    opt.add_param_group({"params": [head.bias]})  # the bias row turns on before the step
    if second_forward:
        x, y = batch(2)
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
        train_step(model, opt, 3)
        assert state["precond"].shape == (1, 121, 121)
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_model_double_after_a_step():
    model = make_net()
    opt = fastfoof.FOOF(model, lr=0.1, damping=0.5, momentum=0.9, inv_period=2, stats_steps=1, backend="reference")
    train_step(model, opt, 0)
    model.double()
    for seed in (1, 2):  # a step outside the window, then an inversion step
        train_step(model, opt, seed, dtype=torch.float64)
    for layer in opt.layers:
        state = opt.state[layer.weight]
        assert {state[k].dtype for k in ("ema", "ema_count", "precond", "momentum_buffer")} == {torch.float64}
    assert all(opt.state[p]["momentum_buffer"].dtype == torch.float64 for p in model.parameters())
    assert all(torch.isfinite(p).all() for p in model.parameters())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="moving between devices needs a second device")
def test_model_to_cuda_after_a_step():
    model = make_net()
    opt = fastfoof.FOOF(model, lr=0.1, damping=0.5, momentum=0.9, inv_period=2, stats_steps=1)
    train_step(model, opt, 0)
    model.cuda()
    x, y = batch(1)
    opt.zero_grad()
    F.cross_entropy(model(x.cuda()), y.cuda()).backward()
    opt.step()
    assert all(t.is_cuda for s in opt.state.values() for t in s.values() if isinstance(t, torch.Tensor))


def test_foreign_state_dict_is_a_value_error():
    model = make_net()
    sgd = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    F.cross_entropy(model(batch(0)[0]), batch(0)[1]).backward()
    sgd.step()
    opt = fastfoof.FOOF(model, lr=0.1, backend="reference")
    with pytest.raises(ValueError, match="foof"):
        opt.load_state_dict(sgd.state_dict())


def test_invalid_param_group_is_not_added():
    model = make_net()
    opt = fastfoof.FOOF(model[0], list(model[0].parameters()), lr=0.1, backend="reference")
    with pytest.raises(ValueError, match="lr"):
        opt.add_param_group({"params": list(model[3].parameters()), "lr": -1.0})
    assert len(opt.param_groups) == 1
    with pytest.raises(ValueError, match="nesterov"):
        opt.add_param_group({"params": list(model[3].parameters()), "nesterov": True})
    assert len(opt.param_groups) == 1


def test_bf16_parameter_is_rounded_once_from_the_fp32_step():
    # W·(1 − η·wd) − η·D is formed in fp32 and rounded to bf16 once (DESIGN §1.4)
    g = torch.Generator().manual_seed(0)
    p = torch.randn(64, 37, generator=g).to(torch.bfloat16)
    u = torch.randn(64, 37, generator=g)
    group = dict(lr=0.37, momentum=0.0, dampening=0.0, nesterov=False, weight_decay=0.7)
    exact = p.double() * (1 - 0.37 * 0.7) - 0.37 * u.double()
    reference.sgd_step_(p, u, None, group)
    ulp = 2.0 ** (torch.floor(torch.log2(exact.abs())) - 7)  # bf16 spacing at |exact|
    assert ((p.double() - exact).abs() <= 0.5 * ulp + exact.abs() * 2.0 ** -23).all()
