"""What the sweep hears from Ray Tune: its trial events for the progress view (on SLURM under ASHA too), and the
sweep's Ctrl-C as a Tune stopper. Apart from the backends because it subclasses Tune's classes: importing Ray
(~2 s) waits until a sweep runs on it, so a dry run or a SLURM sweep without ASHA never pays it.
"""
from __future__ import annotations

import contextlib
import math
import os
import re
import signal
import threading
import time
from pathlib import Path

from ray import tune

from ..ledger import Ledger
from ..trials import REPORTED_METRICS, SweepContext
from .base import STOP_GRACE_S, Events
from .slurm import cancel, cancel_then_mark


class StopOnCtrlC(tune.Stopper):
    """The sweep's first Ctrl-C (or SIGTERM) asks the running trials to checkpoint and stop, by creating the file
    their ``stop_when_file_appears`` watches, and Tune starts no new trial: it ends once none is running, or
    STOP_GRACE_S later (a trial on a node that does not see the file). A second Ctrl-C stops at once; the trials
    then keep only their last periodic checkpoint. Tune's own Ctrl-C handler is off: it ends the trials' actors
    before they could checkpoint."""

    def __init__(self, flag: Path, callback: "EventsCallback", say):
        self.flag, self.callback, self.say = flag, callback, say
        self.asked_at: float | None = None

    def __call__(self, trial_id, result) -> bool:
        return False  # no trial stops on its own results here (ASHA does that)

    def stop_all(self) -> bool:
        if self.asked_at is None:
            return False
        return not self.callback.live or time.monotonic() - self.asked_at > STOP_GRACE_S

    def __getstate__(self):  # Tune pickles its stopper with the experiment state; the view stays behind
        return {"flag": self.flag, "callback": None, "say": None, "asked_at": None}

    @contextlib.contextmanager
    def catching_ctrl_c(self):
        if threading.current_thread() is not threading.main_thread():
            yield  # signals reach only the main thread: Tune's default applies
            return
        self.flag.unlink(missing_ok=True)  # left by a killed orchestrator, it would stop every trial at its start
        os.environ["TUNE_DISABLE_SIGINT_HANDLER"] = "1"
        previous = signal.signal(signal.SIGINT, self.on_ctrl_c)
        try:
            yield
        finally:
            signal.signal(signal.SIGINT, previous)
            self.flag.unlink(missing_ok=True)

    def on_ctrl_c(self, signum, frame) -> None:
        if self.asked_at is not None:
            raise KeyboardInterrupt
        self.asked_at = time.monotonic()
        self.flag.touch()
        self.callback.stopping = True
        self.say(f"stopping: the running trials checkpoint and stop (within {STOP_GRACE_S} s); Ctrl-C again stops "
                 "at once")


class EventsCallback(tune.Callback):
    """Tune's trial events -> the progress view; a trial that ends without its final report was stopped by ASHA.

    Tune pickles its callbacks with the experiment state; the live view stays behind (it holds a lock).
    """

    def __init__(self, events: Events, ctx: SweepContext):
        self.events, self.ctx = events, ctx
        self.live: set[str] = set()  # Tune trials started and not ended (StopOnCtrlC waits for them)
        self.stopping = False  # a trial Tune starts now ends at once (NOT_STARTED): it stays pending in the view

    def __getstate__(self):
        return {"events": None, "ctx": self.ctx, "live": set(), "stopping": False}

    def on_trial_start(self, iteration, trials, trial, **info):
        self.live.add(trial.trial_id)
        if self.stopping:
            return
        for key in trial_keys(trial):
            self.events.update(key, "running")

    def on_trial_result(self, iteration, trials, trial, result, **info):
        key = result.get("trial_key") or trial.config["trial"]["key"]
        if "trial_status" in result:  # a trial's own end (a fused group reports one per member)
            # FAILED (diverged) and INTERRUPTED (the sweep stopped; a SLURM job under ASHA) say why; NOT_STARTED: to run
            state = {"FINISHED": "finished", "INTERRUPTED": "interrupted",
                     "NOT_STARTED": "pending"}.get(result["trial_status"], "failed")
            self.events.update(key, state, **final_metrics(result),
                               **({"reason": result.get("reason", "")} if state in ("failed", "interrupted") else {}))
            return
        metrics = {k: result[k] for k in ("epoch", "val_error", "test_error") if k in result}
        self.events.update(key, "running", **metrics)

    def on_trial_complete(self, iteration, trials, trial, **info):
        self.live.discard(trial.trial_id)
        last = trial.last_result or {}
        if "trial_status" in last:
            return  # every trial of this job reported its end (on_trial_result)
        key = trial.config["trial"]["key"]
        reason = early_stop_reason(self.ctx, last)
        if last.get("run_id"):
            Ledger(self.ctx.tracking_uri, self.ctx.spec.name).mark_early_stopped(last["run_id"], reason)
        self.events.update(key, "stopped", reason=reason, **final_metrics(last))

    def on_trial_error(self, iteration, trials, trial, **info):
        self.live.discard(trial.trial_id)
        for key in trial_keys(trial):
            self.events.update(key, "failed", reason=error_line(trial))


