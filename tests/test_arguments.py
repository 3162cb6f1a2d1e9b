"""Arguments (DESIGN §5): every invalid one is a ValueError naming it, at construction (or where a param
group is added, or an op or backward_fisher called); which layers `params` and `skip` leave to the optimizer."""
import pytest
import torch
from torch import nn

import fastfoof
from fastfoof import linalg, ops
from helpers import damped_inverse64, rel_error
from nets import grouped_net, small_batch, small_net

# (arguments, the name the error must give): both optimizers take them all
INVALID = [
    (dict(lr=-0.1), "lr"), (dict(lr=-1.0), "lr"), (dict(lr="0.1"), "lr"),
    (dict(damping=0.0), "damping"), (dict(damping=-1.0), "damping"), (dict(damping="1"), "damping"),
    (dict(ema_decay=1.0), "ema_decay"), (dict(ema_decay=-0.1), "ema_decay"), (dict(ema_decay=None), "ema_decay"),
    (dict(inv_period=0), "inv_period"), (dict(inv_period=True), "inv_period"), (dict(inv_period=2.0), "inv_period"),
    (dict(stats_steps=0), "stats_steps"), (dict(inv_period=5, stats_steps=6), "stats_steps"),
    (dict(stats_steps=True), "stats_steps"), (dict(stats_batch=0), "stats_batch"),
    (dict(stats_batch=True), "stats_batch"), (dict(backend="cuda"), "backend"), (dict(momentum=-0.5), "momentum"),
    (dict(momentum="0.9"), "momentum"), (dict(weight_decay=-1), "weight_decay"), (dict(nesterov=True), "nesterov"),
    (dict(skip=[3]), "skip"), (dict(skip="nonexistent"), "skip"), (dict(skip=["0", "typo"]), "skip"),
    (dict(graft="adam"), "graft"), (dict(graft=True), "graft"), (dict(inverse="lu"), "inverse"),
    *((dict(rank=rank), "rank") for rank in (0, -2, True, 2.5, "4")),
]
# KFAC's own
INVALID_KFAC = [(dict(damping_mode="tikhonov"), "damping_mode"), (dict(fisher="type2"), "fisher"),
                (dict(rank=4, damping_mode="exact"), "rank")]
CASES = [("FOOF", kw, name) for kw, name in INVALID] + [("KFAC", kw, name) for kw, name in INVALID + INVALID_KFAC]


@pytest.mark.smoke
@pytest.mark.parametrize("kind, kw, name", CASES, ids=[f"{kind}-{kw}" for kind, kw, _ in CASES])
def test_invalid_arguments_are_value_errors_naming_them(kind, kw, name):
    kw = {"lr": 0.1, **kw}
    with pytest.raises(ValueError, match=name):
        getattr(fastfoof, kind)(small_net(), **kw)


@pytest.mark.parametrize("kind", ["FOOF", "KFAC"])
def test_a_missing_lr_is_named_in_the_optimizers_own_words(kind):
    with pytest.raises(TypeError, match=rf"^{kind}\(\): .*'lr'"):
        getattr(fastfoof, kind)(small_net())


def test_parameters_on_several_devices_are_rejected():
    model = nn.Sequential(nn.Linear(3, 3), nn.Linear(3, 3, device="meta"))
    with pytest.raises(ValueError, match="device"):
        fastfoof.FOOF(model, lr=0.1)


