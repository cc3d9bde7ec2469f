"""The one training function every launcher calls: ``train(cfg) -> dict``.

One process trains one trial (or one rank of it, under torchrun / the DeepSpeed launcher / srun). Defaults are
the paper's CIFAR-10 recipe (Sec. 4.2). The trial checkpoints every N iterations and on SIGTERM/SIGUSR1 (what
SLURM and submitit send before preemption); running the same trial again resumes from its newest good
checkpoint and continues the same MLflow run. A non-finite loss ends the trial as FAILED with the reason.

    python -m resnet_core.train CONFIG.yaml --set optim.lr=0.05 model.depth=56
"""
from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import signal
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
import torch.nn.functional as F
import yaml

from . import checkpoint, distributed
from .config import ConfigError, TrainConfig, build_config, load_config, one_value_per_set, trial_key
from .data import DataError, build_loader
from .distributed import DistEnv
from .models import create_model
from .schedule import LRSchedule, schedule_warnings
from .steps import build_step, warn_if_slow_precision
from .tracking import Tracker, check_store_usable, environment_tags, flatten, tracking_uri

Report = Callable[[dict[str, Any]], None]
# A launcher that runs the worker as a child process (torchrun inside a Ray trial) reads reports from this file.
REPORT_FILE_ENV = "RESNET_REPORT_FILE"
STOP_CHECK_EVERY = 10  # iterations between the ranks' agreement on a stop signal (SLURM gives ~60 s of warning)
EXIT_SUPERSEDED = 4  # another copy of the trial claimed it (checkpoint.claim): this one stopped without writing


class Diverged(RuntimeError):
    pass


class Interrupted(RuntimeError):
    """A stop was asked (a signal, or the sweep's ``stop`` event); a checkpoint was written. Running the trial
    again resumes it."""


def train(cfg: TrainConfig | dict, report: Report | None = None,
          stop: threading.Event | None = None) -> dict[str, Any]:
    """Train one trial; returns {"status", "trial_key", "run_id", "iteration", final metrics...}.

    ``report`` (rank 0) receives the metrics after every evaluation: Ray Tune's ``tune.report`` goes here.
    ``stop``, once set, checkpoints and raises ``Interrupted`` at the next step, as SIGTERM does: a thread gets no
    signals, so a Ray Tune trial is stopped this way.
    """
    cfg = cfg if isinstance(cfg, TrainConfig) else build_config(cfg)
    env = distributed.read_env()
    if cfg.batch_size % env.world_size:
        raise ConfigError(f"batch_size: {cfg.batch_size} is not divisible by the world size {env.world_size}")
    device = pick_device(cfg, env)
    distributed.init(env, device)
    try:
        return Trainer(cfg, env, device, report, stop).run()
    finally:
        distributed.shutdown()


