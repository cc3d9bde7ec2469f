"""The SLURM backend: one SLURM job per trial through submitit's ``SlurmExecutor`` (a job array for a plain grid).

- Where: ``ctx.output/slurm/<submission id>``, a fresh folder per run of the sweep (submitit returns an old job's
  result from a reused folder once SLURM's job ids restart).
- What: ``sbatch_parameters`` turns the spec's resources and the cluster profile (``slurm:`` in cluster/*.yaml)
  into submitit's parameters; submitit renders the sbatch script (every value shell-quoted) and ``describe``
  renders the very same script for ``--dry-run``. A trial is nodes x workers_per_node SLURM tasks, one per rank;
  each runs ``slurm_job.SlurmTrial`` (see there for the rendezvous and the two preemption paths).
- GPUs are whole per node: a SLURM job cannot hold a quarter of a GPU (sharing one needs site-specific MPS/shard
  GRES), so fractional ``resources.gpus`` is refused on this backend with a one-line error; pack on Ray instead.
- Early stopping (ASHA): Ray Tune runs on the submitting machine as the decider only. Each Tune trial is a tiny
  relay that submits the trial's SLURM job and relays the worker's reports (a JSON-lines file on the shared
  filesystem) with ``tune.report``; when ASHA stops a trial, the driver cancels its job (scancel) and, once the
  worker has let go of the run, marks the MLflow run stopped with the reason.
"""
from __future__ import annotations

import contextlib
import io
import math
import os
import re
import shlex
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path
from typing import Any

from ..ledger import Ledger
from ..mps import last_line
from ..spec import SlurmProfile, SpecError
from ..trials import FusedGroup, SweepContext, Trial, fuse
from .base import STOP_GRACE_S, Events, ReportTail, metric_placeholders
from .slurm_job import EXIT_INTERRUPTED, SlurmTrial

RESULT_KEYS = ("epoch", "val_error", "test_error", "best_val_error", "iteration")
RELAYED_KEYS = RESULT_KEYS + ("val_loss", "test_loss")  # what an ASHA relay tells Tune: the losses too


def time_minutes(limit: str) -> int:
    """[D-]HH:MM:SS -> whole minutes (submitit's `time`; it also counts timeouts with it)."""
    days, _, hms = limit.rpartition("-")
    h, m, s = (int(x) for x in hms.split(":"))
    return max(1, math.ceil((int(days or 0) * 86400 + h * 3600 + m * 60 + s) / 60))


def safe_name(text: str) -> str:
    """SLURM mangles quotes in job names; keep names readable in squeue/sacct and free of shell meaning."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("_") or "sweep"


def cpus_per_task(resources) -> int:
    """One task per rank: the trial's CPUs shared among its ranks on a node, at least one each."""
    return max(1, math.ceil(resources.cpus / resources.workers_per_node))


def memory(gb: float) -> str:
    return f"{int(gb)}G" if gb == int(gb) else f"{math.ceil(gb * 1024)}M"


def slurm_profile(ctx: SweepContext) -> SlurmProfile:
    """The cluster profile's `slurm:` section with its defaults (load_cluster_profile has checked it)."""
    return SlurmProfile.model_validate(ctx.cluster.get("slurm") or {})


def check_folder(folder: Path) -> None:
    """#SBATCH directives are one line each and SLURM expands %-patterns in --output: refuse both early."""
    text = str(folder)
    if "\n" in text or "\r" in text:
        raise SpecError(f"output: {text!r}: a SLURM job's folder cannot contain a newline (#SBATCH lines are one line)")
    if "%" in text:
        raise SpecError(f"output: {text!r}: a SLURM job's folder cannot contain '%' (SLURM expands %-patterns)")


