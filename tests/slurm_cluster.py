"""pytest plugin: a real two-node SLURM cluster (with accounting) on 127.0.0.1 for the tests that need one.

Register it once in tests/conftest.py::

    pytest_plugins = ["slurm_cluster"]

and ask for the session-scoped fixture ``slurm_cluster``::

    def test_something(slurm_cluster, tmp_path):
        job = slurm_cluster.sbatch("#!/bin/bash\\nhostname", cwd=tmp_path)
        assert slurm_cluster.wait(job) == "COMPLETED"
        assert slurm_cluster.sacct(job)[0]["State"] == "COMPLETED"
        subprocess.run(["squeue"], env=slurm_cluster.env)  # any SLURM client command, or submitit

The fixture runs ``cluster/local-slurm/up`` once per session (it returns at once when a healthy cluster is already
running, e.g. one CI started before pytest), and runs ``down`` at the end only if it started the cluster itself and
``SLURM_LOCAL_KEEP`` is not 1 (never under pytest-xdist, where workers share the cluster). It skips, with the
reason, when the SLURM/munge/MariaDB binaries are not installed or when not running as root.

Environment: ``SLURM_LOCAL_STATE`` (state folder, default /tmp/resnet-orchestrator-slurm), ``SLURM_LOCAL_KEEP=1``
(leave it running after the session), ``SLURM_LOCAL_GRES=N`` (N fake GPUs per node, see cluster/local-slurm/README.md).
"""
from __future__ import annotations

import os
import shutil
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPTS = REPO / "cluster" / "local-slurm"
UP = SCRIPTS / "up"
DOWN = SCRIPTS / "down"
DEFAULT_STATE = "/tmp/resnet-orchestrator-slurm"
NEEDED = ("munged", "mariadbd", "mariadb-install-db", "slurmdbd", "slurmctld", "slurmd",
          "sinfo", "sbatch", "srun", "sacct", "sacctmgr", "scontrol")
DAEMONS = ("munged", "mariadbd", "slurmdbd", "slurmctld", "slurmd-n1", "slurmd-n2")
TERMINAL = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL",
            "DEADLINE", "PREEMPTED", "REVOKED"}
SACCT_FIELDS = ("JobID", "JobName", "State", "ExitCode", "NodeList", "NNodes", "Partition", "Account",
                "Submit", "Start", "End", "Elapsed")


def _path_env() -> str:
    path = os.environ.get("PATH", "")
    extra = [p for p in ("/usr/sbin", "/sbin") if p not in path.split(os.pathsep)]
    return os.pathsep.join([path, *extra]) if extra else path


def missing_binaries() -> list[str]:
    """SLURM/munge/MariaDB programs `up` needs that are not installed."""
    path = _path_env()
    return [b for b in NEEDED if shutil.which(b, path=path) is None]


def state_dir_default() -> Path:
    return Path(os.environ.get("SLURM_LOCAL_STATE") or DEFAULT_STATE)


def _pid_alive(pid: int, binary: str) -> bool:
    """Live (not zombie) process running `binary` (Debian's daemons are e.g. slurmd-wlm)."""
    try:
        exe = os.path.basename(os.readlink(f"/proc/{pid}/exe")).removesuffix(" (deleted)")
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return False
    if "\nState:\tZ" in status:
        return False
    return exe in (binary, f"{binary}-wlm")


