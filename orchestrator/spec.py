"""The sweep spec: a YAML file naming a base trial config, a search space over its dotted keys, the resources of
one trial, an optional early-stopping scheduler and the backend. Validated whole before anything is submitted;
every error is one line naming the key.

    name: cifar_depth
    base: {schedule: {total: 64000}}          # a resnet_core TrainConfig (the paper's recipe by default)
    space:
      model.name: [resnet20, resnet56]         # a list is a grid axis
      optim.lr: {loguniform: [0.01, 0.5]}      # a distribution is sampled (num_samples per grid point)
    num_samples: 1
    scheduler: {asha: {metric: val_error, grace_period: 2}}
    resources: {gpus: 0.25, cpus: 2}
    backend: ray
"""
from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from resnet_core.config import (ConfigError, blame, first_line, format_validation_error, parse_override, read_yaml,
                                set_dotted)

DISTRIBUTIONS = ("loguniform", "uniform", "randint", "choice")
BACKENDS = ("ray", "slurm")


class SpecError(ValueError):
    """A sweep spec that cannot run: one line naming the file and the key."""


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class SlurmProfile(Strict):
    """A cluster profile's `slurm:` section (cluster/slurm-example.yaml shows each key)."""
    partition: str | None = Field(None, description="partition to submit to")
    account: str | None = Field(None, description="account to charge")
    qos: str | None = Field(None, description="quality of service")
    constraint: str | None = Field(None, description="node features (--constraint)")
    exclude: str | None = Field(None, description="nodes to avoid")
    gpu_type: str | None = Field(None, description="GRES type: gpu:TYPE:N")
    setup: list[str] = Field([], description="shell lines run in the batch script before srun (module load, ...)")
    srun_args: list[str] = Field([], description="extra srun arguments")
    sbatch: dict[str, str | int | float | bool] = Field({}, description="any other sbatch option: {option: value}")
    signal_delay_s: int = Field(90, ge=0, description="seconds before the time limit at which submitit's USR2 asks "
                                "for checkpoint + requeue")
    max_num_timeout: int = Field(3, ge=0, description="how many times a timed-out trial is requeued")
    python: str | None = Field(None, description="python command on the nodes (default: this one's path)")
    master_addr: str | None = Field(None, description="rendezvous host (default: the allocation's first node)")
    poll_s: float = Field(2.0, gt=0, description="seconds between job-state polls")


class RayProfile(Strict):
    address: str | None = Field(None, description="the Ray cluster to run on (default: a local Ray)")


class ClusterProfile(Strict):
    """A cluster/*.yaml file: where a sweep runs."""
    slurm: SlurmProfile = SlurmProfile()
    ray: RayProfile = RayProfile()


class AshaConfig(Strict):
    """Asynchronous successive halving (Li et al. 2020), as Ray Tune implements it; time is counted in epochs."""
    metric: str = Field("val_error", description="a metric every evaluation reports (val_error, test_error, ...)")
    mode: Literal["min", "max"] = "min"
    max_t: int | None = Field(None, ge=1, description="epochs; default: the trial's length")
    grace_period: int = Field(1, ge=1, description="epochs every trial gets before it can be stopped")
    reduction_factor: float = Field(2.0, gt=1)

    @model_validator(mode="after")
    def _grace_within_max_t(self) -> "AshaConfig":
        if self.max_t is not None and self.grace_period > self.max_t:
            raise ValueError(f"grace_period: {self.grace_period} epochs is more than max_t {self.max_t}")
        if self.mode == "max" and self.metric.endswith(("_error", "_loss")):
            raise ValueError(f"mode: max would keep the trials of highest {self.metric}, the worst; errors and "
                             "losses are minimised (mode: min)")
        return self


class SchedulerConfig(Strict):
    asha: AshaConfig | None = None


