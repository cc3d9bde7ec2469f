"""Running a sweep: spec -> trials -> (skip what MLflow says is done) -> backend, with a live view."""
from __future__ import annotations

import contextlib
import os
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from resnet_core.config import first_line
from resnet_core.tracking import absolute_uri, check_store_usable, tracking_uri

from .backends import get_backend
from .estimate import EAGER_SLOWDOWN, gpu_hours
from .ledger import NEW, RESUME, SKIP_FAILED, Ledger
from .progress import SweepProgress
from .spec import SpecError, load_cluster_profile, load_spec
from .trials import (FusedGroup, SweepContext, Trial, check_data_exists, check_gpu_memory, expand, fuse,
                     gpu_memory_plan, resume_iteration)


def prepare(spec_path: str, address: str | None = None, check_data: bool = True, sets: list[str] = (),
            **overrides) -> tuple[SweepContext, list[Trial]]:
    """``address``: an existing Ray cluster (``ray start --head`` prints it; ``auto`` finds a local one);
    ``sets``: ``--set KEY=VALUE`` edits of the spec."""
    spec, path = load_spec(spec_path, overrides, sets)
    ctx = SweepContext(spec=spec, spec_path=path,
                       output=Path(spec.output or Path("runs") / "sweeps" / spec.name).resolve(),
                       tracking_uri=absolute_uri(tracking_uri(spec.tracking_uri)),
                       cluster=load_cluster_profile(spec, path), sets=tuple(sets))
    if ctx.output.exists() and not ctx.output.is_dir():
        raise SpecError(f"output: {ctx.output} is a file; the sweep writes checkpoints and logs into a folder there")
    if address:
        ctx.cluster.setdefault("ray", {})["address"] = address
    if ctx.cluster.get("ray", {}).get("address") and spec.backend == "ray":
        use_ray_auth_token_if_any()
    trials = expand(ctx, check_data)
    # Before anything is submitted or logged: groups that cannot fuse, packings that cannot fit a GPU.
    check_gpu_memory(ctx, fuse(ctx, trials))
    return ctx, trials


def use_ray_auth_token_if_any() -> None:
    """Ray 2.60 turns token authentication on for clusters started by `ray start`, but a driver connecting to an
    address has it off unless told, and fails with InvalidAuthToken. A driver in token mode also connects to a
    cluster without authentication (tried), so: token mode whenever a token is at hand. Ray reads the mode when
    it is imported, so this runs before anything imports it."""
    if os.environ.get("RAY_AUTH_MODE"):
        return  # the user decided
    token_file = Path(os.environ.get("RAY_AUTH_TOKEN_PATH") or Path.home() / ".ray" / "auth_token")
    if os.environ.get("RAY_AUTH_TOKEN") or token_file.is_file():
        os.environ["RAY_AUTH_MODE"] = "token"


def store_exists(uri: str) -> bool:
    from resnet_core.tracking import sqlite_path
    path = sqlite_path(uri)
    return path is None or path.exists()


def schedule_warning_lines(trials: list[Trial]) -> list[str]:
    """resnet_core.schedule's warnings, once each, with the trials they concern when not all."""
    from resnet_core.schedule import schedule_warnings
    concerned: dict[str, list[str]] = {}
    for trial in trials:
        for warning in schedule_warnings(trial.config):
            concerned.setdefault(warning, []).append(trial.label)
    return [f"warning: {warning}" if len(labels) == len(trials) else
            f"warning: {len(labels)} trial(s) ({labels[0]}{', ...' if len(labels) > 1 else ''}): {warning}"
            for warning, labels in concerned.items()]


