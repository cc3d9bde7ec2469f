"""`orchestrate sweep --backend slurm` on the real local two-node SLURM cluster (tests/slurm_cluster.py), with a real
MLflow sqlite store per test; nothing is mocked. The generated sbatch scripts are golden files: review a change,
then regenerate with UPDATE_GOLDEN=1 pytest tests/test_sweep_slurm.py -k golden.
"""
from __future__ import annotations

import json
import os
import re
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from orchestrator.backends.slurm import SlurmBackend
from orchestrator.spec import SpecError
from orchestrator.sweep import prepare

REPO = Path(__file__).resolve().parents[1]
GOLDEN = Path(__file__).parent / "golden"
SMOKE = REPO / "sweeps" / "smoke.yaml"
LOCAL = REPO / "cluster" / "local-slurm.yaml"
WEIRD_NAME = "it's a \"smoke\" sweep; rm -rf $(echo x) `id`"
WEIRD_DIR = "out dir/it's \"quoted\"; $(touch pwned) `x`"


def spec_file(tmp_path: Path, name: str = "smoke", **changes) -> Path:
    """smoke.yaml with changes (dotted keys into the spec), the local cluster profile by absolute path."""
    tree = yaml.safe_load(SMOKE.read_text())
    tree.update(name=name, cluster=str(LOCAL))
    for dotted, value in changes.items():
        node, *path = tree, *dotted.split(".")
        for part in path[:-1]:
            node = node.setdefault(part, {})
        node[path[-1]] = value
    path = tmp_path / f"spec-{len(list(tmp_path.glob('spec-*')))}.yaml"
    path.write_text(yaml.safe_dump(tree))
    return path


def orchestrate(cluster, tmp_path: Path, *args: str, timeout: float = 240, wait: bool = True):
    cmd = [sys.executable, "-m", "orchestrator.cli", "sweep", *args, "--backend", "slurm"]
    env = dict(cluster.env, PYTHONUNBUFFERED="1", MLFLOW_TRACKING_URI="")
    proc = subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            stdin=subprocess.DEVNULL)
    if not wait:
        return proc
    out, _ = proc.communicate(timeout=timeout)
    return proc.returncode, out


def runs(uri: str, experiment: str) -> list:
    from mlflow import MlflowClient
    client = MlflowClient(tracking_uri=uri)
    exp = client.get_experiment_by_name(experiment)
    return client.search_runs([exp.experiment_id], "tags.kind = 'trial'") if exp else []


def steps(uri: str, run_id: str, key: str) -> list[int]:
    from mlflow import MlflowClient
    return [m.step for m in sorted(MlflowClient(tracking_uri=uri).get_metric_history(run_id, key),
                                   key=lambda m: (m.step, m.timestamp))]


def job_ids(out: str) -> list[str]:
    return sorted({word.split("=", 1)[1] for line in out.splitlines() for word in line.split()
                   if word.startswith("slurm_job_id=")})


def sacct_job(cluster, job_id: str) -> dict[str, str]:
    """The job's own accounting row (array task ids like 12_3 work too), once accounting has settled."""
    cluster.wait(job_id, timeout=60)
    return cluster.sacct(job_id, steps=False)[0]


# -- generated sbatch scripts: golden, injection-safe --------------------------------------------------------
def golden_backend(tmp_path: Path, **changes) -> tuple[SlurmBackend, list]:
    spec = spec_file(tmp_path, name=WEIRD_NAME, **changes)
    ctx, trials = prepare(str(spec), backend="slurm", output=f"/shared/sweeps/{WEIRD_DIR}", tracking_uri="sqlite:////nonexistent/m.db")
    backend = SlurmBackend(ctx)
    backend.submission_id, backend.python = "20260101-000000-golden", "/opt/venv/bin/python"
    return backend, trials


