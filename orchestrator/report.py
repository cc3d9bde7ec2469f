"""A sweep as the paper shows its CIFAR-10 results (He et al. 2016, Sec. 4.2): Table 6 and Figure 6.

- ``table6.md``: per depth, plain nets and ResNets side by side: model, layers, parameters (as the paper
  writes them: 0.27M, 1.7M, 19.4M), test error (%) as the best of the seeds and mean ± std over them (the
  paper's "6.43 (6.61±0.16)" for ResNet-110, 5 runs). The std is the sample std (n-1); "–" with one seed.
  Trials of more than 10 classes (ImageNet) add their top-5 error the same way, as the paper's Tables 3-4.
  ``table6.json`` holds the same numbers unrounded.
- ``fig6_curves.png``: training error (dashed) and test error (solid) against iterations, plain nets left,
  ResNets right, one curve per depth (the mean over seeds at each logged iteration), as in Fig. 6.
- ``error_vs_depth.png``: test error against depth per family (mean ± std bars, best as crosses): the
  degradation problem at a glance (plain nets get worse with depth, ResNets better).

Only finished trials count (`orchestrator.runs.is_finished`); numbers are the runs' final MLflow metrics.
Trials that differ in more than model and seed (two learning rates, say) are separate cells, each with its
variant ("optim.lr=0.05"): the seeds column counts repeats of one experiment only. Such a sweep's table is
long, one row per depth, model and variant (side-by-side columns per variant made one unreadably wide row
per depth), and its figures draw at most MAX_SERIES lines a panel (a legend of 16 learning rates is noise).
"""
from __future__ import annotations

import json
import statistics
from collections import defaultdict
from dataclasses import asdict, dataclass, field
from pathlib import Path

from resnet_core.config import non_result_fields

from orchestrator.cli import UserError
from orchestrator.runs import (BrokenRun, ModelInfo, family_of, finished_trials, metric_history, model_info, run_label,
                              stopped_early)

FILES = ("table6.md", "table6.json", "fig6_curves.png", "error_vs_depth.png")


@dataclass
class Trial:
    run_id: str
    label: str
    info: ModelInfo
    seed: str
    test_error: float
    variant: dict[str, str] = field(default_factory=dict)  # the swept settings besides model and seed, as logged
    test_top5_error: float | None = None  # logged by trials of more than 10 classes


def is_plain(family: str) -> bool:
    return family == "plain"


# Params that differ between trials without making them different experiments: the seed (a cell's repeats), what
# a cell's family and depth already say (runs.family_of), and what no result depends on (config.non_result_fields:
# where a trial keeps its checkpoints and metrics). Any other model setting (model.zero_init_residual) is a variant.
MODEL_CELL = ("seed", "model.name", "model.depth", "model.shortcut", "model.plain", "model.unit", "model.bottleneck")


def not_a_variant(runs) -> tuple[str, ...]:
    """The param prefixes that make no variant ("checkpoint.", "eval.batch_size", ...) for these runs."""
    warmup_on_error = any(r.data.params.get("schedule.warmup.until_train_error", "None") != "None" for r in runs)
    fields = non_result_fields(warmup_on_error)
    return MODEL_CELL + tuple(f"{section}.{key}" for section, keys in fields.items()
                              for key in ([""] if keys is True else sorted(keys)))


def variants(runs) -> dict[str, dict[str, str]]:
    """run id -> the settings that vary across the sweep's trials other than model and seed ({} if none): trials
    that differ in lr are separate cells of the table, not seeds of one. Exact values: two sampled learning
    rates that agree to 4 digits are still two experiments."""
    keys, skip = set().union(*(r.data.params for r in runs)), not_a_variant(runs)
    varying = sorted(k for k in keys if not k.startswith(skip) and len({r.data.params.get(k) for r in runs}) > 1)
    return {r.info.run_id: {k: r.data.params.get(k, "-") for k in varying} for r in runs}


def variant_label(variant: dict[str, str]) -> str:
    return ", ".join(f"{k}={short(v)}" for k, v in variant.items())


def variant_order(variant: dict[str, str]) -> list:
    """Numbers by value (lr 0.005 before 0.05 before 0.5), anything else by its text."""
    def value(text: str):
        try:
            return (0, float(text), "")
        except ValueError:
            return (1, 0.0, text)
    return [value(v) for v in variant.values()]


def short(value: str) -> str:
    """A sampled float as 4 significant digits ("0.02754", not "0.027535425526875226"); anything else as it is."""
    try:
        return f"{float(value):.4g}" if any(c in value for c in ".e") else value
    except ValueError:
        return value


