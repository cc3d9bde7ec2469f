"""Shared test set-up. Tests run on CPU; GPU tests carry the `gpu` marker and skip without CUDA."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"

torch.set_num_threads(2)

pytest_plugins = ["slurm_cluster"]  # the session-wide local 2-node SLURM cluster fixture (tests/slurm_cluster.py)


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (none on this machine)")
    for item in items:
        if item.get_closest_marker("gpu"):
            item.add_marker(skip)
