"""Wall time of the smoke sweep through `orchestrate sweep` vs a plain Ray Tune script running the same trials.

Both run the same 4 trials (the same train() with MLflow logging, 2 at a time, a fresh local Ray and a fresh
sqlite store each); the difference is what the orchestrator adds: spec validation, trial expansion, the MLflow
ledger, progress, early-stop bookkeeping.

    .venv/bin/python scripts/bench_sweep_overhead.py --repeats 3
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent

PLAIN_TUNE = r'''
import sys, torch, ray
from ray import tune
from orchestrator.sweep import prepare
from resnet_core.train import train

def trainable(config):
    torch.set_num_threads(1)
    train(config["cfg"], report=lambda m: tune.report(dict(m)))

_, trials = prepare(sys.argv[1], tracking_uri=sys.argv[2])   # the same resolved trial configs
ray.init(include_dashboard=False, log_to_driver=False, object_store_memory=256 * 2**20)
tune.Tuner(tune.with_resources(trainable, {"cpu": 1}),
           param_space={"cfg": tune.grid_search([t.config_dict() for t in trials])},
           tune_config=tune.TuneConfig(max_concurrent_trials=2),
           run_config=tune.RunConfig(storage_path=sys.argv[3], verbose=0)).fit()
'''


def timed(cmd: list[str], cwd: Path) -> float:
    start = time.perf_counter()
    subprocess.run(cmd, cwd=cwd, check=True, capture_output=True)
    return time.perf_counter() - start


def one_round(spec: Path) -> tuple[float, float]:
    with tempfile.TemporaryDirectory() as a, tempfile.TemporaryDirectory() as b:
        ours = timed([str(BIN / "orchestrate"), "sweep", str(spec), "--tracking-uri", f"sqlite:///{a}/m.db"], Path(a))
        plain = timed([sys.executable, "-c", PLAIN_TUNE, str(spec), f"sqlite:///{b}/m.db", f"{b}/ray"], Path(b))
    return ours, plain


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--spec", default=str(REPO / "sweeps" / "smoke.yaml"))
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    rounds = [one_round(Path(args.spec)) for _ in range(args.repeats)]
    ours, plain = statistics.median(r[0] for r in rounds), statistics.median(r[1] for r in rounds)
    print(json.dumps({"orchestrate_s": round(ours, 1), "plain_ray_tune_s": round(plain, 1),
                      "overhead_pct": round(100 * (ours / plain - 1), 1),
                      "rounds": [[round(x, 1) for x in r] for r in rounds]}))


if __name__ == "__main__":
    main()
