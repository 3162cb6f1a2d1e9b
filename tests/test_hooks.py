"""Hooks and lifetimes (DESIGN §1.2, §5): which forwards are observed, and once (eval mode, no_grad,
torch.func transforms, activation checkpointing, inputs changed in place); the hooks hold the optimizer
weakly, remove_hooks() detaches them, and copies of the model carry none."""
import copy
import gc
import io
import pickle
import weakref

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, grad, vmap
from torch.multiprocessing.reductions import StorageWeakRef
from torch.optim.swa_utils import AveragedModel
from torch.utils.checkpoint import checkpoint

import fastfoof
from fastfoof import ops
from fastfoof.observe import LayerHook
from helpers import gram64, rel_error
from nets import assert_same_params, grouped_net, grouped_net_batches, loss_fn, run_foof, small_batch, small_net, \
    train_step


def observed_stat(opt, index):
    statistic = opt.statistics.of(opt.layers[index])
    return statistic.pending / statistic.samples


# ---- which forwards are observed ------------------------------------------------------------------

@pytest.mark.usefixtures("float64")
def test_eval_and_no_grad_forwards_are_not_observed():
    batches = grouped_net_batches(6)
    kw = dict(lr=0.2, damping=0.5, inv_period=2, stats_steps=2)
    model, twin = grouped_net(), grouped_net()
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


def test_forwards_inside_torch_func_transforms_are_not_observed(float64):
    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3))
    opt = fastfoof.FOOF(model, lr=0.1, inv_period=3, stats_steps=1)
    x, y = torch.randn(5, 4), torch.randint(0, 3, (5,))
    params = {k: v.detach() for k, v in model.named_parameters()}

    def loss(p, xi, yi):
        return F.cross_entropy(functional_call(model, p, (xi[None],)), yi[None])

    per_sample = vmap(grad(loss), in_dims=(None, 0, 0))(params, x, y)  # per-sample gradients, train mode
    assert per_sample["0.weight"].shape == (5, 6, 4)
    assert all(opt.statistics.of(layer).samples == 0 for layer in opt.layers)
    opt.zero_grad()
    F.cross_entropy(model(x), y).backward()  # the next normal step works and sees only its own batch
    assert rel_error(observed_stat(opt, 0), gram64(x, model[0], True) / 5) <= 1e-12
    opt.step()


