"""stats_batch (DESIGN §1.2): the statistics of the first k samples of each observed forward, a mean
over the samples used, for FOOF's Σ and KFAC's A and G alike, eager, accumulated and compiled."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fastfoof
from fastfoof.statistics import INPUTS, OUTPUT_GRADS
from helpers import position_mean_gram64, rel_error


pytestmark = pytest.mark.usefixtures("float64")


def make_model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(2, 3, 3, padding=1), nn.Tanh(), nn.Flatten(), nn.Linear(3 * 4 * 4, 4))


def data(n, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 2, 4, 4, generator=g), torch.randint(0, 4, (n,), generator=g)


def layer_inputs(model, x):
    with torch.no_grad():  # not observed
        return [x, torch.tanh(model[0](x)).flatten(1)]


@pytest.mark.smoke
def test_foof_statistic_is_the_mean_over_the_first_samples():
    model = make_model()
    opt = fastfoof.FOOF(model, lr=0.1, stats_batch=3)
    x, y = data(8)
    F.cross_entropy(model(x), y).backward()
    for layer, inp in zip(opt.layers, layer_inputs(model, x)):
        statistic = opt.statistics.of(layer)
        assert statistic.samples == 3
        assert rel_error(statistic.pending / statistic.samples, position_mean_gram64(inp[:3], layer.module, True) / 3) <= 1e-12


def test_a_batch_smaller_than_stats_batch_is_taken_whole():
    model = make_model()
    opt = fastfoof.FOOF(model, lr=0.1, stats_batch=16)
    x, y = data(5)
    F.cross_entropy(model(x), y).backward()
    assert [opt.statistics.of(layer).samples for layer in opt.layers] == [5, 5]


def test_the_subsampled_statistic_is_unbiased():
    """Over every ordering of a batch, the mean of the first-k statistics is the full statistic."""
    model = make_model()
    x, _ = data(4)
    full = position_mean_gram64(x, model[0], True) / 4
    total = 0
    perms = [torch.roll(torch.arange(4), shift) for shift in range(4)]  # each sample first-or-second equally often
    for perm in perms:
        opt = fastfoof.FOOF(model, lr=0.1, stats_batch=2)
        model(x[perm]).sum().backward()
        total = total + opt.statistics.of(opt.layers[0]).pending / opt.statistics.of(opt.layers[0]).samples
        opt.remove_hooks()
    assert rel_error(total / len(perms), full) <= 1e-12


def test_accumulation_takes_the_first_samples_of_each_forward():
    model = make_model()
    opt = fastfoof.FOOF(model, lr=0.1, stats_batch=2)
    x, y = data(9)
    for xs, ys in zip(x.chunk(3), y.chunk(3)):
        F.cross_entropy(model(xs), ys).backward()
    used = torch.cat([xs[:2] for xs in x.chunk(3)])
    statistic = opt.statistics.of(opt.layers[0])
    assert statistic.samples == 6
    assert rel_error(statistic.pending / statistic.samples, position_mean_gram64(used, model[0], True) / 6) <= 1e-12


@pytest.mark.parametrize("fisher", ["empirical", "mc"])
def test_kfac_takes_a_and_g_from_the_same_samples(fisher):
    model = make_model()
    opt = fastfoof.KFAC(model, lr=0.1, fisher=fisher, stats_batch=3)
    x, y = data(8)
    outputs = []
    for m in (model[0], model[3]):
        m.register_forward_hook(lambda mod, args, out: outputs.append(out))
    logits = model(x)
    for out in outputs:
        out.retain_grad()
    if fisher == "mc":
        targets = opt.backward_fisher(logits)
        loss = F.cross_entropy(logits, targets)
        grads = torch.autograd.grad(loss, outputs, retain_graph=True)
    F.cross_entropy(logits, y).backward()
    if fisher == "empirical":
        grads = [out.grad for out in outputs]
    for layer, inp, g in zip(opt.layers, layer_inputs(model, x), grads):
        a, g_stat = opt.statistics.of(layer, INPUTS), opt.statistics.of(layer, OUTPUT_GRADS)
        assert a.samples == g_stat.samples == 3
        assert rel_error(a.pending / 3, position_mean_gram64(inp[:3], layer.module, True) / 3) <= 1e-12
        rows = g[:3].movedim(1, -1).reshape(-1, g.shape[1]) * 8  # ĝ = B·∂L/∂s, B the whole batch
        expected = rows.T @ rows / 3
        scale = opt._fold_scale(g_stat)
        assert rel_error(g_stat.pending[0] * scale, expected) <= 1e-12


def test_compiled_forward_takes_the_same_samples():
    torch.set_default_dtype(torch.float32)  # restored by the fixture
    x, y = data(8)
    x = x.float()
    stats = []
    for compiled in (False, True):
        model = make_model().float()
        opt = fastfoof.FOOF(model, lr=0.1, stats_batch=3, backend="reference")
        run = torch.compile(model, fullgraph=True) if compiled else model
        F.cross_entropy(run(x), y).backward()
        opt.step()
        stats.append([opt.state[layer.weight]["ema"].clone() for layer in opt.layers])
    for a, b in zip(*stats):
        assert rel_error(b, a) <= 1e-5