def pick_device(cfg: TrainConfig, env: DistEnv) -> torch.device:
    if cfg.device == "cuda" or (cfg.device == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise ConfigError("device: 'cuda' asked for, but this machine has no CUDA GPU")
        torch.cuda.set_device(env.local_rank)
        torch.backends.cudnn.benchmark = True
        return torch.device("cuda", env.local_rank)
    return torch.device("cpu")


class Trainer:
    def __init__(self, cfg: TrainConfig, env: DistEnv, device: torch.device, report: Report | None,
                 stop: threading.Event | None = None):
        self.cfg, self.env, self.device, self.report = cfg, env, device, report
        self.stop = stop or threading.Event()  # set by a stop signal too
        self.key = trial_key(cfg)
        self.folder = Path(cfg.checkpoint.root) / self.key
        per_rank = cfg.batch_size // env.world_size
        self.train_loader = build_loader(cfg.data, "train", per_rank, device, env.rank, env.world_size, cfg.seed)
        self.eval_loaders = {split: build_loader(cfg.data, split, cfg.eval.batch_size, device, env.rank,
                                                 env.world_size, cfg.seed)
                             for split in (("val", "test") if cfg.data.val_split else ("test",))}
        torch.manual_seed(cfg.seed)  # identical initial weights on every rank
        self.model = create_model(cfg.model.name, num_classes=self.train_loader.num_classes,
                                  **cfg.model.overrides()).to(device)
        if cfg.channels_last and device.type == "cuda":
            self.model = self.model.to(memory_format=torch.channels_last)
        self.schedule = LRSchedule(cfg.schedule, cfg.optim.lr, len(self.train_loader))
        self.step = build_step(cfg, self.model, env, device)
        self.iteration, self.warmup_ended, self.best_val_error = 0, False, math.inf
        self.window = torch.zeros(3, device=device)
        self.tracker: Tracker | None = None
        self.run_id: str | None = None
        self.rejected_checkpoints: list[str] = []
        self.claim: str | None = None  # this copy's claim on the trial folder (rank 0)

    # -- the loop -----------------------------------------------------------------------------------------
    def run(self) -> dict[str, Any]:
        if self.env.is_main:
            self.claim = checkpoint.claim(self.folder)
        state = self.load_checkpoint()
        self.run_id = state["run_id"] if state else None
        self.start_tracking(self.run_id)
        if self.env.is_main:
            announce_start(self.key, self.folder, state, self.schedule.total, self.tracker)
            # the first evaluation line comes after an epoch: minutes on a CPU, where a run looked hung
            start = state["iteration"] if state else 0
            print(f"trial {self.key[:8]}: {self.cfg.model.name} on {self.device}, iteration {start}/"
                  f"{self.schedule.total} ({len(self.train_loader)} an epoch); a line after each evaluation, "
                  f"every {self.cfg.eval.every_epochs} epoch(s)", file=sys.stderr, flush=True)
            warn_if_slow_precision(self.cfg, self.device)
            warn_if_model_misfits_data(self.cfg.model.name, self.model.input_size, self.train_loader.cifar_sized)
        with stop_signals_asked(self.stop.set), runs_settled_on_exit([self.tracker], self.end_tracking):
            try:
                if state is not None:  # in the try: a checkpoint that does not fit fails its run, with the reason
                    self.apply_checkpoint(state)
                self.loop()
                return self.finish()
            except Diverged as err:
                return self.fail(str(err))

    def loop(self) -> None:
        steps_per_epoch = len(self.train_loader)
        total = self.schedule.total
        sums = self.window  # loss*n, errors, images since the last log point (checkpointed: exact resumes)
        started = time.perf_counter()  # of the metric window: images/s counts training time only
        untimed = float(sums[2]) * self.env.world_size  # a resumed window's images, trained before this timer
        while self.iteration < total:
            epoch, start = divmod(self.iteration, steps_per_epoch)
            for images, labels in self.train_loader.iterate(epoch, start):
                lr = self.schedule(self.iteration, self.warmup_ended)
                sums += self.step(images, labels, lr)
                self.iteration += 1
                if self.iteration % self.cfg.tracking.log_every == 0 or self.iteration == total:
                    self.log_train(sums, lr, started, untimed)
                    sums.zero_()
                    started, untimed = time.perf_counter(), 0.0
                if epoch_evaluation_due(self.iteration, steps_per_epoch, self.cfg.eval.every_epochs, total):
                    # Before the checkpoint and the stop check: a run stopped at an epoch's end has evaluated it
                    # (resumed from there it starts the next epoch). Its time is not training time.
                    started += timed(lambda: self.log_eval(self.evaluate_all(), self.iteration // steps_per_epoch),
                                     self.device)
                if self.iteration % self.cfg.checkpoint.every == 0:
                    self.save_checkpoint()
                # Several ranks agree on stopping with an all-reduce, a host sync: every STOP_CHECK_EVERY steps only.
                if (not self.env.enabled or self.iteration % STOP_CHECK_EVERY == 0) and \
                        distributed.any_rank(self.stop.is_set(), self.env, self.device):
                    self.save_checkpoint()
                    raise Interrupted(f"stopped at iteration {self.iteration}, checkpoint written")
                if self.iteration >= total:
                    break

    def check_fence(self) -> None:
        """Stop if another copy of this trial claimed it since we did (rank 0 reads; one all-reduce tells all)."""
        error = None
        if self.env.is_main:
            try:
                checkpoint.check_owner(self.folder, self.claim)
            except checkpoint.Superseded as err:
                error = err
        if distributed.any_rank(error is not None, self.env, self.device):
            raise error or checkpoint.Superseded(f"rank 0 found trial {self.key} claimed by another copy")

    def log_train(self, sums: torch.Tensor, lr: float, started: float, untimed: float = 0.0) -> None:
        self.check_fence()
        loss_sum, errors, images = distributed.all_reduce_sum(sums.clone(), self.env).tolist()
        loss, error = loss_sum / max(images, 1), errors / max(images, 1)
        if not math.isfinite(loss):
            raise Diverged(f"loss is {loss} at iteration {self.iteration} (lr {lr:g})")
        if self.cfg.schedule.warmup.until_train_error and error < self.cfg.schedule.warmup.until_train_error:
            self.warmup_ended = True  # the same on every rank: error was all-reduced
        seconds = time.perf_counter() - started
        self.log({"train_loss": loss, "train_error": error, "lr": lr,
                  "images_per_s": (images - untimed) / seconds if seconds > 0 else 0.0})

    # -- evaluation -----------------------------------------------------------------------------------------
    @torch.no_grad()
    def evaluate(self, split: str) -> dict[str, float]:
        """{split}_loss and _error, and with more than 10 classes _top5_error (the paper's ImageNet tables)."""
        model = self.step.eval_model()
        model.eval()
        sums = torch.zeros(4, device=self.device)
        for images, labels in self.eval_loaders[split].iterate(0):
            with self.step.autocast():
                logits = model(images)
            top5 = logits.topk(min(5, logits.shape[1]), dim=1).indices
            sums += torch.stack([F.cross_entropy(logits.float(), labels, reduction="sum"),
                                 (logits.argmax(1) != labels).sum().float(),
                                 (top5 != labels[:, None]).all(1).sum().float(),
                                 sums.new_full((), float(labels.numel()))])  # a device fill: no host sync
        model.train()
        loss_sum, errors, top5_errors, n = distributed.all_reduce_sum(sums, self.env).tolist()
        metrics = {f"{split}_loss": loss_sum / max(n, 1), f"{split}_error": errors / max(n, 1)}
        if self.train_loader.num_classes > 10:
            metrics[f"{split}_top5_error"] = top5_errors / max(n, 1)
        return metrics

    def evaluate_all(self) -> dict[str, float]:
        metrics = {}
        for split in self.eval_loaders:
            metrics.update(self.evaluate(split))
        if "val_error" in metrics:
            self.best_val_error = min(self.best_val_error, metrics["val_error"])
        return metrics

    def log_eval(self, metrics: dict[str, float], epoch: int, report: bool = True) -> None:
        # the best so far at every evaluation: a trial stopped early (ASHA) has one too
        best = {"best_val_error": self.best_val_error} if "val_error" in metrics else {}
        self.log({**metrics, **best, "epoch": epoch})
        if report and self.report and self.env.is_main:
            self.report({**metrics, "iteration": self.iteration, "epoch": epoch, "trial_key": self.key,
                         "run_id": self.run_id, "total_iterations": self.schedule.total})

    # -- tracking -----------------------------------------------------------------------------------------
    def start_tracking(self, run_id: str | None) -> None:
        if self.env.is_main and self.cfg.tracking.enabled:
            self.tracker, self.run_id = open_run(self.cfg, self.key, run_id, self.env.world_size,
                                                 self.rejected_checkpoints)

    def log(self, metrics: dict[str, float]) -> None:
        if self.tracker:
            self.tracker.log_metrics(metrics, self.iteration)

    def end_tracking(self, status: str, tags: dict[str, str]) -> None:
        if self.tracker:
            self.tracker.end(status, tags)

    # -- checkpoints --------------------------------------------------------------------------------------
    def load_checkpoint(self) -> dict[str, Any] | None:
        """The newest good checkpoint of this trial (None: start afresh)."""
        if not self.cfg.checkpoint.resume:
            if self.env.is_main:
                checkpoint.discard(self.folder)
            return None
        state, self.rejected_checkpoints = checkpoint.load_latest(self.folder, map_location=self.device)
        return state

    def apply_checkpoint(self, state: dict[str, Any]) -> None:
        self.step.load_state_dict(state["step"])
        self.iteration, self.warmup_ended = state["iteration"], state["warmup_ended"]
        self.best_val_error = state["best_val_error"]
        self.window.copy_(state["window"])
        restore_rng(state, self.device)
        self.say_if_resumed_elsewhere(state)

    def say_if_resumed_elsewhere(self, state: dict[str, Any]) -> None:
        """Another world size (or device) is not in the trial key, yet each rank normalises its own share of the
        batch and augments with its rank's seed (and a GPU trains in bf16): the trial goes on, said and tagged."""
        here, before = trained_on(self.env.world_size, self.device), state.get("trained_on")
        if before in (None, here) or not self.env.is_main:
            return
        change = f"{here} from iteration {state['iteration']}, {before} before"
        print(f"trial {self.key[:8]}: warning: goes on with {change}: it will not end as an uninterrupted run "
              "would (batch norm and augmentation are per rank)", file=sys.stderr, flush=True)
        if self.tracker:
            self.tracker.set_tags({"resumed_on": change})

    def save_checkpoint(self) -> None:
        self.check_fence()
        # Metrics up to this iteration reach the store first: a resume from this checkpoint then has no gap.
        if self.tracker:
            self.tracker.flush()
        if not self.env.is_main:
            return
        state = trial_state(self.iteration, self.warmup_ended, self.best_val_error, self.step.state_dict(),
                            self.run_id, self.key, self.window, self.device, self.env.world_size)
        checkpoint.save(self.folder, self.iteration, state, self.cfg.checkpoint.keep)

    # -- the end ------------------------------------------------------------------------------------------
    def finish(self) -> dict[str, Any]:
        metrics = self.evaluate_all()
        epoch = math.ceil(self.iteration / len(self.train_loader))
        final = {**metrics, "epoch": epoch}
        if "val_error" in metrics:
            final["best_val_error"] = self.best_val_error
        # Not reported: a scheduler acting on it (ASHA at a rung on the last epoch) would stop a trained trial
        # before its weights are kept and its run ends; the backend reports the returned result instead.
        self.log_eval(metrics, epoch, report=False)
        self.save_checkpoint()
        never = warmup_never_ended(self.schedule, self.iteration, self.warmup_ended)
        if never and self.env.is_main:
            print(f"warning: trial {self.key[:8]}: {never}", file=sys.stderr, flush=True)
        if self.tracker:
            self.log_artifacts()
            self.end_tracking("FINISHED", {"status_reason": "finished", **({"warning": never} if never else {})})
        return {"status": "FINISHED", "trial_key": self.key, "run_id": self.run_id,
                "iteration": self.iteration, "total_iterations": self.schedule.total, **final}

    def fail(self, reason: str) -> dict[str, Any]:
        self.end_tracking("FAILED", {"status_reason": reason})
        return {"status": "FAILED", "trial_key": self.key, "run_id": self.run_id,
                "iteration": self.iteration, "reason": reason}

    def log_artifacts(self) -> None:
        log_trial_artifacts(self.tracker, self.cfg, self.step.eval_model().state_dict(), self.train_loader.num_classes)


def warmup_never_ended(schedule: LRSchedule, iteration: int, warmup_ended: bool) -> str | None:
    """A warm-up that only the train error ends (the ResNet-110 recipe) may never end: said when the run ends, on
    the console and as the run's tag, since the whole run then trained at the warm-up lr."""
    warmup = schedule.cfg.warmup
    if not (warmup.until_train_error and schedule.in_warmup(iteration, warmup_ended)):
        return None
    return (f"the warm-up never ended: the train error stayed >= schedule.warmup.until_train_error "
            f"{warmup.until_train_error:g} at every logging step, so the run trained at schedule.warmup.lr "
            f"{warmup.lr:g} throughout")


def warn_if_model_misfits_data(name: str, input_size: int, cifar_sized: bool) -> None:
    """A CIFAR net on ImageNet-sized data (224 px crops: ~49x its compute) or an ImageNet net on CIFAR-sized images
    (its stem and 5 downsamplings leave 1x1 maps) trains without an error: said at the start."""
    from .data.formats import CIFAR_SIZED_MAX
    if (input_size <= CIFAR_SIZED_MAX) == cifar_sized:
        return
    data = "CIFAR-sized images (<= 64 px)" if cifar_sized else "ImageNet-sized images (cropped to 224 px)"
    print(f"warning: model.name: {name} is built for {input_size} px inputs, but data.path gives it {data}",
          file=sys.stderr, flush=True)


@contextlib.contextmanager
def stop_signals_asked(request_stop: Callable[[], None]) -> Iterator[None]:
    """SIGTERM/SIGUSR1 (SLURM, submitit) and Ctrl-C ask for a checkpoint and a clean stop at the next step
    boundary; a second Ctrl-C stops at once, without one. The previous handlers come back on exit."""
    if threading.current_thread() is not threading.main_thread():
        yield  # e.g. in a Ray Tune trial's thread, where no signal arrives: the backend sets ``stop``
        return
    asked = []

    def on_signal(signum, frame):
        if signum == signal.SIGINT and asked:
            raise KeyboardInterrupt
        asked.append(signum)
        request_stop()

    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)}
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


