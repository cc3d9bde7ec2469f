"""resnet_core: what a compute node needs — the paper's models, data loaders and the training function.

It never imports the orchestrator (see docs/architecture.md). The model functions below load on first use, so
that what needs only the config or the tracking helpers (`orchestrate status`) does not import torch (2.4 s).
"""
import importlib

__all__ = ["create_model", "list_models", "count_parameters", "count_multiply_adds"]


def __getattr__(name: str):
    if name in __all__:
        return getattr(importlib.import_module(".models", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
