"""fastfoof.NaturalGradient against the explicit (λI + F)⁻¹ g built from torch.func per-example gradients in
float64 (DESIGN §8, the paper's App. B), and its torch.optim conventions."""
import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, grad, vmap

import fastfoof
from fastfoof import natural_gradient
from helpers import rel_error

BATCH, CLASSES = 7, 5


def mlp():
    return nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 6, bias=False), nn.Tanh(), nn.Linear(6, CLASSES))


def conv_net():
    # strided and padded, grouped with a non-square kernel, then a Linear: output positions R > 1
    return nn.Sequential(nn.Conv2d(3, 4, 3, stride=2, padding=1), nn.Tanh(),
                         nn.Conv2d(4, 6, (3, 2), padding=(1, 0), groups=2), nn.Tanh(), nn.Flatten(),
                         nn.Linear(6 * 4 * 2, CLASSES))


def conv1d_net():
    return nn.Sequential(nn.Conv1d(2, 3, 3, dilation=2, padding=1, padding_mode="reflect"), nn.ReLU(),
                         nn.Conv1d(3, 4, 2, stride=3, bias=False), nn.Tanh(), nn.Flatten(), nn.Linear(4 * 3, CLASSES))


def sequence_net():
    # a Linear on [B, N, F]: N positions per sample, and an in-place activation on its output
    return nn.Sequential(nn.Linear(5, 6), nn.ReLU(inplace=True), nn.Flatten(), nn.Linear(3 * 6, CLASSES))


NETS = {"mlp": (mlp, (5,)), "conv": (conv_net, (3, 7, 5)), "conv1d": (conv1d_net, (2, 11)),
        "sequence": (sequence_net, (3, 5))}


def make(name, seed=0):
    make_net, shape = NETS[name]
    torch.manual_seed(seed)
    model = make_net().double()
    g = torch.Generator().manual_seed(seed + 1)
    x = torch.randn(BATCH, *shape, generator=g, dtype=torch.float64)
    y = torch.randint(0, CLASSES, (BATCH,), generator=g)
    return model, x, y


def ng_step(model, x, y, damping, fisher, block_diagonal):
    """One step at lr 1 without momentum: U = W_before − W_after per parameter, and the Fisher's labels."""
    opt = fastfoof.NaturalGradient(model, lr=1.0, damping=damping, fisher=fisher, block_diagonal=block_diagonal)
    before = [p.detach().clone() for p in model.parameters()]
    logits = model(x)
    labels = opt.backward_fisher(logits, y)
    F.cross_entropy(logits, y).backward()
    opt.step()
    return [b - p.detach() for b, p in zip(before, model.parameters())], labels, opt


def explicit_update(model, x, y, damping, fisher, block_diagonal, labels):
    """(λI + F)⁻¹ g with F = Σ_k w_k g_k g_kᵀ from per-example gradients (torch.func), as a dense P×P system
    over the parameters that require grad (their order in `model.parameters()`)."""
    trained = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
    names = [name for name, _ in trained]
    params = {name: p.detach() for name, p in trained}

    def loss(params, xi, yi):
        return F.cross_entropy(functional_call(model, params, (xi[None],)), yi[None])

    def per_example(targets):  # [B, P]
        grads = vmap(grad(loss), in_dims=(None, 0, 0))(params, x, targets)
        return torch.cat([grads[name].reshape(BATCH, -1) for name in names], 1)

    with torch.no_grad():
        probs = functional_call(model, params, (x,)).softmax(-1)
    if fisher == "full":
        columns = [per_example(torch.full_like(y, c)) * (probs[:, c:c + 1] / BATCH).sqrt() for c in range(CLASSES)]
    else:
        columns = [per_example(labels) / BATCH ** 0.5]
    g = torch.cat([t.reshape(-1) for t in torch.autograd.grad(loss_of(model, x, y), [p for _, p in trained])])
    cols = torch.cat(columns).T  # [P, K]
    fisher_matrix = cols @ cols.T
    if block_diagonal:  # a layer's weight and bias are one block
        layer = torch.cat([torch.full((p.numel(),), hash(name.rsplit(".", 1)[0])) for name, p in trained])
        fisher_matrix = fisher_matrix * (layer[:, None] == layer[None, :])
    u = torch.linalg.solve(damping * torch.eye(len(g), dtype=torch.float64) + fisher_matrix, g)
    return list(u.split([p.numel() for _, p in trained]))


