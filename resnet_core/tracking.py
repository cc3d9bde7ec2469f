"""MLflow tracking for one trial, from rank 0 only.

Metrics are buffered and sent in batches (a step waits on the store only at a send, every ``flush_seconds``).
A resumed trial continues its MLflow run: points at steps the run already holds are dropped, so a restart after a
kill leaves neither a gap nor a duplicate step (the loader and the step are deterministic, so the values are the
same).

Sending survives a store that is briefly down (a tracking server restarting, a 5xx, a locked sqlite file): the
HTTP client retries with backoff (MLflow's MLFLOW_HTTP_REQUEST_MAX_RETRIES / _BACKOFF_FACTOR), and a batch that
still fails stays buffered (while the store is down, a send waits out those retries: training pauses, for ~2
minutes at most). The periodic send during training then just tries again later; ``flush()`` (before a
checkpoint, at the end) retries for up to ``retry_seconds`` and then raises, the points still buffered, so a
checkpoint is never published ahead of its metrics. Re-sending a batch is idempotent: a point keeps the timestamp
it was logged with, and the store drops exact duplicates.
"""
from __future__ import annotations

import csv
import hashlib
import logging
import os
import platform
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from .config import ConfigError, check_tracking_uri, first_line
from .locks import taking_turns

log = logging.getLogger(__name__)
# "Creating initial MLflow database tables..." on every new store: noise in a user's terminal
logging.getLogger("mlflow.store.db.utils").setLevel(logging.WARNING)

DEFAULT_URI = "sqlite:///mlruns.db"
MAX_BATCH = 1000  # MLflow's limit on metrics per log_batch call
RETRY_SECONDS = 300.0  # flush() gives up after this long; a tracking server restarts in ~10 s
MAX_BACKOFF = 30.0  # seconds between flush() attempts, at most
# Defaults for MLflow's client; a value the user exported wins. Its HTTP retry (urllib3) retries at once, then
# waits backoff_factor * 2**(n-1) s: with factor 1, 7 retries span 2 minutes (0+2+4+...+64 s) where MLflow's 2
# spans 4, so a periodic send stalls training for at most 2 minutes of an outage before flush()'s own loop takes
# over; a ~9 s server restart costs about the same either way. Telemetry off: without network its thread gives up
# and unsets an environment variable a request may be reading (a KeyError from log_batch, 1 in 1,597 calls).
CLIENT_DEFAULTS = {"MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1", "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "7",
                   "MLFLOW_HTTP_REQUEST_TIMEOUT": "60", "MLFLOW_DISABLE_TELEMETRY": "true"}


class TrackingUnavailable(RuntimeError):
    """The store did not take buffered metrics within ``retry_seconds``; they are still buffered."""


def is_transient(err: Exception) -> bool:
    """Worth retrying: a 5xx/408/429 from the server, a connection failure, a locked or busy database (MLflow's
    SQL store reports that as a 503). A 4xx (a bad value, a deleted run) or a bug fails the same way every time."""
    from mlflow.exceptions import MlflowException
    if isinstance(err, MlflowException):
        if "QueuePool limit" in str(err):  # a busy server's connection pool; MLflow reports it as a 400
            return True
        status = err.get_http_status_code()
        return status >= 500 or status in (408, 429)
    return isinstance(err, OSError)  # requests' ConnectionError and Timeout are OSErrors


def tracking_uri(configured: str | None) -> str:
    return check_tracking_uri(configured or os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_URI)


def sqlite_path(uri: str) -> Path | None:
    """The database file of an sqlite store's URI (relative or absolute); None for other stores."""
    return Path(uri.removeprefix("sqlite:///")) if uri.startswith("sqlite:///") else None


def mlflow_client(uri: str):
    """An MlflowClient on ``uri``. Opening an sqlite store creates or upgrades its schema, and two processes doing
    that at once crash (alembic's "expected to match one row"): an `orchestrate status` in the first seconds of a
    new sweep's store, or trials starting together on a new one. Processes on this host take turns, on a lock keyed
    by the file (MLflow's own lock does not cover this path)."""
    from mlflow import MlflowClient
    path = sqlite_path(uri)
    if path is None:
        return MlflowClient(tracking_uri=uri)
    key = hashlib.md5(str(path.resolve()).encode()).hexdigest()[:16]
    with taking_turns(Path(tempfile.gettempdir()) / f"resnet-orchestrator-store-{key}.lock"):
        return MlflowClient(tracking_uri=uri)