def rendered_scripts(tmp_path: Path) -> dict[str, str]:
    single, trials = golden_backend(tmp_path, **{"scheduler": {"asha": {"grace_period": 1}}})
    array, _ = golden_backend(tmp_path)
    site, site_trials = golden_backend(tmp_path, cluster=str(REPO / "cluster" / "slurm-example.yaml"),
                                       resources={"nodes": 2, "gpus": 4, "cpus": 32, "memory_gb": 200,
                                                  "time_limit": "1-12:00:00"})
    return {"single": single.describe(trials[0]), "array": array.script(None, 4),
            "multinode": site.describe(site_trials[0], todo=[t.key for t in site_trials])}


def test_sbatch_scripts_match_golden(tmp_path):
    for name, text in rendered_scripts(tmp_path).items():
        path = GOLDEN / f"sbatch_{name}.txt"
        if os.environ.get("UPDATE_GOLDEN"):
            path.write_text(text)
        assert text == path.read_text(), (f"the sbatch script {name!r} changed; review, then regenerate with "
                                          "UPDATE_GOLDEN=1 pytest tests/test_sweep_slurm.py -k golden")


def test_a_slurm_command_that_does_not_answer_in_time_reads_as_a_failed_call_that_says_so():
    """A slow sacct in the monitor loop was a TimeoutExpired traceback, and the sweep cancelled every job on it."""
    from orchestrator.backends.slurm import slurm_command
    run = slurm_command("sleep", "5", timeout=1)
    assert (run.returncode, run.stdout, run.stderr) == (124, "", "sleep: no answer within 1 s")


def test_hostile_names_and_folders_stay_single_words(tmp_path):
    scripts = rendered_scripts(tmp_path)
    for name, text in scripts.items():
        script = text[text.index("#!/bin/bash"):]
        assert subprocess.run(["bash", "-n"], input=script, text=True).returncode == 0, name
        srun = next(line for line in script.splitlines() if line.startswith("srun "))
        words = shlex.split(srun)
        assert words[-1] == f"/shared/sweeps/{WEIRD_DIR}/slurm/20260101-000000-golden"  # the folder: one word
        assert "$(" not in "".join(line for line in script.splitlines() if "--job-name" in line)
    multinode = scripts["multinode"]
    for line in ("#SBATCH --nodes=2", "#SBATCH --ntasks-per-node=4", "#SBATCH --gres=gpu:a100:4",
                 "#SBATCH --partition=gpu", "#SBATCH --account=my-project", "#SBATCH --qos=normal",
                 "#SBATCH --constraint='a100&ib'", "#SBATCH --mem=200G", "#SBATCH --time=2160",
                 "module load cuda/12.4 nccl", "#SBATCH --cpus-per-task=8", "#SBATCH --requeue"):
        assert line in multinode.splitlines(), line


def test_fractional_gpus_and_bad_folders_are_refused_in_one_line(tmp_path):
    with pytest.raises(SpecError, match=r"resources.gpus: 0.5 .* whole GPUs") as err:
        golden_backend(tmp_path, resources={"gpus": 0.5})
    assert "\n" not in str(err.value)
    spec = spec_file(tmp_path)
    ctx, _ = prepare(str(spec), backend="slurm", output=str(tmp_path / "a\nb"), tracking_uri="sqlite:////nonexistent/m.db")
    with pytest.raises(SpecError, match="newline"):
        SlurmBackend(ctx)


# -- the real cluster -----------------------------------------------------------------------------------------
def test_dry_run_prints_sbatch_and_changes_nothing(slurm_cluster, tmp_path):
    spec = spec_file(tmp_path)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    queue = slurm_cluster.run("squeue", "-h", "-o", "%i").stdout
    jobs = slurm_cluster.run("sacct", "-n", "-X", "-a", "-o", "JobID", "-S", "now-1hour").stdout
    rc, out = orchestrate(slurm_cluster, tmp_path, str(spec), "--dry-run", "--tracking-uri", uri)
    assert rc == 0, out
    assert out.count("#SBATCH --array=0-3%2") == 1 and "srun --unbuffered" in out and "array task 3 of 4" in out
    assert "dry run: nothing submitted" in out
    # nothing new (jobs of earlier tests may leave the queue, or age out of the hour, meanwhile)
    assert not set(slurm_cluster.run("squeue", "-h", "-o", "%i").stdout.split()) - set(queue.split())
    assert not set(slurm_cluster.run("sacct", "-n", "-X", "-a", "-o", "JobID", "-S", "now-1hour").stdout.split()) \
        - set(jobs.split())
    assert not (tmp_path / "mlflow.db").exists() and not (tmp_path / "runs").exists()