def loss_of(model, x, y):
    return F.cross_entropy(model(x), y)


@pytest.mark.parametrize("block_diagonal", [False, True])
@pytest.mark.parametrize("fisher", ["mc", "full", "empirical"])
@pytest.mark.parametrize("net", list(NETS))
def test_step_is_the_explicit_damped_natural_gradient(net, fisher, block_diagonal):
    model, x, y = make(net)
    oracle = copy.deepcopy(model)  # the copy carries no hooks
    ours, labels, opt = ng_step(model, x, y, 0.05, fisher, block_diagonal)
    if fisher == "mc":
        assert labels.shape == y.shape and not torch.equal(labels, y)  # drawn from the model
    expected = explicit_update(oracle, x, y, 0.05, fisher, block_diagonal, labels)
    for (name, p), u, e in zip(model.named_parameters(), ours, expected):
        assert rel_error(u, e.reshape(p.shape)) <= 1e-10, (name, rel_error(u, e.reshape(p.shape)))
    assert opt.diagnostics == {"cholesky_retries": 0, "cholesky_failures": 0}


@pytest.mark.parametrize("form", ["pairs", "per_example"])
def test_both_gram_forms_in_small_blocks(monkeypatch, form):
    # the conv layers' Grams through each form, the pair form in blocks of one sample
    monkeypatch.setattr(natural_gradient, "per_example_cheaper", lambda a, e: form == "per_example")
    monkeypatch.setattr(natural_gradient, "WORKSPACE_ELEMENTS", 1)
    model, x, y = make("conv")
    oracle = copy.deepcopy(model)
    ours, _, _ = ng_step(model, x, y, 0.01, "full", False)
    expected = explicit_update(oracle, x, y, 0.01, "full", False, None)
    for p, u, e in zip(model.parameters(), ours, expected):
        assert rel_error(u, e.reshape(p.shape)) <= 1e-10


def test_cost_model_picks_per_example_gradients_for_wide_maps():
    # a 3x3 conv of 16 channels on an 8x8 map: R² = 4096 against O·D' = 16·145
    a, e = torch.zeros(1, 32, 64, 145), torch.zeros(1, 1, 32, 64, 16)
    assert natural_gradient.per_example_cheaper(a, e)
    assert not natural_gradient.per_example_cheaper(a[:, :, :1], e[:, :, :, :1])  # Linear: R = 1


def test_frozen_weight_steps_its_bias_with_the_fisher_of_what_trains():
    model, x, y = make("conv")
    model[2].weight.requires_grad_(False)
    oracle = copy.deepcopy(model)
    ours, _, _ = ng_step(model, x, y, 0.05, "full", False)
    assert not ours[2].any()
    del ours[2]
    expected = explicit_update(oracle, x, y, 0.05, "full", False, None)
    for u, e in zip(ours, expected):
        assert rel_error(u, e.reshape(u.shape)) <= 1e-10


def digits(examples):
    from sklearn.datasets import load_digits

    data = load_digits()
    return (torch.tensor(data.data[:examples], dtype=torch.float32) / 16,
            torch.tensor(data.target[:examples], dtype=torch.int64))


def full_batch_loss(make_opt, x, y, steps, fisher_labels=False):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 32), nn.Tanh(), nn.Linear(32, 10))
    opt = make_opt(model)
    for _ in range(steps):
        opt.zero_grad()
        logits = model(x)
        if fisher_labels:
            opt.backward_fisher(logits, y)
        F.cross_entropy(logits, y).backward()
        opt.step()
    with torch.no_grad():
        return F.cross_entropy(model(x), y).item()


