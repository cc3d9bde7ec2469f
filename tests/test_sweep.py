"""`orchestrate sweep` on the default backend (a real local Ray, a real MLflow store): it finishes, resumes
without duplicates after the orchestrator is killed, stops trials early with ASHA, dry-runs without side
effects, and refuses malformed specs with one line naming the key."""
from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest
import torch
import yaml
from mlflow import MlflowClient

from orchestrator.cli import main as orchestrate
from orchestrator.ledger import OWNER_TAG
from resnet_core.tracking import mlflow_client

from conftest import REPO
from processes import descendants, wait_until_gone

BIN = Path(sys.executable).parent


def smoke_spec(tmp_path: Path, name: str = "smoke", **changes) -> Path:
    spec = yaml.safe_load((REPO / "sweeps" / f"{name}.yaml").read_text())
    spec.pop("cluster", None)
    spec.update(changes)
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def sweep(tmp_path: Path, spec: Path, *args: str, **popen) -> subprocess.Popen:
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path}/mlruns.db", "PYTHONUNBUFFERED": "1",
           "ORCHESTRATE_RAY_OBJECT_STORE": str(100 * 2**20)}
    return subprocess.Popen([BIN / "orchestrate", "sweep", spec, *args], cwd=tmp_path, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, **popen)


def finish(proc: subprocess.Popen, timeout: float = 400) -> str:
    output, _ = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, output[-4000:]
    return output


def trial_runs(tmp_path: Path, experiment: str) -> list:
    client = MlflowClient(f"sqlite:///{tmp_path}/mlruns.db")
    exp = client.get_experiment_by_name(experiment)
    return [] if exp is None else client.search_runs([exp.experiment_id], "tags.kind = 'trial'")


def test_smoke_sweep_finishes_and_a_rerun_starts_nothing(tmp_path, capsys):
    spec = smoke_spec(tmp_path)
    output = finish(sweep(tmp_path, spec))
    runs = trial_runs(tmp_path, "smoke")
    assert len(runs) == 4 and all(r.info.status == "FINISHED" for r in runs), output[-2000:]
    assert all("test_error" in r.data.metrics and r.data.tags["sweep"] == "smoke" for r in runs)
    assert len({r.data.tags["trial_key"] for r in runs}) == 4
    assert "Token authentication" not in output  # Ray's warning about the sweep's own local Ray: noise
    assert "best val_error" in output, output[-2000:]  # the trials hold out a val split: not chosen on the test set
    again = finish(sweep(tmp_path, spec))
    assert "4 skipped" in again and "running" not in again
    best = min(r.data.metrics["val_error"] for r in runs)  # of trials finished by the first call: it said none
    assert f"best val_error {best:.4f} (model.plain=" in again, again[-2000:]
    assert len(trial_runs(tmp_path, "smoke")) == 4
    edited_base_is_announced(tmp_path, spec, capsys)


def edited_base_is_announced(tmp_path: Path, spec: Path, capsys) -> None:
    """An edited base gives every trial a new key under the same sweep name: the dry run warns that the old
    runs stay and get counted with the new ones, and status marks them (they mixed unannounced)."""
    from orchestrator.ledger import Ledger
    from orchestrator.sweep import prepare
    uri, edit = f"sqlite:///{tmp_path}/mlruns.db", "base.schedule.total=20"
    code = orchestrate(["sweep", str(spec), "--dry-run", "--tracking-uri", uri, "--set", edit])
    out = " ".join(capsys.readouterr().out.split())
    assert code == 0 and "sweep 'smoke' already holds 4 trial run(s) that are not trials of this spec" in out, out
    assert out.count("[new]") == 4
    ctx, edited = prepare(str(spec), sets=[edit], tracking_uri=uri)
    command = f"{spec} --set {edit} 'space.optim.nesterov=[true,false]'"
    Ledger(uri, "smoke").record_plan(edited, command)  # what the edited sweep records when it starts
    assert orchestrate(["status", "smoke", "--tracking-uri", uri]) == 0
    said = " ".join(capsys.readouterr().out.split())
    assert said.count("not a trial of the last sweep call's spec") == 4, said
    assert f"`orchestrate sweep {command}` have no run yet" in said, said  # rich took [true,false] for markup


def test_a_rerun_says_failed_trials_were_skipped_and_retry_failed_runs_them_in_their_run(tmp_path):
    spec = smoke_spec(tmp_path, space={"optim.lr": [0.1, 1e30, 1e31]})  # 1e30: the loss is NaN at once, FAILED
    first = sweep(tmp_path, spec)
    output = first.communicate(timeout=400)[0]
    assert first.returncode == 1 and "1 finished, 2 failed" in output, output[-3000:]
    assert "failed   optim.lr=1e+30" in output and "reason=loss is nan at iteration" in output, output[-3000:]
    failed = {r.info.run_id for r in trial_runs(tmp_path, "smoke") if r.info.status == "FAILED"}
    again = sweep(tmp_path, spec)
    output = again.communicate(timeout=400)[0]
    assert again.returncode == 1 and "running" not in output, output[-3000:]  # not "done" with exit 0
    assert "2 trial(s) failed in an earlier run and are skipped; --retry-failed runs them again" in output
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path}/mlruns.db"}
    for flags, state in (((), "[failed (skipped)]"), (("--retry-failed",), "[retry]")):
        dry = subprocess.run([BIN / "orchestrate", "sweep", spec, "--dry-run", *flags], cwd=tmp_path, text=True,
                             capture_output=True, env=env)
        assert dry.returncode == 0 and dry.stdout.count(state) == 2 and dry.stdout.count("[finished]") == 1, dry.stdout
    # on SLURM the two retried trials are one array of two tasks (the dry run sized it without --retry-failed)
    dry = subprocess.run([BIN / "orchestrate", "sweep", spec, "--dry-run", "--retry-failed", "--backend", "slurm"],
                         cwd=tmp_path, text=True, capture_output=True, env=env)
    assert dry.returncode == 0 and "array task 1 of 2" in dry.stdout and "#SBATCH --array=0-1" in dry.stdout, dry.stdout
    retry = sweep(tmp_path, spec, "--retry-failed")
    output = retry.communicate(timeout=400)[0]
    assert retry.returncode == 1 and "running  optim.lr=1e+30" in output, output[-3000:]
    runs = trial_runs(tmp_path, "smoke")
    assert len(runs) == 3 and failed <= {r.info.run_id for r in runs}  # the same runs, again


def test_a_trial_that_fails_before_its_run_opens_is_recorded_failed_with_its_error_in_one_line(tmp_path):
    spec = smoke_spec(tmp_path, space={"data.subset": [100000]})  # more images than the synthetic set has
    proc = sweep(tmp_path, spec)
    output = proc.communicate(timeout=400)[0]
    assert proc.returncode == 1 and "Traceback" not in output, output[-3000:]
    assert "reason=DataError: data.subset: 100000 is more than the " in output and "(traceback: " in output
    (run,) = trial_runs(tmp_path, "smoke")  # status shows it; a re-run skips it unless --retry-failed
    assert run.info.status == "FAILED" and run.data.tags["status_reason"].startswith("DataError: data.subset")
    assert run.data.params["data.subset"] == "100000" and run.data.tags["sweep"] == "smoke"
    error_file = Path(run.data.tags["status_reason"].split("(traceback: ")[1].rstrip(")"))
    assert "in split_indices" in error_file.read_text()  # the traceback, kept in the sweep's output folder


