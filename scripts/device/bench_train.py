"""Training-step throughput of the project's own step (resnet_core.steps.build_step) on random data.

One JSON line per (model, step mode): images/s, ms/step, warm-up seconds (torch.compile's compile time and the
CUDA-graph capture fall in the warm-up), peak GPU memory. Random CIFAR-shaped batches already on the device, so
this measures the step alone (issue 4's GPU rows: ResNet-20/56/110, batch 128, bf16, eager/compile/graph).

    python scripts/device/bench_train.py --models resnet20,resnet56,resnet110 --steps eager,graph   # GPU
    python scripts/device/bench_train.py --device cpu --iters 3 --models resnet20 --steps eager      # CPU check

--procs N runs N copies of each (model, step) as separate processes that start timing together (a file
barrier) and adds their images/s: the packed-trials number of issue 8 (run it under CUDA MPS, see run_study.sh).
--fuse K trains K members (seeds 0..K-1, each its own batch) as one horizontally fused model
(resnet_core.fused); images/s counts all K members' images. --procs and --fuse combine.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--models", default="resnet20,resnet56,resnet110", help="comma-separated registered models")
    p.add_argument("--steps", default="eager,compile,graph", help="comma-separated: eager, compile, graph")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--precision", default="bf16", choices=("bf16", "fp32", "auto"))
    p.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    p.add_argument("--iters", type=int, default=300, help="timed steps")
    p.add_argument("--warmup", type=int, default=20, help="untimed steps first (compile / capture happen here)")
    p.add_argument("--min-seconds", type=float, default=0.0, help="repeat the timed loop until this long (GPU)")
    p.add_argument("--no-channels-last", action="store_true")
    p.add_argument("--procs", type=int, default=1, help="N processes of each (model, step) at once; adds img/s")
    p.add_argument("--fuse", type=int, default=1, help="K trials as one fused model per process (eager or graph)")
    p.add_argument("--barrier", help=argparse.SUPPRESS)  # set for the child processes of --procs
    p.add_argument("--out", help="also append the JSON lines to this file")
    return p.parse_args(argv)


def emit(row: dict, out: str | None) -> None:
    line = json.dumps(row)
    print(line, flush=True)
    if out:
        with open(out, "a") as f:
            f.write(line + "\n")


def wait_for(barrier: str | None, name: str) -> None:
    """Child of --procs: say ready, then wait until the parent says go (all children warmed up)."""
    if not barrier:
        return
    Path(barrier, f"ready-{os.getpid()}").touch()
    while not Path(barrier, "go").exists():
        time.sleep(0.005)


def bench_one(args, model_name: str, step_kind: str) -> dict:
    import torch
    from resnet_core.config import build_config
    from resnet_core.distributed import DistEnv
    from resnet_core.models import create_model
    from resnet_core.steps import build_step

    device = torch.device(args.device)
    row = {"bench": "train_step", "model": model_name, "step": step_kind, "batch_size": args.batch_size,
           "precision": args.precision, "device": args.device, "channels_last": not args.no_channels_last and args.device == "cuda",
           "procs": 1, "pid": os.getpid(),
           "gpu": torch.cuda.get_device_name() if device.type == "cuda" else "cpu", "torch": torch.__version__}
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
        torch.cuda.reset_peak_memory_stats()
    cfgs = [build_config({"model": {"name": model_name}, "batch_size": args.batch_size, "step": step_kind,
                          "precision": args.precision, "device": args.device, "data": {"path": "synthetic"},
                          "tracking": {"enabled": False}, "seed": seed}) for seed in range(args.fuse)]
    models = []
    for cfg in cfgs:
        torch.manual_seed(cfg.seed)
        models.append(create_model(model_name, num_classes=10).to(device))
    row["params_m"] = round(sum(p.numel() for p in models[0].parameters()) / 1e6, 3)
    g = torch.Generator(device=device).manual_seed(0)
    shape = (args.fuse, args.batch_size) if args.fuse > 1 else (args.batch_size,)
    images = torch.randn(*shape, 3, 32, 32, device=device, generator=g)
    labels = torch.randint(0, 10, shape, device=device, generator=g)
    if args.fuse > 1:
        from resnet_core.fused import FusedModel, FusedStep, check_fusable
        check_fusable(cfgs, device)
        fused = FusedStep(cfgs, FusedModel(models, device), device, graph=step_kind == "graph")
        lrs = (0.1,) * args.fuse
        step = lambda x, y, lr: fused(x, y, lrs, shared=False).sum(0)
        row.update(fuse=args.fuse, channels_last=False)
    else:
        model = models[0]
        if not args.no_channels_last and device.type == "cuda":  # as the trainer does
            model = model.to(memory_format=torch.channels_last)
        step = build_step(cfgs[0], model, DistEnv(), device)
    images_per_step = args.batch_size * args.fuse
    from orchestrator.estimate import CUDA_CONTEXT_BYTES, trial_gpu_memory_bytes
    # the packing check's estimate (fp32, without the CUDA context) beside the measured peak_mem_gb
    row["est_mem_gb"] = round((trial_gpu_memory_bytes(cfgs[0], args.fuse) - CUDA_CONTEXT_BYTES) / 2**30, 3)

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    started = time.perf_counter()
    sums = torch.zeros(3, device=device)
    for _ in range(max(1, args.warmup)):
        sums += step(images, labels, 0.1)
    sync()
    row["warmup_s"] = round(time.perf_counter() - started, 3)
    wait_for(args.barrier, model_name)
    steps, t0 = 0, time.perf_counter()
    while True:
        for _ in range(args.iters):
            sums += step(images, labels, 0.1)
        steps += args.iters
        sync()
        elapsed = time.perf_counter() - t0
        if elapsed >= args.min_seconds:
            break
    row.update(steps=steps, seconds=round(elapsed, 4), t_start=t0 + time.time() - time.perf_counter(),
               ms_per_step=round(1000 * elapsed / steps, 3), images_per_s=round(steps * images_per_step / elapsed, 1),
               final_loss=round(float(sums[0] / sums[2]), 4))
    row["t_end"] = row["t_start"] + elapsed
    if device.type == "cuda":
        row["peak_mem_gb"] = round(torch.cuda.max_memory_allocated() / 2**30, 3)
    return row


def packed(args, model_name: str, step_kind: str) -> dict:
    """N child processes of one (model, step), timed together; aggregate = all images / (last end - first start)."""
    with tempfile.TemporaryDirectory() as barrier:
        cmd = [sys.executable, __file__, "--models", model_name, "--steps", step_kind,
               "--batch-size", str(args.batch_size), "--precision", args.precision, "--device", args.device,
               "--iters", str(args.iters), "--warmup", str(args.warmup), "--min-seconds", str(args.min_seconds),
               "--fuse", str(args.fuse), "--barrier", barrier] + (["--no-channels-last"] if args.no_channels_last else [])
        children = [subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True) for _ in range(args.procs)]
        deadline = time.time() + 900
        while len(list(Path(barrier).glob("ready-*"))) < args.procs:
            if any(c.poll() is not None for c in children) or time.time() > deadline:
                break
            time.sleep(0.05)
        Path(barrier, "go").touch()
        rows = []
        for c in children:
            try:  # a child stuck in CUDA (say, a broken MPS server) must not hold the whole device call
                out, _ = c.communicate(timeout=max(60.0, deadline - time.time()))
            except subprocess.TimeoutExpired:
                c.kill()
                out, _ = c.communicate()
                rows.append({"error": "a child still ran 900 s after the start: killed"})
            rows += [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    ok = [r for r in rows if "images_per_s" in r]
    agg = {"bench": "train_step_packed", "model": model_name, "step": step_kind, "batch_size": args.batch_size,
           "precision": args.precision, "device": args.device, "procs": args.procs, "procs_ok": len(ok), "fuse": args.fuse,
           "mps": bool(os.environ.get("CUDA_MPS_PIPE_DIRECTORY"))}
    if ok:
        span = max(r["t_end"] for r in ok) - min(r["t_start"] for r in ok)
        images = sum(r["steps"] * r["batch_size"] * r.get("fuse", 1) for r in ok)
        # Conservative: the span runs from the first start to the last end, so a straggler's tail (fewer
        # processes running) is inside it; end_spread_s says how long that tail was.
        agg.update(images_per_s=round(images / span, 1), seconds=round(span, 3),
                   end_spread_s=round(max(r["t_end"] for r in ok) - min(r["t_end"] for r in ok), 3),
                   per_proc_images_per_s=[r["images_per_s"] for r in ok],
                   peak_mem_gb_per_proc=max(r.get("peak_mem_gb", 0) for r in ok))
    errors = [r["error"] for r in rows if "error" in r]
    if errors or len(ok) < args.procs:
        agg["error"] = errors[0] if errors else f"{args.procs - len(ok)} process(es) gave no result"
    return agg


def main(argv=None) -> int:
    args = parse_args(argv)
    failed = 0
    for model_name in [m for m in args.models.split(",") if m]:
        for step_kind in [s for s in args.steps.split(",") if s]:
            if args.procs > 1 and not args.barrier:
                row = packed(args, model_name, step_kind)
            else:
                try:
                    row = bench_one(args, model_name, step_kind)
                except Exception as err:  # one line per failed cell (e.g. graph on CPU), the others go on
                    row = {"bench": "train_step", "model": model_name, "step": step_kind, "device": args.device,
                           "error": f"{type(err).__name__}: {err}".splitlines()[0][:300]}
            failed += "error" in row
            emit(row, args.out)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
