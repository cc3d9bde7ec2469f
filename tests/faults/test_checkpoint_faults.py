"""Faults in the checkpoint folder, end to end through resnet_core.train.train:
a truncated or corrupted newest checkpoint (detected by its checksum, the previous one used, the event a run tag),
and a full disk (a small tmpfs as root: the trial fails naming the path, the previous checkpoint intact)."""
from __future__ import annotations

import os
import signal
import subprocess
import uuid

import pytest
import torch

from resnet_core import checkpoint
from resnet_core.config import build_config, trial_key
from resnet_core.train import Interrupted, train

from faultlib import BIN, runs_of, steps_of, tiny_config, worker_env, write_config

TOTAL = 40  # 16 steps an epoch; checkpoints every 10 iterations, the newest 2 kept


def stop_after_epoch(epoch: int):
    """A report hook that sends this process SIGTERM after ``epoch``: the trainer checkpoints and stops."""
    def report(metrics):
        if metrics["epoch"] == epoch:
            os.kill(os.getpid(), signal.SIGTERM)
    return report


def truncate(path):
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def flip_a_byte(path):
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


@pytest.mark.timeout(180)
def test_a_corrupt_checkpoint_another_rank_set_aside_first_is_passed_over(tmp_path, monkeypatch):
    """Every rank of a DDP trial runs load_latest on the same folder: the rank that came second found the corrupt
    file already renamed *.rejected and died on FileNotFoundError, failing the trial (the other rank's rename is
    played here, between this rank's listing and its checks)."""
    state = {"iteration": 5, "step": {}, "run_id": "r", "trial_key": "k"}
    good = checkpoint.save(tmp_path, 5, state, keep=3)
    corrupt = checkpoint.save(tmp_path, 10, {**state, "iteration": 10}, keep=3)
    corrupt.write_bytes(b"torn")
    real_verify = checkpoint.verify

    def other_rank_first(path):
        if path == corrupt and path.exists():
            path.rename(path.with_name(path.name + ".rejected"))
        return real_verify(path)

    monkeypatch.setattr(checkpoint, "verify", other_rank_first)
    loaded, rejected = checkpoint.load_latest(tmp_path)
    assert loaded["iteration"] == 5 and rejected == [corrupt.name] and good.exists()


def test_corrupt_checkpoints_are_rejected_and_the_newest_good_one_used(tmp_path, monkeypatch):
    uri = f"sqlite:///{tmp_path}/mlruns.db"
    cfg = tiny_config(tmp_path, uri, total=TOTAL, checkpoint={"keep": 3})
    folder = tmp_path / "ckpt" / trial_key(build_config(cfg))
    with pytest.raises(Interrupted):
        train(cfg, report=stop_after_epoch(2))  # stops at iteration 32 (epoch 2 evaluated), after checkpoints 20, 30
    newest, second, good = checkpoint.checkpoint_files(folder)
    assert [int(p.name[5:14]) for p in (newest, second, good)] == [32, 30, 20]
    truncate(newest)  # a copy cut short (a node died while the file was copied to another filesystem)
    flip_a_byte(second)  # same length, one bit wrong: only the checksum can tell

    restored = []  # what the worker's resume actually got back (observed, not replaced)
    real_load_latest = checkpoint.load_latest
    def observed_load_latest(*args, **kwargs):
        state, rejected = real_load_latest(*args, **kwargs)
        restored.append((state and state["iteration"], list(rejected)))
        return state, rejected
    monkeypatch.setattr(checkpoint, "load_latest", observed_load_latest)
    result = train(cfg)

    assert result["status"] == "FINISHED" and result["iteration"] == TOTAL
    assert restored == [(20, [newest.name, second.name])]  # both corrupt ones named, the good one used
    (run,) = runs_of(uri)
    assert run.data.tags["checkpoint_rejected"] == f"{newest.name},{second.name}"
    assert run.info.status == "FINISHED"
    assert steps_of(uri, run.info.run_id, "train_loss") == list(range(5, TOTAL + 1, 5))  # no gap, none twice
    assert checkpoint.verify(checkpoint.checkpoint_files(folder)[0])  # the new newest is good


