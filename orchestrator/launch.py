"""The one place that builds worker command lines: torchrun (DDP) and the DeepSpeed launcher (a plain-python trial
runs in the Tune actor or the SLURM job itself, no command line).

Pure functions of their arguments returning argv lists (never shell strings): a backend runs the list
directly, or renders it with ``shlex.join`` into a script, so no value from a sweep can inject shell.
Golden-tested in tests/test_launch.py.
"""
from __future__ import annotations

from dataclasses import dataclass

WORKER_MODULE = "resnet_core.train"


@dataclass(frozen=True)
class Rendezvous:
    """Where the ranks of a multi-node trial meet (torchrun's c10d store, or DeepSpeed's master)."""
    host: str
    port: int
    job_id: str  # the same on every node of the trial, different across trials


def worker_args(config_path: str, overrides: tuple[str, ...] | list[str] = ()) -> list[str]:
    args = [str(config_path)]
    if overrides:
        args += ["--set", *overrides]
    return args


def torchrun_command(config_path: str, overrides=(), *, nproc_per_node: int = 1, nnodes: int = 1,
                     rendezvous: Rendezvous | None = None, torchrun: str = "torchrun") -> list[str]:
    """One node: ``--standalone``; several: c10d rendezvous, started identically on every node."""
    cmd = [torchrun, f"--nproc-per-node={nproc_per_node}"]
    if nnodes == 1 and rendezvous is None:
        cmd.append("--standalone")
    else:
        if rendezvous is None:
            raise ValueError("a multi-node torchrun needs a rendezvous host:port")
        cmd += [f"--nnodes={nnodes}", "--rdzv-backend=c10d", f"--rdzv-endpoint={rendezvous.host}:{rendezvous.port}",
                f"--rdzv-id={rendezvous.job_id}"]
    return cmd + ["-m", WORKER_MODULE, *worker_args(config_path, overrides)]


def deepspeed_command(config_path: str, overrides=(), *, gpus_per_node: int = 1, nnodes: int = 1,
                      node_rank: int = 0, rendezvous: Rendezvous | None = None,
                      deepspeed: str = "deepspeed") -> list[str]:
    """The DeepSpeed launcher; several nodes start it once each with ``--no_ssh`` and their node rank."""
    cmd = [deepspeed, f"--num_gpus={gpus_per_node}"]
    if nnodes > 1:
        if rendezvous is None:
            raise ValueError("a multi-node deepspeed launch needs a master host:port")
        cmd += [f"--num_nodes={nnodes}", "--no_ssh", f"--node_rank={node_rank}",
                f"--master_addr={rendezvous.host}", f"--master_port={rendezvous.port}"]
    elif rendezvous is not None:
        cmd.append(f"--master_port={rendezvous.port}")
    return cmd + ["--no_local_rank", "--module", WORKER_MODULE, *worker_args(config_path, overrides)]
