"""A sweep spec becomes a list of trials: resolved, validated trial configs, each with its stable trial key.

Expansion happens here, seeded, before any backend sees the trials, so a dry run, a resumed sweep and every
backend agree on the same trials and keys (Ray Tune only runs the list; it does not sample it).
"""
from __future__ import annotations

import hashlib
import itertools
import json
import math
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from resnet_core.config import ConfigError, TrainConfig, blame, build_config, set_dotted, trial_key

from .estimate import training_multiply_adds
from .spec import SpecError, SweepSpec


@dataclass(frozen=True)
class Trial:
    key: str                       # hash of the resolved config: the identity of the trial everywhere
    overrides: dict[str, Any]      # the space's values for this trial (what differs from base)
    config: TrainConfig            # resolved, with the sweep's tracking and checkpoint settings

    @property
    def label(self) -> str:
        return label_of(self.overrides)

    @property
    def members(self) -> tuple[Trial, ...]:
        """The trials one backend job runs, as a FusedGroup's: itself."""
        return (self,)

    def config_dict(self) -> dict[str, Any]:
        return self.config.model_dump(mode="json")


@dataclass
class SweepContext:
    """Where a sweep writes: its output folder, its MLflow store and experiment."""
    spec: SweepSpec
    spec_path: Path
    output: Path
    tracking_uri: str
    cluster: dict[str, Any] = field(default_factory=dict)
    sets: tuple[str, ...] = ()  # the command line's --set edits, for errors to name


def label_of(overrides: dict[str, Any]) -> str:
    """Short, readable: sampled floats to 4 significant digits (the config keeps full precision)."""
    return " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in overrides.items()) or "base"


def sample(domain: Any, rng: random.Random) -> Any:
    if isinstance(domain, list):
        return rng.choice(domain)
    (kind, args), = domain.items()
    if kind == "choice":
        return rng.choice(args)
    low, high = args
    if kind == "loguniform":
        return math.exp(rng.uniform(math.log(low), math.log(high)))
    if kind == "randint":
        return rng.randint(int(low), int(high) - 1)  # high exclusive, as Ray Tune's randint
    return rng.uniform(low, high)


def assignments(spec: SweepSpec) -> list[dict[str, Any]]:
    """Grid: the product of the lists, each point repeated num_samples times with fresh samples of the
    distributions (Ray Tune's semantics). Random: num_samples points, every key sampled."""
    rng = random.Random(spec.seed)
    grid_keys = [k for k, d in spec.space.items() if isinstance(d, list) and spec.search == "grid"]
    sampled_keys = [k for k in spec.space if k not in grid_keys]
    points = list(itertools.product(*(spec.space[k] for k in grid_keys))) if grid_keys else [()]
    out = []
    for _ in range(spec.num_samples):
        for point in points:
            values = dict(zip(grid_keys, point))
            values.update({k: sample(spec.space[k], rng) for k in sampled_keys})
            out.append({k: values[k] for k in spec.space})  # the spec's key order
    return out


def resolve(ctx: SweepContext, overrides: dict[str, Any]) -> Trial:
    tree = json.loads(json.dumps(ctx.spec.base))
    for key, value in overrides.items():
        set_dotted(tree, key, value)
    base = build_config(tree, check_names=True)  # validates; the key depends only on result-changing fields
    key = trial_key(base)
    label = label_of(overrides)
    set_dotted(tree, "tracking.experiment", ctx.spec.name)
    set_dotted(tree, "tracking.uri", ctx.tracking_uri)
    set_dotted(tree, "tracking.tags", {**tree.get("tracking", {}).get("tags", {}),
                                       "sweep": ctx.spec.name, "kind": "trial", "trial_overrides": label})
    set_dotted(tree, "tracking.run_name", f"{label} [{key[:8]}]")
    set_dotted(tree, "checkpoint.root", str(ctx.output / "checkpoints"))
    return Trial(key, overrides, build_config(tree))