def sbatch_parameters(ctx: SweepContext, job_name: str) -> dict[str, Any]:
    """submitit SlurmExecutor parameters of one trial's job, from the spec's resources and the cluster profile."""
    r, profile = ctx.spec.resources, slurm_profile(ctx)
    if r.gpus != int(r.gpus):
        raise SpecError(f"{ctx.spec_path}: resources.gpus: {r.gpus} — a SLURM job holds whole GPUs; fractional GPUs "
                        "pack trials on the ray backend (use gpus: 1, or --backend ray)")
    if ctx.spec.launcher in ("torchrun", "deepspeed"):  # no silent fallback to SLURM's own launch
        raise SpecError(f"{ctx.spec_path}: launcher: {ctx.spec.launcher} is not used on the slurm backend: srun starts "
                        "one task per rank that calls train() (DeepSpeed too); use launcher: auto")
    workers, delay = r.workers_per_node, profile.signal_delay_s
    if time_minutes(r.time_limit) * 60 <= delay + 60:  # SLURM counts whole minutes
        # submitit's USR2 (checkpoint + requeue) would come before training has started: requeued at once, again
        raise SpecError(f"{ctx.spec_path}: resources.time_limit: {r.time_limit} is not longer than the cluster "
                        f"profile's slurm.signal_delay_s ({delay} s) + 60 s; give the trial more time")
    params: dict[str, Any] = {
        "job_name": job_name, "time": time_minutes(r.time_limit), "nodes": r.nodes,
        "ntasks_per_node": workers, "cpus_per_task": cpus_per_task(r),
        "signal_delay_s": delay,
        "additional_parameters": {"requeue": True, **profile.sbatch},
    }
    for key in ("partition", "account", "qos", "constraint", "exclude"):
        if getattr(profile, key):
            params[key] = getattr(profile, key)
    if r.gpus:
        if profile.gpu_type:
            params["gres"] = f"gpu:{profile.gpu_type}:{int(r.gpus)}"
        else:
            params["gpus_per_node"] = int(r.gpus)
    if r.memory_gb:
        params["mem"] = memory(r.memory_gb)
    if profile.setup:
        params["setup"] = list(profile.setup)
    if profile.srun_args:
        params["srun_args"] = list(profile.srun_args)
    return params


