"""Shared pieces of the fault-injection tests: a tiny trial config, a tracking server in a folder PostgreSQL can
enter, and readers of what the store holds. (Not a conftest.py: tests/conftest.py already owns that module name.)"""
from __future__ import annotations

import os
import shutil
import socket
import sys
import tempfile
from contextlib import contextmanager
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent

from orchestrator.tracking_server import PG_BIN, TrackingServer
from test_train import worker_env, write_config  # noqa: F401  (re-exported for the fault tests)


def tiny_config(tmp_path: Path, uri: str, total: int = 40, **sections) -> dict:
    """ResNet-8 on 512 seeded synthetic images (16 steps an epoch): seconds per run on 2 cores."""
    cfg = {"model": {"name": "resnet_cifar", "depth": 8},
           "data": {"path": "synthetic", "augment": False, "loader": "gpu"},
           "batch_size": 32, "device": "cpu",
           "schedule": {"total": total, "milestones": [total * 3 // 4]},
           "checkpoint": {"root": str(tmp_path / "ckpt"), "every": 10, "keep": 2},
           "tracking": {"uri": uri, "experiment": "faults", "log_every": 5}}
    for key, value in sections.items():
        cfg[key] = {**cfg.get(key, {}), **value} if isinstance(value, dict) else value
    return cfg


def need_postgres() -> None:
    if not (PG_BIN / "postgres").is_file():
        pytest.skip(f"PostgreSQL is not installed in {PG_BIN} (setup.sh installs Debian's postgresql)")


@contextmanager
def running_server(store: str = "postgres", **kwargs):
    """A server on a free port in a fresh folder under /var/tmp (pytest's own tmp folders are 0700 root, which
    the postgres user cannot enter); the folder goes when the server has stopped."""
    if store == "postgres":
        need_postgres()
    folder = Path(tempfile.mkdtemp(prefix="tracking-test-", dir="/var/tmp"))
    try:
        with TrackingServer(folder, store=store, port=0, **kwargs) as server:
            yield server
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def runs_of(uri: str, experiment: str = "faults") -> list:
    from resnet_core.tracking import mlflow_client  # polled while a sweep may be creating the store
    client = mlflow_client(uri)
    found = client.get_experiment_by_name(experiment)
    return [] if found is None else client.search_runs([found.experiment_id])


def steps_of(uri: str, run_id: str, key: str) -> list[int]:
    from resnet_core.tracking import mlflow_client
    return sorted(m.step for m in mlflow_client(uri).get_metric_history(run_id, key))


def history_of(uri: str, run_id: str, key: str) -> list:
    from resnet_core.tracking import mlflow_client
    return sorted(mlflow_client(uri).get_metric_history(run_id, key), key=lambda m: m.step)


def listening_addresses(port: int) -> set[str]:
    """Local addresses with a socket in LISTEN state on ``port`` (IPv4 and IPv6), from /proc/net/tcp{,6}."""
    found = set()
    for table, width in (("/proc/net/tcp", 8), ("/proc/net/tcp6", 32)):
        if not os.path.exists(table):
            continue
        for line in open(table).read().splitlines()[1:]:
            local, state = line.split()[1], line.split()[3]
            address, port_hex = local.split(":")
            if state == "0A" and int(port_hex, 16) == port:
                raw = bytes.fromhex(address)
                if width == 8:
                    found.add(socket.inet_ntop(socket.AF_INET, raw[::-1]))
                else:  # four little-endian 32-bit words
                    words = b"".join(raw[i:i + 4][::-1] for i in range(0, 16, 4))
                    found.add(socket.inet_ntop(socket.AF_INET6, words))
    return found


def non_loopback_addresses() -> list[str]:
    """This machine's IPv4 addresses other than 127.x (from a UDP 'connect', which sends nothing)."""
    found = set()
    try:
        for info in socket.getaddrinfo(socket.gethostname(), None, socket.AF_INET):
            found.add(info[4][0])
    except socket.gaierror:
        pass
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            s.connect(("192.0.2.1", 9))  # TEST-NET: routing picks the outward interface
            found.add(s.getsockname()[0])
        except OSError:
            pass
    return sorted(a for a in found if not a.startswith("127."))


def can_connect(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=2):
            return True
    except OSError:
        return False