def expand(ctx: SweepContext, check_data: bool = True) -> list[Trial]:
    """Every trial of the sweep, validated, duplicates (same key) removed, longest first. ``check_data=False``:
    a dry run on a login node may not see the data the compute nodes will."""
    trials, seen, points = [], {}, assignments(ctx.spec)
    check_sampled_values(ctx, points[0])
    for overrides in points:
        try:
            trial = resolve(ctx, overrides)
        except ConfigError as err:
            raise SpecError(trial_error(ctx, overrides, str(err).removeprefix("config: "))) from None
        if trial.key in seen:  # a sampled point drawn again is the same trial; other values that are is an error
            check_distinct(ctx, seen[trial.key].overrides, overrides, trial.key)
            continue
        seen[trial.key] = trial
        trials.append(trial)
    if check_data:
        check_data_exists(ctx, trials)
    check_scheduler_metric(ctx, trials)
    return sorted(trials, key=lambda t: -training_multiply_adds(t.config))  # longest first


def check_sampled_values(ctx: SweepContext, overrides: dict[str, Any]) -> None:
    """A distribution may only reach values its key accepts (the ends of a range, each choice): a bad value
    failed the sweep or passed it by the luck of spec.seed (optim.lr: {uniform: [-1, 1]} passed with seed 0)."""
    for key, domain in ctx.spec.space.items():
        if isinstance(domain, list):
            continue
        (kind, args), = domain.items()
        reachable = args if kind == "choice" else [args[0], int(args[1]) - 1 if kind == "randint" else args[1]]
        for value in reachable:
            try:
                resolve(ctx, {**overrides, key: value})
            except ConfigError as err:
                message = str(err).removeprefix("config: ")
                if message.startswith(f"{key}:"):
                    raise SpecError(blame(ctx.spec_path, ctx.sets, f"space.{key}.{kind}: {args} can sample {value!r}: "
                                          f"{message}", key=f"space.{key}")) from None


def trial_error(ctx: SweepContext, overrides: dict[str, Any], message: str) -> str:
    """A trial config that does not validate: blame the space's value when its key is at fault, else base (or
    the --set that edited it); it named the first trial even for a typo in base."""
    key = message.split(": ", 1)[0]
    if key in overrides:
        return blame(ctx.spec_path, ctx.sets, f"trial {label_of(overrides)}: {message}", key="space." + key)
    return blame(ctx.spec_path, ctx.sets, "base." + message)


def check_distinct(ctx: SweepContext, first: dict[str, Any], second: dict[str, Any], key: str) -> None:
    """Two space points that validate to one config ([0.1, "0.1"], [1, 1.0], [false, 0]) ran as one trial,
    unannounced: the sweep had fewer trials than its grid promised."""
    differing = [k for k in first if json.dumps(first[k]) != json.dumps(second[k])]
    if differing:
        k = differing[0]
        raise SpecError(blame(ctx.spec_path, ctx.sets, f"space.{k}: {first[k]!r} and {second[k]!r} make the same trial "
                              f"{key[:8]} (equal once validated, or a setting no result depends on); a trial runs "
                              "once: keep one of them"))


def check_data_exists(ctx: SweepContext, trials: list[Trial]) -> None:
    from resnet_core.data.formats import resolve_path
    for path in sorted({t.config.data.path for t in trials}):
        if path == "synthetic":
            continue
        try:
            resolve_path(path)
        except (FileNotFoundError, ValueError) as err:
            key = "space.data.path" if "data.path" in ctx.spec.space else "base.data.path"
            raise SpecError(blame(ctx.spec_path, ctx.sets, f"{key}: {str(err).removeprefix('data.path: ')}")) from None


REPORTED_METRICS = ("val_error", "val_loss", "test_error", "test_loss")


def check_scheduler_metric(ctx: SweepContext, trials: list[Trial]) -> None:
    asha = ctx.spec.scheduler.asha
    if asha is None:
        return
    if asha.metric not in REPORTED_METRICS:
        raise SpecError(f"{ctx.spec_path}: scheduler.asha.metric: {asha.metric!r} is not reported after "
                        f"evaluations; valid: {', '.join(REPORTED_METRICS)}")
    if asha.metric.startswith("val_") and any(t.config.data.val_split == 0 for t in trials):
        raise SpecError(f"{ctx.spec_path}: scheduler.asha.metric: {asha.metric} needs a validation split "
                        "(base.data.val_split > 0); stopping on the test set would select on it")


