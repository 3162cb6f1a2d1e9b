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


def test_two_optimizers_on_one_device_build_their_kernel_plans_once_each():
    """Two models stepped alternately (a GAN's two nets, a teacher and a student), every kernel on: each
    optimizer keeps its own kernel plans (tables, workspaces), so once both have stepped nothing is built
    again; one set of plans shared between them, as module-wide caches were, rebuilds at every turn."""
    def run(share: bool, rounds: int = 5) -> tuple[list[list[int]], list]:
        torch.manual_seed(0)
        models = [nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 5)).to(DEVICE),
                  nn.Sequential(nn.Linear(3 * 8 * 8, 7), nn.Tanh(), nn.Linear(7, 5)).to(DEVICE)]
        # every step observed and folded, the periodic inversion past the test (a new P is a new table)
        opts = [fastfoof.FOOF(m, lr=0.1, momentum=0.9, inv_period=50, stats_steps=50, backend="triton")
                for m in models]
        if share:
            opts[1].kernel_plans = opts[0].kernel_plans
        g = torch.Generator().manual_seed(1)
        builds = []
        for _ in range(rounds):
            x, y = torch.randn(6, 3, 8, 8, generator=g).to(DEVICE), torch.randint(0, 5, (6,), generator=g).to(DEVICE)
            for m, o, inputs in zip(models, opts, (x, x.flatten(1))):
                o.zero_grad(set_to_none=False)  # the gradients keep their addresses between steps
                F.cross_entropy(m(inputs), y).backward()
                o.step()
            builds.append([sum(o.kernel_plans.builds.values()) for o in opts])
        return builds, opts

    own, opts = run(share=False)
    assert own[0][0] > 0 and own[0][1] > 0
    assert own[1:] == [own[1]] * (len(own) - 1)  # round 1: first P and the first fold; round 2: momentum's
    for o in opts:  # each table once: the fold's, the inversion's, the update's (the scalars: first step, then)
        assert all(n == 1 for name, n in o.kernel_plans.builds.items() if "scalars" not in name), \
            o.kernel_plans.builds
    shared, _ = run(share=True)
    assert shared[-1][0] - shared[1][0] >= 2 * (len(shared) - 2)  # each turn rebuilt the other's tables
