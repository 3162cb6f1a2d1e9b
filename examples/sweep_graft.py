"""Default FOOF against SGD at SGD's own learning rate, over nets, schedules, lrs and seeds.

    python examples/sweep_graft.py run -o bench/measured/cpu_graft_sweep.json --jobs 2
    python examples/sweep_graft.py report bench/measured/cpu_graft_sweep.json -o bench/measured/cpu_graft_sweep.md

Each cell is a net, a learning-rate schedule, an SGD learning rate lr and a seed. In a cell three runs
start from the same initial weights and see the same batches (and, where a net has dropout, the same
masks): `torch.optim.SGD(lr=lr, momentum=0.9)`, default FOOF `fastfoof.FOOF(model, lr=lr, momentum=0.9)`
(graft="sgd", damping 3, nothing else), and the paper's eq. 6 update `FOOF(..., lr=λ·lr, graft=None)`
at λ = 1, the rule before grafting. The schedule is stepped every batch. At the end the final training
loss is measured on the whole training set (eval mode: BatchNorm's running statistics, no dropout),
and the test accuracy on the test set. Every run's numbers and the machine go to one JSON file;
`report` turns it into markdown tables (nothing in them is typed by hand).

The nets in IN_REPO are this repository's; the HELD_OUT ones were written for this sweep, fixed before
any of it ran, and are reported separately: nets FOOF was not developed on (no BatchNorm, LayerNorm and
GELU, tanh, dropout, grouped and depthwise convolutions). Grafting's bound (DESIGN §1.4) was then set on
one of them, VGG no BN, where unbounded grafting diverged; HELD_OUT_FROM_BOUND are nets written after
that, fixed before any of them ran, and reported as a group of their own. HELD_OUT_FROM_NO_NORM_WORK
were written after that group lost cells on two nets without normalisation, fixed before any change
meant to win there ran on them: the nets a change made for those two is judged on. On them the default
diverged on a residual net without normalisation where SGD trained; HELD_OUT_FROM_MOMENTUM_WORK were
written then, fixed before any change meant for that ran on them. FOOF's defaults (DESIGN §11.6) were then
chosen on all of those nets; HELD_OUT_FROM_DEFAULTS were written after that, fixed before any of them ran.
They lost cells at the largest lr SGD survives; HELD_OUT_FROM_STEP_RULE were written before any change to
the step's size meant for that was chosen, fixed before any of them ran. No rule tried on them won all
but one cell; HELD_OUT_FROM_DAMPING_SCALE were written before any rule scaling the damping per layer ran on
them, fixed before any of them ran.
"""
from __future__ import annotations

import argparse
import inspect
import json
import math
import os
import platform
import statistics
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
import fastfoof  # noqa: E402
from models import MNIST1DConvNet, MNIST1DMLP, SmallConvNet, resnet18  # noqa: E402

MOMENTUM = 0.9
LRS = (0.03, 0.1, 0.3)
SEEDS = (0, 1)
SCHEDULES = ("constant", "cosine", "onecycle")
# Held out like the HELD_OUT nets: step decay (x0.1 at 50% and 75% of the steps) and a linear warm-up over
# the first 10% of the steps followed by a linear decay to 0.
HELD_OUT_SCHEDULES = ("step", "warmup-linear")
ALL_SCHEDULES = SCHEDULES + HELD_OUT_SCHEDULES
OPTIMIZERS = ("SGD", "FOOF", "FOOF graft=None")
# Not in the default sweep (--optimizers): "FOOF λ=<damping>", grafted FOOF at another damping, to measure
# what a damping would change; "KFAC", KFAC's defaults (graft="sgd", damping 1), KFAC's default step at SGD's lr.
DAMPED_FOOF = "FOOF λ="
KFAC = "KFAC"
# dataset -> (epochs, batch size): digits 22 steps an epoch (1437 images), MNIST-1D 40 (4000 signals)
DATA = {"digits": (10, 64), "mnist1d": (20, 100)}


class SequentialNet(nn.Module):
    """Layers applied in order: subclasses build them as `self.net`."""

    def forward(self, x):
        return self.net(x)


# ---- held-out nets: written for this sweep, not tuned on it ----

class VGGNoBN(nn.Module):
    """A plain VGG-style CNN for 8x8 images, no normalisation: two conv-conv-maxpool stages, two Linear."""

    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 32, 3, padding=1), nn.ReLU(), nn.Conv2d(32, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.Conv2d(64, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Flatten())
        self.classifier = nn.Sequential(nn.Linear(64 * 2 * 2, 128), nn.ReLU(), nn.Linear(128, 10))

    def forward(self, x):
        return self.classifier(self.features(x))


class LayerNormGELUMLP(SequentialNet):
    """Flattened 8x8 images, two hidden layers of 128 with LayerNorm and GELU."""

    def __init__(self, inputs: int = 64, hidden: int = 128):
        super().__init__()
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(inputs, hidden), nn.LayerNorm(hidden), nn.GELU(),
                                 nn.Linear(hidden, hidden), nn.LayerNorm(hidden), nn.GELU(), nn.Linear(hidden, 10))


class TanhMLP(SequentialNet):
    """Flattened length-40 signals, two hidden layers of 256 tanh units."""

    def __init__(self, inputs: int = 40, hidden: int = 256):
        super().__init__()
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(inputs, hidden), nn.Tanh(), nn.Linear(hidden, hidden),
                                 nn.Tanh(), nn.Linear(hidden, 10))


class GELUDropoutConv1d(SequentialNet):
    """Three Conv1d (32, 32, 64 channels; the last two stride 2) with GELU and dropout 0.1, a Linear head."""

    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv1d(1, 32, 5, padding=2), nn.GELU(),
            nn.Conv1d(32, 32, 3, stride=2, padding=1), nn.GELU(), nn.Dropout(0.1),
            nn.Conv1d(32, 64, 3, stride=2, padding=1), nn.GELU(), nn.Dropout(0.1),
            nn.Flatten(), nn.Linear(64 * 10, 10))


class SeparableConvNet(nn.Module):
    """MobileNet-like for 8x8 images: a stem conv, then depthwise 3x3 + pointwise 1x1 blocks (one 3x3 with
    4 groups instead of depthwise), BatchNorm and ReLU6, global average pool, Linear."""

    def __init__(self):
        super().__init__()

        def conv_bn(cin, cout, k, stride=1, groups=1):
            return [nn.Conv2d(cin, cout, k, stride=stride, padding=k // 2, groups=groups, bias=False),
                    nn.BatchNorm2d(cout), nn.ReLU6()]

        self.features = nn.Sequential(
            *conv_bn(1, 32, 3),
            *conv_bn(32, 32, 3, groups=32), *conv_bn(32, 64, 1),                # depthwise, pointwise
            *conv_bn(64, 64, 3, stride=2, groups=4), *conv_bn(64, 128, 1),      # grouped, pointwise
            *conv_bn(128, 128, 3, stride=2, groups=128), *conv_bn(128, 128, 1),  # depthwise, pointwise
            nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.classifier = nn.Linear(128, 10)

    def forward(self, x):
        return self.classifier(self.features(x))


# ---- held out from the graft bound: written after the bound (DESIGN §1.4) was set on VGG no BN, fixed before
# any of them ran ----

class GroupNormSiLUCNN(SequentialNet):
    """Three 3x3 convolutions (16, 32, 32 channels; the last two stride 2) with GroupNorm(4) and SiLU, global
    average pool, Linear."""

    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv2d(1, 16, 3, padding=1), nn.GroupNorm(4, 16), nn.SiLU(),
            nn.Conv2d(16, 32, 3, stride=2, padding=1), nn.GroupNorm(4, 32), nn.SiLU(),
            nn.Conv2d(32, 32, 3, stride=2, padding=1), nn.GroupNorm(4, 32), nn.SiLU(),
            nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 10))


