"""Horizontally fused trials (HFTA, Wang et al., MLSys 2021): K trials of one architecture that differ only in
learning rate, weight decay or seed, trained as one model in one process.

The members' parameters are stacked ([K, ...] per tensor) in one flat buffer, and ``torch.func.vmap`` runs the
architecture over the stack: every convolution becomes one grouped convolution over the K members and every
other op one op over K, so a step launches the kernels of one trial, not K times as many. The SGD update of all
members is a handful of elementwise ops on the flat buffer, with each member's lr and weight decay in a device
tensor (so a CUDA graph of the whole step needs no re-capture when the schedule moves).

Each member stays its own trial: its own initial weights and data order (its seed), momentum, lr schedule and
warm-up, divergence guard, MLflow run and checkpoint folder. Its checkpoints are in the single trial's format, so
a member resumes fused or alone, and to the rest of the system it is the same trial either way.
"""
from __future__ import annotations

import copy
import hashlib
import json
import math
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, stack_module_state, vmap

from . import checkpoint
from .config import ConfigError, TrainConfig, build_config, result_fields, trial_key
from .data import build_loader
from .distributed import DistEnv
from .models import create_model
from .schedule import LRSchedule
from .steps import autocast, resolve_precision, resolve_step, sgd, warn_if_slow_precision
from .tracking import Tracker
from .train import (Interrupted, Report, announce_start, epoch_evaluation_due, log_trial_artifacts, open_run,
                    pick_device, restore_rng, runs_settled_on_exit, stop_signals_asked, timed, trial_state,
                    warmup_never_ended, warn_if_model_misfits_data)

# What may differ between the members of one fused group: everything else must be equal.
FUSABLE_KEYS = ("seed", "optim.lr", "optim.weight_decay")
# the group has one of each (the first member's was used for all, unannounced); no result depends on them (where
# log_every does, under a warm-up that ends on the train error, it is part of the fusion key: never one group)
GROUP_SETTINGS = ("checkpoint.every", "checkpoint.resume", "tracking.log_every", "eval.batch_size")


def _without_fusable(cfg: TrainConfig) -> dict[str, Any]:
    payload = result_fields(cfg)  # with log_every where a warm-up ends on the train error: never one group
    payload.pop("seed")
    payload["optim"].pop("lr")
    payload["optim"].pop("weight_decay")
    return payload


def fusion_key(cfg: TrainConfig) -> str:
    """Trials with the same fusion key can be trained as one fused model."""
    return hashlib.sha256(json.dumps(_without_fusable(cfg), sort_keys=True).encode()).hexdigest()[:16]


def _first_difference(a: Any, b: Any, prefix: str = "") -> str:
    if isinstance(a, dict) and isinstance(b, dict):
        for key in sorted(set(a) | set(b)):
            if a.get(key) != b.get(key):
                return _first_difference(a.get(key), b.get(key), f"{prefix}{key}.")
    return prefix.rstrip(".")


def check_fusable(cfgs: list[TrainConfig], device: torch.device | None = None) -> None:
    """One-line ConfigError naming the key that stops these configs from training as one fused model."""
    if not cfgs:
        raise ConfigError("fuse: no trials to fuse")
    first = _without_fusable(cfgs[0])
    for cfg in cfgs[1:]:
        other = _without_fusable(cfg)
        if other != first:
            raise ConfigError(f"fuse: trials differ in {_first_difference(first, other)}; fused trials may differ "
                              f"only in {', '.join(FUSABLE_KEYS)}")
    for key in GROUP_SETTINGS:
        section, name = key.split(".")
        values = {getattr(getattr(cfg, section), name) for cfg in cfgs}
        if len(values) > 1:
            raise ConfigError(f"fuse: trials differ in {key} ({', '.join(map(str, sorted(values)))}); a fused group "
                              "has one")
    cfg = cfgs[0]
    if cfg.dist.engine != "ddp":
        raise ConfigError("dist.engine: fused trials train in one process without DeepSpeed; use ddp (the default)")
    if cfg.step in ("compile", "compile_graph"):
        raise ConfigError(f"step: fused trials run eager or as one CUDA graph (graph/auto), not {cfg.step}")
    if device is not None and resolve_precision(cfg, device) == "fp16":
        raise ConfigError("precision: fp16 needs loss scaling; fused trials use bf16 or fp32")


