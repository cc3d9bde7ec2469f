"""`orchestrate train CONFIG.yaml [--set key=value ...]`: train one trial here (the worker itself)."""
from __future__ import annotations

import argparse


def add_parser(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", nargs="?", help="trial config YAML (default: the paper's CIFAR-10 recipe)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override config keys, e.g. optim.lr=0.05 model.depth=56")
    p.add_argument("--tracking-uri", default=None,
                   help="MLflow store, as tracking.uri (default: $MLFLOW_TRACKING_URI, else sqlite:///mlruns.db)")
    show = p.add_mutually_exclusive_group()  # each prints instead of training: both asked, one was ignored
    show.add_argument("--print-config", action="store_true", help="print the resolved config and its trial key, train nothing")
    show.add_argument("--keys", action="store_true", help="list every config key with its default and meaning")


def run(args: argparse.Namespace) -> int:
    if args.keys:
        from orchestrator.cli import console
        from rich.table import Table
        from resnet_core.config import field_docs
        table = Table(title="trial config keys (set in YAML or with --set key=value)")
        table.add_column("key", no_wrap=True)  # keys are copied into --set: never broken across lines
        table.add_column("default")
        table.add_column("meaning")
        for row in field_docs():
            table.add_row(*row)
        console().print(table)
        return 0
    if args.tracking_uri:  # every orchestrate command takes --tracking-uri
        args.set = [*args.set, f"tracking.uri={args.tracking_uri}"]
    if args.print_config:
        import sys
        import yaml
        from resnet_core.config import load_config, trial_key
        from resnet_core.schedule import schedule_warnings
        cfg = load_config(args.config, args.set)
        print(yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False) + f"# trial key: {trial_key(cfg)}")
        for warning in schedule_warnings(cfg):  # as the run itself would say at its start
            print(f"warning: {warning}", file=sys.stderr)
        return 0
    from resnet_core.train import main
    sets = [word for text in args.set for word in ("--set", text)]
    return main([*([args.config] if args.config else []), *sets], prog="orchestrate train",
                probe_store=True)
