"""A tiny finished sweep in a real MLflow store, as `orchestrate sweep` leaves it (one experiment, one run per
trial, tags sweep/kind/trial_key, artifacts config.yaml + model.pt + metrics.csv), for the ensemble, report and
ui tests.

Six real trials of `resnet_core.train.train` (ResNet-8/14 and plain-8/14, two seeds at depth 8) on 256 seeded
16x16 synthetic images (a quarter of CIFAR's pixels: 4x less compute), plus two runs no consumer may pick: a
FAILED one and an early-stopped one, both with the best val_error of all. Built once per pytest session (a
module-level cache: every test file that imports the fixture shares it; the first pays ~15-30 s on 2 cores).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import pytest

SWEEP = "smoke"
# (model name, depth, seed); plain_cifar is the paper's plain twin (Sec. 4.2, Fig. 6 left)
TRIALS = [("resnet_cifar", 8, 0), ("resnet_cifar", 8, 1), ("plain_cifar", 8, 0), ("plain_cifar", 8, 1),
          ("resnet_cifar", 14, 0), ("plain_cifar", 14, 0)]


@dataclass
class SmokeSweep:
    root: Path
    uri: str
    experiment_id: str
    results: list[dict] = field(default_factory=list)  # train()'s return value per finished trial
    failed_run: str = ""
    early_stopped_run: str = ""

    @property
    def finished(self) -> list[str]:
        return [r["run_id"] for r in self.results]


def trial_config(root: Path, uri: str, model: str, depth: int, seed: int) -> dict:
    """~30 iterations of batch 32 with a 64-image val split; the per-epoch test/val points make Fig. 6 curves."""
    return {"model": {"name": model, "depth": depth}, "seed": seed, "batch_size": 32,
            "data": {"path": "synthetic", "augment": False, "loader": "gpu", "val_split": 64,
                     "synthetic": {"train_size": 256, "test_size": 128, "image_size": 16}},
            "schedule": {"total": 30, "milestones": [20]},
            "eval": {"batch_size": 64},
            "checkpoint": {"root": str(root / "ckpt"), "every": 1000},
            "tracking": {"uri": uri, "experiment": SWEEP, "log_every": 3,
                         "tags": {"sweep": SWEEP, "kind": "trial"}}}


def build_smoke_sweep(root: Path) -> SmokeSweep:
    from mlflow import MlflowClient
    from resnet_core.tracking import get_or_create_experiment
    from resnet_core.train import train
    uri = f"sqlite:///{root}/mlruns.db"
    client = MlflowClient(uri)
    experiment_id = get_or_create_experiment(client, SWEEP)  # artifacts beside the store, in root
    sweep = SmokeSweep(root, uri, experiment_id)
    for model, depth, seed in TRIALS:
        result = train(trial_config(root, uri, model, depth, seed))
        assert result["status"] == "FINISHED", result
        sweep.results.append(result)
    sweep.failed_run = fake_run(client, experiment_id, "FAILED", {})
    sweep.early_stopped_run = fake_run(client, experiment_id, "FINISHED", {"early_stopped": "true"})
    return sweep


def fake_run(client, experiment_id: str, status: str, tags: dict[str, str]) -> str:
    """A trial run without a checkpoint and with the best val_error: selection must never pick it."""
    run = client.create_run(experiment_id, run_name=f"fake-{status.lower()}",
                            tags={"sweep": SWEEP, "kind": "trial", "trial_key": f"fake{status}", **tags})
    client.log_param(run.info.run_id, "model.name", "resnet_cifar")
    client.log_param(run.info.run_id, "model.depth", "8")
    for key in ("val_error", "best_val_error", "test_error"):
        client.log_metric(run.info.run_id, key, 0.0)
    client.set_terminated(run.info.run_id, status)
    return run.info.run_id


_CACHE: dict[Path, SmokeSweep] = {}


@pytest.fixture(scope="session")
def smoke_sweep(tmp_path_factory) -> SmokeSweep:
    base = tmp_path_factory.getbasetemp()
    if base not in _CACHE:
        _CACHE[base] = build_smoke_sweep(tmp_path_factory.mktemp("smoke sweep"))  # a space in the path, on purpose
    return _CACHE[base]