def error_line(tune_trial) -> str:
    """The trial's own exception in one line, and where its traceback is kept (the sweep's output folder)."""
    kept = Path(tune_trial.path) / "error.txt" if tune_trial.path else None
    try:  # the driver's staging copy: written before this callback, unlike the copy in storage
        lines = Path(tune_trial.error_file).read_text().strip().splitlines()
        said = re.sub(r"^[\w.]*\.(?=\w+: )", "", lines[-1])  # resnet_core.data.config.DataError: -> DataError:
    except (OSError, TypeError, IndexError):
        said = "the trial raised an error"
    return f"{said[:300]} (traceback: {kept or 'in the trial log'})"


def trial_keys(tune_trial) -> list[str]:
    """The sweep trials a Tune trial runs: itself, or the members of a fused group."""
    payload = tune_trial.config["trial"]
    return [m["key"] for m in payload["members"]] if "members" in payload else [payload["key"]]


def early_stop_reason(ctx: SweepContext, last: dict) -> str:
    asha = ctx.spec.scheduler.asha
    metric = asha.metric if asha else "metric"
    value = last.get(metric)
    shown = f"{value:.4f}" if isinstance(value, float) else value
    return f"stopped early by ASHA at epoch {last.get('epoch')} ({metric} {shown})"


def final_metrics(last: dict) -> dict:
    """What the view shows of a trial's last report (every reported metric: the sweep's best is chosen on the
    scheduler's, val_loss in smoke_lr); not the NaN that metric_placeholders put in."""
    return {k: last[k] for k in ("epoch", *REPORTED_METRICS)
            if k in last and not (isinstance(last[k], float) and math.isnan(last[k]))}


class SlurmEventsCallback(EventsCallback):
    """Tune's events -> the view; an ASHA stop -> scancel of the trial's job and the run marked stopped."""

    def __init__(self, events: Events, ctx: SweepContext):
        super().__init__(events, ctx)
        self.stoppers: list[threading.Thread] = []
        self.refused: str | None = None  # what sbatch said when it refused a trial's job
        self.jobs: set[str] = set()  # every job a relay reported: Ctrl-C cancels those still live

    def __getstate__(self):
        return {**super().__getstate__(), "stoppers": [], "refused": None, "jobs": set()}

    def on_trial_result(self, iteration, trials, trial, result, **info):
        self.refused = self.refused or result.get("sbatch_refused")
        if result.get("slurm_job_id"):
            self.jobs.add(str(result["slurm_job_id"]))
        super().on_trial_result(iteration, trials, trial, result, **info)

    def on_trial_complete(self, iteration, trials, trial, **info):
        last = trial.last_result or {}
        if "trial_status" in last or not last.get("slurm_job_id"):
            return super().on_trial_complete(iteration, trials, trial, **info)
        reason = early_stop_reason(self.ctx, last)
        thread = threading.Thread(target=cancel_then_mark, daemon=True,
                                  args=(last["slurm_job_id"], last.get("run_id"), reason, self.ctx))
        thread.start()
        self.stoppers.append(thread)
        self.events.update(trial.config["trial"]["key"], "stopped", reason=reason,
                           slurm_job_id=last["slurm_job_id"], **final_metrics(last))

    def on_trial_error(self, iteration, trials, trial, **info):
        job_id = (trial.last_result or {}).get("slurm_job_id")
        if job_id:
            cancel(job_id)
        super().on_trial_error(iteration, trials, trial, **info)

    def join(self) -> None:
        for thread in self.stoppers:
            thread.join(timeout=180)
