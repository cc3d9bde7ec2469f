"""The typed config of one training trial. Defaults reproduce the paper's CIFAR-10 recipe (Sec. 4.2):
SGD momentum 0.9, weight decay 1e-4, batch 128, lr 0.1 divided by 10 at 32k and 48k iterations, stop at 64k.

Every section forbids unknown keys; errors name the dotted key. ``trial_key`` hashes the fields that change
results, so a sweep can tell finished trials from new ones on any backend.
"""
from __future__ import annotations

import functools
import hashlib
import json
import re
import typing
from pathlib import Path
from typing import Any, Literal, get_args, get_origin

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from .data.config import DataConfig

if typing.TYPE_CHECKING:  # torch and the models load when a config is validated: `orchestrate status` needs neither
    import torch


class ConfigError(ValueError):
    """A config that cannot run; the message is one line naming the key."""


def first_line(err: BaseException, limit: int = 300) -> str:
    """An error's first line, for a one-line message (an error without a message has no first line to index)."""
    text = str(err).strip()
    return text.splitlines()[0][:limit] if text else f"{type(err).__name__}, no message"


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ModelConfig(Section):
    """Keys left unset keep the registered model's defaults (e.g. preact_resnet164 is a bottleneck net)."""
    name: str = Field("resnet20", description="a registered model (orchestrate models)")
    depth: int | None = Field(None, description="CIFAR: 6n+2 (9n+2 with bottleneck); ImageNet: 18/34/50/101/152")
    shortcut: Literal["A", "B", "C"] | None = Field(None, description="paper Sec. 3.3 options")
    plain: bool | None = Field(None, description="no shortcuts: the paper's plain twin")
    unit: Literal["original", "bn_after_add", "relu_before_add", "relu_only_preact", "full_preact"] | None = Field(
        None, description="CIFAR family only: the residual unit (He et al. 2016b, Fig. 4); preact_* names: full_preact")
    bottleneck: bool | None = Field(None, description="CIFAR family only: 1x1-3x3-1x1 units (9n+2 depths)")
    zero_init_residual: bool = Field(False, description="off in the paper")

    def overrides(self) -> dict[str, Any]:
        keys = ("depth", "shortcut", "plain", "unit", "bottleneck")
        out = {k: getattr(self, k) for k in keys if getattr(self, k) is not None}
        if self.zero_init_residual:
            out["zero_init_residual"] = True
        return out


class WarmupConfig(Section):
    """ResNet-110 (Sec. 4.2): lr 0.01 until training error < 80%, then the schedule's lr."""
    kind: Literal["none", "constant", "linear"] = Field("none", description=(
        "constant: warmup.lr, then the schedule; linear: from warmup.lr up to optim.lr over length"))
    lr: float = Field(0.01, gt=0, description="constant warm-up lr; linear warm-up starts here")
    length: int = Field(0, ge=0, description="warm-up length in schedule units (0: only until_train_error ends it)")
    until_train_error: float | None = Field(None, gt=0, le=1, description=(
        "end warm-up once train error < this, judged at each logging step (tracking.log_every) on the train error "
        "since the previous one"))

    @model_validator(mode="after")
    def _has_an_end(self) -> "WarmupConfig":
        """Settings that silently did nothing (no length, no error target: no warm-up at all) or something else
        (a linear ramp with no length was a constant lr)."""
        if self.kind == "constant" and not self.length and self.until_train_error is None:
            raise ValueError("kind: constant warm-up needs a length or until_train_error to end it")
        if self.kind == "linear" and not self.length:
            raise ValueError("kind: linear warm-up ramps over its length: set length (until_train_error may end "
                             "it earlier)")
        return self


class ScheduleConfig(Section):
    unit: Literal["iterations", "epochs"] = Field("iterations", description=(
        "what total, milestones and warm-up length count"))
    total: int = Field(64000, ge=1, description="training length in `unit`")
    kind: Literal["step", "cosine", "constant"] = Field("step", description=(
        "step: lr x gamma at each milestone (the paper); cosine: down to 0 at total; constant: optim.lr throughout"))
    milestones: tuple[int, ...] = Field((32000, 48000),
                                        description="step schedule: lr *= gamma at these (counted in unit)")
    gamma: float = Field(0.1, gt=0, allow_inf_nan=False, description="step schedule: the lr factor at each milestone")
    warmup: WarmupConfig = WarmupConfig()

    @field_validator("milestones")
    @classmethod
    def _increasing(cls, milestones: tuple[int, ...]) -> tuple[int, ...]:
        if any(m < 1 for m in milestones) or list(milestones) != sorted(set(milestones)):
            raise ValueError(f"{list(milestones)} must be positive and increasing")
        return milestones


