"""The ResNet/plain-net body shared by the CIFAR (Sec. 4.2) and ImageNet (Table 1) families.

A net is a stem, stages of ``ResidualBlock`` (the first block of a stage may stride and widen), an optional
final activation (pre-activation nets need one after their last addition), global average pool and a linear
classifier. Models know nothing of data or training.
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from .blocks import PREACT_UNITS, UNITS, ResidualBlock, conv3x3


def cifar_stem(out_channels: int, unit: str) -> nn.Sequential:
    """3x3 conv; pre-activation units move this conv's BN/ReLU into their first block."""
    layers: list[nn.Module] = [conv3x3(3, out_channels)]
    if unit != "full_preact":
        layers.append(nn.BatchNorm2d(out_channels))
    if unit not in PREACT_UNITS:
        layers.append(nn.ReLU(inplace=True))
    return nn.Sequential(*layers)


def imagenet_stem(out_channels: int) -> nn.Sequential:
    """7x7/2 conv 64, BN, ReLU, 3x3/2 max pool (Table 1, conv1 + the start of conv2_x)."""
    return nn.Sequential(nn.Conv2d(3, out_channels, 7, stride=2, padding=3, bias=False),
                         nn.BatchNorm2d(out_channels), nn.ReLU(inplace=True),
                         nn.MaxPool2d(3, stride=2, padding=1))


def final_activation(channels: int, unit: str) -> nn.Module:
    """The extra activation after the last addition of a pre-activation net (Identity Mappings, Sec. 4)."""
    if unit == "full_preact":
        return nn.Sequential(nn.BatchNorm2d(channels), nn.ReLU(inplace=True))
    if unit == "relu_only_preact":
        return nn.ReLU(inplace=True)
    return nn.Identity()


class ResNet(nn.Module):
    """A residual (or, with ``plain=True``, plain) network.

    Args:
        blocks_per_stage: residual units in each stage, e.g. (3, 3, 3) for ResNet-20.
        widths: output channels of each stage before bottleneck expansion, e.g. (16, 32, 64).
        stem: "cifar" (3x3 conv, input 32x32) or "imagenet" (7x7/2 conv + max pool, input 224x224).
        bottleneck: 1x1-3x3-1x1 units with 4x expansion instead of two 3x3 convs.
        shortcut: "A" | "B" | "C" (Sec. 3.3). Plain nets have none; leave it at "A".
        unit: where BN/ReLU sit in a unit (Identity Mappings Fig. 4); plain nets use "original".
        stride_in_1x1: bottlenecks stride in their first 1x1 conv (the 2016 paper) or in the 3x3.
        zero_init_residual: zero the last BN of every branch. Off by default: the paper does not use it.
    """

    def __init__(self, blocks_per_stage: Sequence[int], widths: Sequence[int], *, stem: str = "cifar",
                 bottleneck: bool = False, shortcut: str = "A", plain: bool = False, unit: str = "original",
                 num_classes: int = 10, stride_in_1x1: bool = False, zero_init_residual: bool = False,
                 depth: int | None = None):
        super().__init__()
        check_options(shortcut, plain, unit, stem)
        expansion = 4 if bottleneck else 1
        self.depth = depth
        self.unit, self.bottleneck = unit, bottleneck  # what tables name a net by (orchestrator.runs)
        self.input_size = 32 if stem == "cifar" else 224
        self.num_classes = num_classes
        stem_width = widths[0] if stem == "cifar" else 64
        self.stem = cifar_stem(stem_width, unit) if stem == "cifar" else imagenet_stem(stem_width)
        stages, channels = [], stem_width
        for index, (count, width) in enumerate(zip(blocks_per_stage, widths)):
            out_channels, stride = width * expansion, 1 if index == 0 else 2
            blocks = []
            for b in range(count):
                blocks.append(ResidualBlock(channels, out_channels, stride if b == 0 else 1,
                                            shortcut=None if plain else shortcut, unit=unit,
                                            bottleneck=bottleneck, stride_in_1x1=stride_in_1x1,
                                            first_of_stage=b == 0))
                channels = out_channels
            stages.append(nn.Sequential(*blocks))
        self.stages = nn.Sequential(*stages)
        self.final_activation = final_activation(channels, unit)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(channels, num_classes)
        self.reset_parameters(zero_init_residual)

    def reset_parameters(self, zero_init_residual: bool = False) -> None:
        """He (MSRA) init for convs (He et al. 2015, as the paper uses), BN to identity."""
        if self.fc.weight.is_meta:  # shapes only (parameter and multiply-add counts): meta init took ~0.3 s a net
            return
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        if zero_init_residual:
            for m in self.modules():
                if isinstance(m, ResidualBlock):
                    m.zero_init_last()

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.final_activation(self.stages(self.stem(x)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(self.pool(self.features(x)), 1))


def check_options(shortcut: str, plain: bool, unit: str, stem: str) -> None:
    if stem not in ("cifar", "imagenet"):
        raise ValueError(f"unknown stem {stem!r}; valid: cifar, imagenet")
    if unit not in UNITS:
        raise ValueError(f"unknown unit {unit!r}; valid: {', '.join(UNITS)}")
    if shortcut not in ("A", "B", "C"):
        raise ValueError(f"unknown shortcut {shortcut!r}; valid: A, B, C")
    if plain and shortcut != "A":
        raise ValueError(f"a plain net has no shortcuts, so shortcut={shortcut!r} has no meaning; leave it at 'A'")
    if plain and unit != "original":
        raise ValueError(f"a plain net has no addition, so unit={unit!r} has no meaning; use 'original'")
    if stem == "imagenet" and unit != "original":
        raise ValueError("pre-activation units are built for the CIFAR family only (Identity Mappings, Sec. 4)")
