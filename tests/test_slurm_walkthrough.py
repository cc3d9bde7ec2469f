"""What a user walkthrough of `orchestrate sweep --backend slurm` found, on the real local two-node SLURM cluster
(tests/slurm_cluster.py): a re-run while the jobs still run, sbatch refusing the jobs (with ASHA too), a job stopped
by a signal, a failed job's reason, the job log, time limits that cannot work, why a trial's job waits, and jobs
that end on a cluster without accounting.
"""
from __future__ import annotations

import re
import subprocess
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml

from orchestrator.backends.slurm import SlurmBackend
from orchestrator.spec import SpecError, load_spec
from orchestrator.sweep import prepare
from test_sweep_slurm import (LOCAL, SMOKE, cancel_first_job, first_job_id, iter_until, one_long_trial, orchestrate,
                              runs, spec_file, start_until_epoch_2)


def profile_file(tmp_path: Path, **slurm) -> str:
    """cluster/local-slurm.yaml with changed `slurm:` keys."""
    tree = yaml.safe_load(LOCAL.read_text())
    tree["slurm"].update(slurm)
    path = tmp_path / "profile.yaml"
    path.write_text(yaml.safe_dump(tree))
    return str(path)


def error_lines(out: str) -> list[str]:
    return [line for line in out.splitlines() if "error:" in line]


def test_a_rerun_while_the_earlier_jobs_still_run_or_wait_is_refused(slurm_cluster, tmp_path):
    """The first orchestrator killed with -9: its array task 0 runs on, task 1 waits (max_concurrent 1). A re-run
    used to submit a second copy of both trials."""
    base = {**yaml.safe_load(SMOKE.read_text())["base"], "schedule": {"total": 600, "milestones": [500]},
            "tracking": {"log_every": 3}}
    spec = spec_file(tmp_path, space={"optim.lr": [0.1, 0.05]}, max_concurrent=1, base=base)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    proc, _, _ = start_until_epoch_2(slurm_cluster, tmp_path, spec, uri)
    job_id = first_job_id(tmp_path / "out")
    try:
        proc.kill()
        proc.wait()
        rc, out = orchestrate(slurm_cluster, tmp_path, str(spec), "--tracking-uri", uri, "--output", "out")
        assert rc == 2, out
        line, = error_lines(out)
        assert f"SLURM jobs {job_id}_0, {job_id}_1" in line and "scancel" in line, out
        assert len(list((tmp_path / "out" / "slurm").iterdir())) == 1  # nothing submitted
        assert slurm_cluster.state(f"{job_id}_0") == "RUNNING"
        assert len(runs(uri, "smoke")) == 1
    finally:
        slurm_cluster.run("scancel", job_id, check=False)


def test_sbatch_refusing_the_jobs_is_one_line(slurm_cluster, tmp_path):
    spec = spec_file(tmp_path, cluster=profile_file(tmp_path, partition="nonexistent"))
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    rc, out = orchestrate(slurm_cluster, tmp_path, str(spec), "--tracking-uri", uri, "--output", "out")
    assert rc == 2 and "Traceback" not in out, out
    line, = error_lines(out)
    assert "sbatch refused the jobs: Invalid partition name specified" in line and "profile.yaml" in line, out


@pytest.mark.parametrize("signal", ["TERM", "USR1"])
def test_a_job_stopped_by_a_signal_is_an_interrupted_trial(slurm_cluster, tmp_path, signal):
    """`scancel --signal=TERM|USR1`: the worker checkpoints and exits 3 (the job is FAILED in sacct)."""
    spec, uri = one_long_trial(tmp_path, 600)
    proc, _, first = start_until_epoch_2(slurm_cluster, tmp_path, spec, uri)
    try:
        slurm_cluster.run("scancel", f"--signal={signal}", first_job_id(tmp_path / "out"))
        out, _ = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 1 and "1 interrupted" in out, out
    assert "Error stream" not in out and "run the same command again to resume them" in out, out
    run, = runs(uri, "smoke")
    assert run.info.run_id == first["run_id"] and run.info.status == "KILLED"


def test_a_failed_jobs_reason_has_its_final_state_and_the_workers_error(slurm_cluster, tmp_path):
    """The worker fails at once (RANK=abc); the batch script then lingers (an EXIT trap), so the job still reads
    RUNNING when its error result is there."""
    profile = profile_file(tmp_path, setup=["export RANK=abc WORLD_SIZE=1", "trap 'sleep 4' EXIT"])
    spec = spec_file(tmp_path, space={"optim.lr": [0.1]}, cluster=profile)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    rc, out = orchestrate(slurm_cluster, tmp_path, str(spec), "--tracking-uri", uri, "--output", "out")
    assert rc == 1, out
    assert re.search(r"job \d+ \(FAILED\): ValueError: invalid literal for int\(\) with base 10: 'abc'", out), out
    assert "RUNNING" not in out