@dataclass
class SlurmCluster:
    """A running local cluster: `.env` for subprocesses (SLURM_CONF set), helpers around the client commands."""

    state_dir: Path
    env: dict[str, str] = field(repr=False)
    started_here: bool = False
    up_seconds: float = 0.0

    # ---- lifecycle ---------------------------------------------------------------------------------------------
    @classmethod
    def start(cls, state_dir: Path | str | None = None, *extra_args: str, timeout: float = 240) -> "SlurmCluster":
        """Run `up` (idempotent) and return the cluster. Raises RuntimeError with up's stderr on failure."""
        state_dir = Path(state_dir) if state_dir is not None else state_dir_default()
        env = dict(os.environ, PATH=_path_env())
        # A cluster whose controller already runs is someone else's (CI's, another session's) even when `up`
        # has to restart a daemon of it: this session must not take it down at its end.
        owned_elsewhere = cls(state_dir=state_dir.resolve(), env=env).pid("slurmctld") is not None
        t0 = time.monotonic()
        proc = subprocess.run([str(UP), str(state_dir), *extra_args], env=env, capture_output=True, text=True,
                              timeout=timeout, stdin=subprocess.DEVNULL)
        elapsed = time.monotonic() - t0
        if proc.returncode != 0:
            raise RuntimeError(f"{UP} {state_dir} failed (rc={proc.returncode}):\n{proc.stderr}{proc.stdout}")
        conf = None
        for line in proc.stdout.splitlines():
            if line.startswith("export SLURM_CONF="):
                # the value is shell-quoted (printf %q); read the plain path back from the state folder instead
                conf = _read_env_sh(state_dir / "env.sh")
        if not conf:
            raise RuntimeError(f"`up` printed no SLURM_CONF line:\n{proc.stdout}\n{proc.stderr}")
        env["SLURM_CONF"] = conf
        started = not owned_elsewhere and "already running" not in proc.stderr
        return cls(state_dir=state_dir.resolve(), env=env, started_here=started, up_seconds=elapsed)

    def up(self, *extra_args: str, timeout: float = 240) -> subprocess.CompletedProcess:
        """Run `up` again on this state folder (restarts what died; no-op when healthy)."""
        return subprocess.run([str(UP), str(self.state_dir), *extra_args], env=self.env, capture_output=True,
                              text=True, timeout=timeout, stdin=subprocess.DEVNULL, check=True)

    def down(self, *extra_args: str, timeout: float = 120) -> subprocess.CompletedProcess:
        return subprocess.run([str(DOWN), str(self.state_dir), *extra_args], env=self.env, capture_output=True,
                              text=True, timeout=timeout, stdin=subprocess.DEVNULL, check=True)

    @property
    def conf(self) -> Path:
        return Path(self.env["SLURM_CONF"])

    @property
    def logs(self) -> Path:
        return self.state_dir / "log"

    def pid(self, daemon: str) -> int | None:
        """PID of a daemon of this cluster (munged, mariadbd, slurmdbd, slurmctld, slurmd-n1, slurmd-n2) if alive."""
        try:
            pid = int((self.state_dir / "run" / f"{daemon}.pid").read_text().strip())
        except (OSError, ValueError):
            return None
        binary = "slurmd" if daemon.startswith("slurmd-") else daemon
        if not _pid_alive(pid, binary):
            return None
        try:  # started by `up` for this state folder, not a recycled pid
            environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        except OSError:
            return None
        return pid if f"LOCAL_SLURM_DAEMON_OF={self.state_dir}".encode() in environ else None

    def pids(self) -> dict[str, int | None]:
        return {d: self.pid(d) for d in DAEMONS}

    # ---- client commands ---------------------------------------------------------------------------------------
    def run(self, *cmd: str, check: bool = True, timeout: float = 60, **kw) -> subprocess.CompletedProcess:
        """Run a SLURM client command against this cluster; text output captured."""
        if "input" not in kw:
            kw["stdin"] = subprocess.DEVNULL
        return subprocess.run(list(cmd), env=self.env, capture_output=True, text=True, timeout=timeout,
                              check=check, **kw)

    def nodes(self) -> dict[str, str]:
        """Node name -> compact state (idle, alloc, mix, down, ...)."""
        out = self.run("sinfo", "-h", "-N", "-p", "debug", "-o", "%N %t").stdout
        return dict(line.split() for line in out.splitlines() if line.strip())

    def sbatch(self, script: str, *args: str, cwd: Path | str | None = None) -> str:
        """Submit a batch script (its text) with extra sbatch args; returns the job id."""
        out = self.run("sbatch", "--parsable", *args, input=script, cwd=cwd).stdout.strip()
        return out.split(";")[0]

    def sacct(self, job_id: str | int, *, duplicates: bool = False, steps: bool = True) -> list[dict[str, str]]:
        """Accounting rows of a job (first the job itself, then its steps unless steps=False).
        duplicates=True also lists the earlier runs of a requeued job (State REQUEUED)."""
        cmd = ["sacct", "-n", "-P", "-j", str(job_id), "--format=" + ",".join(SACCT_FIELDS)]
        if duplicates:
            cmd.append("--duplicates")
        if not steps:
            cmd.append("--allocations")
        out = self.run(*cmd).stdout
        return [dict(zip(SACCT_FIELDS, line.split("|"))) for line in out.splitlines() if line.strip()]

    def state(self, job_id: str | int) -> str:
        """Current state: squeue's while the controller knows the job, else sacct's ('' if unknown)."""
        out = self.run("squeue", "-h", "-j", str(job_id), "-o", "%T", check=False).stdout.strip()
        if out:
            return out.split()[0]
        rows = self.sacct(job_id, steps=False)
        return rows[0]["State"].split()[0] if rows else ""

    def wait(self, job_id: str | int, states=TERMINAL, timeout: float = 120, poll: float = 0.5) -> str:
        """Wait until the job reaches one of `states` (default: any terminal state, as sacct reports it)."""
        states = {states} if isinstance(states, str) else set(states)
        end = time.monotonic() + timeout
        last = ""
        while time.monotonic() < end:
            last = self.state(job_id)
            if last in states:
                if last in TERMINAL and not self._settled(job_id, last):
                    time.sleep(poll)
                    continue
                return last
            time.sleep(poll)
        raise TimeoutError(f"job {job_id} still {last or 'unknown'} after {timeout:.0f} s (wanted {sorted(states)})")

    def _settled(self, job_id, state: str) -> bool:
        """Accounting agrees with the final state. Slurm 22.05 quirk: a job that ends within a second or two can
        first appear in sacct as a record named "allocation" with only the batch step's node, until the job's own
        start record reaches slurmdbd (a second or two later)."""
        rows = self.sacct(job_id, steps=False)
        return bool(rows) and rows[0]["State"].split()[0] == state and rows[0]["JobName"] != "allocation"

    def requeue(self, job_id: str | int, *, start_now: bool = True, timeout: float = 30) -> None:
        """`scontrol requeue` a job. SLURM holds a requeued job back (BeginTime = now + cred_expire, 15 s here);
        start_now=True lifts that once it is pending again, as an admin would with `scontrol update StartTime=now`."""
        self.run("scontrol", "requeue", str(job_id))
        requeued_at = time.monotonic()
        if not start_now:
            return
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if self.state(job_id) == "PENDING":
                if self.lift_requeue_hold(job_id, requeued_at):
                    return
            elif self.state(job_id) == "RUNNING":
                return
            time.sleep(0.2)

    def lift_requeue_hold(self, job_id: str | int, requeued_at: float) -> bool:
        """`scontrol update StartTime=now` on a requeued job that is pending again (requeued_at: time.monotonic()).
        slurmd refuses a launch whose credential was made in the same second as the requeue revoked the old one
        (seen: "Killing non-startable batch JobId=114: Job credential revoked", 0.2 s after the requeue, on the
        same node; the job then ends FAILED): let the clock pass the next whole second first."""
        time.sleep(max(0.0, requeued_at + 2.0 - time.monotonic()))
        return self.run("scontrol", "update", f"JobId={job_id}", "StartTime=now", check=False).returncode == 0


