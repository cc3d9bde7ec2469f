"""Parameter and multiply-add counts, as the paper reports them (Table 1 "FLOPs" are multiply-adds).

The model runs once on the ``meta`` device: shapes propagate, nothing is computed or allocated, so even
ResNet-1202 is counted in milliseconds.
"""
from __future__ import annotations

import copy

import torch
from torch import nn


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def count_multiply_adds(model: nn.Module, input_size: int | None = None) -> int:
    """Multiply-adds of convolutions and linear layers for one image (BN, ReLU, pooling and adds excluded)."""
    size = input_size or getattr(model, "input_size", 224)
    on_meta = next(model.parameters()).is_meta
    meta_model = model if on_meta else copy.deepcopy(model).to("meta")
    total = 0

    def conv_hook(module: nn.Conv2d, _inputs, output: torch.Tensor) -> None:
        nonlocal total
        kh, kw = module.kernel_size
        total += output[0].numel() * (module.in_channels // module.groups) * kh * kw

    def linear_hook(module: nn.Linear, _inputs, _output) -> None:
        nonlocal total
        total += module.in_features * module.out_features

    hooks = [m.register_forward_hook(conv_hook if isinstance(m, nn.Conv2d) else linear_hook)
             for m in meta_model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    norms = [m for m in meta_model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    for m in norms:  # they count nothing, and a batch norm on meta takes ~2.5 ms (the table took 13 s)
        m.forward = _unchanged
    was_training = meta_model.training
    try:
        with torch.no_grad():
            meta_model.eval()(torch.empty(1, 3, size, size, device="meta"))
    finally:
        for h in hooks:
            h.remove()
        for m in norms:
            del m.forward
        meta_model.train(was_training)
    return total


def _unchanged(x: torch.Tensor) -> torch.Tensor:
    return x