class OptimConfig(Section):
    lr: float = Field(0.1, gt=0, allow_inf_nan=False, description="peak lr for the global batch")
    momentum: float = Field(0.9, ge=0, lt=1, description="SGD momentum (paper: 0.9)")
    weight_decay: float = Field(1e-4, ge=0, description="L2 on every weight, as torch.optim.SGD (paper: 1e-4)")
    nesterov: bool = Field(False, description="Nesterov momentum (the paper: off)")
    grad_clip: float | None = Field(None, gt=0, description="clip the global grad norm (DeepSpeed: gradient_clipping)")


class DistConfig(Section):
    engine: Literal["ddp", "deepspeed"] = Field("ddp", description="ddp under torchrun, or deepspeed.initialize")
    zero_stage: int = Field(0, ge=0, le=3, description="DeepSpeed ZeRO stage (0: the only one that checkpoints)")

    @field_validator("zero_stage")
    @classmethod
    def _checkpointable(cls, stage: int) -> int:
        """ZeRO 1-3 partition the optimizer state across ranks, which a trial's single-file checkpoint does not
        gather: such a trial trained, then failed at its first checkpoint. The paper's models fit one GPU."""
        if stage:
            raise ValueError(f"ZeRO stage {stage} partitions the optimizer state, which the trial's checkpoints "
                             "(resume, preemption) do not save; only stage 0 runs")
        return stage


class CheckpointConfig(Section):
    root: str = Field("runs/checkpoints", description="checkpoints go to ROOT/<trial key>/")
    every: int = Field(1000, ge=1, description="iterations between checkpoints (and on SIGTERM/SIGUSR1)")
    keep: int = Field(2, ge=1, description="newest checkpoints kept; an older one is the fallback if the newest is corrupt")
    resume: bool = Field(True, description="continue from the newest checkpoint of the same trial; false: start "
                         "over (its checkpoints deleted, a new MLflow run; the old run stays, kind=superseded)")


class TrackingConfig(Section):
    enabled: bool = Field(True, description="false: no MLflow run is opened, nothing is logged")
    uri: str | None = Field(None, description="default: $MLFLOW_TRACKING_URI, else sqlite:///mlruns.db")
    experiment: str = Field("default", description="MLflow experiment (a sweep: its name)")
    run_name: str | None = Field(None, description="MLflow run name (default: the model and the trial key)")
    log_every: int = Field(100, ge=1, description="iterations between train loss/error points")
    tags: dict[str, str] = Field(default_factory=dict, description="extra run tags (sweep name, trial id, ...)")

    @field_validator("uri")
    @classmethod
    def _is_a_uri(cls, uri: str | None) -> str | None:
        return uri if uri is None else check_tracking_uri(uri)

    @field_validator("tags", mode="before")
    @classmethod
    def _values_as_text(cls, tags):
        """MLflow tags are text: `--set tracking.tags.seed=5` reads 5 as a number, which means "5" here."""
        if isinstance(tags, dict):
            return {k: v if isinstance(v, (str, dict, list)) else str(v) for k, v in tags.items()}
        return tags


# Stores MLflow's client takes; any other scheme (a typo: "sqlte") ends in a long MLflow traceback.
TRACKING_SCHEMES = ("sqlite", "http", "https", "postgresql", "mysql", "mssql", "file", "databricks")
WHAT_TO_WRITE = "sqlite:///mlruns.db is a local store (sqlite:////abs/path/mlruns.db), http://HOST:PORT a tracking server"


def check_tracking_uri(uri: str) -> str:
    """MLflow 3 refuses a bare path (its file store is retired), a typo'd scheme or a malformed SQLite URL with a
    long traceback; say what to write."""
    scheme = uri.partition(":")[0].split("+")[0]
    if uri.startswith("databricks"):
        return uri
    if scheme == "sqlite" and not uri.startswith("sqlite:///"):
        raise ValueError(f"tracking URI {uri!r}: a SQLite store is sqlite:/// and the file's path; {WHAT_TO_WRITE}")
    if "://" not in uri:
        store = uri if uri.endswith(".db") else "mlruns.db"
        raise ValueError(f"tracking URI {uri!r} has no scheme: sqlite:///{store} is a local store, "
                         "http://HOST:PORT a tracking server")
    if scheme not in TRACKING_SCHEMES:
        raise ValueError(f"tracking URI {uri!r}: unknown scheme {scheme!r}; {WHAT_TO_WRITE}")
    return uri


