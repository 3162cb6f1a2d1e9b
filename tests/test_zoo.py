"""Real models from torchvision and timm (issue 18, "Layers FOOF cannot precondition as it believes").

FOOF preconditions a Linear/Conv layer's weight gradient with its input patches' second moment; that
is only right if the module computes `out = Ŵ·a + b` from those patches with its own weight and bias,
and if its weight's gradient is `A·Eᵀ` (DESIGN §1.1). For a curated list of small models, each
covering a kind of layer seen in the zoo survey (`bench/zoo_survey.py`), FOOF and KFAC train 4 steps
and:

(a) the parameters stay finite and nothing raises;
(b) every layer the optimizer preconditions computes what FOOF assumes: in float64, the layer's patch
    vectors (the test's own, F.unfold / `helpers.patches64`, after a TF-"SAME" padding for timm's
    dynamically padded convolutions) reproduce its output with its raw weight and bias, and its
    weight's gradient is Σ Eᵀ·A (E the output gradient), for every forward call;
(c) every Linear/Conv module that is not preconditioned is named in a RuntimeWarning;
(d) FOOF's first statistic of each preconditioned layer is those patches' gram over the batch.
"Preconditioned" means having a preconditioner after the first step (DESIGN §1.5): a layer without
one steps with G/λ and falls under (c).

Skipped where torchvision or timm cannot be imported (CI). What failed before the fixes of issue 18:
(a) and (d) for timm's Conv2dSame (tf_mobilenetv3_small_075: pads inside forward, FOOF's patch
extraction raised, KFAC divided by 0 positions); (b) for timm's weight-standardised StdConv2d /
ScaledStdConv2d (output ≠ Ŵ·a); (c) for nn.MultiheadAttention.out_proj, torchvision Swin's qkv/proj
and timm's fused qkv with separate q/v biases (their forward never runs: the weight goes to F.linear,
and they stepped with G/λ without a word), and for KFAC on Swin V2's cpb_mlp.0 (a Linear on a 4-D
input followed by ReLU(inplace=True): the tensor hook on its output never fired, so G was never
observed).
"""
from __future__ import annotations

import math
import re
import sys
import traceback
import warnings
from dataclasses import dataclass, field
from functools import lru_cache, partial
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from helpers import batched_and_padded, importorskip, patches64

torchvision = importorskip("torchvision")
timm = importorskip("timm")

import fastfoof  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
from zoo_survey import Recorder  # noqa: E402  (one recorder for the survey and this test)

LAYERS = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)
CLASSES = 10
BATCH = 2
TOL64 = 1e-9   # float64 reconstruction of a layer's output / gradient
TOL_STAT = 1e-4  # FOOF's float32 statistic against the float64 gram


# ---- the only places that read the optimizer's internals: adapt here when its API changes -------

def preconditioned(opt) -> list[str]:
    """Names of the layers the optimizer preconditions: those with a preconditioner after its first
    step (a layer without one steps with U = G/λ, DESIGN §1.5, and must be named in a warning)."""
    return [layer.name for layer in opt._active if opt._ready(layer)]


def input_statistic(opt, name: str) -> tuple[torch.Tensor, bool] | None:
    """FOOF's bias-corrected input statistic Σ/n of a layer ([groups, D', D']) and whether it has the
    bias row; after the first step, that is the first batch's C (DESIGN §1.2)."""
    for layer in opt._active:
        if layer.name == name:
            state = opt.state.get(layer.weight, {})
            if "ema" not in state or not state["ema_count"] > 0:
                return None
            return state["ema"] / state["ema_count"], layer.bias_row
    return None


# ---- the models ---------------------------------------------------------------------------------

def _tiny_tv_vit():
    # torchvision's ViT (nn.MultiheadAttention: out_proj's forward never runs), at a tiny width
    from torchvision.models.vision_transformer import VisionTransformer
    return VisionTransformer(image_size=32, patch_size=8, num_layers=2, num_heads=2, hidden_dim=32, mlp_dim=64,
                             num_classes=CLASSES)


def _tiny_tv_swin_v2():
    # torchvision's Swin V2: qkv/proj weights go to F.linear (forward never runs); cpb_mlp.0 is a Linear
    # on a 4-D input followed by ReLU(inplace=True), so a tensor hook on its output never fires (KFAC's G)
    from torchvision.models.swin_transformer import PatchMergingV2, SwinTransformer, SwinTransformerBlockV2
    return SwinTransformer(patch_size=[4, 4], embed_dim=16, depths=[1, 1], num_heads=[1, 2], window_size=[4, 4],
                           stochastic_depth_prob=0.0, num_classes=CLASSES, block=SwinTransformerBlockV2,
                           downsample_layer=PatchMergingV2)