class SlurmBackend:
    name = "slurm"

    def __init__(self, ctx: SweepContext):
        self.ctx, self.spec = ctx, ctx.spec
        self.profile = slurm_profile(ctx)
        # sortable and fresh: a new folder per run of the sweep
        self.submission_id = f"{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:6]}"
        self.python = self.profile.python or shlex.quote(sys.executable)
        self.poll_s = self.profile.poll_s
        check_folder(self.folder)
        sbatch_parameters(ctx, "check")  # refuse what SLURM cannot run before anything is submitted or logged

    # -- what is submitted ----------------------------------------------------------------------------------
    @property
    def folder(self) -> Path:
        return self.ctx.output / "slurm" / self.submission_id

    @property
    def use_array(self) -> bool:
        return self.spec.scheduler.asha is None

    def job_name(self, trial: Trial | FusedGroup | None) -> str:
        return f"{safe_name(self.spec.name)}-{trial.key[:8] if trial else 'grid'}"

    def parameters(self, trial: Trial | FusedGroup | None, array_size: int = 1) -> dict[str, Any]:
        params = sbatch_parameters(self.ctx, self.job_name(trial if array_size == 1 else None))
        if array_size > 1:
            params["array_parallelism"] = self.spec.max_concurrent or array_size
        return params

    def payload(self, trial: Trial | FusedGroup) -> SlurmTrial:
        cpus = cpus_per_task(self.spec.resources)
        if isinstance(trial, FusedGroup):
            members = [{"key": t.key, "config": t.config_dict(), "report_file": str(self.report_file(t.key))}
                       for t in trial.members]
            return SlurmTrial(key=trial.key, config={}, cpus=cpus, members=members)
        return SlurmTrial(key=trial.key, config=trial.config_dict(), report_file=str(self.report_file(trial.key)),
                          master_addr=self.profile.master_addr, cpus=cpus)

    def report_file(self, key: str) -> Path:
        return self.ctx.output / "reports" / f"{key}.jsonl"

    def command(self) -> str:
        """What srun starts on every task (as SlurmExecutor._submitit_command_str)."""
        return " ".join([self.python, "-u -m submitit.core._submit", shlex.quote(str(self.folder))])

    def script(self, trial: Trial | FusedGroup | None, array_size: int = 1) -> str:
        """The sbatch script submitit writes for this job (SlurmExecutor._make_submission_file_text)."""
        from submitit.slurm.slurm import _make_sbatch_string
        params = self.parameters(trial, array_size)
        if array_size > 1:
            params["map_count"] = array_size
        return _make_sbatch_string(command=self.command(), folder=self.folder, **params)

    def describe(self, trial: Trial | FusedGroup, todo: list[str] = ()) -> str:
        r = self.spec.resources
        ranks = r.nodes * r.workers_per_node
        call = (f"resnet_core.fused.train_fused(<{len(trial.members)} trial configs>)"
                if isinstance(trial, FusedGroup) else "resnet_core.train.train(<trial config>)")
        head = (f"SLURM job: {r.nodes} node(s) x {r.workers_per_node} task(s), one rank per task "
                f"(world size {ranks}); each task runs orchestrator.backends.slurm_job.SlurmTrial -> {call}")
        if self.use_array and trial.key in todo and len(todo) > 1:
            index = todo.index(trial.key)
            where = f"{head}; array task {index} of {len(todo)}, SLURM_ARRAY_TASK_ID={index}"
            if index:
                return f"{where} (the grid's one sbatch script is printed with array task 0)"
            return "\n".join([f"{where}; the grid's one sbatch script:", self.script(None, len(todo))])
        return "\n".join([f"{head}:", self.script(trial)])

    def executor(self, parameters: dict[str, Any]):
        return make_executor(str(self.folder), parameters, self.python, self.profile.max_num_timeout)

    # -- running ----------------------------------------------------------------------------------------------
    def start(self, say=print) -> None:
        """A controller that does not answer refuses the sweep before its plan is recorded."""
        check_slurm_answers()

    def run(self, trials: list[Trial], events: Events) -> None:
        self.refuse_if_still_queued(trials)
        self.folder.mkdir(parents=True, exist_ok=True)
        for trial in trials:
            fresh_report_file(self.report_file(trial.key))
        if self.spec.scheduler.asha is not None:
            return self.run_asha(trials, events)
        units = fuse(self.ctx, trials)  # a fused group is one job; its members report to their own files
        payloads = [self.payload(u) for u in units]
        executor = self.executor(self.parameters(None, len(units)) if len(units) > 1 else self.parameters(units[0]))
        jobs = self.submit(executor, payloads)
        watch = {t.key: (job, ReportTail(self.report_file(t.key))) for u, job in zip(units, jobs)
                 for t in u.members}
        try:
            self.monitor(watch, events)
        except BaseException:
            stop_jobs([job.job_id for job, _ in watch.values()])
            raise

    def monitor(self, watch: dict[str, tuple[Any, "ReportTail"]], events: Events) -> None:
        from submitit.slurm.slurm import SlurmJob
        shown: dict[str, tuple] = {}
        over_since: dict[str, float] = {}
        no_sacct = sacct_error()  # a cluster without accounting: sacct fails (and says so on stderr) every time
        while watch:
            if not no_sacct:
                SlurmJob.watcher.update()  # one sacct for every job (submitit's own backoff grows to 10 minutes)
            queued = queue_states([job.job_id for job, _ in watch.values()])  # and one squeue
            queue = queued or {}
            for key, (job, tail) in list(watch.items()):
                latest = tail.latest()
                if job_over(job, queued):
                    if not result_settled(job, over_since.setdefault(key, time.monotonic())):
                        continue
                    state, info = outcome(job, latest, key)
                    events.update(key, state, **info)
                    del watch[key]
                    continue
                state, why = queue.get(job.job_id) or (SlurmJob.watcher.get_state(job.job_id, mode="cache"), "")
                view = (state, why, latest.get("epoch"))
                if shown.get(key) != view:
                    if state == "RUNNING":
                        events.update(key, "running", slurm_job_id=job.job_id, **pick(latest, RESULT_KEYS))
                    elif state == "PENDING":  # a sweep that does not move says which job waits, and why
                        events.update(key, "pending", queued=queued_line(job.job_id, why))
                shown[key] = view
            if watch:
                time.sleep(self.poll_s)

    def submit(self, executor, payloads: list[SlurmTrial]) -> list:
        """sbatch refusing the jobs (a partition, GRES or memory the cluster lacks) is the user's to fix: one line
        naming where the values come from, not submitit's traceback. Nothing was submitted."""
        from submitit.core.utils import FailedJobError
        try:
            with contextlib.redirect_stderr(io.StringIO()):  # submitit prints sbatch's stderr before it raises
                return executor.submit_array(payloads) if len(payloads) > 1 else [executor.submit(payloads[0])]
        except FailedJobError as err:
            raise self.refused(sbatch_refusal(err)) from None

    def refused(self, said: str):
        from ..cli import UserError
        return UserError(f"sbatch refused the jobs: {said} (check slurm.* in the cluster profile "
                         f"{self.spec.cluster}, resources.* in {self.ctx.spec_path})")

    def refuse_if_still_queued(self, trials: list[Trial]) -> None:
        """An earlier `orchestrate sweep` killed outright leaves its jobs running or queued: submitting again would
        start a second copy of their trials. Its jobs are those of the trials' runs (tag backend_job_id) and,
        for trials that have not started yet, the queued jobs of this sweep submitted from this output folder."""
        queued = queued_jobs()
        if not queued:
            return
        runs = Ledger(self.ctx.tracking_uri, self.spec.name, create=False).trial_runs()
        tagged = {runs[t.key].data.tags.get("backend_job_id") for t in trials if t.key in runs}
        where = str(self.ctx.output.absolute() / "slurm") + os.sep  # as submitit names its scripts
        name = safe_name(self.spec.name) + "-"
        ours = {job for job, (job_name, command) in queued.items()
                if job_name.startswith(name) and command.startswith(where)}
        found = sorted(ours | (tagged & queued.keys()), key=job_order)
        if found:
            from ..cli import UserError
            raise UserError(f"sweep {self.spec.name!r}: SLURM jobs {', '.join(found)} of an earlier orchestrate sweep "
                            "still run or wait in the queue; wait for them or scancel them, then run again")

    # -- early stopping: Ray Tune decides, SLURM runs ---------------------------------------------------------
    def run_asha(self, trials: list[Trial], events: Events) -> None:
        import ray
        from ray import tune
        from .ray_tune import asha_scheduler, start_local_ray
        os.environ["RAY_CHDIR_TO_TRIAL_DIR"] = "0"
        os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
        payloads = [{"key": t.key, "trial": self.payload(t), "folder": str(self.folder),
                     "parameters": self.parameters(t), "python": self.python, "poll_s": self.poll_s,
                     "max_num_timeout": self.profile.max_num_timeout} for t in trials]
        from .tune_events import SlurmEventsCallback
        callback = SlurmEventsCallback(events, self.ctx)
        # The relays only wait on files and sacct: a sliver of a CPU each, so max_concurrent of them fit.
        start_local_ray()
        stop = threading.Event()
        threading.Thread(target=self.show_waiting_jobs, args=(events, stop), daemon=True).start()
        try:
            tuner = tune.Tuner(
                tune.with_resources(relay_trial, {"cpu": 0.05}),
                param_space={"trial": tune.grid_search(payloads)},
                tune_config=tune.TuneConfig(scheduler=asha_scheduler(self.spec),
                                            max_concurrent_trials=self.spec.max_concurrent,
                                            trial_name_creator=lambda t: t.config["trial"]["key"],
                                            trial_dirname_creator=lambda t: t.config["trial"]["key"]),
                run_config=tune.RunConfig(name=f"tune-{self.submission_id}",
                                          storage_path=str((self.ctx.output / "ray").resolve()), verbose=0,
                                          callbacks=[callback]))
            tuner.fit()
        finally:
            stop.set()
            # Tune answers Ctrl-C by ending fit() and its relays without a trial callback: their jobs still run
            submitted = sorted(callback.jobs | set(self.waiting_jobs().values()))
            queue = queue_states(submitted) if submitted else {}
            stop_jobs([job for job in submitted if queue is None or job in queue])
            callback.join()
            ray.shutdown()
        if callback.refused:  # every trial's job has the same sbatch options: one line, as without ASHA
            raise self.refused(callback.refused)

    def show_waiting_jobs(self, events: Events, stop: threading.Event) -> None:
        """Each ASHA relay submits its trial's job and names it in ``<key>.job`` until the worker's first report:
        the view shows such a trial's job waiting in the queue with squeue's reason, or started, as without ASHA
        (it said "running" from the moment the relay started, however long the job waited)."""
        shown: dict[str, tuple[str, str]] = {}
        while not stop.wait(self.poll_s):
            waiting = self.waiting_jobs()
            queue = (queue_states(list(waiting.values())) if waiting else None) or {}
            for key, job_id in waiting.items():
                state, why = queue.get(job_id, ("", ""))
                if state in ("PENDING", "RUNNING") and shown.get(key) != (state, why):
                    shown[key] = (state, why)
                    if state == "PENDING":
                        events.update(key, "pending", queued=queued_line(job_id, why))
                    else:
                        events.update(key, "running", slurm_job_id=job_id)

    def waiting_jobs(self) -> dict[str, str]:
        """Trial key -> the job its ASHA relay submitted, until the worker's first report."""
        return {path.stem: job for path in (self.ctx.output / "reports").glob("*.job") if (job := read_if_there(path))}


