"""Load generator for the tracking store: N writer processes log metric batches to their own runs for T seconds,
as trials do; afterwards the store is read back and every acknowledged point must be there exactly once.

    # against a tracking server this script starts (PostgreSQL backend), then stops:
    python scripts/load_tracking.py --start postgres --dir /var/tmp/load-pg --writers 32 --seconds 60
    # the same load straight into an sqlite file (what workers do without a server):
    python scripts/load_tracking.py --uri sqlite:////var/tmp/load.db --writers 32 --seconds 60
    # against a running server:
    python scripts/load_tracking.py --uri http://127.0.0.1:5000 --writers 32 --seconds 60

Each writer sends ``--batch`` points (``--keys`` metrics at consecutive steps) every ``--interval`` seconds with
MlflowClient.log_batch, through MLflow's own HTTP retries (MLFLOW_HTTP_REQUEST_*), but with no retry of its own:
an error is a call that failed as a trial would see it. Counted: points attempted, sent (acknowledged), stored
(distinct (key, step) read back), lost (acknowledged, not stored), duplicated (stored twice) and errors.
``--check`` exits 1 unless lost == errors == duplicated == 0. ``--json FILE`` writes the counts.
"""
from __future__ import annotations

import argparse
import json
import logging
import multiprocessing as mp
import os
import shutil
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def writer(uri: str, run_id: str, keys: int, batch: int, interval: float, ready, start, results) -> None:
    """One trial-like process: log_batch every ``interval`` s from ``start`` to its deadline; report counts."""
    # MLflow's telemetry thread, failing without network, unsets an environment variable that a request may be
    # reading at that moment (a KeyError, seen once in 1,597 calls). Trials turn it off too (resnet_core.tracking).
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    logging.getLogger("mlflow").setLevel(logging.CRITICAL)  # each failure is counted; no traceback per lock
    from mlflow import MlflowClient
    from mlflow.entities import Metric
    client = MlflowClient(uri)
    ready.put(os.getpid())
    begin, seconds = start.get()  # the same wall-clock window for every writer
    time.sleep(max(0.0, begin - time.time()))
    steps_per_batch = max(1, batch // keys)
    acked, attempted, errors, messages, step, calls = [], 0, 0, Counter(), 0, 0
    latencies = []
    while time.time() < begin + seconds:
        now = int(time.time() * 1000)
        metrics = [Metric(f"m{k}", float(step + i) / 7, now, step + i)
                   for i in range(steps_per_batch) for k in range(keys)]
        attempted += len(metrics)
        t0 = time.perf_counter()
        try:
            client.log_batch(run_id, metrics=metrics)
            acked.append((step, steps_per_batch))
        except Exception as err:  # counted, never retried here: the point is to see them
            errors += 1
            lines = str(err).splitlines() or [""]
            # the line with the cause, e.g. "(sqlite3.OperationalError) database is locked"
            cause = next((line for line in lines if "Error)" in line), lines[0])
            messages[f"{type(err).__name__}: {cause[:160]}"] += 1
        latencies.append(time.perf_counter() - t0)
        calls += 1
        step += steps_per_batch
        next_call = begin + calls * interval
        time.sleep(max(0.0, next_call - time.time()))
    results.put({"run_id": run_id, "acked": acked, "attempted": attempted, "errors": errors,
                 "messages": dict(messages), "calls": calls, "latencies": latencies})


def stored_steps(client, run_id: str, keys: int) -> dict[str, list[int]]:
    return {f"m{k}": [m.step for m in client.get_metric_history(run_id, f"m{k}")] for k in range(keys)}


def run_load(uri: str, writers: int, seconds: float, batch: int = 100, keys: int = 4, interval: float = 1.0,
             start_timeout: float = 300.0) -> dict:
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")  # see writer(); inherited by the forkserver
    from mlflow import MlflowClient
    client = MlflowClient(uri)  # for an sqlite file: creates and migrates the store once, before the writers
    experiment = client.create_experiment(f"load-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}")
    run_ids = [client.create_run(experiment, run_name=f"writer-{i}").info.run_id for i in range(writers)]
    # Separate processes, as trials are, forked from a server process that has imported MLflow once (and created no
    # client, thread or connection): 32 fresh interpreters would each spend seconds importing it on 2 cores.
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(["mlflow", "mlflow.entities", "mlflow.tracking"])
    ready, start, results = ctx.Queue(), ctx.Queue(), ctx.Queue()
    procs = [ctx.Process(target=writer, args=(uri, r, keys, batch, interval, ready, start, results))
             for r in run_ids]
    for p in procs:
        p.start()
    for _ in procs:
        ready.get(timeout=start_timeout)  # all imported and connected: start the clock together
    for _ in procs:
        start.put((time.time() + 1.0, seconds))
    reports = [results.get(timeout=seconds + start_timeout) for _ in procs]
    for p in procs:
        p.join()
    return count(client, reports, keys, writers, seconds, uri)


def count(client, reports: list[dict], keys: int, writers: int, seconds: float, uri: str) -> dict:
    sent = stored = lost = duplicated = 0
    for rep in reports:
        acked = {s for first, n in rep["acked"] for s in range(first, first + n)}
        sent += len(acked) * keys
        for key, steps in stored_steps(client, rep["run_id"], keys).items():
            distinct = set(steps)
            stored += len(distinct)
            duplicated += len(steps) - len(distinct)
            lost += len(acked - distinct)
    latencies = sorted(x for rep in reports for x in rep["latencies"])
    messages = Counter()
    for rep in reports:
        messages.update(rep["messages"])
    return {"uri": uri.split("@")[-1], "writers": writers, "seconds": seconds,
            "attempted": sum(r["attempted"] for r in reports), "sent": sent, "stored": stored, "lost": lost,
            "duplicated": duplicated, "errors": sum(r["errors"] for r in reports),
            "calls": sum(r["calls"] for r in reports), "min_calls_per_writer": min(r["calls"] for r in reports),
            "error_messages": dict(messages.most_common(5)),
            "latency_p50_ms": round(1000 * latencies[len(latencies) // 2], 1) if latencies else None,
            "latency_p99_ms": round(1000 * latencies[int(len(latencies) * 0.99)], 1) if latencies else None}


def server_errors(log_path: Path) -> int:
    """HTTP 5xx answers in the server's access log (each one retried by the client, or counted as an error)."""
    if not log_path.is_file():
        return 0
    return sum(1 for line in log_path.read_text(errors="replace").splitlines()
               if '" 50' in line and "HTTP/1.1" in line)


def summary(r: dict) -> str:
    return (f"{r['writers']} writers x {r['seconds']:g} s against {r['uri']}: {r['attempted']:,} points attempted, "
            f"{r['sent']:,} sent, {r['stored']:,} stored, {r['lost']:,} lost, {r['duplicated']:,} duplicated, "
            f"{r['errors']:,} errors in {r['calls']:,} calls (p50 {r['latency_p50_ms']} ms, "
            f"p99 {r['latency_p99_ms']} ms)")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    target = parser.add_mutually_exclusive_group(required=True)
    target.add_argument("--uri", help="tracking URI: http://HOST:PORT, sqlite:////path/file.db, postgresql://...")
    target.add_argument("--start", choices=("postgres", "sqlite"), help="start a tracking server with this store")
    parser.add_argument("--dir", help="--start: the server's folder (default: a new temporary one)")
    parser.add_argument("--writers", type=int, default=32)
    parser.add_argument("--seconds", type=float, default=60.0)
    parser.add_argument("--batch", type=int, default=100, help="points per log_batch call")
    parser.add_argument("--keys", type=int, default=4, help="metric names per run")
    parser.add_argument("--interval", type=float, default=1.0, help="seconds between a writer's calls")
    parser.add_argument("--json", type=Path, help="write the counts here")
    parser.add_argument("--check", action="store_true", help="exit 1 unless 0 lost, 0 duplicated, 0 errors")
    args = parser.parse_args(argv)
    if args.uri:
        result = run_load(args.uri, args.writers, args.seconds, args.batch, args.keys, args.interval)
    else:
        sys.path.insert(0, str(REPO))
        from orchestrator.tracking_server import TrackingServer
        folder = Path(args.dir or tempfile.mkdtemp(prefix="load-tracking-", dir="/var/tmp"))
        try:
            with TrackingServer(folder, store=args.start, port=0) as server:
                result = run_load(server.uri, args.writers, args.seconds, args.batch, args.keys, args.interval)
                result["server_5xx"] = server_errors(server.log_path)
                result["store"] = args.start
        finally:
            if not args.dir:  # our temporary folder: the database goes with it
                shutil.rmtree(folder, ignore_errors=True)
    print(summary(result) + (f"; server answered 5xx {result['server_5xx']} times" if "server_5xx" in result else ""))
    if result["error_messages"]:
        print("errors:", json.dumps(result["error_messages"], indent=1))
    if args.json:
        args.json.write_text(json.dumps(result, indent=1))
    bad = result["lost"] or result["errors"] or result["duplicated"]
    return 1 if args.check and bad else 0


if __name__ == "__main__":
    sys.exit(main())