class Resources(Strict):
    gpus: float = Field(0, ge=0, description="GPUs per node of a trial; a fraction packs trials on one GPU")
    cpus: float = Field(1, gt=0, description="CPU cores per trial (per node)")
    nodes: int = Field(1, ge=1, description="nodes per trial (SLURM: srun + torchrun/DeepSpeed rendezvous)")
    time_limit: str = Field("01:00:00", description="wall-time limit of one trial, HH:MM:SS (SLURM --time)")
    memory_gb: float | None = Field(None, gt=0, description="host memory per node (SLURM --mem)")
    gpu_memory_gb: float | None = Field(None, gt=0, description="memory of one GPU, for the packing check "
                                        "(default: this machine's GPU, else 80)")

    @field_validator("time_limit", mode="before")
    @classmethod
    def _not_a_number(cls, value: Any) -> Any:
        # YAML 1.1 reads 12:00:00 unquoted as 43200 (sexagesimal): an int cannot be told from minutes, refuse it
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            raise ValueError('give it quoted, e.g. "12:00:00" or "01:30:00" (YAML reads 12:00:00 '
                             f"unquoted as a number, here {value})")
        return value

    @field_validator("time_limit")
    @classmethod
    def _hh_mm_ss(cls, value: str) -> str:
        if not re.fullmatch(r"(\d+-)?\d{1,3}:[0-5]\d:[0-5]\d", value):
            raise ValueError(f"{value!r} is not [D-]HH:MM:SS (minutes and seconds under 60)")
        if not any(int(part) for part in re.split(r"[-:]", value)):
            raise ValueError(f"{value!r} leaves a trial no time")
        return value

    @model_validator(mode="after")
    def _consistent(self) -> "Resources":
        if self.gpus > 1 and self.gpus != int(self.gpus):
            raise ValueError(f"gpus: {self.gpus} — a fraction is for packing several trials on one GPU; "
                             "more than one GPU must be a whole number")
        if self.nodes > 1 and self.gpus != int(self.gpus):
            raise ValueError(f"gpus: fractional GPUs ({self.gpus}) cannot span {self.nodes} nodes")
        return self

    @property
    def workers_per_node(self) -> int:
        """Processes per node: one per whole GPU, else one."""
        return max(1, int(self.gpus))


class SweepSpec(Strict):
    name: str = Field(description="the sweep's name: its MLflow experiment and its output folder")
    base: dict[str, Any] = Field(default_factory=dict, description="the trial config every trial starts from")
    space: dict[str, Any] = Field(default_factory=dict, description="dotted key -> list (grid) or distribution")
    search: Literal["grid", "random"] = Field("grid", description="random: lists are sampled as choices too")
    num_samples: int = Field(1, ge=1, description="samples per grid point (random search: trials)")
    seed: int = Field(0, description="seed of the sampling of the space (not of training)")
    scheduler: SchedulerConfig = SchedulerConfig()
    resources: Resources = Resources()
    max_concurrent: int | None = Field(None, ge=1, description="trials running at once (default: as resources allow)")
    fuse: int = Field(1, ge=1, description="up to this many trials that differ only in seed, optim.lr or "
                      "optim.weight_decay train as one horizontally fused model (one process, the resources of "
                      "one trial); 1: off")
    backend: Literal["ray", "slurm"] = "ray"
    launcher: Literal["auto", "python", "torchrun", "deepspeed"] = Field(
        "auto", description="auto: python for one process, torchrun for several, deepspeed for dist.engine=deepspeed")
    cluster: str | None = Field(None, description="cluster profile: a name (local-slurm: the project's "
                                "cluster/local-slurm.yaml) or a YAML file's path, relative to the spec")
    output: str | None = Field(None, description="folder for checkpoints and logs; default runs/sweeps/<name>")
    tracking_uri: str | None = Field(None, description="MLflow store; default $MLFLOW_TRACKING_URI, else sqlite:///mlruns.db")

    @field_validator("name")
    @classmethod
    def _usable_name(cls, value: str) -> str:
        if not value.strip() or "/" in value or "\n" in value or "\0" in value or value in (".", ".."):
            raise ValueError(f"{value!r}: a sweep name must be non-empty, one line, without '/'")
        if value.startswith("-"):  # `orchestrate status -rf` reads it as an option
            raise ValueError(f"{value!r}: a sweep name cannot start with '-' (commands would read it as an option)")
        if len(value.encode()) > 200:  # it names folders: 255 bytes at most, with a suffix or two
            raise ValueError(f"{value[:40]!r}...: {len(value.encode())} bytes; a sweep name names folders, "
                             "keep it under 200")
        return value

    @field_validator("base")
    @classmethod
    def _no_keys_the_sweep_sets(cls, base: dict[str, Any]) -> dict[str, Any]:
        """Keys every trial of a sweep gets from the sweep: set in base they would be overwritten without a word."""
        for section, key, instead in SWEEP_SET_KEYS:
            if key in (base.get(section) or {}):
                raise ValueError(f"base.{section}.{key}: the sweep sets it for every trial; {instead}")
        return base

    @field_validator("backend", mode="before")
    @classmethod
    def _known_backend(cls, value):
        if value not in BACKENDS:
            raise ValueError(f"unknown backend {value!r}; valid: {', '.join(BACKENDS)}")
        return value

    @field_validator("space")
    @classmethod
    def _well_formed_space(cls, space: dict[str, Any]) -> dict[str, Any]:
        for key, domain in space.items():
            check_domain(key, domain)
        return space

    @model_validator(mode="after")
    def _backend_fits_resources(self) -> "SweepSpec":
        if self.resources.nodes > 1 and self.backend == "ray":
            raise ValueError("resources.nodes: multi-node trials run on the slurm backend; ray packs trials "
                             "onto single nodes")
        if self.fuse > 1:
            if self.scheduler.asha:
                raise ValueError("fuse: fused trials train and stop together; ASHA stops single trials (use one "
                                 "or the other)")
            if self.resources.workers_per_node > 1 or self.launcher not in ("auto", "python"):
                raise ValueError("fuse: a fused group trains in one process on one device (resources.gpus <= 1, "
                                 "launcher auto or python)")
        if self.scheduler.asha and self.search == "grid" and not self.space:
            raise ValueError("scheduler.asha: early stopping needs several trials (space is empty)")
        sampled = self.search == "random" or any(not isinstance(d, list) for d in self.space.values())
        if self.num_samples > 1 and not sampled:  # each repeat was the same trial: 4 trials, not 12, unannounced
            raise ValueError(f"num_samples: {self.num_samples} repeats of a grid with nothing sampled are one trial "
                             "each time (a trial runs once); for several seeds list them: space.seed: [0, 1, 2]")
        return self


