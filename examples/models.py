"""Models for the examples and benchmarks, defined here so that torchvision is not needed.

`resnet18` follows torchvision's ResNet-18 (same module names, BasicBlock, initialisation) with the
usual CIFAR stem: a 3x3 stride-1 first convolution and no max-pool, for 32x32 inputs. `width` is the
first stage's channel count (torchvision's 64); smoke runs use a narrow one.

`MNIST1DConvNet` and `MNIST1DMLP` are the MNIST-1D benchmark's own CNN and MLP (Greydanus 2020,
`ConvBase` and `MLPBase` of its notebooks/models.py), for [N, 1, 40] signals.
"""
from __future__ import annotations

from torch import nn


class SmallConvNet(nn.Module):
    """Three 3x3 conv-BN-ReLU stages and a linear classifier; any input size (global average pool)."""

    def __init__(self, in_channels: int = 1, num_classes: int = 10, width: int = 32):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, width, 3, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU(inplace=True),
            nn.Conv2d(width, 2 * width, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(2 * width),
            nn.ReLU(inplace=True),
            nn.Conv2d(2 * width, 2 * width, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(2 * width),
            nn.ReLU(inplace=True),
            nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        )
        self.classifier = nn.Linear(2 * width, num_classes)

    def forward(self, x):
        return self.classifier(self.features(x))


class MNIST1DConvNet(nn.Module):
    """Three Conv1d of 25 channels (kernel 5 stride 2, then kernel 3 stride 2 twice; padding 1) with ReLU,
    and a linear classifier on the flattened 25 x 5 features of a length-40 signal. No normalisation."""

    def __init__(self, channels: int = 25, num_classes: int = 10):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv1d(1, channels, 5, stride=2, padding=1), nn.ReLU(),
            nn.Conv1d(channels, channels, 3, stride=2, padding=1), nn.ReLU(),
            nn.Conv1d(channels, channels, 3, stride=2, padding=1), nn.ReLU(),
            nn.Flatten(),
        )
        self.classifier = nn.Linear(5 * channels, num_classes)

    def forward(self, x):
        return self.classifier(self.features(x))


class MNIST1DMLP(nn.Module):
    """Two hidden layers of 100 ReLU units, the second one residual, on the flattened length-40 signal."""

    def __init__(self, length: int = 40, hidden: int = 100, num_classes: int = 10):
        super().__init__()
        self.hidden1 = nn.Linear(length, hidden)
        self.hidden2 = nn.Linear(hidden, hidden)
        self.classifier = nn.Linear(hidden, num_classes)

    def forward(self, x):
        h = self.hidden1(x.flatten(1)).relu()
        h = h + self.hidden2(h).relu()
        return self.classifier(h)


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, inplanes: int, planes: int, stride: int = 1, downsample: nn.Module | None = None):
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(planes, planes, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = downsample

    def forward(self, x):
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)


class ResNet(nn.Module):
    def __init__(self, layers: tuple[int, ...] = (2, 2, 2, 2), num_classes: int = 10, in_channels: int = 3,
                 width: int = 64):
        super().__init__()
        self.inplanes = width
        self.conv1 = nn.Conv2d(in_channels, width, 3, stride=1, padding=1, bias=False)  # CIFAR stem
        self.bn1 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.Identity()  # CIFAR stem: 32x32 inputs keep their resolution
        self.layer1 = self._make_layer(width, layers[0])
        self.layer2 = self._make_layer(2 * width, layers[1], stride=2)
        self.layer3 = self._make_layer(4 * width, layers[2], stride=2)
        self.layer4 = self._make_layer(8 * width, layers[3], stride=2)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(8 * width, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def _make_layer(self, planes: int, blocks: int, stride: int = 1) -> nn.Sequential:
        downsample = None
        if stride != 1 or self.inplanes != planes:
            downsample = nn.Sequential(nn.Conv2d(self.inplanes, planes, 1, stride=stride, bias=False),
                                       nn.BatchNorm2d(planes))
        layers = [BasicBlock(self.inplanes, planes, stride, downsample)]
        self.inplanes = planes
        layers += [BasicBlock(planes, planes) for _ in range(1, blocks)]
        return nn.Sequential(*layers)

    def forward(self, x):
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(self.avgpool(x).flatten(1))


def resnet18(num_classes: int = 10, in_channels: int = 3, width: int = 64) -> ResNet:
    return ResNet((2, 2, 2, 2), num_classes, in_channels, width)
