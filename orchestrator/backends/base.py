"""What every backend offers: describe a trial's launch (dry run) and run trials, reporting through Events."""
from __future__ import annotations

import json
import math
import os
import signal
import threading
from pathlib import Path
from typing import Any, Callable, Protocol

from ..trials import REPORTED_METRICS, FusedGroup, SweepContext, Trial

STOP_GRACE_S = 60  # after a sweep's Ctrl-C, how long the running trials may take to checkpoint (as SLURM's warning)


class Events(Protocol):
    """Trial state changes, for the progress view. States: running, finished, failed, interrupted
    (ended by the cluster, resumable), stopped (early)."""

    def update(self, trial_key: str, state: str, **info) -> None: ...


class Backend(Protocol):
    """Optionally also ``start()`` (bring the engine up early, overlapping the store's creation) and ``stop()``
    (take down what start() brought up): the sweep calls them when the backend has them (Ray; SLURM's start
    checks that the controller answers). start() comes before the sweep's plan is recorded: a refusal leaves none."""
    name: str

    def __init__(self, ctx: SweepContext): ...

    def describe(self, trial: Trial | FusedGroup, todo: list[str] = ()) -> str:
        """The exact command (or batch script) the backend would launch for this trial or fused group; ``todo``:
        the keys of what a run would launch now, in its order (a SLURM array's task indices)."""

    def run(self, trials: list[Trial], events: Events) -> None:
        """Run the trials to completion (or early stop), reporting each state change."""


def metric_placeholders(final: dict[str, Any]) -> dict[str, float]:
    """NaN for each metric a trial's last Tune report lacks: Tune checks that every result carries the scheduler's
    metric, and a failed or interrupted trial's has none (ASHA's sweep ended in a ValueError traceback)."""
    return {k: math.nan for k in REPORTED_METRICS if not isinstance(final.get(k), (int, float))}


def sigterm_as_ctrl_c(also: Callable[[], None] | None = None) -> None:
    """`kill`, `timeout`, a batch system ending the orchestrator's own job: the same orderly stop as Ctrl-C (SLURM
    jobs cancelled, trials marked interrupted), through whatever SIGINT handler runs then (Tune has its own).
    Called again once Ray has started: ray.init puts in a handler of its own that aborts the driver. ``also``
    runs first, in the handler."""
    def handler(*_):
        if also:
            also()
        os.kill(os.getpid(), signal.SIGINT)

    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, handler)


class ReportTail:
    """New records of a worker's report file, one JSON line each (rank 0 appends; a requeued worker appends
    again). A line still being written waits for the next read; a line torn by a killed worker, to which its
    next attempt appended, gives up only its torn part (json.loads of it stopped the sweep)."""

    def __init__(self, path: Path):
        self.path, self.offset, self.last = Path(path), 0, {}

    def read(self) -> list[dict[str, Any]]:
        try:
            with open(self.path, "rb") as f:
                f.seek(self.offset)
                chunk = f.read()
        except FileNotFoundError:
            return []
        complete = chunk[:chunk.rfind(b"\n") + 1]
        self.offset += len(complete)
        records = [r for r in map(parse_report_line, complete.decode(errors="replace").splitlines()) if r]
        if records:
            self.last = records[-1]
        return records

    def latest(self) -> dict[str, Any]:
        self.read()
        return self.last


def parse_report_line(line: str) -> dict[str, Any] | None:
    """The record of a report line: its last well-formed JSON object (the part after a torn one), else None."""
    start = 0
    while start != -1:
        try:
            record = json.loads(line[start:])
            return record if isinstance(record, dict) else None
        except json.JSONDecodeError:
            start = line.find('{"', start + 1)
    return None