def read_if_there(path: Path) -> str:
    """A small file's text, or "" when it is gone (its writer removes it when it is done with it)."""
    try:
        return path.read_text().strip()
    except FileNotFoundError:
        return ""


def queued_line(job_id: str, why: str) -> str:
    """ "job 1234 (Resources)"; squeue's None means not yet scheduled, nothing to say."""
    return f"job {job_id}" + (f" ({why})" if why and why != "None" else "")


def sbatch_refusal(err: Exception) -> str:
    """What sbatch said when it refused a job, from submitit's FailedJobError (sbatch's stderr)."""
    said = ([line for line in str(err).splitlines() if line.strip()] or ["no reason given"])[-1]
    return said.split("error:", 1)[-1].replace("Batch job submission failed:", "").strip()


def make_executor(folder: str, parameters: dict[str, Any], python: str, max_num_timeout: int):
    from submitit import SlurmExecutor
    executor = SlurmExecutor(folder=folder, max_num_timeout=max_num_timeout, python=python)
    executor.update_parameters(**parameters)
    return executor


def fresh_report_file(path: Path) -> None:
    """A new attempt of a trial reports afresh; the previous attempt's lines are kept next to it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.exists():
        path.replace(path.with_suffix(".previous.jsonl"))


def pick(record: dict[str, Any], keys) -> dict[str, Any]:
    return {k: record[k] for k in keys if isinstance(record.get(k), (int, float))}


def tasks_of(job) -> list:
    return [job.task(i) for i in range(job.num_tasks)] if job.num_tasks > 1 else [job]


# squeue states of a job that still runs or will run
LIVE_STATES = ("PENDING", "RUNNING", "REQUEUED", "CONFIGURING", "COMPLETING", "SUSPENDED", "REQUEUE_HOLD",
               "REQUEUE_FED", "RESIZING", "SIGNALING", "STAGE_OUT")


def results_written(job) -> bool:
    return all(t.paths.result_pickle.exists() for t in tasks_of(job))


def job_over(job, queue: dict[str, tuple[str, str]] | None) -> bool:
    """Every task left its result, or SLURM says the job ended and it is not coming back (a requeued job reads
    REQUEUED/PENDING, or for a moment a terminal state in sacct while squeue still holds it). ``queue``: this
    poll's queue_states. Without accounting sacct never answers (submitit's watcher reads UNKNOWN for ever):
    squeue no longer holding the job is then the only sign that it ended."""
    if results_written(job):
        return True
    if queue is None:  # squeue did not answer this time
        return False
    known = job.watcher.get_state(job.job_id, mode="cache") != "UNKNOWN"
    if known and not job.watcher.is_done(job.job_id, mode="cache"):
        return False
    return queue.get(job.job_id, ("",))[0] not in LIVE_STATES


# How long a job that ended without a result file may take to show one (a slow shared filesystem): submitit's
# own wait, 15 s inside job.results(), ran for one job after another (100 jobs dead at import: 25 minutes).
RESULT_GRACE_S = 15.0


def result_settled(job, over_since: float) -> bool:
    """Every task's result is there, or the grace since the job was first seen over has passed; either way its
    results() then answers at once. The grace runs for all jobs together."""
    if results_written(job):
        return True
    if time.monotonic() - over_since < RESULT_GRACE_S:
        return False
    for task in [job, *tasks_of(job)]:
        task._results_timeout_s = 0  # submitit's per-job wait (its own tests set it so): ours has run already
    return True


def slurm_command(*args: str, timeout: float = 60.0) -> subprocess.CompletedProcess:
    """A SLURM client command; a controller that does not answer in time reads as a failed call that says so
    (a slow sacct in the monitor loop was a traceback, and the sweep cancelled every job on it)."""
    try:
        return subprocess.run(args, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return subprocess.CompletedProcess(args, 124, "", f"{args[0]}: no answer within {timeout:.0f} s")


def queued_jobs() -> dict[str, tuple[str, str]]:
    """Every job SLURM still runs or will run, one line per array task: id -> (job name, batch script path)."""
    out = slurm_command("squeue", "-h", "-r", "-o", "%i|%T|%j|%o").stdout
    rows = [line.split("|", 3) for line in out.splitlines() if line.count("|") >= 3]
    return {job: (name, command) for job, state, name, command in rows if state in LIVE_STATES}


def queue_states(job_ids: list[str]) -> dict[str, tuple[str, str]] | None:
    """squeue's state and reason (Priority, Resources, QOSMaxJobsPerUserLimit, ...) of these jobs, in one call,
    one entry per array task; None when squeue does not answer. Jobs that have ended are not listed."""
    ids = ",".join(sorted({str(job).split("_")[0] for job in job_ids}))
    out = slurm_command("squeue", "-h", "-r", f"--jobs={ids}", "-o", "%i|%T|%r")
    if out.returncode != 0:  # squeue fails when none of the ids is known any more
        return {} if "Invalid job id" in out.stderr else None
    rows = [line.split("|", 2) for line in out.stdout.splitlines() if line.count("|") >= 2]
    return {job: (state, reason) for job, state, reason in rows}


def job_order(job_id: str) -> tuple[int, ...]:
    """414_2 before 414_10."""
    return tuple(int(x) if x.isdigit() else -1 for x in job_id.split("_"))


# Ends that are not the trial's fault (scancel, preemption, a time limit past its requeues, a lost node): a re-run
# of the sweep resumes the trial from its checkpoint, so they are "interrupted", not "failed".
INTERRUPTED_STATES = ("CANCELLED", "PREEMPTED", "TIMEOUT", "NODE_FAIL")


def outcome(job, latest: dict[str, Any], key: str | None = None) -> tuple[str, dict[str, Any]]:
    """(state, info) of trial ``key``'s job that is over, from rank 0's result (or why there is none); a fused
    group's job returns one result per member."""
    try:
        if not results_written(job):
            # no result: submitit's results() would first wait until sacct says the job ended (for ever without
            # accounting) to raise this with the job's error stream
            from submitit.core.utils import UncompletedJobError
            raise UncompletedJobError(job.stderr() or f"no error stream; see {job.paths.stdout}")
        result = job.results()[0]
        if isinstance(result, list):
            result = next(r for r in result if r.get("trial_key") == key)
    except Exception as err:  # submitit's FailedJobError (with the trace) / UncompletedJobError (with the state)
        slurm_state, code = final_state(job)
        # the worker checkpointed on SIGTERM (SLURM's own ends) or on a user's scancel --signal (it exits 3)
        if slurm_state in INTERRUPTED_STATES or code == EXIT_INTERRUPTED:
            how = slurm_state if slurm_state in INTERRUPTED_STATES else f"stopped by a signal (exit {code})"
            return "interrupted", {"reason": f"job {job.job_id} {how}: its checkpoint is kept; run the same "
                                             "sweep again to resume it", **pick(latest, RESULT_KEYS)}
        return "failed", {"reason": f"job {job.job_id} ({slurm_state}): {error_line(str(err), repr(err))[:300]}",
                          **pick(latest, RESULT_KEYS)}
    state = "finished" if result.get("status") == "FINISHED" else "failed"
    info = pick(result, RESULT_KEYS)
    if state == "failed":
        info["reason"] = result.get("reason", "")
    return state, info