def test_the_job_log_shows_training_progress(slurm_cluster, tmp_path):
    spec = spec_file(tmp_path, space={"optim.lr": [0.1]})
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    rc, out = orchestrate(slurm_cluster, tmp_path, str(spec), "--tracking-uri", uri, "--output", "out")
    assert rc == 0, out
    log = "".join(p.read_text() for p in (tmp_path / "out" / "slurm").glob("*/*_log.*"))
    assert "epoch 1  iteration 6/30" in log and "epoch 4  iteration 24/30" in log, log


@pytest.mark.parametrize("yaml_value, sets", [("12:00:00", ()), ('"01:00:00"', ("resources.time_limit=90",))])
def test_a_time_limit_yaml_reads_as_a_number_is_refused_in_one_line(tmp_path, yaml_value, sets):
    tree = yaml.safe_load(SMOKE.read_text())
    tree.pop("resources")
    text = yaml.safe_dump(tree) + f"resources: {{cpus: 1, time_limit: {yaml_value}}}\n"
    path = tmp_path / "spec.yaml"
    path.write_text(text)
    with pytest.raises(SpecError, match=r'resources.time_limit: give it quoted, e.g. "12:00:00"') as err:
        load_spec(path, sets=list(sets))
    assert "\n" not in str(err.value)


def test_a_time_limit_within_the_signal_delay_is_refused(tmp_path):
    """signal_delay_s 60 (the local profile): submitit's USR2 would come before training starts."""
    def backend(time_limit: str) -> SlurmBackend:
        spec = spec_file(tmp_path, resources={"cpus": 1, "time_limit": time_limit})
        ctx, _ = prepare(str(spec), backend="slurm", output=str(tmp_path / "out"), tracking_uri="sqlite:////no/m.db")
        return SlurmBackend(ctx)
    with pytest.raises(SpecError, match=r"resources.time_limit: 00:02:00 .* slurm.signal_delay_s") as err:
        backend("00:02:00")
    assert "\n" not in str(err.value)
    backend("00:03:00")


def test_jobs_that_die_without_a_result_are_reported_together(slurm_cluster, tmp_path):
    """A python on the nodes without our packages: every job dies at import and leaves no result file. The wait
    for a late result file (a slow shared filesystem) used to run 15 s for one job after another."""
    spec = spec_file(tmp_path, cluster=profile_file(tmp_path, python="/usr/bin/python3"))
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    rc, out = orchestrate(slurm_cluster, tmp_path, str(spec), "--tracking-uri", uri, "--output", "out")
    assert rc == 1 and "4 failed" in out, out
    times = [sum(int(x) * 60 ** (2 - i) for i, x in enumerate(line[1:9].split(":")))
             for line in out.splitlines() if re.match(r"\[\d\d:\d\d:\d\d\] failed ", line)]
    assert len(times) == 4 and max(times) - min(times) < 15, out  # was >= 45 s: 15 s a job, in turn


def test_a_waiting_trial_shows_its_job_and_squeues_reason(slurm_cluster, tmp_path):
    """max_concurrent 1: array task 1 waits behind task 0, and squeue says why (JobArrayTaskLimit). The view said
    nothing of a waiting trial: not its job, not why it does not start."""
    spec = spec_file(tmp_path, space={"optim.lr": [0.1, 0.05]}, max_concurrent=1)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    rc, out = orchestrate(slurm_cluster, tmp_path, str(spec), "--tracking-uri", uri, "--output", "out")
    assert rc == 0, out
    job_id = first_job_id(tmp_path / "out")
    assert re.search(rf"\] pending +\S+ \[\w{{8}}\] queued: job {job_id}_1 \(JobArrayTaskLimit\)$", out, re.M), out


def no_accounting_env(cluster, tmp_path: Path) -> dict[str, str]:
    """The cluster seen through a slurm.conf without accounting (AccountingStorageType=accounting_storage/none):
    the real sacct then refuses every query, exactly as on a cluster without slurmdbd, while squeue, sbatch and
    srun talk to the same controller. Only this test's clients read the copy; the shared cluster is unchanged."""
    etc = tmp_path / "etc"
    etc.mkdir()
    for name in ("slurm.conf", "gres.conf"):
        if (cluster.conf.parent / name).exists():
            (etc / name).write_text((cluster.conf.parent / name).read_text())
    lines = [line for line in (etc / "slurm.conf").read_text().splitlines() if not line.startswith("AccountingStorage")]
    (etc / "slurm.conf").write_text("\n".join([*lines, "AccountingStorageType=accounting_storage/none", ""]))
    return dict(cluster.env, SLURM_CONF=str(etc / "slurm.conf"))


