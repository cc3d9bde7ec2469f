"""MLflow as the record of a sweep: one experiment per sweep, one run per trial (tag trial_key).

It decides what a (re-)run of a sweep submits: finished and early-stopped trials are skipped, interrupted ones
resume (the worker continues their run from its checkpoint), failed ones only with --retry-failed. A trial is
never given a second run: the worker reuses the run that carries its key.
"""
from __future__ import annotations

import json
import os
import socket
import time
from dataclasses import dataclass, field

from .cli import UserError
from .runs import stopped_early, trial_runs
from .trials import Trial

PLANNED_KEY_LENGTH = 10
OWNER_TAG = "orchestrator"  # experiment tag: the `orchestrate sweep` process running this sweep now
DONE, RESUME, RETRY, NEW, SKIP_FAILED = "finished", "resume", "retry", "new", "failed (skipped)"
STOPPED = "stopped early"  # by the scheduler (ASHA): final, like DONE, but no finished model


@dataclass
class Plan:
    to_run: list[Trial] = field(default_factory=list)
    reason: dict[str, str] = field(default_factory=dict)   # trial key -> DONE / RESUME / RETRY / NEW / ...
    foreign: int = 0  # trial runs of this experiment that are no trial of this plan (the spec was edited)
    results: dict[str, dict[str, float]] = field(default_factory=dict)  # trial key -> a finished run's metrics

    def count(self, reason: str) -> int:
        return sum(1 for r in self.reason.values() if r == reason)