def final_state(job, timeout: float = 60.0) -> tuple[str, int | None]:
    """The job's state and exit code in sacct once it has ended: submitit's cache can be older (a task leaves
    its result before the job ends), and only sacct has the exit code."""
    end = time.monotonic() + timeout
    while True:
        run = slurm_command("sacct", "-n", "-X", "-P", "-j", job.job_id, "-o", "State,ExitCode")
        if run.returncode != 0:  # "Slurm accounting storage is disabled": no later call answers either
            said = last_line(run.stderr, run.returncode)
            return stderr_end(job.stderr() or "", f"left the queue, its end unknown: sacct: {said}")
        out = run.stdout.splitlines()
        state, _, code = (out[-1] if out else "").partition("|")
        state = (state.split() or [""])[0]  # "CANCELLED by 0"
        if (state and state not in LIVE_STATES) or time.monotonic() > end:
            code = code.split(":")[0]
            return state or (job.state or "UNKNOWN").split()[0], int(code) if code.isdigit() else None
        time.sleep(1.0)


# slurmstepd's line when SLURM ends a job: "*** JOB 608 ON n1 CANCELLED AT 2026-12-01T04:24:57 ***"
STEPD_END = re.compile(r"\*\*\* JOB \S+ ON \S+ CANCELLED AT \S+(?: DUE TO (TIME LIMIT|PREEMPTION|NODE FAILURE))? "
                       r"\*\*\*")
