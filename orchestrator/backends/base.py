"""What every backend offers: describe a trial's launch (dry run) and run trials, reporting through Events."""
from __future__ import annotations

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
