"""`orchestrate demo`: the main job on embedded defaults, what setup.sh runs after installing.

For now the model zoo table; it becomes the smoke sweep + ensemble once `orchestrate sweep` lands.
"""
from __future__ import annotations

import argparse


def add_parser(p: argparse.ArgumentParser) -> None:
    pass


def run(args: argparse.Namespace) -> int:
    from . import models
    return models.run(argparse.Namespace(pattern="*"))