def _tiny_bit():
    # BiT ResNetV2 (weight-standardised StdConv2d, as in resnetv2_50x1_bit), shrunk
    from timm.layers import GroupNormAct, StdConv2d
    from timm.models.resnetv2 import ResNetV2
    return ResNetV2(layers=[1, 1, 1, 1], channels=(32, 64, 128, 256), stem_chs=16, stem_type="fixed",
                    conv_layer=partial(StdConv2d, eps=1e-8), norm_layer=partial(GroupNormAct, num_groups=4),
                    num_classes=CLASSES)


def _timm(name, **kwargs):
    return lambda: timm.create_model(name, pretrained=False, num_classes=CLASSES, **kwargs)


def _tv(name, **kwargs):
    return lambda: torchvision.models.get_model(name, weights=None, num_classes=CLASSES, **kwargs)


# id -> (builder, input size, what it covers)
MODELS = {
    # clean: every Linear/Conv reproduces its output and gradient
    "tv_shufflenet_v2_x0_5": (_tv("shufflenet_v2_x0_5"), 64, "grouped/depthwise convs, channel shuffle"),
    "tv_squeezenet1_1": (_tv("squeezenet1_1"), 64, "convs with bias, no BatchNorm"),
    "tv_mnasnet0_5": (_tv("mnasnet0_5"), 64, "depthwise-separable convs"),
    "timm_test_vit": (_timm("test_vit", img_size=64), 64, "timm ViT: patch-embed conv, Linear on [B, N, C]"),
    "timm_test_convnext": (_timm("test_convnext"), 64, "7×7 depthwise conv, Linear MLP in channels-last"),
    "timm_lcnet_050": (_timm("lcnet_050"), 64, "MobileNetV3-style, SE convs with bias"),
    "timm_test_coatnet": (_timm("test_coatnet", img_size=64), 64, "CoAtNet: MBConv + relative attention"),
    "timm_test_efficientnet": (_timm("test_efficientnet"), 64, "EfficientNet (static 'same' padding)"),
    # broken today
    "timm_tf_mobilenetv3_small_075": (_timm("tf_mobilenetv3_small_075"), 64,
                                      "Conv2dSame: padding=0, pads (asymmetrically) inside forward"),
    "timm_test_nfnet": (_timm("test_nfnet"), 64, "ScaledStdConv2d: conv with a standardised, gained weight"),
    "timm_bit_tiny": (_tiny_bit, 64, "StdConv2d: conv with a standardised weight"),
    "tv_vit_tiny": (_tiny_tv_vit, 32, "nn.MultiheadAttention: out_proj.weight used by F.linear, forward never runs"),
    "tv_swin_v2_tiny": (_tiny_tv_swin_v2, 32, "F.linear(x, qkv.weight) / proj.weight: forward never runs; "
                        "cpb_mlp.0 (4-D input, then ReLU(inplace=True)): an output tensor hook never fires"),
    "timm_beit_tiny": (_timm("beit_base_patch16_224", img_size=32, patch_size=8, embed_dim=32, depth=1,
                             num_heads=2), 32,
                       "fused qkv Linear with separate q/v biases: F.linear(x, qkv.weight, bias), forward never runs"),
}


def _build(case: str) -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    builder, size, _ = MODELS[case]
    torch.manual_seed(0)
    model = builder().train()
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():  # zero-initialised gammas and biases would make many gradients vacuously zero
        for p in model.parameters():
            if p.numel() and not p.any():
                p.copy_(0.1 * torch.randn(p.shape, generator=gen, dtype=p.dtype))
    x = torch.randn(BATCH, 3, size, size, generator=gen)
    y = torch.randint(0, CLASSES, (BATCH,), generator=gen)
    return model, x, y


def _loss(out, y):
    outs = [out] if isinstance(out, torch.Tensor) else [o for o in out if isinstance(o, torch.Tensor)]
    return sum(F.cross_entropy(o.float(), y) for o in outs if o.dim() == 2 and o.shape[-1] == CLASSES)


# ---- the test's own view of a layer (recorded by the zoo survey's Recorder) ------------------------