class EvalConfig(Section):
    every_epochs: int = Field(1, ge=1, description="val/test error every N epochs (and at the end)")
    batch_size: int = Field(1000, ge=1, description="evaluation batch per rank (no effect on the result)")


GRAPH_STEPS = ("graph", "compile_graph")  # the step modes that capture the whole step in one CUDA graph


class TrainConfig(Section):
    seed: int = Field(0, ge=0, description="seeds the weights and the data order (numpy wants it >= 0)")
    batch_size: int = Field(128, ge=1, description="global batch; each of W ranks takes batch_size / W")
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="auto: cuda when a GPU is visible")
    precision: Literal["auto", "fp32", "bf16", "fp16"] = Field("auto", description="auto: bf16 on CUDA, fp32 on CPU")
    step: Literal["auto", "eager", "compile", "graph", "compile_graph"] = Field(
        "auto", description="auto: graph on one CUDA GPU, else eager; compile_graph: torch.compile'd model, whole "
                            "step in one CUDA graph (fewer, fused kernels; compiles for minutes on deep nets)")
    channels_last: bool = Field(True, description="NHWC memory format on CUDA (faster convolutions with bf16)")
    model: ModelConfig = ModelConfig()
    data: DataConfig = DataConfig()
    optim: OptimConfig = OptimConfig()
    schedule: ScheduleConfig = ScheduleConfig()
    dist: DistConfig = DistConfig()
    checkpoint: CheckpointConfig = CheckpointConfig()
    tracking: TrackingConfig = TrackingConfig()
    eval: EvalConfig = EvalConfig()

    @model_validator(mode="after")
    def _model_builds(self) -> "TrainConfig":
        from .models import is_model, list_models
        if not is_model(self.model.name):
            raise ValueError(f"model.name: unknown model {self.model.name!r}; valid: {', '.join(list_models())}")
        try:
            meta_model(self.model)
        except ValueError as err:
            options = ("depth", "shortcut", "unit", "plain", "bottleneck", "zero_init_residual")
            if str(err).split(": ", 1)[0] in options:  # create_model named the option it has not
                raise ValueError(f"model.{err}") from None
            key = next((f"model.{k}" for k in options if k in str(err)), "model")
            raise ValueError(f"{key}: {err}") from None
        return self


@functools.lru_cache(maxsize=None)
def meta_model(model: ModelConfig) -> torch.nn.Module:
    """The model built on the meta device, once per architecture: validating it allocates nothing, and the dry
    run's estimates (multiply-adds, training memory) read the same instance. Shared: callers must leave it as they
    found it. Building per trial config instead cost a 30-trial dry run 60 builds (3.3 s)."""
    import torch
    from .models import create_model
    with torch.device("meta"):
        return create_model(model.name, **model.overrides())


def non_result_fields(warmup_ends_on_train_error: bool) -> dict[str, Any]:
    """Fields that do not change what a trial computes: left out of its key (re-running with another log interval
    or checkpoint folder finds the same trial), of its fusion key, and of the report's variants. A warm-up that
    ends on the train error ends at a logging step, on the window just logged: there log_every changes the result
    (10 instead of 2 kept a tiny run at the warm-up lr to its end)."""
    tracking = set(TrackingConfig.model_fields) - {"log_every"} if warmup_ends_on_train_error else True
    return {"checkpoint": True, "tracking": tracking, "eval": {"batch_size"},  # (True: keys as they always were)
            "data": {"num_workers", "cache_dir", "download"}}


def result_fields(cfg: TrainConfig) -> dict[str, Any]:
    """The config as far as it decides what the trial computes (its key, and what fused members share)."""
    return cfg.model_dump(mode="json", exclude=non_result_fields(cfg.schedule.warmup.until_train_error is not None))


def trial_key(cfg: TrainConfig) -> str:
    payload = result_fields(cfg)
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]


def set_dotted(tree: dict, dotted_key: str, value: Any) -> None:
    node = tree
    *parents, leaf = dotted_key.split(".")
    for part in parents:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"{dotted_key}: '{part}' is a value, not a section")
        node = child
    node[leaf] = value


