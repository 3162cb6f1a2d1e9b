"""Mixed precision: GradScaler's skipped steps change nothing and its scale never reaches the statistics
(DESIGN §1.5, §6), statistics under autocast are of what the layer saw, in float32 (§1.2), and a
low-precision parameter is rounded once from the float32 step (§1.4)."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fastfoof
from fastfoof import reference
from helpers import position_mean_gram64
from nets import grouped_net, grouped_net_batches, loss_fn, small_batch, small_net


@pytest.mark.smoke
@pytest.mark.usefixtures("float64")
def test_grad_scaler_skipped_step_touches_nothing():
    torch.set_default_dtype(torch.float32)  # restored by the fixture
    model, twin = grouped_net().float(), grouped_net().float()
    (x, y), (x2, y2) = grouped_net_batches(2)
    x, x2 = x.float(), x2.float()
    opt = fastfoof.FOOF(model, lr=0.1, momentum=0.9, backend="reference")
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 8)
    (loss_fn(model, x, y) * float("inf")).backward()  # overflow: the scaler must skip this step
    scaler.scale(torch.zeros((), requires_grad=True)).backward()
    scaler.step(opt)
    scaler.update()
    assert opt.schedule.steps == 1  # t counts the skipped step; nothing else moved
    state = opt.state[model[0].weight]
    assert state["ema_count"].item() == 0 and "precond" not in state and "momentum_buffer" not in state
    assert all("momentum_buffer" not in opt.state[p] for p in model.parameters())
    opt.zero_grad()
    scaler.scale(loss_fn(model, x2, y2)).backward()
    scaler.step(opt)
    scaler.update()
    ref = fastfoof.FOOF(twin, lr=0.1, momentum=0.9, backend="reference")
    loss_fn(twin, x2, y2).backward()
    ref.step()
    for p, q in zip(model.parameters(), twin.parameters()):
        assert torch.allclose(p, q, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("damping_mode, backend", [("heuristic", "reference"), ("factor", "reference"),
                                                   ("exact", "reference"), ("heuristic", "triton")])
def test_kfac_under_a_power_of_two_grad_scale_changes_nothing(damping_mode, backend):
    x, y = small_batch(n=8)
    results = []
    for scale in (None, 2.0 ** 16):
        model = small_net()
        opt = fastfoof.KFAC(model, lr=0.3, damping_mode=damping_mode, inv_period=2, stats_steps=2, backend=backend)
        scaler = torch.amp.GradScaler("cpu", init_scale=scale, growth_interval=2) if scale else None
        for _ in range(4):
            opt.zero_grad()
            loss = F.cross_entropy(model(x), y)
            if scaler is None:
                loss.backward()
                opt.step()
            else:
                scaler.scale(loss).backward()
                scaler.step(opt)
                scaler.update()  # the scale grows every 2 steps: G must not jump with it
        if scaler is not None:
            assert scaler.get_scale() > scale
        results.append([p.detach().clone() for p in model.parameters()])
    for a, b in zip(*results):
        assert torch.equal(a, b)


@pytest.mark.usefixtures("float64")
def test_statistics_under_autocast_stay_float32():
    torch.set_default_dtype(torch.float32)  # restored by the fixture
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten(), nn.Linear(4 * 5 * 7, 3))
    x = torch.randn(4, 3, 7, 9)
    opt = fastfoof.FOOF(model, lr=0.1, backend="reference")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        h = model[0](input=x).flatten(1)  # inputs passed by keyword reach the hooks too
        out = model[2](input=h)
    out.float().sum().backward()
    for layer, inp in zip(opt.layers, (x, h)):
        stat = opt.statistics.of(layer).pending
        assert stat.dtype == torch.float32
        ref = position_mean_gram64(inp.bfloat16(), layer.module, True)  # of what the layer saw: its autocast input
        assert ((stat - ref).norm() / ref.norm()).item() <= 1e-5


def test_bf16_parameter_is_rounded_once_from_the_fp32_step():
    # W·(1 − η·wd) − η·D is formed in fp32 and rounded to bf16 once (DESIGN §1.4)
    g = torch.Generator().manual_seed(0)
    p = torch.randn(64, 37, generator=g).to(torch.bfloat16)
    u = torch.randn(64, 37, generator=g)
    group = dict(lr=0.37, momentum=0.0, dampening=0.0, nesterov=False, weight_decay=0.7)
    exact = p.double() * (1 - 0.37 * 0.7) - 0.37 * u.double()
    reference.sgd_step_(p, u, None, group)
    ulp = 2.0 ** (torch.floor(torch.log2(exact.abs())) - 7)  # bf16 spacing at |exact|
    assert ((p.double() - exact).abs() <= 0.5 * ulp + exact.abs() * 2.0 ** -23).all()