def test_full_batch_natural_gradient_beats_sgd_on_1000_examples():
    # the paper's check of its NG (App. B): full batch, each at its best lr of a small grid, 20 steps
    torch.set_num_threads(1)
    x, y = digits(1000)
    sgd = min(full_batch_loss(lambda m, lr=lr: torch.optim.SGD(m.parameters(), lr=lr, momentum=0.9), x, y, 20)
              for lr in (0.3, 1.0, 3.0))
    ng = min(full_batch_loss(lambda m, lr=lr: fastfoof.NaturalGradient(m, lr=lr, damping=0.01), x, y, 20, True)
             for lr in (0.1, 0.3))
    assert ng < 0.5 * sgd, (ng, sgd)


def train_steps(model, opt, batches, fisher_labels=True):
    losses = []
    for x, y in batches:
        opt.zero_grad()
        logits = model(x)
        if fisher_labels:
            opt.backward_fisher(logits, y)
        loss = F.cross_entropy(logits, y)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def digit_batches(count, size=48, seed=0):
    x, y = digits(1797)
    g = torch.Generator().manual_seed(seed)
    return [(x[idx].view(-1, 1, 8, 8), y[idx]) for idx in (torch.randint(0, len(x), (size,), generator=g)
                                                            for _ in range(count))]


def digits_conv_net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 6, 3, padding=1), nn.ReLU(), nn.Conv2d(6, 8, 3, stride=2, padding=1),
                         nn.ReLU(), nn.Flatten(), nn.Linear(8 * 4 * 4, 10))


@pytest.mark.parametrize("block_diagonal", [False, True])
def test_trains_a_conv_net(block_diagonal):
    # full batch: mini-batch NG at a batch this small is erratic (the paper's point)
    model = digits_conv_net()
    opt = fastfoof.NaturalGradient(model, lr=0.3, damping=0.1, block_diagonal=block_diagonal)
    losses = train_steps(model, opt, digit_batches(1, size=256) * 15)
    assert losses[-1] < 0.1 * losses[0], losses


def test_state_dict_resumes_bit_for_bit():
    # mc labels, momentum, nesterov and weight decay: the generator and the buffers travel
    kw = dict(lr=0.2, damping=0.01, momentum=0.9, nesterov=True, weight_decay=1e-3)
    batches = digit_batches(6, size=20)
    model = digits_conv_net()
    opt = fastfoof.NaturalGradient(model, **kw)
    train_steps(model, opt, batches[:3])
    saved = copy.deepcopy((model.state_dict(), opt.state_dict()))
    straight = train_steps(model, opt, batches[3:])
    twin = digits_conv_net()
    twin.load_state_dict(saved[0])
    resumed_opt = fastfoof.NaturalGradient(twin, **kw)
    resumed_opt.load_state_dict(saved[1])
    assert train_steps(twin, resumed_opt, batches[3:]) == straight
    for p, q in zip(model.parameters(), twin.parameters()):
        assert torch.equal(p, q)
    with pytest.raises(ValueError, match="NaturalGradient"):
        fastfoof.KFAC(twin, lr=0.1).load_state_dict(saved[1])
    with pytest.raises(ValueError, match="KFAC"):
        resumed_opt.load_state_dict(fastfoof.KFAC(twin, lr=0.1).state_dict())


@pytest.mark.parametrize("fisher", ["mc", "full", "empirical"])
def test_a_diverging_lr_raises_nothing(fisher):
    model = digits_conv_net()
    opt = fastfoof.NaturalGradient(model, lr=1e8, damping=1e-3, fisher=fisher, momentum=0.9)
    with pytest.warns(RuntimeWarning, match="cholesky"):
        train_steps(model, opt, digit_batches(4, size=12))
    assert not all(p.isfinite().all() for p in model.parameters())
    assert opt.diagnostics["cholesky_failures"] >= 1