@dataclass
class Cell:
    """One model of Table 6: a family at one depth, over its seeds (errors as fractions, as logged)."""
    family: str
    depth: int
    model: str
    params: int | None
    errors: list[float]
    runs: list[str] = field(default_factory=list)
    variant: dict[str, str] = field(default_factory=dict)
    top5_errors: list[float] | None = None  # when every seed logged one

    @property
    def series(self) -> str:
        """A family and variant: one line of error_vs_depth.png."""
        return self.family + (f" [{variant_label(self.variant)}]" if self.variant else "")

    @property
    def label(self) -> str:
        """A model and variant: one curve of fig6_curves.png."""
        return self.model + (f" [{variant_label(self.variant)}]" if self.variant else "")

    @property
    def best(self) -> float:
        return spread(self.errors)[0]

    @property
    def mean(self) -> float:
        return spread(self.errors)[1]

    @property
    def std(self) -> float | None:
        return spread(self.errors)[2]


def spread(errors: list[float]) -> tuple[float, float, float | None]:
    """The best of the seeds, their mean and sample std (None for one seed): the paper's "6.43 (6.61±0.16)"."""
    return min(errors), statistics.fmean(errors), statistics.stdev(errors) if len(errors) > 1 else None


# -- reading the sweep ------------------------------------------------------------------------------------
def collect_trials(client, experiment) -> list[Trial]:
    runs = [r for r in finished_trials(client, experiment.experiment_id) if "test_error" in r.data.metrics]
    if not runs:
        raise UserError(f"sweep {experiment.name!r} has no finished trial with a test_error metric yet")
    variant = variants(runs)
    return [Trial(r.info.run_id, run_label(r), model_info(r), r.data.params.get("seed", "?"),
                  r.data.metrics["test_error"], variant[r.info.run_id], r.data.metrics.get("test_top5_error"))
            for r in runs]


def build_cells(client, trials: list[Trial], say=print) -> list[Cell]:
    """Sorted by depth, then plain before ResNet, then variant: the order of the table's rows."""
    groups: dict[tuple, list[Trial]] = defaultdict(list)
    for t in trials:
        groups[(family_of(t.info), t.info.depth, tuple(t.variant.items()))].append(t)
    cells = []
    for (family, depth, variant), members in groups.items():
        members.sort(key=lambda t: t.run_id)
        top5 = [t.test_top5_error for t in members]
        cells.append(Cell(family, depth, f"{family}-{depth}", parameter_count(client, members, say),
                          [t.test_error for t in members], [t.run_id for t in members], dict(variant),
                          None if None in top5 else top5))
    return sorted(cells, key=lambda c: (c.depth, not is_plain(c.family), c.family, variant_order(c.variant)))


def parameter_count(client, members: list[Trial], say=print) -> int | None:
    """Parameters of the trained model, read from the first readable checkpoint of the group (the class count
    comes from the data, so the model alone cannot tell)."""
    from resnet_core.models import count_parameters
    from orchestrator.runs import load_model
    for t in members:
        try:
            return count_parameters(load_model(client, t.run_id))
        except BrokenRun as err:
            say(f"parameters: {err}; trying another seed")
    say(f"parameters of {members[0].info.name} depth {members[0].info.depth}: no readable checkpoint, shown as ?")
    return None


# -- Table 6 ------------------------------------------------------------------------------------------------
def families(cells: list[Cell]) -> list[str]:
    """Column groups, plain first (the paper's left/right)."""
    return sorted({c.family for c in cells}, key=lambda f: (not is_plain(f), f))


def percent(value: float) -> str:
    return f"{100 * value:.2f}"


def params_text(count: int | None) -> str:
    """As the paper: 2 significant digits, 1 decimal from 10M on (0.27M, 1.7M, 19.4M); ResNet-8 is 0.075M."""
    if count is None:
        return "?"
    millions = count / 1e6
    return f"{millions:.2g}M" if millions < 10 else f"{millions:.1f}M"


def has_top5(cells: list[Cell]) -> bool:
    return any(c.top5_errors for c in cells)


def error_columns(errors: list[float] | None) -> list[str]:
    """The best of the seeds, and their mean ± sample std."""
    if not errors:
        return ["–", "–"]
    best, mean, std = spread(errors)
    return [percent(best), f"{percent(mean)} ± {percent(std) if std is not None else '–'}"]


def error_headers(top5: bool) -> list[str]:
    return ["error (%) best", "error (%) mean ± std"] + (["top-5 (%) best", "top-5 (%) mean ± std"] if top5 else [])


def cell_columns(cell: Cell | None, top5: bool = False) -> list[str]:
    if cell is None:
        return [""] * (7 if top5 else 5)
    return [cell.model, params_text(cell.params), *error_columns(cell.errors),
            *(error_columns(cell.top5_errors) if top5 else []), str(len(cell.errors))]


