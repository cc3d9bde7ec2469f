"""resnet_core: what a compute node needs — the paper's models, data loaders and the training function.

It never imports the orchestrator (see docs/architecture.md).
"""
from .models import count_multiply_adds, count_parameters, create_model, list_models

__all__ = ["create_model", "list_models", "count_parameters", "count_multiply_adds"]