def one_value_per_set(argv: list[str]) -> list[str]:
    """``--set a=1 b=2 spec.yaml`` as ``--set a=1 --set b=2 spec.yaml``, for a ``--set`` of one value each
    (action="append"): argparse's nargs="*" took the spec file for a value ("override 'spec.yaml' is not
    key=value", or "the following arguments are required: spec"). The first word after --set is always its value."""
    out, listing = [], False  # listing: inside the values of a --set
    for word in argv:
        if listing and out[-1] != "--set":
            listing = "=" in word and not word.startswith("-")  # a file or an option ends the list
            if listing:
                out.append("--set")
        out.append(word)
        listing = listing or word == "--set"
    return out


def parse_override(text: str) -> tuple[str, Any]:
    """``key=value`` with the value read as YAML (``optim.lr=0.05``, ``model.shortcut=B``)."""
    if "=" not in text or not text.split("=", 1)[0].strip():
        raise ConfigError(f"override {text!r} is not key=value")
    key, raw = text.split("=", 1)
    try:
        return key.strip(), load_yaml(raw)
    except yaml.YAMLError as err:
        what = getattr(err, "problem", None) or str(err).splitlines()[0]
        raise ConfigError(f"--set {text}: the value is not valid YAML ({what}); a list is [a, b], a text with YAML's "
                          f"own characters is quoted: {key}='\"...\"'") from None


def valid_keys_at(path: tuple, root: type[BaseModel] | None = None) -> list[str]:
    """The field names of the section at ``path`` (e.g. ("model",) -> name, depth, ...)."""
    section: type[BaseModel] = root or TrainConfig
    for part in path:
        annotation = section.model_fields[part].annotation
        # an optional section (`asha: AshaConfig | None`): the model inside the union
        annotation = next((a for a in typing.get_args(annotation) if isinstance(a, type) and issubclass(a, BaseModel)),
                          annotation)
        if not (isinstance(annotation, type) and issubclass(annotation, BaseModel)):
            return []
        section = annotation
    return list(section.model_fields)


def format_validation_error(err: ValidationError, root: type[BaseModel] | None = None) -> str:
    first = err.errors()[0]
    key = ".".join(str(p) for p in first["loc"])
    message = first["msg"].removeprefix("Value error, ")
    if first["type"] == "extra_forbidden":
        message = f"unknown key; valid keys here: {', '.join(valid_keys_at(first['loc'][:-1], root))}"
    elif first["type"] in ("tuple_type", "list_type") and isinstance(first.get("input"), str):
        message += f" (a list is written [a, b], e.g. [{first['input']}])"  # --set schedule.milestones=100,150
    field_prefix = re.match(r"^([a-z_]+): (.*)$", message, re.S)
    if key and field_prefix:  # a section's own check names its field: fold it into the dotted key
        key, message = f"{key}.{field_prefix.group(1)}", field_prefix.group(2)
    others = [".".join(str(p) for p in e["loc"]) or "(top level)" for e in err.errors()[1:]]
    more = f" (also: {', '.join(others[:5])}{', ...' if len(others) > 5 else ''})" if others else ""
    return f"{key}: {message}{more}" if key and not message.startswith(key) else f"{message}{more}"


class UniqueKeyLoader(yaml.SafeLoader):
    """PyYAML keeps the last of two equal keys: a second `optim:` section silently dropped the first's lr."""

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise yaml.constructor.ConstructorError(None, None, f"duplicate key {key!r}", key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep)


def load_yaml(text: str):
    return yaml.load(text, Loader=UniqueKeyLoader)


def read_yaml(path: Path, error: type[ValueError], what: str = "YAML file"):
    """A YAML file's content; a missing file, a folder or a syntax error is one line naming the file (and the
    line and column)."""
    if path.is_dir():
        raise error(f"{path}: is a folder, not a YAML file")
    if not path.is_file():
        raise error(f"{what} not found: {path}")
    try:
        tree = load_yaml(path.read_text())
        json.dumps(tree, default=str)  # an alias inside itself ("a: &x [*x]") loads, then breaks every copy
        return tree
    except UnicodeDecodeError as err:
        raise error(f"{path}: not a text file ({err.reason} at byte {err.start})") from None
    except ValueError as err:  # json's "Circular reference detected"
        raise error(f"{path}: not usable YAML ({err})") from None
    except (yaml.YAMLError, RecursionError) as err:
        mark = getattr(err, "problem_mark", None)
        where = f":{mark.line + 1}:{mark.column + 1}" if mark else ""
        what = getattr(err, "problem", None) or (str(err).splitlines() or [type(err).__name__])[0]
        raise error(f"{path}{where}: not valid YAML ({what})") from None


