"""The Ray Tune backend: trials as Tune trials on a local Ray (started on demand) or an existing cluster.

Tune runs the already-expanded trial list (a grid over trials), with per-trial resources (fractional GPUs
pack small trials onto one GPU) and, optionally, ASHA, which stops trials from the metrics the worker reports
after each evaluation. A one-process trial runs ``train(cfg)`` inside the Tune actor; a multi-GPU trial runs
torchrun / the DeepSpeed launcher as a child process and relays its reports.
"""
from __future__ import annotations

import contextlib
import json
import os
import shlex
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from resnet_core.config import first_line
from resnet_core.train import REPORT_FILE_ENV, Interrupted  # the worker defines the channel

from .. import launch
from ..cli import AFTER_INTERRUPT, UserError
from ..mps import mps_daemon
from ..trials import FusedGroup, SweepContext, Trial, fuse
from .base import STOP_GRACE_S, Events, ReportTail, metric_placeholders, sigterm_as_ctrl_c



def uses_launcher(spec, cfg_dict: dict) -> str:
    """python (in the Tune actor) for one process; torchrun/deepspeed for several or when asked."""
    if spec.launcher != "auto":
        return spec.launcher
    if cfg_dict["dist"]["engine"] == "deepspeed":
        return "deepspeed"
    return "torchrun" if spec.resources.workers_per_node > 1 else "python"


def child_command(launcher: str, config_path: str, workers: int) -> list[str]:
    bin_dir = Path(sys.executable).parent
    if launcher == "deepspeed":
        return launch.deepspeed_command(config_path, gpus_per_node=workers, deepspeed=str(bin_dir / "deepspeed"))
    return launch.torchrun_command(config_path, nproc_per_node=workers, torchrun=str(bin_dir / "torchrun"))


def asha_scheduler(spec):
    """Ray Tune's ASHA over epochs (the time the worker reports), or None when the spec asks for none."""
    asha = spec.scheduler.asha
    if asha is None:
        return None
    from ray.tune.schedulers import ASHAScheduler
    max_t = asha.max_t or 10**6  # default: a trial's own length ends it
    return ASHAScheduler(time_attr="epoch", metric=asha.metric, mode=asha.mode, max_t=max_t,
                         grace_period=asha.grace_period, reduction_factor=asha.reduction_factor)


def run_trial(config: dict[str, Any]) -> None:
    """The Tune trainable: one trial or one fused group. Reports after every evaluation (each report names its
    trial); each trial's last report says how it ended: FINISHED, FAILED, INTERRUPTED (the sweep was stopped; a
    checkpoint was written) or NOT_STARTED (the sweep was stopped before it began)."""
    trial = config["trial"]
    members = trial.get("members", [trial])
    with stop_when_file_appears(Path(trial["stop_file"])) as stop:
        if stop.is_set():
            results = [{"status": "NOT_STARTED", "trial_key": m["key"]} for m in members]
        else:
            try:
                results = run_members(trial, members, stop)
            except Interrupted as err:
                results = [{"status": "INTERRUPTED", "trial_key": m["key"],
                            "reason": f"the sweep was stopped: {err}"} for m in members]
    for result in results:
        numbers = {k: v for k, v in result.items() if isinstance(v, (int, float))}
        reason = {"reason": result["reason"]} if "reason" in result else {}
        report_to_tune({"trial_status": result["status"], "run_id": result.get("run_id"),
                        **metric_placeholders(result), **numbers, "trial_key": result["trial_key"], **reason})


def report_to_tune(metrics: dict) -> None:
    from ray import tune
    tune.report(dict(metrics))


def run_members(trial: dict[str, Any], members: list[dict[str, Any]], stop: threading.Event) -> list[dict]:
    from ray import tune
    tags = {"backend": "ray", "backend_job_id": tune.get_context().get_trial_id()}
    cfg_dicts = [json.loads(json.dumps(m["config"])) for m in members]
    for cfg_dict in cfg_dicts:
        cfg_dict["tracking"]["tags"].update(tags)
    cap_gpu_memory(trial.get("gpus", 0))
    if trial["launcher"] == "fused":
        return run_fused_in_process(cfg_dicts, trial["cpus"], stop)
    if trial["launcher"] == "python":
        return [run_in_process(cfg_dicts[0], trial["cpus"], stop)]
    return [run_child(cfg_dicts[0], trial["launcher"], trial["workers"], stop)]


