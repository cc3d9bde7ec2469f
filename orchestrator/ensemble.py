"""Ensembles of a sweep's best trials: what combining trained ResNets is worth.

The paper's ILSVRC 2015 entry combined six models of different depth (3.57% top-5 test error against 4.49% for
the best single ResNet-152, Sec. 4.1, Table 5). Here the members are the K finished trials with the lowest
selection metric (`orchestrator.runs.top_runs`), each evaluated with the project's own loaders on one split, no
augmentation (the paper's single-view test, Sec. 4.2), at the precision its worker evaluated it (bf16 autocast on a
GPU by default: its errors are the logged ones). Three ways to combine their softmax outputs:

- ``mean``: the plain average of the members' class probabilities.
- ``weighted``: a weighted average, member weight proportional to its accuracy on the val split.
- ``greedy``: ensemble selection of Caruana et al. (ICML 2004, "Ensemble selection from libraries of models"):
  start from an empty bag; in each round add, *with replacement*, the candidate whose addition gives the lowest
  val error of the bag's mean probabilities (ties: lower val NLL, then the better-ranked candidate); after all
  rounds keep the bag prefix with the lowest val error (the earliest one on ties). A member's weight is its
  multiplicity over the bag size, so a strong model can count twice and a useless one not at all.

Predictions (logits) are cached per (run id, split): a run's weights never change once it is FINISHED, so a
second evaluation, another method or another K costs no forward pass.
"""
from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from orchestrator.cli import UserError
from orchestrator.runs import BrokenRun, family_of, load_config, load_model, model_info, run_label, top_runs

METHODS = ("mean", "weighted", "greedy")
# The data params that decide which images a split holds: members must agree on all of them.
DATA_KEYS = ("data.path", "data.val_split", "data.subset", "data.test_subset")


# -- combining probabilities (pure numpy, checked exactly by the unit tests) ------------------------------
def softmax(logits: np.ndarray) -> np.ndarray:
    shifted = logits.astype(np.float64) - logits.max(axis=-1, keepdims=True)
    exp = np.exp(shifted)
    return exp / exp.sum(axis=-1, keepdims=True)


