"""Training memory of a model, counted on the ``meta`` device (nothing allocated): what packing trials onto one
GPU must know before it starts them.

A training step holds the weights, their gradients and the momentum buffers, plus every tensor the forward pass
saves for the backward pass (counted through autograd's saved-tensor hooks, each tensor once, the weights left
out), plus the backward pass's own temporaries (bounded here by twice the largest saved tensor).
"""
from __future__ import annotations

import copy

import torch
from torch import nn

PARAM_COPIES = 3  # weights, gradients, SGD momentum


def saved_activation_bytes(model: nn.Module, batch_size: int, input_size: int | None = None) -> tuple[int, int]:
    """(bytes of the tensors one training forward saves for backward, bytes of the largest), at fp32: an upper
    bound for bf16 and fp16."""
    size = input_size or getattr(model, "input_size", 224)
    on_meta = next(model.parameters()).is_meta
    meta_model = model if on_meta else copy.deepcopy(model).to("meta")
    weights = {id(p) for p in meta_model.parameters()}
    seen: set[int] = set()
    kept: list[torch.Tensor] = []  # held until the end so ids stay unique
    total = largest = 0

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        nonlocal total, largest
        if id(tensor) in weights or id(tensor) in seen:
            return tensor
        seen.add(id(tensor))
        kept.append(tensor)
        nbytes = tensor.numel() * tensor.element_size()
        total += nbytes
        largest = max(largest, nbytes)
        return tensor

    was_training = meta_model.training
    meta_model.train()
    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            meta_model(torch.empty(batch_size, 3, size, size, device="meta"))
    finally:
        meta_model.train(was_training)
    return total, largest


def training_memory_bytes(model: nn.Module, batch_size: int, input_size: int | None = None) -> int:
    """Peak bytes a training step of this model needs on its device (CUDA context not included)."""
    params = sum(p.numel() for p in model.parameters()) * 4 * PARAM_COPIES
    saved, largest = saved_activation_bytes(model, batch_size, input_size)
    return params + saved + 2 * largest