def test_smoke_sweep_one_job_per_trial_and_rerun_starts_none(slurm_cluster, tmp_path):
    spec = spec_file(tmp_path)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    rc, out = orchestrate(slurm_cluster, tmp_path, str(spec), "--tracking-uri", uri, "--output", "out")
    assert rc == 0, out
    found = runs(uri, "smoke")
    assert len(found) == 4 and {r.info.status for r in found} == {"FINISHED"}, out
    ids = {r.data.tags["backend_job_id"] for r in found}
    assert len(ids) == 4 and {r.data.tags["backend"] for r in found} == {"slurm"}
    assert len({i.split("_")[0] for i in ids}) == 1  # one job array for the grid, one array task per trial
    for job_id in ids:
        row = sacct_job(slurm_cluster, job_id)
        assert row["State"] == "COMPLETED" and row["JobName"] == "smoke-grid", row
    for run in found:
        assert steps(uri, run.info.run_id, "train_loss") == [5, 10, 15, 20, 25, 30]
    # what ran is what a dry run shows: the submitted script equals describe's, byte for byte
    folder, = (tmp_path / "out" / "slurm").iterdir()
    submitted, = folder.glob("*_submission.sh")
    ctx, _ = prepare(str(spec), backend="slurm", tracking_uri=uri, output=str(tmp_path / "out"))
    backend = SlurmBackend(ctx)
    backend.submission_id = folder.name
    assert submitted.read_text() == backend.script(None, 4)

    rc, again = orchestrate(slurm_cluster, tmp_path, str(spec), "--tracking-uri", uri, "--output", "out")
    assert rc == 0 and "4 skipped" in again and not job_ids(again), again
    assert len(runs(uri, "smoke")) == 4
    assert len(list((tmp_path / "out" / "slurm").iterdir())) == 1  # no second submission folder: nothing submitted


def test_fused_groups_run_as_one_array_task_each_and_every_member_keeps_its_run(slurm_cluster, tmp_path):
    fused = yaml.safe_load((REPO / "sweeps" / "smoke_fused.yaml").read_text())
    spec = spec_file(tmp_path, name="smoke_fused", space=fused["space"], fuse=fused["fuse"])
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    rc, dry = orchestrate(slurm_cluster, tmp_path, str(spec), "--dry-run", "--tracking-uri", uri)
    assert rc == 0 and "#SBATCH --array=0-1%2" in dry and dry.count("train_fused(<4 trial configs>)") == 2, dry
    rc, out = orchestrate(slurm_cluster, tmp_path, str(spec), "--tracking-uri", uri, "--output", "out")
    assert rc == 0, out
    found = runs(uri, "smoke_fused")
    assert len(found) == 8 and {r.info.status for r in found} == {"FINISHED"}, out
    by_job: dict[str, set] = {}
    for run in found:
        by_job.setdefault(run.data.tags["backend_job_id"], set()).add(run.data.tags["fused_group"])
        assert steps(uri, run.info.run_id, "train_loss") == [5, 10, 15, 20, 25, 30]
    assert len(by_job) == 2 and all(len(groups) == 1 for groups in by_job.values())  # one array task per group
    for job_id in by_job:
        assert sacct_job(slurm_cluster, job_id)["State"] == "COMPLETED"
    assert out.count("finished ") == 8


