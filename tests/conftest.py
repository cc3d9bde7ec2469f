"""Shared test set-up. Tests run on CPU; GPU tests carry the `gpu` marker and skip without CUDA."""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"

torch.set_num_threads(1 if "PYTEST_XDIST_WORKER" in os.environ else 2)  # 2 workers share 2 cores

pytest_plugins = ["slurm_cluster"]  # the session-wide local 2-node SLURM cluster fixture (tests/slurm_cluster.py)


def pytest_collection_modifyitems(config, items):
    skip = None if torch.cuda.is_available() else pytest.mark.skip(reason="needs a CUDA GPU (none on this machine)")
    grouped = config.pluginmanager.hasplugin("xdist")  # absent on the GPU machine
    for item in items:
        if skip and item.get_closest_marker("gpu"):
            item.add_marker(skip)
        if grouped:
            item.add_marker(pytest.mark.xdist_group(parallel_group(item)))


def parallel_group(item: pytest.Item) -> str:
    """The tests run on 2 pytest-xdist workers (-n 2 --dist loadgroup in pyproject.toml); a group runs on one
    worker, in order. Every test of the one SLURM cluster is one group: a test that kills a node's slurmd must not
    run beside a test whose job is on that node. Each other file is a group, as its tests share module fixtures
    and fixed ports (DeepSpeed's rendezvous)."""
    return "slurm" if "slurm_cluster" in item.fixturenames else item.path.name
