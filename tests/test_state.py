"""State (DESIGN §9): a resumed run continues bit for bit (today's state dict and the layout saved before
2026-12-06), the state keeps its own dtypes and follows the parameters' dtype and device, and a state dict
another optimizer kind saved is refused."""
import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fastfoof
from nets import conv_net, conv_net_batch, conv_net_step, grouped_net, grouped_net_batches, loss_fn, small_batch, \
    small_net


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


@pytest.mark.smoke
@pytest.mark.usefixtures("float64")
@pytest.mark.parametrize("saved_as", ["today", "before 2026-12-06"])
def test_resume_is_bit_for_bit(saved_as):
    batches = grouped_net_batches(8)
    kw = dict(lr=0.2, damping=0.5, momentum=0.9, nesterov=True, weight_decay=0.01, inv_period=3, stats_steps=2)
    model = grouped_net()
    opt = fastfoof.FOOF(model, backend="reference", **kw)
    saved = None
    for i, (x, y) in enumerate(batches):
        if i == 4:
            saved = copy.deepcopy((model.state_dict(), opt.state_dict()))
        opt.zero_grad()
        loss_fn(model, x, y).backward()
        opt.step()
    resumed = grouped_net(seed=7)
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


def test_kfac_mc_resume_is_bit_exact_without_saving_rng_state():
    x, y = small_batch(n=8)

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


@pytest.mark.usefixtures("float64")
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


def test_model_double_after_a_step():
    model = conv_net()
    opt = fastfoof.FOOF(model, lr=0.1, damping=0.5, momentum=0.9, inv_period=2, stats_steps=1, backend="reference")
    conv_net_step(model, opt, 0)
    model.double()
    for seed in (1, 2):  # a step outside the window, then an inversion step
        conv_net_step(model, opt, seed, dtype=torch.float64)
    for layer in opt.layers:
        state = opt.state[layer.weight]
        assert {state[k].dtype for k in ("ema", "ema_count", "precond", "momentum_buffer")} == {torch.float64}
    assert all(opt.state[p]["momentum_buffer"].dtype == torch.float64 for p in model.parameters())
    assert all(torch.isfinite(p).all() for p in model.parameters())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="moving between devices needs a second device")
def test_model_to_cuda_after_a_step():
    model = conv_net()
    opt = fastfoof.FOOF(model, lr=0.1, damping=0.5, momentum=0.9, inv_period=2, stats_steps=1)
    conv_net_step(model, opt, 0)
    model.cuda()
    x, y = conv_net_batch(1)
    opt.zero_grad()
    F.cross_entropy(model(x.cuda()), y.cuda()).backward()
    opt.step()
    assert all(t.is_cuda for s in opt.state.values() for t in s.values() if isinstance(t, torch.Tensor))


def test_foreign_state_dict_is_a_value_error():
    model = conv_net()
    sgd = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    F.cross_entropy(model(conv_net_batch(0)[0]), conv_net_batch(0)[1]).backward()
    sgd.step()
    opt = fastfoof.FOOF(model, lr=0.1, backend="reference")
    with pytest.raises(ValueError, match="foof"):
        opt.load_state_dict(sgd.state_dict())
