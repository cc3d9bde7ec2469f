"""cluster/local-slurm/{up,down}: a real two-node SLURM cluster with accounting on 127.0.0.1 (no mocks).

Most tests use the session cluster (fixture `slurm_cluster`, tests/slurm_cluster.py). Stopping and starting from
scratch, a state folder with spaces and fake GPUs are tested on a second cluster in tmp_path on other ports, so the
session cluster other test files share is never taken down here.
"""
from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path

import pytest

from slurm_cluster import DAEMONS, DOWN, UP, SlurmCluster, missing_binaries

pytestmark = [pytest.mark.slurm, pytest.mark.timeout(240)]


def _read_lines(path: Path) -> list[str]:
    return path.read_text().splitlines() if path.exists() else []


def _wait_for(predicate, timeout: float, what: str, poll: float = 0.2):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        value = predicate()
        if value:
            return value
        time.sleep(poll)
    raise TimeoutError(f"timed out after {timeout:.0f} s waiting for {what}")


def _dead(pid: int) -> bool:
    """Gone, or a zombie waiting to be reaped (it runs nothing)."""
    try:
        return "\nState:\tZ" in Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return True


# ---- the session cluster -------------------------------------------------------------------------------------------

def test_both_nodes_idle(slurm_cluster):
    def idle():
        nodes = slurm_cluster.nodes()
        return nodes if set(nodes.values()) == {"idle"} else None

    assert _wait_for(idle, 30, "both nodes idle") == {"n1": "idle", "n2": "idle"}
    cpus = slurm_cluster.run("sinfo", "-h", "-N", "-p", "debug", "-o", "%N %c").stdout.split()
    assert cpus == ["n1", "2", "n2", "2"]
    assert all(slurm_cluster.pids().values()), slurm_cluster.pids()


def test_sbatch_job_completes_and_is_in_sacct(slurm_cluster, tmp_path):
    out = tmp_path / "out.txt"
    job = slurm_cluster.sbatch(f"#!/bin/bash\necho ran on $SLURMD_NODENAME job $SLURM_JOB_ID > '{out}'\n",
                               "-J", "accounting-check", "-o", str(tmp_path / "slurm-%j.out"), cwd=tmp_path)
    assert slurm_cluster.wait(job, timeout=60) == "COMPLETED"
    assert out.read_text().split()[-1] == job
    rows = slurm_cluster.sacct(job)
    assert rows[0]["JobID"] == job and rows[0]["State"] == "COMPLETED" and rows[0]["ExitCode"] == "0:0"
    assert rows[0]["JobName"] == "accounting-check" and rows[0]["Partition"] == "debug"
    assert rows[0]["Account"] == "local"
    assert rows[0]["NodeList"] in ("n1", "n2")
    assert f"{job}.batch" in [r["JobID"] for r in rows]


def test_failing_job_is_failed_in_sacct(slurm_cluster, tmp_path):
    job = slurm_cluster.sbatch("#!/bin/bash\nexit 3\n", "-o", str(tmp_path / "slurm-%j.out"), cwd=tmp_path)
    assert slurm_cluster.wait(job, timeout=60) == "FAILED"
    assert slurm_cluster.sacct(job)[0]["ExitCode"] == "3:0"


def test_two_node_job_runs_on_n1_and_n2(slurm_cluster, tmp_path):
    script = ("#!/bin/bash\n"
              "srun bash -c 'echo $SLURMD_NODENAME $SLURM_PROCID $SLURM_NTASKS $(hostname -s)'\n")
    out = tmp_path / "two-nodes.out"
    job = slurm_cluster.sbatch(script, "-N", "2", "--ntasks-per-node=1", "-o", str(out), cwd=tmp_path)
    assert slurm_cluster.wait(job, timeout=90) == "COMPLETED", out.read_text() if out.exists() else ""
    lines = sorted(_read_lines(out))
    assert [line.split()[:3] for line in lines] == [["n1", "0", "2"], ["n2", "1", "2"]], lines
    rows = slurm_cluster.sacct(job)
    assert rows[0]["NNodes"] == "2" and rows[0]["NodeList"] == "n[1-2]"
    step = [r for r in rows if r["JobID"] == f"{job}.0"]
    assert step and step[0]["State"] == "COMPLETED" and step[0]["NNodes"] == "2"


def test_scontrol_requeue_runs_the_job_again(slurm_cluster, tmp_path):
    starts = tmp_path / "starts.txt"
    script = f"#!/bin/bash\necho \"start ${{SLURM_RESTART_COUNT:-0}} $SLURMD_NODENAME\" >> '{starts}'\nsleep 300\n"
    job = slurm_cluster.sbatch(script, "--requeue", "-o", str(tmp_path / "slurm-%j.out"), cwd=tmp_path)
    try:
        _wait_for(lambda: len(_read_lines(starts)) == 1, 60, "the first start")
        assert slurm_cluster.state(job) == "RUNNING"
        t0 = time.monotonic()
        slurm_cluster.requeue(job)
        _wait_for(lambda: len(_read_lines(starts)) >= 2, 60, "the job to start again after requeue")
        restart_s = time.monotonic() - t0
        lines = _read_lines(starts)
        assert len(lines) == 2, lines
        assert lines[0].split()[1] == "0" and lines[1].split()[1] == "1", lines
        assert slurm_cluster.state(job) == "RUNNING"
        assert restart_s < 30, f"requeued job took {restart_s:.1f} s to restart"
        # accounting keeps the first run as REQUEUED next to the running one
        # (accounting lags the controller by a few seconds)
        def two_runs():
            runs = slurm_cluster.sacct(job, duplicates=True, steps=False)
            return [r["State"] for r in runs] == ["REQUEUED", "RUNNING"]

        _wait_for(two_runs, 20, "sacct to list a REQUEUED and a RUNNING run")
    finally:
        slurm_cluster.run("scancel", job, check=False)
    assert slurm_cluster.wait(job, timeout=60) == "CANCELLED"