class ELUWideCNN(SequentialNet):
    """No normalisation: 64, 64 (stride 2), 128 (stride 2) channels of 3x3 convolutions with ELU, a Linear head
    on the flattened 2x2 map."""

    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv2d(1, 64, 3, padding=1), nn.ELU(), nn.Conv2d(64, 64, 3, stride=2, padding=1), nn.ELU(),
            nn.Conv2d(64, 128, 3, stride=2, padding=1), nn.ELU(), nn.Flatten(), nn.Linear(128 * 2 * 2, 10))


class ResidualNet(nn.Module):
    """A stem, residual blocks h + block(h), a head: subclasses build the three (in that order)."""

    def forward(self, x):
        h = self.stem(x)
        for block in self.blocks:
            h = h + block(h)
        return self.head(h)


class ResidualMLP(ResidualNet):
    """No normalisation: Linear(40, 128), two residual blocks x + Linear(ReLU(Linear(x))), ReLU, Linear head."""

    def __init__(self, inputs: int = 40, width: int = 128):
        super().__init__()
        self.stem = nn.Sequential(nn.Flatten(), nn.Linear(inputs, width))
        self.blocks = nn.ModuleList(nn.Sequential(nn.ReLU(), nn.Linear(width, width), nn.ReLU(), nn.Linear(width, width))
                                    for _ in range(2))
        self.head = nn.Sequential(nn.ReLU(), nn.Linear(width, 10))


class MaxPoolTanhConv1d(SequentialNet):
    """No normalisation: two Conv1d (16, 32 channels, kernel 5) each with tanh and max-pool 2, a Linear head."""

    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv1d(1, 16, 5, padding=2), nn.Tanh(), nn.MaxPool1d(2),
            nn.Conv1d(16, 32, 5, padding=2), nn.Tanh(), nn.MaxPool1d(2), nn.Flatten(), nn.Linear(32 * 10, 10))


# ---- held out from the no-normalisation work: written after the sweep above lost on two nets without
# normalisation, fixed before any change meant to win there ran on them ----

class LeNet(SequentialNet):
    """LeNet-5 for 8x8 images, no normalisation: 5x5 conv (6) and 3x3 conv (16), each ReLU and max-pool 2,
    then Linear 64-120-84-10 with ReLU."""

    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv2d(1, 6, 5, padding=2), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(6, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
            nn.Linear(16 * 2 * 2, 120), nn.ReLU(), nn.Linear(120, 84), nn.ReLU(), nn.Linear(84, 10))


class MishAvgPoolCNN(SequentialNet):
    """No normalisation: 5x5 conv (32) and 3x3 conv (64), each Mish and average-pool 2, a Linear head on the
    flattened 2x2 map."""

    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv2d(1, 32, 5, padding=2), nn.Mish(), nn.AvgPool2d(2),
            nn.Conv2d(32, 64, 3, padding=1), nn.Mish(), nn.AvgPool2d(2), nn.Flatten(), nn.Linear(64 * 2 * 2, 10))


class BNLeakyDropoutCNN(SequentialNet):
    """3x3 convs 32, 64 (stride 2), 64 (stride 2) with BatchNorm and LeakyReLU(0.1), Dropout2d(0.1) after the
    second, global average pool, Linear."""

    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv2d(1, 32, 3, padding=1), nn.BatchNorm2d(32), nn.LeakyReLU(0.1),
            nn.Conv2d(32, 64, 3, stride=2, padding=1), nn.BatchNorm2d(64), nn.LeakyReLU(0.1), nn.Dropout2d(0.1),
            nn.Conv2d(64, 64, 3, stride=2, padding=1), nn.BatchNorm2d(64), nn.LeakyReLU(0.1),
            nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(64, 10))


class DilatedResidualConv1d(ResidualNet):
    """No normalisation, a small TCN: a Conv1d stem (32 channels, kernel 3), two residual blocks
    x + Conv(ReLU(Conv(ReLU(x)))) with dilations 2 and 4, ReLU, global average pool, Linear."""

    def __init__(self, width: int = 32):
        super().__init__()
        self.stem = nn.Conv1d(1, width, 3, padding=1)
        self.blocks = nn.ModuleList(
            nn.Sequential(nn.ReLU(), nn.Conv1d(width, width, 3, padding=d, dilation=d), nn.ReLU(),
                          nn.Conv1d(width, width, 3, padding=d, dilation=d)) for d in (2, 4))
        self.head = nn.Sequential(nn.ReLU(), nn.AdaptiveAvgPool1d(1), nn.Flatten(), nn.Linear(width, 10))


class WideSiLUMLP(SequentialNet):
    """No normalisation: flattened length-40 signals, three hidden layers of 512 SiLU units."""

    def __init__(self, inputs: int = 40, hidden: int = 512):
        super().__init__()
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(inputs, hidden), nn.SiLU(), nn.Linear(hidden, hidden),
                                 nn.SiLU(), nn.Linear(hidden, hidden), nn.SiLU(), nn.Linear(hidden, 10))


class BatchNormMLP(SequentialNet):
    """Flattened length-40 signals, two hidden layers of 256 with BatchNorm1d and ReLU."""

    def __init__(self, inputs: int = 40, hidden: int = 256):
        super().__init__()
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(inputs, hidden), nn.BatchNorm1d(hidden), nn.ReLU(),
                                 nn.Linear(hidden, hidden), nn.BatchNorm1d(hidden), nn.ReLU(), nn.Linear(hidden, 10))


# ---- held out from the momentum work: written after the group above diverged on a residual net without
# normalisation, fixed before any change meant for that ran on them ----

class BNResidualCNN(nn.Module):
    """A 3x3 conv stem (16) with BatchNorm and ReLU, two residual blocks (the second with stride 2 and a 1x1
    projection to 32 channels) of conv-BN-ReLU-conv-BN, global average pool, Linear."""

    def __init__(self):
        super().__init__()

        def conv_bn(cin, cout, k, stride=1):
            return [nn.Conv2d(cin, cout, k, stride=stride, padding=k // 2, bias=False), nn.BatchNorm2d(cout)]

        self.stem = nn.Sequential(*conv_bn(1, 16, 3), nn.ReLU())
        self.block1 = nn.Sequential(*conv_bn(16, 16, 3), nn.ReLU(), *conv_bn(16, 16, 3))
        self.block2 = nn.Sequential(*conv_bn(16, 32, 3, stride=2), nn.ReLU(), *conv_bn(32, 32, 3))
        self.project = nn.Sequential(*conv_bn(16, 32, 1, stride=2))
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 10))

    def forward(self, x):
        h = self.stem(x)
        h = torch.relu(h + self.block1(h))
        h = torch.relu(self.project(h) + self.block2(h))
        return self.head(h)


