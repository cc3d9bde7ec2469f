"""`orchestrate sweep SPEC.yaml`: run (or resume) a sweep on Ray Tune or SLURM, tracked in MLflow."""
from __future__ import annotations

import argparse
import shlex


def add_parser(p: argparse.ArgumentParser) -> None:
    p.add_argument("spec", help="sweep YAML (see sweeps/)")
    p.add_argument("--backend", choices=["ray", "slurm"], help="override the spec's backend")
    p.add_argument("--address", help="an existing Ray cluster to run on (e.g. auto, or HOST:6379); default: a local Ray")
    p.add_argument("--dry-run", action="store_true", help="print trials, commands and GPU-hours; submit nothing")
    p.add_argument("--retry-failed", action="store_true", help="run FAILED trials again (they resume their run)")
    p.add_argument("--tracking-uri", help="MLflow store (default: spec, $MLFLOW_TRACKING_URI, sqlite:///mlruns.db)")
    p.add_argument("--output", help="folder for checkpoints and logs (default: runs/sweeps/<name>)")
    p.add_argument("--max-concurrent", type=int, help="trials running at once")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", dest="sets",
                   help="edit the spec: base.schedule.total=200, space.optim.lr=[0.1,0.05], resources.gpus=0.5, "
                        "name=my_copy (a different name is a different sweep in MLflow)")


def run(args: argparse.Namespace) -> int:
    from orchestrator.backends.base import sigterm_as_ctrl_c
    from orchestrator.sweep import dry_run, prepare, run_sweep
    sigterm_as_ctrl_c()
    ctx, trials = prepare(args.spec, address=args.address, check_data=not args.dry_run, sets=args.sets,
                          backend=args.backend,
                          tracking_uri=args.tracking_uri, output=args.output, max_concurrent=args.max_concurrent)
    if args.dry_run:
        print(dry_run(ctx, trials, args.retry_failed))
        return 0
    counts = run_sweep(ctx, trials, retry_failed=args.retry_failed, command=command_line(args))
    if counts["interrupted"]:
        print(f"orchestrate sweep: {counts['interrupted']} trial(s) interrupted (cancelled or preempted); run the "
              "same command again to resume them from their checkpoints")
    return 1 if counts["failed"] or counts["interrupted"] or counts["failed_before"] else 0  # not all done


def command_line(args: argparse.Namespace) -> str:
    """This call's arguments that decide what runs, for `orchestrate status` to say which command resumes it."""
    flags = {"--backend": args.backend, "--address": args.address, "--tracking-uri": args.tracking_uri,
             "--output": args.output, "--max-concurrent": args.max_concurrent}
    words = [args.spec, *(w for flag, value in flags.items() if value is not None for w in (flag, str(value)))]
    return shlex.join(words + (["--set", *args.sets] if args.sets else []))