STEPD_STATES = {"": "CANCELLED", "TIME LIMIT": "TIMEOUT", "PREEMPTION": "PREEMPTED", "NODE FAILURE": "NODE_FAIL"}


def stderr_end(text: str, unknown: str) -> tuple[str, int | None]:
    """A job's end as its error stream tells it, where sacct cannot: slurmstepd's line (scancel, time limit,
    preemption, a lost node) and srun's "task 0: Exited with exit code 3" (the worker's own exit)."""
    ends = STEPD_END.findall(text)
    codes = re.findall(r"Exited with exit code (\d+)", text)
    return STEPD_STATES[ends[-1]] if ends else unknown, int(codes[-1]) if codes else None


def sacct_error() -> str | None:
    """None when sacct answers; else what it says instead (a cluster without accounting, on every call)."""
    run = slurm_command("sacct", "-n", "-X", "-j", "1", "-o", "JobID")
    return None if run.returncode == 0 else last_line(run.stderr, run.returncode)


def error_line(text: str, default: str) -> str:
    """The worker's last error line in submitit's message, never submitit's own header or footer lines."""
    body = text.split("Error stream produced:", 1)[-1].split("You can check full logs", 1)[0]
    lines = [line.strip() for line in body.splitlines() if line.strip().strip("-")]
    return next((line for line in reversed(lines) if "Error" in line or "error:" in line),
                lines[-1] if lines else default)