class StackedSGD:
    """torch.optim.SGD's update (momentum, dampening 0, optional Nesterov) for K stacked members at once, each
    with its own lr and weight decay: elementwise ops over the flat parameter buffer, no per-tensor loop."""

    def __init__(self, flat: torch.Tensor, grad: torch.Tensor, member_of: torch.Tensor, momentum: float,
                 nesterov: bool, weight_decay: list[float], grad_clip: float | None):
        self.flat, self.grad, self.member_of = flat, grad, member_of
        self.momentum, self.nesterov, self.grad_clip = momentum, nesterov, grad_clip
        self.members = len(weight_decay)
        self.lr = torch.zeros(self.members, device=flat.device)
        self.weight_decay = torch.tensor(weight_decay, device=flat.device)
        self.momentum_buffer = torch.zeros_like(flat)

    @torch.no_grad()
    def step(self) -> None:
        grad = self.grad
        if self.grad_clip:  # each member's own global norm, as clip_grad_norm_ on that trial alone
            norms = torch.zeros(self.members, device=grad.device).index_add_(0, self.member_of, grad * grad).sqrt()
            grad = grad * (self.grad_clip / (norms + 1e-6)).clamp(max=1.0)[self.member_of]
        d_p = torch.addcmul(grad, self.weight_decay[self.member_of], self.flat)
        self.momentum_buffer.mul_(self.momentum).add_(d_p)
        d_p = d_p.add(self.momentum_buffer, alpha=self.momentum) if self.nesterov else self.momentum_buffer
        self.flat.addcmul_(self.lr[self.member_of], d_p, value=-1.0)


def _normalize_in_own_dtype(module: nn.Module, args: tuple) -> tuple:
    """Batch norm under vmap takes a bf16 input (CUDA autocast casts the vmapped convolution) with its fp32
    running stats to a kernel that reads both as bf16: "expected scalar type BFloat16 but found Float" in the
    backward on CUDA, in the forward on CPU. It gets its own dtype in and gives its input's dtype back."""
    own = next((t.dtype for t in (module.weight, module.running_mean) if t is not None), torch.float32)
    module._input_dtype = args[0].dtype
    return (args[0].to(own), *args[1:])


def _back_to_input_dtype(module: nn.Module, _args: tuple, output: torch.Tensor) -> torch.Tensor:
    return output.to(module._input_dtype)


