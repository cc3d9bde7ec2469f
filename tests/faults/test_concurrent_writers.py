"""Fault: 32 trial-like processes log at once to the tracking server (PostgreSQL behind it). Every acknowledged point
must be stored exactly once and no call may fail. The full-length run (32 x 60 s, and the same load against a
plain sqlite file) is in docs/reliability.md; CI runs 32 x 15 s."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from faultlib import REPO, need_postgres

WRITERS, SECONDS = 32, 15


@pytest.mark.timeout(300)
def test_32_writers_lose_nothing_against_the_postgres_server(tmp_path):
    need_postgres()
    out = tmp_path / "load.json"
    proc = subprocess.run([sys.executable, REPO / "scripts" / "load_tracking.py", "--start", "postgres",
                           "--writers", str(WRITERS), "--seconds", str(SECONDS), "--json", out],
                          capture_output=True, text=True, timeout=280)
    assert proc.returncode == 0, proc.stderr[-3000:]
    r = json.loads(out.read_text())
    print(proc.stdout)
    assert r["errors"] == 0, r["error_messages"]
    assert r["lost"] == 0 and r["duplicated"] == 0
    assert r["sent"] == r["stored"] == r["attempted"]
    # All 32 wrote at once, for the whole window (nominally 15 calls each; fewer when the server is saturated).
    assert r["min_calls_per_writer"] >= 5, r
    assert r["sent"] >= WRITERS * 5 * 100