class Ledger:
    def __init__(self, uri: str, experiment: str, create: bool = True):
        from resnet_core.tracking import mlflow_client
        self.client, self.name = mlflow_client(uri), experiment
        found = self.client.get_experiment_by_name(experiment)
        self.experiment_id = found.experiment_id if found else None
        if create:
            self.create()

    def create(self) -> None:
        """The sweep's experiment, created once, before any worker writes (concurrent creation of an sqlite store
        crashes), and only for a sweep that starts (a refused one left an empty experiment in the UI)."""
        from resnet_core.tracking import get_or_create_experiment
        if self.experiment_id is None:
            self.experiment_id = get_or_create_experiment(self.client, self.name)

    def check_owner(self) -> str | None:
        """No other `orchestrate sweep` may run this sweep now: a second one of the same sweep and store (from
        another folder, or with another --output, so the output folder's lock did not stop it) took the first
        one's running trials for interrupted ones and trained them again in the same runs. Refuses when the
        other process is alive on this host; returns a warning when it was started on another host, where it
        cannot be checked from here."""
        owner = live_owner(self._owner())
        if not owner or is_this_process(owner):
            return None
        said = f"sweep {self.name!r} is already running: {describe_owner(owner)}"
        if owner.get("host") != socket.gethostname():
            return said + " (another host: if it still runs, its running trials train twice; stop it first)"
        raise UserError(said + "; wait for it, or stop it (Ctrl-C, kill) and run this again: it resumes")

    def claim(self, output) -> str | None:
        """check_owner(), then record this process as the sweep's orchestrator (until release())."""
        import psutil
        self.create()
        warning = self.check_owner()
        me = psutil.Process()
        record = {"pid": me.pid, "host": socket.gethostname(), "created": me.create_time(),
                  "since": time.strftime("%Y-%m-%d %H:%M:%S"), "output": str(output)}
        self.client.set_experiment_tag(self.experiment_id, OWNER_TAG, json.dumps(record))
        return warning

    def release(self) -> None:
        """The sweep call ended (finished, failed or interrupted): no longer running it. Best effort: a store gone
        with the sweep must not hide why it ended, and a record left behind blocks nothing once this process ends."""
        try:
            owner = self._owner()
            if owner and is_this_process(owner):
                self.client.delete_experiment_tag(self.experiment_id, OWNER_TAG)
        except Exception:  # noqa: BLE001
            pass

    def _owner(self) -> dict | None:
        return None if self.experiment_id is None else recorded_owner(self.client.get_experiment(self.experiment_id))

    def trial_runs(self) -> dict[str, object]:
        """The newest run of each trial key in this sweep's experiment."""
        if self.experiment_id is None:
            return {}
        runs = trial_runs(self.client, self.experiment_id, order_by=["attributes.start_time ASC"])
        return {r.data.tags["trial_key"]: r for r in runs if "trial_key" in r.data.tags}

    def plan(self, trials: list[Trial], retry_failed: bool = False) -> Plan:
        plan, runs = Plan(), self.trial_runs()
        for trial in trials:
            run = runs.get(trial.key)
            if run is None:
                reason = NEW
            else:
                status, stopped = run.info.status, stopped_early(run)
                reason = (STOPPED if stopped else DONE if status == "FINISHED" else
                          (RETRY if retry_failed else SKIP_FAILED) if status == "FAILED" else RESUME)
            plan.reason[trial.key] = reason
            if reason == DONE:
                plan.results[trial.key] = dict(run.data.metrics)
            if reason in (NEW, RESUME, RETRY):
                plan.to_run.append(trial)
        plan.foreign = len(runs.keys() - plan.reason.keys())
        return plan

    def record_plan(self, trials: list[Trial], spec_path) -> None:
        """What this sweep call set out to run, for `orchestrate status`: a planned trial without a run is pending
        (queued, or never started). Keys are shortened to fit MLflow's 5000-character tag values; a sweep too
        large for that records its count only."""
        keys = ",".join(t.key[:PLANNED_KEY_LENGTH] for t in trials)
        tags = {"planned_trials": str(len(trials)), "planned_keys": keys if len(keys) <= 5000 else "",
                "spec": str(spec_path)}
        for key, value in tags.items():
            self.client.set_experiment_tag(self.experiment_id, key, value)

    def record_failures(self, trials: list[Trial], reasons: dict[str, str]) -> None:
        """Trials that failed before their worker opened a run (a data error, a launcher that did not start):
        a FAILED run with the reason, so that status shows them and a re-run skips them unless --retry-failed
        (the worker then continues this run, as it does any run of its trial)."""
        from resnet_core.tracking import flatten, log_params
        runs = self.trial_runs()
        for trial in trials:
            if trial.key not in reasons or trial.key in runs:
                continue
            cfg = trial.config
            tags = {**cfg.tracking.tags, "kind": "trial", "trial_key": trial.key, "status_reason": reasons[trial.key]}
            run_id = self.client.create_run(self.experiment_id, run_name=cfg.tracking.run_name, tags=tags).info.run_id
            log_params(self.client, run_id, flatten(cfg.model_dump(mode="json")))
            self.client.set_terminated(run_id, status="FAILED")

    def mark_early_stopped(self, run_id: str, reason: str) -> None:
        """The scheduler stopped this trial: a final state with the reason, never resumed by a re-run."""
        for key, value in {"early_stopped": "true", "status_reason": reason}.items():
            self.client.set_tag(run_id, key, value)
        self.client.set_terminated(run_id, status="KILLED")


def recorded_owner(experiment) -> dict | None:
    """The orchestrator a sweep's experiment records (Ledger.claim), alive or not."""
    value = experiment.tags.get(OWNER_TAG)
    try:
        return json.loads(value) if value else None
    except json.JSONDecodeError:
        return None


def live_owner(owner: dict | None) -> dict | None:
    """The recorded orchestrator unless it is known to be gone (a dead process on this host). One on another host
    cannot be checked from here: it counts as alive."""
    if owner and owner.get("host") == socket.gethostname() and not _alive(owner.get("pid"), owner.get("created")):
        return None
    return owner


def is_this_process(owner: dict) -> bool:
    return (owner.get("pid"), owner.get("host")) == (os.getpid(), socket.gethostname())


def describe_owner(owner: dict) -> str:
    return (f"pid {owner.get('pid')} on {owner.get('host')}, since {owner.get('since')}, "
            f"output {owner.get('output')}")


def _alive(pid, created) -> bool:
    """That process still runs (the same one: a pid is reused after its process ends)."""
    import psutil
    try:
        return abs(psutil.Process(int(pid)).create_time() - float(created)) < 1.0
    except (psutil.Error, TypeError, ValueError):
        return False
