"""The small models and batches the optimizer tests train, and the training steps they take."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

import fastfoof


def grouped_net(seed=0):
    """A conv with bias and BatchNorm, a strided grouped conv without bias, a Linear (D' = 28, 12 in each of
    3 groups, 73)."""
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(3, 6, 3, padding=1), nn.BatchNorm2d(6), nn.Tanh(),
        nn.Conv2d(6, 6, (3, 2), stride=2, groups=3, bias=False), nn.Tanh(), nn.Flatten(),
        nn.Linear(6 * 3 * 4, 5),
    )


def grouped_net_batches(n, batch=4, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(batch, 3, 7, 9, generator=g), torch.randint(0, 5, (batch,), generator=g)) for _ in range(n)]


def conv_net(dtype=torch.float32, seed=0):
    """A padded conv and a Linear head (D' = 28 and 121)."""
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.Tanh(), nn.Flatten(), nn.Linear(4 * 5 * 6, 3)).to(dtype)


def conv_net_batch(seed, n=5, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, 5, 6, generator=g).to(dtype), torch.randint(0, 3, (n,), generator=g)


def small_net(seed=0, batch_norm=True):
    """Two convs (the first padded, with BatchNorm or not, the second strided) and a Linear head."""
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(2, 4, 3, padding=1), nn.BatchNorm2d(4) if batch_norm else nn.Identity(), nn.ReLU(),
                         nn.Conv2d(4, 3, 3, stride=2), nn.Flatten(), nn.Linear(3 * 2 * 2, 5))


def small_batch(n=6, seed=1, dtype=None):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 2, 5, 5, generator=g, dtype=dtype), torch.randint(0, 5, (n,), generator=g)


def loss_fn(model, x, y):
    return F.cross_entropy(model(x), y)


def train_step(model, opt, x, y):
    opt.zero_grad()
    F.cross_entropy(model(x), y).backward()
    opt.step()


def conv_net_step(model, opt, seed, dtype=torch.float32):
    """One step of `conv_net` on `conv_net_batch(seed)`; returns the batch's input."""
    x, y = conv_net_batch(seed, dtype=dtype)
    train_step(model, opt, x, y)
    return x


def run_foof(model, batches, **kw):
    """FOOF on the reference ops over the batches, one step each."""
    opt = fastfoof.FOOF(model, backend="reference", **kw)
    for x, y in batches:
        train_step(model, opt, x, y)
    return opt


def assert_same_params(a, b, tol):
    for (name, p), q in zip(a.named_parameters(), b.parameters()):
        err = ((p - q).norm() / q.norm()).item()
        assert err <= tol, (name, err)