@contextlib.contextmanager
def runs_settled_on_exit(trackers: list[Tracker | None], end: Callable[[str, dict[str, str]], None]) -> Iterator[None]:
    """What an exception leaving a trial (or a fused group) does to its MLflow runs; ``end(status, tags)``
    ends the runs still open."""
    try:
        yield
    except Interrupted as err:  # a signal, or the sweep that runs the trial was stopped
        end("KILLED", {"status_reason": f"interrupted: {err}; running it again resumes it"})
        raise
    except checkpoint.Superseded:
        for tracker in filter(None, trackers):  # the other copy owns the run: no points, no status from us
            tracker.discard()
        raise
    except (SystemExit, KeyboardInterrupt):
        # Our owner is shutting us down (Ray stopping a trial, Ctrl-C): keep the points, leave the run's
        # status to the owner; an unmarked RUNNING run is resumed by the next sweep.
        for tracker in filter(None, trackers):
            tracker.flush()
        raise
    except BaseException as err:
        end("FAILED", {"status_reason": f"{type(err).__name__}: {err}"[:5000]})
        raise


def trial_state(iteration: int, warmup_ended: bool, best_val_error: float, step_state: dict, run_id: str | None,
                key: str, window: torch.Tensor, device: torch.device, world_size: int = 1) -> dict[str, Any]:
    """A trial's checkpoint: everything an exact resume needs (fused members write the same format)."""
    state = {"iteration": iteration, "warmup_ended": warmup_ended, "best_val_error": best_val_error,
             "step": step_state, "run_id": run_id, "trial_key": key, "window": window.cpu(),
             "rng_cpu": torch.get_rng_state(), "trained_on": trained_on(world_size, device)}
    if device.type == "cuda":
        state["rng_cuda"] = torch.cuda.get_rng_state()
    return state


