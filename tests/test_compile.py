"""FOOF with torch.compile (inductor on CPU): one full graph, no recompiles as the schedule moves
between observed and unobserved steps, and the same training as eager."""
import copy

import pytest
import torch
import torch._dynamo
import torch.nn.functional as F
from torch import nn

import fastfoof

KW = dict(lr=0.1, damping=0.5, momentum=0.9, weight_decay=1e-3, inv_period=3, stats_steps=2)
STEPS = 4 * KW["inv_period"]
# the cost floor options too: every layer (D' = 28, 28, 73 > 8) low-rank, statistics from 2 of 4 samples
OPTIONS = {"full": {}, "rank_stats_batch": dict(rank=4, stats_batch=2)}


def make_model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU(),
                         nn.Conv2d(6, 8, 3, stride=2, groups=2), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 3 * 3, 5))


def batches():
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(4, 3, 8, 8, generator=g), torch.randint(0, 5, (4,), generator=g)) for _ in range(STEPS)]


def attach(attach_mode, options):
    """(model to call, optimizer, module whose parameters train) for each way users combine them."""
    model = make_model()
    if attach_mode == "foof-then-compile":
        opt = fastfoof.FOOF(model, **KW, **options)
        return torch.compile(model, fullgraph=True), opt, model
    compiled = torch.compile(model, fullgraph=True)
    if attach_mode == "compile-then-foof":
        compiled(batches()[0][0])  # compiled before the hooks exist: FOOF must have it traced again
        opt = fastfoof.FOOF(model, **KW, **options)
        torch._dynamo.utils.counters.clear()
        return compiled, opt, model
    return compiled, fastfoof.FOOF(compiled, **KW, **options), model  # FOOF built on the compiled module


@pytest.fixture(autouse=True)
def fresh_dynamo():
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    yield
    torch._dynamo.config.error_on_recompile = False
    torch._dynamo.reset()


# every way of attaching with full FOOF; the options change the step, not how the hooks meet the model
@pytest.mark.parametrize("attach_mode, options", [(mode, "full") for mode in
                                                  ("foof-then-compile", "compile-then-foof", "foof-on-compiled")]
                         + [("foof-then-compile", "rank_stats_batch")])
def test_compiled_training_matches_eager_without_recompiles(attach_mode, options):
    eager = make_model()
    eager_opt = fastfoof.FOOF(eager, **KW, **OPTIONS[options])
    compiled, opt, model = attach(attach_mode, OPTIONS[options])
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


HOST_READS = ("item", "tolist", "cpu", "numpy", "__bool__", "__float__", "__int__", "__index__")


@pytest.mark.parametrize("options", list(OPTIONS))
def test_non_inversion_steps_read_nothing_back_under_grad_scaler(options):
    """No step but an inversion step reads the device (GradScaler's found_inf included): the fold and
    the update are masked on the device, and a skipped step moves nothing but t (DESIGN §1.5)."""
    torch.manual_seed(0)
    model = make_model()
    opt = fastfoof.FOOF(model, lr=0.1, damping=0.5, momentum=0.9, inv_period=5, stats_steps=2, backend="reference",
                        **OPTIONS[options])
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 8)
    step = opt.step
    guarded = []

    def read_nothing(*args, **kwargs):
        t = opt.schedule.steps + 1
        if t == 1 or t % opt.inv_period == 0:  # inversion steps may synchronise once
            return step(*args, **kwargs)
        saved = {name: getattr(torch.Tensor, name) for name in HOST_READS}

        def refuse(*_, **__):
            raise AssertionError(f"a host read in non-inversion step {t}")
        try:
            for name in HOST_READS:
                setattr(torch.Tensor, name, refuse)
            guarded.append(t)
            return step(*args, **kwargs)
        finally:
            for name, method in saved.items():
                setattr(torch.Tensor, name, method)

    opt.step = read_nothing
    for t, (x, y) in enumerate(batches()[:9], 1):
        opt.zero_grad()
        loss = F.cross_entropy(model(x), y)
        if t == 7:  # overflow: the scaler skips this step (t = 7 is outside the window, 9 inside)
            loss = loss * float("inf")
            before = copy.deepcopy((model.state_dict(), opt.state_dict()["state"]))
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
        if t == 7:
            after = (model.state_dict(), opt.state_dict()["state"])
            for key, value in before[0].items():
                assert torch.equal(after[0][key], value), key
            for index, state in before[1].items():
                for key, value in state.items():  # (tensors, and the names of placeholders)
                    same = torch.equal if isinstance(value, torch.Tensor) else str.__eq__
                    assert same(after[1][index][key], value), (index, key)
    assert guarded == [2, 3, 4, 6, 7, 8, 9] and opt.schedule.steps == 9
    assert all(torch.isfinite(p).all() for p in model.parameters())


@pytest.mark.parametrize("compiled_part", ["opt.step", "train_step"])
def test_compiled_step_equals_eager(compiled_part):
    """torch.compile(opt.step), and a compiled training step that calls opt.step(): the step runs eagerly
    inside (it is excluded from compilation), so t counts every step and training equals eager (bit for bit
    where only the step is compiled)."""
    eager, model = make_model(), make_model()
    eager_opt, opt = fastfoof.FOOF(eager, **KW), fastfoof.FOOF(model, **KW)

    def train_step(m, o, step, x, y):
        o.zero_grad()
        F.cross_entropy(m(x), y).backward()
        step()

    if compiled_part == "opt.step":
        step, run = torch.compile(opt.step), train_step
    else:
        step, run = opt.step, torch.compile(train_step)
    for x, y in batches():
        run(model, opt, step, x, y)
        train_step(eager, eager_opt, eager_opt.step, x, y)
    assert opt.schedule.steps == eager_opt.schedule.steps == STEPS
    for p, q in zip(model.parameters(), eager.parameters()):  # inductor's forward and backward round differently
        assert torch.equal(p, q) if compiled_part == "opt.step" else ((p - q).norm() / q.norm()).item() <= 1e-5