def combine(probs: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """Weighted average of members' probabilities: probs [M, N, C], weights [M] summing to 1 -> [N, C]."""
    return np.tensordot(np.asarray(weights, dtype=np.float64), probs, axes=1)


def error_rate(probs: np.ndarray, labels: np.ndarray) -> float:
    return float(np.mean(probs.argmax(axis=-1) != labels))


def top5_error(probs: np.ndarray, labels: np.ndarray) -> float | None:
    """The paper's ImageNet metric, for more than 10 classes (as the worker logs test_top5_error); else None."""
    if probs.shape[-1] <= 10:
        return None
    top5 = np.argpartition(-probs, 4, axis=-1)[:, :5]
    return float(np.mean((top5 != labels[:, None]).all(axis=1)))


def nll(probs: np.ndarray, labels: np.ndarray) -> float:
    picked = probs[np.arange(len(labels)), labels]
    return float(-np.mean(np.log(np.clip(picked, 1e-12, None))))


def mean_weights(count: int) -> np.ndarray:
    return np.full(count, 1.0 / count)


def accuracy_weights(val_probs: np.ndarray, val_labels: np.ndarray) -> np.ndarray:
    """Weights proportional to each member's val accuracy (all-wrong members get 0)."""
    accuracy = np.array([1.0 - error_rate(p, val_labels) for p in val_probs])
    if accuracy.sum() == 0:
        raise UserError("--method weighted: every member has 0% val accuracy; use --method mean")
    return accuracy / accuracy.sum()


def greedy_weights(val_probs: np.ndarray, val_labels: np.ndarray, rounds: int) -> tuple[np.ndarray, list[int]]:
    """Caruana et al. (2004) forward selection with replacement; returns (weights [M], chosen bag in order)."""
    bag: list[int] = []
    total = np.zeros_like(val_probs[0])
    best_size, best_error = 0, np.inf
    for _ in range(rounds):
        scores = [(error_rate((total + p) / (len(bag) + 1), val_labels),
                   nll((total + p) / (len(bag) + 1), val_labels), i) for i, p in enumerate(val_probs)]
        error, _, chosen = min(scores)
        bag.append(chosen)
        total += val_probs[chosen]
        if error < best_error:  # strict: on ties the smaller bag wins
            best_size, best_error = len(bag), error
    bag = bag[:best_size]
    weights = np.bincount(bag, minlength=len(val_probs)) / len(bag)
    return weights, bag


# -- members' predictions ---------------------------------------------------------------------------------
class PredictionCache:
    """``FOLDER/<run id>-<split>.npz`` holding float32 logits and int64 labels, in the split's eval order."""

    def __init__(self, folder: Path):
        self.folder = Path(folder)

    def path(self, run_id: str, split: str) -> Path:
        return self.folder / f"{run_id}-{split}.npz"

    def get(self, run_id: str, split: str) -> tuple[np.ndarray, np.ndarray] | None:
        path = self.path(run_id, split)
        if not path.is_file():
            return None
        try:
            with np.load(path) as saved:
                return saved["logits"], saved["labels"]
        except (OSError, ValueError, KeyError, EOFError):  # a torn or empty file: recompute it
            return None

    def put(self, run_id: str, split: str, logits: np.ndarray, labels: np.ndarray) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        tmp = self.path(run_id, split).with_suffix(f".tmp{os.getpid()}.npz")
        np.savez(tmp, logits=logits.astype(np.float32), labels=labels.astype(np.int64))
        os.replace(tmp, self.path(run_id, split))  # atomic: readers see the old file or the whole new one


def predict(model, loader) -> tuple[np.ndarray, np.ndarray]:
    """Logits and labels over a whole eval split (the loader yields it in order, unaugmented)."""
    import torch
    logits, labels = [], []
    with torch.inference_mode():
        for images, target in loader.iterate(0):
            logits.append(model(images).float().cpu())
            labels.append(target.cpu())
    return torch.cat(logits).numpy(), torch.cat(labels).numpy()


def member_predictions(client, run_id: str, split: str, cache: PredictionCache, device,
                       batch_size: int) -> tuple[np.ndarray, np.ndarray]:
    """Cached logits of one run on one split; computed with the run's own data config on a miss."""
    cached = cache.get(run_id, split)
    if cached is not None:
        return cached
    from resnet_core.data import build_loader
    from resnet_core.steps import autocast, resolve_precision
    cfg = load_config(client, run_id)
    if split == "val" and not cfg.data.val_split:
        raise UserError(f"run {run_id} has no val split (data.val_split = 0): measure on --split test, and with "
                        "--method mean (greedy and weighted ensembles choose on the val split)")
    model = load_model(client, run_id, device)
    loader = build_loader(cfg.data.model_copy(update={"augment": False}), split, batch_size, device)
    with autocast(resolve_precision(cfg, device), device):  # as the worker evaluated it: its logged errors
        logits, labels = predict(model, loader)
    cache.put(run_id, split, logits, labels)
    return logits, labels


# -- one ensemble, end to end -------------------------------------------------------------------------------
@dataclass
class Member:
    run_id: str
    label: str  # what the sweep set for this trial
    model: str  # family and depth: "ResNet-20", "plain-56", "ResNet (option B)-32"
    seed: str
    selection_metric: float
    error: float = float("nan")
    weight: float = 0.0
    top5_error: float | None = None


@dataclass
class EnsembleResult:
    method: str
    split: str
    metric: str
    members: list[Member]
    error: float
    loss: float
    skipped: list[str] = field(default_factory=list)  # "run id: reason" of members left out by --skip-broken
    bag: list[str] = field(default_factory=list)  # greedy: the run ids in the order they were added
    top5_error: float | None = None  # more than 10 classes only

    @property
    def best_member_error(self) -> float:
        """The lowest error on the measured split over every candidate, as an oracle would pick it: the gain is
        measured against the hardest single model to beat, not the one chosen on val."""
        return min(m.error for m in self.members)

    @property
    def best_member_top5_error(self) -> float | None:
        return None if self.top5_error is None else min(m.top5_error for m in self.members)

    @property
    def gain(self) -> float:
        """Error points the ensemble saves over its best single member (positive: the ensemble is better)."""
        return self.best_member_error - self.error

    def as_dict(self) -> dict:
        return {**asdict(self), "best_member_error": self.best_member_error, "gain": self.gain,
                "best_member_top5_error": self.best_member_top5_error}


def build_ensemble(client, experiment, *, top: int, metric: str = "val_error", split: str = "test",
                   method: str = "mean", cache_dir: Path, skip_broken: bool = False, batch_size: int = 500,
                   device, rounds: int | None = None, say: Callable[[str], None] = print) -> EnsembleResult:
    """Select the top runs, predict with each (cached), combine; nothing is logged here."""
    if method not in METHODS:
        raise UserError(f"--method {method!r}: valid methods: {', '.join(METHODS)}")
    runs = top_runs(client, experiment, metric, top)
    check_same_data(runs)
    cache = PredictionCache(cache_dir)
    splits = [split] if method == "mean" else sorted({split, "val"})
    members, predictions, skipped = [], {s: [] for s in splits}, []
    for run in runs:
        try:
            outputs = {s: member_predictions(client, run.info.run_id, s, cache, device, batch_size) for s in splits}
        except BrokenRun as err:
            if not skip_broken:
                raise UserError(f"{err} (--skip-broken leaves it out of the ensemble)") from None
            say(f"leaving out {err}")
            skipped.append(f"{err.run_id}: {err.reason}")
            continue
        members.append(describe(run, metric))
        for s in splits:
            predictions[s].append(outputs[s])
    if not members:
        raise UserError(f"no usable member among the top {top} runs: every checkpoint is broken")
    return combine_members(members, predictions, split, method, metric, skipped, rounds)


def combine_members(members: list[Member], predictions: dict, split: str, method: str, metric: str,
                    skipped: list[str], rounds: int | None) -> EnsembleResult:
    probs, labels = stack(predictions[split], members)
    for member, p in zip(members, probs):
        member.error, member.top5_error = error_rate(p, labels), top5_error(p, labels)
    bag: list[int] = []
    if method == "mean":
        weights = mean_weights(len(members))
    else:
        val_probs, val_labels = stack(predictions["val"], members)
        if method == "weighted":
            weights = accuracy_weights(val_probs, val_labels)
        else:
            weights, bag = greedy_weights(val_probs, val_labels, rounds or 2 * len(members))
    for member, w in zip(members, weights):
        member.weight = float(w)
    ensemble = combine(probs, weights)
    return EnsembleResult(method, split, metric, members, error_rate(ensemble, labels), nll(ensemble, labels),
                          skipped, [members[i].run_id for i in bag], top5_error(ensemble, labels))


def stack(outputs: list[tuple[np.ndarray, np.ndarray]], members: list[Member]) -> tuple[np.ndarray, np.ndarray]:
    """[M, N, C] probabilities and the shared labels; members that saw other images are an error."""
    labels = outputs[0][1]
    for (logits, other), member in zip(outputs, members):
        if other.shape != labels.shape or not np.array_equal(other, labels):
            raise UserError(f"run {member.run_id} was evaluated on other images than run {members[0].run_id} "
                            f"(labels differ); members must share the data split")
    return np.stack([softmax(logits) for logits, _ in outputs]), labels


def check_same_data(runs: list) -> None:
    """Members of one ensemble must see the same images: same data path and split sizes (and synthetic seed)."""
    reference = runs[0].data.params
    keys = DATA_KEYS + tuple(k for k in reference if k.startswith("data.synthetic."))
    for run in runs[1:]:
        for key in keys:
            if run.data.params.get(key) != reference.get(key):
                raise UserError(f"runs {runs[0].info.run_id} and {run.info.run_id} differ in {key} "
                                f"({reference.get(key)!r} vs {run.data.params.get(key)!r}); an ensemble's "
                                f"members must share the data path and split")


def describe(run, metric: str) -> Member:
    info = model_info(run)
    return Member(run.info.run_id, run_label(run), f"{family_of(info)}-{info.depth}",
                  run.data.params.get("seed", "?"), run.data.metrics[metric])


# -- the MLflow record ----------------------------------------------------------------------------------------
def selection_caveat(metric: str, split: str, method: str) -> str | None:
    """Why the measured error is optimistic, when members (or weights) are chosen on the split measured."""
    if metric.startswith("test_") and split == "test":
        return (f"--metric {metric}: members are chosen on the test set the ensemble is measured on, so its test "
                "error is optimistic; rank by val_error (set data.val_split) for a fair one")
    if split == "val" and (metric.startswith("val_") or method != "mean"):
        chosen = "members and weights are" if method != "mean" else "members are"
        return (f"--split val: {chosen} chosen on the val split the ensemble is measured on, so its val error and "
                "gain are optimistic; measure on --split test for a fair one")
    return None


def log_ensemble(client, experiment, result: EnsembleResult, caveat: str | None = None) -> str:
    """An MLflow run tagged kind=ensemble in the sweep's experiment: members as params, errors as metrics, and the
    caveat of an optimistic selection as a tag (a reader of the run sees it, not only the console)."""
    import json
    import tempfile
    import time
    from mlflow.entities import Metric
    from resnet_core.tracking import log_params
    top = len(result.members) + len(result.skipped)
    run = client.create_run(experiment.experiment_id, run_name=f"ensemble-{result.method}-top{top}-{result.split}",
                            tags={"kind": "ensemble", "sweep": experiment.name,
                                  **({"caveat": caveat} if caveat else {})})
    params = {"method": result.method, "split": result.split, "metric": result.metric, "top": str(top),
              "members": ",".join(m.run_id for m in result.members),
              "skipped": ",".join(s.split(":")[0] for s in result.skipped) or "none"}
    params.update({f"member_{i}": m.run_id for i, m in enumerate(result.members, 1)})
    now = int(time.time() * 1000)
    metrics = {"ensemble_error": result.error, "ensemble_loss": result.loss,
               "best_member_error": result.best_member_error, "gain": result.gain}
    for i, m in enumerate(result.members, 1):
        metrics.update({f"member_{i}_error": m.error, f"member_{i}_weight": m.weight})
    if result.top5_error is not None:
        metrics.update({"ensemble_top5_error": result.top5_error,
                        "best_member_top5_error": result.best_member_top5_error,
                        **{f"member_{i}_top5_error": m.top5_error for i, m in enumerate(result.members, 1)}})
    log_params(client, run.info.run_id, params)
    client.log_batch(run.info.run_id, metrics=[Metric(k, float(v), now, 0) for k, v in metrics.items()])
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "ensemble.json"
        path.write_text(json.dumps(result.as_dict(), indent=2))
        client.log_artifact(run.info.run_id, str(path))
    client.set_terminated(run.info.run_id, "FINISHED")
    return run.info.run_id

