"""The ImageNet networks of He et al. 2016, Table 1: ResNet-18/34 (basic), 50/101/152 (bottleneck), plain-18/34.

Bottlenecks stride in their first 1x1 conv, as the paper's nets do (this is what gives Table 1's FLOPs;
torchvision's "v1.5" strides in the 3x3 and costs ~8% more). Shortcuts default to option A for 18/34, as in the
paper's plain-vs-residual comparison (Table 2), and option B for 50/101/152 (Sec. 3.3).
"""
from __future__ import annotations

from .registry import register_model
from .resnet import ResNet

IMAGENET_WIDTHS = (64, 128, 256, 512)
STAGES = {18: (2, 2, 2, 2), 34: (3, 4, 6, 3), 50: (3, 4, 6, 3), 101: (3, 4, 23, 3), 152: (3, 8, 36, 3)}


def imagenet_resnet(depth: int, *, shortcut: str | None = None, plain: bool = False, num_classes: int = 1000,
                    zero_init_residual: bool = False) -> ResNet:
    if depth not in STAGES:
        raise ValueError(f"ImageNet depth {depth} is not one of Table 1's: {', '.join(map(str, STAGES))}")
    bottleneck = depth >= 50
    if shortcut is None:
        shortcut = "B" if bottleneck else "A"
    return ResNet(STAGES[depth], IMAGENET_WIDTHS, stem="imagenet", bottleneck=bottleneck, shortcut=shortcut,
                  plain=plain, num_classes=num_classes, stride_in_1x1=True,
                  zero_init_residual=zero_init_residual, depth=depth)


@register_model
def resnet18(**kw): return imagenet_resnet(**{"depth": 18, **kw})
@register_model
def resnet34(**kw): return imagenet_resnet(**{"depth": 34, **kw})
@register_model
def resnet50(**kw): return imagenet_resnet(**{"depth": 50, **kw})
@register_model
def resnet101(**kw): return imagenet_resnet(**{"depth": 101, **kw})
@register_model
def resnet152(**kw): return imagenet_resnet(**{"depth": 152, **kw})
@register_model
def plain18(**kw): return imagenet_resnet(**{"depth": 18, "plain": True, **kw})
@register_model
def plain34(**kw): return imagenet_resnet(**{"depth": 34, "plain": True, **kw})
