"""Learning rate as a pure function of the iteration: the paper's steps (Sec. 4.2), cosine, and warm-up.

Pure so that a resumed run, a CUDA-graph step (lr lives in a device tensor) and a test all agree.
"""
from __future__ import annotations

import math

from .config import ScheduleConfig, TrainConfig


class LRSchedule:
    def __init__(self, cfg: ScheduleConfig, base_lr: float, iterations_per_epoch: int):
        scale = iterations_per_epoch if cfg.unit == "epochs" else 1
        self.cfg = cfg
        self.base_lr = base_lr
        self.total = cfg.total * scale
        self.milestones = [m * scale for m in cfg.milestones]
        self.warmup_length = cfg.warmup.length * scale

    def in_warmup(self, iteration: int, warmup_ended: bool) -> bool:
        """Warm-up lasts ``length`` iterations; ``until_train_error`` may end it earlier (the caller says when),
        and with no length it alone ends it (the paper's ResNet-110 recipe)."""
        warmup = self.cfg.warmup
        if warmup.kind == "none" or warmup_ended:
            return False
        if not self.warmup_length:
            return warmup.until_train_error is not None
        return iteration < self.warmup_length  # past its length a linear ramp rose above the base lr

    def __call__(self, iteration: int, warmup_ended: bool = False) -> float:
        warmup = self.cfg.warmup
        if self.in_warmup(iteration, warmup_ended):
            if warmup.kind == "constant" or not self.warmup_length:
                return warmup.lr
            return warmup.lr + (self.base_lr - warmup.lr) * iteration / self.warmup_length
        return self.after_warmup(iteration)

    def after_warmup(self, iteration: int) -> float:
        if self.cfg.kind == "step":
            return self.base_lr * self.cfg.gamma ** sum(iteration >= m for m in self.milestones)
        if self.cfg.kind == "cosine":
            start = self.warmup_length
            progress = min(1.0, max(0.0, (iteration - start) / max(1, self.total - start)))
            return 0.5 * self.base_lr * (1 + math.cos(math.pi * progress))
        return self.base_lr


def schedule_warnings(cfg: TrainConfig) -> list[str]:
    """Settings that validate but leave the lr schedule partly unused: a shortened run (``--set
    schedule.total=200``) kept the recipe's milestones, or a warm-up as long as the run, and trained at an lr
    nobody asked for."""
    s, warmup, said = cfg.schedule, cfg.schedule.warmup, []
    late = [m for m in s.milestones if m >= s.total]
    if s.kind == "step" and late:
        said.append(f"schedule.milestones {', '.join(map(str, late))} >= schedule.total {s.total}: the lr never "
                    "drops there (set schedule.milestones too)")
    if warmup.kind != "none" and warmup.length >= s.total:
        said.append(f"schedule.warmup.length {warmup.length} >= schedule.total {s.total}: the whole run warms up, "
                    f"never at optim.lr {cfg.optim.lr:g} (set schedule.warmup.length too)")
    default_milestones = type(s).model_fields["milestones"].default
    if s.kind != "step" and s.milestones and tuple(s.milestones) != tuple(default_milestones):
        said.append(f"schedule.milestones {list(s.milestones)}: a {s.kind} schedule has none; they are ignored "
                    "(schedule.kind step uses them)")
    if warmup.kind == "linear" and warmup.lr > cfg.optim.lr:
        said.append(f"schedule.warmup.lr {warmup.lr:g} > optim.lr {cfg.optim.lr:g}: the linear warm-up ramps the lr "
                    "down, not up")
    return said