def test_a_worker_continuing_a_run_opened_for_it_logs_its_params(tmp_path):
    from resnet_core.tracking import Tracker
    tracker = Tracker(f"sqlite:///{tmp_path}/m.db", "x")
    run_id = tracker.client.create_run(tracker.experiment_id).info.run_id  # as Ledger.record_failures opens one
    tracker.start(run_id, "name", {"optim.lr": "0.1"}, {"kind": "trial"})
    assert tracker.client.get_run(run_id).data.params == {"optim.lr": "0.1"}


def sweep_until_a_trial_finishes(tmp_path: Path, *args: str) -> tuple[Path, subprocess.Popen]:
    """The smoke sweep at 60 iterations a trial, in a session of its own, once its first trial has finished."""
    spec = smoke_spec(tmp_path, base={**yaml.safe_load(smoke_spec(tmp_path).read_text())["base"],
                                      "schedule": {"total": 60, "milestones": [40]}})
    proc = sweep(tmp_path, spec, *args, start_new_session=True)
    deadline = time.monotonic() + 300
    while not any(r.info.status == "FINISHED" for r in trial_runs(tmp_path, "smoke")):
        assert proc.poll() is None and time.monotonic() < deadline, "the sweep ended before it could be stopped"
        time.sleep(1)
    return spec, proc


def test_killed_orchestrator_then_rerun_finishes_only_the_missing_trials(tmp_path):
    spec, proc = sweep_until_a_trial_finishes(tmp_path)
    started = descendants(proc.pid)
    os.killpg(proc.pid, signal.SIGKILL)  # the orchestrator and everything it started, mid-sweep
    proc.wait()
    # Ray's processes run in sessions of their own: they die with the orchestrator, not at once; a trial
    # near its end may finish meanwhile. What is in the store once they are gone is what a re-run finds.
    wait_until_gone(started)
    before = {r.data.tags["trial_key"]: r.info.status for r in trial_runs(tmp_path, "smoke")}
    assert 1 <= list(before.values()).count("FINISHED") < 4, before
    output = finish(sweep(tmp_path, spec))
    runs = trial_runs(tmp_path, "smoke")
    keys = Counter(r.data.tags["trial_key"] for r in runs)
    assert len(keys) == 4 and set(keys.values()) == {1}, keys  # none lost, none twice
    assert all(r.info.status == "FINISHED" for r in runs)
    finished_before = [k for k, s in before.items() if s == "FINISHED"]
    assert f"{len(finished_before)} skipped" in output  # finished trials were not run again
    for r in runs:  # a resumed trial continued its own run: each logged step once
        steps = [m.step for m in MlflowClient(f"sqlite:///{tmp_path}/mlruns.db").get_metric_history(
            r.info.run_id, "train_loss")]
        assert steps == sorted(set(steps)) and steps[-1] == 60


@pytest.mark.parametrize("stop", ["ctrl-c", "kill", "kill-group"])
def test_ctrl_c_stops_the_sweep_with_one_line_and_a_rerun_finishes_it(tmp_path, stop, capsys):
    """Ctrl-C (SIGINT to the terminal's process group), `kill` (SIGTERM to the orchestrator alone) and SIGTERM to
    its process group (`timeout`, `kill -- -PGID`, a service manager) stop a sweep the same way: the running
    trials checkpoint where they are and their runs end KILLED with the reason, one line says so, status names the
    command, and a re-run resumes each from that checkpoint."""
    spec, proc = sweep_until_a_trial_finishes(tmp_path, "--set", "max_concurrent=2")
    if stop == "ctrl-c":
        os.killpg(proc.pid, signal.SIGINT)
    elif stop == "kill":
        proc.terminate()  # was: the orchestrator died silently, its trials' runs RUNNING for ever
    else:  # Ray's own processes get it too: the orchestrator waited 60 s for them and ended on Ray's C++ error
        os.killpg(proc.pid, signal.SIGTERM)
    stopped_at = time.monotonic()
    output, _ = proc.communicate(timeout=180)
    assert time.monotonic() - stopped_at < 40, output[-3000:]
    assert proc.returncode == 130, output[-3000:]
    assert "interrupted; finished trials are kept, run the same command again" in output, output[-3000:]
    assert "Tuner.restore" not in output and "Traceback" not in output, output[-3000:]
    assert "stopping: the running trials checkpoint and stop" in output, output[-3000:]
    runs = trial_runs(tmp_path, "smoke")
    states = Counter(r.info.status for r in runs)
    assert states["KILLED"] >= 1 and "RUNNING" not in states, states
    stopped = {r.data.tags["status_reason"] for r in runs if r.info.status == "KILLED"}
    # written as it stopped, not the last periodic one (was: Tune ended the trial's actor without a word); a trial
    # the group's signal ended first is marked by the sweep, with where it resumes
    said_by_the_sweep = (r"|interrupted: the sweep was stopped; the same orchestrate sweep command resumes it from "
                         r"(its checkpoint at iteration \d+|iteration 0 .*)") if stop == "kill-group" else ""
    assert all(re.fullmatch(r"interrupted: stopped at iteration \d+, checkpoint written; running it again resumes it"
                            + said_by_the_sweep, reason) for reason in stopped), stopped
    assert orchestrate(["status", "smoke", "--tracking-uri", f"sqlite:///{tmp_path}/mlruns.db"]) == 0
    said = " ".join(capsys.readouterr().out.split())
    assert "interrupted: stopped at iteration" in said or (
        stop == "kill-group" and "interrupted: the sweep was stopped; the same orchestrate sweep command" in said), said
    if "have no run yet" in said:
        assert f"`orchestrate sweep {spec} --set max_concurrent=2`" in said, said
    output = finish(sweep(tmp_path, spec))
    resumed = "interrupted trial(s) resume" + ("" if stop == "kill-group" else " from their checkpoints")
    assert resumed in output, output[-3000:]
    runs = trial_runs(tmp_path, "smoke")
    assert sorted(Counter(r.data.tags["trial_key"] for r in runs).values()) == [1, 1, 1, 1]
    assert all(r.info.status == "FINISHED" for r in runs), output[-2000:]
    for r in runs:  # each continued its own run from where it stopped: every step logged once
        steps = [m.step for m in MlflowClient(f"sqlite:///{tmp_path}/mlruns.db").get_metric_history(
            r.info.run_id, "train_loss")]
        assert steps == sorted(set(steps)) and steps[-1] == 60, steps


def test_the_last_line_of_a_stopped_sweep_gives_no_eta(capsys):
    """It said "interrupted: 1 finished, 1 pending; ...; ETA 0:00:27" for a sweep that had stopped."""
    from types import SimpleNamespace
    from orchestrator.progress import SweepProgress
    trials = [SimpleNamespace(key=f"key{i}", label=f"trial {i}") for i in range(2)]
    with pytest.raises(KeyboardInterrupt):
        with SweepProgress("s", trials, {}, live=False) as progress:
            progress.update("key0", "finished", test_error=0.5)
            assert progress.eta_seconds() is not None  # while it runs, one done and one to go give an ETA
            raise KeyboardInterrupt
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert "interrupted: 1 pending, 1 finished" in last and "ETA" not in last, last