def trained_on(world_size: int, device: torch.device) -> str:
    return f"{world_size} rank(s) on {device.type}"


def restore_rng(state: dict[str, Any], device: torch.device) -> None:
    """The RNG states trial_state saved (as CPU byte tensors, whatever device the checkpoint was loaded onto)."""
    torch.set_rng_state(state["rng_cpu"].cpu())
    if device.type == "cuda" and "rng_cuda" in state:
        torch.cuda.set_rng_state(state["rng_cuda"].cpu())


def open_run(cfg: TrainConfig, key: str, run_id: str | None, world_size: int,
             rejected_checkpoints: list[str]) -> tuple[Tracker, str]:
    """Start (or continue: the checkpoint's run id, else the run tagged with this trial key) the trial's MLflow run."""
    t = cfg.tracking
    tracker = Tracker(t.uri, t.experiment)
    moved_from = None
    if run_id and not tracker.holds_run(run_id):  # the checkpoint was written under another store or experiment
        moved_from, run_id = run_id, None
        print(f"tracking: the checkpoint's MLflow run {moved_from} is not in {tracker.client.tracking_uri} "
              f"(experiment {t.experiment!r}); the trial goes on in a run there, its earlier points stay where they "
              "were", file=sys.stderr)
    # checkpoint.resume off starts the trial over in a new run: continued, the old run dropped the new points up
    # to its last step (a run's steps only go forward), and its curve and the new weights disagreed
    earlier, why = None, ""
    if not cfg.checkpoint.resume:
        earlier, why = tracker.find_run(key), "checkpoint.resume is off"  # retired below, once the new run exists
    elif run_id is None and (found := tracker.find_run(key)):
        # a finished run without its checkpoints (another checkpoint.root, or deleted): training from 0 in it
        # would keep its old curve and metrics beside new weights; else the trial goes on in its run
        if tracker.client.get_run(found).info.status == "FINISHED":
            earlier, why = found, f"its finished run has no checkpoint in {cfg.checkpoint.root}"
        else:
            run_id = found
    # kind=trial: a run of `orchestrate train` is a trial too, seen by status, report and ensemble
    tags = {**environment_tags(world_size), "trial_key": key, "kind": "trial", **t.tags}
    if moved_from:
        tags["resumed_from_run"] = moved_from
    params = flatten(cfg.model_dump(mode="json"))
    run_id = tracker.start(run_id, t.run_name or f"{cfg.model.name}-{key[:8]}", params, tags)
    if earlier:
        retire_run(tracker, key, earlier, run_id, why)
    if rejected_checkpoints:  # the event a user must see: a corrupt checkpoint was skipped
        tracker.set_tags({"checkpoint_rejected": ",".join(rejected_checkpoints)})
    return tracker, run_id