def dry_run(ctx: SweepContext, trials: list[Trial], retry_failed: bool = False) -> str:
    """Every trial, its resources and exact launch, and the GPU-hour estimate; touches no store, no queue."""
    backend = get_backend(ctx.spec.backend)(ctx)
    done, foreign, to_run = {}, 0, {t.key for t in trials}
    if store_exists(ctx.tracking_uri):
        check_store_usable(ctx.tracking_uri)
        plan = Ledger(ctx.tracking_uri, ctx.spec.name, create=False).plan(trials, retry_failed)
        done, foreign, to_run = plan.reason, plan.foreign, {t.key for t in plan.to_run}
    r = ctx.spec.resources
    lines = [f"sweep {ctx.spec.name!r}: {len(trials)} trials on backend {ctx.spec.backend} "
             f"(each: {r.nodes} node(s), {r.gpus} GPU(s)/node, {r.cpus} CPU(s), time limit {r.time_limit})",
             f"tracking: {ctx.tracking_uri} (experiment {ctx.spec.name!r}); output: {ctx.output}"]
    asha = ctx.spec.scheduler.asha
    if asha:  # the estimate below is the no-stopping upper bound
        lines.append(f"scheduler: ASHA on {asha.metric} ({asha.mode}), a trial may stop after {asha.grace_period} "
                     f"epoch(s), 1/{asha.reduction_factor:g} go on at each rung, up to "
                     f"{f'{asha.max_t} epochs' if asha.max_t else 'their full length'}")
    try:
        check_data_exists(ctx, trials)
    except SpecError as err:  # shown, not fatal: the compute nodes may see what this machine does not
        lines.append(f"warning: {err} (here; a real run stops on it)")
    lines += plan_warnings(ctx, trials, done, foreign)
    units = fuse(ctx, trials)
    todo = [u.key for u in fuse(ctx, [t for t in trials if t.key in to_run])]  # what a run launches, in its order
    memory = gpu_memory_plan(ctx, units)
    if memory:
        per_gpu, need, capacity, source = memory
        lines.append(f"GPU memory: up to {per_gpu} trial process(es) per GPU need at most {need / 2**30:.1f} GiB "
                     f"of {capacity:.0f} GiB ({source})")
    lines += ["", "trials in the order they start (longest first, so the sweep's end waits on no long trial):"]
    total = 0.0
    for unit in units:
        members = unit.members
        if isinstance(unit, FusedGroup):
            lines.append(f"{unit.key}: {len(members)} trials trained as one fused model (one process)")
        for trial in members:
            hours = gpu_hours(trial.config)
            total += hours
            state = done.get(trial.key, "new")
            lines.append(f"{'  ' if len(members) > 1 else ''}trial {trial.key}  {trial.label}  [{state}]  "
                         f"~{hours:.3f} GPU-h")
        lines += ["    " + line for line in backend.describe(unit, todo).splitlines()]
    hours_to_run = sum(gpu_hours(t.config) for t in trials if t.key in to_run)
    lines += ["", f"estimated GPU-hours: {total:.2f} in all, {hours_to_run:.2f} still to run "
                  f"(one GPU's rate, bf16: CIFAR nets at the H100's CUDA-graph rates, their eager and compile "
                  f"steps ~{EAGER_SLOWDOWN:.1f}x slower; ImageNet nets at a published A100 rate"
                  f"{'; fused members counted as separate trials, an upper bound' if len(units) < len(trials) else ''}"
                  f"{'; as if ASHA stopped none, an upper bound' if ctx.spec.scheduler.asha else ''}"
                  f"{'; this sweep asks for no GPU: what the trials would take on one' if not r.gpus else ''})",
              "dry run: nothing submitted, nothing logged"]
    warnings = sum(line.startswith("warning: ") for line in lines)
    if warnings:  # above the trials: 30 of them scroll it away
        lines[-1] += f"; {warnings} warning(s) at the top"
    return "\n".join(lines)


def mark_interrupted(ctx: SweepContext, progress: SweepProgress, trials: list[Trial]) -> None:
    """Runs of trials the stopped sweep was running end KILLED with the reason (a re-run resumes them): left
    RUNNING, the MLflow UI and `status` showed dead trials as running."""
    running = {t.key: t for t in trials if t.key in progress.trials and progress.trials[t.key].state == "running"}
    ledger = Ledger(ctx.tracking_uri, ctx.spec.name, create=False)
    runs = ledger.trial_runs()
    for key in running.keys() - runs.keys():  # its job or actor had started, its worker not yet: still "running"
        progress.update(key, "interrupted", reason="the sweep was stopped before the trial opened its run; the same "
                                                   "orchestrate sweep command starts it")
    for key, run in runs.items():
        if key not in running:
            continue
        if run.info.status == "RUNNING":
            reason = ("interrupted: the sweep was stopped; the same orchestrate sweep command resumes it "
                      f"{resume_point(running[key])}")
            ledger.client.set_tag(run.info.run_id, "status_reason", reason)
            ledger.client.set_terminated(run.info.run_id, status="KILLED")
            progress.update(key, "interrupted", reason=reason)
        elif run.info.status == "KILLED":  # it checkpointed and ended its run, and the sweep stopped before it said so
            progress.update(key, "interrupted", reason=run.data.tags.get("status_reason", ""))


