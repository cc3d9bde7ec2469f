"""The CIFAR-10 networks of He et al. 2016 (Sec. 4.2) and Identity Mappings (Table 2).

Depth 6n+2 for basic units (3 stages x n units x 2 convs + first conv + classifier), 9n+2 for bottlenecks.
Widths 16/32/64 on maps 32/16/8. The paper's CIFAR runs use option A everywhere.
"""
from __future__ import annotations

from .registry import register_model
from .resnet import ResNet

CIFAR_WIDTHS = (16, 32, 64)


def units_per_stage(depth: int, bottleneck: bool) -> int:
    layers_per_unit = 3 if bottleneck else 2
    step = 3 * layers_per_unit
    if depth < step + 2 or (depth - 2) % step:
        form = "9n+2" if bottleneck else "6n+2"
        raise ValueError(f"depth {depth} is not {form} (n >= 1), as CIFAR {'bottleneck ' if bottleneck else ''}"
                         f"ResNets need: try {step + 2}, {2 * step + 2}, {3 * step + 2}, ...")
    return (depth - 2) // step


def cifar_resnet(depth: int = 20, *, bottleneck: bool = False, shortcut: str = "A", plain: bool = False,
                 unit: str = "original", num_classes: int = 10, zero_init_residual: bool = False) -> ResNet:
    n = units_per_stage(depth, bottleneck)
    return ResNet((n, n, n), CIFAR_WIDTHS, stem="cifar", bottleneck=bottleneck, shortcut=shortcut, plain=plain,
                  unit=unit, num_classes=num_classes, zero_init_residual=zero_init_residual, depth=depth)


@register_model
def resnet_cifar(**kw) -> ResNet:
    """Any 6n+2 (or, with bottleneck=True, 9n+2) depth: ``create_model("resnet_cifar", depth=D)``."""
    return cifar_resnet(**kw)


@register_model
def plain_cifar(**kw) -> ResNet:
    return cifar_resnet(**{"plain": True, **kw})


@register_model
def resnet20(**kw): return cifar_resnet(**{"depth": 20, **kw})
@register_model
def resnet32(**kw): return cifar_resnet(**{"depth": 32, **kw})
@register_model
def resnet44(**kw): return cifar_resnet(**{"depth": 44, **kw})
@register_model
def resnet56(**kw): return cifar_resnet(**{"depth": 56, **kw})
@register_model
def resnet110(**kw): return cifar_resnet(**{"depth": 110, **kw})
@register_model
def resnet1202(**kw): return cifar_resnet(**{"depth": 1202, **kw})


@register_model
def plain20(**kw): return cifar_resnet(**{"depth": 20, "plain": True, **kw})
@register_model
def plain32(**kw): return cifar_resnet(**{"depth": 32, "plain": True, **kw})
@register_model
def plain44(**kw): return cifar_resnet(**{"depth": 44, "plain": True, **kw})
@register_model
def plain56(**kw): return cifar_resnet(**{"depth": 56, "plain": True, **kw})
@register_model
def plain110(**kw): return cifar_resnet(**{"depth": 110, "plain": True, **kw})


# Identity Mappings: full pre-activation; the bottleneck nets (9n+2) project where shapes change (option B).
@register_model
def preact_resnet110(**kw): return cifar_resnet(**{"depth": 110, "unit": "full_preact", **kw})
@register_model
def preact_resnet164(**kw):
    return cifar_resnet(**{"depth": 164, "bottleneck": True, "shortcut": "B", "unit": "full_preact", **kw})
@register_model
def preact_resnet1001(**kw):
    return cifar_resnet(**{"depth": 1001, "bottleneck": True, "shortcut": "B", "unit": "full_preact", **kw})