def retire_run(tracker: Tracker, key: str, earlier: str, run_id: str, why: str) -> None:
    """The trial's earlier run leaves the trials (kind=superseded: status, report, ensemble and a sweep's ledger
    skip it) and stays in the UI, pointing at the new one."""
    tracker.client.set_tag(earlier, "kind", "superseded")
    tracker.client.set_tag(earlier, "superseded_by", run_id)
    print(f"trial {key}: {why}: it trains again from iteration 0 in a new MLflow run {run_id}; "
          f"its earlier run {earlier} stays, tagged kind=superseded", flush=True)


def announce_start(key: str, folder: Path, state: dict[str, Any] | None, total: int, tracker: Tracker | None) -> None:
    """One line when a trial does not start afresh: a resume is never silent, nor is a restart that found its
    earlier run but no checkpoint (another --output, killed before the first one)."""
    if state is not None and state["iteration"] >= total:  # e.g. the same trial again under another experiment
        print(f"trial {key}: already trained to iteration {state['iteration']}/{total} (its checkpoint in {folder}): "
              "only its final evaluation runs; --set checkpoint.resume=false trains it again", flush=True)
    elif state is not None:
        print(f"trial {key}: resuming at iteration {state['iteration']}/{total} from its checkpoint in {folder}",
              flush=True)
    elif tracker is not None and tracker.last_logged_step() >= 0:
        print(f"trial {key}: no checkpoint in {folder}; training starts again at iteration 0 in its earlier MLflow "
              f"run {tracker.run_id}, which keeps its points up to step {tracker.last_logged_step()}", flush=True)