def check_model_name_agrees(tree: dict) -> None:
    """A name that says its depth (resnet56) or plainness (plain20), given another by the user: the net built
    followed the override while run, report and ensemble were labelled with the name. Checked on what the user
    wrote, not in TrainConfig: a resolved config always writes the name out (the default resnet20 too), so
    ``--set model.depth=56`` on the default name would be refused when a worker reads it back."""
    model = tree.get("model") if isinstance(tree.get("model"), dict) else {}
    name, depth, plain = model.get("name"), model.get("depth"), model.get("plain")
    from .models import is_model
    if not (isinstance(name, str) and is_model(name)):
        return  # an unknown name: validation says so, with the valid ones
    pinned = re.search(r"(\d+)$", name)
    if pinned and isinstance(depth, int) and depth != int(pinned.group(1)):
        raise ConfigError(f"config: model.depth: {depth} contradicts model.name {name} ({pinned.group(1)} layers): "
                          "name the model of that depth, or give any CIFAR depth to resnet_cifar or plain_cifar")
    if name.startswith("plain") and plain is False:
        raise ConfigError(f"config: model.plain: false contradicts model.name {name}, a plain net; name its ResNet "
                          f"twin ({name.replace('plain', 'resnet', 1)})")


def name_the_reshaped_default(tree: dict) -> None:
    """model.depth or model.plain without model.name re-shape the default resnet20: name the family builder that
    takes them (resnet_cifar, plain_cifar), or `--set model.depth=56` ran a run labelled resnet20."""
    model = tree.get("model")
    if isinstance(model, dict) and "name" not in model and {"depth", "plain"} & model.keys():
        model["name"] = "plain_cifar" if model.get("plain") is True else "resnet_cifar"


def build_config(tree: dict | None = None, overrides: list[str] | tuple[str, ...] = (),
                 check_names: bool = False) -> TrainConfig:
    """``check_names``: the tree is what a user wrote (a file, --set, a sweep's base and space), not a resolved
    config read back (see check_model_name_agrees)."""
    tree = json.loads(json.dumps(tree or {}))  # a deep copy we may write to
    for text in overrides:
        set_dotted(tree, *parse_override(text))
    if check_names:
        name_the_reshaped_default(tree)
        check_model_name_agrees(tree)
    try:
        return TrainConfig.model_validate(tree)
    except ValidationError as err:
        raise ConfigError(f"config: {format_validation_error(err)}") from None


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> TrainConfig:
    tree = {}
    if path is not None:
        path = Path(path)
        tree = read_yaml(path, ConfigError, "config file") or {}
        if not isinstance(tree, dict):
            raise ConfigError(f"{path}: the top level must be a mapping of sections")
        if {"space", "base"} & tree.keys() and "name" in tree:
            raise ConfigError(f"{path} is a sweep spec (name, base, space): run it with `orchestrate sweep {path}`")
    try:
        return build_config(tree, overrides, check_names=True)
    except ConfigError as err:
        if not str(err).startswith("config: "):
            raise
        raise ConfigError(blame(path or "config", overrides, str(err).removeprefix("config: "))) from None


def blame(source: str | Path, sets: list[str] | tuple[str, ...], message: str, key: str | None = None) -> str:
    """``message`` ("key: what is wrong") prefixed with the --set that wrote ``key`` (default: the message's),
    else with ``source`` (the YAML file): a typo on the command line must not send the user into the file."""
    key = key or message.split(": ", 1)[0]
    for text in reversed(sets):  # the last --set of a key is the one that counts
        written = text.split("=", 1)[0].strip()
        if key == written or key.startswith(written + "."):
            return f"--set {text}: {message}"
    return f"{source}: {message}"


def field_docs(model: type[BaseModel] = TrainConfig, prefix: str = "") -> list[tuple[str, str, str]]:
    """(dotted key, default, description) for every field: the `--help` text of `orchestrate train`."""
    rows = []
    for name, info in model.model_fields.items():
        key = f"{prefix}{name}"
        annotation = info.annotation
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            rows += field_docs(annotation, key + ".")
        else:
            choices = [c for c in _literal_choices(annotation) if c is not None]
            text = "; ".join(filter(None, [info.description, choices and f"one of: {', '.join(map(str, choices))}"]))
            rows.append((key, repr(info.get_default(call_default_factory=True)), text))
    return rows


def _literal_choices(annotation) -> tuple:
    """The values of a Literal[...] annotation (also inside Optional), else ()."""
    if get_origin(annotation) is Literal:
        return get_args(annotation)
    return tuple(c for arg in get_args(annotation) if get_origin(arg) is Literal for c in get_args(arg))
