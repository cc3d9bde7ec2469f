"""`orchestrate`: the command line. Each subcommand lives in ``orchestrator/commands/<name>.py`` and exposes
``add_parser(parser)`` (its arguments) and ``run(args) -> int``; only the chosen one is imported, so the CLI starts
fast and a missing optional dependency of one command never breaks the others.
"""
from __future__ import annotations

import argparse
import difflib
import importlib
import sys
from pathlib import Path

DESCRIPTION = "Run the experiments of He et al. 2016 (ResNets) and your sweeps on Ray Tune or SLURM, tracked in MLflow."

# command name -> (module under orchestrator.commands, one-line help)
COMMANDS = {
    "models": ("models", "list the paper's models with depth, parameters and multiply-adds"),
    "demo": ("demo", "the main job on its embedded defaults (what setup.sh runs)"),
    "sweep": ("sweep", "run or resume a YAML sweep on Ray Tune or SLURM, tracked in MLflow"),
    "status": ("status", "a sweep's trials as MLflow records them"),
    "train": ("train", "train one trial from a YAML config (the worker)"),
    "bench-loader": ("bench_loader", "measure a data loader's images/s"),
    "ensemble": ("ensemble", "combine the K best trials of a sweep and log what the ensemble gains"),
    "report": ("report", "the sweep as the paper's Table 6 (markdown) and Fig. 6 (PNG)"),
    "ui": ("ui", "start the MLflow UI for the tracking store, bound to 127.0.0.1"),
    "tracking-server": ("tracking_server", "run the MLflow tracking server for many trials (PostgreSQL or sqlite), "
                                          "bound to 127.0.0.1"),
}


class UserError(Exception):
    """Bad input from the user: printed as one line, exit code 2, no traceback."""


def console():
    """rich's Console for the commands' tables. Piped or logged output gets 200 columns (rich would use 80 and
    squash every cell), unless COLUMNS says otherwise."""
    import os
    from rich.console import Console
    return Console(width=None if sys.stdout.isatty() or "COLUMNS" in os.environ else 200)


def build_parser(argv: list[str]) -> tuple[argparse.ArgumentParser, dict[str, argparse.ArgumentParser]]:
    """The top-level parser and each command's own (whose errors show that command's usage)."""
    parser = argparse.ArgumentParser(prog="orchestrate", description=DESCRIPTION)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    chosen = next((a for a in argv if not a.startswith("-")), None)
    for name, (module, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        p.set_defaults(module=module)
        if name == chosen:  # its arguments are declared by its module (heavy imports live in run())
            importlib.import_module(f"orchestrator.commands.{module}").add_parser(p)
    return parser, sub.choices


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if "--set" in argv:
        from resnet_core.config import one_value_per_set
        argv = one_value_per_set(argv)
    parser, commands = build_parser(argv)
    chosen = next((a for a in argv if not a.startswith("-")), None)
    if chosen is not None and chosen not in COMMANDS:  # argparse lists the choices; say which one was meant
        close = difflib.get_close_matches(chosen, COMMANDS, n=1)
        parser.error(f"unknown command {chosen!r}" + (f" (did you mean {close[0]}?)" if close else
                                                      f"; commands: {', '.join(COMMANDS)}"))
    args, unknown = parser.parse_known_args(argv)
    if unknown:  # argparse blamed the top level ("usage: orchestrate [-h] COMMAND ..."); blame the command
        where = commands.get(args.command, parser)
        options = [o for o in where._option_string_actions if o.startswith("--") and o != "--help"]
        close = difflib.get_close_matches(unknown[0].split("=")[0], options, n=1)
        where.error(f"unrecognized arguments: {' '.join(unknown)}" + (f" (did you mean {close[0]}?)" if close else ""))
    if not args.command:
        parser.print_help()
        return 0
    command = importlib.import_module(f"orchestrator.commands.{args.module}")
    try:
        return command.run(args) or 0
    except (UserError, ValueError) as err:  # SpecError and ConfigError are ValueErrors
        print(f"orchestrate {args.command}: error: {err}", file=sys.stderr)
        return 2
    except OSError as err:  # a path that is a file where a folder must be, unwritable, too long, ...
        said = f"{err.filename}: {err.strerror}" if err.filename and err.strerror else str(err)
        if isinstance(err, (FileExistsError, NotADirectoryError)) and err.filename and Path(err.filename).is_file():
            said = f"{err.filename} is a file; a folder is needed there"  # 'File exists' did not say what was wrong
        print(f"orchestrate {args.command}: error: {said}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # Ctrl-C: what was done is kept (finished trials, checkpoints); no traceback
        print(f"orchestrate {args.command}: interrupted{AFTER_INTERRUPT.get(args.command, '')}", file=sys.stderr)
        return 130


AFTER_INTERRUPT = {"sweep": "; finished trials are kept, run the same command again to resume the others"}


if __name__ == "__main__":
    # `python -m orchestrator.cli`: run the imported module, so UserError is the class commands raise.
    from orchestrator.cli import main as installed_main
    sys.exit(installed_main())
