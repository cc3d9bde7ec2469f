"""Trials that start together on one JPEG folder (packed trials on one machine): seconds until each has the
decoded train split as one array, from an empty cache. One of them decodes (on every core); the others wait for
its .npy and load it.

    .venv/bin/python scripts/bench_decode_together.py --data /path/to/cifar10-jpeg --trials 3
"""
from __future__ import annotations

import argparse
import multiprocessing
import tempfile
import time


def trial(data: str, cache: str, start, seconds) -> None:
    from resnet_core.data import DataConfig
    from resnet_core.data.formats import open_dataset
    start.wait()
    began = time.perf_counter()
    open_dataset(DataConfig(path=data, cache_dir=cache)).arrays("train")
    seconds.append(round(time.perf_counter() - began, 1))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", required=True, help="a JPEG ImageFolder tree (train/<class>/*.jpg)")
    parser.add_argument("--trials", type=int, default=3)
    args = parser.parse_args()
    ctx = multiprocessing.get_context("spawn")  # plain processes, as trials are (a Pool's daemons decode alone)
    manager = ctx.Manager()
    start, seconds = manager.Barrier(args.trials), manager.list()
    with tempfile.TemporaryDirectory() as cache:
        procs = [ctx.Process(target=trial, args=(args.data, cache, start, seconds)) for _ in range(args.trials)]
        for proc in procs:
            proc.start()
        for proc in procs:
            proc.join()
    print(f"{args.trials} trials, seconds each until the train split was in memory: {sorted(seconds)}")


if __name__ == "__main__":
    main()
