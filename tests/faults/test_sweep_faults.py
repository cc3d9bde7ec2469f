"""Faults at the sweep level, injected for real: a `slurmd` killed under a running SLURM trial, the MLflow tracking
server restarted under a running Ray sweep, `kill -9` of the Ray worker process that runs a trial, and shell syntax
in every value a sweep YAML hands on (name, tags, an override) on both backends. Nothing is mocked: the local
two-node SLURM cluster (tests/slurm_cluster.py), a local Ray started by `orchestrate sweep`, a real `mlflow server`.

Processes are found by id, never by name: the daemon's pid file for slurmd, the job's processes by SLURM_JOB_ID in
their environment, the Ray worker as a descendant of *our* orchestrator (other sweeps may run on this machine).
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import time
import uuid
from collections import Counter
from pathlib import Path

import pytest
import yaml

from faultlib import BIN, REPO, running_server, steps_of
from processes import cmdline, descendants

SMOKE = REPO / "sweeps" / "smoke.yaml"
LOCAL = REPO / "cluster" / "local-slurm.yaml"
TRAIN_KEYS = ("train_loss", "train_error", "lr", "images_per_s")  # a point every log_every iterations
FINAL_KEYS = ("val_error", "val_loss", "test_error", "test_loss", "epoch", "best_val_error")  # evaluations


# -- helpers ------------------------------------------------------------------------------------------------
def spec_file(tmp_path: Path, name: str = "faults", slurm: bool = False, total: int = 60, **changes) -> Path:
    """sweeps/smoke.yaml (ResNet-8, 512 synthetic images, 6 iterations an epoch) with a longer schedule, a point
    every 5 iterations, a checkpoint every 10, evaluations only at the end; ``changes`` replace top-level keys."""
    tree = yaml.safe_load(SMOKE.read_text())
    tree.pop("cluster")
    tree["base"].update(schedule={"total": total, "milestones": [total * 3 // 4]}, tracking={"log_every": 5},
                        checkpoint={"every": 10, "keep": 2})
    tree["base"]["eval"]["every_epochs"] = 1000
    if slurm:
        tree["cluster"] = str(LOCAL)
    tree.update(name=name, **changes)
    path = tmp_path / f"spec-{uuid.uuid4().hex[:6]}.yaml"
    path.write_text(yaml.safe_dump(tree))
    return path


def sweep(tmp_path: Path, spec: Path, uri: str, *args: str, env: dict | None = None,
          output: str | None = "out") -> subprocess.Popen:
    """`orchestrate sweep` in its own session (its Ray or submitit children are found under its pid)."""
    env = {**(env or os.environ), "PYTHONUNBUFFERED": "1", "MLFLOW_TRACKING_URI": "",
           "ORCHESTRATE_RAY_OBJECT_STORE": str(100 * 2**20)}
    where = ["--output", output] if output else []  # None: the default, runs/sweeps/<name>
    return subprocess.Popen([BIN / "orchestrate", "sweep", spec, "--tracking-uri", uri, *where, *args],
                            cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            stdin=subprocess.DEVNULL, start_new_session=True)


def finish(proc: subprocess.Popen, timeout: float = 240) -> tuple[int, str]:
    try:
        out, _ = proc.communicate(timeout=timeout)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    return proc.returncode, out


def trial_runs(uri: str, experiment: str) -> list:
    from mlflow import MlflowClient
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name(experiment)
    return [] if exp is None else client.search_runs([exp.experiment_id], "tags.kind = 'trial'")


def max_step(uri: str, experiment: str) -> dict[str, int]:
    """run id -> the highest train_loss step the store holds."""
    return {r.info.run_id: max(steps_of(uri, r.info.run_id, "train_loss") or [0]) for r in trial_runs(uri, experiment)}


def wait_for(what: str, get, timeout: float, proc: subprocess.Popen | None = None, poll: float = 0.5):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"the sweep ended (rc {proc.returncode}) while waiting for {what}:\n"
                                 + proc.communicate()[0][-3000:])
        value = get()
        if value:
            return value
        time.sleep(poll)
    raise AssertionError(f"no {what} within {timeout:.0f} s")


def processes_of_job(job_id: str) -> list[int]:
    """Live processes whose environment says they belong to this SLURM job (batch script, srun, the worker)."""
    needle = f"SLURM_JOB_ID={job_id}".encode()
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if needle in (entry / "environ").read_bytes().split(b"\0") and \
                        "\nState:\tZ" not in (entry / "status").read_text():
                    found.append(int(entry.name))
            except OSError:
                continue
    return found


def assert_exact_steps(uri: str, run_id: str, total: int, log_every: int = 5, eval_every: int = 0) -> None:
    """Every train metric holds each step log_every, 2*log_every, ... and total exactly once; the evaluation metrics
    each eval_every iterations before the end (0: none) and at ``total`` (best_val_error too: the best so far)."""
    expected = sorted({*range(log_every, total + 1, log_every), total})  # the worker also logs the last step
    for key in TRAIN_KEYS:
        assert steps_of(uri, run_id, key) == expected, key  # none lost, none twice, in order
    evals = [*(range(eval_every, total, eval_every) if eval_every else ()), total]
    for key in FINAL_KEYS:
        assert steps_of(uri, run_id, key) == evals, key


# -- 1. slurmd killed under a running trial -----------------------------------------------------------------
def start_one_slurm_trial(slurm_cluster, tmp_path: Path, total: int) -> tuple[subprocess.Popen, str]:
    spec = spec_file(tmp_path, slurm=True, total=total, space={"optim.lr": [0.1]},
                     resources={"cpus": 1, "gpus": 0, "time_limit": "00:10:00"})
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    return sweep(tmp_path, spec, uri, "--backend", "slurm", env=slurm_cluster.env), uri


def running_slurm_trial(slurm_cluster, tmp_path: Path, uri: str, proc) -> tuple[str, str, int, str]:
    """(job id, run id, its step, its node) once the trial has logged step 20."""
    job_id = wait_for("submitted job", lambda: [p.name.split("_")[0] for p in
                      (tmp_path / "out" / "slurm").glob("*/*_submission.sh")], 60, proc)[0]
    (run_id, step), = wait_for("train_loss at step 20", lambda: [
        (r, s) for r, s in max_step(uri, "faults").items() if s >= 20], 120, proc)
    node = slurm_cluster.run("squeue", "-h", "-j", job_id, "-o", "%N").stdout.strip()
    assert node in ("n1", "n2"), node
    return job_id, run_id, step, node


@pytest.mark.timeout(300)
def test_slurmd_killed_mid_trial_the_job_is_requeued_and_the_trial_completes(slurm_cluster, tmp_path):
    """kill -9 of the slurmd of the node the trial runs on. SLURM marks the node DOWN after ~30 s and requeues the
    job; the worker itself keeps running meanwhile (slurmstepd is not slurmd's child). `up` restarts the slurmd;
    on registration SLURM kills the stray copy ("on wrong node") with SIGKILL; the requeued job then resumes the
    trial from its newest checkpoint, in the same MLflow run."""
    # The worker is paused from the kill until the requeue (pause_training), so it outlives the ~30 s until the
    # node is declared DOWN on any machine; 300 iterations keep the resumed run short.
    total = 300
    proc, uri = start_one_slurm_trial(slurm_cluster, tmp_path, total)
    workers: list[int] = []
    try:
        job_id, run_id, before, node = running_slurm_trial(slurm_cluster, tmp_path, uri, proc)
        workers = processes_of_job(job_id)
        assert workers, "no process of the job found"
        slurmd = slurm_cluster.pid(f"slurmd-{node}")
        killed_at = time.monotonic()
        os.kill(slurmd, signal.SIGKILL)
        paused = pause_training(workers)  # alive, but not finishing, until SLURM has acted

        # The controller notices (SlurmdTimeout=15 s) and requeues the batch job; the worker has no idea.
        wait_for("node down and the job requeued", lambda: slurm_cluster.nodes().get(node, "").startswith("down")
                 and slurm_cluster.state(job_id) == "PENDING", 120, proc)
        down_after = time.monotonic() - killed_at
        stray = [p for p in workers if Path(f"/proc/{p}").exists()]
        steps_meanwhile = max_step(uri, "faults")[run_id]
        assert stray, "the job's processes died with slurmd: not the fault under test"

        resume_training(paused)  # the stray copy trains on when slurmd comes back ...
        slurm_cluster.up()  # ... and SLURM kills the copy it no longer owns
        wait_for("the stray copy killed by SLURM", lambda: not [p for p in stray if Path(f"/proc/{p}").exists()
                                                               and "\nState:\tZ" not in _status(p)], 60, proc)
        # SLURM holds the requeued job until cred_expire (15 s here) has passed. Do NOT lift that hold here (as the
        # fixture's requeue() does after a plain requeue): the node is still tearing down the stray copy of this
        # very job id, and a relaunch on it in that second is killed with it (seen: the requeued job FAILED with
        # signal 9 one second after it started on the same node).
        rc, out = finish(proc, timeout=240)
    finally:
        resume_training(workers)  # a process left stopped would outlive the test
        slurm_cluster.up()  # both nodes for the tests that follow, whatever happened here
    assert rc == 0, out[-3000:]

    (run,) = trial_runs(uri, "faults")
    assert run.info.run_id == run_id and run.info.status == "FINISHED", (run.info, out[-2000:])
    assert run.data.tags["backend_job_id"] == job_id
    assert_exact_steps(uri, run_id, total)
    ckpt = sorted((tmp_path / "out" / "checkpoints").glob("*/ckpt-*.pt"))
    assert int(ckpt[-1].name[5:14]) == total  # the final iteration, exactly
    assert slurm_cluster.wait(job_id, timeout=60) == "COMPLETED"  # accounting lags the controller by seconds
    history = slurm_cluster.sacct(job_id, duplicates=True, steps=False)
    states = [(r["State"].split()[0], r["NodeList"]) for r in history]
    assert states[0] == ("NODE_FAIL", node) and states[-1][0] == "COMPLETED", states
    assert slurm_cluster.nodes() and set(slurm_cluster.nodes().values()) <= {"idle", "mix", "alloc"}
    report_fact("slurmd", node=node, requeued_on=states[-1][1], step_at_kill=before,
                step_when_requeued=steps_meanwhile, down_after_s=round(down_after, 1), sacct=states)


@pytest.mark.timeout(420)
def test_slurmd_stays_dead_the_requeued_copy_takes_over_and_the_stray_copy_stops(slurm_cluster, tmp_path):
    """slurmd killed and *not* restarted: SLURM requeues the job onto the other node while the first copy still
    trains on the dead one (nothing can kill it there). The requeued copy claims the trial folder; the stray copy
    sees the claim at its next log point and stops without writing; one run, each step once."""
    total = 700  # long enough that the stray, resumed at the takeover, reaches a log point before its end
    proc, uri = start_one_slurm_trial(slurm_cluster, tmp_path, total)
    stray: list[int] = []
    try:
        job_id, run_id, before, node = running_slurm_trial(slurm_cluster, tmp_path, uri, proc)
        other = {"n1": "n2", "n2": "n1"}[node]
        stray = processes_of_job(job_id)
        assert stray, "no process of the job found"
        os.kill(slurm_cluster.pid(f"slurmd-{node}"), signal.SIGKILL)
        killed_at = time.monotonic()
        paused = pause_training(stray)  # alive, but not finishing, until the requeued copy runs (see there)
        wait_for(f"the job running again on {other}", lambda: slurm_cluster.state(job_id) == "RUNNING" and
                 slurm_cluster.run("squeue", "-h", "-j", job_id, "-o", "%N").stdout.strip() == other, 180, proc)
        restarted_after = time.monotonic() - killed_at
        resume_training(paused)  # two copies of the trial now train at once: the fault under test
        alive = [p for p in stray if Path(f"/proc/{p}").exists() and "\nState:\tZ" not in _status(p)]
        assert alive, "the stray copy had ended before the requeued one started: not the fault under test"
        step_at_takeover = max_step(uri, "faults")[run_id]
        # Nothing can kill the stray (its node's slurmd is dead): it must stop by itself, seeing the new claim.
        wait_for("the stray copy to stop by itself", lambda: not [
            p for p in stray if Path(f"/proc/{p}").exists() and "\nState:\tZ" not in _status(p)], 120, proc)
        stopped_after = time.monotonic() - killed_at
        rc, out = finish(proc, timeout=300)
    finally:
        resume_training(stray)  # a process left stopped would outlive the test
        slurm_cluster.up()  # the dead slurmd back, for the tests that follow
    assert rc == 0, out[-3000:]
    (run,) = trial_runs(uri, "faults")
    assert run.info.run_id == run_id and run.info.status == "FINISHED", (run.info, out[-2000:])
    assert_exact_steps(uri, run_id, total)  # the two copies overlapped; still every step once
    assert slurm_cluster.wait(job_id, timeout=60) == "COMPLETED"
    states = [(r["State"].split()[0], r["NodeList"])
              for r in slurm_cluster.sacct(job_id, duplicates=True, steps=False)]
    assert states[0] == ("NODE_FAIL", node) and states[-1] == ("COMPLETED", other), states
    report_fact("slurmd_stays_dead", node=node, requeued_on=other, step_at_kill=before,
                restarted_after_s=round(restarted_after, 1), step_at_takeover=step_at_takeover,
                stray_stopped_after_s=round(stopped_after, 1), sacct=states)


def pause_training(pids: list[int]) -> list[int]:
    """SIGSTOP the job's Python processes (the submitit worker that trains), not its shell or srun.

    The faults below need the first copy alive through windows whose length is SLURM's (~30-60 s until a node is
    DOWN and the job requeued), while a training iteration here takes 0.07-0.28 s depending on the machine: a
    fast one finished the whole trial before SLURM acted (seen in CI). A paused copy is still a live process of the
    job, as a slow one would be; SLURM's SIGKILL ends it all the same."""
    python = [p for p in pids if "python" in cmdline(p).split(" ", 1)[0]]
    assert python, [cmdline(p) for p in pids]
    for pid in python:
        os.kill(pid, signal.SIGSTOP)
    return python