def test_without_accounting_a_job_that_died_is_reported_failed(slurm_cluster, tmp_path):
    """Without accounting sacct fails on every call, so submitit's watcher reads UNKNOWN for ever: a job that died
    without a result (here: a python on the nodes without our packages) was waited for for ever."""
    env = no_accounting_env(slurm_cluster, tmp_path)
    said = subprocess.run(["sacct", "-j", "1"], env=env, capture_output=True, text=True)
    assert said.returncode == 1 and "Slurm accounting storage is disabled" in said.stderr  # as on such a cluster
    spec = spec_file(tmp_path, space={"optim.lr": [0.1]}, cluster=profile_file(tmp_path, python="/usr/bin/python3"))
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    proc = orchestrate(SimpleNamespace(env=env), tmp_path, str(spec), "--tracking-uri", uri, "--output", "out",
                       wait=False)
    try:
        out, _ = proc.communicate(timeout=150)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, _ = proc.communicate()
        pytest.fail(f"the sweep still waits on its dead job after 150 s:\n{out}")
    assert proc.returncode == 1 and "1 failed" in out, out
    line, = [line for line in out.splitlines() if re.match(r"\[\d\d:\d\d:\d\d\] failed ", line)]
    assert "sacct: Slurm accounting storage is disabled" in line and "Exited with exit code 1" in line, out


def test_without_accounting_a_cancelled_job_is_an_interrupted_trial(slurm_cluster, tmp_path):
    """scancel: with no sacct to say CANCELLED, slurmstepd's line in the job's error stream says it."""
    cluster = SimpleNamespace(env=no_accounting_env(slurm_cluster, tmp_path))
    spec, uri = one_long_trial(tmp_path, 600)
    proc, _, _ = start_until_epoch_2(cluster, tmp_path, spec, uri)
    out = cancel_first_job(slurm_cluster, tmp_path, proc)
    assert proc.returncode == 1 and "1 interrupted" in out, out
    assert re.search(r"job \d+ CANCELLED: its checkpoint is kept", out), out


def test_sbatch_refusing_an_asha_sweeps_jobs_is_one_line(slurm_cluster, tmp_path):
    """With ASHA each Ray trial submits its own job (relay_trial): a refusal was a traceback per trial."""
    spec = spec_file(tmp_path, name="smoke-asha", space={"optim.lr": [0.1, 0.02]},
                     scheduler={"asha": {"metric": "val_loss", "grace_period": 1, "reduction_factor": 2}},
                     cluster=profile_file(tmp_path, partition="nonexistent"))
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    rc, out = orchestrate(slurm_cluster, tmp_path, str(spec), "--tracking-uri", uri, "--output", "out")
    assert rc == 2 and "Traceback" not in out, out
    line, = error_lines(out)
    assert "sbatch refused the jobs: Invalid partition name specified" in line and "profile.yaml" in line, out


def test_an_asha_trial_whose_job_is_stopped_is_one_line_not_a_traceback(slurm_cluster, tmp_path):
    """With ASHA the trial's Ray relay saw its job end without the worker's final word and raised: Tune printed
    the relay's traceback. Now the view says it as without ASHA (job N CANCELLED: its checkpoint is kept)."""
    spec, uri = one_long_trial(tmp_path, 600)
    tree = yaml.safe_load(spec.read_text())
    tree.update(name="smoke-asha", space={"optim.lr": [0.1, 0.05]}, max_concurrent=2,
                scheduler={"asha": {"metric": "val_loss", "grace_period": 50, "reduction_factor": 2}})
    spec.write_text(yaml.safe_dump(tree))
    proc, _, first = start_until_epoch_2(slurm_cluster, tmp_path, spec, uri)
    try:
        # both jobs running (a pending job ignores scancel --signal): one job per trial under ASHA
        next(iter_until(lambda: len(list((tmp_path / "out" / "reports").glob("*.jsonl"))) == 2, 120))
        jobs = {p.name.split("_")[0] for p in (tmp_path / "out" / "slurm").glob("*/*_submission.sh")}
        slurm_cluster.run("scancel", "--signal=TERM", *jobs)
        out, _ = proc.communicate(timeout=180)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert "Traceback" not in out and "RuntimeError" not in out, out
    assert re.search(r"interrupted optim.lr=0.1 .* reason=job \d+ stopped by a signal \(exit 3\): its checkpoint is "
                     "kept", out), out
    assert proc.returncode == 1 and "2 interrupted" in out, out
    assert "run the same command again to resume them" in out, out


def test_with_asha_a_waiting_trial_shows_its_job_and_squeues_reason(slurm_cluster, tmp_path):
    """Each ASHA relay submits its own job: the view said "running" from the relay's start, whatever the queue
    did. Three trials that each take a whole node (2 CPUs) on the 2-node cluster: one waits, for Resources."""
    base = {**yaml.safe_load(SMOKE.read_text())["base"], "schedule": {"total": 60, "milestones": [50]}}
    spec = spec_file(tmp_path, name="smoke-asha", space={"optim.lr": [0.1, 0.05, 0.02]}, max_concurrent=3, base=base,
                     resources={"cpus": 2, "gpus": 0, "time_limit": "00:10:00"},
                     scheduler={"asha": {"metric": "val_loss", "grace_period": 50, "reduction_factor": 2}})
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    rc, out = orchestrate(slurm_cluster, tmp_path, str(spec), "--tracking-uri", uri, "--output", "out", timeout=400)
    assert rc == 0, out
    assert re.search(r"\] pending +\S+ \[\w{8}\] queued: job \d+ \(Resources\)$", out, re.M), out
    assert out.count("finished optim.lr=") == 3 and not list((tmp_path / "out" / "reports").glob("*.job")), out