@contextlib.contextmanager
def stop_when_file_appears(path: Path, every_s: float = 1.0):
    """An event set once ``path`` exists: how the sweep asks its trials to stop. A Tune trial trains in a thread
    of its actor, which gets no signal, and Tune's own stop ends the actor before a checkpoint could be written.
    The file is in the sweep's output folder, which the trials share anyway (their checkpoints are there)."""
    stop, done = threading.Event(), threading.Event()
    if path.exists():
        stop.set()

    def watch():
        while not done.wait(every_s):
            if path.exists():
                stop.set()
                return

    watcher = threading.Thread(target=watch, name="sweep-stop-watcher", daemon=True)
    watcher.start()
    try:
        yield stop
    finally:
        done.set()


def cap_gpu_memory(gpus: float) -> None:
    """A packed trial (a fraction of a GPU) may allocate only its share: one that outgrows its estimate fails
    alone with an out-of-memory error, instead of taking the memory of the trials beside it."""
    if 0 < gpus < 1:
        import torch
        if torch.cuda.is_available():
            torch.cuda.set_per_process_memory_fraction(gpus)


def run_fused_in_process(cfg_dicts: list[dict], cpus: float, stop: threading.Event) -> list[dict]:
    import torch
    from resnet_core.fused import train_fused
    torch.set_num_threads(max(1, int(cpus)))
    return train_fused(cfg_dicts, report=report_to_tune, stop=stop)


def run_in_process(cfg_dict: dict, cpus: float, stop: threading.Event) -> dict:
    import torch
    from resnet_core.train import train
    torch.set_num_threads(max(1, int(cpus)))
    return train(cfg_dict, report=report_to_tune, stop=stop)


def run_child(cfg_dict: dict, launcher: str, workers: int, stop: threading.Event) -> dict:
    """torchrun / deepspeed as a child; its rank 0 appends reports to a file that we relay to Tune. ``stop``
    sends it SIGTERM, which its ranks answer with a checkpoint (as under SLURM)."""
    import yaml
    with tempfile.TemporaryDirectory() as tmp:
        config_path, reports = Path(tmp) / "trial.yaml", Path(tmp) / "reports.jsonl"
        config_path.write_text(yaml.safe_dump(cfg_dict))
        env = {**os.environ, REPORT_FILE_ENV: str(reports)}
        # Our death (Tune stopping the trial) must take the launcher and its ranks with it.
        child = subprocess.Popen(child_command(launcher, str(config_path), workers), env=env,
                                 preexec_fn=_die_with_parent)
        tail, final, terminated = ReportTail(reports), None, False  # (a half-written last line failed json.loads)
        try:
            while True:
                done = child.poll() is not None
                if stop.is_set() and not done and not terminated:
                    child.terminate()
                    terminated = True
                for record in tail.read():
                    if "status" in record:  # its result: run_trial reports it, as the in-process path's
                        final = record
                    else:
                        report_to_tune(record)
                if done:
                    break
                time.sleep(1.0)
        finally:
            if child.poll() is None:  # an error in the relay (Tune's report): its ranks checkpoint and end
                child.terminate()
                with contextlib.suppress(subprocess.TimeoutExpired):
                    child.wait(timeout=STOP_GRACE_S)
        if final is None and stop.is_set():  # it checkpointed and exited 3 (Interrupted), with no result
            raise Interrupted(f"{launcher} exited with {child.returncode} after SIGTERM, which its ranks answer with a "
                              "checkpoint")
        if final is None:  # a worker that ends with a result exits 1 when it FAILED: the result says why
            raise RuntimeError(f"{shlex.join(child.args)} exited with {child.returncode}")
        return final


