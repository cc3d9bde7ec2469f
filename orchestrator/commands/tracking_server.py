"""`orchestrate tracking-server`: run the MLflow tracking server trials log to (PostgreSQL or sqlite behind it).

Prints the URI to export on the worker nodes, then serves until Ctrl-C or SIGTERM, and stops the server and its
database by their process ids. See orchestrator/tracking_server.py.
"""
from __future__ import annotations

import argparse

LOOPBACK = ("127.0.0.1", "localhost", "::1")


def add_parser(p: argparse.ArgumentParser) -> None:
    p.add_argument("--store", choices=("postgres", "sqlite"), default="postgres",
                   help="postgres: many concurrent trials, clusters (default); sqlite: a laptop")
    p.add_argument("--dir", default="runs/tracking",
                   help="database, artifacts and logs go here; reused on the next start (default: %(default)s)")
    p.add_argument("--host", default="127.0.0.1",
                   help="interface to bind (default: %(default)s, this machine only; 0.0.0.0 for worker nodes)")
    p.add_argument("--port", type=int, default=5000, help="HTTP port (default: %(default)s)")
    p.add_argument("--workers", type=int, default=1, help="server worker processes (default: %(default)s)")


def run(args: argparse.Namespace) -> int:
    import signal
    import sys
    import time

    from orchestrator.cli import UserError
    from orchestrator.tracking_server import TrackingServer, TrackingServerError

    if not 0 < args.port < 65536:
        raise UserError(f"--port: {args.port} is not a port number (1-65535)")
    if args.workers < 1:
        raise UserError(f"--workers: {args.workers} must be at least 1")
    server = TrackingServer(args.dir, store=args.store, host=args.host, port=args.port, workers=args.workers)

    def stop_on_signal(signum, _frame):
        raise KeyboardInterrupt  # unwinds to the finally below, which stops the server and the database

    signal.signal(signal.SIGTERM, stop_on_signal)
    signal.signal(signal.SIGINT, stop_on_signal)  # also when a script started us with & (SIGINT arrives ignored)
    try:
        try:
            server.start()
        except TrackingServerError as err:
            raise UserError(str(err)) from None
        print(f"tracking server ({args.store}) ready; data in {server.folder}", flush=True)
        if args.host not in LOOPBACK:
            print(f"note: bound to {args.host}: reachable from the network, with no authentication", flush=True)
        print(f"export MLFLOW_TRACKING_URI={server.uri}", flush=True)
        while server.alive():
            time.sleep(1.0)
        print(f"orchestrate tracking-server: the server or its database exited; see {server.folder}",
              file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("stopping the tracking server", flush=True)
        return 0
    finally:
        server.stop()