def check_domain(key: str, domain: Any) -> None:
    where = f"space.{key}"
    if isinstance(domain, list):
        if not domain:
            raise ValueError(f"{where}: an empty grid makes no trials")
        seen = set()
        for value in domain:  # [0, 0] made half the trials asked for, unannounced (a trial runs once)
            text = json.dumps(value, sort_keys=True)
            if text in seen:
                raise ValueError(f"{where}: {value!r} is listed twice; a trial runs once (num_samples repeats "
                                 "sampled points, seeds are space.seed values)")
            seen.add(text)
        return
    if not isinstance(domain, dict) or len(domain) != 1:
        raise ValueError(f"{where}: expected a list (grid) or one of {{{': [...], '.join(DISTRIBUTIONS)}: [...]}}")
    (kind, args), = domain.items()
    if kind not in DISTRIBUTIONS:
        if key in TRIAL_SECTIONS:  # space: {optim: {lr: [...]}}, the nesting of base:
            raise ValueError(f"{where}: the space's keys are dotted config keys: write {key}.{kind}: [...] "
                             f"instead of nesting it under {key}:")
        raise ValueError(f"{where}: unknown distribution {kind!r}; valid: {', '.join(DISTRIBUTIONS)}")
    if kind == "choice":
        if not isinstance(args, list) or not args:
            raise ValueError(f"{where}.choice: needs a non-empty list")
        return
    if not (isinstance(args, list) and len(args) == 2 and all(isinstance(a, (int, float)) for a in args)):
        raise ValueError(f"{where}.{kind}: needs [low, high]")
    low, high = args
    if low >= high or (kind == "loguniform" and low <= 0):
        raise ValueError(f"{where}.{kind}: [{low}, {high}] is not a valid range"
                         + (" (loguniform needs 0 < low < high)" if kind == "loguniform" else ""))


TRIAL_SECTIONS = {"model", "data", "optim", "schedule", "dist"}  # top-level keys of a trial config, not of a spec


