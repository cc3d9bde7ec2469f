"""Fault: the MLflow tracking server (PostgreSQL behind it) is restarted while a trial trains. The trial must
finish, and every metric point must be in the store exactly once, including those logged while it was down."""
from __future__ import annotations

import subprocess
import time

import pytest
import torch

from faultlib import BIN, history_of, running_server, runs_of, steps_of, tiny_config, worker_env, write_config

TOTAL, LOG_EVERY = 100, 5


@pytest.mark.timeout(240)
def test_trial_survives_a_server_restart_without_losing_a_point(tmp_path):
    with running_server("postgres") as server:
        cfg = tiny_config(tmp_path, server.uri, total=TOTAL, eval={"every_epochs": 100})
        worker = subprocess.Popen([BIN / "orchestrate", "train", write_config(tmp_path, cfg)], cwd=tmp_path,
                                  env=worker_env(tmp_path), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                  text=True)
        try:
            run_id = wait_for_steps(server.uri, worker, at_least=20)
            down = time.time() * 1000
            server.restart()  # stop (SIGTERM to its process group), start, wait for /health: ~9 s down
            up = time.time() * 1000
            alive_after_restart = worker.poll() is None
            output, _ = worker.communicate(timeout=180)
        finally:
            if worker.poll() is None:
                worker.kill()
        assert worker.returncode == 0, output[-3000:]
        assert alive_after_restart, "the trial ended before the server came back: the restart was not mid-trial"

        (run,) = runs_of(server.uri)
        assert run.info.run_id == run_id and run.info.status == "FINISHED"
        expected = list(range(LOG_EVERY, TOTAL + 1, LOG_EVERY))
        for key in ("train_loss", "train_error", "lr", "images_per_s"):
            assert steps_of(server.uri, run_id, key) == expected, key  # none lost, none twice
        points = history_of(server.uri, run_id, "train_loss")
        logged_while_down = [m.step for m in points if down <= m.timestamp <= up]
        assert logged_while_down, "no point was logged during the outage: the fault did not hit the client"
        assert run.data.tags["status_reason"] == "finished"
        # The final weights went up through the server's artifact proxy and load with weights_only=True.
        from mlflow import MlflowClient
        local = MlflowClient(server.uri).download_artifacts(run_id, "model.pt", str(tmp_path))
        state = torch.load(local, weights_only=True)
        assert state["model_name"] == "resnet_cifar" and state["state_dict"]


def wait_for_steps(uri: str, worker: subprocess.Popen, at_least: int, timeout: float = 120) -> str:
    """The trial's run id once the store holds train_loss at step >= at_least (training is under way)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert worker.poll() is None, worker.communicate()[0][-3000:]
        runs = runs_of(uri)
        if runs and max(steps_of(uri, runs[0].info.run_id, "train_loss") or [0]) >= at_least:
            return runs[0].info.run_id
        time.sleep(0.5)
    raise AssertionError(f"no train_loss at step {at_least} within {timeout} s")