class SoftplusMaxPoolCNN(SequentialNet):
    """No normalisation: three 3x3 convs (24, 48, 48 channels, stride 1) with Softplus, global max pool,
    Linear."""

    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv2d(1, 24, 3, padding=1), nn.Softplus(), nn.Conv2d(24, 48, 3, padding=1), nn.Softplus(),
            nn.Conv2d(48, 48, 3, padding=1), nn.Softplus(), nn.AdaptiveMaxPool2d(1), nn.Flatten(), nn.Linear(48, 10))


class LayerNormResidualCNN(ResidualNet):
    """A 3x3 conv stem (32), two residual blocks x + conv(GELU(GroupNorm(1)(x))) (GroupNorm with one group: a
    LayerNorm over channels and positions), GroupNorm(1), GELU, global average pool, Linear."""

    def __init__(self, width: int = 32):
        super().__init__()
        self.stem = nn.Conv2d(1, width, 3, padding=1)
        self.blocks = nn.ModuleList(nn.Sequential(nn.GroupNorm(1, width), nn.GELU(), nn.Conv2d(width, width, 3, padding=1))
                                    for _ in range(2))
        self.head = nn.Sequential(nn.GroupNorm(1, width), nn.GELU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                                  nn.Linear(width, 10))


class HardswishSeparableConv1d(SequentialNet):
    """No normalisation: a Conv1d stem (24, kernel 5), two depthwise (kernel 5, stride 2) + pointwise (48)
    pairs with Hardswish, flattened into a Linear head."""

    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv1d(1, 24, 5, padding=2), nn.Hardswish(),
            nn.Conv1d(24, 24, 5, stride=2, padding=2, groups=24), nn.Conv1d(24, 48, 1), nn.Hardswish(),
            nn.Conv1d(48, 48, 5, stride=2, padding=2, groups=48), nn.Conv1d(48, 48, 1), nn.Hardswish(),
            nn.Flatten(), nn.Linear(48 * 10, 10))


class DropoutMLP(SequentialNet):
    """No normalisation: flattened length-40 signals, three hidden layers of 256 ReLU units, dropout 0.2
    after each."""

    def __init__(self, inputs: int = 40, hidden: int = 256):
        super().__init__()
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(inputs, hidden), nn.ReLU(), nn.Dropout(0.2),
                                 nn.Linear(hidden, hidden), nn.ReLU(), nn.Dropout(0.2),
                                 nn.Linear(hidden, hidden), nn.ReLU(), nn.Dropout(0.2), nn.Linear(hidden, 10))


# ---- held out from the defaults of DESIGN §11.6 (damping 3, bound 3λ): written after they were set, fixed
# before any of them ran ----

class BNVGG(SequentialNet):
    """VGG-style for 8x8 images with BatchNorm: conv-BN-ReLU ×2 (32), max-pool, ×2 (64), max-pool, then Linear
    256-128 with ReLU and dropout 0.3, Linear 128-10."""

    def __init__(self):
        super().__init__()

        def conv_bn(cin, cout):
            return [nn.Conv2d(cin, cout, 3, padding=1), nn.BatchNorm2d(cout), nn.ReLU()]

        self.net = nn.Sequential(*conv_bn(1, 32), *conv_bn(32, 32), nn.MaxPool2d(2), *conv_bn(32, 64),
                                 *conv_bn(64, 64), nn.MaxPool2d(2), nn.Flatten(), nn.Linear(64 * 2 * 2, 128),
                                 nn.ReLU(), nn.Dropout(0.3), nn.Linear(128, 10))


class SELUStridedCNN(SequentialNet):
    """No normalisation, self-normalising: 3x3 convs 32, 64 (stride 2), 64 (stride 2) with SELU, a Linear head
    on the flattened 2x2 map."""

    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv2d(1, 32, 3, padding=1), nn.SELU(), nn.Conv2d(32, 64, 3, stride=2, padding=1), nn.SELU(),
            nn.Conv2d(64, 64, 3, stride=2, padding=1), nn.SELU(), nn.Flatten(), nn.Linear(64 * 2 * 2, 10))


class WideReLUMLP(SequentialNet):
    """No normalisation: flattened 8x8 images, two hidden layers of 512 ReLU units."""

    def __init__(self, inputs: int = 64, hidden: int = 512):
        super().__init__()
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(inputs, hidden), nn.ReLU(), nn.Linear(hidden, hidden),
                                 nn.ReLU(), nn.Linear(hidden, 10))


class GroupNormResidualConv1d(ResidualNet):
    """A Conv1d stem (32, kernel 5, stride 2), two residual blocks x + GN(conv(SiLU(GN(conv(x))))) with
    GroupNorm(8), SiLU, global average pool, Linear."""

    def __init__(self, width: int = 32):
        super().__init__()
        self.stem = nn.Conv1d(1, width, 5, stride=2, padding=2)
        self.blocks = nn.ModuleList(
            nn.Sequential(nn.Conv1d(width, width, 3, padding=1), nn.GroupNorm(8, width), nn.SiLU(),
                          nn.Conv1d(width, width, 3, padding=1), nn.GroupNorm(8, width)) for _ in range(2))
        self.head = nn.Sequential(nn.SiLU(), nn.AdaptiveAvgPool1d(1), nn.Flatten(), nn.Linear(width, 10))


class PreNormResidualMLP(ResidualNet):
    """Transformer-MLP-like: Linear(40, 128), two pre-norm residual blocks x + Linear(GELU(Linear(LayerNorm(x))))
    with a hidden width of 256, LayerNorm, Linear head."""

    def __init__(self, inputs: int = 40, width: int = 128):
        super().__init__()
        self.stem = nn.Sequential(nn.Flatten(), nn.Linear(inputs, width))
        self.blocks = nn.ModuleList(nn.Sequential(nn.LayerNorm(width), nn.Linear(width, 2 * width), nn.GELU(),
                                                  nn.Linear(2 * width, width)) for _ in range(2))
        self.head = nn.Sequential(nn.LayerNorm(width), nn.Linear(width, 10))


# ---- held out from the step-rule work: written after the nets above lost cells at the largest lr SGD
# survives, before any change to the step's size meant for that was chosen; fixed before any of them ran ----

class InstanceNormGELUCNN(SequentialNet):
    """Instance normalisation (GroupNorm with a group per channel): 3x3 convs 32, 64 (stride 2), 64 (stride 2),
    each with GELU, global average pool, Linear."""

    def __init__(self):
        super().__init__()

        def conv_in(cin, cout, stride):
            return [nn.Conv2d(cin, cout, 3, stride=stride, padding=1), nn.GroupNorm(cout, cout), nn.GELU()]

        self.net = nn.Sequential(*conv_in(1, 32, 1), *conv_in(32, 64, 2), *conv_in(64, 64, 2),
                                 nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(64, 10))


