"""Backends run a sweep's trials on an existing engine. Chosen by name, imported only when chosen, so a SLURM
sweep imports no Ray (unless under ASHA, where a local Tune decides) and the reverse."""
from __future__ import annotations

import importlib

from .base import Backend, Events

BACKENDS = {"ray": ("ray_tune", "RayTuneBackend"), "slurm": ("slurm", "SlurmBackend")}


def get_backend(name: str) -> type[Backend]:
    if name not in BACKENDS:
        raise ValueError(f"unknown backend {name!r}; valid: {', '.join(BACKENDS)}")
    module, cls = BACKENDS[name]
    return getattr(importlib.import_module(f"{__name__}.{module}"), cls)


__all__ = ["Backend", "Events", "get_backend", "BACKENDS"]
