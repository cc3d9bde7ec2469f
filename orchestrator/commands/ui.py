"""`orchestrate ui [--port P] [--host H]`: the MLflow UI over the tracking store, to compare a sweep's runs.

Runs `mlflow server` on the store (one worker, no job execution: ~9 s to start, 2 processes, ~0.5 GiB, against
~13 s and 15 processes with MLflow's defaults; see shared/docs/environment.md), bound to 127.0.0.1 unless --host
says otherwise (the UI has no login: binding every interface publishes every run). Prints the experiments' URLs
once the server answers, and runs until Ctrl-C. A tracking URI that is already a server (http://...) needs no
second one: its URLs are printed and the command returns.
"""
from __future__ import annotations

import argparse

from orchestrator.runs import add_store_arguments

START_TIMEOUT_S = 120.0


def add_parser(p: argparse.ArgumentParser) -> None:
    p.add_argument("--port", type=int, default=5000, help="port to listen on (default: 5000)")
    p.add_argument("--host", default="127.0.0.1",
                   help="interface to bind (default: 127.0.0.1, this machine only; 0.0.0.0 exposes it to all)")
    add_store_arguments(p)


def run(args: argparse.Namespace) -> int:
    import signal
    from orchestrator.cli import UserError
    from orchestrator.runs import open_client
    client = open_client(args.tracking_uri)
    uri = client.tracking_uri
    experiments = experiments_to_show(client, args.sweep)
    if uri.startswith(("http://", "https://")):
        print_urls(uri.rstrip("/"), experiments)
        return 0
    if not 0 < args.port < 65536:
        raise UserError(f"--port {args.port}: must be in 1..65535")
    from orchestrator.tracking_server import cannot_listen, local_host, stop_process, wait_healthy
    problem = cannot_listen(args.host, args.port)
    if problem:
        raise UserError(problem)
    proc = start_server(uri, args.host, args.port)
    # Ctrl-C, or SIGTERM from a supervisor, or SIGINT to a process a shell started in the background (where
    # it arrives ignored): each must reach the `finally` below, or the server is left running on its own.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    try:
        why_not = wait_healthy(proc, args.host, args.port, START_TIMEOUT_S)
        if why_not:
            raise UserError(f"mlflow server {why_not} (see its output above)")
        print_urls(f"http://{local_host(args.host)}:{args.port}", experiments)
        print("serving until Ctrl-C", flush=True)
        proc.wait()
        raise UserError(f"mlflow server exited with code {proc.returncode}")
    except KeyboardInterrupt:
        return 0
    finally:
        stop_process(proc, signal.SIGTERM, timeout=15)


def experiments_to_show(client, sweep: str | None) -> list:
    """The named sweep, else every sweep of the store (the UI compares across them too)."""
    from orchestrator.runs import sweep_experiment, sweep_names
    if sweep is not None:
        return [sweep_experiment(client, sweep)]
    return [client.get_experiment_by_name(name) for name in sweep_names(client)]


def experiment_url(base: str, experiment_id: str) -> str:
    # The runs table. MLflow 3's plain experiment URL (#/experiments/ID) opens its GenAI "Overview" of traces,
    # which a sweep has none of, even when the experiment is tagged as model development.
    return f"{base}/#/experiments/{experiment_id}/runs"


def print_urls(base: str, experiments: list) -> None:
    if not experiments:
        print(f"MLflow UI: {base}/ (no sweep in this store yet)", flush=True)
    for experiment in experiments:
        print(f"sweep {experiment.name}: {experiment_url(base, experiment.experiment_id)}", flush=True)


def start_server(uri: str, host: str, port: int):
    import os
    import subprocess
    import sys
    from orchestrator.tracking_server import SERVER_ENV
    command = [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", uri,
               "--host", host, "--port", str(port), "--workers", "1"]
    # Its own session: Ctrl-C reaches us once, and we stop the server's whole group by its id.
    return subprocess.Popen(command, env={**os.environ, **SERVER_ENV}, start_new_session=True)