@pytest.fixture
def small_tmpfs(tmp_path):
    """A tmpfs of 1.5 checkpoints of ResNet-8: the first checkpoint fits, the second does not."""
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    mount = tmp_path / "small"
    mount.mkdir()
    size_kib = 1100  # a ResNet-8 checkpoint with SGD momentum is ~700 KiB
    result = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size_kib}k", "tmpfs", str(mount)],
                            capture_output=True, text=True)
    if result.returncode:
        pytest.skip(f"cannot mount a tmpfs here: {result.stderr.strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", str(mount)], check=True)


@pytest.mark.timeout(120)
def test_full_disk_fails_the_trial_naming_the_path_and_keeps_the_previous_checkpoint(tmp_path, small_tmpfs):
    uri = f"sqlite:///{tmp_path}/mlruns.db"
    cfg = tiny_config(tmp_path, uri, total=TOTAL, checkpoint={"root": str(small_tmpfs)})
    folder = small_tmpfs / trial_key(build_config(cfg))
    worker = subprocess.run([BIN / "orchestrate", "train", write_config(tmp_path, cfg)], cwd=tmp_path,
                            env=worker_env(tmp_path), capture_output=True, text=True, timeout=100)

    assert worker.returncode == 1
    last_line = worker.stderr.strip().splitlines()[-1]
    assert last_line.startswith("orchestrate train: error: cannot write checkpoint") and "Traceback" not in worker.stderr
    assert f"cannot write checkpoint {folder}/ckpt-000000020-" in last_line, worker.stderr[-2000:]
    assert "No space left on device" in last_line
    files = checkpoint.checkpoint_files(folder)
    assert [p.name[:14] for p in files] == ["ckpt-000000010"]  # the previous one, and only it
    assert f"the previous checkpoint {files[0].name} is intact" in last_line
    assert checkpoint.verify(files[0])
    assert torch.load(files[0], weights_only=True)["iteration"] == 10
    assert [p.name for p in folder.iterdir() if p.name.endswith(".tmp")] == []  # no half-written file left
    (run,) = runs_of(uri)
    assert run.info.status == "FAILED" and "No space left on device" in run.data.tags["status_reason"]
    assert steps_of(uri, run.info.run_id, "train_loss") == [5, 10, 15, 20]  # logged before the failure


class ShellOnUnpickle:
    """A checkpoint payload that runs a shell command when unpickled by a full (unsafe) pickle load."""
    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.timeout(120)
def test_malicious_pickle_in_a_checkpoint_is_refused_by_weights_only_load(tmp_path):
    uri = f"sqlite:///{tmp_path}/mlruns.db"
    cfg = tiny_config(tmp_path, uri, total=TOTAL)
    folder = tmp_path / "ckpt" / trial_key(build_config(cfg))
    marker = tmp_path / f"pwned-{uuid.uuid4().hex}"
    # A well-formed name and a matching checksum: only the loader itself stands between the file and a shell.
    evil = checkpoint.save(folder, 30, {"iteration": 30, "payload": ShellOnUnpickle(marker)}, keep=2)
    assert checkpoint.verify(evil)

    with pytest.raises(checkpoint.CheckpointError, match="no checkpoint in .* is usable"):
        train(cfg)  # weights_only refuses it: rejected like a corrupt file, and as the only one, no silent restart
    assert not marker.exists()  # the payload never ran
    assert runs_of(uri) == []  # refused before a run was started

    kept = evil.with_name(evil.name + ".rejected")  # set aside for a post-mortem
    torch.load(kept, weights_only=False)  # control: the payload is live under an unsafe load
    assert marker.exists()
