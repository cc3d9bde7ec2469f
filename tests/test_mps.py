"""CUDA MPS is started for packed trials when the machine has it, and says why not otherwise."""
from __future__ import annotations

import os

import pytest
import torch

from orchestrator.mps import MPS_ENV, cuda_client_fails, mps_daemon


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU path")
def test_without_a_gpu_mps_is_not_started_and_the_reason_is_said(monkeypatch):
    for name in MPS_ENV:
        monkeypatch.delenv(name, raising=False)
    said = []
    with mps_daemon(said.append) as started:
        assert started is False
        assert not any(os.environ.get(name) for name in MPS_ENV)
    assert len(said) == 1 and "not started" in said[0] and "time-slice" in said[0]


def test_orchestrate_mps_0_keeps_it_off_and_says_so(monkeypatch):
    for name in MPS_ENV:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("ORCHESTRATE_MPS", "0")
    said = []
    with mps_daemon(said.append) as started:
        assert started is False and not any(os.environ.get(name) for name in MPS_ENV)
    assert said == ["CUDA MPS: not started (ORCHESTRATE_MPS=0); packed trials time-slice the GPU"]


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU path")
def test_the_cuda_client_probe_says_why_it_failed():
    reason = cuda_client_fails(dict(os.environ), timeout=120)
    assert reason and ("CUDA" in reason or "NVIDIA" in reason), reason


@pytest.mark.gpu
def test_with_a_gpu_mps_runs_for_the_block_and_stops_after(monkeypatch):
    for name in MPS_ENV:
        monkeypatch.delenv(name, raising=False)
    said = []
    with mps_daemon(said.append) as started:
        if not started:
            pytest.skip(said[0])
        pipe = os.environ["CUDA_MPS_PIPE_DIRECTORY"]
        assert os.path.exists(os.path.join(pipe, "control"))
    assert "CUDA_MPS_PIPE_DIRECTORY" not in os.environ and not os.path.exists(pipe)