def load_spec(path: str | Path, overrides: dict[str, Any] | None = None,
              sets: list[str] | tuple[str, ...] = ()) -> tuple[SweepSpec, Path]:
    """Read and validate a sweep YAML; ``overrides`` are top-level fields from the command line (backend, ...),
    ``sets`` its ``--set KEY=VALUE`` edits (``base.schedule.total=200``, ``space.optim.lr=[0.1,0.05]``)."""
    path = Path(path)
    tree = read_yaml(path, SpecError, "sweep spec")
    if not isinstance(tree, dict):
        raise SpecError(f"{path}: the top level must be a mapping (name, base, space, ...)")
    if "name" not in tree and TRIAL_SECTIONS & tree.keys():
        raise SpecError(f"{path} is a trial config, not a sweep spec: train it with `orchestrate train {path}`, "
                        "or put it under base: in a sweep spec")
    tree.update({k: v for k, v in (overrides or {}).items() if v is not None})
    for text in sets:
        apply_set(tree, text)
    if isinstance(tree.get("seed"), list):
        raise SpecError(blame(path, sets, "seed: is the seed of the space's sampling, one integer; to train with "
                                          "several seeds, put them in the space: space: {seed: [0, 1, 2]}"))
    try:
        return SweepSpec.model_validate(tree), path
    except ValidationError as err:
        message = format_validation_error(err, SweepSpec)
        # a command-line option's value (--max-concurrent 0) is blamed on it, not on the file that says 2
        flag = next((k for k, v in (overrides or {}).items() if v is not None and message.startswith(f"{k}:")), None)
        if flag:
            raise SpecError(f"--{flag.replace('_', '-')} {overrides[flag]}: {message}") from None
        raise SpecError(blame(path, sets, message)) from None


def apply_set(tree: dict[str, Any], text: str) -> None:
    """One ``--set``: dotted keys into the spec, except under ``space:``, whose keys are dotted config keys."""
    try:
        key, value = parse_override(text)
        if key.startswith("space."):
            space = tree.setdefault("space", {})
            if not isinstance(space, dict):
                raise ConfigError("space: is not a mapping")
            space[key.removeprefix("space.")] = value
        else:
            set_dotted(tree, key, value)
    except (ConfigError, yaml.YAMLError) as err:
        said = first_line(err)
        raise SpecError(said if said.startswith(f"--set {text}: ") else f"--set {text}: {said}") from None


def load_cluster_profile(spec: SweepSpec, spec_path: Path) -> dict[str, Any]:
    """The cluster profile named by the spec (partition, account, ...), or {} when none is named."""
    if spec.cluster is None:
        return {}
    path = Path(spec.cluster)
    if "/" not in spec.cluster and path.suffix not in (".yaml", ".yml"):  # a name: a copied spec still finds it
        candidates = [Path.cwd() / "cluster" / f"{path}.yaml", PROJECT_ROOT / "cluster" / f"{path}.yaml"]
    else:
        candidates = [path] if path.is_absolute() else [spec_path.parent / path, Path.cwd() / path]
    candidates = list(dict.fromkeys(candidates))
    found = next((p for p in candidates if p.is_file()), None)
    if found is None:
        raise SpecError(f"{spec_path}: cluster: profile {spec.cluster!r} not found (looked in "
                        f"{', '.join(str(c) for c in candidates)}); a name is a file of the project's cluster/ "
                        "folder, a relative path is read from the spec's folder (--set cluster=null: a local Ray)")
    profile = read_yaml(found, SpecError) or {}
    if not isinstance(profile, dict):
        raise SpecError(f"{found}: a cluster profile must be a mapping")
    # checked whatever the backend: a typo would be ignored (the sweep quietly on a local Ray, or without the
    # partition), a wrong type a traceback at submission
    try:
        return ClusterProfile.model_validate({k: v or {} for k, v in profile.items()}).model_dump(exclude_unset=True)
    except ValidationError as err:
        raise SpecError(f"{found}: {format_validation_error(err, ClusterProfile)}") from None


PROJECT_ROOT = Path(__file__).resolve().parents[1]
SWEEP_SET_KEYS = (("tracking", "uri", "use tracking_uri: at the top of the spec, or --tracking-uri"),
                  ("tracking", "experiment", "the sweep's name is its MLflow experiment"),
                  ("checkpoint", "root", "checkpoints go under output: (or --output)"))