def test_weird_names_and_a_trial_across_both_nodes(slurm_cluster, tmp_path):
    """A sweep name and an output folder with spaces, quotes and shell syntax; each trial spans n1 and n2
    (world size 2, c10d TCP store on 127.0.0.1); two trials: a job array of two 2-node jobs."""
    spec = spec_file(tmp_path, name=WEIRD_NAME, space={"optim.lr": [0.1, 0.05]},
                     resources={"nodes": 2, "cpus": 1, "time_limit": "00:10:00"})
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    rc, out = orchestrate(slurm_cluster, tmp_path, str(spec), "--tracking-uri", uri, "--output", WEIRD_DIR)
    assert rc == 0, out
    found = runs(uri, WEIRD_NAME)
    assert len(found) == 2 and {r.info.status for r in found} == {"FINISHED"}, out
    for run in found:
        assert run.data.tags["world_size"] == "2" and run.data.tags["sweep"] == WEIRD_NAME
        row = sacct_job(slurm_cluster, run.data.tags["backend_job_id"])
        assert row["NNodes"] == "2" and row["NodeList"] == "n[1-2]" and row["State"] == "COMPLETED", row
        assert steps(uri, run.info.run_id, "train_loss") == [5, 10, 15, 20, 25, 30]
    assert (tmp_path / WEIRD_DIR / "checkpoints").is_dir()
    assert not (tmp_path / "pwned").exists() and not (tmp_path / WEIRD_DIR / "pwned").exists()


