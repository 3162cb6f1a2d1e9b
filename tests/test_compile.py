"""FOOF with torch.compile (inductor on CPU): one full graph, no recompiles as the schedule moves
between observed and unobserved steps, and the same training as eager."""
import pytest
import torch
import torch._dynamo
import torch.nn.functional as F
from torch import nn

import fastfoof

KW = dict(lr=0.1, damping=0.5, momentum=0.9, weight_decay=1e-3, inv_period=3, stats_steps=2)
STEPS = 4 * KW["inv_period"]


def make_model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU(),
                         nn.Conv2d(6, 8, 3, stride=2, groups=2), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 3 * 3, 5))


def batches():
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(4, 3, 8, 8, generator=g), torch.randint(0, 5, (4,), generator=g)) for _ in range(STEPS)]


def attach(attach_mode):
    """(model to call, optimizer, module whose parameters train) for each way users combine them."""
    model = make_model()
    if attach_mode == "foof-then-compile":
        opt = fastfoof.FOOF(model, **KW)
        return torch.compile(model, fullgraph=True), opt, model
    compiled = torch.compile(model, fullgraph=True)
    if attach_mode == "compile-then-foof":
        compiled(batches()[0][0])  # compiled before the hooks exist: FOOF must have it traced again
        opt = fastfoof.FOOF(model, **KW)
        torch._dynamo.utils.counters.clear()
        return compiled, opt, model
    return compiled, fastfoof.FOOF(compiled, **KW), model  # FOOF built on the compiled module


@pytest.fixture(autouse=True)
def fresh_dynamo():
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    yield
    torch._dynamo.config.error_on_recompile = False
    torch._dynamo.reset()


@pytest.mark.parametrize("attach_mode", ["foof-then-compile", "compile-then-foof", "foof-on-compiled"])
def test_compiled_training_matches_eager_without_recompiles(attach_mode):
    eager = make_model()
    eager_opt = fastfoof.FOOF(eager, **KW)
    compiled, opt, model = attach(attach_mode)
    assert [layer.name for layer in opt.layers] == ["0", "3", "6"]  # the user's names, not the wrapper's
    for step, (x, y) in enumerate(batches(), 1):
        # two periods cover every phase of the schedule; after them nothing may recompile
        torch._dynamo.config.error_on_recompile = step > 2 * KW["inv_period"]
        for m, o in ((compiled, opt), (eager, eager_opt)):
            o.zero_grad()
            F.cross_entropy(m(x), y).backward()
            o.step()
    torch._dynamo.config.error_on_recompile = False
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 1  # one full graph
    for p, q in zip(model.parameters(), eager.parameters()):
        assert ((p - q).norm() / q.norm()).item() <= 1e-5
    for layer, twin in zip(opt.layers, eager_opt.layers):
        assert torch.allclose(opt.state[layer.weight]["ema"], eager_opt.state[twin.weight]["ema"], rtol=1e-5, atol=1e-6)
