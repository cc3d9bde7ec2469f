"""What `ensemble` and `report` read from MLflow: a sweep's experiment, its trial runs, their checkpoints.

The contract is the one `resnet_core.train` writes: one experiment per sweep, one run per trial tagged
``kind=trial`` (and ``sweep``), the flattened config as params, ``model.pt`` / ``config.yaml`` artifacts.
A trial counts as finished when its run is FINISHED and it was not stopped early by a scheduler (ASHA's stops
end KILLED, tagged ``early_stopped=true``; their weights are half-trained).
Errors that the user can fix are `UserError`s: one line, naming the run or listing the valid choices.
"""
from __future__ import annotations

import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from orchestrator.cli import UserError
from resnet_core.config import first_line

TRIAL_FILTER = "tags.kind = 'trial'"


class BrokenRun(UserError):
    """A run whose checkpoint or config cannot be used; the message names the run."""

    def __init__(self, run_id: str, reason: str):
        super().__init__(f"run {run_id}: {reason}")
        self.run_id, self.reason = run_id, reason


def open_client(uri: str | None):
    """A client on an existing store (``uri``, else $MLFLOW_TRACKING_URI, else sqlite:///mlruns.db)."""
    from resnet_core.tracking import mlflow_client, tracking_uri
    uri = tracking_uri(uri)
    check_store(uri)
    return mlflow_client(uri)


def check_store(uri: str) -> None:
    """A sqlite file that does not exist is a typo or the wrong folder: opening it would create an empty store
    and answer "no sweeps", so say so instead."""
    from resnet_core.tracking import check_store_usable, sqlite_path
    path = sqlite_path(uri)
    if path:
        if not path.exists():
            raise UserError(f"no MLflow store at {path.resolve()} (tracking URI {uri}); name the store the runs "
                            "went to with --tracking-uri or MLFLOW_TRACKING_URI")
        if path.is_file() and path.stat().st_size == 0:  # opening it would make it a store: a read must not write
            raise UserError(f"{path.resolve()} is an empty file, no MLflow store (tracking URI {uri}); name the "
                            "store the runs went to with --tracking-uri or MLFLOW_TRACKING_URI")
    check_store_usable(uri)