def resume_point(trial: Trial) -> str:
    """Where an interrupted trial starts again: its newest checkpoint. The trials a sweep's Ctrl-C leaves to mark
    here did not write one as they stopped (a second Ctrl-C, or past the grace time), so that is a periodic one."""
    iteration = resume_iteration(trial)
    if iteration:
        return f"from its checkpoint at iteration {iteration}"
    return "from iteration 0 (it stopped before its first checkpoint: checkpoint.every)"


def plan_warnings(ctx: SweepContext, trials: list[Trial], reasons: dict[str, str], foreign: int) -> list[str]:
    """What a sweep (and its dry run) warns of before it runs ``trials``: runs under its name that are none of its
    trials, checkpoints another store wrote, schedules that do not fit the run's length."""
    lines = ["warning: " + foreign_runs_message(ctx, foreign)] if foreign else []
    elsewhere = checkpoints_of_another_store(ctx, trials, reasons)
    if elsewhere:
        lines.append("warning: " + elsewhere)
    return lines + schedule_warning_lines(trials)


def foreign_runs_message(ctx: SweepContext, count: int) -> str:
    """An edited base (or a narrowed space) gives new trial keys under the same sweep name: the old runs stay in
    the experiment, and status, report and ensemble would mix them with the new ones unannounced."""
    return (f"sweep {ctx.spec.name!r} already holds {count} trial run(s) that are not trials of this spec (it was "
            "edited since they ran); status, report and ensemble count them with the new ones. To keep them "
            "apart, give the edited spec another name (--set name=...)")


def checkpoints_of_another_store(ctx: SweepContext, trials: list[Trial], reasons: dict[str, str]) -> str | None:
    """Trials without a run in this store whose checkpoints are in the output folder: another store (or sweep
    name) trained them there, and the workers go on from those quietly (a finished one only evaluates once, and
    its curve stays in the other store; report then blamed eval.every_epochs)."""
    from resnet_core.checkpoint import checkpoint_files
    folder = ctx.output / "checkpoints"
    found = [t for t in trials if reasons.get(t.key, NEW) == NEW and t.config.checkpoint.resume
             and checkpoint_files(folder / t.key)]
    if not found:
        return None
    return (f"{len(found)} trial(s) without a run in {ctx.tracking_uri} have checkpoints in {folder} (written with "
            "another store or sweep name): they go on from those in new runs here, and one trained to its end is "
            "only evaluated, its curve left in the other store; --output elsewhere or --set "
            "base.checkpoint.resume=false trains them from scratch")


def resume_message(ctx: SweepContext, plan) -> str:
    from resnet_core.checkpoint import checkpoint_files
    folder = ctx.output / "checkpoints"
    resuming = [key for key, reason in plan.reason.items() if reason == RESUME]
    afresh = [key for key in resuming if not checkpoint_files(folder / key)]
    said = f"sweep {ctx.spec.name!r}: {len(resuming)} interrupted trial(s) resume"
    if not afresh:
        return said + " from their checkpoints"
    return (said + f"; {len(afresh)} of them have no checkpoint in {folder} (stopped before their first one, or "
            "the sweep ran with another --output) and train again from iteration 0 in their runs")


def run_sweep(ctx: SweepContext, trials: list[Trial], retry_failed: bool = False, live: bool | None = None,
              command: str | None = None) -> dict:
    """``command``: the `orchestrate sweep` arguments of this call, recorded for `status` (default: the spec)."""
    backend = get_backend(ctx.spec.backend)(ctx)  # refuses what it cannot run before anything is logged
    check_store_usable(ctx.tracking_uri)  # before the engine starts, not seconds into it
    with one_orchestrator(ctx):
        try:
            return run_planned_sweep(ctx, trials, backend, retry_failed, live, command)
        finally:
            if hasattr(backend, "stop"):
                backend.stop()  # however the sweep ended (nothing to run, refused, done): no engine outlives it