def resume_training(pids: list[int]) -> None:
    for pid in pids:
        try:
            os.kill(pid, signal.SIGCONT)
        except ProcessLookupError:
            pass


def _status(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return "\nState:\tZ"


def report_fact(test: str, **facts) -> None:
    """The figures docs/reliability.md quotes, printed as one JSON line (seen with pytest -s)."""
    print(json.dumps({"test": test, **facts}, default=str))


# -- 2. the tracking server restarted under a running Ray sweep ---------------------------------------------
@pytest.mark.timeout(300)
def test_tracking_server_restarted_mid_sweep_loses_no_point(tmp_path):
    total = 40
    spec = spec_file(tmp_path, total=total)  # 4 trials (plain/residual x 2 learning rates), 2 at a time
    with running_server("sqlite") as server:
        proc = sweep(tmp_path, spec, server.uri)
        try:
            wait_for("a trial logging", lambda: sum(s >= 10 for s in max_step(server.uri, "faults").values()) >= 1,
                     180, proc)
            before = max_step(server.uri, "faults")
            down = time.time() * 1000
            t0 = time.monotonic()
            server.restart()
            outage = time.monotonic() - t0
            up = time.time() * 1000
            assert proc.poll() is None, "the sweep ended during the restart"
            rc, out = finish(proc, timeout=240)
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
        assert rc == 0, out[-3000:]
        runs = trial_runs(server.uri, "faults")
        assert len(runs) == 4 and {r.info.status for r in runs} == {"FINISHED"}, out[-2000:]
        assert len({r.data.tags["trial_key"] for r in runs}) == 4
        from mlflow import MlflowClient
        client = MlflowClient(server.uri)
        points = Counter()
        during = 0
        for run in runs:
            assert_exact_steps(server.uri, run.info.run_id, total)
            for key in (*TRAIN_KEYS, *FINAL_KEYS):
                history = client.get_metric_history(run.info.run_id, key)
                points[key] += len(history)
                during += sum(down <= m.timestamp <= up for m in history)
        assert all(points[k] == 4 * total // 5 for k in TRAIN_KEYS), points
        assert not all(s == total for s in before.values()) or len(before) < 4, "the sweep was over before the restart"
        assert during, "no point was logged while the server was down: the fault did not hit a client"
        report_fact("server_restart", outage_s=round(outage, 1), steps_before=sorted(before.values()),
                    points=dict(points), logged_while_down=during)


# -- 3. kill -9 of the Ray worker that runs a trial ---------------------------------------------------------
@pytest.mark.timeout(300)
def test_ray_worker_killed_the_trial_fails_and_a_rerun_resumes_it_in_the_same_run(tmp_path):
    total, short = 48, 12  # two trials, one at a time: the long one runs first and is killed
    spec = spec_file(tmp_path, total=total, space={"schedule.total": [total, short]}, max_concurrent=1)
    tree = yaml.safe_load(spec.read_text())
    tree["base"]["eval"]["every_epochs"] = 2  # a report every 12 iterations: shows where a run (re)started
    spec.write_text(yaml.safe_dump(tree))
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    proc = sweep(tmp_path, spec, uri)
    try:
        (run_id, at_kill), = wait_for("train_loss at step 25", lambda: [
            (r, s) for r, s in max_step(uri, "faults").items() if 25 <= s < total], 180, proc, poll=0.3)
        # Tune runs a function trainable in a Ray actor: the raylet's child titled ray::ImplicitFunc.train.
        # One trial at a time, so exactly one such process under our orchestrator (others' sweeps have theirs).
        trainers = [p for p in descendants(proc.pid) if cmdline(p).startswith("ray::ImplicitFunc")]
        assert len(trainers) == 1, [(p, cmdline(p)) for p in descendants(proc.pid)]
        os.kill(trainers[0], signal.SIGKILL)
        rc, out = finish(proc, timeout=240)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert rc == 1, out[-3000:]  # Tune does not retry (max_failures 0): the sweep reports the trial failed
    assert "1 finished, 1 failed" in out, out[-2000:]
    runs = {r.info.run_id: r for r in trial_runs(uri, "faults")}
    assert len(runs) == 2 and runs[run_id].info.status == "RUNNING"  # killed -9: nobody ended its run
    kept = max(steps_of(uri, run_id, "train_loss"))
    key = runs[run_id].data.tags["trial_key"]
    folder = tmp_path / "out" / "checkpoints" / key
    resume_from = max(int(p.name[5:14]) for p in folder.glob("ckpt-*.pt"))
    assert 20 <= resume_from < total and resume_from <= kept

    rc, again = finish(sweep(tmp_path, spec, uri), timeout=240)
    assert rc == 0, again[-3000:]
    assert "1 finished, 1 skipped" in again, again[-2000:]  # the short trial that finished is not run again
    after = {r.info.run_id: r for r in trial_runs(uri, "faults")}
    assert set(after) == set(runs) and len(after) == 2  # no duplicate run: the killed trial continued its own
    assert {r.info.status for r in after.values()} == {"FINISHED"}
    assert_exact_steps(uri, run_id, total, eval_every=12)
    other, = set(after) - {run_id}
    assert_exact_steps(uri, other, short, eval_every=12)
    assert max(int(p.name[5:14]) for p in folder.glob("ckpt-*.pt")) == total
    # It resumed from that checkpoint, not from iteration 0: the re-run's reports (one per evaluation, every
    # 12 iterations, then the final one) start at the first evaluation after the checkpoint.
    first, second = sorted((tmp_path / "out" / "ray").glob(f"tune-*/{key}*/result.json"))
    reports = [json.loads(line) for line in second.read_text().splitlines() if line.strip()]
    iterations = [r["iteration"] for r in reports]
    assert iterations[0] == (resume_from // 12 + 1) * 12 and iterations[-1] == total, iterations
    assert reports[-1]["trial_status"] == "FINISHED"
    before = [json.loads(line)["iteration"] for line in first.read_text().splitlines() if line.strip()]
    assert before[0] == 12  # the first attempt did start at 0
    report_fact("ray_kill", step_at_kill=at_kill, steps_kept=kept, resumed_from=resume_from,
                reports_first=before, reports_rerun=iterations,
                first_output=out[-400:], rerun_output=again[-300:])


# -- 4. shell syntax in sweep YAML values -------------------------------------------------------------------
def hostile_values(marker: Path) -> dict[str, str]:
    """Every way a value could reach a shell: ; && | $() `` quotes, a newline, all touching ``marker``."""
    m = str(marker)
    return {"semi": f"x; touch {m}; echo", "subst": f"$(touch {m})", "ticks": f"`touch {m}`",
            "quotes": f"it's \"quoted\" '; touch {m}; ' \"; touch {m}; \"", "newline": f"a\ntouch {m}\nb",
            "amp": f"x && touch {m} || touch {m} | cat"}


@pytest.mark.timeout(300)
@pytest.mark.parametrize("backend", ["slurm", "ray"])
def test_shell_syntax_in_sweep_values_arrives_verbatim_and_runs_nothing(backend, request, tmp_path):
    token = f"pwned-{uuid.uuid4().hex[:8]}"
    marker = tmp_path / token
    name = f"inj {token}; touch {token} $(touch {token}) `touch {token}` it's \"x\""  # no '/': a sweep name
    tags = hostile_values(marker)
    override = f"o'; touch {marker}; $(touch {marker}) `touch {marker}` \""
    spec = spec_file(tmp_path, name=name, slurm=backend == "slurm", total=10, space={"tracking.tags.override": [override]},
                     resources={"cpus": 1, "gpus": 0, "time_limit": "00:10:00"})
    tree = yaml.safe_load(spec.read_text())
    tree["base"]["tracking"]["tags"] = tags
    tree.pop("output", None)
    spec.write_text(yaml.safe_dump(tree))
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    env = request.getfixturevalue("slurm_cluster").env if backend == "slurm" else None
    rc, out = finish(sweep(tmp_path, spec, uri, "--backend", backend, env=env, output=None), timeout=240)
    assert rc == 0, out[-3000:]
    report_fact("injection", backend=backend, output=out[-500:])

    (run,) = trial_runs(uri, name)  # the experiment is the name, verbatim
    assert run.info.status == "FINISHED" and run.data.tags["backend"] == backend
    assert run.data.tags["sweep"] == name
    for key, value in tags.items():
        assert run.data.tags[key] == value, key
        assert run.data.params[f"tracking.tags.{key}"] == value, key
    assert run.data.tags["override"] == override
    assert run.data.tags["trial_overrides"] == f"tracking.tags.override={override}"
    assert run.info.run_name.startswith(f"tracking.tags.override={override} [")
    # Nothing ran: no marker anywhere the job or the orchestrator worked (the folders, the cwd, $HOME, /, /tmp)
    places = [tmp_path, REPO, Path.home(), Path("/"), Path("/tmp")]
    found = [p for p in tmp_path.rglob(f"*{token}*") if p.name == token] + \
            [p / token for p in places if (p / token).exists()]
    assert not marker.exists() and not found, found
