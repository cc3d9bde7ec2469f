"""`orchestrate train CONFIG.yaml [--set key=value ...]`: train one trial here (the worker itself)."""
from __future__ import annotations

import argparse


def add_parser(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", nargs="?", help="trial config YAML (default: the paper's CIFAR-10 recipe)")
    p.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                   help="override config keys, e.g. optim.lr=0.05 model.depth=56")
    p.add_argument("--print-config", action="store_true", help="print the resolved config and its trial key, train nothing")


def run(args: argparse.Namespace) -> int:
    if args.print_config:
        import yaml
        from resnet_core.config import load_config, trial_key
        cfg = load_config(args.config, args.set)
        print(yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False) + f"# trial key: {trial_key(cfg)}")
        return 0
    from resnet_core.train import main
    return main([*([args.config] if args.config else []), "--set", *args.set])
