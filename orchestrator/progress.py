"""The live view of a sweep: trials pending/running/finished/failed/interrupted/stopped, best so far, elapsed, ETA.

A rich live table on a terminal; plain timestamped log lines otherwise (CI, batch jobs), one per state change.
"""
from __future__ import annotations

import sys
import threading
import time
from dataclasses import dataclass, field

from .ledger import DONE
from .trials import Trial

STATES = ("pending", "running", "finished", "failed", "interrupted", "stopped", "skipped")


@dataclass
class TrialView:
    label: str
    state: str = "pending"
    info: dict = field(default_factory=dict)


class SweepProgress:
    def __init__(self, name: str, trials: list[Trial], skipped: dict[str, tuple[str, dict]],
                 metric: str = "test_error", live: bool | None = None):
        """``skipped``: key -> (label, info) of the trials this call does not run; info holds the ledger's
        "reason" and, for a finished trial, its final metrics."""
        self.name, self.metric = name, metric
        self.trials = {t.key: TrialView(t.label) for t in trials}
        self.trials.update({key: TrialView(label, "skipped", dict(info)) for key, (label, info) in skipped.items()})
        self.started = time.monotonic()
        self.live = sys.stdout.isatty() if live is None else live
        self._lock = threading.Lock()
        self._live = None
        self.ended = False  # no ETA once the sweep has stopped: an interrupted one left trials pending

    def __enter__(self) -> "SweepProgress":
        if self.live:
            from rich.live import Live
            self._live = Live(self.render(), refresh_per_second=2, transient=False)
            self._live.__enter__()
        else:
            self.log(f"sweep {self.name!r}: {self.summary()}")
        return self

    def __exit__(self, *exc) -> None:
        self.ended = True
        if self._live:
            self._live.update(self.render())
            self._live.__exit__(*exc)
        else:
            ended = "done" if exc[0] is None else "interrupted" if issubclass(exc[0], KeyboardInterrupt) else "stopped"
            self.log(f"sweep {self.name!r} {ended}: {self.summary()}")

    def update(self, trial_key: str, state: str, **info) -> None:
        with self._lock:
            view = self.trials.setdefault(trial_key, TrialView(trial_key[:8]))
            # a waiting trial's line changes with squeue's reason too: "queued: job 1234 (Resources)"
            changed = state != view.state or (state == "pending" and info.get("queued") != view.info.get("queued"))
            view.state = state
            view.info.update(info)
            if self._live:
                self._live.update(self.render())
            elif changed:
                details = " ".join(f"{k}: {v}" if k == "queued" else f"{k}={_fmt(v)}" for k, v in info.items())
                self.log(f"{state:8s} {view.label} [{trial_key[:8]}] {details}".rstrip())

    def counts(self) -> dict[str, int]:
        return {s: sum(1 for v in self.trials.values() if v.state == s) for s in STATES}

    def unfinished(self) -> int:
        counts = self.counts()
        return counts["pending"] + counts["running"]

    def best(self) -> tuple[str, float] | None:
        """The best final metric of the finished trials, those an earlier call finished too (a running trial's
        latest value is no result yet)."""
        finished = (v for v in self.trials.values()
                    if v.state == "finished" or (v.state == "skipped" and v.info.get("reason") == DONE))
        scored = [(v.label, v.info[self.metric]) for v in finished if isinstance(v.info.get(self.metric), (int, float))]
        return min(scored, key=lambda x: x[1]) if scored else None

    def eta_seconds(self) -> float | None:
        counts = self.counts()
        done = counts["finished"] + counts["failed"] + counts["interrupted"] + counts["stopped"]
        remaining = self.unfinished()
        if not done or not remaining or self.ended:
            return None
        return (time.monotonic() - self.started) / done * remaining

    def summary(self) -> str:
        counts = ", ".join(f"{n} {s}" for s, n in self.counts().items() if n)
        best = self.best()
        eta = self.eta_seconds()
        return (f"{counts}; elapsed {_duration(time.monotonic() - self.started)}"
                + (f"; best {self.metric} {best[1]:.4f} ({best[0]})" if best else "")
                + (f"; ETA {_duration(eta)}" if eta else ""))

    def render(self):
        from rich.table import Table
        table = Table(title=f"sweep {self.name}", caption=self.summary())
        for column in ("trial", "state", "epoch", "val_error", "test_error", "note"):
            table.add_column(column)
        order = {s: i for i, s in enumerate(("running", "pending", "finished", "stopped", "interrupted", "failed", "skipped"))}
        for key, v in sorted(self.trials.items(), key=lambda kv: order[kv[1].state]):
            table.add_row(v.label, v.state, _fmt(v.info.get("epoch", "")), _fmt(v.info.get("val_error", "")),
                          _fmt(v.info.get("test_error", "")), note(v))
        return table

    @staticmethod
    def log(message: str) -> None:
        print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


def note(view: TrialView) -> str:
    """Why a trial ended, or where its job waits (shown while it waits only)."""
    if view.state == "pending" and view.info.get("queued"):
        return f"queued: {view.info['queued']}"
    return str(view.info.get("reason", ""))


def _fmt(value) -> str:
    return f"{value:.4f}" if isinstance(value, float) else str(value)


def _duration(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"