def add_store_arguments(p) -> None:
    """--tracking-uri and --sweep, the same for every command that reads a sweep."""
    p.add_argument("--tracking-uri", default=None,
                   help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI, else sqlite:///mlruns.db)")
    p.add_argument("--sweep", default=None,
                   help="the sweep's name (its MLflow experiment); may be left out when the store holds one sweep")


# -- experiments ------------------------------------------------------------------------------------------
def sweep_names(client) -> list[str]:
    """Experiments holding at least one trial run: the sweeps of this store."""
    names = []
    for experiment in client.search_experiments():
        if client.search_runs([experiment.experiment_id], TRIAL_FILTER, max_results=1):
            names.append(experiment.name)
    return sorted(names)


def sweep_experiment(client, name: str | None):
    """The experiment of sweep ``name``; without a name, the only sweep in the store (else an error)."""
    if name is not None:
        experiment = client.get_experiment_by_name(name)
        if experiment is None:
            raise UserError(f"no sweep {name!r} in {client.tracking_uri}; sweeps: {_listing(sweep_names(client))}")
        return experiment
    names = sweep_names(client)
    if not names:
        raise UserError(f"{client.tracking_uri} holds no sweep yet: run `orchestrate sweep SPEC` first")
    if len(names) != 1:
        raise UserError(f"{client.tracking_uri} holds {len(names)} sweeps ({_listing(names)}); choose one with --sweep")
    return client.get_experiment_by_name(names[0])


def _listing(names: list[str]) -> str:
    return ", ".join(names) if names else "none"


# -- trial runs -------------------------------------------------------------------------------------------
def trial_runs(client, experiment_id: str, order_by: list[str] | None = None) -> list:
    """Every trial run of the experiment, all pages (MLflow's own order unless ``order_by`` says)."""
    runs, token = [], None
    while True:
        page = client.search_runs([experiment_id], TRIAL_FILTER, max_results=1000, order_by=order_by,
                                  page_token=token)
        runs += list(page)
        token = page.token
        if not token:
            return runs


def is_finished(run) -> bool:
    return run.info.status == "FINISHED" and not stopped_early(run)


def stopped_early(run) -> bool:
    """Stopped by the sweep's scheduler (Ledger.mark_early_stopped): final, never resumed, half-trained."""
    return run.data.tags.get("early_stopped", "false").lower() == "true"


def finished_trials(client, experiment_id: str) -> list:
    return [run for run in trial_runs(client, experiment_id) if is_finished(run)]


def top_runs(client, experiment, metric: str, k: int) -> list:
    """The ``k`` finished trials with the lowest final ``metric`` (errors and losses: lower is better);
    ties are broken by run id so the choice is reproducible."""
    finished = finished_trials(client, experiment.experiment_id)
    ranked = sorted((r for r in finished if metric in r.data.metrics),
                    key=lambda r: (r.data.metrics[metric], r.info.run_id))
    if k < 1:
        raise UserError(f"--top {k}: must be at least 1")
    logged = sorted(set().union(*(r.data.metrics for r in finished)))
    no_val_split = metric.startswith("val_") and not any(m.startswith("val_") for m in logged)
    if finished and not ranked and not no_val_split:
        # a typo ("val_eror"): the val-split hint below would send the user the wrong way
        raise UserError(f"--metric {metric}: no finished trial of sweep {experiment.name!r} logged it; "
                        f"they logged {', '.join(m for m in logged if m.endswith(('_error', '_loss')))}")
    if k > len(ranked):
        without = len(finished) - len(ranked)
        note = f" ({without} more finished without a {metric} metric)" if without else ""
        hint = ("; its trials hold out no val split: set data.val_split (the paper's 5000) in the sweep, or rank by "
                "--metric test_error (chosen on the test set: an optimistic ensemble)"
                if metric.startswith("val_") and without else "")
        stopped = sum(stopped_early(r) for r in trial_runs(client, experiment.experiment_id))
        if stopped:  # ASHA's: the user sees the sweep's trials and wonders where they went
            note += f"; {stopped} stopped early by the scheduler are left out (half-trained)"
        raise UserError(f"--top {k}: sweep {experiment.name!r} has only {len(ranked)} finished trial runs "
                        f"with metric {metric}{note}{hint}" + (f"; try --top {len(ranked)}" if ranked else ""))
    return ranked[:k]


# -- what a run was -----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ModelInfo:
    """What a trial trained, read from its params: enough for tables without loading weights."""
    name: str
    depth: int | None
    plain: bool
    shortcut: str
    unit: str
    bottleneck: bool
    overrides: dict


def model_info(run) -> ModelInfo:
    """Depth and family from the params; a depth left at the registered default ("None") and plain-ness are read
    from the model itself, built on the meta device (nothing allocated)."""
    import torch
    from resnet_core.models import ResidualBlock, create_model
    params = run.data.params
    overrides = {key: _param_value(params.get(f"model.{key}", "None"))
                 for key in ("depth", "shortcut", "plain", "unit", "bottleneck")}
    overrides = {k: v for k, v in overrides.items() if v is not None}
    with torch.device("meta"):
        model = create_model(params["model.name"], **overrides)
    blocks = [m for m in model.modules() if isinstance(m, ResidualBlock)]
    plain = all(b.shortcut is None for b in blocks)
    return ModelInfo(name=params["model.name"], depth=model.depth, plain=plain,
                     shortcut="-" if plain else str(overrides.get("shortcut") or _shortcut_option(blocks)),
                     unit=model.unit, bottleneck=model.bottleneck,  # the model's: a name may imply them
                     overrides=overrides)


def _shortcut_option(blocks) -> str:
    """Paper Sec. 3.3, read back from the modules: A zero-pads, C projects in every block, B where shapes change."""
    from torch import nn
    from resnet_core.models import ZeroPadShortcut
    if any(isinstance(b.shortcut, ZeroPadShortcut) for b in blocks):
        return "A"
    return "C" if all(not isinstance(b.shortcut, nn.Identity) for b in blocks) else "B"


def _param_value(text: str) -> Any:
    """Params are stored as str(value): map "None"/"True"/"False"/digits back."""
    if text == "None":
        return None
    if text in ("True", "False"):
        return text == "True"
    return int(text) if text.lstrip("-").isdigit() else text


def family_of(info: ModelInfo) -> str:
    """'plain', or 'ResNet' plus whatever differs from the paper's CIFAR default (option A, original unit)."""
    if info.plain:
        return "plain"
    extras = [f"option {info.shortcut}"] if info.shortcut != "A" else []
    extras += [info.unit] if info.unit != "original" else []
    extras += ["bottleneck"] if info.bottleneck else []
    return "ResNet" + (f" ({', '.join(extras)})" if extras else "")


def run_label(run) -> str:
    """What the sweep set for this trial ("model.depth=20 optim.lr=0.05"), else the run's name."""
    tags = run.data.tags
    return tags.get("trial_overrides") or tags.get("mlflow.runName") or run.info.run_id[:8]


def metric_history(client, run_id: str, key: str) -> list[tuple[int, float]]:
    """(step, value) points of one metric, ordered by step (the last value of a step wins: a resumed trial may
    have re-logged it)."""
    points = {m.step: m.value for m in sorted(client.get_metric_history(run_id, key), key=lambda m: m.timestamp)}
    return sorted(points.items())


# -- artifacts ----------------------------------------------------------------------------------------------
def download(client, run_id: str, name: str, folder: Path) -> Path:
    """One artifact of a run into ``folder``; a missing artifact is a `BrokenRun`."""
    import os
    import mlflow.artifacts
    # One tqdm bar per small file buries the table; a user who wants them sets the variable to true.
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    try:
        return Path(mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path=name, dst_path=str(folder),
                                                        tracking_uri=client.tracking_uri))
    except Exception as err:  # MlflowException, OSError: the store says why in many shapes
        moved = moved_artifact(client, run_id, name)
        if moved:
            folder.mkdir(parents=True, exist_ok=True)
            return Path(shutil.copy2(moved, folder / moved.name))
        raise BrokenRun(run_id, f"cannot fetch artifact {name} ({type(err).__name__}: {first_line(err)})") from None


