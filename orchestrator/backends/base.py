"""What every backend offers: describe a trial's launch (dry run) and run trials, reporting through Events."""
from __future__ import annotations

import os
import signal
import threading
from typing import Protocol

from ..trials import SweepContext, Trial


class Events(Protocol):
    """Trial state changes, for the progress view. States: running, finished, failed, interrupted
    (ended by the cluster, resumable), stopped (early)."""

    def update(self, trial_key: str, state: str, **info) -> None: ...


class Backend(Protocol):
    name: str

    def __init__(self, ctx: SweepContext): ...

    def describe(self, trial: Trial) -> str:
        """The exact command (or batch script) the backend would launch for this trial."""

    def run(self, trials: list[Trial], events: Events) -> None:
        """Run the trials to completion (or early stop), reporting each state change."""


def sigterm_as_ctrl_c() -> None:
    """`kill`, `timeout`, a batch system ending the orchestrator's own job: the same orderly stop as Ctrl-C (SLURM
    jobs cancelled, trials marked interrupted), through whatever SIGINT handler runs then (Tune has its own).
    Called again once Ray has started: ray.init puts in a handler of its own that aborts the driver."""
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, lambda *_: os.kill(os.getpid(), signal.SIGINT))
