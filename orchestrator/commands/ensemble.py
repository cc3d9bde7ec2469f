"""`orchestrate ensemble --top K`: combine a sweep's K best finished trials and log what the ensemble is worth
(paper Sec. 4.1: six ResNets of different depth made the ILSVRC 2015 entry). See orchestrator/ensemble.py."""
from __future__ import annotations

import argparse
from pathlib import Path

from orchestrator.runs import add_store_arguments

DEFAULT_CACHE = Path("runs") / "predictions"


def add_parser(p: argparse.ArgumentParser) -> None:
    p.add_argument("--top", type=int, required=True, metavar="K", help="members: the K best finished trials")
    add_store_arguments(p)
    p.add_argument("--metric", default="val_error",
                   help="run metric that ranks the trials, lower is better (default: val_error)")
    p.add_argument("--split", default="test", choices=("val", "test"), help="split the ensemble is measured on")
    p.add_argument("--method", default="mean", choices=("mean", "weighted", "greedy"),
                   help="mean: softmax average; weighted: by val accuracy; greedy: Caruana et al. 2004 "
                        "forward selection with replacement on the val split")
    p.add_argument("--rounds", type=int, default=None, help="greedy: selection rounds (default: 2K)")
    p.add_argument("--skip-broken", action="store_true",
                   help="leave out members whose checkpoint is missing or corrupt (default: error)")
    p.add_argument("--cache", type=Path, default=None,
                   help=f"folder of cached member predictions (default: {DEFAULT_CACHE}/<sweep>)")
    p.add_argument("--batch-size", type=int, default=500, help="evaluation batch size")
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"), help="auto: CUDA when present")
    p.add_argument("--no-log", action="store_true", help="do not record an MLflow run of kind 'ensemble'")


def run(args: argparse.Namespace) -> int:
    import torch
    from orchestrator.cli import console
    from orchestrator.cli import UserError
    from orchestrator.ensemble import build_ensemble, log_ensemble, selection_caveat
    from orchestrator.runs import open_client, sweep_experiment
    if args.device == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda: this machine has no CUDA GPU")
    if args.rounds is not None and args.rounds < 1:
        raise UserError(f"--rounds {args.rounds}: must be at least 1")
    if args.batch_size < 1:  # checked here: with every member's predictions cached, none would be computed
        raise UserError(f"--batch-size {args.batch_size}: must be at least 1")
    device = torch.device("cuda" if args.device != "cpu" and torch.cuda.is_available() else "cpu")
    screen = console()
    caveat = selection_caveat(args.metric, args.split, args.method)
    if caveat:
        screen.print(f"[yellow]{caveat}[/yellow]")
    client = open_client(args.tracking_uri)
    experiment = sweep_experiment(client, args.sweep)
    result = build_ensemble(client, experiment, top=args.top, metric=args.metric, split=args.split,
                            method=args.method, cache_dir=args.cache or DEFAULT_CACHE / experiment.name,
                            skip_broken=args.skip_broken, batch_size=args.batch_size, device=device,
                            rounds=args.rounds, say=lambda text: screen.print(f"[yellow]{text}[/yellow]"))
    screen.print(result_table(result, experiment.name))
    used = sum(m.weight > 0 for m in result.members)  # greedy selection may give a candidate no weight
    members = f"{used} members" if used == len(result.members) else f"{used} of {len(result.members)} candidates"
    top5 = ("" if result.top5_error is None else f"; top-5 {100 * result.top5_error:.2f}%, best member "
            f"{100 * result.best_member_top5_error:.2f}%")
    screen.print(f"ensemble ({result.method}, {members}) "
                 f"{result.split} error {100 * result.error:.2f}%; best member on {result.split} "
                 f"{100 * result.best_member_error:.2f}%; "
                 f"gain {100 * result.gain:+.2f} points{top5}")
    if not args.no_log:
        run_id = log_ensemble(client, experiment, result, caveat)
        screen.print(f"logged MLflow run {run_id} (kind=ensemble) in experiment {experiment.name!r}")
    return 0


def result_table(result, sweep: str):
    from rich.table import Table
    table = Table(title=f"Ensemble of sweep {sweep!r}: {result.method}, {result.split} split, "
                        f"members ranked by {result.metric}")
    top5 = [f"{result.split} top-5 error"] if result.top5_error is not None else []
    for column in ("run", "trial", "model", "seed", result.metric, "weight", f"{result.split} error", *top5):
        table.add_column(column, justify="left" if column in ("run", "trial", "model") else "right")
    for m in result.members:
        table.add_row(m.run_id[:12], m.label, m.model, m.seed, f"{m.selection_metric:.4f}",
                      f"{m.weight:.3f}", f"{100 * m.error:.2f}%", *([f"{100 * m.top5_error:.2f}%"] if top5 else []))
    table.add_row("ensemble", "", "", "", "", "1.000", f"{100 * result.error:.2f}%",
                  *([f"{100 * result.top5_error:.2f}%"] if top5 else []), style="bold")
    return table