@contextlib.contextmanager
def one_orchestrator(ctx: SweepContext):
    """One `orchestrate sweep` per output folder at a time: a second one ran every unfinished trial again, its
    copies then stopped as "superseded" and both views reported them failed. The lock goes with the process
    (flock), so a killed orchestrator never blocks a re-run."""
    import fcntl
    import socket
    ctx.output.mkdir(parents=True, exist_ok=True)
    lock = open(ctx.output / ".orchestrator.lock", "a+")
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        lock.seek(0)
        holder = lock.read().strip() or "another process"
        lock.close()
        raise SpecError(f"sweep {ctx.spec.name!r} is already running from {ctx.output} ({holder}); wait for it, or "
                        "stop it (Ctrl-C, kill) and run this again: it resumes") from None
    lock.seek(0)
    lock.truncate()
    lock.write(f"pid {os.getpid()} on {socket.gethostname()}, since {time.strftime('%Y-%m-%d %H:%M:%S')}")
    lock.flush()
    try:
        yield
    finally:
        lock.close()


def run_planned_sweep(ctx: SweepContext, trials: list[Trial], backend, retry_failed: bool, live: bool | None,
                      command: str | None) -> dict:
    fresh_store = not store_exists(ctx.tracking_uri)
    with ThreadPoolExecutor(1) as pool:
        # Creating an sqlite store runs MLflow's migrations (~8 s); a new store means every trial will run, so
        # the engine starts meanwhile (Ray: ~9 s) instead of after.
        ledger = pool.submit(Ledger, ctx.tracking_uri, ctx.spec.name, create=False)
        started = fresh_store and hasattr(backend, "start")
        if started:
            backend.start()
        ledger = ledger.result()
    ledger.check_owner()  # before the engine starts; claim() checks again, once it has started
    plan = ledger.plan(trials, retry_failed)
    if plan.to_run and hasattr(backend, "start") and not started:
        backend.start()  # an engine that refuses the sweep (no GPU here) does so before the plan is recorded
    other_host = ledger.claim(ctx.output)  # refuses a sweep that another orchestrator runs now
    try:
        ledger.record_plan(trials, command or ctx.spec_path)  # `orchestrate status` lists what has not started
        return run_plan(ctx, trials, plan, backend, live, other_host)
    finally:
        ledger.release()


def run_plan(ctx: SweepContext, trials: list[Trial], plan, backend, live: bool | None, other_host: str | None) -> dict:
    running = {t.key for t in plan.to_run}
    # with a finished trial's metrics: the sweep's best may be one that finished in an earlier call
    skipped = {t.key: (t.label, {"reason": plan.reason[t.key], **plan.results.get(t.key, {})})
               for t in trials if t.key not in running}
    # "best so far" is chosen on held-out data when the trials have some (the test set is for the final word)
    held_out = trials and all(t.config.data.val_split for t in trials)
    metric = ctx.spec.scheduler.asha.metric if ctx.spec.scheduler.asha else "val_error" if held_out else "test_error"
    progress = SweepProgress(ctx.spec.name, plan.to_run, skipped, metric=metric, live=live)
    if other_host:
        progress.log("warning: " + other_host)
    if plan.count(RESUME):
        progress.log(resume_message(ctx, plan))
    for line in plan_warnings(ctx, plan.to_run, plan.reason, plan.foreign):  # a worker's never reach this console
        progress.log(line)
    if plan.count(SKIP_FAILED):
        progress.log(f"sweep {ctx.spec.name!r}: {plan.count(SKIP_FAILED)} trial(s) failed in an earlier run and are "
                     "skipped; --retry-failed runs them again (`orchestrate status` says why they failed)")
    with progress:
        if plan.to_run:
            try:
                backend.run(plan.to_run, progress)
                if progress.unfinished():  # Tune returns (it does not raise) when Ctrl-C stopped it
                    raise KeyboardInterrupt
            except KeyboardInterrupt:
                try:
                    mark_interrupted(ctx, progress, plan.to_run)
                except Exception as err:  # the store gone too: the runs stay RUNNING, a re-run still resumes them
                    progress.log(f"could not mark the interrupted trials' runs: {first_line(err, 200)}")
                raise
            failed = {key: view.info.get("reason", "") for key, view in progress.trials.items() if view.state == "failed"}
            if failed:
                Ledger(ctx.tracking_uri, ctx.spec.name).record_failures(plan.to_run, failed)
    return {"started": len(plan.to_run), "skipped": len(skipped), "failed_before": plan.count(SKIP_FAILED),
            **progress.counts()}