def _read_env_sh(path: Path) -> str | None:
    """SLURM_CONF from STATE/env.sh, unquoted by a shell (it may contain spaces)."""
    if not path.exists():
        return None
    out = subprocess.run(["bash", "-c", 'source "$1" && printf %s "$SLURM_CONF"', "_", str(path)],
                         capture_output=True, text=True, env={"PATH": _path_env()})
    return out.stdout or None


def pytest_configure(config):
    config.addinivalue_line("markers", "slurm: uses the real local SLURM cluster (fixture slurm_cluster)")


@pytest.fixture(scope="session")
def slurm_cluster():
    """The local two-node SLURM cluster (started once per session, or reused if already running)."""
    missing = missing_binaries()
    if missing:
        pytest.skip("SLURM not installed (missing " + ", ".join(missing) + "; setup.sh installs munge slurmctld "
                    "slurmd slurm-client slurmdbd mariadb-server)")
    if os.geteuid() != 0:
        pytest.skip("the local SLURM cluster runs its daemons as root; run the tests as root")
    extra = []
    if os.environ.get("SLURM_LOCAL_GRES"):
        extra.append(f"--gres={os.environ['SLURM_LOCAL_GRES']}")
    cluster = SlurmCluster.start(None, *extra)
    yield cluster
    keep = os.environ.get("SLURM_LOCAL_KEEP") == "1" or "PYTEST_XDIST_WORKER" in os.environ
    if cluster.started_here and not keep:
        cluster.down()