def _die_with_parent() -> None:
    import ctypes
    PR_SET_PDEATHSIG = 1
    ctypes.CDLL("libc.so.6", use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


class RayTuneBackend:
    name = "ray"

    def __init__(self, ctx: SweepContext):
        self.ctx = ctx
        self.spec = ctx.spec
        self.address = ctx.cluster.get("ray", {}).get("address")
        self._stack: contextlib.ExitStack | None = None
        self.stop_file = ctx.output / ".stop-trials"  # see tune_events.StopOnCtrlC

    def describe(self, trial: Trial | FusedGroup, todo: list[str] = ()) -> str:
        r = self.spec.resources
        where = f"Ray {'at ' + self.address if self.address else 'local'}: {{cpu: {r.cpus}, gpu: {r.gpus}}}"
        if isinstance(trial, FusedGroup):
            return f"{where}; in the Tune actor: resnet_core.fused.train_fused(<{len(trial.members)} trial configs>)"
        launcher = uses_launcher(self.spec, trial.config_dict())
        if launcher == "python":
            return f"{where}; in the Tune actor: resnet_core.train.train(<trial config>)"
        return f"{where}; " + shlex.join(child_command(launcher, "<trial config>.yaml", r.workers_per_node))

    def start(self, say=print) -> None:
        """Start the engine (MPS when packing, then Ray); the sweep calls this early to overlap it with MLflow."""
        if self._stack is not None:
            return
        self._stack = contextlib.ExitStack()
        try:
            if not self.address:  # before MPS and Ray start (~20 s): a machine without the GPUs asked says so now
                import torch
                check_fits_this_machine(self.spec.resources, {"GPU": torch.cuda.device_count(), "CPU": os.cpu_count()},
                                        "this machine")
            if 0 < self.spec.resources.gpus < 1 and not self.address:
                mps = self._stack.enter_context(contextlib.ExitStack())  # its own, for a lost Ray to close
                mps.enter_context(mps_daemon(say))  # first: the Ray workers started next inherit its pipe
                ON_RAY_LOST.append(("stop the MPS daemon", mps.close))
            self.start_ray()
            if not self.address:
                import ray
                self._stack.callback(ray.shutdown)
                check_fits_this_machine(self.spec.resources, ray.cluster_resources())
        except BaseException:
            self.stop()
            raise

    def stop(self) -> None:
        if self._stack is not None:
            RAY_STOPPING.set()
            ON_RAY_LOST.clear()
            self._stack.close()
            self._stack = None

    def run(self, trials: list[Trial], events: Events) -> None:
        from ray import tune
        from .tune_events import EventsCallback, StopOnCtrlC
        say = getattr(events, "log", print)
        self.start(say)
        callback = EventsCallback(events, self.ctx)
        stopper = StopOnCtrlC(self.stop_file, callback, say)
        if hasattr(events, "trials"):  # the sweep's view: it knows which trials were running
            from ..sweep import mark_interrupted
            ON_RAY_LOST.append(("mark the interrupted trials' runs",
                                lambda: mark_interrupted(self.ctx, events, trials)))
        try:
            tuner = tune.Tuner(
                tune.with_resources(run_trial, {"cpu": self.spec.resources.cpus, "gpu": self.spec.resources.gpus}),
                param_space={"trial": tune.grid_search([self.trial_payload(u) for u in fuse(self.ctx, trials)])},
                tune_config=tune.TuneConfig(scheduler=asha_scheduler(self.spec), max_concurrent_trials=self.spec.max_concurrent,
                                            # a finished trial's actor takes the next one: no new process, no
                                            # second import of torch (seconds per trial on small sweeps)
                                            reuse_actors=True,
                                            trial_name_creator=lambda t: t.config["trial"]["key"],
                                            trial_dirname_creator=lambda t: t.config["trial"]["key"]),
                run_config=tune.RunConfig(name=f"tune-{time.strftime('%Y%m%d-%H%M%S')}",
                                          storage_path=str((self.ctx.output / "ray").resolve()), verbose=0,
                                          stop=stopper, callbacks=[callback]))
            with stopper.catching_ctrl_c():
                tuner.fit()
            if stopper.asked_at is not None:
                raise KeyboardInterrupt  # the sweep marks the trials still running as interrupted
        finally:
            self.stop()

    def trial_payload(self, trial: Trial | FusedGroup) -> dict[str, Any]:
        if isinstance(trial, FusedGroup):
            return {"key": trial.key, "label": trial.label, "cpus": self.spec.resources.cpus, "launcher": "fused",
                    "gpus": self.spec.resources.gpus, "stop_file": str(self.stop_file),
                    "members": [{"key": t.key, "config": t.config_dict()} for t in trial.members]}
        cfg = trial.config_dict()
        return {"key": trial.key, "label": trial.label, "config": cfg, "cpus": self.spec.resources.cpus,
                "gpus": self.spec.resources.gpus, "stop_file": str(self.stop_file),
                "launcher": uses_launcher(self.spec, cfg), "workers": self.spec.resources.workers_per_node}

    def start_ray(self) -> None:
        import logging
        import ray
        # Tune's "Resume experiment with: Tuner.restore(...)" after Ctrl-C: here a re-run of the sweep resumes
        logging.getLogger("ray.tune.tune").addFilter(lambda record: "Tuner.restore" not in record.getMessage()
                                                     and "Trials did not complete" not in record.getMessage())
        # A failed trial's 60-line traceback: the view gives its last line and the file Tune keeps it in
        logging.getLogger("ray.tune.execution.tune_controller").addFilter(
            lambda record: "Trial task failed" not in record.getMessage())
        # Trials keep the sweep's working directory: relative data paths and stores mean the same there.
        os.environ["RAY_CHDIR_TO_TRIAL_DIR"] = "0"
        os.environ.setdefault("RAY_DEDUP_LOGS", "0")
        os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")  # with verbose=0: no banners; our view reports
        if not self.address:
            return start_local_ray()
        check_answers(self.address)
        try:
            ray.init(address=self.address, log_to_driver=False)  # auth: see sweep.use_ray_auth_token_if_any
        except ConnectionError as err:
            raise UserError(f"ray address {self.address}: no Ray cluster answers there ({err})") from None
        sigterm_as_ctrl_c()



def check_answers(address: str) -> None:
    """A host:port where nothing listens: one line now, not Ray's three minutes of GCS retries."""
    host, _, port = address.removeprefix("ray://").rpartition(":")
    if not host or not port.isdigit():
        return  # "auto" and friends: Ray resolves them, and fails fast when it cannot
    try:
        socket.create_connection((host, int(port)), timeout=10).close()
    except OSError as err:
        raise UserError(f"ray address {address}: no Ray cluster answers there ({err.strerror or err})") from None


def start_local_ray() -> None:
    """A Ray of this sweep's own on this machine: address="local" never joins whatever a stale
    /tmp/ray/ray_current_cluster names (a crashed `ray start` leaves one, and ray.init would try it)."""
    import logging
    import ray
    # Ray 2.60 turns token authentication on for a new local cluster and warns about it: this Ray is the
    # sweep's own and gone with it, so the warning is noise in every sweep's output.
    logging.getLogger("ray._private.authentication.authentication_token_setup").addFilter(
        lambda record: "Token authentication is enabled" not in record.getMessage())
    RAY_STOPPING.clear()  # a sweep before this one in the same process took its own Ray down
    ray.init(address="local", include_dashboard=False, log_to_driver=False, configure_logging=False,
             object_store_memory=int(os.environ.get("ORCHESTRATE_RAY_OBJECT_STORE", 256 * 2**20)))
    sigterm_as_ctrl_c(also=exit_if_ray_dies)


RAY_STOPPING = threading.Event()  # set as the sweep takes its own Ray down: its processes' end is no news then
ON_RAY_LOST: list = []  # (what, how): the sweep's last steps on a lost Ray: mark its trials' runs, stop MPS


def exit_if_ray_dies(within_s: float = 60.0) -> None:
    """SIGTERM to the whole process group (`timeout`, `kill -- -PGID`, a service manager) reaches the local Ray's
    processes too: its raylet ends, its GCS hangs, Tune waits 60 s for them and the driver aborts on Ray's C++
    error. The trials got the signal as well: one that checkpointed first said so in its run. Once a Ray process
    is gone, the rest of this sweep's Ray is ended, ON_RAY_LOST runs (the others' runs are marked interrupted, MPS
    is stopped) and the sweep ends as Ctrl-C ends. Started from the SIGTERM handler; it watches in a thread."""
    import psutil
    ray_processes = [p for p in psutil.Process().children() if p.name() in ("gcs_server", "raylet")]

    def alive(process) -> bool:
        try:
            return process.status() != psutil.STATUS_ZOMBIE
        except psutil.NoSuchProcess:
            return False

    def watch():
        deadline = time.monotonic() + within_s
        while time.monotonic() < deadline:
            gone = not all(alive(p) for p in ray_processes)
            if RAY_STOPPING.is_set():  # checked after: the sweep sets it before it takes Ray down
                return
            if gone:
                for process in ray_processes:
                    with contextlib.suppress(psutil.Error):
                        process.kill()
                for what, hook in ON_RAY_LOST:
                    try:
                        hook()
                    except Exception as err:  # e.g. the store gone too: the runs stay RUNNING, a re-run resumes them
                        print(f"could not {what}: {first_line(err, 200)}",
                              file=sys.stderr)
                print(f"orchestrate sweep: interrupted{AFTER_INTERRUPT['sweep']} (the signal reached the sweep's "
                      "Ray too: it was sent to the whole process group)", file=sys.stderr, flush=True)
                sys.stdout.flush()
                os._exit(130)
            time.sleep(0.5)

    if ray_processes:
        threading.Thread(target=watch, daemon=True, name="exit-if-ray-dies").start()


def check_fits_this_machine(resources, available: dict[str, float],
                            where: str = "the Ray started on this machine") -> None:
    """A trial that asks for more than the local Ray has would wait for ever (Tune only warns, every minute).
    A remote cluster may be autoscaling, so only the Ray started here is checked."""
    for key, name in (("gpus", "GPU"), ("cpus", "CPU")):
        asked, have = getattr(resources, key), available.get(name, 0)
        if asked > have:
            raise UserError(f"resources.{key}: each trial asks for {asked:g} {name} but {where} has {have:g} "
                            "(no CUDA GPU visible?); lower it, or use a Ray cluster with GPUs (ray.address in a "
                            "cluster profile)")