def not_counted(client, experiment) -> str:
    """The sweep's trial runs the table leaves out, by state: a reader must know the table is not all of it."""
    from orchestrator.runs import is_finished, trial_runs
    states = [("stopped early" if stopped_early(r) else
               "failed" if r.info.status == "FAILED" else "running or interrupted")
              for r in trial_runs(client, experiment.experiment_id) if not is_finished(r)]
    counts = ", ".join(f"{states.count(s)} {s}" for s in ("stopped early", "failed", "running or interrupted")
                       if states.count(s))
    return f"Not counted (only finished trials are): {counts}." if counts else ""


def table6_markdown(cells: list[Cell], sweep: str, note: str = "") -> str:
    form = "Table 6 form, with the top-5 error of Tables 3-4" if has_top5(cells) else "Table 6 form"
    lines = [f"# Sweep `{sweep}`: classification error on the test set ({form})", "",
             "Test error of the final models. Per family: the best of the seeds and the mean ± sample std over "
             "them (He et al. 2016, Table 6: ResNet-110 \"6.43 (6.61±0.16)\" over 5 runs)." + (f" {note}" if note else ""), ""]
    return "\n".join(lines + (variant_rows(cells) if any(c.variant for c in cells) else paper_rows(cells))) + "\n"


def paper_rows(cells: list[Cell]) -> list[str]:
    """The paper's layout: one row per depth, the families side by side."""
    names, top5 = families(cells), has_top5(cells)
    by_key = {(c.family, c.depth): c for c in cells}
    group = ["# params", *error_headers(top5), "seeds"]
    header = ["layers"] + [col for name in names for col in (name, *group)]
    lines = ["| " + " | ".join(header) + " |",
             "|" + "|".join(["---:"] + (["---"] + ["---:"] * len(group)) * len(names)) + "|"]
    for depth in sorted({c.depth for c in cells}):
        row = [str(depth)] + [col for name in names for col in cell_columns(by_key.get((name, depth)), top5)]
        lines.append("| " + " | ".join(row) + " |")
    return lines


def variant_rows(cells: list[Cell]) -> list[str]:
    """One row per depth, model and variant, in build_cells' order: the variants of a model at one depth are
    adjacent rows, so they compare down a column (as columns they made one row of 5 x variants cells)."""
    top5 = has_top5(cells)
    header = ["layers", "model", "variant", "# params", *error_headers(top5), "seeds"]
    lines = ["| " + " | ".join(header) + " |", "|---:|---|---|" + "---:|" * (len(header) - 3)]
    for cell in cells:
        model, *numbers = cell_columns(cell, top5)
        lines.append("| " + " | ".join([str(cell.depth), model, variant_label(cell.variant), *numbers]) + " |")
    return lines


def table6_json(cells: list[Cell], sweep: str) -> str:
    rows = [{**asdict(c), "best": c.best, "mean": c.mean, "std": c.std,
             **(dict(zip(("top5_best", "top5_mean", "top5_std"), spread(c.top5_errors))) if c.top5_errors else {})}
            for c in cells]
    return json.dumps({"sweep": sweep, "metric": "test_error", "rows": rows}, indent=2)


# -- figures --------------------------------------------------------------------------------------------------
MAX_SERIES = 8  # lines per panel: more make an unreadable legend and repeat the colour cycle's 10 colours


def best_series(cells: list[Cell], key, limit: int = MAX_SERIES) -> tuple[list[Cell], int, int]:
    """The cells of the `limit` series (the cells of one key(cell)) over the most depths, then of lowest mean test
    error, in their order; and how many series are drawn, of how many (the table has them all)."""
    series: dict[str, list[Cell]] = defaultdict(list)
    for c in cells:
        series[key(c)].append(c)
    kept = sorted(series, key=lambda k: (-len(series[k]), min(c.mean for c in series[k])))[:limit]
    return [c for c in cells if key(c) in kept], len(kept), len(series)


def mean_curve(client, run_ids: list[str], key: str) -> tuple[list[int], list[float]]:
    """The mean over seeds at every logged iteration (seeds of one config log at the same iterations)."""
    points: dict[int, list[float]] = defaultdict(list)
    for run_id in run_ids:
        for step, value in metric_history(client, run_id, key):
            points[step].append(value)
    steps = sorted(points)
    return steps, [100 * statistics.fmean(points[s]) for s in steps]


CURVE_SETTINGS = {"train_error": "tracking.log_every", "test_error": "eval.every_epochs"}


def why_no_curve(client, cell: Cell, key: str) -> str:
    if any("resumed_from_run" in client.get_run(run_id).data.tags for run_id in cell.runs):
        return ("its run went on from a checkpoint written with another store (tag resumed_from_run): the curve is "
                "in that run")
    return f"{CURVE_SETTINGS[key]} below the run's length gives one"