class Residual(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.l1, self.l2 = nn.Linear(8, 8), nn.Linear(8, 3)

    def forward(self, x):
        h = x * 1.0
        h += self.l1(h).float()  # under autocast: autograd saved l1's bf16 cast, so this is legal
        return self.l2(h)


@pytest.mark.parametrize("compiled", [False, True])
def test_an_input_changed_in_place_after_the_layer_gives_the_statistic_of_what_it_saw(compiled):
    model = Residual()
    opt = fastfoof.FOOF(model, lr=0.1, backend="reference")
    run = torch.compile(model, fullgraph=True) if compiled else model
    x = torch.randn(6, 8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = run(x)
    x.mul_(3.0)  # the user changes the batch in place before backward
    out.float().sum().backward()
    opt.step()  # the first fold: Σ/n is this batch's statistic
    expected = gram64((x / 3.0).bfloat16(), model.l1, True) / 6
    state = opt.state[model.l1.weight]
    assert rel_error(state["ema"] / state["ema_count"], expected) <= 1e-5


# ---- activation checkpointing ---------------------------------------------------------------------

class Blocks(nn.Module):
    def __init__(self, reentrant):
        super().__init__()
        torch.manual_seed(0)
        self.inner = nn.Sequential(*[nn.Sequential(nn.Linear(16, 16), nn.Tanh()) for _ in range(4)])
        self.reentrant = reentrant

    def forward(self, x):
        return checkpoint(self.inner, x, use_reentrant=self.reentrant)


@pytest.mark.parametrize("reentrant", [False, True])
def test_checkpointed_forwards_count_once(reentrant, float64):
    """A checkpointed segment's statistics equal the plain ones (pending: each inner layer saw the batch once),
    and so does what they fold into (a segment with BatchNorm, whose re-run must not count again)."""
    plain, ckpt = Blocks(reentrant), Blocks(reentrant)
    opts = [fastfoof.FOOF(m, lr=0.1) for m in (plain, ckpt)]
    x = torch.randn(8, 16, requires_grad=True)
    plain.inner(x).square().sum().backward()
    ckpt(x).square().sum().backward()
    for a, b in zip(*([opt.statistics.of(layer) for layer in opt.layers] for opt in opts)):
        assert a.samples == b.samples == 8
        assert rel_error(b.pending, a.pending) <= 1e-12
    model = grouped_net()
    twin = copy.deepcopy(model)
    x, y = grouped_net_batches(1)[0]
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


@pytest.mark.parametrize("observed", [True, False])
def test_non_reentrant_checkpointing_holds_no_inner_inputs(observed):
    model = Blocks(reentrant=False)
    opt = fastfoof.FOOF(model, lr=0.1, inv_period=4, stats_steps=1)
    seen = []  # the storage of each inner layer's input, weakly
    for block in model.inner:
        block[0].register_forward_hook(lambda m, args, out: seen.append(StorageWeakRef(args[0].untyped_storage())))
    x = torch.randn(8, 16, requires_grad=True)
    for step in range(3 if observed else 1):  # step 1 observes (first P); steps 2–3 do not (T=4, S=1)
        opt.zero_grad()
        seen.clear()
        out = model(x)
        gc.collect()
        alive = [ref for ref in seen[1:] if not ref.expired()]  # the first inner input is the segment's input
        assert not alive, f"{len(alive)} inner layer inputs held after the forward"
        out.square().sum().backward()
        opt.step()
    assert all(opt._ready(layer) for layer in opt.layers)


def test_reentrant_recompute_and_an_ordinary_call_each_count_once(float64):
    torch.manual_seed(0)
    lin = nn.Linear(5, 5)
    opt = fastfoof.FOOF(lin, lr=0.1)
    x = torch.randn(4, 5)
    h1 = lin(x)
    checkpoint(lin, h1, use_reentrant=True).sum().backward()
    assert opt.statistics.of(opt.layers[0]).samples == 8
    expected = (gram64(x, lin, True) + gram64(h1.detach(), lin, True)) / 8
    assert rel_error(observed_stat(opt, 0), expected) <= 1e-12


# ---- lifetimes ------------------------------------------------------------------------------------

@pytest.mark.smoke
@pytest.mark.usefixtures("float64")
def test_remove_hooks_detaches_them_and_stops_observation():
    model = grouped_net()
    opt = fastfoof.FOOF(model, lr=0.1, backend="reference")
    opt.remove_hooks()
    x, y = grouped_net_batches(1)[0]
    loss_fn(model, x, y).backward()
    assert all(not m._forward_hooks for m in model.modules())
    assert all(opt.statistics.of(layer).samples == 0 and not opt.statistics.recorded(layer) for layer in opt.layers)
    before = model[0].weight.detach().clone()
    opt.step()  # without statistics there is no P: U = G/λ
    assert "precond" not in opt.state[model[0].weight]
    assert torch.allclose(model[0].weight, before - 0.1 * model[0].weight.grad, rtol=0, atol=1e-15)
    train_step(model, opt, x, y)  # and it still trains, observing nothing
    assert all(opt.statistics.of(layer).samples == 0 for layer in opt.layers)


def test_an_unreferenced_optimizer_is_collected_with_its_hooks(monkeypatch):
    model = small_net()
    x, y = small_batch()
    calls = []
    original = ops.patch_gram_
    monkeypatch.setattr(ops, "patch_gram_", lambda *a, **k: calls.append(1) or original(*a, **k))
    alive = []
    for lr in (0.1, 0.03, 0.01, 0.003):  # an lr sweep on one model
        opt = fastfoof.FOOF(model, lr=lr, inv_period=5, stats_steps=1)
        alive.append(weakref.ref(opt))
        calls.clear()
        train_step(model, opt, x, y)
        assert len(calls) == 3  # this optimizer's three layers, none of the earlier optimizers'
        del opt
        gc.collect()
        assert all(ref() is None for ref in alive)
        assert not any(isinstance(h, LayerHook) for m in model.modules() for h in m._forward_hooks.values())


def _trains_as_a_plain_model(model):
    x, y = small_batch(seed=7)
    sgd = torch.optim.SGD(model.parameters(), lr=0.1)
    before = [p.detach().clone() for p in model.parameters()]
    train_step(model, sgd, x, y)
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters()))


@pytest.mark.parametrize("make_copy", ["deepcopy", "averaged_model", "torch_save", "pickle"])
def test_a_copy_of_the_model_trains_as_a_plain_model_and_carries_no_optimizer(make_copy):
    model = small_net()
    opt = fastfoof.FOOF(model, lr=0.1, inv_period=3, stats_steps=1)
    x, y = small_batch()
    train_step(model, opt, x, y)
    stats = [(opt.statistics.of(layer).samples, opt.statistics.of(layer).pending) for layer in opt.layers]
    if make_copy == "deepcopy":
        twin = copy.deepcopy(model)
    elif make_copy == "averaged_model":
        twin = AveragedModel(model)
    elif make_copy == "torch_save":
        buffer = io.BytesIO()
        torch.save(model, buffer)
        assert b"FOOF" not in buffer.getvalue() and b"momentum_buffer" not in buffer.getvalue()
        twin = torch.load(io.BytesIO(buffer.getvalue()), weights_only=False)
    else:
        data = pickle.dumps(model)
        assert b"FOOF" not in data
        twin = pickle.loads(data)
    _trains_as_a_plain_model(twin)
    for layer, (samples, stat) in zip(opt.layers, stats):  # the copy's forwards did not reach the optimizer
        assert opt.statistics.of(layer).samples == samples and opt.statistics.of(layer).pending is stat
    train_step(model, opt, x, y)  # and the original still trains with it
    assert all(opt.statistics.of(layer).samples == 0 for layer in opt.layers)  # folded at the step
    if make_copy == "averaged_model":
        twin.update_parameters(model)