class GlobalMaxPoolWideCNN(SequentialNet):
    """No normalisation, wide and shallow: a 5x5 conv of 128 channels, a 3x3 conv of 64, both ReLU, global
    max-pool, Linear."""

    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Conv2d(1, 128, 5, padding=2), nn.ReLU(), nn.Conv2d(128, 64, 3, padding=1),
                                 nn.ReLU(), nn.AdaptiveMaxPool2d(1), nn.Flatten(), nn.Linear(64, 10))


class BottleneckResidualCNN(ResidualNet):
    """Pre-activation bottleneck residual blocks with BatchNorm: a 3x3 stem of 32 channels, two blocks
    x + conv1x1(BN-ReLU(conv3x3(BN-ReLU(conv1x1(BN-ReLU(x)))))) through 16 channels, BN-ReLU, average pool,
    Linear."""

    def __init__(self, width: int = 32, inner: int = 16):
        super().__init__()

        def bn_relu(c):
            return [nn.BatchNorm2d(c), nn.ReLU()]

        self.stem = nn.Conv2d(1, width, 3, padding=1)
        self.blocks = nn.ModuleList(
            nn.Sequential(*bn_relu(width), nn.Conv2d(width, inner, 1), *bn_relu(inner),
                          nn.Conv2d(inner, inner, 3, padding=1), *bn_relu(inner), nn.Conv2d(inner, width, 1))
            for _ in range(2))
        self.head = nn.Sequential(*bn_relu(width), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(width, 10))


