"""`orchestrate bench-loader`: placeholder until the data loaders land (issue 3)."""
from __future__ import annotations

import argparse


def add_parser(p: argparse.ArgumentParser) -> None:
    pass


def run(args: argparse.Namespace) -> int:
    from orchestrator.cli import UserError
    raise UserError("bench-loader is not built yet")