def check_slurm_answers() -> None:
    """Before the first sbatch: a controller that does not answer would surface as submitit's traceback."""
    conf = os.environ.get("SLURM_CONF")
    if conf and not Path(conf).is_file():  # else sinfo retries for a minute
        raise SpecError(f"backend slurm: SLURM_CONF={conf} is not a file")
    try:
        out = slurm_command("sinfo", "-h", "-o", "%P")
    except FileNotFoundError:
        raise SpecError("backend slurm: sinfo is not on PATH (not a SLURM login node?); try --backend ray") from None
    if out.returncode != 0:
        said = last_line(out.stderr, out.returncode)
        raise SpecError(f"backend slurm: SLURM does not answer ({said}); on the local test cluster run "
                        "'eval \"$(cluster/local-slurm/up)\"' first: it exports SLURM_CONF")


def stop_jobs(job_ids: list[str]) -> None:
    """The orchestrator owns its jobs: interrupted (Ctrl-C), it cancels them; the workers checkpoint on SIGTERM,
    and the next run resumes them. Left running, a re-run would start a second job per trial. It waits until they
    have (a few seconds): the sweep then reports the iteration each resumes from, not the periodic checkpoint
    before it. A second Ctrl-C stops waiting."""
    for job_id in job_ids:
        cancel(job_id)
    deadline = time.monotonic() + STOP_GRACE_S
    with contextlib.suppress(KeyboardInterrupt):
        for job_id in job_ids:
            wait_gone(job_id, timeout=max(0.0, deadline - time.monotonic()))