class BatchNormDeepConv1d(SequentialNet):
    """Four Conv1d of 32 channels, kernel 5, strides 1, 2, 2, 2, each with BatchNorm and ReLU, a Linear head on
    the flattened map."""

    def __init__(self, width: int = 32, length: int = 40):
        super().__init__()
        layers, cin = [], 1
        for stride in (1, 2, 2, 2):
            layers += [nn.Conv1d(cin, width, 5, stride=stride, padding=2), nn.BatchNorm1d(width), nn.ReLU()]
            cin = width
        self.net = nn.Sequential(*layers, nn.Flatten(), nn.Linear(width * (length // 8), 10))


class SigmoidMLP(SequentialNet):
    """No normalisation, saturating: two hidden layers of 256 sigmoid units."""

    def __init__(self, inputs: int = 40, hidden: int = 256):
        super().__init__()
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(inputs, hidden), nn.Sigmoid(), nn.Linear(hidden, hidden),
                                 nn.Sigmoid(), nn.Linear(hidden, 10))


class LayerNormTanhConv1d(SequentialNet):
    """Conv1d 24 (kernel 7) and 48 (kernel 5, stride 2), each with LayerNorm over channels and positions
    (GroupNorm(1)) and tanh, max-pool 2, Linear head."""

    def __init__(self, length: int = 40):
        super().__init__()
        self.net = nn.Sequential(nn.Conv1d(1, 24, 7, padding=3), nn.GroupNorm(1, 24), nn.Tanh(),
                                 nn.Conv1d(24, 48, 5, stride=2, padding=2), nn.GroupNorm(1, 48), nn.Tanh(),
                                 nn.MaxPool1d(2), nn.Flatten(), nn.Linear(48 * (length // 4), 10))


# ---- held out from the damping-scale work: written after the step-rule group above, before any rule that
# scales the damping per layer ran on them; fixed before any of them ran ----

class PReLUDropoutStridedCNN(SequentialNet):
    """No normalisation: 3x3 convs 32, 64 (stride 2), 64 (stride 2), each with PReLU (a slope per channel),
    channel dropout 0.1 after the second, a Linear head on the flattened 2x2 map."""

    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Conv2d(1, 32, 3, padding=1), nn.PReLU(32),
                                 nn.Conv2d(32, 64, 3, stride=2, padding=1), nn.PReLU(64), nn.Dropout2d(0.1),
                                 nn.Conv2d(64, 64, 3, stride=2, padding=1), nn.PReLU(64),
                                 nn.Flatten(), nn.Linear(64 * 2 * 2, 10))


class BatchNormWideKernelCNN(SequentialNet):
    """Large kernels with BatchNorm: a 7x7 conv of 16 and a 5x5 conv of 32 (stride 2), each BN-ReLU, global
    average pool, Linear."""

    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Conv2d(1, 16, 7, padding=3), nn.BatchNorm2d(16), nn.ReLU(),
                                 nn.Conv2d(16, 32, 5, stride=2, padding=2), nn.BatchNorm2d(32), nn.ReLU(),
                                 nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 10))


class GroupedResidualCNN(ResidualNet):
    """Grouped convolutions in residual blocks with GroupNorm(8): a 3x3 stem of 32, two blocks
    x + conv1x1(ReLU(GN(conv3x3 with 8 groups(ReLU(GN(x)))))), GN-ReLU, average pool, Linear."""

    def __init__(self, width: int = 32):
        super().__init__()
        self.stem = nn.Conv2d(1, width, 3, padding=1)
        self.blocks = nn.ModuleList(
            nn.Sequential(nn.GroupNorm(8, width), nn.ReLU(), nn.Conv2d(width, width, 3, padding=1, groups=8),
                          nn.GroupNorm(8, width), nn.ReLU(), nn.Conv2d(width, width, 1)) for _ in range(2))
        self.head = nn.Sequential(nn.GroupNorm(8, width), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                                  nn.Linear(width, 10))


class GlobalAvgPoolConv1d(SequentialNet):
    """No normalisation: Conv1d 32, 64 (stride 2), 64 (stride 2), kernel 3, ReLU, global average pool, Linear."""

    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Conv1d(1, 32, 3, padding=1), nn.ReLU(),
                                 nn.Conv1d(32, 64, 3, stride=2, padding=1), nn.ReLU(),
                                 nn.Conv1d(64, 64, 3, stride=2, padding=1), nn.ReLU(),
                                 nn.AdaptiveAvgPool1d(1), nn.Flatten(), nn.Linear(64, 10))


class DeepNarrowLeakyMLP(SequentialNet):
    """No normalisation, deep and narrow: four hidden layers of 64 LeakyReLU(0.1) units."""

    def __init__(self, inputs: int = 40, hidden: int = 64):
        super().__init__()
        layers, width = [nn.Flatten()], inputs
        for _ in range(4):
            layers += [nn.Linear(width, hidden), nn.LeakyReLU(0.1)]
            width = hidden
        self.net = nn.Sequential(*layers, nn.Linear(hidden, 10))


class BNResidualConv1d(ResidualNet):
    """Post-activation residual blocks with BatchNorm: a Conv1d stem (32, kernel 5), two blocks
    x + BN(conv(ReLU(BN(conv(x))))) (kernel 3), ReLU, max-pool 4, a Linear head on the flattened map."""

    def __init__(self, width: int = 32, length: int = 40):
        super().__init__()
        self.stem = nn.Conv1d(1, width, 5, padding=2)
        self.blocks = nn.ModuleList(
            nn.Sequential(nn.Conv1d(width, width, 3, padding=1), nn.BatchNorm1d(width), nn.ReLU(),
                          nn.Conv1d(width, width, 3, padding=1), nn.BatchNorm1d(width)) for _ in range(2))
        self.head = nn.Sequential(nn.ReLU(), nn.MaxPool1d(4), nn.Flatten(), nn.Linear(width * (length // 4), 10))


# net name -> (dataset, constructor)
IN_REPO = {
    "SmallConvNet (digits)": ("digits", lambda: SmallConvNet(in_channels=1)),
    "ResNet-18 w8 (digits)": ("digits", lambda: resnet18(num_classes=10, in_channels=1, width=8)),
    "MNIST-1D CNN": ("mnist1d", MNIST1DConvNet),
    "MNIST-1D MLP": ("mnist1d", MNIST1DMLP),
}
HELD_OUT = {
    "VGG no BN (digits)": ("digits", VGGNoBN),
    "LayerNorm-GELU MLP (digits)": ("digits", LayerNormGELUMLP),
    "separable/grouped CNN (digits)": ("digits", SeparableConvNet),
    "GELU-dropout Conv1d (MNIST-1D)": ("mnist1d", GELUDropoutConv1d),
    "tanh MLP (MNIST-1D)": ("mnist1d", TanhMLP),
}
HELD_OUT_FROM_BOUND = {
    "GroupNorm-SiLU CNN (digits)": ("digits", GroupNormSiLUCNN),
    "ELU wide CNN no norm (digits)": ("digits", ELUWideCNN),
    "residual MLP no norm (MNIST-1D)": ("mnist1d", ResidualMLP),
    "max-pool tanh Conv1d (MNIST-1D)": ("mnist1d", MaxPoolTanhConv1d),
}
HELD_OUT_FROM_NO_NORM_WORK = {
    "LeNet-5 (digits)": ("digits", LeNet),
    "Mish avg-pool CNN no norm (digits)": ("digits", MishAvgPoolCNN),
    "BN-LeakyReLU-dropout CNN (digits)": ("digits", BNLeakyDropoutCNN),
    "dilated residual Conv1d no norm (MNIST-1D)": ("mnist1d", DilatedResidualConv1d),
    "wide SiLU MLP no norm (MNIST-1D)": ("mnist1d", WideSiLUMLP),
    "BatchNorm MLP (MNIST-1D)": ("mnist1d", BatchNormMLP),
}
HELD_OUT_FROM_MOMENTUM_WORK = {
    "BN residual CNN (digits)": ("digits", BNResidualCNN),
    "Softplus max-pool CNN no norm (digits)": ("digits", SoftplusMaxPoolCNN),
    "LayerNorm residual CNN (digits)": ("digits", LayerNormResidualCNN),
    "Hardswish separable Conv1d no norm (MNIST-1D)": ("mnist1d", HardswishSeparableConv1d),
    "dropout MLP no norm (MNIST-1D)": ("mnist1d", DropoutMLP),
}
HELD_OUT_FROM_DEFAULTS = {
    "BatchNorm VGG (digits)": ("digits", BNVGG),
    "SELU strided CNN no norm (digits)": ("digits", SELUStridedCNN),
    "wide ReLU MLP no norm (digits)": ("digits", WideReLUMLP),
    "GroupNorm residual Conv1d (MNIST-1D)": ("mnist1d", GroupNormResidualConv1d),
    "pre-norm residual MLP (MNIST-1D)": ("mnist1d", PreNormResidualMLP),
}
HELD_OUT_FROM_STEP_RULE = {
    "InstanceNorm-GELU CNN (digits)": ("digits", InstanceNormGELUCNN),
    "global max-pool wide CNN no norm (digits)": ("digits", GlobalMaxPoolWideCNN),
    "BN bottleneck residual CNN (digits)": ("digits", BottleneckResidualCNN),
    "BatchNorm deep Conv1d (MNIST-1D)": ("mnist1d", BatchNormDeepConv1d),
    "sigmoid MLP no norm (MNIST-1D)": ("mnist1d", SigmoidMLP),
    "LayerNorm-tanh Conv1d (MNIST-1D)": ("mnist1d", LayerNormTanhConv1d),
}
HELD_OUT_FROM_DAMPING_SCALE = {
    "PReLU-dropout strided CNN no norm (digits)": ("digits", PReLUDropoutStridedCNN),
    "BatchNorm wide-kernel CNN (digits)": ("digits", BatchNormWideKernelCNN),
    "GroupNorm grouped residual CNN (digits)": ("digits", GroupedResidualCNN),
    "global avg-pool Conv1d no norm (MNIST-1D)": ("mnist1d", GlobalAvgPoolConv1d),
    "deep narrow LeakyReLU MLP no norm (MNIST-1D)": ("mnist1d", DeepNarrowLeakyMLP),
    "BN residual Conv1d (MNIST-1D)": ("mnist1d", BNResidualConv1d),
}
NETS = {**IN_REPO, **HELD_OUT, **HELD_OUT_FROM_BOUND, **HELD_OUT_FROM_NO_NORM_WORK, **HELD_OUT_FROM_MOMENTUM_WORK,
        **HELD_OUT_FROM_DEFAULTS, **HELD_OUT_FROM_STEP_RULE, **HELD_OUT_FROM_DAMPING_SCALE}
# the report's groups of nets
GROUPS = {**{n: "in-repo nets" for n in IN_REPO}, **{n: "held-out nets" for n in HELD_OUT},
          **{n: "nets held out from the graft bound" for n in HELD_OUT_FROM_BOUND},
          **{n: "nets held out from the no-normalisation work" for n in HELD_OUT_FROM_NO_NORM_WORK},
          **{n: "nets held out from the momentum work" for n in HELD_OUT_FROM_MOMENTUM_WORK},
          **{n: "nets held out from the defaults" for n in HELD_OUT_FROM_DEFAULTS},
          **{n: "nets held out from the step-rule work" for n in HELD_OUT_FROM_STEP_RULE},
          **{n: "nets held out from the damping-scale work" for n in HELD_OUT_FROM_DAMPING_SCALE}}


def load(dataset: str):
    from compare_optimizers import load_digits_data, load_mnist1d_data

    return load_digits_data() if dataset == "digits" else load_mnist1d_data()


def describe(name: str) -> str:
    """The optimizer's constructor, as run."""
    if name == "SGD":
        return f"torch.optim.SGD(lr=lr, momentum={MOMENTUM})"
    if name == "FOOF":
        return f"fastfoof.FOOF(model, lr=lr, momentum={MOMENTUM})"
    if name == "FOOF graft=None":
        return f"fastfoof.FOOF(model, lr=1.0*lr, damping=1.0, momentum={MOMENTUM}, graft=None)"
    if name.startswith(DAMPED_FOOF):
        return f"fastfoof.FOOF(model, lr=lr, damping={float(name[len(DAMPED_FOOF):]):g}, momentum={MOMENTUM})"
    if name == KFAC:
        return f"fastfoof.KFAC(model, lr=lr, momentum={MOMENTUM})"
    raise ValueError(f"unknown optimizer {name!r}: expected one of {OPTIMIZERS}, '{DAMPED_FOOF}<damping>' or {KFAC!r}")


def make_optimizer(name: str, model: nn.Module, lr: float):
    if name.startswith(DAMPED_FOOF):
        return fastfoof.FOOF(model, lr=lr, damping=float(name[len(DAMPED_FOOF):]), momentum=MOMENTUM)
    if name == "SGD":
        return torch.optim.SGD(model.parameters(), lr=lr, momentum=MOMENTUM)
    if name == "FOOF":
        return fastfoof.FOOF(model, lr=lr, momentum=MOMENTUM)  # the defaults: graft="sgd", damping=3
    if name == "FOOF graft=None":
        damping = 1.0
        return fastfoof.FOOF(model, lr=damping * lr, damping=damping, momentum=MOMENTUM, graft=None)
    if name == KFAC:
        return fastfoof.KFAC(model, lr=lr, momentum=MOMENTUM)  # its defaults: graft="sgd", damping=1
    raise ValueError(name)


def make_schedule(name: str, optimizer, total_steps: int):
    """Stepped once per batch."""
    if name == "constant":
        return None
    if name == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=total_steps)
    if name == "onecycle":  # torch's defaults, momentum cycled between 0.85 and 0.95 too
        return torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=optimizer.param_groups[0]["lr"],
                                                   total_steps=total_steps)
    if name == "step":
        return torch.optim.lr_scheduler.MultiStepLR(optimizer, [total_steps // 2, 3 * total_steps // 4], gamma=0.1)
    if name == "warmup-linear":
        warm = max(1, total_steps // 10)
        return torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda t: (t + 1) / warm if t < warm else max(0.0, (total_steps - t) / (total_steps - warm)))
    raise ValueError(name)


@torch.no_grad()
def evaluate(model: nn.Module, x, y, batch_size: int = 1000) -> tuple[float, float]:
    """(mean cross-entropy, accuracy) over the whole set, in eval mode."""
    model.eval()
    loss, correct = 0.0, 0
    for i in range(0, len(x), batch_size):
        logits = model(x[i:i + batch_size])
        loss += F.cross_entropy(logits, y[i:i + batch_size], reduction="sum").item()
        correct += (logits.argmax(1) == y[i:i + batch_size]).sum().item()
    model.train()
    return loss / len(x), correct / len(x)


_DATA_CACHE: dict = {}


def train(net: str, schedule: str, lr: float, seed: int, optimizer_name: str, epochs: int | None = None,
          steps_per_epoch: int | None = None) -> dict:
    """One run; returns its JSON record."""
    torch.set_num_threads(1)
    dataset, make_model = NETS[net]
    if dataset not in _DATA_CACHE:
        _DATA_CACHE[dataset] = load(dataset)
    x_train, y_train, x_test, y_test = _DATA_CACHE[dataset]
    default_epochs, batch = DATA[dataset]
    epochs = epochs or default_epochs
    steps = min(len(x_train) // batch, steps_per_epoch or len(x_train))
    torch.manual_seed(seed)
    model = make_model()
    initial_loss, _ = evaluate(model, x_train, y_train)
    optimizer = make_optimizer(optimizer_name, model, lr)
    scheduler = make_schedule(schedule, optimizer, epochs * steps)
    order = torch.Generator().manual_seed(seed)  # the same batches for every optimizer
    torch.manual_seed(10_000 + seed)  # the same dropout masks (no optimizer here draws from the global RNG)
    step_seconds, epoch_losses = [], []
    for _ in range(epochs):
        perm = torch.randperm(len(x_train), generator=order)
        total = 0.0
        for i in range(steps):
            idx = perm[i * batch:(i + 1) * batch]
            start = time.process_time()  # one thread: the step's own CPU time, not the other processes'
            optimizer.zero_grad(set_to_none=True)
            loss = F.cross_entropy(model(x_train[idx]), y_train[idx])
            loss.backward()
            optimizer.step()
            if scheduler is not None:
                scheduler.step()
            step_seconds.append(time.process_time() - start)
            total += loss.item()
        epoch_losses.append(total / steps)
        if not math.isfinite(epoch_losses[-1]):
            break
    final_loss, train_accuracy = evaluate(model, x_train, y_train)
    _, test_accuracy = evaluate(model, x_test, y_test)
    return dict(net=net, held_out=net not in IN_REPO, group=GROUPS[net], held_out_schedule=schedule in HELD_OUT_SCHEDULES, dataset=dataset,
                schedule=schedule, lr=lr, seed=seed,
                optimizer=optimizer_name, epochs=epochs, batch_size=batch, steps=epochs * steps,
                initial_train_loss=initial_loss,
                final_train_loss=final_loss if math.isfinite(final_loss) else None,
                final_train_accuracy=train_accuracy, test_accuracy=test_accuracy,
                last_epoch_mean_loss=epoch_losses[-1] if math.isfinite(epoch_losses[-1]) else None,
                diverged=not (math.isfinite(final_loss) and all(math.isfinite(v) for v in epoch_losses)),
                seconds_per_step=statistics.median(step_seconds), total_step_seconds=sum(step_seconds))


def _train(job):
    return train(*job)


def machine_info(jobs: int) -> dict:
    cpu = "unknown"
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    try:
        load_average = os.getloadavg()
    except OSError:
        load_average = None
    return dict(cpu=cpu, cores=os.cpu_count(), torch=torch.__version__, python=platform.python_version(),
                torch_threads_per_process=1, processes=jobs, load_average_at_start=load_average,
                date=datetime.now(timezone.utc).isoformat(timespec="seconds"))


def run(args) -> None:
    nets = args.nets or list(NETS)
    for net in nets:
        if net not in NETS:
            raise SystemExit(f"error: unknown net {net!r}; known: {', '.join(NETS)}")
    for name in args.optimizers:
        describe(name)  # an unknown name fails before any run
    jobs = [(net, schedule, lr, seed, optimizer, args.epochs, args.steps_per_epoch)
            for net in nets for schedule in args.schedules for lr in args.lrs for seed in args.seeds
            for optimizer in args.optimizers]
    info = machine_info(args.jobs)
    started = time.perf_counter()
    records = []
    if args.jobs == 1:
        iterator = map(_train, jobs)
    else:
        import multiprocessing

        pool = multiprocessing.get_context("spawn").Pool(args.jobs)
        iterator = pool.imap_unordered(_train, jobs)
    for k, record in enumerate(iterator, 1):
        records.append(record)
        print(f"[{k}/{len(jobs)} {time.perf_counter() - started:.0f}s] {record['net']} {record['schedule']} "
              f"lr={record['lr']:g} seed={record['seed']} {record['optimizer']}: final train loss "
              f"{record['final_train_loss']} test acc {record['test_accuracy']:.3f}", flush=True)
    if args.jobs != 1:
        pool.close()
        pool.join()
    info["wall_seconds"] = time.perf_counter() - started
    info["load_average_at_end"] = os.getloadavg()
    key = lambda r: (list(NETS).index(r["net"]), ALL_SCHEDULES.index(r["schedule"]),  # noqa: E731
                      r["lr"], r["seed"], args.optimizers.index(r["optimizer"]))
    records.sort(key=key)
    settings = dict(momentum=MOMENTUM, data={d: dict(epochs=e, batch_size=b) for d, (e, b) in DATA.items()},
                    epochs_override=args.epochs, steps_per_epoch_override=args.steps_per_epoch,
                    optimizers={name: describe(name) for name in args.optimizers},
                    foof_defaults=dict(damping=inspect.signature(fastfoof.FOOF).parameters["damping"].default,
                                       graft_bound=fastfoof.FOOF.GRAFT_BOUND))
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(dict(machine=info, settings=settings, runs=records), indent=1) + "\n")
    print(f"wrote {len(records)} runs to {args.output} in {info['wall_seconds']:.0f} s")


# ---- report: JSON -> markdown ----

def _median(values):
    values = [math.inf if v is None else v for v in values]
    return statistics.median(values) if values else math.nan


def _fmt_loss(v: float) -> str:
    return "diverged" if not math.isfinite(v) else f"{v:.2e}"


def _fmt_ratio(v: float) -> str:
    return "—" if not math.isfinite(v) else f"{v:.2f}"


def cells(records: list[dict]) -> dict:
    """(net, schedule, lr) -> optimizer -> dict(loss=median over seeds, acc=mean over seeds, seeds=[losses])."""
    grouped: dict = {}
    for r in records:
        grouped.setdefault((r["net"], r["schedule"], r["lr"]), {}).setdefault(r["optimizer"], []).append(r)
    out = {}
    for key, by_opt in grouped.items():
        out[key] = {opt: dict(loss=_median([r["final_train_loss"] for r in runs]),
                              acc=statistics.mean(r["test_accuracy"] for r in runs),
                              seeds=[r["final_train_loss"] for r in sorted(runs, key=lambda r: r["seed"])])
                    for opt, runs in by_opt.items()}
    return out


def best_sgd_lrs(table: dict) -> dict:
    """(net, schedule) -> SGD's lr with the lowest median final training loss."""
    best: dict = {}
    for (net, schedule, lr), by_opt in table.items():
        loss = by_opt["SGD"]["loss"]
        if (net, schedule) not in best or loss < table[(net, schedule, best[(net, schedule)])]["SGD"]["loss"]:
            best[(net, schedule)] = lr
    return best


def _ratio(a: float, b: float) -> float:
    if not math.isfinite(a):
        return math.inf
    return a / b if math.isfinite(b) and b > 0 else 0.0


def summary(table: dict, keys: list, optimizer: str) -> dict:
    """Over the given cells: wins (optimizer's median loss below SGD's), median ratio, mean accuracy change."""
    ratios = [_ratio(table[k][optimizer]["loss"], table[k]["SGD"]["loss"]) for k in keys]
    wins = sum(table[k][optimizer]["loss"] < table[k]["SGD"]["loss"] for k in keys)
    accuracy = [100 * (table[k][optimizer]["acc"] - table[k]["SGD"]["acc"]) for k in keys]
    seed_wins = sum(f is not None and (s is None or f < s) for k in keys
                    for f, s in zip(table[k][optimizer]["seeds"], table[k]["SGD"]["seeds"]))
    seed_total = sum(len(table[k]["SGD"]["seeds"]) for k in keys)
    return dict(cells=len(keys), wins=wins, median_ratio=statistics.median(ratios) if ratios else math.nan,
                worst_ratio=max(ratios) if ratios else math.nan,
                accuracy_points=statistics.mean(accuracy) if accuracy else math.nan,
                seed_wins=seed_wins, seed_total=seed_total)


def _cell_columns(cell: dict, optimizers: list[str], per_seed: bool) -> list[str]:
    """A cell's columns after its net, schedule and lr: SGD's loss, every other optimizer's loss and its ratio to
    SGD's (the median, or every seed's), and the optimizers' test accuracies."""
    def loss(by_seed: dict) -> str:
        if per_seed:
            return " ".join(_fmt_loss(math.inf if v is None else v) for v in by_seed["seeds"])
        return _fmt_loss(by_seed["loss"])

    row = [loss(cell["SGD"])]
    for opt in (o for o in optimizers if o != "SGD"):  # "—": not run on this cell
        row += [loss(cell[opt]), _fmt_ratio(_ratio(cell[opt]["loss"], cell["SGD"]["loss"]))] if opt in cell else ["—", "—"]
    return row + [" / ".join(f"{100 * cell[o]['acc']:.1f}" if o in cell else "—" for o in optimizers)]


def _cell_header(optimizers: list[str], per_seed: bool) -> list[str]:
    suffix = " per seed" if per_seed else ""
    header = [f"SGD loss{suffix}"]
    for opt in (o for o in optimizers if o != "SGD"):
        header += [f"{opt} loss{suffix}", "ratio"]
    return header + ["test acc. % (" + " / ".join(optimizers) + ")"]


def _md_table(header: list[str], rows: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"] + \
        ["| " + " | ".join(row) + " |" for row in rows]


def report(*datas: dict) -> str:
    """Markdown from one or more sweeps' JSON (e.g. the main sweep and one of another damping, same cells).
    A cell's runs of an optimizer come from the last sweep that has them: a later sweep of "FOOF" (say,
    after its defaults changed) supersedes an earlier one's, whose SGD runs still count."""
    key = lambda r: (r["net"], r["schedule"], r["lr"], r["optimizer"])  # noqa: E731
    last = {key(r): i for i, data in enumerate(datas) for r in data["runs"]}
    records = [r for i, data in enumerate(datas) for r in data["runs"] if last[key(r)] == i]
    table = cells(records)
    best = best_sgd_lrs(table)
    nets = list(dict.fromkeys(r["net"] for r in records))
    held_out = {r["net"] for r in records if r["held_out"]}
    group_of = {r["net"]: r.get("group", "held-out nets" if r["held_out"] else "in-repo nets") for r in records}
    seeds = sorted({r["seed"] for r in records})
    lrs = sorted({r["lr"] for r in records})
    schedules = list(dict.fromkeys(r["schedule"] for r in records))
    optimizers = list(dict.fromkeys([o for o in OPTIMIZERS if any(r["optimizer"] == o for r in records)]
                                    + [r["optimizer"] for r in records]))
    others = [o for o in optimizers if o != "SGD"]
    sizes = {f"{r['dataset']}": (r["epochs"], r["batch_size"], r["steps"]) for r in records}
    kinds = " and ".join(dict.fromkeys(o.split()[0] for o in others))  # "FOOF", "FOOF and KFAC"
    out = [f"# Default {kinds} against SGD at SGD's lr ({'generated by examples/sweep_graft.py report'})", ""]
    for i, data in enumerate(datas):
        m = data["machine"]
        kept = {r["optimizer"] for r in data["runs"] if last[key(r)] == i}
        used = [name for name in data["settings"]["optimizers"] if name in kept]
        defaults = data["settings"].get("foof_defaults")
        out.append(f"{', '.join(data['settings']['optimizers'])}"
                   + (f" (FOOF's defaults then: damping {defaults['damping']:g}, graft bound {defaults['graft_bound']:g}λ)"
                      if defaults else "")
                   + ("" if len(used) == len(data["settings"]["optimizers"])
                      else f"; used here: {', '.join(used) or 'none'}")
                   + f": {len(data['runs'])} runs in "
                   f"{m['wall_seconds'] / 60:.1f} min wall on {m['cpu']}, {m['cores']} cores, torch {m['torch']} "
                   f"(one thread per process; processes at once: {m['processes']}), Python {m['python']}, {m['date']}; "
                   f"the machine was shared with other jobs (load average "
                   f"{', '.join(f'{v:.1f}' for v in m['load_average_at_start'])} at the start, "
                   f"{', '.join(f'{v:.1f}' for v in m['load_average_at_end'])} at the end).")
        out.append("")
    described = {name: text for data in datas for name, text in data["settings"]["optimizers"].items()}
    out.append("Per cell (net, schedule, lr, seed) every optimizer starts from the same weights and sees the same "
               "batches: " + "; ".join(f"`{described[o]}`" for o in optimizers) + ". "
               + "; ".join(f"{d}: {e} epochs of batch {b} ({s} steps)" for d, (e, b, s) in sizes.items())
               + f"; seeds {', '.join(map(str, seeds))}; schedules stepped every batch (cosine to 0; OneCycle with "
               "torch's defaults, which also cycle momentum). Loss: the final model's mean cross-entropy on the "
               "whole training set in eval mode, the median over the seeds (with two seeds, their mean); "
               "accuracy: test accuracy, the mean over the seeds. Ratio: the optimizer's loss ÷ SGD's. "
               "SGD's best lr: per net and schedule, the lr of SGD's lowest loss.")
    out.append("")
    held_out_schedules = {r["schedule"] for r in records if r.get("held_out_schedule")}
    groups = []  # (title, [(net, schedule)])
    for net_group in dict.fromkeys(group_of[n] for n in nets):
        for schedules_held_out in (False, True):
            pairs = [(n, s) for n in nets for s in schedules
                     if group_of[n] == net_group and (s in held_out_schedules) == schedules_held_out]
            if pairs:
                title = net_group + ", " + ("held-out schedules" if schedules_held_out else "constant / cosine / OneCycle")
                groups.append((title, pairs))
    out.append("## Summary")
    out.append("")
    rows = []
    for group, pairs in groups:
        for scope, keys in (("SGD's best lr", [(n, s, best[(n, s)]) for n, s in pairs]),
                            ("every lr", [(n, s, lr) for n, s in pairs for lr in lrs if (n, s, lr) in table])):
            for opt in (o for o in others if all(o in table[k] for k in keys)):  # rows only where it ran
                s = summary(table, keys, opt)
                rows.append([group, scope, opt, f"{s['wins']} of {s['cells']}",
                             f"{s['seed_wins']} of {s['seed_total']}",
                             _fmt_ratio(s["median_ratio"]), _fmt_ratio(s["worst_ratio"]),
                             f"{s['accuracy_points']:+.2f}"])
    out += _md_table(["nets, schedules", "lr", "optimizer", "lower loss than SGD (cells)", "(seeds)",
                      "median loss ratio", "worst ratio", "test acc. − SGD's (points, mean)"], rows)
    out.append("")
    for group, pairs in groups:
        out.append(f"## {group[0].upper()}{group[1:]}: at SGD's best lr")
        out.append("")
        rows = [[n, s, f"{best[(n, s)]:g}"] + _cell_columns(table[(n, s, best[(n, s)])], optimizers, per_seed=False)
                for n, s in pairs]
        out += _md_table(["net", "schedule", "SGD's best lr"] + _cell_header(optimizers, per_seed=False), rows)
        out.append("")
    out.append("## Every cell")
    out.append("")
    rows = []
    for n in nets:
        for s in schedules:
            for lr in lrs:
                c = table.get((n, s, lr))
                if c is None:
                    continue
                rows.append([n + (" (held out)" if n in held_out else ""),
                             s + (" (held out)" if s in held_out_schedules else ""),
                             f"{lr:g}" + (" *" if best[(n, s)] == lr else "")] + _cell_columns(c, optimizers, per_seed=True))
    out += _md_table(["net", "schedule", "lr (* SGD's best)"] + _cell_header(optimizers, per_seed=True), rows)
    out.append("")
    out.append("## Cost per step")
    out.append("")
    out.append("Per step (forward, backward, optimizer step, scheduler step), in the process's CPU time on one thread: "
               "the median step over every run of the net (for FOOF a plain step: its default T=100, S=10 observes "
               "statistics in one step of ten and inverts in one of a hundred) and the mean step (every step counted, "
               "so the observed and inverting ones too; a step that other jobs slowed down counts as well), over "
               "the runs that did not diverge. The machine was shared: read the ratios more than the milliseconds.")
    out.append("")
    rows = []
    for n in nets:
        runs = {o: [r for r in records if r["net"] == n and r["optimizer"] == o and not r["diverged"]]
                for o in optimizers}
        runs = {o: rs for o, rs in runs.items() if rs}  # an optimizer not run (or always diverged) on the net: "—"
        median = {o: 1e3 * statistics.median(r["seconds_per_step"] for r in rs) for o, rs in runs.items()}
        mean = {o: 1e3 * sum(r["total_step_seconds"] for r in rs) / sum(r["steps"] for r in rs)
                for o, rs in runs.items()}
        parameters = sum(p.numel() for p in NETS[n][1]().parameters()) if n in NETS else None
        rows.append([n, f"{parameters:,}" if parameters is not None else "—",
                     f"{median['SGD']:.2f} / {mean['SGD']:.2f}"]
                    + [f"{median[o]:.2f} / {mean[o]:.2f} "
                       f"({median[o] / median['SGD']:.2f}× / {mean[o] / mean['SGD']:.2f}×)" if o in runs else "—"
                       for o in others])
    out += _md_table(["net", "parameters", "SGD ms (median / mean)"]
                     + [f"{o} ms (median / mean; ÷ SGD's)" for o in others], rows)
    out.append("")
    return "\n".join(out)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    r = sub.add_parser("run", help="train every run and write the JSON")
    r.add_argument("-o", "--output", type=Path, default=Path("graft_sweep.json"))
    r.add_argument("--jobs", type=int, default=2, help="processes at once, one torch thread each")
    r.add_argument("--nets", nargs="+", help=f"default: all of {list(NETS)}")
    r.add_argument("--schedules", nargs="+", choices=ALL_SCHEDULES, default=list(ALL_SCHEDULES))
    r.add_argument("--lrs", nargs="+", type=float, default=list(LRS))
    r.add_argument("--seeds", nargs="+", type=int, default=list(SEEDS))
    r.add_argument("--epochs", type=int, help=f"default per dataset: {DATA}")
    r.add_argument("--steps-per-epoch", type=int, help="default: the whole training set")
    r.add_argument("--optimizers", nargs="+", default=list(OPTIMIZERS),
                   help=f"default: {' '.join(OPTIMIZERS)}; also '{DAMPED_FOOF}<damping>' (grafted FOOF at that "
                        f"damping) and '{KFAC}' (KFAC's defaults)")
    p = sub.add_parser("report", help="markdown tables from the JSON")
    p.add_argument("json", type=Path, nargs="+", help="one sweep, or several over the same cells")
    p.add_argument("-o", "--output", type=Path, help="default: print")
    args = parser.parse_args(argv)
    if args.command == "run":
        run(args)
    else:
        text = report(*(json.loads(path.read_text()) for path in args.json))
        if args.output:
            args.output.write_text(text)
        else:
            print(text)


if __name__ == "__main__":
    main()
