"""CUDA MPS for trials packed onto one GPU (fractional ``resources.gpus`` on the Ray backend).

Without MPS, processes on one GPU time-slice it; with MPS their kernels run concurrently. Measured on an H100
(../shared/docs/gpu.md): 4 CUDA-graph ResNet-20 trials 71k img/s without MPS, 108.5k with it.
"""
from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
import tempfile
from typing import Callable, Iterator

MPS_ENV = ("CUDA_MPS_PIPE_DIRECTORY", "CUDA_MPS_LOG_DIRECTORY")


def mps_unavailable_reason() -> str | None:
    if os.environ.get("ORCHESTRATE_MPS") == "0":
        return "ORCHESTRATE_MPS=0"
    if shutil.which("nvidia-cuda-mps-control") is None:
        return "nvidia-cuda-mps-control is not installed"
    import torch
    if not torch.cuda.is_available():
        return "no CUDA GPU"
    return None


@contextlib.contextmanager
def mps_daemon(say: Callable[[str], None]) -> Iterator[bool]:
    """Start an MPS control daemon for the processes started inside the block (they inherit its pipe folder)."""
    if all(os.environ.get(name) for name in MPS_ENV):
        say(f"CUDA MPS: using the daemon at {os.environ['CUDA_MPS_PIPE_DIRECTORY']}")
        yield True
        return
    reason = mps_unavailable_reason()
    if reason:
        say(f"CUDA MPS: not started ({reason}); packed trials time-slice the GPU")
        yield False
        return
    # A short path: MPS's unix sockets live in the pipe folder and socket paths are limited to ~100 bytes.
    root = tempfile.mkdtemp(prefix="mps-")
    env = {"CUDA_MPS_PIPE_DIRECTORY": f"{root}/pipe", "CUDA_MPS_LOG_DIRECTORY": f"{root}/log"}
    for folder in env.values():
        os.makedirs(folder)
    daemon = subprocess.run(["nvidia-cuda-mps-control", "-d"], env={**os.environ, **env}, capture_output=True,
                            text=True)  # its refusal (permissions, a foreign daemon) was a traceback
    # A daemon whose server cannot start stalls every CUDA client: one must get through before trials rely on it.
    failed = (f"nvidia-cuda-mps-control -d: {last_line(daemon.stderr + daemon.stdout, daemon.returncode)}"
              if daemon.returncode else cuda_client_fails({**os.environ, **env}))
    if failed:
        subprocess.run(["nvidia-cuda-mps-control"], input="quit\n", text=True, env={**os.environ, **env})
        shutil.rmtree(root, ignore_errors=True)
        say(f"CUDA MPS: started but stopped again ({failed}); packed trials time-slice the GPU")
        yield False
        return
    previous = {name: os.environ.get(name) for name in MPS_ENV}
    os.environ.update(env)
    say(f"CUDA MPS: started (pipe {env['CUDA_MPS_PIPE_DIRECTORY']}); packed trials share the GPU concurrently")
    try:
        yield True
    finally:
        subprocess.run(["nvidia-cuda-mps-control"], input="quit\n", text=True, env={**os.environ, **env})
        for name, value in previous.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
        shutil.rmtree(root, ignore_errors=True)


def cuda_client_fails(env: dict[str, str], timeout: float = 60.0) -> str | None:
    """Why a fresh process cannot run a CUDA kernel in this environment (None: it can)."""
    probe = "import torch; torch.ones(1, device='cuda').sum().item()"
    try:
        out = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return f"no CUDA client got through it in {timeout:.0f} s"
    return None if out.returncode == 0 else last_line(out.stderr, out.returncode)


def last_line(said: str, code: int) -> str:
    """A command's last line of output, else its exit code: its error in one line."""
    return (said.strip().splitlines() or [f"exit {code}"])[-1]