def test_up_twice_is_idempotent(slurm_cluster):
    before = slurm_cluster.pids()
    assert all(before.values())
    t0 = time.monotonic()
    proc = slurm_cluster.up()
    elapsed = time.monotonic() - t0
    assert "already running" in proc.stderr
    assert proc.stdout.strip().startswith("export SLURM_CONF=")
    assert elapsed < 5, f"second up took {elapsed:.1f} s"
    assert slurm_cluster.pids() == before
    assert set(slurm_cluster.nodes().values()) <= {"idle", "mix", "alloc"}


def test_up_restarts_a_killed_slurmd(slurm_cluster):
    old = slurm_cluster.pid("slurmd-n2")
    assert old
    os.kill(old, 15)
    _wait_for(lambda: slurm_cluster.pid("slurmd-n2") is None, 15, "slurmd-n2 to stop")
    slurm_cluster.up()
    new = slurm_cluster.pid("slurmd-n2")
    assert new and new != old
    assert all(slurm_cluster.pids().values())
    assert _wait_for(lambda: slurm_cluster.nodes().get("n2") == "idle", 30, "n2 idle again")


# ---- a second cluster: fresh start, spaces in the path, fake GPUs, down ----------------------------------------------

OTHER_PORTS = {"SLURM_LOCAL_MYSQL_PORT": "3407", "SLURM_LOCAL_CTLD_PORT": "6917", "SLURM_LOCAL_DBD_PORT": "6919",
               "SLURM_LOCAL_N1_PORT": "17101", "SLURM_LOCAL_N2_PORT": "17102"}


@pytest.fixture(scope="module")
def spaced_cluster(tmp_path_factory):
    if missing_binaries() or os.geteuid() != 0:
        pytest.skip("SLURM not installed or not root")
    state = tmp_path_factory.mktemp("local slurm") / "state with spaces 'and quotes'"
    old = {k: os.environ.get(k) for k in OTHER_PORTS}
    os.environ.update(OTHER_PORTS)
    try:
        cluster = SlurmCluster.start(state, "--gres=1")
        yield cluster
    finally:
        subprocess.run([str(DOWN), str(state), "--purge"], capture_output=True, timeout=120)
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def test_fresh_up_in_a_folder_with_spaces(spaced_cluster, tmp_path):
    c = spaced_cluster
    assert " " in str(c.state_dir) and c.started_here
    assert c.up_seconds < 60, f"fresh up took {c.up_seconds:.1f} s"
    assert (c.state_dir / "env.sh").exists() and c.conf.exists()
    assert c.nodes() == {"n1": "idle", "n2": "idle"}
    assert "SlurmctldPort=6917" in c.conf.read_text()
    out = tmp_path / "gpu.out"
    job = c.sbatch("#!/bin/bash\necho \"$SLURMD_NODENAME CUDA=$CUDA_VISIBLE_DEVICES\"\n", "--gres=gpu:1",
                   "-o", str(out), cwd=tmp_path)
    assert c.wait(job, timeout=60) == "COMPLETED"
    assert out.read_text().split()[1] == "CUDA=0"
    assert c.sacct(job)[0]["State"] == "COMPLETED"
    gres = c.run("sinfo", "-h", "-N", "-p", "debug", "-o", "%N %G").stdout.split()
    assert gres == ["n1", "gpu:1", "n2", "gpu:1"]


def test_down_leaves_no_daemon_and_up_again_keeps_accounting(spaced_cluster, tmp_path):
    c = spaced_cluster
    pids = c.pids()
    assert all(pids.values()), pids
    # a job running at `down`: its processes must not survive either
    job_pid = tmp_path / "job.pid"
    job = c.sbatch(f"#!/bin/bash\necho $$ > '{job_pid}'\nsleep 300\n", "-o", str(tmp_path / "slurm-%j.out"),
                   cwd=tmp_path)
    _wait_for(lambda: job_pid.exists() and job_pid.read_text().strip(), 60, "the job to start")
    worker = int(job_pid.read_text())
    assert not _dead(worker)

    t0 = time.monotonic()
    proc = c.down()
    down_s = time.monotonic() - t0
    assert "stopped" in proc.stderr
    for name, pid in pids.items():
        assert _dead(pid), f"{name} (pid {pid}) still running after down"
    assert _dead(worker), "the job's process survived down"
    assert c.pids() == {d: None for d in DAEMONS}
    assert not (c.state_dir / "run" / "munge.socket.2").exists()
    assert down_s < 30, f"down took {down_s:.1f} s"
    # a second down is a no-op
    assert "nothing was running" in c.down().stderr

    # up again on the same state: same database, so the cancelled job is still in sacct
    again = SlurmCluster.start(c.state_dir)
    assert again.started_here and again.nodes() == {"n1": "idle", "n2": "idle"}
    assert again.up_seconds < 30, f"up on an existing state took {again.up_seconds:.1f} s"
    assert again.sacct(job, steps=False)[0]["State"].startswith("CANCELLED")


def test_up_refuses_bad_options(tmp_path):
    proc = subprocess.run([str(UP), str(tmp_path / "x"), "--bogus"], capture_output=True, text=True, timeout=30)
    assert proc.returncode == 2 and "unknown option --bogus" in proc.stderr
    proc = subprocess.run([str(UP), str(tmp_path / "x"), "--gres=lots"], capture_output=True, text=True, timeout=30)
    assert proc.returncode == 2
