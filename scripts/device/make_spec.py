"""Write the GPU machine's copy of sweeps/cifar_depth.yaml: the residual nets + plain-20/56, one seed, absolute
paths under --study, every trial packed on the one GPU at once (fractional GPUs; CUDA MPS is started by
run_study.sh), a validation split so `orchestrate ensemble --top 6` can rank trials by val_error.

    python scripts/device/make_spec.py --out /tmp/study/cifar_depth_gpu.yaml [--iters 64000] [--study /tmp/study]

--iters scales the paper's schedule (milestones at 1/2 and 3/4, the 400-iteration warm-up kept) when a session
has less time than the full 64k-iteration recipe needs. The sweep's name says what changed, so its MLflow
experiment never mixes with a full cifar_depth sweep.
"""
from __future__ import annotations

import argparse
import copy
import math
import os
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[2]
# Longest first: the sweep's wall time is bounded by its longest trial, so it must start at once.
DEFAULT_MODELS = "resnet110,resnet56,plain56,resnet44,resnet32,resnet20,plain20"


def build(args: argparse.Namespace) -> dict:
    src = yaml.safe_load(Path(args.src).read_text())
    spec = copy.deepcopy(src)
    models = [m for m in args.models.split(",") if m]
    seeds = [int(s) for s in str(args.seeds).split(",") if s != ""]
    spec["name"] = args.name or (f"{src['name']}_gpu" + ("" if args.iters == 64000 else f"_{args.iters // 1000}k"))
    base = spec.setdefault("base", {})
    base.setdefault("data", {})
    base["data"]["path"] = str(Path(args.data).resolve()) if args.data != "synthetic" else "synthetic"
    base["data"]["val_split"] = args.val_split
    if args.subset:
        base["data"]["subset"] = args.subset
    sched = base.setdefault("schedule", {})
    if args.iters != 64000:
        sched["total"] = args.iters
        sched["milestones"] = [args.iters // 2, args.iters * 3 // 4]
        warmup = sched.get("warmup")
        if isinstance(warmup, dict) and warmup.get("length", 0) >= args.iters // 4:
            warmup["length"] = max(1, args.iters // 100)
    base["checkpoint"] = {**base.get("checkpoint", {}), "every": min(args.checkpoint_every, args.iters)}
    base["eval"] = {**base.get("eval", {}), "every_epochs": args.eval_every}
    if args.batch_size:
        base["batch_size"] = args.batch_size
    if args.device:
        base["device"] = args.device
    spec["space"] = {"model.name": models, "seed": seeds}
    concurrent = len(models) * len(seeds)
    if args.fuse > 1:  # the seeds of each model train as one fused model: one process per model
        spec["fuse"] = args.fuse
        concurrent = len(models) * -(-len(seeds) // args.fuse)
    # Rounded *down* to Ray's 0.0001 granularity: 7 x 0.1429 = 1.0003 GPU would leave the 7th trial waiting.
    gpus = args.gpus if args.gpus is not None else (
        0 if args.device == "cpu" else math.floor(10_000 / concurrent) / 10_000 if concurrent > 1 else 1)
    spec["resources"] = {**src.get("resources", {}), "gpus": gpus, "cpus": cpus_per_trial(args.cpus, concurrent)}
    spec["max_concurrent"] = concurrent
    spec["output"] = str(Path(args.study) / "sweep")
    spec["tracking_uri"] = f"sqlite:///{Path(args.study).resolve() / 'mlruns.db'}"
    spec["backend"] = "ray"
    return spec


def cpus_per_trial(wanted: float, concurrent: int, cores: int | None = None) -> float:
    """At most the machine's cores over the trials that run at once: Ray would otherwise start fewer of them
    than max_concurrent says (18 trials x 2 CPUs on 16 cores: 8 at a time, the sweep 2-3x longer, no error).
    Ray takes a fraction below 1 CPU, and whole numbers above it."""
    share = (cores or os.cpu_count() or 1) / concurrent
    if wanted <= share:
        return wanted
    return math.floor(share) if share >= 1 else math.floor(share * 10_000) / 10_000


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--src", default=str(ROOT / "sweeps" / "cifar_depth.yaml"))
    p.add_argument("--out", required=True)
    p.add_argument("--study", default="/tmp/study", help="folder of the MLflow store, checkpoints, Ray output")
    p.add_argument("--data", default="/tmp/data/cifar10-jpeg.tar.gz")
    p.add_argument("--models", default=DEFAULT_MODELS)
    p.add_argument("--seeds", default="0")
    p.add_argument("--fuse", type=int, default=1, help="fuse up to this many seeds of a model into one process")
    p.add_argument("--iters", type=int, default=64000, help="schedule length (paper: 64000)")
    p.add_argument("--val-split", type=int, default=5000, help="held-out train images (paper's 45k/5k split)")
    p.add_argument("--eval-every", type=int, default=2, help="epochs between val/test evaluations")
    p.add_argument("--checkpoint-every", type=int, default=2000, help="iterations between checkpoints")
    p.add_argument("--gpus", type=float, default=None, help="GPU fraction per trial (default: all trials at once)")
    p.add_argument("--cpus", type=float, default=2, help="CPUs per trial (at most the cores / trials at once)")
    p.add_argument("--name", default=None)
    p.add_argument("--subset", type=int, default=None, help="train on N images only (tests)")
    p.add_argument("--batch-size", type=int, default=None, help="(tests) override the paper's 128")
    p.add_argument("--device", default=None, choices=("cpu", "cuda"), help="(tests) pin the trials' device")
    args = p.parse_args(argv)
    spec = build(args)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(f"# generated by scripts/device/make_spec.py from {args.src}\n"
                              + yaml.safe_dump(spec, sort_keys=False))
    print(f"make_spec: wrote {args.out}: sweep {spec['name']!r}, {len(spec['space']['model.name'])} models x "
          f"{len(spec['space']['seed'])} seed(s), {spec['base']['schedule'].get('total', 64000)} iterations, "
          f"{spec['resources']['gpus']} GPU / {spec['resources']['cpus']} CPUs per trial", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
