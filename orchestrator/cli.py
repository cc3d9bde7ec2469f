"""`orchestrate`: the command line. Each subcommand lives in ``orchestrator/commands/<name>.py`` and exposes
``add_parser(subparsers)`` (its arguments) and ``run(args) -> int``; it is imported only when chosen, so a missing
optional dependency of one command never breaks the others.
"""
from __future__ import annotations

import argparse
import importlib
import sys

# command name -> (module under orchestrator.commands, one-line help)
COMMANDS = {
    "models": ("models", "list the paper's models with depth, parameters and multiply-adds"),
    "demo": ("demo", "the main job on its embedded defaults (what setup.sh runs)"),
    "train": ("train", "train one trial from a YAML config (the worker)"),
    "bench-loader": ("bench_loader", "measure a data loader's images/s"),
}


class UserError(Exception):
    """Bad input from the user: printed as one line, exit code 2, no traceback."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="orchestrate", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (module, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        p.set_defaults(module=module)
        # Arguments are declared by the command's module; importing it is cheap (heavy imports live in run()).
        importlib.import_module(f"orchestrator.commands.{module}").add_parser(p)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not args.command:
        parser.print_help()
        return 0
    command = importlib.import_module(f"orchestrator.commands.{args.module}")
    try:
        return command.run(args) or 0
    except (UserError, ValueError, FileNotFoundError) as err:
        print(f"orchestrate {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
