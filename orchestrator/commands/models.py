"""`orchestrate models [PATTERN]`: the registry as a table (name, depth, params, multiply-adds)."""
from __future__ import annotations

import argparse


def add_parser(p: argparse.ArgumentParser) -> None:
    p.add_argument("pattern", nargs="?", default="*", help="glob over model names, e.g. 'resnet*'")


def model_rows(pattern: str = "*") -> list[dict]:
    import torch
    from resnet_core.models import count_multiply_adds, count_parameters, create_model, list_models
    rows = []
    for name in list_models(pattern):
        with torch.device("meta"):  # builds without allocating: resnet1202 and friends count instantly
            model = create_model(name)
        rows.append(dict(name=name, depth=model.depth, input=model.input_size,
                         params=count_parameters(model), macs=count_multiply_adds(model)))
    return rows


def run(args: argparse.Namespace) -> int:
    from orchestrator.cli import console
    from rich.table import Table
    rows = model_rows(args.pattern)
    if not rows:
        from orchestrator.cli import UserError
        raise UserError(f"no model matches {args.pattern!r}")
    table = Table(title="Models (multiply-adds per image at the native input size)")
    for column in ("name", "depth", "input", "params", "mult-adds"):
        table.add_column(column, justify="left" if column == "name" else "right")
    for r in rows:
        table.add_row(r["name"], str(r["depth"]), f"{r['input']}x{r['input']}",
                      f"{r['params'] / 1e6:.2f}M", _human(r["macs"]))
    console().print(table)
    return 0


def _human(n: int) -> str:
    return f"{n / 1e9:.2f}G" if n >= 1e9 else f"{n / 1e6:.1f}M"