def test_a_triton_backend_that_cannot_run_here_fails_at_construction(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(ValueError, match="backend"):
        fastfoof.FOOF(small_net(), lr=0.1, backend="triton")
    monkeypatch.setenv("FASTFOOF_BACKEND", "triton")
    with pytest.raises(ValueError, match="backend"):
        fastfoof.FOOF(small_net(), lr=0.1)


def test_invalid_param_group_is_not_added():
    model = small_net()
    opt = fastfoof.FOOF(model[0], list(model[0].parameters()), lr=0.1, backend="reference")
    with pytest.raises(ValueError, match="lr"):
        opt.add_param_group({"params": list(model[3].parameters()), "lr": -1.0})
    assert len(opt.param_groups) == 1
    with pytest.raises(ValueError, match="nesterov"):
        opt.add_param_group({"params": list(model[3].parameters()), "nesterov": True})
    assert len(opt.param_groups) == 1


def test_backward_fisher_argument_errors():
    model = small_net()
    x, _ = small_batch()
    with pytest.raises(ValueError, match="fisher"):
        fastfoof.KFAC(model, lr=0.1).backward_fisher(model(x))
    with pytest.raises(ValueError, match="loss"):
        fastfoof.KFAC(model, lr=0.1, fisher="mc").backward_fisher(model(x), loss="hinge")


@pytest.mark.parametrize("shape, module", [
    ((6, 4), nn.Linear(8, 3)),
    ((2, 3, 5, 5), nn.Conv2d(4, 2, 3)),
    ((2, 4, 5), nn.Conv2d(4, 2, 3)),
    ((2, 4, 5, 5, 5), nn.Conv2d(4, 2, 3)),
])
def test_an_input_that_does_not_fit_the_module_is_a_value_error(shape, module):
    with pytest.raises(ValueError, match=r"does not fit .*" + type(module).__name__):
        ops.patch_gram(torch.randn(shape), module)


def test_the_inverse_argument_and_its_override(monkeypatch):
    """FOOF(inverse=...) picks the inversion round's method; FASTFOOF_INVERSE, where set, overrides it; a value
    that is no method fails at construction, naming `inverse`, whether it is the argument or the override."""
    monkeypatch.setattr(linalg, "BLOCKED_LEAF_MAX", 16)  # "blocked" recurses from 17 on
    calls = []
    blocked = linalg.blocked_inverses
    monkeypatch.setattr(linalg, "blocked_inverses", lambda ms, *a: calls.append(len(ms)) or blocked(ms, *a))
    x = torch.randn(8, 20, generator=torch.Generator().manual_seed(11))
    for inverse, override, blocked_calls in (("cholesky", None, 0), ("blocked", None, 1), ("cholesky", "blocked", 1),
                                             ("blocked", "cholesky", 0)):
        if override is None:
            monkeypatch.delenv("FASTFOOF_INVERSE", raising=False)
        else:
            monkeypatch.setenv("FASTFOOF_INVERSE", override)
        layer = nn.Linear(20, 3)  # D' = 21: past the leaves of 16
        opt = fastfoof.FOOF(layer, lr=0.1, inverse=inverse, backend="reference")
        calls.clear()
        layer(x).square().sum().backward()
        opt.step()  # the first inversion
        assert len(calls) == blocked_calls, (inverse, override)
        state = opt.state[layer.weight]
        assert rel_error(state["precond"][0], damped_inverse64(state["ema"][0] / state["ema_count"], opt.damping)) < 1e-5
    monkeypatch.setenv("FASTFOOF_INVERSE", "lu")
    for kind in (fastfoof.FOOF, fastfoof.KFAC):
        with pytest.raises(ValueError, match="inverse"):
            kind(nn.Linear(3, 2), lr=0.1)


@pytest.mark.usefixtures("float64")
@pytest.mark.parametrize("skip", ["3", nn.Linear, lambda name, m: name == "0", ["0", nn.Linear]])
def test_skip(skip):
    model = grouped_net()
    opt = fastfoof.FOOF(model, lr=0.1, skip=skip, backend="reference")
    kept = {name for name, m in model.named_modules() if any(layer.module is m for layer in opt.layers)}
    expected = {"0", "3", "6"} - {"3" if skip == "3" else None} - ({"6"} if skip is nn.Linear else set())
    if callable(skip) and not isinstance(skip, type):
        expected = {"3", "6"}
    if isinstance(skip, list):
        expected = {"3"}
    assert kept == expected