def test_asha_stops_a_trial_early_and_the_run_says_why(tmp_path, capsys):
    output = finish(sweep(tmp_path, smoke_spec(tmp_path, "smoke_lr")))
    runs = trial_runs(tmp_path, "smoke_lr")
    assert len(runs) == 4
    stopped = [r for r in runs if r.data.tags.get("early_stopped") == "true"]
    assert stopped, output[-3000:]
    for r in stopped:
        assert r.info.status == "KILLED"
        assert r.data.tags["status_reason"].startswith("stopped early by ASHA at epoch")
        assert r.data.metrics["epoch"] < 5
        assert r.data.metrics["best_val_error"] <= r.data.metrics["val_error"]  # status shows it for stopped ones
    assert "stopped" in output
    # the best so far is chosen on ASHA's metric; the finished trials' view lacked it and said no best
    best = min(r.data.metrics["val_loss"] for r in runs if r.info.status == "FINISHED")
    assert f"best val_loss {best:.4f} (optim.lr=" in output.splitlines()[-1], output[-2000:]
    # the dry run of a re-run: stopped trials are final (nothing left to run) but not "finished"
    spec = tmp_path / "smoke_lr.yaml"
    assert orchestrate(["sweep", str(spec), "--dry-run", "--tracking-uri", f"sqlite:///{tmp_path}/mlruns.db"]) == 0
    out = capsys.readouterr().out
    assert out.count("[stopped early]") == len(stopped) and out.count("[finished]") == 4 - len(stopped), out
    assert "scheduler: ASHA on val_loss (min)" in out and "as if ASHA stopped none, an upper bound" in out, out
    assert "0.00 still to run" in out, out


@pytest.mark.parametrize("launcher", ["python", "torchrun"])
def test_a_diverged_trial_under_asha_fails_alone(tmp_path, launcher):
    """Its last report has no val_loss, and Tune's check for ASHA's metric ended the whole sweep in a traceback
    (in the Tune actor, and relayed from a torchrun child)."""
    spec = smoke_spec(tmp_path, "smoke_lr", space={"optim.lr": [0.1, 1e30]}, num_samples=1, launcher=launcher)
    proc = sweep(tmp_path, spec)
    output = proc.communicate(timeout=400)[0]
    assert proc.returncode == 1 and "Traceback" not in output, output[-3000:]
    assert "1 finished, 1 failed" in output, output[-3000:]
    (failed,) = [line for line in output.splitlines() if "failed   optim.lr=1e+30" in line]
    assert "reason=loss is nan at iteration" in failed and "nan" not in failed.split("reason=")[0], failed


def test_an_asha_rung_on_the_last_epoch_keeps_every_trained_trial(tmp_path):
    """One epoch each (6 steps of 64 from 384 images), ASHA's first rung at epoch 1: every trial has trained to
    its end, so none is 'stopped early' — each ends FINISHED with its weights, usable by report and ensemble."""
    base = yaml.safe_load((REPO / "sweeps" / "smoke_lr.yaml").read_text())["base"]
    base["schedule"] = {"total": 6, "kind": "constant"}
    base["checkpoint"] = {"every": 6}
    output = finish(sweep(tmp_path, smoke_spec(tmp_path, "smoke_lr", base=base)))
    runs = trial_runs(tmp_path, "smoke_lr")
    assert len(runs) == 4 and all(r.info.status == "FINISHED" for r in runs), output[-3000:]
    assert not [r for r in runs if r.data.tags.get("early_stopped")], output[-3000:]
    client = MlflowClient(f"sqlite:///{tmp_path}/mlruns.db")
    assert all("model.pt" in {a.path for a in client.list_artifacts(r.info.run_id)} for r in runs)


def test_fused_sweep_trains_groups_as_one_process_and_each_trial_keeps_its_run(tmp_path, capsys):
    spec = smoke_spec(tmp_path, "smoke_fused")
    assert orchestrate(["sweep", str(spec), "--dry-run", "--tracking-uri", f"sqlite:///{tmp_path}/m.db"]) == 0
    dry = capsys.readouterr().out
    assert dry.count("4 trials trained as one fused model") == 2 and dry.count("train_fused(<4 trial configs>)") == 2
    assert "fused members counted as separate trials, an upper bound" in dry  # no measured fusion speed-up yet
    output = finish(sweep(tmp_path, spec))
    runs = trial_runs(tmp_path, "smoke_fused")
    assert len(runs) == 8 and all(r.info.status == "FINISHED" for r in runs), output[-3000:]
    assert len({r.data.tags["trial_key"] for r in runs}) == 8
    groups = Counter(r.data.tags["fused_group"] for r in runs)
    assert sorted(groups.values()) == [4, 4]  # ResNet-8s in one process, plain-8s in another
    jobs = {r.data.tags["fused_group"]: r.data.tags["backend_job_id"] for r in runs}
    assert all(r.data.tags["backend_job_id"] == jobs[r.data.tags["fused_group"]] for r in runs)  # one Tune trial
    assert output.count("finished ") == 8 and "8 finished" in output
    again = finish(sweep(tmp_path, spec))
    assert "8 skipped" in again and "running" not in again
    # each member left its own single-model weights: the ensemble reads them like any trial's
    assert orchestrate(["ensemble", "--top", "3", "--sweep", "smoke_fused", "--cache", str(tmp_path / "cache"),
                        "--tracking-uri", f"sqlite:///{tmp_path}/mlruns.db"]) == 0
    assert "ensemble (mean, 3 members)" in capsys.readouterr().out


def test_dry_run_prints_trials_commands_and_gpu_hours_and_changes_nothing(tmp_path, capsys):
    spec = smoke_spec(tmp_path)
    assert orchestrate(["sweep", str(spec), "--dry-run", "--tracking-uri", f"sqlite:///{tmp_path}/m.db"]) == 0
    out = capsys.readouterr().out
    assert out.count("\ntrial ") == 4 and "resnet_core.train" in out
    assert "estimated GPU-hours" in out and "nothing submitted" in out and "fused members" not in out
    assert not (tmp_path / "m.db").exists() and not (tmp_path / "runs").exists()


def test_dry_run_of_the_paper_depth_sweep_estimates_gpu_hours(capsys):
    assert orchestrate(["sweep", str(REPO / "sweeps" / "cifar_depth.yaml"), "--dry-run",
                        "--tracking-uri", "sqlite:////nonexistent/dir/m.db"]) == 0
    out = capsys.readouterr().out
    assert out.count("\ntrial ") == 30  # 10 nets x 3 seeds
    assert "\ntrials in the order they start (longest first" in out  # the order was not said
    assert out.index("model.name=resnet110") < out.index("model.name=resnet56") < out.index("model.name=resnet20")
    hours = float(out.split("estimated GPU-hours: ")[1].split()[0])
    assert 0.5 < hours < 20  # ~27 min for the five ResNets with CUDA graphs (gpu.md), x3 seeds, + plain nets


def test_the_memory_check_of_a_profile_with_a_gpu_type_says_it_assumed_80_gb(capsys):
    """The compute nodes' GPUs (the profile's GRES type), not this machine's card: an A100 profile was checked
    against 80 GB without a word."""
    assert orchestrate(["sweep", str(REPO / "sweeps" / "cifar_depth.yaml"), "--dry-run", "--backend", "slurm",
                        "--set", "cluster=slurm-example", "resources.gpus=1",
                        "--tracking-uri", "sqlite:////nonexistent/dir/m.db"]) == 0
    assert ("of 80 GiB (default (H100 80GB); the profile's gpu_type is 'a100': set resources.gpu_memory_gb to its "
            "memory)") in capsys.readouterr().out