def config_as_run(cfg: TrainConfig) -> dict[str, Any]:
    """The resolved config, with the data path this run read made absolute: ensemble reads the members' data from
    it, and a relative path meant another folder (or nothing) from wherever `orchestrate ensemble` ran."""
    tree = cfg.model_dump(mode="json")
    if cfg.data.path != "synthetic" and not Path(cfg.data.path).expanduser().is_absolute():
        from .data.formats import resolve_path
        tree["data"]["path"] = str(resolve_path(cfg.data.path, cfg.data.download))
    return tree


def log_trial_artifacts(tracker: Tracker, cfg: TrainConfig, state_dict: dict[str, torch.Tensor],
                        num_classes: int) -> None:
    """The resolved config, the final weights (loadable with weights_only=True) and every metric point."""
    tracker.flush()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        (tmp / "config.yaml").write_text(yaml.safe_dump(config_as_run(cfg), sort_keys=False))
        torch.save({"model_name": cfg.model.name, "model_overrides": cfg.model.overrides(),
                    "num_classes": num_classes, "state_dict": {k: v.cpu() for k, v in state_dict.items()}},
                   tmp / "model.pt")
        tracker.write_metrics_csv(tmp / "metrics.csv")
        for name in ("config.yaml", "model.pt", "metrics.csv"):
            tracker.log_artifact(tmp / name)