def moved_artifact(client, run_id: str, name: str) -> Path | None:
    """The artifact in the ``<store>-artifacts/`` folder beside an sqlite store that was moved or copied with it:
    MLflow keeps each run's absolute artifact path, which then points where the store used to be."""
    from resnet_core.tracking import artifact_location
    root = artifact_location(client.tracking_uri)
    candidate = Path(root) / run_id / "artifacts" / name if root else None
    return candidate if candidate and candidate.is_file() else None


def load_config(client, run_id: str, folder: Path | None = None):
    """The resolved trial config (`config.yaml`) as a `TrainConfig`."""
    import yaml
    from resnet_core.config import build_config
    with tempfile.TemporaryDirectory() as tmp:
        path = download(client, run_id, "config.yaml", Path(folder or tmp))
        try:
            return build_config(yaml.safe_load(path.read_text()))
        except Exception as err:
            raise BrokenRun(run_id, f"config.yaml is not a valid trial config ({first_line(err)})") from None


def load_model(client, run_id: str, device="cpu"):
    """The trial's final weights (`model.pt`, read with ``weights_only=True``) in a fresh model, in eval mode."""
    import torch
    from resnet_core.models import create_model
    with tempfile.TemporaryDirectory() as tmp:
        path = download(client, run_id, "model.pt", Path(tmp))
        try:
            saved = torch.load(path, map_location="cpu", weights_only=True)
            model = create_model(saved["model_name"], num_classes=saved["num_classes"], **saved["model_overrides"])
            model.load_state_dict(saved["state_dict"])
        except Exception as err:  # truncated zip, pickle refused, wrong keys/shapes: all mean "corrupt"
            raise BrokenRun(run_id, f"model.pt is corrupt ({type(err).__name__}: {first_line(err)})") from None
    return model.to(device).eval()
