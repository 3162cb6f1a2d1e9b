"""The paper's claims at toy scale: App. F's one-step example and faster training than SGD."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fastfoof


def toy_problem():
    # Benzing 2022, App. F: inputs (3, 1) and (1, 0), labels 1 and −1, squared loss.
    x = torch.tensor([[3.0, 1.0], [1.0, 0.0]], dtype=torch.float64)
    y = torch.tensor([[1.0], [-1.0]], dtype=torch.float64)
    layer = nn.Linear(2, 1, bias=False).double()
    with torch.no_grad():
        layer.weight.zero_()
    return layer, x, y


def toy_loss(layer, x, y):
    return 0.5 * (layer(x) - y).pow(2).mean()


def test_toy_example_one_undamped_foof_step_reaches_the_optimum():
    layer, x, y = toy_problem()
    opt = fastfoof.FOOF(layer, lr=1.0, damping=1e-12, ema_decay=0.0, graft=None, backend="reference")
    toy_loss(layer, x, y).backward()
    opt.step()
    assert torch.allclose(layer.weight, torch.tensor([[-1.0, 4.0]], dtype=torch.float64), atol=1e-9, rtol=0)
    assert toy_loss(layer, x, y).item() < 1e-18


def test_toy_example_no_sgd_step_reaches_the_optimum():
    best = np.inf
    for lr in np.geomspace(1e-3, 1e3, 121):
        layer, x, y = toy_problem()
        opt = torch.optim.SGD(layer.parameters(), lr=float(lr))
        toy_loss(layer, x, y).backward()
        opt.step()
        best = min(best, toy_loss(layer, x, y).item())
    assert best > 0.05  # the loss starts at 0.5


def digits_net():
    return nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 16, 3, stride=2, padding=1),
                         nn.ReLU(), nn.Flatten(), nn.Linear(16 * 4 * 4, 10))


def train(make_opt, steps=60, batch=64):
    from sklearn.datasets import load_digits

    digits = load_digits()
    x = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.tensor(digits.target)
    torch.manual_seed(0)
    model = digits_net()
    opt = make_opt(model)
    g = torch.Generator().manual_seed(1)
    for _ in range(steps):
        idx = torch.randint(0, len(x), (batch,), generator=g)
        opt.zero_grad()
        F.cross_entropy(model(x[idx]), y[idx]).backward()
        opt.step()
    with torch.no_grad():
        return F.cross_entropy(model(x), y).item()


def test_foof_trains_a_conv_net_faster_than_sgd():
    sgd = min(train(lambda m, lr=lr: torch.optim.SGD(m.parameters(), lr=lr, momentum=0.9)) for lr in (0.1, 0.3))
    # the paper's FOOF (eq. 6, lr/λ = 1), as the other eq. 6 settings of the tests are (graft=None)
    foof = train(lambda m: fastfoof.FOOF(m, lr=0.1, damping=0.1, momentum=0.9, inv_period=10, stats_steps=2,
                                         graft=None))
    assert foof < 0.5 * sgd, (foof, sgd)