def epoch_evaluation_due(iteration: int, steps_per_epoch: int, every_epochs: int, total: int) -> bool:
    """At the end of every `every_epochs`-th epoch, except the last iteration (the final evaluation covers it)."""
    return iteration % steps_per_epoch == 0 and (iteration // steps_per_epoch) % every_epochs == 0 and iteration < total


def timed(work: Callable[[], Any], device: torch.device) -> float:
    """Seconds `work` takes, counted from when the steps queued before it have run (theirs is training time)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    started = time.perf_counter()
    work()
    return time.perf_counter() - started


def report_to_file(path: str) -> Report:
    def append(metrics: dict[str, Any]) -> None:
        with open(path, "a") as f:
            f.write(json.dumps(metrics) + "\n")
    return append


def report_to_console() -> Report:
    """A line on stderr per evaluation, so a long run shows it is alive (the JSON result comes on stdout)."""
    started = time.monotonic()

    def show(metrics: dict[str, Any]) -> None:
        if "epoch" not in metrics or "iteration" not in metrics:
            return  # a failed trial's result: main prints it
        errors = "  ".join(f"{k} {100 * metrics[k]:.2f}%" for k in ("val_error", "test_error") if k in metrics)
        elapsed = int(time.monotonic() - started)
        # the trial: a fused job's log interleaves its members' lines
        trial = f"trial {metrics['trial_key'][:8]}  " if "trial_key" in metrics else ""
        print(f"[{time.strftime('%H:%M:%S')}] {trial}epoch {metrics['epoch']}  iteration {metrics['iteration']}/"
              f"{metrics.get('total_iterations', '?')}  {errors}  ({elapsed // 60}:{elapsed % 60:02d} elapsed)",
              file=sys.stderr, flush=True)
    return show


def report_to(*reports: Report | None) -> Report:
    chosen = [r for r in reports if r]
    return lambda metrics: [r(metrics) for r in chosen]


def main(argv: list[str] | None = None, prog: str = "python -m resnet_core.train", probe_store: bool = False) -> int:
    """Errors are one line behind ``prog`` (``orchestrate train`` passes its own name), as every command's are.
    ``probe_store``: a tracking server that does not answer is one line at once (`orchestrate train`, run by a
    user); a sweep's workers leave a restarting server to the client's retries."""
    parser = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n")[0])
    parser.add_argument("config", nargs="?", help="trial config YAML (default: the paper's CIFAR recipe)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override keys, e.g. optim.lr=0.05")
    parser.add_argument("--tracking-uri", default=None, help="MLflow store, as tracking.uri")
    args = parser.parse_args(one_value_per_set(sys.argv[1:] if argv is None else argv))
    if args.tracking_uri:
        args.set = [*args.set, f"tracking.uri={args.tracking_uri}"]
    report = report_to(report_to_file(os.environ[REPORT_FILE_ENV]) if os.environ.get(REPORT_FILE_ENV) else None,
                       report_to_console())
    stop = threading.Event()
    try:
        with output_closed_stops(stop):
            cfg = load_config(args.config, args.set)
            if probe_store and cfg.tracking.enabled:
                check_store_usable(tracking_uri(cfg.tracking.uri))  # else minutes of retries, a 130-line traceback
            for warning in schedule_warnings(cfg):
                print(f"warning: {warning}", file=sys.stderr)
            result = train(cfg, report, stop)
    except (ConfigError, DataError, FileNotFoundError) as err:  # the input's fault: one line, no traceback
        print(f"{prog}: error: {err}", file=sys.stderr)
        return 2
    except Interrupted as err:
        print(f"{prog}: interrupted: {err}; run again to resume", file=sys.stderr)
        return 3
    except checkpoint.Superseded as err:
        print(f"{prog}: superseded: {err}", file=sys.stderr)
        return EXIT_SUPERSEDED
    except checkpoint.CheckpointError as err:  # a full disk, or only corrupt checkpoints to resume from
        print(f"{prog}: error: {err}", file=sys.stderr)
        return 1
    if distributed.read_env().is_main:
        report(result)  # the final evaluation's line first: the JSON result is the last thing printed
        print(json.dumps(result), flush=True)
    return 0 if result["status"] == "FINISHED" else 1


@contextlib.contextmanager
def output_closed_stops(stop: threading.Event) -> Iterator[None]:
    """A reader of the trial's output that goes away (`orchestrate train ... | head`) made the next progress line
    raise BrokenPipeError: the run FAILED, without a checkpoint. Now that stops the trial as Ctrl-C does
    (checkpoint, run KILLED, resumable), and what is still printed goes to /dev/null."""
    streams = sys.stdout, sys.stderr
    sys.stdout, sys.stderr = (StopWhenClosed(s, stop) for s in streams)
    try:
        yield
    finally:
        sys.stdout, sys.stderr = streams


class StopWhenClosed:
    def __init__(self, stream, stop: threading.Event):
        self.stream, self.stop = stream, stop

    def write(self, text: str) -> int:
        try:
            return self.stream.write(text)
        except BrokenPipeError:
            self._closed()
            return len(text)

    def flush(self) -> None:
        try:
            self.stream.flush()
        except BrokenPipeError:
            self._closed()

    def _closed(self) -> None:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, self.stream.fileno())  # the interpreter's own flush at exit must not raise either
        os.close(devnull)
        self.stop.set()

    def __getattr__(self, name: str):
        return getattr(self.stream, name)


def exit_worker(code: int) -> None:
    """Exit a worker process. A distributed rank skips the interpreter's teardown: there, C++ destructors of
    torch.distributed / DeepSpeed state aborted a rank after its run had FINISHED ("terminate called without an
    active exception", exit -6; 2 of 4 CI runs, never alone), and the launcher then failed the whole trial.
    By now the trial's metrics, checkpoints, run status and result line are written; only stdio needs a flush."""
    if distributed.read_env().enabled:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)


if __name__ == "__main__":
    exit_worker(main())
