"""The job side of the SLURM backend: what each SLURM task of a trial runs (submitit unpickles and calls it).

One task per process (nodes x workers_per_node): each task maps SLURM's variables to RANK/WORLD_SIZE/LOCAL_RANK,
sets MASTER_ADDR/MASTER_PORT for the c10d TCP store rendezvous, tags the MLflow run with the job id and calls
``train()`` in its main thread. Imports nothing of Ray and no torch until train() runs; the compute nodes run the
project's own environment (the orchestrator package, its spec and config models come with this module).

Preemption (two paths, one mechanism: the worker's own checkpoint, then the same trial runs again):
- SIGTERM (``scontrol requeue``, a partition-priority preemption with PreemptMode=REQUEUE, ``scancel``): train()'s
  handler checkpoints at the next step boundary and raises ``Interrupted``; the task exits *without* a submitit
  result, so SLURM's own requeue restarts the job and the worker resumes from its checkpoint in the same run.
- SIGUSR2, submitit's preemption/timeout signal (``#SBATCH --signal=USR2@<delay>``): submitit's handler would
  requeue at once, mid-step, without the worker's checkpoint. We take USR2 over: it asks train() to stop the same
  way (train() owns SIGTERM/SIGUSR1), and once the checkpoint is written rank 0 hands over to submitit's own
  handler, which calls ``checkpoint()`` (this trial again), counts timeouts and runs ``scontrol requeue``.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from dataclasses import dataclass, field
from typing import Any

EXIT_INTERRUPTED = 3  # as `python -m resnet_core.train`: checkpoint written, run again to resume
MASTER_PORT_BASE, MASTER_PORT_SPAN = 20000, 20000


def master_port(job_id: str) -> int:
    """Derived from the job id: the same on every task of a job, different for jobs sharing a node."""
    return MASTER_PORT_BASE + int(job_id) % MASTER_PORT_SPAN


def first_host(nodelist: str) -> str:
    """The first host of the allocation (SLURM's compressed list expanded by `scontrol show hostnames`)."""
    try:
        out = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True,
                             timeout=30, check=True).stdout.split()
        if out:
            return out[0]
    except (OSError, subprocess.SubprocessError):
        pass
    from submitit.slurm.slurm import _parse_node_list  # the same expansion, without the controller
    return _parse_node_list(nodelist)[0]


def distributed_env(environ: dict[str, str], master_addr: str | None) -> dict[str, str]:
    """RANK/WORLD_SIZE/LOCAL_RANK/MASTER_ADDR/MASTER_PORT of this task, from srun's variables."""
    ntasks = int(environ.get("SLURM_NTASKS", "1"))
    if ntasks <= 1:
        return {}
    return {"RANK": environ["SLURM_PROCID"], "WORLD_SIZE": str(ntasks),
            "LOCAL_RANK": environ.get("SLURM_LOCALID", "0"),
            "MASTER_ADDR": master_addr or first_host(environ["SLURM_JOB_NODELIST"]),
            "MASTER_PORT": str(master_port(environ["SLURM_JOB_ID"]))}


@dataclass
class SlurmTrial:
    """One trial (or one fused group of trials) as a submitit callable (checkpointable: preemption re-submits it)."""
    key: str
    config: dict[str, Any]            # the resolved trial config (TrainConfig as JSON); {} for a fused group
    report_file: str | None = None    # rank 0 appends every report and the final result (JSON lines)
    master_addr: str | None = None    # profile's master_addr; else the first host of the allocation
    cpus: int = 1                     # torch threads per task
    members: list[dict[str, Any]] | None = None  # a fused group: [{key, config, report_file}] (resnet_core.fused)
    _usr2: Any = field(default=None, init=False, repr=False, compare=False)

    def __call__(self) -> dict[str, Any] | list[dict[str, Any]]:
        os.environ.update(distributed_env(dict(os.environ), self.master_addr))
        import torch
        from resnet_core.checkpoint import Superseded
        from resnet_core.train import EXIT_SUPERSEDED, Interrupted
        torch.set_num_threads(max(1, self.cpus))
        self._take_over_usr2()
        try:
            return self.train_group() if self.members else self.train_one()
        except Interrupted:
            self.after_interruption()
            raise  # not reached
        except Superseded as err:
            # SLURM requeued this job elsewhere while this copy still ran (its node's slurmd stopped answering):
            # the other copy owns the trial. Exit without a submitit result, which would be the other's.
            print(f"superseded: {err}", file=sys.stderr, flush=True)
            sys.exit(EXIT_SUPERSEDED)

    def tagged(self, config: dict[str, Any]) -> dict[str, Any]:
        cfg = json.loads(json.dumps(config))
        cfg["tracking"]["tags"].update(self.tags())
        return cfg

    def train_one(self) -> dict[str, Any]:
        from resnet_core.train import report_to, report_to_console, report_to_file, train
        # the file feeds the sweep; the console line per evaluation shows progress in the job's log (tail -f)
        report = report_to(report_to_file(self.report_file) if self.report_file else None, report_to_console())
        result = train(self.tagged(self.config), report)
        if report and int(os.environ.get("RANK", "0")) == 0:
            report(result)
        return result

    def train_group(self) -> list[dict[str, Any]]:
        """The members as one fused model; each member's reports go to its own report file."""
        from resnet_core.fused import train_fused
        from resnet_core.train import report_to, report_to_console, report_to_file
        files = {m["key"]: report_to(report_to_file(m["report_file"]), report_to_console()) for m in self.members}
        results = train_fused([self.tagged(m["config"]) for m in self.members],
                              lambda metrics: files[metrics["trial_key"]](metrics))
        for result in results:
            files[result["trial_key"]](result)
        return results

    def tags(self) -> dict[str, str]:
        job_id = os.environ.get("SLURM_JOB_ID", "")
        if os.environ.get("SLURM_ARRAY_JOB_ID"):  # the id sacct/scancel know an array task by
            job_id = f"{os.environ['SLURM_ARRAY_JOB_ID']}_{os.environ['SLURM_ARRAY_TASK_ID']}"
        return {"backend": "slurm", "backend_job_id": job_id}

    def _take_over_usr2(self) -> None:
        """submitit installed its USR2 handler before calling us; keep it for later, ask train() to stop instead."""
        self._usr2 = {"handler": signal.getsignal(signal.SIGUSR2), "received": False}

        def stop_then_requeue(signum, frame):
            self._usr2["received"] = True
            train_handler = signal.getsignal(signal.SIGUSR1)  # train()'s stop handler while it trains
            if callable(train_handler):
                train_handler(signal.SIGUSR1, frame)
        signal.signal(signal.SIGUSR2, stop_then_requeue)

    def after_interruption(self) -> None:
        """The checkpoint is written. Exit without a submitit result (the job is not over): SLURM requeues after
        SIGTERM; after submitit's USR2, rank 0 lets submitit checkpoint/requeue (it exits the process)."""
        usr2 = self._usr2 or {}
        if usr2.get("received") and callable(usr2.get("handler")):
            usr2["handler"](signal.SIGUSR2, None)  # submitit: checkpoint(), scontrol requeue, sys.exit
        sys.stdout.flush()
        sys.exit(EXIT_INTERRUPTED)

    def checkpoint(self, *args: Any, **kwargs: Any):
        """submitit's preemption hook: run this same trial again; the worker resumes from its own checkpoint."""
        from submitit.helpers import DelayedSubmission
        return DelayedSubmission(SlurmTrial(self.key, self.config, self.report_file, self.master_addr, self.cpus,
                                            self.members))

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_usr2"] = None  # signal handlers do not travel
        return state