def absolute_uri(uri: str) -> str:
    """Trials run in other processes, folders and nodes: a relative sqlite path must not change meaning."""
    path = sqlite_path(uri)
    return f"sqlite:///{path.resolve()}" if path and not path.is_absolute() else uri


def check_store_usable(uri: str, probe_server: bool = True) -> None:
    """One line for a store MLflow would meet with a long traceback (a folder or a non-database as the sqlite
    file, the retired file store) or with minutes of retries (no server at an http address)."""
    path = sqlite_path(uri)
    if path:
        if path.is_dir():
            raise ConfigError(f"tracking URI {uri}: {path} is a folder; name the database file in it, "
                              f"e.g. sqlite:///{path / 'mlruns.db'}")
        if path.is_file() and path.stat().st_size and path.read_bytes()[:16] != b"SQLite format 3\x00":
            raise ConfigError(f"tracking URI {uri}: {path} is not an SQLite database (an MLflow store is one)")
        if not path.parent.is_dir():
            raise ConfigError(f"tracking URI {uri}: folder {path.parent} does not exist")
    elif uri.startswith("file:"):
        raise ConfigError(f"tracking URI {uri}: MLflow's file store is retired; use sqlite:///PATH/mlruns.db")
    elif uri.startswith(("http://", "https://")) and probe_server:
        address = urlparse(uri)
        port = address.port or (443 if address.scheme == "https" else 80)
        try:
            socket.create_connection((address.hostname, port), timeout=10).close()
        except OSError as err:
            raise ConfigError(f"tracking URI {uri}: no tracking server answers there ({err.strerror or err}); "
                              "start one with `orchestrate tracking-server`") from None