def _same_pad(x: torch.Tensor, m: nn.Module) -> torch.Tensor:
    """TensorFlow 'SAME' padding of x for conv m (the extra pixel on the right/bottom)."""
    pads = []
    for n, k, s, d in zip(reversed(x.shape[2:]), reversed(m.kernel_size), reversed(m.stride), reversed(m.dilation)):
        total = max((math.ceil(n / s) - 1) * s + (k - 1) * d + 1 - n, 0)
        pads += [total // 2, total - total // 2]
    return F.pad(x, pads)


def true_patches(x: torch.Tensor, m: nn.Module, bias: bool) -> torch.Tensor:
    """[groups, N, D'] float64 patch vectors of the input the module's convolution really sees."""
    from timm.layers import Conv2dSame, ScaledStdConv2dSame, StdConv2dSame
    from timm.layers.conv2d_same import Conv2dSameExport
    if isinstance(m, (Conv2dSame, Conv2dSameExport)) or getattr(m, "same_pad", False) and \
            isinstance(m, (StdConv2dSame, ScaledStdConv2dSame)):
        x = _same_pad(x.double(), m)
    if not isinstance(m, nn.Conv2d):
        return patches64(x, m, bias)
    # Conv2d: F.unfold, the im2col whose order DESIGN §1.1 prescribes (patches64's identity-filter
    # convolution runs one group at a time in float64 on CPU: minutes for a depthwise network)
    x, padding = batched_and_padded(x.double(), m)
    cols = F.unfold(x, m.kernel_size, dilation=m.dilation, padding=padding, stride=m.stride)
    g = m.groups
    a = cols.reshape(x.shape[0], g, -1, cols.shape[-1]).permute(1, 0, 3, 2).reshape(g, -1, cols.shape[1] // g)
    if bias:
        a = torch.cat([a, torch.ones(*a.shape[:2], 1, dtype=a.dtype)], -1)
    return a


def _rows(t: torch.Tensor, m: nn.Module) -> torch.Tensor:
    """An output (gradient) as [groups, N, O/groups], rows in patches64's order (sample, position)."""
    if isinstance(m, nn.Linear):
        return t.reshape(1, -1, m.out_features)
    if t.dim() == len(m.kernel_size) + 1:
        t = t.unsqueeze(0)
    g = m.groups
    return t.reshape(t.shape[0], g, m.out_channels // g, -1).permute(1, 0, 3, 2).reshape(g, -1, m.out_channels // g)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    den = max(a.norm().item(), b.norm().item())
    return 0.0 if den == 0 else (a - b).norm().item() / den


def layer_problem(m: nn.Module, calls: list[dict]) -> str | None:
    """Why FOOF's model of the layer is wrong (None: patches reproduce its output and gradient)."""
    if not calls:
        return "its forward never runs"
    g = m.groups if not isinstance(m, nn.Linear) else 1
    has_bias = m.bias is not None
    w = m.weight.reshape(g, m.weight.shape[0] // g, -1)
    joint = torch.cat([w, m.bias.reshape(g, -1, 1)], -1) if has_bias else w
    want = torch.zeros_like(joint)
    with torch.no_grad():
        for rec in calls:
            a = true_patches(rec["x"], m, has_bias)
            out = _rows(rec["out"], m)
            if a.shape[1] != out.shape[1]:
                return f"{a.shape[1]} patch vectors for {out.shape[1]} output positions ({tuple(rec['out'].shape)})"
            err = _rel(a @ joint.mT, out)
            if err > TOL64:
                return f"output != [Ŵ|b]·a (rel. error {err:.2g})"
            if rec["grad"] is not None:
                want += _rows(rec["grad"], m).mT @ a
    if m.weight.grad is None:
        return None  # its output does not reach the loss: the optimizer skips the weight
    got = m.weight.grad.reshape(w.shape)
    if has_bias:
        got = torch.cat([got, m.bias.grad.reshape(g, -1, 1)], -1)
    err = _rel(got, want)
    return None if err <= TOL64 else f"weight gradient != Σ Eᵀ·A (rel. error {err:.2g})"


@lru_cache(maxsize=None)
def float64_check(case: str) -> dict[str, str | None]:
    """{module name: problem or None} for every Linear/Conv module, one float64 forward/backward."""
    model, x, y = _build(case)
    model = model.double()
    rec = Recorder(model, clone_outputs=True)
    _loss(model(x.double()), y).backward()
    rec.remove()
    return {name: layer_problem(m, rec.calls[name])
            for name, m in model.named_modules() if isinstance(m, LAYERS)}


@dataclass
class Run:
    error: str | None = None
    finite: bool = True
    names: list[str] = field(default_factory=list)  # preconditioned layers
    layers: list[str] = field(default_factory=list)  # every Linear/Conv module
    warnings: list[str] = field(default_factory=list)
    stats: dict = field(default_factory=dict)  # FOOF: name -> (statistic, bias_row, first-step inputs)


@lru_cache(maxsize=None)
def train(case: str, kind: str) -> Run:
    model, x, y = _build(case)
    run = Run(layers=[name for name, m in model.named_modules() if isinstance(m, LAYERS)])
    modules = dict(model.named_modules())
    rec = Recorder(model)
    opt = None
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            opt = getattr(fastfoof, kind)(model, lr=0.01, damping=1.0)
            for step in range(4):
                opt.zero_grad()
                _loss(model(x), y).backward()
                opt.step()
                if step == 0:
                    rec.on = False
                    run.names = preconditioned(opt)
                    if kind == "FOOF":
                        for name in run.names:
                            stat = input_statistic(opt, name)
                            if stat is not None:
                                run.stats[name] = (stat[0].clone(), stat[1], [r["x"] for r in rec.calls[name]])
        except Exception:  # noqa: BLE001
            run.error = traceback.format_exc()
            if opt is not None and not run.names:
                run.names = preconditioned(opt)
        finally:
            rec.remove()
            if opt is not None:
                opt.remove_hooks()
    run.finite = all(torch.isfinite(p).all() for p in model.parameters())
    run.warnings = [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]
    del modules
    return run


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Small models: a second intra-op thread only spins (and costs minutes on a shared CPU)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


CASES = [pytest.param(case, id=case) for case in MODELS]
KINDS = ["FOOF", "KFAC"]


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("case", CASES)
def test_trains_four_steps_finite(case, kind):
    run = train(case, kind)
    assert run.error is None, f"{kind} on {case} raised:\n{run.error[-1500:]}"
    assert run.finite, f"{kind} on {case}: non-finite parameters after 4 steps"


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("case", CASES)
def test_preconditioned_layers_compute_what_foof_assumes(case, kind):
    run = train(case, kind)
    problems = float64_check(case)
    bad = {name: problems[name] for name in run.names if problems.get(name)}
    listing = "\n".join(f"  {n}: {p}" for n, p in list(bad.items())[:8])
    assert not bad, (f"{kind} preconditions {len(bad)} of {len(run.names)} layers of {case} whose patches do not "
                     f"reproduce them ({MODELS[case][2]}):\n{listing}")


def _named(name: str, messages: list[str]) -> bool:
    pattern = re.compile(r"(?<![\w.])" + re.escape(name) + r"(?![\w.])")
    return any(pattern.search(msg) for msg in messages)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("case", CASES)
def test_unpreconditioned_layers_are_named_in_a_warning(case, kind):
    run = train(case, kind)
    left = [name for name in run.layers if name not in set(run.names)]
    silent = [name for name in left if not _named(name, run.warnings)]
    assert not silent, (f"{kind} leaves {len(silent)} Linear/Conv layers of {case} unpreconditioned without naming "
                        f"them in a RuntimeWarning: {silent[:8]}; warnings: {run.warnings[:3]}")


@pytest.mark.parametrize("case", CASES)
def test_foof_statistic_is_the_gram_of_the_true_patches(case):
    run = train(case, "FOOF")
    if run.error is not None and not run.stats:
        pytest.fail(f"FOOF on {case} raised before its first statistic:\n{run.error[-600:]}")
    model, _, _ = _build(case)
    modules = dict(model.named_modules())
    bad = {}
    for name, (stat, bias_row, inputs) in run.stats.items():
        if not inputs:
            bad[name] = "a statistic, but its forward never ran"
            continue
        m = modules[name]
        # grafted FOOF (the default): each forward's gram averaged over its positions per sample (DESIGN §1.2)
        a = [(true_patches(x, m, bias_row), x.shape[0]) for x in inputs]
        ref = sum(p.mT @ p * (b / p.shape[1]) for p, b in a) / sum(b for _, b in a)
        if tuple(stat.shape) != tuple(ref.shape):
            bad[name] = f"statistic {tuple(stat.shape)}, true patches give {tuple(ref.shape)}"
            continue
        err = _rel(stat.double(), ref)
        if err > TOL_STAT:
            bad[name] = f"rel. error {err:.2g}"
    assert not bad, f"FOOF's statistics of {case} are not its layers' patch grams:\n" + \
        "\n".join(f"  {n}: {p}" for n, p in list(bad.items())[:8])