def cancel(job_id: str) -> None:
    slurm_command("scancel", str(job_id))


def wait_gone(job_id: str, timeout: float = 120.0) -> None:
    """Until the controller lists none of the job's tasks as live (they have exited; a timeout, a failed node or
    an out-of-memory end counts too). A squeue that does not answer is no answer: it waits on."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        queue = queue_states([job_id])
        if queue is not None and not any(state in LIVE_STATES for task, (state, _) in queue.items()
                                         if task == job_id or task.startswith(f"{job_id}_")):
            return
        time.sleep(1.0)


def relay_trial(config: dict[str, Any]) -> None:
    """A Tune trial of the ASHA path, on the submitting machine: submit the trial's SLURM job, relay the worker's
    reports to Tune (each epoch once, also after a requeue), end with the worker's final result."""
    from ray import tune
    p = config["trial"]
    trial: SlurmTrial = p["trial"]
    tail = ReportTail(Path(trial.report_file))
    from submitit.core.utils import FailedJobError
    try:
        with contextlib.redirect_stderr(io.StringIO()):  # submitit prints sbatch's stderr before it raises
            job = make_executor(p["folder"], p["parameters"], p["python"], p["max_num_timeout"]).submit(trial)
    except FailedJobError as err:  # the driver ends the sweep with one line naming the profile and the spec
        said = sbatch_refusal(err)
        tune.report({"trial_status": "FAILED", "trial_key": p["key"], "reason": f"sbatch refused the job: {said}",
                     "sbatch_refused": said, **metric_placeholders({})})
        return
    waiting = Path(trial.report_file).with_suffix(".job")  # for show_waiting_jobs, until the first report
    waiting.write_text(job.job_id)
    try:
        final = relay_reports(job, tail, p, waiting)
    finally:
        waiting.unlink(missing_ok=True)
    tune.report({"trial_status": final["status"], "trial_key": p["key"], "run_id": final.get("run_id"),
                 "slurm_job_id": job.job_id, "reason": final.get("reason", ""),
                 **pick(final, RELAYED_KEYS), **metric_placeholders(final)})


def relay_reports(job, tail: ReportTail, p: dict[str, Any], waiting: Path) -> dict[str, Any]:
    """Each epoch's report to Tune once (also after a requeue) until the worker's final result, or the job's end."""
    from ray import tune
    last_epoch, final, polled, no_sacct = 0, None, 0.0, sacct_error()
    while final is None:
        for record in tail.read():
            waiting.unlink(missing_ok=True)
            if "status" in record:
                final = record
            elif record.get("epoch", 0) > last_epoch:
                last_epoch = record["epoch"]
                tune.report({**pick(record, RELAYED_KEYS), "slurm_job_id": job.job_id,
                             "run_id": record.get("run_id"), "trial_key": p["key"]})
        if final is None and time.monotonic() - polled > p["poll_s"]:
            polled = time.monotonic()
            if not no_sacct:
                job.get_info(mode="force")
            # squeue too once sacct says the job ended, or each time with no sacct to say it
            ended = no_sacct or job.watcher.is_done(job.job_id, mode="cache")
            if ended and job_over(job, queue_states([job.job_id])):
                state, info = outcome(job, tail.latest())  # ended without the worker's final word: said,
                final = {"status": state.upper(), **info}   # as without ASHA (a raise here was Tune's traceback)
        if final is None:
            time.sleep(0.5)
    return final


def cancel_then_mark(job_id: str, run_id: str | None, reason: str, ctx: SweepContext) -> None:
    """scancel, wait until the worker has let go of its run (it checkpoints and ends it as KILLED on SIGTERM),
    then record the early stop: tags early_stopped/status_reason, never resumed by a re-run."""
    cancel(job_id)
    wait_gone(job_id)
    if run_id:
        Ledger(ctx.tracking_uri, ctx.spec.name).mark_early_stopped(run_id, reason)