class FusedModel:
    """K models of one architecture as stacked tensors; calling it runs all K on [K, B, ...] (or one shared
    [B, ...]) input and returns [K, B, classes]."""

    def __init__(self, models: list[nn.Module], device: torch.device):
        self.members = len(models)
        self.param_names = [name for name, _ in models[0].named_parameters()]
        self.state_keys = list(models[0].state_dict())
        params, buffers = stack_module_state(models)
        sizes = [params[name].numel() for name in self.param_names]
        self.flat = torch.empty(sum(sizes), device=device)
        self.grad = torch.zeros_like(self.flat)
        member_of, self.params, offset = [], {}, 0
        for name, size in zip(self.param_names, sizes):
            stacked = params[name]
            view = self.flat[offset:offset + size].view(stacked.shape)
            with torch.no_grad():
                view.copy_(stacked)
            view.requires_grad_()
            # Backward accumulates into an existing .grad in place: every gradient lands in the flat buffer.
            view.grad = self.grad[offset:offset + size].view(stacked.shape)
            self.params[name] = view
            member_of.append(torch.arange(self.members, device=device).repeat_interleave(size // self.members))
            offset += size
        self.member_of = torch.cat(member_of)
        self.buffers = {name: value.to(device) for name, value in buffers.items()}
        self.base = copy.deepcopy(models[0]).to("meta")  # the architecture only: functional_call supplies tensors
        for module in self.base.modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                module.register_forward_pre_hook(_normalize_in_own_dtype)
                module.register_forward_hook(_back_to_input_dtype)

    def _forward(self, params: dict, buffers: dict, images: torch.Tensor) -> torch.Tensor:
        return functional_call(self.base, (params, buffers), (images,))

    def __call__(self, images: torch.Tensor, shared_input: bool) -> torch.Tensor:
        return vmap(self._forward, in_dims=(0, 0, None if shared_input else 0))(self.params, self.buffers, images)

    def train(self, mode: bool = True) -> None:
        self.base.train(mode)

    def member_state_dict(self, k: int) -> dict[str, torch.Tensor]:
        tensors = {**self.params, **self.buffers}
        return {key: tensors[key][k].detach().clone() for key in self.state_keys}

    @torch.no_grad()
    def load_member_state_dict(self, k: int, state: dict[str, torch.Tensor]) -> None:
        missing = set(self.state_keys) - set(state)
        if missing:
            raise checkpoint.CheckpointError(f"member checkpoint lacks {sorted(missing)[0]} (another architecture?)")
        tensors = {**self.params, **self.buffers}
        for key in self.state_keys:
            tensors[key][k].copy_(state[key])


class FusedStep:
    """One training step of all members: eager, or (``graph=True``, CUDA) captured once in a CUDA graph."""

    def __init__(self, cfgs: list[TrainConfig], model: FusedModel, device: torch.device, graph: bool):
        if graph and device.type != "cuda":
            raise ConfigError("step: 'graph' needs a CUDA GPU; use eager on CPU")
        self.cfgs, self.model, self.device, self.graph_mode = cfgs, model, device, graph
        o = cfgs[0].optim
        self.precision = resolve_precision(cfgs[0], device)
        self.optimizer = StackedSGD(model.flat, model.grad, model.member_of, o.momentum, o.nesterov,
                                    [c.optim.weight_decay for c in cfgs], o.grad_clip)
        self.alive = torch.ones(model.members, dtype=torch.bool, device=device)
        self._lrs: tuple[float, ...] | None = None
        self.graph: torch.cuda.CUDAGraph | None = None

    def autocast(self):
        return autocast(self.precision, self.device)

    def set_lrs(self, lrs: tuple[float, ...]) -> None:
        if lrs != self._lrs:  # a host-to-device copy only when the schedule moves
            self.optimizer.lr.copy_(torch.tensor(lrs))
            self._lrs = lrs

    def forward_backward(self, images: torch.Tensor, labels: torch.Tensor, shared: bool) -> torch.Tensor:
        k = self.model.members
        with self.autocast():
            logits = self.model(images, shared)
        logits = logits.float()
        labels = labels.expand(k, -1) if shared else labels
        per_image = F.cross_entropy(logits.flatten(0, 1), labels.flatten(), reduction="none").view(k, -1)
        losses = per_image.mean(1)
        # Each member's gradient is that of its own mean loss; a diverged member (NaN) is left out of the sum.
        torch.where(self.alive, losses, torch.zeros_like(losses)).sum().backward()
        n = labels.shape[1]
        errors = (logits.detach().argmax(2) != labels).sum(1).float()
        return torch.stack([losses.detach() * n, errors, torch.full_like(errors, float(n))], dim=1)  # [K, 3]

    def __call__(self, images: torch.Tensor, labels: torch.Tensor, lrs: tuple[float, ...], shared: bool) -> torch.Tensor:
        self.set_lrs(lrs)
        if not self.graph_mode:
            self.model.grad.zero_()
            stats = self.forward_backward(images, labels, shared)
            self.optimizer.step()
            return stats
        if self.graph is None:
            self.capture(images, labels, shared)
        self.static_images.copy_(images, non_blocking=True)
        self.static_labels.copy_(labels, non_blocking=True)
        self.graph.replay()
        return self.static_stats.clone()

    def capture(self, images: torch.Tensor, labels: torch.Tensor, shared: bool) -> None:
        """As GraphStep: warm up on a side stream, capture, then undo the warm-up's updates."""
        self.static_images, self.static_labels = images.clone(), labels.clone()
        saved_flat = self.model.flat.detach().clone()
        saved_buffers = {k: v.clone() for k, v in self.model.buffers.items()}
        saved_momentum = self.optimizer.momentum_buffer.clone()  # a resumed group has some: keep it
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(3):
                self.model.grad.zero_()
                self.forward_backward(self.static_images, self.static_labels, shared)
                self.optimizer.step()
        torch.cuda.current_stream().wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph, capture_error_mode="thread_local"):  # as GraphStep.capture
            self.model.grad.zero_()
            self.static_stats = self.forward_backward(self.static_images, self.static_labels, shared)
            self.optimizer.step()
        with torch.no_grad():
            self.model.flat.copy_(saved_flat)
            for key, value in self.model.buffers.items():
                value.copy_(saved_buffers[key])
            self.optimizer.momentum_buffer.copy_(saved_momentum)

    # -- a member's state in the single trial's format (EagerStep.state_dict) --------------------------------
    def member_state(self, k: int) -> dict[str, Any]:
        cfg = self.cfgs[k]
        params = [torch.zeros(1, requires_grad=True)]
        groups = sgd(cfg, params, self._lrs[k] if self._lrs else cfg.optim.lr).state_dict()["param_groups"]
        groups[0]["params"] = list(range(len(self.model.param_names)))
        buffers = self.member_views(self.optimizer.momentum_buffer, k)
        return {"model": self.model.member_state_dict(k),
                "optimizer": {"state": {i: {"momentum_buffer": b.clone()} for i, b in enumerate(buffers)},
                              "param_groups": groups}}

    def load_member_state(self, k: int, state: dict[str, Any]) -> None:
        self.model.load_member_state_dict(k, state["model"])
        saved = state["optimizer"]["state"]
        with torch.no_grad():
            for i, view in enumerate(self.member_views(self.optimizer.momentum_buffer, k)):
                buffer = saved.get(i, {}).get("momentum_buffer")
                view.copy_(buffer) if buffer is not None else view.zero_()

    def member_views(self, flat: torch.Tensor, k: int) -> list[torch.Tensor]:
        """Member k's slices of a tensor laid out like the flat parameter buffer."""
        views, offset = [], 0
        for name in self.model.param_names:
            stacked = self.model.params[name]
            size = stacked.numel()
            views.append(flat[offset:offset + size].view(stacked.shape)[k])
            offset += size
        return views


@dataclass
class Member:
    """The bookkeeping of one trial inside a fused group."""
    index: int
    cfg: TrainConfig
    key: str
    schedule: LRSchedule
    loader: int                      # index of its train loader (members with one seed share one)
    tracker: Tracker | None = None
    run_id: str | None = None
    warmup_ended: bool = False
    best_val_error: float = math.inf
    failed: str | None = None        # the reason, once it diverged
    rejected: list[str] = field(default_factory=list)

    @property
    def folder(self) -> Path:
        return Path(self.cfg.checkpoint.root) / self.key


class FusedTrainer:
    def __init__(self, cfgs: list[TrainConfig], device: torch.device, report: Report | None,
                 stop: threading.Event | None = None):
        self.cfgs, self.device, self.report = cfgs, device, report
        self.stop = stop or threading.Event()  # as Trainer's: set by a stop signal too
        seeds = list(dict.fromkeys(c.seed for c in cfgs))
        data, batch = cfgs[0].data, cfgs[0].batch_size
        first = build_loader(data, "train", batch, device, 0, 1, seeds[0])
        # The gpu loader holds the split on the device: one copy serves every seed. Others (DALI pipelines,
        # DataLoader workers) keep state while iterating, so each seed gets its own.
        self.train_loaders = [first] + [first.with_seed(seed) if data.loader == "gpu" else
                                        build_loader(data, "train", batch, device, 0, 1, seed) for seed in seeds[1:]]
        self.eval_loaders = {split: build_loader(data, split, cfgs[0].eval.batch_size, device, 0, 1, seeds[0])
                             for split in (("val", "test") if data.val_split else ("test",))}
        models = []
        for cfg in cfgs:
            torch.manual_seed(cfg.seed)  # the same initial weights as the trial alone
            models.append(create_model(cfg.model.name, num_classes=self.train_loaders[0].num_classes,
                                       **cfg.model.overrides()))
        warn_if_model_misfits_data(cfgs[0].model.name, models[0].input_size, self.train_loaders[0].cifar_sized)
        self.model = FusedModel(models, device)
        del models
        steps_per_epoch = len(self.train_loaders[0])
        self.members = [Member(k, cfg, trial_key(cfg), LRSchedule(cfg.schedule, cfg.optim.lr, steps_per_epoch),
                               seeds.index(cfg.seed)) for k, cfg in enumerate(cfgs)]
        self.step = FusedStep(cfgs, self.model, device, graph=resolve_step(cfgs[0], device) == "graph")
        self.iteration = 0
        self.window = torch.zeros(len(cfgs), 3, device=device)
        self.log_every, self.checkpoint_every = cfgs[0].tracking.log_every, cfgs[0].checkpoint.every

    # -- the loop -----------------------------------------------------------------------------------------
    def run(self) -> list[dict[str, Any]]:
        self.claims = [checkpoint.claim(m.folder) for m in self.members]  # one trial, one writer (see checkpoint)
        states = self.load_checkpoints()
        for m in self.members:
            if m.cfg.tracking.enabled:
                m.tracker, m.run_id = open_run(m.cfg, m.key, m.run_id, 1, m.rejected)
            announce_start(m.key, m.folder, states[m.index], m.schedule.total, m.tracker)
        warn_if_slow_precision(self.cfgs[0], self.device)  # fusable members share the precision
        with stop_signals_asked(self.stop.set), runs_settled_on_exit([m.tracker for m in self.members],
                                                                          self.end_all):
            self.apply_checkpoints(states)  # inside: checkpoints that do not fit fail the runs, with the reason
            self.loop()
            final = self.evaluate_all()
            self.save_checkpoints()
            return [self.result(m) if m.failed else self.finish(m, final[m.index]) for m in self.members]

    def loop(self) -> None:
        loader = self.train_loaders[0]
        steps_per_epoch, total = len(loader), self.members[0].schedule.total
        shared = len(self.train_loaders) == 1
        index = torch.tensor([m.loader for m in self.members], device=self.device)
        started = time.perf_counter()  # of the metric window: images/s counts training time only
        untimed = self.window[:, 2].tolist()  # a resumed window's images, trained before this timer
        while self.iteration < total and self.alive():
            epoch, start = divmod(self.iteration, steps_per_epoch)
            for batches in zip(*(l.iterate(epoch, start) for l in self.train_loaders)):
                if shared:
                    images, labels = batches[0]
                else:  # each member its own seed's batch: [K, B, ...]
                    images = torch.stack([b[0] for b in batches]).index_select(0, index)
                    labels = torch.stack([b[1] for b in batches]).index_select(0, index)
                lrs = tuple(0.0 if m.failed else m.schedule(self.iteration, m.warmup_ended) for m in self.members)
                self.window += self.step(images, labels, lrs, shared)
                self.iteration += 1
                if self.iteration % self.log_every == 0 or self.iteration == total:
                    self.log_train(lrs, started, untimed)
                    started, untimed = time.perf_counter(), [0.0] * len(self.members)
                if epoch_evaluation_due(self.iteration, steps_per_epoch, self.cfgs[0].eval.every_epochs, total):
                    # as Trainer.loop: before the checkpoint and the stop check, and not training time
                    started += timed(lambda: self.log_eval(self.evaluate_all(), self.iteration // steps_per_epoch),
                                     self.device)
                if self.iteration % self.checkpoint_every == 0:
                    self.save_checkpoints()
                if self.stop.is_set():  # one process: no ranks to agree with, check every step
                    self.save_checkpoints()
                    raise Interrupted(f"stopped at iteration {self.iteration}, checkpoint written")
                if self.iteration >= total or not self.alive():
                    break

    def alive(self) -> bool:
        return any(not m.failed for m in self.members)

    def check_fence(self) -> None:
        for m, claim in zip(self.members, self.claims):
            checkpoint.check_owner(m.folder, claim)

    def log_train(self, lrs: tuple[float, ...], started: float, untimed: list[float]) -> None:
        self.check_fence()
        window = self.window.tolist()  # waits for the GPU: only now has the window's work been done
        seconds = time.perf_counter() - started
        for m, (loss_sum, errors, images) in zip(self.members, window):
            if m.failed:
                continue
            loss, error = loss_sum / max(images, 1), errors / max(images, 1)
            if not math.isfinite(loss):
                self.fail(m, f"loss is {loss} at iteration {self.iteration} (lr {lrs[m.index]:g})")
                continue
            until = m.cfg.schedule.warmup.until_train_error
            if until and error < until:
                m.warmup_ended = True
            self.log(m, {"train_loss": loss, "train_error": error, "lr": lrs[m.index],
                         "images_per_s": (images - untimed[m.index]) / seconds if seconds > 0 else 0.0})
        self.window.zero_()

    # -- evaluation: every member on the same images ------------------------------------------------------
    @torch.no_grad()
    def evaluate(self, split: str) -> list[dict[str, float]]:
        """Each member's {split}_loss and _error, and with more than 10 classes _top5_error (as Trainer's)."""
        self.model.train(False)
        sums = torch.zeros(len(self.members), 4, device=self.device)
        for images, labels in self.eval_loaders[split].iterate(0):
            with self.step.autocast():
                logits = self.model(images, shared_input=True).float()  # [members, images, classes]
            labels_k = labels.expand(len(self.members), -1)
            loss = F.cross_entropy(logits.flatten(0, 1), labels_k.flatten(), reduction="none").view_as(labels_k)
            errors = (logits.argmax(2) != labels_k).sum(1).float()
            top5 = logits.topk(min(5, logits.shape[2]), dim=2).indices
            top5_errors = (top5 != labels_k[..., None]).all(2).sum(1).float()
            sums += torch.stack([loss.sum(1), errors, top5_errors, torch.full_like(errors, float(labels.numel()))],
                                dim=1)
        self.model.train(True)
        top5 = self.train_loaders[0].num_classes > 10
        return [{f"{split}_loss": s / max(n, 1), f"{split}_error": e / max(n, 1),
                 **({f"{split}_top5_error": t / max(n, 1)} if top5 else {})} for s, e, t, n in sums.tolist()]

    def evaluate_all(self) -> list[dict[str, float]]:
        metrics = [{} for _ in self.members]
        for split in self.eval_loaders:
            for m, split_metrics in zip(self.members, self.evaluate(split)):
                metrics[m.index].update(split_metrics)
        for m in self.members:
            if "val_error" in metrics[m.index]:
                m.best_val_error = min(m.best_val_error, metrics[m.index]["val_error"])
        return metrics

    def log_eval(self, metrics: list[dict[str, float]], epoch: int) -> None:
        for m in self.members:
            if m.failed:
                continue
            best = {"best_val_error": m.best_val_error} if "val_error" in metrics[m.index] else {}
            self.log(m, {**metrics[m.index], **best, "epoch": epoch})  # stopped early, a trial still has one
            if self.report:
                self.report({**metrics[m.index], "iteration": self.iteration, "epoch": epoch, "trial_key": m.key,
                             "run_id": m.run_id, "total_iterations": m.schedule.total})

    def log(self, m: Member, metrics: dict[str, float]) -> None:
        if m.tracker:
            m.tracker.log_metrics(metrics, self.iteration)

    # -- checkpoints: one per member, in its own trial folder ---------------------------------------------
    def load_checkpoints(self) -> list[dict[str, Any] | None]:
        """Each member's newest good checkpoint (None: afresh); they must be at one iteration. Sets the run ids."""
        if not self.cfgs[0].checkpoint.resume:
            for m in self.members:
                checkpoint.discard(m.folder)
            return [None] * len(self.members)
        states = []
        for m in self.members:
            state, m.rejected = checkpoint.load_latest(m.folder, map_location=self.device)
            m.run_id = state["run_id"] if state else None
            states.append(state)
        iterations = {s["iteration"] if s else 0 for s in states}
        if len(iterations) > 1:
            raise checkpoint.CheckpointError(
                f"fused trials {', '.join(m.key for m in self.members)} have checkpoints at different iterations "
                f"({sorted(iterations)}); fused members step together: run them with fuse: 1 to finish them")
        return states

    def apply_checkpoints(self, states: list[dict[str, Any] | None]) -> None:
        for m, state in zip(self.members, states):
            if state is None:
                continue
            self.step.load_member_state(m.index, state["step"])
            self.iteration, m.warmup_ended = state["iteration"], state["warmup_ended"]
            m.best_val_error = state["best_val_error"]
            self.window[m.index].copy_(state["window"].to(self.device))
            restore_rng(state, self.device)  # the same state in every member's checkpoint

    def save_checkpoints(self) -> None:
        self.check_fence()
        for m in self.members:
            if m.tracker:
                m.tracker.flush()
        for m in self.members:
            if not m.failed:
                state = trial_state(self.iteration, m.warmup_ended, m.best_val_error, self.step.member_state(m.index),
                                    m.run_id, m.key, self.window[m.index], self.device)
                checkpoint.save(m.folder, self.iteration, state, m.cfg.checkpoint.keep)

    # -- the end ------------------------------------------------------------------------------------------
    def finish(self, m: Member, final: dict[str, float]) -> dict[str, Any]:
        epoch = math.ceil(self.iteration / len(self.train_loaders[0]))
        metrics = {**final, "epoch": epoch}
        if "val_error" in metrics:
            metrics["best_val_error"] = m.best_val_error
        self.log(m, metrics)  # to MLflow only: the backend reports the returned result (see Trainer.finish)
        never = warmup_never_ended(m.schedule, self.iteration, m.warmup_ended)
        if never:
            print(f"warning: trial {m.key[:8]}: {never}", file=sys.stderr, flush=True)
        if m.tracker:
            log_trial_artifacts(m.tracker, m.cfg, self.model.member_state_dict(m.index),
                                self.train_loaders[0].num_classes)
            m.tracker.end("FINISHED", {"status_reason": "finished", "fused_group": self.group_label(),
                                       **({"warning": never} if never else {})})
        return {"status": "FINISHED", "trial_key": m.key, "run_id": m.run_id, "iteration": self.iteration, **metrics}

    def fail(self, m: Member, reason: str) -> None:
        """A diverged member stops (lr 0, left out of the loss); the others train on."""
        m.failed = reason
        self.step.alive[m.index] = False
        if m.tracker:
            m.tracker.end("FAILED", {"status_reason": reason})

    def result(self, m: Member) -> dict[str, Any]:
        return {"status": "FAILED", "trial_key": m.key, "run_id": m.run_id, "iteration": self.iteration,
                "reason": m.failed}

    def end_all(self, status: str, tags: dict[str, str]) -> None:
        for m in self.members:
            if m.tracker and not m.failed:
                m.tracker.end(status, tags)

    def group_label(self) -> str:
        return ",".join(m.key[:8] for m in self.members)


def train_fused(cfgs: list[TrainConfig | dict], report: Report | None = None,
                stop: threading.Event | None = None) -> list[dict[str, Any]]:
    """Train several trials as one fused model; returns each member's ``train()`` result, in order (``stop``: as
    ``train()``'s)."""
    cfgs = [c if isinstance(c, TrainConfig) else build_config(c) for c in cfgs]
    device = pick_device(cfgs[0], DistEnv())
    check_fusable(cfgs, device)
    return FusedTrainer(cfgs, device, report, stop).run()