def test_step_closure_returns_the_loss():
    model, x, y = make("mlp")
    opt = fastfoof.NaturalGradient(model, lr=0.1, damping=0.1)

    def closure():
        opt.zero_grad()
        logits = model(x)
        opt.backward_fisher(logits)
        loss = F.cross_entropy(logits, y)
        loss.backward()
        return loss

    first = opt.step(closure)
    assert opt.step(closure) < first


def test_step_without_backward_fisher_says_what_to_call():
    model, x, y = make("mlp")
    opt = fastfoof.NaturalGradient(model, lr=0.1, damping=0.1)
    F.cross_entropy(model(x), y).backward()
    with pytest.raises(RuntimeError, match=r"backward_fisher\(logits"):
        opt.step()


@pytest.mark.parametrize("kw,name", [
    (dict(lr=-0.1), "lr"), (dict(lr="0.1"), "lr"), (dict(damping=0.0), "damping"), (dict(damping=None), "damping"),
    (dict(fisher="type2"), "fisher"), (dict(block_diagonal=1), "block_diagonal"), (dict(momentum=-1.0), "momentum"),
    (dict(weight_decay=-1e-4), "weight_decay"), (dict(nesterov=True), "nesterov"),
])
def test_invalid_arguments_raise_value_error_naming_them(kw, name):
    with pytest.raises(ValueError, match=name):
        fastfoof.NaturalGradient(make("mlp")[0], **{"lr": 0.1, "damping": 0.1, **kw})


def test_missing_lr_or_damping_and_foreign_parameters():
    model = nn.Sequential(nn.Linear(4, 5), nn.BatchNorm1d(5), nn.Linear(5, 3))
    for kw, missing in ((dict(damping=0.1), "lr"), (dict(lr=0.1), "damping")):
        with pytest.raises(TypeError, match=missing):
            fastfoof.NaturalGradient(model, **kw)
    with pytest.raises(ValueError, match=r"params: .*1\.weight, 1\.bias"):
        fastfoof.NaturalGradient(model, lr=0.1, damping=0.1)
    opt = fastfoof.NaturalGradient(model, [model[0].weight], lr=0.1, damping=0.1)
    with pytest.raises(ValueError, match="params"):
        opt.add_param_group({"params": [model[1].weight]})
    with pytest.raises(ValueError, match="targets"):
        fastfoof.NaturalGradient(model[:1], lr=0.1, damping=0.1, fisher="empirical").backward_fisher(
            model[0](torch.randn(2, 4)))


def test_hooks_do_not_keep_the_optimizer_alive_nor_travel_with_copies():
    import gc
    import weakref

    model, x, y = make("mlp")
    opt = fastfoof.NaturalGradient(model, lr=0.1, damping=0.1)
    twin = copy.deepcopy(model)
    ng_step(twin, x, y, 0.1, "mc", False)  # the copy trains with its own optimizer only
    assert not opt._forwards
    alive = weakref.ref(opt)
    del opt
    gc.collect()
    assert alive() is None and not model[0]._forward_hooks


def test_params_of_some_layers_make_the_fisher_of_those():
    model, x, y = make("mlp")
    oracle = copy.deepcopy(model)
    for p in oracle[:4].parameters():  # the oracle's F and g: the last layer's parameters only
        p.requires_grad_(False)
    before = [p.detach().clone() for p in model.parameters()]
    opt = fastfoof.NaturalGradient(model, model[4].parameters(), lr=1.0, damping=0.05, fisher="full")
    logits = model(x)
    opt.backward_fisher(logits)
    F.cross_entropy(logits, y).backward()
    opt.step()
    expected = explicit_update(oracle, x, y, 0.05, "full", False, None)
    for b, p in zip(before[:-2], list(model.parameters())[:-2]):
        assert torch.equal(b, p)
    for b, p, e in zip(before[-2:], list(model.parameters())[-2:], expected):
        assert rel_error(b - p.detach(), e.reshape(p.shape)) <= 1e-10
