"""A whole non-inversion, unobserved FOOF.step() captured in a CUDA graph and replayed (GPU only:
bench/gpu_check.sh runs it natively), with GradScaler's grad_scale and found_inf on the device."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fastfoof

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")


def setup():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                          nn.Conv2d(8, 16, 3, stride=2, padding=1, bias=False), nn.ReLU(), nn.Flatten(),
                          nn.Linear(16 * 4 * 4, 10)).cuda()
    opt = fastfoof.FOOF(model, lr=0.05, damping=0.5, momentum=0.9, weight_decay=1e-3, inv_period=10,
                        stats_steps=2, backend="triton")
    return model, opt


def backward(model, opt, x, y):
    opt.zero_grad(set_to_none=False)  # the gradients keep their addresses: the graph reads them
    F.cross_entropy(model(x), y).backward()


def test_whole_unobserved_step_is_captured_and_replayed():
    torch.backends.cudnn.deterministic = True
    gen = torch.Generator().manual_seed(1)
    x, y = torch.randn(8, 3, 8, 8, generator=gen).cuda(), torch.randint(0, 10, (8,), generator=gen).cuda()
    (model, opt), (twin, twin_opt) = setup(), setup()
    for _ in range(3):  # t = 1 (first inversion), 2, 3: tables and kernels exist afterwards
        for m, o in ((model, opt), (twin, twin_opt)):
            backward(m, o, x, y)
            o.step()
    for m, o in ((model, opt), (twin, twin_opt)):
        backward(m, o, x, y)
        o.grad_scale = torch.full((), 4.0, device="cuda")  # as GradScaler hands them over
        o.found_inf = torch.zeros((), device="cuda")
        for p in m.parameters():
            p.grad.mul_(4.0)  # scaled gradients
    graph = torch.cuda.CUDAGraph()
    torch.cuda.synchronize()
    with torch.cuda.graph(graph):
        opt.step()  # t = 4: outside the stats window of T = 10, S = 2, no inversion
    before = [p.detach().clone() for p in model.parameters()]
    graph.replay()
    twin_opt.step()
    torch.cuda.synchronize()
    for p, q, b in zip(model.parameters(), twin.parameters(), before):
        assert not torch.equal(p, b)
        assert ((p - q).norm() / q.norm()).item() <= 1e-6
    # found_inf set on the device: the replay writes nothing
    opt.found_inf.fill_(1.0)
    after = [p.detach().clone() for p in model.parameters()]
    buffers = [opt.state[p]["momentum_buffer"].clone() for p in model.parameters()]
    graph.replay()
    torch.cuda.synchronize()
    for p, a, buf, b in zip(model.parameters(), after, buffers, (opt.state[p]["momentum_buffer"] for p in model.parameters())):
        assert torch.equal(p, a) and torch.equal(buf, b)
