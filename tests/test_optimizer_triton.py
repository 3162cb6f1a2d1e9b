"""FOOF with every operation on its Triton kernel tracks the reference backend (interpreter on CPU)."""
import copy

import torch
import torch.nn.functional as F
from torch import nn

import fastfoof
from fastfoof import ops

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"  # CPU: through TRITON_INTERPRET=1 (conftest)
# IEEE dots in the interpreter; on a GPU fp32 statistics and updates use TF32 (DESIGN §4 bound).
TOLERANCE = 5e-3 if DEVICE == "cuda" else 1e-5


def test_triton_backend_tracks_reference(monkeypatch):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 5, 3, padding=1), nn.BatchNorm2d(5), nn.ReLU(),
                          nn.Conv2d(5, 6, 3, stride=2, groups=1, bias=False), nn.ReLU(), nn.Flatten(),
                          nn.Linear(6 * 3 * 3, 7)).to(DEVICE)
    twin = copy.deepcopy(model)
    kw = dict(lr=0.1, damping=0.3, momentum=0.9, weight_decay=1e-2, inv_period=2, stats_steps=1)
    opt = fastfoof.FOOF(model, backend="triton", **kw)
    ref = fastfoof.FOOF(twin, backend="reference", **kw)
    called = set()
    implementation = ops.implementation

    def spy(op, backend, device):
        fn = implementation(op, backend, device)
        called.add((op, fn.__module__))
        return fn

    monkeypatch.setattr(ops, "implementation", spy)
    g = torch.Generator().manual_seed(1)
    for _ in range(4):
        x, y = torch.randn(6, 3, 8, 8, generator=g).to(DEVICE), torch.randint(0, 7, (6,), generator=g).to(DEVICE)
        for m, o in ((model, opt), (twin, ref)):
            o.zero_grad()
            F.cross_entropy(m(x), y).backward()
            o.step()
    for op, module in ops.TRITON_KERNELS.items():
        assert (op, module) in called  # every kernel really ran
    for p, q in zip(model.parameters(), twin.parameters()):
        assert ((p - q).norm() / q.norm()).item() < TOLERANCE
    for layer, twin_layer in zip(opt.layers, ref.layers):
        a, b = opt.state[layer.weight]["precond"], ref.state[twin_layer.weight]["precond"]
        assert ((a - b).norm() / b.norm()).item() < TOLERANCE