def plot_curves(client, cells: list[Cell], path: Path, sweep: str, say=print) -> None:
    """Fig. 6: dashed training error, solid test error; plain nets left, ResNets right; one colour per depth.
    A curve of one point is drawn as a dot and said: a line through one point is invisible."""
    import matplotlib.pyplot as plt
    sides = [residual for residual in (False, True) if any((not is_plain(c.family)) == residual for c in cells)]
    fig, axes = plt.subplots(1, len(sides), figsize=(6 * len(sides), 4.5), sharey=True, squeeze=False)
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for ax, residual in zip(axes[0], sides):  # a sweep of ResNets only gets no empty "plain" panel
        side, drawn, total = best_series([c for c in cells if (not is_plain(c.family)) == residual], lambda c: c.label)
        left_out = f" (best {drawn} of {total} by mean test error)" if drawn < total else ""
        for i, cell in enumerate(side):
            colour = colours[i % len(colours)]
            for key, style in (("train_error", {"linestyle": "--", "linewidth": 1}),
                               ("test_error", {"linewidth": 2, "label": cell.label})):
                steps, errors = mean_curve(client, cell.runs, key)
                if len(steps) < 2:
                    say(f"{path.name}: {cell.label}'s {key} has {len(steps)} logged point(s), no curve; "
                        + why_no_curve(client, cell, key))
                ax.plot(steps, errors, color=colour, marker="o" if len(steps) == 1 else None, **style)
        ax.set_title(("ResNets" if residual else "plain networks") + left_out)
        ax.set_xlabel("iterations")
        ax.grid(alpha=0.3)
        ax.legend()
    axes[0][0].set_ylabel("error (%)")
    fig.suptitle(f"Sweep {sweep}: training error (dashed) and test error (solid)\nas He et al. 2016 Fig. 6")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_error_vs_depth(cells: list[Cell], path: Path, sweep: str) -> None:
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    # Lines per family, so that a family of worse nets (plain ones: the point of the figure) is not crowded out;
    # first those over the most depths: a line of one point says nothing about depth.
    names, shown, drawn, total = families(cells), [], 0, 0
    for name in names:
        kept, n_kept, n = best_series([c for c in cells if c.family == name], lambda c: c.series,
                                      max(1, MAX_SERIES // len(names)))
        shown, drawn, total = shown + kept, drawn + n_kept, total + n
    left_out = (f"\n{drawn} of {total} lines: per family those over most depths, then lowest error"
                if drawn < total else "")
    order = sorted(shown, key=lambda c: (not is_plain(c.family), c.family, variant_order(c.variant)))
    for name in dict.fromkeys(c.series for c in order):  # plain first, variants by value
        side = [c for c in shown if c.series == name]
        depths = [c.depth for c in side]
        ax.errorbar(depths, [100 * c.mean for c in side], yerr=[100 * (c.std or 0.0) for c in side],
                    marker="o", capsize=3, label=name)
        ax.scatter(depths, [100 * c.best for c in side], marker="x", color="black", zorder=3)
    ax.set_xlabel("layers")
    ax.set_ylabel("test error (%)")
    ax.set_xticks(sorted({c.depth for c in cells}))
    ax.set_title(f"Sweep {sweep}: test error against depth\n(mean ± std, x: best seed){left_out}")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# -- the whole report ---------------------------------------------------------------------------------------
def write_report(client, experiment, out: Path, say=print) -> tuple[list[Cell], dict[str, Path]]:
    import matplotlib
    matplotlib.use("Agg")  # files only: never needs a display
    out.mkdir(parents=True, exist_ok=True)
    cells = build_cells(client, collect_trials(client, experiment), say)
    paths = {name: out / name for name in FILES}
    paths["table6.md"].write_text(table6_markdown(cells, experiment.name, not_counted(client, experiment)))
    paths["table6.json"].write_text(table6_json(cells, experiment.name))
    plot_curves(client, cells, paths["fig6_curves.png"], experiment.name, say)
    plot_error_vs_depth(cells, paths["error_vs_depth.png"], experiment.name)
    return cells, paths


def log_report(client, experiment, cells: list[Cell], paths: dict[str, Path]) -> str:
    """An MLflow run tagged kind=report in the sweep's experiment, the files as its artifacts."""
    run = client.create_run(experiment.experiment_id, run_name=f"report-{experiment.name}",
                            tags={"kind": "report", "sweep": experiment.name})
    client.log_param(run.info.run_id, "trials", str(sum(len(c.errors) for c in cells)))
    for path in paths.values():
        client.log_artifact(run.info.run_id, str(path))
    client.set_terminated(run.info.run_id, "FINISHED")
    return run.info.run_id
