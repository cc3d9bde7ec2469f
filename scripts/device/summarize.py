"""The rows of docs/benchmarks.md from a device run's bench.jsonl (run_study.sh writes it), as markdown.

    python scripts/device/summarize.py /work/.device/.../bench.jsonl

One table per kind of row: single training steps (issue 4), packed/fused trials (issue 8), loaders (issue 3).
A failed cell keeps its row with the error, so a missing number is never silently dropped.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

TABLES = {
    "train_step": ("model", "step", "fuse", "images_per_s", "ms_per_step", "warmup_s", "peak_mem_gb", "est_mem_gb"),
    "train_step_packed": ("model", "step", "procs", "fuse", "mps", "images_per_s", "per_proc_images_per_s",
                          "end_spread_s", "peak_mem_gb_per_proc"),
    "loader": ("cmd", "loader", "device", "batch_size", "batches", "images_per_s", "first_batch_s"),
}


def cell(value) -> str:
    if isinstance(value, float):
        return f"{value:,.1f}" if value >= 100 else f"{value:g}"
    if isinstance(value, list):
        return " / ".join(cell(v) for v in value)
    return "" if value is None else str(value)


def tables(rows: list[dict]) -> str:
    out = []
    for kind, columns in TABLES.items():
        mine = [r for r in rows if r.get("bench") == kind]
        if not mine:
            continue
        header = [*columns, "error"] if any("error" in r for r in mine) else list(columns)
        out += [f"**{kind}** ({mine[0].get('gpu', mine[0].get('device', ''))})", "",
                "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        out += ["| " + " | ".join(cell(r.get(c, 1 if c == "fuse" else None)) for c in header) + " |" for r in mine]
        out.append("")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    paths = argv if argv is not None else sys.argv[1:]
    if not paths:
        print(__doc__.strip().splitlines()[2].strip(), file=sys.stderr)
        return 2
    rows = []
    for path in paths:
        for number, line in enumerate(Path(path).read_text().splitlines(), 1):
            if line.startswith("{"):
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as err:
                    print(f"{path}:{number}: not JSON ({err}); skipped", file=sys.stderr)
    print(tables(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