def test_a_dry_run_of_a_ray_sweep_does_not_import_ray(tmp_path):
    """A dry run is what a user re-runs while editing a sweep: importing Ray cost it ~2 s of ~15 s."""
    code = ("import sys; from orchestrator.cli import main; "
            f"code = main(['sweep', {str(smoke_spec(tmp_path))!r}, '--dry-run', '--tracking-uri', "
            f"'sqlite:///{tmp_path}/m.db']); print('ray loaded' if 'ray' in sys.modules else 'no ray', code)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.stdout.splitlines()[-1] == "no ray 0", done.stdout[-2000:] + done.stderr[-2000:]


def test_set_edits_a_shipped_sweep_from_the_command_line(capsys):
    """Shrinking a shipped sweep needs no copy of its YAML (a copy's relative paths mean something else)."""
    assert orchestrate(["sweep", str(REPO / "sweeps" / "cifar_depth.yaml"), "--dry-run", "--tracking-uri",
                        "sqlite:////nonexistent/dir/m.db", "--set", "base.schedule.total=200",
                        "base.schedule.milestones=[100,150]", "space.model.name=[resnet20,plain20]",
                        "--set", "space.seed=[0]"]) == 0  # a second --set adds to the first (it replaced it)
    out = capsys.readouterr().out
    assert out.count("\ntrial ") == 2 and "model.name=plain20 seed=0" in out
    assert orchestrate(["sweep", str(REPO / "sweeps" / "cifar_depth.yaml"), "--dry-run",
                        "--set", "base.schedule.totl=200"]) == 2
    # the --set is named, not the YAML (it said "cifar_depth.yaml: trial model.name=resnet110 seed=0: ...")
    assert "error: --set base.schedule.totl=200: base.schedule.totl: unknown key" in capsys.readouterr().err
    assert orchestrate(["sweep", str(REPO / "sweeps" / "cifar_depth.yaml"), "--dry-run",
                        "--set", "space.model.name=[resnet20,resnet21]"]) == 2
    assert "error: --set space.model.name=[resnet20,resnet21]: trial model.name=resnet21" in capsys.readouterr().err
    assert orchestrate(["sweep", str(REPO / "sweeps" / "cifar_depth.yaml"), "--dry-run", "--set", "name.x=1"]) == 2
    assert capsys.readouterr().err.strip().endswith("--set name.x=1: name.x: 'name' is a value, not a section")
    assert orchestrate(["sweep", str(REPO / "sweeps" / "smoke.yaml"), "--dry-run", "--set", "base.batch_size=[1"]) == 2
    said = capsys.readouterr().err  # the --set was named twice
    assert said.count("--set") == 1 and "not valid YAML (expected ',' or ']'" in said and "a list is [a, b]" in said


def test_a_shortened_sweep_is_warned_that_its_schedule_runs_past_the_end(capsys):
    """`--set base.schedule.total=200` on the paper's sweep trained every trial at the warm-up lr 0.01, unannounced
    (a worker's warning never reaches the sweep's console): the dry run says so, and so does the sweep."""
    assert orchestrate(["sweep", str(REPO / "sweeps" / "cifar_depth.yaml"), "--dry-run",
                        "--tracking-uri", "sqlite:////nonexistent/dir/m.db", "--set", "base.schedule.total=200"]) == 0
    out = capsys.readouterr().out
    assert "warning: schedule.milestones 32000, 48000 >= schedule.total 200" in out, out
    assert "warning: schedule.warmup.length 400 >= schedule.total 200: the whole run warms up" in out, out
    assert orchestrate(["sweep", str(REPO / "sweeps" / "smoke.yaml"), "--dry-run", "--tracking-uri",
                        "sqlite:////nonexistent/dir/m.db", "--set", "space.schedule.total=[30,10]"]) == 0
    assert "warning: 4 trial(s) (model.plain=False optim.lr=0.1 schedule.total=10, ...): schedule.milestones 20 >= " \
           "schedule.total 10" in capsys.readouterr().out


@pytest.mark.parametrize("name", sorted(p.stem for p in (REPO / "sweeps").glob("*.yaml")))
def test_every_shipped_sweep_dry_runs(name, capsys):
    code = orchestrate(["sweep", str(REPO / "sweeps" / f"{name}.yaml"), "--dry-run",
                        "--tracking-uri", "sqlite:////nonexistent/dir/m.db"])
    out, err = capsys.readouterr()
    assert code == 0 and "estimated GPU-hours" in out, err
    assert "warning: schedule" not in out, out
    if name == "imagenet_depth":  # ImageNet is not on this machine: said, but a login node's dry run goes on
        assert "warning:" in out and "base.data.path" in out and "/datasets/imagenet" in out
        assert out.strip().endswith("nothing logged; 1 warning(s) at the top"), out[-300:]  # not scrolled away


def test_a_real_run_stops_on_missing_data_before_anything_starts(tmp_path, capsys):
    spec = smoke_spec(tmp_path, base={**yaml.safe_load(smoke_spec(tmp_path).read_text())["base"],
                                      "data": {"path": str(tmp_path / "nowhere")}})
    assert orchestrate(["sweep", str(spec), "--tracking-uri", f"sqlite:///{tmp_path}/m.db"]) == 2
    assert "base.data.path" in capsys.readouterr().err and not (tmp_path / "m.db").exists()


BASE = {"model": {"name": "resnet_cifar", "depth": 8}, "data": {"path": "synthetic"},
        "schedule": {"total": 10, "milestones": [5]}}
MALFORMED = [
    ({"name": "x", "nmae": "y"}, "nmae: unknown key"),
    ({"name": "x", "num_samples": "many"}, "num_samples: Input should be a valid integer"),
    ({"name": "x", "space": {"optim.lr": []}}, "space.optim.lr: an empty grid"),
    ({"name": "x", "space": {"seed": [0, 1, 0]}}, "space.seed: 0 is listed twice; a trial runs once"),
    # equal once validated: ran as one trial, unannounced (the grid promised two)
    ({"name": "x", "space": {"optim.lr": [0.1, "0.1"]}}, "space.optim.lr: 0.1 and '0.1' make the same trial"),
    ({"name": "x", "space": {"model.plain": [False, 0]}}, "space.model.plain: False and 0 make the same trial"),
    ({"name": "x", "num_samples": 3, "space": {"optim.lr": [0.1, 0.05]}}, "num_samples: 3 repeats of a grid with "
                                                                          "nothing sampled are one trial each time"),
    ({"name": "x", "space": {"model.name": ["resnet21"]}}, "model.name: unknown model 'resnet21'"),
    ({"name": "x", "space": {"model.depth": [20, 21]}}, "model.depth: depth 21 is not 6n+2"),
    ({"name": "x", "backend": "slurm", "resources": {"gpus": 0.5, "nodes": 2}}, "cannot span 2 nodes"),
    ({"name": "x", "backend": "kubernetes"}, "backend: unknown backend 'kubernetes'"),
    ({"name": "x", "base": {**BASE, "data": {"path": "/no/such/data"}}},
     "base.data.path: /no/such/data does not exist"),
    ({"name": "x", "base": {**BASE, "optim": {"lrr": 0.1}}, "space": {"seed": [0, 1]}},
     "bad.yaml: base.optim.lrr: unknown key"),  # was blamed on the first trial, "trial seed=0"
    ({"name": "x", "seed": [0, 1]}, "seed: is the seed of the space's sampling, one integer; to train with several"),
    ({"name": "x", "space": {"optim": {"lr": [0.1, 0.05]}}}, "space.optim: the space's keys are dotted config "
                                                              "keys: write optim.lr: [...] instead of nesting"),
    ({"name": "x", "space": {"optim.lrr": [0.1]}}, "optim.lrr: unknown key"),
    ({"name": "x", "space": {"optim.lr": {"normal": [0, 1]}}}, "space.optim.lr: unknown distribution 'normal'"),
    ({"name": "x", "space": {"optim.lr": {"loguniform": [0.5, 0.01]}}}, "space.optim.lr.loguniform"),
    ({"name": "x", "resources": {"time_limit": "2 hours"}}, "resources.time_limit"),
    ({"name": "x", "space": {"seed": [0, 1]}, "scheduler": {"asha": {"mode": "best"}}}, "scheduler.asha.mode"),
    ({"name": "x", "scheduler": {"hyperband": {}}}, "scheduler.hyperband: unknown key"),
    ({"name": "x", "space": {"seed": [0, 1]}, "scheduler": {"asha": {"metric": "test_error", "mode": "max"}}},
     "scheduler.asha.mode: max would keep the trials of highest test_error, the worst"),
    ({"name": "x", "cluster": "nowhere.yaml"}, "cluster: profile 'nowhere.yaml' not found"),
    ({"name": "x", "cluster": "nowhere"}, "cluster: profile 'nowhere' not found (looked in "),
    ({"base": BASE}, "name: Field required"),
    ({"name": "a/b"}, "name: Value error, 'a/b'"),
    ({"name": "x", "max_concurrent": 0}, "max_concurrent: Input should be greater than or equal to 1"),
    ({"name": "x", "resources": {"nodes": 2}}, "resources.nodes: multi-node trials run on the slurm backend"),
    ({"name": "x", "resources": {"gpus": 1.5}}, "resources.gpus"),
    ({"name": "x", "space": {"batch_size": ["abc"]}}, "batch_size: Input should be a valid integer"),
    ({"name": "x", "space": {"seed": [0, 1]}, "scheduler": {"asha": {"metric": "val_error"}}},
     "scheduler.asha.metric: val_error needs a validation split"),
    ({"name": "x", "base": {**BASE, "model": {"name": "resnet152"}, "batch_size": 256}, "space": {"seed": [0, 1, 2, 3]},
      "resources": {"gpus": 0.25}}, "resources.gpus: 4 trials per GPU (resources.gpus 0.25) may need"),
    ({"name": "x", "base": {**BASE, "batch_size": 64}, "resources": {"gpus": 1, "gpu_memory_gb": 0.5}},
     "resources.gpus: one trial may need 0.8 GiB of GPU memory, over 90% of 0 GiB (resources.gpu_memory_gb)"),
    ({"name": "x", "fuse": 4, "space": {"seed": [0, 1]}, "scheduler": {"asha": {}}}, "fuse: fused trials train and stop together"),
    ({"name": "x", "fuse": 2, "resources": {"gpus": 2}}, "fuse: a fused group trains in one process"),
    ({"name": "x", "fuse": 2, "space": {"seed": [0, 1]}, "base": {**BASE, "dist": {"engine": "deepspeed"}}},
     "dist.engine: fused trials train in one process without DeepSpeed"),
    ({"name": "x", "scheduler": {"asha": {"max_t": 1, "grace_period": 5}}},
     "scheduler.asha.grace_period: 5 epochs is more than max_t 1"),  # was Ray's AssertionError at run time
    ({"name": "x" * 300}, "300 bytes; a sweep name names folders"),
    ({"name": "x", "base": {**BASE, "tracking": {"uri": "sqlite:///mine.db"}}},
     "base.tracking.uri: the sweep sets it for every trial; use tracking_uri: at the top of the spec"),
    ({"name": "x", "scheduler": {"asha": {"metrc": "val_loss"}}},
     "scheduler.asha.metrc: unknown key; valid keys here: metric, mode, max_t"),  # an optional section's keys  # was OSError after the experiment existed
    ({"name": "-rf"}, "name: '-rf': a sweep name cannot start with '-'"),
    ({"name": "x", "base": {**BASE, "data": {"path": "synthetic", "val_split": 512}}},  # every trial failed on it
     "base.data.val_split: 512 leaves no train images (data.synthetic.train_size is 512)"),  # `orchestrate status -rf` was an option
    ({"name": "x", "resources": {"time_limit": "00:99:00"}}, "'00:99:00' is not [D-]HH:MM:SS (minutes and seconds"),
    ({"name": "x", "resources": {"time_limit": "0-00:00:00"}}, "resources.time_limit: '0-00:00:00' leaves a trial no"),
    # a value a distribution can sample failed the sweep or passed by the luck of the seed (this one: seed 0)
    ({"name": "x", "space": {"optim.lr": {"uniform": [-1, 1]}}},
     "bad.yaml: space.optim.lr.uniform: [-1, 1] can sample -1: optim.lr: Input should be greater than 0"),
    ({"name": "x", "space": {"batch_size": {"randint": [0, 64]}}}, "space.batch_size.randint: [0, 64] can sample 0"),
    ({"name": "x", "space": {"schedule.warmup.until_train_error": {"uniform": [0.5, 1.5]}},
      "base": {**BASE, "schedule": {**BASE["schedule"], "warmup": {"kind": "constant", "lr": 0.01}}}},
     "space.schedule.warmup.until_train_error.uniform: [0.5, 1.5] can sample 1.5"),
    ({"name": "x", "space": {"model.depth": {"choice": [8, 9]}}}, "space.model.depth.choice: [8, 9] can sample 9"),
]


@pytest.mark.parametrize("spec,message", MALFORMED, ids=[m for _, m in MALFORMED])
def test_malformed_spec_is_one_line_naming_the_key_and_nothing_happens(tmp_path, capsys, monkeypatch, spec, message):
    monkeypatch.chdir(tmp_path)
    spec = {"base": BASE, **spec}
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(spec))
    assert orchestrate(["sweep", str(path), "--tracking-uri", f"sqlite:///{tmp_path}/m.db"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and message.replace("Value error, ", "") in err, err
    assert not (tmp_path / "m.db").exists() and not (tmp_path / "runs").exists()


def test_a_mistyped_option_shows_its_command_usage_and_the_option_it_meant(capsys):
    """It showed "usage: orchestrate [-h] COMMAND ..." and no hint, whichever command was mistyped."""
    with pytest.raises(SystemExit) as stopped:
        orchestrate(["sweep", "sweeps/smoke.yaml", "--dryrun"])
    err = capsys.readouterr().err
    assert stopped.value.code == 2 and err.startswith("usage: orchestrate sweep "), err
    assert err.strip().endswith("error: unrecognized arguments: --dryrun (did you mean --dry-run?)"), err


@pytest.mark.parametrize("argv, said", [(["swep", "x.yaml"], "unknown command 'swep' (did you mean sweep?)"),
                                        (["train", "--keys", "--print-config"], "not allowed with argument --keys")])
def test_a_mistyped_command_or_options_that_exclude_each_other_are_one_line(capsys, argv, said):
    """'swep' got argparse's list of choices and no hint; --keys quietly ignored --print-config."""
    with pytest.raises(SystemExit) as stopped:
        orchestrate(argv)
    err = capsys.readouterr().err
    assert stopped.value.code == 2 and err.strip().endswith(said), err


@pytest.mark.parametrize("text,message", [
    ("name: [unclosed", "not valid YAML"),
    ("name: x\nbase: {model: {depth: 8}\nspace: {}\n", "bad.yaml:3:1: not valid YAML (expected ',' or '}', but got '<scalar>')"),
    ("- a\n- b\n", "top level must be"),
    ("model: {depth: 8}\noptim: {lr: 0.1}\n", "is a trial config, not a sweep spec: train it with `orchestrate train"),
    ("name: x\nspace: {seed: [0]}\nspace: {seed: [1]}\n", "bad.yaml:3:1: not valid YAML (duplicate key 'space')"),
    ("name: x\nbase: &b {x: *b}\n", "bad.yaml: not usable YAML (Circular reference detected)"),
    ("\udcff", "bad.yaml: not a text file"),
])
def test_spec_that_is_not_a_mapping_is_refused(tmp_path, capsys, text, message):
    path = tmp_path / "bad.yaml"
    path.write_bytes(text.encode(errors="surrogateescape"))
    assert orchestrate(["sweep", str(path)]) == 2
    assert message in capsys.readouterr().err


@pytest.mark.parametrize("profile, message", [
    ("slurrm: {partition: debug}\n", "profile.yaml: slurrm: unknown key; valid keys here: slurm, ray"),
    ("ray: {adress: auto}\n", "profile.yaml: ray.adress: unknown key; valid keys here: address"),
    ("ray: 5\n", "profile.yaml: ray: Input should be a valid dictionary"),
    # the slurm section, checked whatever the backend (a typo was ignored until --backend slurm)
    ("slurm: {partiton: debug}\n", "profile.yaml: slurm.partiton: unknown key; valid keys here: partition, account"),
    # each was a traceback, a message without the key, or nonsense in the sbatch script
    ("slurm: {python: 3}\n", "profile.yaml: slurm.python: Input should be a valid string"),
    ("slurm: {signal_delay_s: abc}\n", "profile.yaml: slurm.signal_delay_s: Input should be a valid integer"),
    ("slurm: {signal_delay_s: -100}\n", "profile.yaml: slurm.signal_delay_s: Input should be greater than or equal"),
    ("slurm: {poll_s: -1}\n", "profile.yaml: slurm.poll_s: Input should be greater than 0"),
    ("slurm: {partition: [a, b]}\n", "profile.yaml: slurm.partition: Input should be a valid string"),
    ("slurm: {max_num_timeout: lots}\n", "profile.yaml: slurm.max_num_timeout: Input should be a valid integer"),
])
def test_a_typo_in_a_cluster_profile_is_named_not_ignored(tmp_path, capsys, profile, message):
    (tmp_path / "profile.yaml").write_text(profile)
    spec = smoke_spec(tmp_path, cluster="profile.yaml")
    assert orchestrate(["sweep", str(spec), "--dry-run"]) == 2
    said = capsys.readouterr().err
    assert message in said and said.count("\n") == 1, said


def test_a_copied_shipped_spec_finds_its_cluster_profile_by_name(tmp_path, monkeypatch, capsys):
    """The shipped specs named ../cluster/local-slurm.yaml: a copy anywhere else failed even a local Ray run."""
    spec = tmp_path / "smoke.yaml"
    spec.write_text((REPO / "sweeps" / "smoke.yaml").read_text())
    monkeypatch.chdir(tmp_path)
    assert orchestrate(["sweep", str(spec), "--dry-run", "--tracking-uri", f"sqlite:///{tmp_path}/mlruns.db"]) == 0
    from orchestrator.spec import load_cluster_profile, load_spec
    loaded, path = load_spec(str(spec), {}, [])
    assert load_cluster_profile(loaded, path) == yaml.safe_load((REPO / "cluster" / "local-slurm.yaml").read_text())


@pytest.mark.parametrize("args, said", [
    (["--max-concurrent", "0", "--dry-run"], "--max-concurrent 0: max_concurrent: Input should be greater than"),
    (["--set", "base.data.path=/nope"], "--set base.data.path=/nope: base.data.path: /nope does not exist")])
def test_a_bad_command_line_value_is_blamed_on_its_option_not_the_file(tmp_path, capsys, args, said):
    """Both were blamed on sweeps/smoke.yaml, which says max_concurrent: 2 and data.path: synthetic."""
    spec = smoke_spec(tmp_path)
    assert orchestrate(["sweep", str(spec), "--tracking-uri", f"sqlite:///{tmp_path}/mlruns.db", *args]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"orchestrate sweep: error: {said}") and err.count("\n") == 1, err
    assert not (tmp_path / "mlruns.db").exists()


def test_missing_spec_file_is_named(tmp_path, capsys):
    assert orchestrate(["sweep", str(tmp_path / "nope.yaml")]) == 2
    err = capsys.readouterr().err
    assert "sweep spec not found" in err and "nope.yaml" in err
    assert orchestrate(["sweep", str(tmp_path)]) == 2
    assert f"{tmp_path}: is a folder, not a YAML file" in capsys.readouterr().err


def test_a_store_that_is_not_a_database_stops_a_sweep_before_its_engine_starts(tmp_path, capsys):
    (tmp_path / "notdb.db").write_text("not a database\n")
    assert orchestrate(["sweep", str(smoke_spec(tmp_path)), "--tracking-uri", f"sqlite:///{tmp_path}/notdb.db"]) == 2
    assert "notdb.db is not an SQLite database" in capsys.readouterr().err
    assert not (tmp_path / "runs").exists()


def test_an_output_that_is_a_file_is_refused_before_anything_starts(tmp_path, capsys):
    (tmp_path / "taken").write_text("")
    assert orchestrate(["sweep", str(smoke_spec(tmp_path)), "--output", str(tmp_path / "taken"),
                        "--tracking-uri", f"sqlite:///{tmp_path}/m.db"]) == 2
    assert "is a file; the sweep writes checkpoints and logs into a folder there" in capsys.readouterr().err
    assert not (tmp_path / "m.db").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks a machine without a GPU")
def test_asking_for_a_gpu_the_local_ray_lacks_is_one_line_not_a_wait_for_ever(tmp_path):
    spec = smoke_spec(tmp_path, resources={"cpus": 1, "gpus": 0.5})
    proc = sweep(tmp_path, spec)
    output, _ = proc.communicate(timeout=120)  # Tune alone would wait, warning once a minute
    assert proc.returncode == 2, output[-2000:]
    assert "resources.gpus: each trial asks for 0.5 GPU but this machine has 0" in output, output[-2000:]
    assert "CUDA MPS" not in output  # refused before MPS and Ray start, not after ~20 s of them
    assert trial_runs(tmp_path, "smoke") == []
    # nor a recorded plan (`status` listed the refused sweep with 4 trials "not started"), nor an empty experiment
    # (the UI listed it)
    assert MlflowClient(f"sqlite:///{tmp_path}/mlruns.db").get_experiment_by_name("smoke") is None


@pytest.mark.parametrize("conf, message", [(None, "SLURM does not answer (sinfo: fatal:"),
                                           ("/nonexistent/slurm.conf", "SLURM_CONF=/nonexistent/slurm.conf is not a file")])
def test_a_slurm_sweep_without_a_reachable_slurm_is_one_line(tmp_path, conf, message):
    env = {k: v for k, v in os.environ.items() if k != "SLURM_CONF"} | ({"SLURM_CONF": conf} if conf else {})
    out = subprocess.run([BIN / "orchestrate", "sweep", smoke_spec(tmp_path), "--backend", "slurm",
                          "--tracking-uri", f"sqlite:///{tmp_path}/mlruns.db"],
                         cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 2 and message in out.stderr, out.stderr[-2000:]
    assert "Traceback" not in out.stderr and not list(tmp_path.glob("runs/**/slurm/*/*"))
    # refused before the plan is recorded (`status` listed the sweep with 4 trials "not started")
    assert "pending" not in out.stdout, out.stdout
    assert MlflowClient(f"sqlite:///{tmp_path}/mlruns.db").get_experiment_by_name("smoke") is None


@pytest.mark.parametrize("address", ["auto", "127.0.0.1:1"])  # 127.0.0.1:1: Ray alone retries for 3 minutes
def test_a_ray_address_where_no_cluster_answers_is_one_line(tmp_path, address):
    # RAY_TMPDIR: `auto` reads <it>/ray/ray_current_cluster, which a `ray start` elsewhere may have left
    env = {**os.environ, "RAY_TMPDIR": str(tmp_path)}
    out = subprocess.run([BIN / "orchestrate", "sweep", smoke_spec(tmp_path), "--address", address,
                          "--tracking-uri", f"sqlite:///{tmp_path}/mlruns.db"],
                         cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 2 and f"ray address {address}: no Ray cluster answers there" in out.stderr, out.stderr[-2000:]
    assert "Traceback" not in out.stderr


def test_a_trial_can_run_as_a_torchrun_child_inside_its_ray_actor(tmp_path):
    """The path of multi-GPU trials: torchrun in the Tune actor, its reports relayed to Tune (1 CPU process here)."""
    base = yaml.safe_load(smoke_spec(tmp_path).read_text())["base"]
    spec = smoke_spec(tmp_path, space={"optim.lr": [0.1, 1e30]}, launcher="torchrun", base=base)
    proc = sweep(tmp_path, spec)
    output = proc.communicate(timeout=400)[0]
    assert proc.returncode == 1 and "1 finished, 1 failed" in output, output[-3000:]
    run = next(r for r in trial_runs(tmp_path, "smoke") if r.info.status == "FINISHED")
    assert run.data.tags["backend"] == "ray", output[-2000:]
    assert "epoch=5" in output  # the child's final report reached the view
    # a diverged child's own reason, not "torchrun ... exited with 1"
    (failed,) = [line for line in output.splitlines() if "failed   optim.lr=1e+30" in line]
    assert "loss is nan" in failed.lower() and "exited with" not in failed, failed


@pytest.fixture
def ray_head(tmp_path):
    """A Ray cluster of our own (`ray start --head --block` in its own session), as a user's existing cluster.
    Ended by its session id at the end, never with `ray stop` (which ends every Ray on the machine)."""
    import socket
    import tempfile
    import threading
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    temp = Path(tempfile.mkdtemp(prefix="rh-", dir="/tmp"))  # short: Ray's socket paths are length-limited
    head = subprocess.Popen([BIN / "ray", "start", "--head", f"--port={port}", "--num-cpus=2", "--num-gpus=0",
                             "--include-dashboard=false", f"--temp-dir={temp}", "--object-store-memory=100000000",
                             "--block"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    lines, started = [], threading.Event()
    def read():
        for line in head.stdout:
            lines.append(line)
            if "Ray runtime started" in line:
                started.set()
    threading.Thread(target=read, daemon=True).start()
    try:
        assert started.wait(120), "".join(lines)[-3000:]
        yield {"address": f"127.0.0.1:{port}", "process": head, "temp": temp}
    finally:
        for sig in (signal.SIGTERM, signal.SIGKILL):
            members = [int(e.name) for e in Path("/proc").iterdir() if e.name.isdigit() and _session_of(e) == head.pid]
            for pid in members:
                try:
                    os.kill(pid, sig)
                except ProcessLookupError:
                    pass
            time.sleep(3 if sig == signal.SIGTERM else 0)
        head.wait(timeout=30)
        import shutil
        shutil.rmtree(temp, ignore_errors=True)


def _session_of(proc_dir: Path) -> int | None:
    try:
        return int((proc_dir / "stat").read_text().rsplit(")", 1)[1].split()[3])  # state ppid pgrp session
    except (OSError, IndexError, ValueError):
        return None


def test_sweep_runs_on_an_existing_ray_cluster_and_leaves_it_running(tmp_path, ray_head):
    spec = smoke_spec(tmp_path)
    output = finish(sweep(tmp_path, spec, "--address", ray_head["address"]))
    runs = trial_runs(tmp_path, "smoke")
    assert len(runs) == 4 and all(r.info.status == "FINISHED" for r in runs), output[-2000:]
    # the trials ran in that cluster's workers (their logs are in its session folder), and it still runs
    worker_logs = list(ray_head["temp"].glob("session_*/logs/worker-*"))
    assert worker_logs, f"no worker of the cluster at {ray_head['address']} ran anything"
    assert ray_head["process"].poll() is None, "the sweep ended a cluster it did not start"


def test_the_resume_line_tells_apart_trials_without_a_checkpoint(tmp_path):
    """A re-run with another --output finds the interrupted runs but not their checkpoints: it said 'resume from
    their checkpoints' and the trials trained from iteration 0."""
    from resnet_core import checkpoint
    from orchestrator.ledger import DONE, RESUME, Plan
    from orchestrator.sweep import prepare, resume_message
    ctx, trials = prepare(str(smoke_spec(tmp_path)), output=str(tmp_path / "out"))
    first, second, third = (t.key for t in trials[:3])
    checkpoint.save(ctx.output / "checkpoints" / first, 10, {"iteration": 10, "step": {}, "run_id": "r",
                                                              "trial_key": first}, keep=1)
    plan = Plan(reason={first: RESUME, second: RESUME, third: DONE})
    said = resume_message(ctx, plan)
    assert said.startswith("sweep 'smoke': 2 interrupted trial(s) resume; 1 of them have no checkpoint in "
                           f"{tmp_path / 'out' / 'checkpoints'}"), said
    assert resume_message(ctx, Plan(reason={first: RESUME})) == ("sweep 'smoke': 1 interrupted trial(s) resume "
                                                                  "from their checkpoints")


def test_a_stopped_sweep_counts_a_trial_that_had_no_run_yet_as_interrupted(tmp_path):
    """Ctrl-C just after SLURM started two jobs, before their workers opened runs: the last line said
    'interrupted: 2 running, 2 finished' while sacct said CANCELLED."""
    from orchestrator.ledger import Ledger
    from orchestrator.progress import SweepProgress
    from orchestrator.sweep import mark_interrupted, prepare
    ctx, trials = prepare(str(smoke_spec(tmp_path)), tracking_uri=f"sqlite:///{tmp_path}/mlruns.db")
    ledger = Ledger(ctx.tracking_uri, "smoke")
    ledger.client.create_run(ledger.experiment_id, tags={"kind": "trial", "trial_key": trials[0].key})
    progress = SweepProgress("smoke", trials[:2], {}, live=False)
    for trial in trials[:2]:
        progress.update(trial.key, "running")
    mark_interrupted(ctx, progress, trials[:2])
    assert progress.counts()["interrupted"] == 2 and progress.counts()["running"] == 0, progress.counts()
    assert "before the trial opened its run" in progress.trials[trials[1].key].info["reason"]


def test_checkpoints_written_with_another_store_are_announced(tmp_path, capsys):
    """The same sweep on a new store went on quietly from the output folder's checkpoints of the old one: its
    finished trials were only evaluated, and report blamed eval.every_epochs for their one-point curves."""
    from resnet_core import checkpoint
    from orchestrator.sweep import prepare
    spec = smoke_spec(tmp_path)
    ctx, trials = prepare(str(spec), output=str(tmp_path / "out"))
    checkpoint.save(ctx.output / "checkpoints" / trials[0].key, 60, {"iteration": 60, "step": {}, "run_id": "r",
                                                                      "trial_key": trials[0].key}, keep=1)
    args = ["sweep", str(spec), "--dry-run", "--output", str(tmp_path / "out"), "--tracking-uri",
            f"sqlite:///{tmp_path}/new.db"]
    assert orchestrate(args) == 0
    said = " ".join(capsys.readouterr().out.split())
    assert (f"warning: 1 trial(s) without a run in sqlite:///{tmp_path}/new.db have checkpoints in "
            f"{tmp_path / 'out' / 'checkpoints'} (written with another store or sweep name)") in said, said
    assert orchestrate([*args, "--set", "base.checkpoint.resume=false"]) == 0  # trains them afresh: nothing to say
    assert "written with another store" not in capsys.readouterr().out


def test_a_second_orchestrator_of_the_same_sweep_is_refused(tmp_path):
    """Both ran every trial; the copies stopped as 'superseded' and both views reported them failed."""
    spec = smoke_spec(tmp_path)
    first = sweep(tmp_path, spec)
    lock = tmp_path / "runs" / "sweeps" / "smoke" / ".orchestrator.lock"
    deadline = time.monotonic() + 120
    while not (lock.is_file() and lock.read_text().startswith("pid")) and time.monotonic() < deadline:
        time.sleep(0.2)
    second = sweep(tmp_path, spec)
    said = second.communicate(timeout=120)[0]
    assert second.returncode == 2, said
    assert f"sweep 'smoke' is already running from {tmp_path / 'runs' / 'sweeps' / 'smoke'} (pid {first.pid}" in said
    # Another output folder (or another working folder) escapes that lock: the store's record of the sweep's
    # orchestrator stops it (both trained every trial, in the same runs)
    client = mlflow_client(f"sqlite:///{tmp_path}/mlruns.db")  # as `orchestrate status`: the sweep may create it
    while time.monotonic() < deadline and OWNER_TAG not in getattr(client.get_experiment_by_name("smoke"), "tags", {}):
        time.sleep(0.5)
    third = sweep(tmp_path, spec, "--output", str(tmp_path / "elsewhere"))
    said = third.communicate(timeout=120)[0]
    assert third.returncode == 2 and f"sweep 'smoke' is already running: pid {first.pid} on " in said, said
    assert said.count("\n") == 1, said
    finish(first)
    assert OWNER_TAG not in client.get_experiment_by_name("smoke").tags  # released as the first one ended
    again = finish(sweep(tmp_path, spec, "--output", str(tmp_path / "elsewhere")))  # the lock went with it
    assert "4 skipped" in again
    assert len(trial_runs(tmp_path, "smoke")) == 4


def test_the_record_of_a_dead_or_remote_orchestrator_does_not_block_a_sweep(tmp_path, capsys):
    """A killed orchestrator (kill -9, a lost node) leaves its record in the store; only a live process on this
    host refuses. One on another host cannot be checked from here: a warning."""
    import socket
    import psutil
    from orchestrator.cli import UserError
    from orchestrator.ledger import Ledger
    ledger = Ledger(f"sqlite:///{tmp_path}/mlruns.db", "owned")
    alive = subprocess.Popen(["sleep", "60"])
    try:
        here = {"pid": alive.pid, "host": socket.gethostname(), "created": psutil.Process(alive.pid).create_time(),
                "since": "then", "output": "/out"}
        record(ledger, here)
        with pytest.raises(UserError, match=f"sweep 'owned' is already running: pid {alive.pid} on "):
            ledger.claim("/mine")
        assert orchestrate(["status", "owned", "--tracking-uri", f"sqlite:///{tmp_path}/mlruns.db"]) == 0
        assert f"running now: `orchestrate sweep`, pid {alive.pid} on " in capsys.readouterr().out
        record(ledger, here, created=here["created"] - 3600)  # its pid, reused by another process
        assert ledger.check_owner() is None
        record(ledger, here, host="elsewhere")
        assert "another host" in ledger.check_owner()
    finally:
        alive.kill()
        alive.wait()
    record(ledger, here)  # the process is gone
    assert orchestrate(["status", "owned", "--tracking-uri", f"sqlite:///{tmp_path}/mlruns.db"]) == 0
    assert "running now" not in capsys.readouterr().out
    assert ledger.claim("/mine") is None and ledger._owner()["output"] == "/mine"
    ledger.release()
    assert OWNER_TAG not in ledger.client.get_experiment(ledger.experiment_id).tags


def record(ledger, owner: dict, **changes) -> None:
    """Write an orchestrator's record into the sweep's experiment, as Ledger.claim does."""
    import json
    ledger.client.set_experiment_tag(ledger.experiment_id, OWNER_TAG, json.dumps({**owner, **changes}))


def test_fused_groups_are_made_of_trials_that_resume_at_one_iteration(tmp_path):
    """A re-run regroups the trials still to run (a member diverged and is skipped, or fuse changed): members
    checkpointed at other iterations made one group, and every attempt of it failed on 'different iterations'."""
    from orchestrator.trials import FusedGroup, fuse
    from orchestrator.sweep import prepare
    ctx, trials = prepare(str(REPO / "sweeps" / "smoke_fused.yaml"), output=str(tmp_path / "out"),
                          tracking_uri=f"sqlite:///{tmp_path}/m.db")
    resnets = [t for t in trials if not t.config.model.plain]
    for trial, iteration in zip(resnets, (10, 20, 10)):  # the fourth has no checkpoint: it starts at 0
        folder = Path(trial.config.checkpoint.root) / trial.key
        folder.mkdir(parents=True)
        (folder / f"ckpt-{iteration:09d}-{'0' * 16}.pt").write_bytes(b"")
    units = fuse(ctx, resnets)
    groups = sorted(([t.key for t in u.members] if isinstance(u, FusedGroup) else [u.key] for u in units), key=len)
    assert groups == [[resnets[1].key], [resnets[3].key], [resnets[0].key, resnets[2].key]]


def test_a_report_file_with_a_torn_line_gives_up_only_the_torn_part(tmp_path):
    """A worker killed while writing leaves half a line; its next attempt appends to it. json.loads of that line
    raised in the SLURM monitor, which then cancelled every job of the sweep."""
    from orchestrator.backends.base import ReportTail
    path = tmp_path / "reports.jsonl"
    path.write_text('{"epoch": 1, "val_error": 0.5}\n{"epoch": 2, "val_er')
    tail = ReportTail(path)
    assert tail.read() == [{"epoch": 1, "val_error": 0.5}]  # the line being written waits
    with open(path, "a") as f:  # the requeued attempt
        f.write('{"epoch": 2, "val_error": 0.4}\n{"status": "FINISHED", "note": "caf\u00e9"}\n')
    assert tail.read() == [{"epoch": 2, "val_error": 0.4}, {"status": "FINISHED", "note": "caf\u00e9"}]
    assert tail.latest() == {"status": "FINISHED", "note": "caf\u00e9"} and tail.read() == []
