"""`orchestrate demo`: the main job on its embedded defaults, what setup.sh runs after installing.

The smoke sweep (4 tiny trials) on a local Ray with the MLflow store every command uses (--tracking-uri, else
$MLFLOW_TRACKING_URI, else ./mlruns.db), its status, then an
ensemble of its 3 best trials: the whole path in about two minutes on 2 CPU cores. Re-running resumes: the
finished trials are skipped.
"""
from __future__ import annotations

import argparse
from pathlib import Path

SMOKE = Path(__file__).resolve().parents[2] / "sweeps" / "smoke.yaml"


def add_parser(p: argparse.ArgumentParser) -> None:
    p.add_argument("--tracking-uri", help="MLflow store (default: $MLFLOW_TRACKING_URI, else sqlite:///mlruns.db), "
                                          "as for every command")


def run(args: argparse.Namespace) -> int:
    from orchestrator.cli import main
    uri = ["--tracking-uri", args.tracking_uri] if args.tracking_uri else []
    for step in (["sweep", str(SMOKE), *uri], ["status", "smoke", *uri], ["ensemble", "--top", "3", "--sweep", "smoke", *uri]):
        print(f"\n$ orchestrate {' '.join(step)}", flush=True)
        code = main(step)
        if code:
            return code
    return 0
