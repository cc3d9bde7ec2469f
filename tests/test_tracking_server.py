"""orchestrator.tracking_server and `orchestrate tracking-server`: a real PostgreSQL and `mlflow server`; the
worker's Tracker keeping its points through an outage. (Faults under load and mid-training: tests/faults/.)"""
from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import tempfile
import urllib.request
from pathlib import Path

import pytest

from orchestrator.tracking_server import PG_BIN, TrackingServer, TrackingServerError, free_port
from resnet_core.tracking import Tracker, TrackingUnavailable

BIN = Path(sys.executable).parent
needs_postgres = pytest.mark.skipif(not (PG_BIN / "postgres").is_file(),
                                    reason=f"PostgreSQL not installed in {PG_BIN} (setup.sh installs it)")


@pytest.fixture(scope="module")
def server():
    folder = Path(tempfile.mkdtemp(prefix="tracking-api-", dir="/var/tmp"))  # postgres cannot enter pytest's tmp
    try:
        with TrackingServer(folder, store="postgres", port=0) as s:
            yield s
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def client(server):
    from mlflow import MlflowClient
    return MlflowClient(server.uri)


@needs_postgres
@pytest.mark.timeout(120)
def test_server_serves_runs_and_artifacts_and_keeps_them_across_restarts(server, tmp_path):
    assert server.uri == f"http://127.0.0.1:{server.port}"
    assert server.backend_uri.startswith("postgresql+psycopg://mlflow@127.0.0.1:")  # no password in it
    with urllib.request.urlopen(server.uri + "/health", timeout=10) as response:
        assert response.read() == b"OK"
    c = client(server)
    run_id = c.create_run(c.create_experiment("api")).info.run_id
    c.log_metric(run_id, "loss", 0.5, step=1)
    (tmp_path / "note.txt").write_text("hello")
    c.log_artifact(run_id, str(tmp_path / "note.txt"))
    assert list((server.folder / "artifacts").glob("*/*/artifacts/note.txt"))  # uploaded through the server

    server.restart()
    server.restart(database=True)
    assert [(m.step, m.value) for m in client(server).get_metric_history(run_id, "loss")] == [(1, 0.5)]
    assert Path(client(server).download_artifacts(run_id, "note.txt", str(tmp_path / "dl"))).read_text() == "hello"


@needs_postgres
@pytest.mark.timeout(120)
def test_tracker_keeps_points_while_the_server_is_down_and_sends_them_once_it_is_back(server, monkeypatch):
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")  # fail at once: the Tracker's own retry is tested
    tracker = Tracker(server.uri, "outage", flush_seconds=0.0, retry_seconds=2.0)
    tracker.start(None, "outage", {}, {})
    tracker.log_metrics({"loss": 1.0}, step=1)  # sent at once (flush_seconds=0)
    server.stop_server()
    try:
        for step in range(2, 6):
            tracker.log_metrics({"loss": 1.0 / step, "lr": 0.1}, step=step)  # each periodic send fails, kept
        with pytest.raises(TrackingUnavailable, match="did not take 8 metric points in 2 s"):
            tracker.flush()
    finally:
        server.start_server()
    tracker.end("FINISHED")
    history = {key: sorted(m.step for m in client(server).get_metric_history(tracker.run_id, key))
               for key in ("loss", "lr")}
    assert history == {"loss": [1, 2, 3, 4, 5], "lr": [2, 3, 4, 5]}
    assert client(server).get_run(tracker.run_id).info.status == "FINISHED"


@needs_postgres
@pytest.mark.timeout(60)
def test_database_takes_only_password_logins_on_loopback(server):
    env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
    psql = [str(PG_BIN / "psql"), "-h", "127.0.0.1", "-p", str(server.database.port), "-U", "mlflow", "-d",
            "mlflow", "-w", "-c", "select 1"]
    denied = subprocess.run(psql, capture_output=True, text=True, env=env)
    assert denied.returncode != 0 and "password" in denied.stderr
    allowed = subprocess.run(psql, capture_output=True, text=True, env={**env, **server.database.client_env})
    assert allowed.returncode == 0, allowed.stderr


@needs_postgres
@pytest.mark.timeout(60)
def test_stop_ends_every_process_it_started(server):
    pids = server.pids()
    assert len(pids) == 2 and server.alive()
    server.stop()
    for pid in pids:
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)
    assert not server.alive()


def test_a_port_in_use_is_refused_naming_it(tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(TrackingServerError, match=f"port {port} on 127.0.0.1 is in use"):
            TrackingServer(tmp_path / "t", store="sqlite", port=port).start()


@pytest.mark.skipif(os.geteuid() != 0, reason="the postgres-user check applies when running as root")
@needs_postgres
def test_a_folder_postgres_cannot_enter_is_refused_naming_it(tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o700)
    # The first folder on the way that the postgres user cannot enter is named (pytest's own 0700 tmp root here).
    with pytest.raises(TrackingServerError, match=r"runs as user 'postgres', which cannot enter /\S+ \(mode 0o700\)"):
        TrackingServer(locked / "deeper" / "server", store="postgres", port=0).start()


def test_unknown_store_lists_the_valid_ones():
    with pytest.raises(ValueError, match="store: 'mysql' is not one of postgres, sqlite"):
        TrackingServer("/nonexistent", store="mysql")


@pytest.mark.parametrize("args, message", [(["--port", "70000"], "--port: 70000 is not a port number"),
                                           (["--store", "mysql"], "invalid choice: 'mysql'")])
def test_cli_refuses_bad_arguments_in_one_line(tmp_path, args, message):
    proc = subprocess.run([BIN / "orchestrate", "tracking-server", "--dir", tmp_path, *args],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and message in proc.stderr, proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith("orchestrate")


@pytest.mark.timeout(120)
def test_sqlite_server_for_a_laptop(tmp_path):
    with TrackingServer(tmp_path / "laptop", store="sqlite", port=free_port()) as s:
        from mlflow import MlflowClient
        c = MlflowClient(s.uri)
        run_id = c.create_run(c.create_experiment("laptop")).info.run_id
        c.log_metric(run_id, "loss", 1.0, step=3)
        assert (tmp_path / "laptop" / "mlflow.db").is_file()
        assert [m.step for m in c.get_metric_history(run_id, "loss")] == [3]
        pid = s.proc.pid
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)
