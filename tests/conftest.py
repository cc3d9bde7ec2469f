"""Shared test set-up. Tests run on CPU; GPU tests carry the `gpu` marker and skip without CUDA."""
from __future__ import annotations

import functools
import os
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"

if "PYTEST_XDIST_WORKER" in os.environ:
    torch.set_num_threads(1)  # 2 workers share 2 cores
    os.environ.pop("COLUMNS", None)  # a worker gets COLUMNS=80: rich tables would squash what serial runs print
else:
    torch.set_num_threads(2)

pytest_plugins = ["slurm_cluster"]  # the session-wide local 2-node SLURM cluster fixture (tests/slurm_cluster.py)


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (none on this machine)")
    for item in items:
        if item.get_closest_marker("gpu"):
            item.add_marker(skip)


def pytest_xdist_make_scheduler(config, log):
    """The tests run on 2 pytest-xdist workers (-n 2 in pyproject.toml); a scope runs on one worker, in order.
    Each file is a scope: its tests share module fixtures and fixed ports (DeepSpeed's rendezvous). Every file of
    the one SLURM cluster is one scope: a test that kills a node's slurmd must not run beside another's job there.
    (Not xdist_group marks: pytest 9.2 ignores the node ids pytest-xdist 3.8 rewrites for them.)"""
    from xdist.scheduler import LoadScopeScheduling

    class FileOrClusterScheduling(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            file = nodeid.split("::", 1)[0]
            return "the SLURM cluster" if uses_the_slurm_cluster(file) else file

    return FileOrClusterScheduling(config, log)


@functools.cache
def uses_the_slurm_cluster(file: str) -> bool:
    return "slurm_cluster" in (REPO / file).read_text()
