"""Residual units of He et al. 2016 (Sec. 3.3) and of "Identity Mappings in Deep Residual Networks" (Fig. 4).

One block class covers every unit of both papers: a residual branch of 2 (basic) or 3 (bottleneck) convolutions
whose BN/ReLU placement is set by ``unit``, plus a shortcut chosen by the paper's option A/B/C. A plain block
(``shortcut=None``) is the same branch with no addition, so a plain net and its option-A ResNet have equal
parameters, as in the paper's Fig. 6 comparison.
"""
from __future__ import annotations

import torch
from torch import nn
import torch.nn.functional as F

SHORTCUT_OPTIONS = ("A", "B", "C")
UNITS = ("original", "bn_after_add", "relu_before_add", "relu_only_preact", "full_preact")
PREACT_UNITS = ("relu_only_preact", "full_preact")


class ZeroPadShortcut(nn.Module):
    """Option A: identity; where the shape changes, subsample by ``stride`` and zero-pad the new channels.

    A real module (not a lambda) so models pickle for torch.save, Ray and submitit. It has no parameters.
    """

    def __init__(self, in_channels: int, out_channels: int, stride: int):
        super().__init__()
        if out_channels < in_channels:
            raise ValueError(f"option A cannot shrink channels ({in_channels} -> {out_channels})")
        self.extra_channels = out_channels - in_channels
        self.stride = stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.stride != 1:
            x = x[:, :, :: self.stride, :: self.stride]
        if self.extra_channels:
            x = F.pad(x, (0, 0, 0, 0, 0, self.extra_channels))  # pads the channel dimension at its end
        return x

    def extra_repr(self) -> str:
        return f"stride={self.stride}, extra_channels={self.extra_channels}"


def conv3x3(in_channels: int, out_channels: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False)


def conv1x1(in_channels: int, out_channels: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False)


def make_shortcut(option: str, in_channels: int, out_channels: int, stride: int, with_bn: bool) -> nn.Module:
    """Option A zero-pads, B projects only where the shape changes, C projects on every block."""
    if option not in SHORTCUT_OPTIONS:
        raise ValueError(f"unknown shortcut {option!r}; valid: {', '.join(SHORTCUT_OPTIONS)}")
    shape_changes = stride != 1 or in_channels != out_channels
    if option == "C" or (option == "B" and shape_changes):
        projection = conv1x1(in_channels, out_channels, stride)
        return nn.Sequential(projection, nn.BatchNorm2d(out_channels)) if with_bn else projection
    if option == "A" and shape_changes:
        return ZeroPadShortcut(in_channels, out_channels, stride)
    return nn.Identity()


def branch_convs(in_channels: int, out_channels: int, stride: int, bottleneck: bool,
                 stride_in_1x1: bool) -> list[nn.Conv2d]:
    """The convolutions of a residual branch. A bottleneck is 1x1 reduce, 3x3, 1x1 expand (4x)."""
    if not bottleneck:
        return [conv3x3(in_channels, out_channels, stride), conv3x3(out_channels, out_channels)]
    mid = out_channels // 4
    # The original paper strides in the first 1x1 (Table 1 FLOPs); pre-act CIFAR nets stride in the 3x3.
    s1, s3 = (stride, 1) if stride_in_1x1 else (1, stride)
    return [conv1x1(in_channels, mid, s1), conv3x3(mid, mid, s3), conv1x1(mid, out_channels)]


def _bn_relu(channels: int) -> list[nn.Module]:
    return [nn.BatchNorm2d(channels), nn.ReLU(inplace=True)]


def unit_layers(convs: list[nn.Conv2d], unit: str) -> tuple[list[nn.Module], list[nn.Module], list[nn.Module]]:
    """Place BN and ReLU around ``convs`` as unit ``unit`` does: returns (pre-activation, branch, after-add)."""
    if unit not in UNITS:
        raise ValueError(f"unknown unit {unit!r}; valid: {', '.join(UNITS)}")
    pre, branch = [], []
    last = len(convs) - 1
    for i, conv in enumerate(convs):
        c_in, c_out = conv.in_channels, conv.out_channels
        if unit == "full_preact":
            (pre if i == 0 else branch).extend(_bn_relu(c_in))
        elif unit == "relu_only_preact":
            (pre if i == 0 else branch).append(nn.ReLU(inplace=i > 0))
        branch.append(conv)
        if unit == "relu_only_preact" or unit in ("original", "relu_before_add") or (
                unit == "bn_after_add" and i < last):
            branch.append(nn.BatchNorm2d(c_out))
        if i < last and unit in ("original", "bn_after_add", "relu_before_add"):
            branch.append(nn.ReLU(inplace=True))
    out_channels = convs[-1].out_channels
    after_add = {"original": [nn.ReLU(inplace=True)],
                 "bn_after_add": _bn_relu(out_channels),
                 "relu_before_add": [],
                 "relu_only_preact": [],
                 "full_preact": []}[unit]
    if unit == "relu_before_add":
        branch.append(nn.ReLU(inplace=True))
    return pre, branch, after_add


class ResidualBlock(nn.Module):
    """One unit: ``after_add(branch(pre(x)) + shortcut(x))``; ``shortcut=None`` makes it a plain block."""

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1, *, shortcut: str | None = "A",
                 unit: str = "original", bottleneck: bool = False, stride_in_1x1: bool = False,
                 first_of_stage: bool = False):
        super().__init__()
        convs = branch_convs(in_channels, out_channels, stride, bottleneck, stride_in_1x1)
        pre, branch, after_add = unit_layers(convs, unit)
        self.pre = nn.Sequential(*pre)
        self.branch = nn.Sequential(*branch)
        self.after_add = nn.Sequential(*after_add)
        preact = unit in PREACT_UNITS
        # Pre-activation nets project the pre-activated tensor without a BN of its own (Identity Mappings code).
        self.shortcut = None if shortcut is None else make_shortcut(
            shortcut, in_channels, out_channels, stride, with_bn=not preact)
        # Identity Mappings (Sec. 4): the first unit after conv1 activates "before splitting into two paths"; its
        # authors' code does so at every stage's first unit (the shortcut subsamples or projects the activated
        # tensor), and a projection always takes it. The other units' identity carries the raw sum.
        self.shortcut_takes_preact = preact and self.shortcut is not None and (
            first_of_stage or any(True for _ in self.shortcut.parameters()))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pre = self.pre(x)
        out = self.branch(pre)
        if self.shortcut is not None:
            out = out + self.shortcut(pre if self.shortcut_takes_preact else x)
        return self.after_add(out)

    def zero_init_last(self) -> None:
        """Start the block as an identity (Goyal et al.): zero the last BN (or conv) of the branch."""
        last = [m for m in self.branch if isinstance(m, (nn.BatchNorm2d, nn.Conv2d))][-1]
        nn.init.zeros_(last.weight)