@dataclass(frozen=True)
class FusedGroup:
    """Trials trained together as one horizontally fused model (resnet_core.fused): one backend job."""
    members: tuple[Trial, ...]

    @property
    def key(self) -> str:
        return "fused-" + hashlib.sha256(",".join(t.key for t in self.members).encode()).hexdigest()[:12]

    @property
    def label(self) -> str:
        return f"fused x{len(self.members)}: " + "; ".join(t.label for t in self.members)


def fuse(ctx: SweepContext, trials: list[Trial]) -> list[Trial | FusedGroup]:
    """Group trials that may fuse (same fusion key), at most ``spec.fuse`` per group, keeping the longest-first
    order of each group's first trial; a trial with no partner stays a plain trial."""
    from resnet_core.fused import check_fusable, fusion_key
    size = ctx.spec.fuse
    if size <= 1:
        return list(trials)
    by_key: dict[tuple[str, int], list[Trial]] = {}
    for trial in trials:  # members start at one iteration (a re-run regroups what is left: see resume_iteration)
        by_key.setdefault((fusion_key(trial.config), resume_iteration(trial)), []).append(trial)
    units: list[Trial | FusedGroup] = []
    for group in by_key.values():
        for start in range(0, len(group), size):
            chunk = group[start:start + size]
            if len(chunk) == 1:
                units.append(chunk[0])
                continue
            try:
                check_fusable([t.config for t in chunk])
            except ConfigError as err:
                raise SpecError(f"{ctx.spec_path}: {err}") from None
            units.append(FusedGroup(tuple(chunk)))
    order = {t.key: i for i, t in enumerate(trials)}
    return sorted(units, key=lambda u: order[u.members[0].key])


def resume_iteration(trial: Trial) -> int:
    """The iteration a trial resumes at: its newest checkpoint's, by name (a fused group's members must share it;
    a corrupt newest file, found only on loading, can still split them: the group then fails with the reason)."""
    from resnet_core.checkpoint import checkpoint_files, checkpoint_iteration
    if not trial.config.checkpoint.resume:
        return 0
    newest = checkpoint_files(Path(trial.config.checkpoint.root) / trial.key)[:1]
    return checkpoint_iteration(newest[0]) if newest else 0


GPU_MEMORY_HEADROOM = 0.9  # leave 10% of the card for fragmentation and what the estimate misses


def gpu_memory_plan(ctx: SweepContext, units: list[Trial | FusedGroup]) -> tuple[int, int, float, str] | None:
    """(trials per GPU, worst-case bytes of that many on one GPU, GPU GiB, where the GiB came from), or None
    for CPU sweeps. The worst case puts the largest units together, as Ray may."""
    from .estimate import gpu_memory_gb, trial_gpu_memory_bytes
    r = ctx.spec.resources
    if r.gpus <= 0 or not units:
        return None
    per_gpu = max(1, math.floor(1 / r.gpus + 1e-9)) if r.gpus < 1 else 1
    per_gpu = min(per_gpu, ctx.spec.max_concurrent or per_gpu, len(units))
    ranks = r.nodes * r.workers_per_node
    needs = sorted((trial_gpu_memory_bytes(u.members[0].config, len(u.members), ranks) for u in units), reverse=True)
    capacity, source = gpu_memory_gb(r.gpu_memory_gb, ctx.cluster.get("slurm", {}).get("gpu_type"))
    return per_gpu, sum(needs[:per_gpu]), capacity, source


def check_gpu_memory(ctx: SweepContext, units: list[Trial | FusedGroup]) -> None:
    """Packed trials must not run the card out of memory: refuse a packing whose worst case does not fit."""
    plan = gpu_memory_plan(ctx, units)
    if plan is None:
        return
    per_gpu, need, capacity, source = plan
    if need > GPU_MEMORY_HEADROOM * capacity * 2**30:
        what = f"{per_gpu} trials per GPU (resources.gpus {ctx.spec.resources.gpus})" if per_gpu > 1 else "one trial"
        raise SpecError(f"{ctx.spec_path}: resources.gpus: {what} may need {need / 2**30:.1f} GiB of GPU memory, "
                        f"over {GPU_MEMORY_HEADROOM:.0%} of {capacity:.0f} GiB ({source}); pack fewer trials per "
                        "GPU (a larger resources.gpus), a smaller batch_size or fuse, or set resources.gpu_memory_gb")
