"""`orchestrate report`: a sweep as the paper's Table 6 (markdown) and Fig. 6 (PNG), plus error against depth,
written under --out and logged as artifacts of an MLflow run of kind 'report'. See orchestrator/report.py."""
from __future__ import annotations

import argparse
from pathlib import Path

from orchestrator.runs import add_store_arguments


def add_parser(p: argparse.ArgumentParser) -> None:
    add_store_arguments(p)
    p.add_argument("--out", type=Path, default=None, help="output folder (default: reports/<sweep>/)")
    p.add_argument("--no-log", action="store_true", help="do not record an MLflow run of kind 'report'")


def run(args: argparse.Namespace) -> int:
    from orchestrator.cli import console
    from rich.markdown import Markdown
    from orchestrator.report import log_report, write_report
    from orchestrator.runs import open_client, sweep_experiment
    screen = console()
    client = open_client(args.tracking_uri)
    experiment = sweep_experiment(client, args.sweep)
    out = args.out or Path("reports") / experiment.name
    cells, paths = write_report(client, experiment, out, say=lambda text: screen.print(text, style="yellow", markup=False))
    screen.print(Markdown(paths["table6.md"].read_text()))
    for path in paths.values():
        screen.print(f"wrote {path}")
    if not args.no_log:
        run_id = log_report(client, experiment, cells, paths)
        screen.print(f"logged MLflow run {run_id} (kind=report) in experiment {experiment.name!r}")
    return 0
