"""Security basics: `orchestrate tracking-server` (API and UI, one server) and its PostgreSQL bind to 127.0.0.1
by default and cannot be reached on this machine's other addresses; Ctrl-C/SIGTERM stops them.
(Checkpoints loading with weights_only=True: test_checkpoint_faults.py, the malicious-pickle test.)"""
from __future__ import annotations

import shutil
import signal
import subprocess
import tempfile
import time
import urllib.request
from pathlib import Path

import pytest

from faultlib import BIN, can_connect, listening_addresses, need_postgres, non_loopback_addresses
from orchestrator.tracking_server import free_port


@pytest.mark.timeout(150)
def test_tracking_server_and_database_bind_loopback_by_default_and_stop_on_sigterm():
    need_postgres()
    folder = Path(tempfile.mkdtemp(prefix="tracking-bind-", dir="/var/tmp"))
    port = free_port()
    proc = subprocess.Popen([BIN / "orchestrate", "tracking-server", "--dir", folder, "--port", str(port)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        lines = read_until(proc, "export MLFLOW_TRACKING_URI=", timeout=120)
        assert lines[-1] == f"export MLFLOW_TRACKING_URI=http://127.0.0.1:{port}"
        pg_port = int((folder / "postgres" / "data" / "postmaster.pid").read_text().splitlines()[3])

        for p in (port, pg_port):
            assert listening_addresses(p) == {"127.0.0.1"}, p  # nothing on 0.0.0.0, ::, or another interface
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=10) as page:
            assert b"<html" in page.read(2000).lower()  # the UI is this same server
        outside = non_loopback_addresses()
        if outside:
            assert [a for a in outside for p in (port, pg_port) if can_connect(a, p)] == []
        assert not list((folder / "postgres").glob("**/.s.PGSQL.*"))  # no Unix socket either

        proc.send_signal(signal.SIGTERM)
        output, _ = proc.communicate(timeout=60)
        assert proc.returncode == 0, output
        assert not can_connect("127.0.0.1", port) and not can_connect("127.0.0.1", pg_port)
        assert not (folder / "postgres" / "data" / "postmaster.pid").exists()  # PostgreSQL shut down cleanly
    finally:
        if proc.poll() is None:
            proc.kill()
        shutil.rmtree(folder, ignore_errors=True)


def read_until(proc: subprocess.Popen, prefix: str, timeout: float) -> list[str]:
    lines, deadline = [], time.monotonic() + timeout
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            raise AssertionError(f"the server exited ({proc.wait()}):\n" + "".join(lines))
        lines.append(line.rstrip("\n"))
        if line.startswith(prefix):
            return lines
    raise AssertionError(f"no {prefix!r} line within {timeout} s:\n" + "\n".join(lines))
