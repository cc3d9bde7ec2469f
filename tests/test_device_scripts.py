"""The GPU session's scripts run on CPU too, so a GPU session does not find their bugs first."""
from __future__ import annotations

import json
import subprocess
import sys

from conftest import REPO

BENCH = REPO / "scripts" / "device" / "bench_train.py"


def bench(*args: str) -> list[dict]:
    out = subprocess.run([sys.executable, BENCH, "--device", "cpu", "--precision", "fp32", "--iters", "2",
                          "--warmup", "1", "--batch-size", "16", "--models", "resnet20", *args],
                         capture_output=True, text=True, timeout=300)
    return [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")]


def test_bench_train_times_a_fused_group_and_refuses_graph_on_cpu():
    eager, graph = bench("--steps", "eager,graph", "--fuse", "3")
    assert eager["fuse"] == 3 and eager["steps"] == 2 and eager["images_per_s"] > 0
    assert eager["images_per_s"] == round(2 * 16 * 3 / eager["seconds"], 1)  # all members' images count
    assert 0 < eager["est_mem_gb"] < 1
    assert "needs a CUDA GPU" in graph["error"]


def test_bench_train_packed_processes_add_up():
    (row,) = bench("--steps", "eager", "--procs", "2")
    assert row["bench"] == "train_step_packed" and row["procs_ok"] == 2 and row["images_per_s"] > 0
