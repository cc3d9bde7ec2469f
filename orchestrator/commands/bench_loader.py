"""`orchestrate bench-loader`: a data loader's images/s (one JSON line), or all loaders side by side (--compare).

Timing starts at the first batch (worker start-up and pipeline build are reported apart as `first_batch_s`),
and ends after `--batches` more batches, with the device synchronised; batches continue across epochs.
"""
from __future__ import annotations

import argparse
import json
import time

LOADERS = ("gpu", "dali", "torch")
DEFAULT_DATA = "../shared/datasets/cifar10-jpeg.tar.gz"


def add_parser(p: argparse.ArgumentParser) -> None:
    p.add_argument("--loader", choices=LOADERS, default="gpu", help="which loader to measure (default: gpu)")
    p.add_argument("--data", default=DEFAULT_DATA, help="dataset path or 'synthetic' (default: %(default)s)")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu", help="where batches are delivered")
    p.add_argument("--batch-size", type=int, default=256, help="images per batch (default: %(default)s)")
    p.add_argument("--batches", type=int, default=50, help="timed batches after the first (default: %(default)s)")
    p.add_argument("--split", choices=("train", "test"), default="train", help="train is augmented (default: train)")
    p.add_argument("--workers", type=int, default=2, help="CPU workers of the torch/dali loaders (default: 2)")
    p.add_argument("--cache-dir", default=None, help="where a .tar.gz is unpacked / decoded arrays are cached")
    p.add_argument("--synthetic-size", type=int, default=50_000,
                   help="train images of --data synthetic, CIFAR-10's 50k by default (epochs long enough to time)")
    p.add_argument("--compare", action="store_true", help="run every available loader and print a table with ratios")


def run(args: argparse.Namespace) -> int:
    from orchestrator.cli import UserError
    if args.batch_size < 1 or args.batches < 1:
        raise UserError("--batch-size and --batches must be >= 1")
    if args.device == "cuda":
        import torch
        if not torch.cuda.is_available():
            raise UserError("--device cuda: no CUDA GPU is visible on this machine; use --device cpu")
    if not args.compare:
        print(json.dumps(measure(args, args.loader)))
        return 0
    rows = [_measure_or_skip(args, name) for name in LOADERS]
    _print_table(args, rows)
    return 1 if any("failed" in r for r in rows) else 0


def data_config(args: argparse.Namespace, loader_name: str):
    from resnet_core.data import DataConfig, SyntheticConfig
    return DataConfig(path=args.data, loader=loader_name, num_workers=args.workers, cache_dir=args.cache_dir,
                      synthetic=SyntheticConfig(train_size=args.synthetic_size, test_size=10_000))


def measure(args: argparse.Namespace, loader_name: str) -> dict:
    import torch
    from resnet_core.data import build_loader
    started = time.perf_counter()
    loader = build_loader(data_config(args, loader_name), args.split, args.batch_size, device=args.device)
    batches = _endless(loader)
    next(batches)
    _sync(torch, args.device)
    first = time.perf_counter()
    images = 0
    for _ in range(args.batches):
        batch, _labels = next(batches)
        images += len(batch)
    _sync(torch, args.device)
    seconds = time.perf_counter() - first
    batches.close()
    return dict(loader=loader_name, data=args.data, device=args.device, split=args.split,
                batch_size=args.batch_size, batches=args.batches, workers=args.workers, images=images,
                seconds=round(seconds, 4), images_per_s=round(images / seconds, 1),
                first_batch_s=round(first - started, 3))


def _endless(loader):
    epoch = 0
    while True:
        yield from loader.iterate(epoch)
        epoch += 1


def _sync(torch, device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def _measure_or_skip(args: argparse.Namespace, name: str) -> dict:
    from orchestrator.cli import UserError
    from resnet_core.data import DataError
    from resnet_core.data.formats import CIFAR_SIZED_MAX, open_dataset
    try:
        if name == "gpu" and not open_dataset(data_config(args, name)).cifar_sized:
            return dict(loader=name, skipped=f"holds only CIFAR-sized images (<= {CIFAR_SIZED_MAX} px)")
        return measure(args, name)
    except ImportError as err:  # an optional loader missing on this machine is a row, not a crash
        return dict(loader=name, skipped=str(err))
    except (UserError, DataError):  # bad input is every loader's: one line, as without --compare
        raise
    except Exception as err:  # one loader broken on this machine (a decoder, a driver) keeps the others' rows
        return dict(loader=name, failed=f"{type(err).__name__}: {err}")


def _print_table(args: argparse.Namespace, rows: list[dict]) -> None:
    from orchestrator.cli import console
    from rich.table import Table
    measured = [r for r in rows if "images_per_s" in r]
    torch_rate = next((r["images_per_s"] for r in measured if r["loader"] == "torch"), None)
    table = Table(title=f"bench-loader: {args.data}, {args.split}, batch {args.batch_size} x {args.batches}, "
                        f"{args.workers} workers, device {args.device}")
    for column in ("loader", "images/s", "x torch", "first batch s"):
        table.add_column(column, justify="left" if column == "loader" else "right")
    for r in rows:
        if "skipped" in r or "failed" in r:
            state = "skipped" if "skipped" in r else "failed"
            table.add_row(r["loader"], state, "", r[state][:60])
            continue
        ratio = f"{r['images_per_s'] / torch_rate:.2f}" if torch_rate else "-"
        table.add_row(r["loader"], f"{r['images_per_s']:,.0f}", ratio, f"{r['first_batch_s']:.2f}")
    console().print(table)