def flatten(tree: dict, prefix: str = "") -> dict[str, str]:
    out = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out.update(flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = str(value)
    return out


def git_state() -> tuple[str, str]:
    here = Path(__file__).resolve().parent
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True,
                                timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=here,
                               capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown", "unknown"
    return commit or "unknown", "true" if dirty else "false"


def environment_tags(world_size: int) -> dict[str, str]:
    import torch
    commit, dirty = git_state()
    return {"git_commit": commit, "git_dirty": dirty, "host": platform.node(), "world_size": str(world_size),
            "torch_version": torch.__version__, "cuda_version": str(torch.version.cuda),
            "device_name": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"}


def artifact_location(uri: str) -> str | None:
    """Beside an sqlite store, ``<store>-artifacts/``: MLflow's default is ``./mlruns`` of whatever folder the
    experiment was created from, so moving or copying the store lost the weights and every test run left its
    artifacts in the working directory. None (the server's or MLflow's choice) for other stores."""
    path = sqlite_path(uri)
    if path is None:
        return None
    db = path.resolve()
    return str(db.parent / f"{db.stem}-artifacts")


def get_or_create_experiment(client, name: str) -> str:
    from mlflow.exceptions import MlflowException
    experiment = client.get_experiment_by_name(name)
    if experiment is not None:
        return experiment.experiment_id
    try:
        return client.create_experiment(name, artifact_location=artifact_location(client.tracking_uri))
    except MlflowException:  # another trial created it first
        return client.get_experiment_by_name(name).experiment_id


def log_params(client, run_id: str, params: dict[str, str]) -> None:
    from mlflow.entities import Param
    items = [Param(k, v[:6000]) for k, v in params.items()]
    for i in range(0, len(items), 100):  # MLflow takes at most 100 params per batch
        client.log_batch(run_id, params=items[i:i + 100])


class Tracker:
    """One trial's MLflow run. ``flush_seconds`` bounds how stale the store may be while training."""

    def __init__(self, uri: str | None, experiment: str, flush_seconds: float = 10.0,
                 retry_seconds: float = RETRY_SECONDS):
        for name, value in CLIENT_DEFAULTS.items():
            os.environ.setdefault(name, value)  # read by MLflow's HTTP client at each request
        uri = tracking_uri(uri)
        check_store_usable(uri, probe_server=False)  # a server that is restarting gets the client's retries
        self.client = mlflow_client(uri)
        self.experiment_id = get_or_create_experiment(self.client, experiment)
        self.run_id: str | None = None
        self.flush_seconds, self.retry_seconds = flush_seconds, retry_seconds
        self._buffer: list[Any] = []
        self._last_flush = time.monotonic()
        self._last_step: dict[str, int] = {}

    def holds_run(self, run_id: str) -> bool:
        """Is this run in this store's experiment (a checkpoint may name a run of another store)?"""
        from mlflow.exceptions import MlflowException
        try:
            return self.client.get_run(run_id).info.experiment_id == self.experiment_id
        except MlflowException:
            return False

    def find_run(self, trial_key: str) -> str | None:
        """The newest run of this trial in this experiment, whatever its state (one killed before its first
        checkpoint, one finished under this experiment before): the trial goes on in it, never a duplicate."""
        runs = self.client.search_runs([self.experiment_id], f"tags.trial_key = '{trial_key}'",
                                       order_by=["attributes.start_time DESC"], max_results=1)
        return runs[0].info.run_id if runs else None

    def start(self, run_id: str | None, run_name: str | None, params: dict[str, str], tags: dict[str, str]) -> str:
        from mlflow.entities import RunTag
        if run_id is None:
            run = self.client.create_run(self.experiment_id, run_name=run_name, tags=tags)
            self.run_id = run.info.run_id
            log_params(self.client, self.run_id, params)
        else:
            self.run_id = run_id
            self.client.update_run(run_id, status="RUNNING")
            self.client.log_batch(run_id, tags=[RunTag(k, v) for k, v in tags.items()])
            if not self.client.get_run(run_id).data.params:  # a run opened for the trial by someone else
                log_params(self.client, run_id, params)
            self._last_step = self.logged_steps()
        return self.run_id

    def logged_steps(self) -> dict[str, int]:
        metrics = self.client.get_run(self.run_id).data.metrics
        return {key: max(m.step for m in self.client.get_metric_history(self.run_id, key)) for key in metrics}

    def last_logged_step(self) -> int:
        """The newest step this run holds a point at (-1: none)."""
        return max(self._last_step.values(), default=-1)

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        from mlflow.entities import Metric
        now = int(time.time() * 1000)
        for key, value in metrics.items():
            if step > self._last_step.get(key, -1):
                self._buffer.append(Metric(key, float(value), now, step))
                self._last_step[key] = step
        if time.monotonic() - self._last_flush > self.flush_seconds:
            self._send()  # on failure the points stay buffered and the next period tries again

    def flush(self) -> None:
        """Send every buffered point; retry transient failures with backoff for up to ``retry_seconds``."""
        deadline = time.monotonic() + self.retry_seconds
        delay = 1.0
        while not self._send():
            if time.monotonic() + delay > deadline:
                raise TrackingUnavailable(
                    f"the tracking store {self.client.tracking_uri} did not take {len(self._buffer)} metric points "
                    f"in {self.retry_seconds:.0f} s (run {self.run_id}); they are still buffered")
            time.sleep(delay)
            delay = min(2 * delay, MAX_BACKOFF)

    def _send(self) -> bool:
        """One attempt at the whole buffer, oldest first; True when it is empty. Sent batches leave the buffer."""
        self._last_flush = time.monotonic()
        while self._buffer:
            batch = self._buffer[:MAX_BATCH]
            try:
                self.client.log_batch(self.run_id, metrics=batch)
            except Exception as err:
                if not is_transient(err):
                    raise
                log.warning("tracking store unavailable, %d points kept for the next try: %s",
                            len(self._buffer), first_line(err))
                return False
            del self._buffer[:len(batch)]
        return True

    def discard(self) -> None:
        """Drop the unsent points: a newer attempt of the trial logs them (see checkpoint.Superseded)."""
        self._buffer.clear()

    def set_tags(self, tags: dict[str, str]) -> None:
        for key, value in tags.items():
            self.client.set_tag(self.run_id, key, value)

    def log_artifact(self, path: Path) -> None:
        self.client.log_artifact(self.run_id, str(path))

    def write_metrics_csv(self, path: Path) -> None:
        """Every point of the run (all attempts, from the store), one row per (step, key, value)."""
        with open(path, "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["step", "key", "value"])
            for key in sorted(self.client.get_run(self.run_id).data.metrics):
                for m in sorted(self.client.get_metric_history(self.run_id, key), key=lambda m: m.step):
                    writer.writerow([m.step, key, m.value])

    def end(self, status: str, tags: dict[str, str] | None = None) -> None:
        self.flush()
        if tags:
            self.set_tags(tags)
        self.client.set_terminated(self.run_id, status=status)