def one_long_trial(tmp_path: Path, total: int, **changes) -> tuple[Path, str]:
    """smoke.yaml as one trial long enough to interrupt: a point every 3 iterations, a checkpoint every 6."""
    spec = spec_file(tmp_path, space={"optim.lr": [0.1]}, base={**yaml.safe_load(SMOKE.read_text())["base"],
                     "schedule": {"total": total, "milestones": [total * 5 // 6]}, "tracking": {"log_every": 3},
                     "checkpoint": {"every": 6}}, **changes)
    return spec, f"sqlite:///{tmp_path / 'mlflow.db'}"


def start_until_epoch_2(cluster, tmp_path: Path, spec: Path, uri: str):
    """The sweep running (output in ./out), its trial's report file, and the trial's first report past epoch 2."""
    proc = orchestrate(cluster, tmp_path, str(spec), "--tracking-uri", uri, "--output", "out", wait=False)
    try:
        reports = next(iter_until(lambda: list((tmp_path / "out" / "reports").glob("*.jsonl")), 90))[0]
        return proc, reports, wait_report(reports, lambda r: r.get("epoch", 0) >= 2)
    except BaseException:
        proc.kill()
        raise


def test_requeue_resumes_from_checkpoint_in_the_same_run(slurm_cluster, tmp_path):
    """Both preemption paths on one trial: a plain `scontrol requeue` (SIGTERM; SLURM requeues), then submitit's
    USR2 (the worker checkpoints, submitit's checkpoint() + scontrol requeue). One run, no duplicate steps."""
    total = 72
    spec, uri = one_long_trial(tmp_path, total)
    proc, reports, first = start_until_epoch_2(slurm_cluster, tmp_path, spec, uri)
    try:
        job_id = first_job_id(tmp_path / "out")
        slurm_cluster.requeue(job_id)
        wait_report(reports, lambda r: r.get("epoch", 0) > first["epoch"] + 2, after=first)
        slurm_cluster.run("scancel", "--signal=USR2", job_id)
        start_after_submitit_requeue(slurm_cluster, job_id)
        out, _ = proc.communicate(timeout=240)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, out
    run, = runs(uri, "smoke")
    assert run.info.run_id == first["run_id"] and run.info.status == "FINISHED"
    assert run.data.tags["backend_job_id"] == job_id
    for key in ("train_loss", "lr"):
        assert steps(uri, run.info.run_id, key) == list(range(3, total + 1, 3)), key
    assert steps(uri, run.info.run_id, "val_error") == list(range(6, total + 1, 6))
    records = [json.loads(line) for line in reports.read_text().splitlines()]
    assert records[-1]["status"] == "FINISHED" and records[-1]["iteration"] == total
    assert max(r["iteration"] for r in records if "status" not in r) <= total
    history = slurm_cluster.sacct(job_id, duplicates=True, steps=False)
    assert [r["State"] for r in history].count("REQUEUED") >= 2 and history[-1]["State"] == "COMPLETED", history
    log = "".join(p.read_text() for p in (tmp_path / "out" / "slurm").glob("*/*_log.out"))
    assert "Calling checkpoint method" in log and f"Requeued job {job_id}" in log  # submitit's own path


def test_a_cancelled_job_is_an_interrupted_trial_that_a_rerun_resumes(slurm_cluster, tmp_path):
    """scancel (or preemption) is not the trial's failure: the sweep says how to resume, and a re-run does."""
    total = 60
    spec, uri = one_long_trial(tmp_path, total)
    proc, _, first = start_until_epoch_2(slurm_cluster, tmp_path, spec, uri)
    out = cancel_first_job(slurm_cluster, tmp_path, proc)
    assert proc.returncode == 1 and "1 interrupted" in out and "Error stream" not in out, out
    assert "run the same command again to resume them from their checkpoints" in out
    code, again = orchestrate(slurm_cluster, tmp_path, str(spec), "--tracking-uri", uri, "--output", "out")
    assert code == 0 and "1 interrupted trial(s) resume from their checkpoints" in again, again
    run, = runs(uri, "smoke")
    assert run.info.run_id == first["run_id"] and run.info.status == "FINISHED"
    assert steps(uri, run.info.run_id, "train_loss") == list(range(3, total + 1, 3))  # no gap, no repeat


def test_ctrl_c_names_the_checkpoint_its_jobs_write_as_they_stop(slurm_cluster, tmp_path):
    """The sweep cancelled its jobs and marked their runs at once, naming the last periodic checkpoint ('resumes
    it from its checkpoint at iteration 30') while each job, on SIGTERM, was writing a newer one (36)."""
    spec, uri = one_long_trial(tmp_path, 600)
    proc, _, first = start_until_epoch_2(slurm_cluster, tmp_path, spec, uri)
    proc.send_signal(signal.SIGINT)
    out = proc.communicate(timeout=180)[0]
    assert proc.returncode == 130, out[-3000:]
    run, = runs(uri, "smoke")
    reason = run.data.tags["status_reason"]
    stopped = re.fullmatch(r"interrupted: stopped at iteration (\d+), checkpoint written; running it again resumes it",
                           reason)
    assert run.info.status == "KILLED" and stopped, reason
    newest = max(int(p.name[5:14]) for p in (tmp_path / "out" / "checkpoints").glob("*/ckpt-*.pt"))
    assert int(stopped.group(1)) == newest  # the one written as it stopped
    assert reason in " ".join(out.split()), out[-3000:]  # what the sweep said, too


def test_ctrl_c_under_asha_cancels_the_jobs_it_submitted(slurm_cluster, tmp_path):
    """Under ASHA, Tune answers Ctrl-C by ending fit() without a trial callback: the jobs trained on into runs the
    sweep had marked interrupted, and a re-run was refused while they ran."""
    spec, uri = one_long_trial(tmp_path, 600, scheduler={"asha": {"metric": "val_loss", "grace_period": 1}})
    proc, _, first = start_until_epoch_2(slurm_cluster, tmp_path, spec, uri)
    proc.send_signal(signal.SIGINT)
    out = proc.communicate(timeout=180)[0]
    assert proc.returncode == 130, out[-3000:]
    assert sacct_job(slurm_cluster, first_job_id(tmp_path / "out"))["State"].split()[0] == "CANCELLED", out[-3000:]
    run, = runs(uri, "smoke")
    assert run.info.status == "KILLED" and run.data.tags["status_reason"].startswith("interrupted"), run.data.tags


def test_asha_stops_a_trial_and_cancels_its_job(slurm_cluster, tmp_path):
    spec = spec_file(tmp_path, name="smoke-asha", space={"optim.lr": [0.1, 0.02, 0.5, 0.004]},
                     # val_loss, as sweeps/smoke_lr.yaml: a finished trial's final result must carry it too
                     scheduler={"asha": {"metric": "val_loss", "grace_period": 1, "reduction_factor": 2}},
                     base={**yaml.safe_load(SMOKE.read_text())["base"], "schedule": {"total": 24, "milestones": [20]}})
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    rc, out = orchestrate(slurm_cluster, tmp_path, str(spec), "--tracking-uri", uri, "--output", "out", timeout=300)
    assert rc == 0, out
    found = runs(uri, "smoke-asha")
    assert len(found) == 4, out
    stopped = [r for r in found if r.data.tags.get("early_stopped") == "true"]
    assert stopped, out
    for run in stopped:
        assert "stopped early by ASHA at epoch" in run.data.tags["status_reason"] and run.info.status == "KILLED"
        assert sacct_job(slurm_cluster, run.data.tags["backend_job_id"])["State"].split()[0] == "CANCELLED"
    finished = [r for r in found if r.info.status == "FINISHED"]
    assert finished and all(sacct_job(slurm_cluster, r.data.tags["backend_job_id"])["State"] == "COMPLETED"
                            for r in finished)
    assert len(finished) + len(stopped) == 4


# -- helpers of the requeue test ----------------------------------------------------------------------------
def iter_until(get, timeout: float, poll: float = 0.3):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        value = get()
        if value:
            yield value
            return
        time.sleep(poll)
    raise TimeoutError(f"nothing after {timeout:.0f} s")


def wait_report(path: Path, pred, after: dict | None = None, timeout: float = 120) -> dict:
    def find():
        records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        if after is not None:
            records = records[records.index(after) + 1:]
        return next((r for r in records if pred(r)), None)
    return next(iter_until(find, timeout))


def cancel_first_job(cluster, tmp_path: Path, proc) -> str:
    """scancel the sweep's first job; the sweep's output once it has ended."""
    try:
        cluster.run("scancel", first_job_id(tmp_path / "out"))
        return proc.communicate(timeout=120)[0]
    finally:
        if proc.poll() is None:
            proc.kill()


def first_job_id(out: Path) -> str:
    return next(iter_until(lambda: [p.name.split("_")[0] for p in (out / "slurm").glob("*/*_submission.sh")], 30))[0]


def start_after_submitit_requeue(cluster, job_id: str, timeout: float = 60) -> None:
    """submitit requeued the job itself: lift SLURM's hold (BeginTime) once it is pending, as requeue() does. The
    requeue came at the latest when the job is first seen pending (lifted in that same second, the job failed)."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if cluster.state(job_id) == "PENDING":
            cluster.lift_requeue_hold(job_id, requeued_at=time.monotonic())
            return
        time.sleep(0.3)
    raise TimeoutError(f"job {job_id} was not requeued by submitit within {timeout:.0f} s")


def test_ray_on_slurm_forms_one_ray_cluster_over_the_allocation_and_sweeps_on_it(slurm_cluster, tmp_path):
    """cluster/ray-on-slurm.sbatch on both nodes. With a Ray token at hand (any local ray.init leaves one), the
    head used to start in token mode and the worker without, so it never joined and the sweep ran on the head
    alone, exit 0."""
    import socket
    import tempfile
    home = tmp_path / "home"
    env = dict(slurm_cluster.env, HOME=str(home), PATH=f"{Path(sys.executable).parent}:{slurm_cluster.env['PATH']}",
               # Ray's files (and its ray_current_cluster) off /tmp/ray; short: its socket paths must stay < 108 bytes
               RAY_TMPDIR=tempfile.mkdtemp(prefix="rt", dir="/tmp"))
    subprocess.run(["ray", "get-auth-token", "--generate"], env=env, capture_output=True, check=True, timeout=60)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        env["RAY_PORT"] = str(s.getsockname()[1])
    spec = spec_file(tmp_path, name="ray-on-slurm", cluster=str(REPO / "cluster" / "ray-on-slurm.yaml"))
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    job = subprocess.run(["sbatch", "--parsable", "--nodes=2", "--cpus-per-task=1", "--export=ALL",
                          str(REPO / "cluster" / "ray-on-slurm.sbatch"), str(spec), "--tracking-uri", uri],
                         env=env, cwd=tmp_path, capture_output=True, text=True, check=True).stdout.strip()
    state = slurm_cluster.wait(job, timeout=300)
    log = (tmp_path / f"ray-on-slurm-{job}.out").read_text()
    assert state == "COMPLETED" and "ray cluster: 2 nodes" in log, log[-3000:]
    found = runs(uri, "ray-on-slurm")
    assert len(found) == 4 and all(r.info.status == "FINISHED" for r in found), log[-3000:]
