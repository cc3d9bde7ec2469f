"""Atomic, checksummed training checkpoints: ``ckpt-<iteration>-<sha256 prefix>.pt`` in the trial's folder.

The checksum is in the file name, so one atomic rename publishes file and checksum together; a truncated or
corrupted newest file is detected on load and the previous one is used. Files hold only tensors and plain
Python values, so they load with ``weights_only=True``.
"""
from __future__ import annotations

import contextlib
import hashlib
import io
import logging
import os
import re
import socket
import time
from pathlib import Path
from typing import Any

import torch

from .config import first_line

log = logging.getLogger(__name__)
NAME = re.compile(r"^ckpt-(\d{9})-([0-9a-f]{16})\.pt$")


class CheckpointError(RuntimeError):
    pass


# The fence between two copies of one trial: one trial, one writer. SLURM requeues a job whose node stopped
# answering (slurmd dead) onto another node while the first copy may still run there; both would write the same
# checkpoints and MLflow run. Every copy claims the trial folder when it starts (the last claim wins: a copy starts
# only when the one before it is thought gone); a copy that finds someone else's claim stops, writing nothing more.
OWNER_FILE = "OWNER"


class Superseded(RuntimeError):
    """Another copy of this trial claimed it after this one; this copy must stop without writing anything."""


def owner(folder: Path) -> str | None:
    try:
        return (folder / OWNER_FILE).read_text()
    except FileNotFoundError:
        return None


def claim(folder: Path) -> str:
    """Make this process the trial's writer; returns its claim (host, pid, SLURM job and restart count)."""
    env = os.environ
    job = f" slurm job {env['SLURM_JOB_ID']} restart {env.get('SLURM_RESTART_COUNT', '0')}" if "SLURM_JOB_ID" in env else ""
    token = f"{socket.gethostname()} pid {os.getpid()}{job} at {time.time_ns()}"
    folder.mkdir(parents=True, exist_ok=True)
    tmp = folder / f".{OWNER_FILE}.{os.getpid()}.tmp"
    tmp.write_text(token)
    os.replace(tmp, folder / OWNER_FILE)
    return token


def check_owner(folder: Path, token: str) -> None:
    current = owner(folder)
    if current != token:
        raise Superseded(f"trial {folder.name} was claimed by another copy ({current}); this copy ({token}) stops")


def checkpoint_files(folder: Path) -> list[Path]:
    """Published checkpoints, newest first."""
    if not folder.is_dir():
        return []
    found = [p for p in folder.iterdir() if NAME.match(p.name)]
    return sorted(found, key=checkpoint_iteration, reverse=True)


def discard(folder: Path) -> None:
    """``checkpoint.resume: false``, a trial started over: its old checkpoints go. Left, the newest of them (the
    old training's last) outranked the new ones, which the pruning deleted as they were written, and a later
    resume went back to the old training."""
    for path in checkpoint_files(folder):
        path.unlink(missing_ok=True)


def checkpoint_iteration(path: Path) -> int:
    return int(NAME.match(path.name).group(1))


def save(folder: Path, iteration: int, state: dict[str, Any], keep: int) -> Path:
    buffer = io.BytesIO()
    torch.save(state, buffer)
    data = buffer.getvalue()
    digest = hashlib.sha256(data).hexdigest()[:16]
    folder.mkdir(parents=True, exist_ok=True)
    final = folder / f"ckpt-{iteration:09d}-{digest}.pt"
    tmp = folder / f".{final.name}.tmp"
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, final)
    except OSError as err:
        tmp.unlink(missing_ok=True)
        previous = checkpoint_files(folder)
        kept = f"; the previous checkpoint {previous[0].name} is intact" if previous else ""
        raise CheckpointError(f"cannot write checkpoint {final}: {err.strerror or err}{kept}") from err
    # An earlier file of the same iteration (the loop's, then the final one's) is superseded: kept, it pushed the
    # previous iteration's fallback out of `keep`, and which of the two was "newest" was left to the folder order.
    for same in checkpoint_files(folder):
        if same != final and checkpoint_iteration(same) == iteration:
            same.unlink(missing_ok=True)
    for old in checkpoint_files(folder)[keep:]:
        old.unlink(missing_ok=True)
    return final


def verify(path: Path) -> bool:
    match = NAME.match(path.name)
    try:
        return bool(match) and hashlib.sha256(path.read_bytes()).hexdigest()[:16] == match.group(2)
    except (FileNotFoundError, IsADirectoryError):  # gone: another rank set it aside as rejected
        return False


REQUIRED_KEYS = ("iteration", "step", "run_id", "trial_key")  # what every resume reads (train.trial_state)


def read(path: Path, map_location) -> dict | None:
    """The checkpoint's state, or None when it passes its checksum but is no checkpoint of ours (a file written
    by another version or by hand): rejected like a corrupt one, never a traceback in the middle of a resume."""
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as err:  # noqa: BLE001  UnpicklingError, RuntimeError, EOFError: all mean "not loadable"
        log.warning("checkpoint %s does not load (%s: %s)", path, type(err).__name__, first_line(err, 200))
        return None
    if not isinstance(state, dict) or not all(key in state for key in REQUIRED_KEYS):
        log.warning("checkpoint %s lacks the keys a resume needs (%s)", path, ", ".join(REQUIRED_KEYS))
        return None
    return state


def load_latest(folder: Path, map_location: str | torch.device = "cpu") -> tuple[dict | None, list[str]]:
    """The newest checkpoint that passes its checksum, and the names of newer ones that did not (events to log).

    A rejected file is renamed ``*.rejected``: kept for a post-mortem, no longer counted among the ``keep``
    newest, so the next save cannot delete the good fallback in its place. Checkpoints that all fail are an
    error, never a silent restart from scratch.
    """
    rejected = []
    for path in checkpoint_files(folder):
        state = read(path, map_location) if verify(path) else None
        if state is not None:
            return state, rejected
        log.warning("checkpoint %s is unusable (checksum, or contents); trying the previous one", path)
        with contextlib.suppress(FileNotFoundError):  # every rank of a DDP trial gets here; the first renames it
            path.rename(path.with_name(path.name + ".rejected"))
        rejected.append(path.name)
    if rejected:
        raise CheckpointError(f"no checkpoint in {folder} is usable ({', '.join(rejected)}, now *.rejected: "
                              "checksum or contents); set checkpoint.resume: false to start this trial over")
    return None, rejected
