"""`orchestrate report`: Table 6 and Fig. 6 from a real finished sweep; every number in the table is checked against
the MLflow metrics it comes from, read here straight from the store."""
from __future__ import annotations

import json
import random
import statistics
from collections import defaultdict

import matplotlib.image
import pytest
from mlflow import MlflowClient

from orchestrator.cli import main
from orchestrator.report import FILES, mean_curve, variants
from resnet_core.models import count_parameters, create_model

from sweep_runs import smoke_sweep, trial_config  # noqa: F401  (the fixture)

pytestmark = pytest.mark.timeout(300)


@pytest.fixture(scope="module")
def report(smoke_sweep, tmp_path_factory):
    out = tmp_path_factory.mktemp("report") / "smoke report"  # a space in the path, on purpose
    assert main(["report", "--tracking-uri", smoke_sweep.uri, "--out", str(out)]) == 0
    return out


def expected_cells(smoke_sweep) -> dict[tuple[str, int], list[float]]:
    """(family, depth) -> final test_error of each finished trial, straight from MLflow (not from our code)."""
    client = MlflowClient(smoke_sweep.uri)
    runs = client.search_runs([smoke_sweep.experiment_id], "tags.kind = 'trial' and attributes.status = 'FINISHED'")
    runs = [r for r in runs if r.data.tags.get("early_stopped") != "true"]
    assert sorted(r.info.run_id for r in runs) == sorted(smoke_sweep.finished)
    cells = defaultdict(list)
    for r in sorted(runs, key=lambda r: r.info.run_id):
        family = "plain" if r.data.params["model.name"] == "plain_cifar" else "ResNet"
        cells[(family, int(r.data.params["model.depth"]))].append(r.data.metrics["test_error"])
    return cells


def table_rows(markdown: str) -> dict[int, list[str]]:
    rows = [line.strip("|").split("|") for line in markdown.splitlines() if line.startswith("| ") and line[2].isdigit()]
    return {int(cells[0]): [c.strip() for c in cells[1:]] for cells in rows}


def test_writes_the_files_and_logs_them(report, smoke_sweep):
    for name in FILES:
        assert (report / name).stat().st_size > 0, name
    for name in ("fig6_curves.png", "error_vs_depth.png"):
        height, width, _ = matplotlib.image.imread(report / name).shape
        assert width > height > 300
    client = MlflowClient(smoke_sweep.uri)
    (logged,) = client.search_runs([smoke_sweep.experiment_id], "tags.kind = 'report'")
    assert logged.info.status == "FINISHED" and logged.data.params["trials"] == "6"
    assert {a.path for a in client.list_artifacts(logged.info.run_id)} == set(FILES)


def test_table6_numbers_equal_the_mlflow_metrics(report, smoke_sweep):
    markdown = (report / "table6.md").read_text()
    assert "Not counted (only finished trials are): 1 stopped early, 1 failed." in markdown  # sweep_runs.py
    header = [line for line in markdown.splitlines() if line.startswith("| layers")][0]
    assert [c.strip() for c in header.strip("|").split("|")][:7] == \
        ["layers", "plain", "# params", "error (%) best", "error (%) mean ± std", "seeds", "ResNet"]
    rows = table_rows(markdown)
    cells = expected_cells(smoke_sweep)
    assert sorted(rows) == sorted({depth for _, depth in cells}) == [8, 14]
    for (family, depth), errors in cells.items():
        columns = rows[depth][:5] if family == "plain" else rows[depth][5:]
        model = "plain_cifar" if family == "plain" else "resnet_cifar"
        params = count_parameters(create_model(model, depth=depth))
        std = f"{100 * statistics.stdev(errors):.2f}" if len(errors) > 1 else "–"
        assert columns == [f"{family}-{depth}", f"{params / 1e6:.2g}M", f"{100 * min(errors):.2f}",
                           f"{100 * statistics.fmean(errors):.2f} ± {std}", str(len(errors))]


def test_table6_json_holds_the_unrounded_metrics(report, smoke_sweep):
    saved = json.loads((report / "table6.json").read_text())
    cells = expected_cells(smoke_sweep)
    assert {(r["family"], r["depth"]): r["errors"] for r in saved["rows"]} == dict(cells)
    for row in saved["rows"]:
        errors = row["errors"]
        assert row["best"] == min(errors) and row["mean"] == statistics.fmean(errors)
        assert row["std"] == (statistics.stdev(errors) if len(errors) > 1 else None)


def test_fig6_curves_are_the_logged_histories(smoke_sweep):
    """A single-seed curve is the run's own history in percent; a two-seed curve is the mean of the two."""
    client = MlflowClient(smoke_sweep.uri)
    by_config = defaultdict(list)
    for r in smoke_sweep.results:
        params = client.get_run(r["run_id"]).data.params
        by_config[(params["model.name"], params["model.depth"])].append(r["run_id"])
    single = by_config[("resnet_cifar", "14")]
    history = sorted((m.step, 100 * m.value) for m in client.get_metric_history(single[0], "test_error"))
    assert list(zip(*mean_curve(client, single, "test_error"))) == history
    pair = by_config[("plain_cifar", "8")]
    steps, values = mean_curve(client, pair, "train_error")
    first = dict((m.step, m.value) for m in client.get_metric_history(pair[0], "train_error"))
    second = dict((m.step, m.value) for m in client.get_metric_history(pair[1], "train_error"))
    assert steps == sorted(first) == [3, 6, 9, 12, 15, 18, 21, 24, 27, 30]
    assert values == pytest.approx([100 * (first[s] + second[s]) / 2 for s in steps])


def test_ambiguous_sweep_is_an_error(smoke_sweep, tmp_path, capsys):
    """Two sweeps in one store and no --sweep: a one-line error listing both."""
    import shutil
    db = tmp_path / "two.db"
    shutil.copy(smoke_sweep.root / "mlruns.db", db)
    uri = f"sqlite:///{db}"
    client = MlflowClient(uri)
    other = client.create_experiment("other")
    client.create_run(other, tags={"kind": "trial", "sweep": "other"})
    assert main(["report", "--tracking-uri", uri, "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "holds 2 sweeps (other, smoke); choose one with --sweep" in err


def test_a_store_without_a_sweep_says_to_run_one(tmp_path, capsys):
    """It said "holds 0 sweeps (none); choose one with --sweep": there is none to choose."""
    uri = f"sqlite:///{tmp_path / 'empty.db'}"
    MlflowClient(uri).search_experiments()  # an MLflow store, with its Default experiment only
    assert main(["report", "--tracking-uri", uri, "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "holds no sweep yet: run `orchestrate sweep SPEC` first" in err, err
    empty = tmp_path / "empty-file.db"
    empty.touch()  # `status` made it an MLflow store: a read command wrote 954 KB into it
    assert main(["status", "--tracking-uri", f"sqlite:///{empty}"]) == 2
    assert "empty-file.db is an empty file, no MLflow store" in capsys.readouterr().err and empty.stat().st_size == 0


def test_an_out_folder_that_is_a_file_is_one_line(smoke_sweep, tmp_path, capsys):
    (tmp_path / "taken").write_text("")
    assert main(["report", "--tracking-uri", smoke_sweep.uri, "--out", str(tmp_path / "taken"), "--no-log"]) == 2
    # it said only "File exists"
    assert capsys.readouterr().err.strip() == (f"orchestrate report: error: {tmp_path / 'taken'} is a file; a folder "
                                               "is needed there")


def test_trials_that_differ_in_more_than_model_and_seed_are_separate_cells(tmp_path):
    """Two learning rates are two experiments, not two seeds of one (mean ± std over them would mislead)."""
    from orchestrator.report import variants
    client = MlflowClient(f"sqlite:///{tmp_path}/mlruns.db")
    experiment = client.create_experiment("variants", artifact_location=(tmp_path / "a").as_uri())

    def trial(seed: int, lr: float, depth: int):
        run = client.create_run(experiment)
        for key, value in {"seed": seed, "optim.lr": lr, "model.name": "resnet_cifar", "model.depth": depth,
                           "checkpoint.root": "/ckpt", "data.path": "synthetic"}.items():
            client.log_param(run.info.run_id, key, value)
        return client.get_run(run.info.run_id)

    runs = [trial(0, 0.1, 8), trial(1, 0.1, 8), trial(0, 0.027535425526875226, 14)]
    assert list(variants(runs).values()) == [{"optim.lr": "0.1"}, {"optim.lr": "0.1"},
                                             {"optim.lr": "0.027535425526875226"}]
    assert list(variants(runs[:2]).values()) == [{}, {}]  # seeds only: one cell
    # sampled rates that agree to 4 digits are two experiments still (their labels were equal: pooled as seeds)
    near = [runs[2], trial(1, 0.027535499, 14)]
    assert list(variants(near).values()) == [{"optim.lr": "0.027535425526875226"}, {"optim.lr": "0.027535499"}]
    # a model setting the family label does not name is a variant too (it was pooled as a seed)
    client.log_param(runs[1].info.run_id, "model.zero_init_residual", "True")
    client.log_param(runs[0].info.run_id, "model.zero_init_residual", "False")
    runs[:2] = [client.get_run(r.info.run_id) for r in runs[:2]]
    assert list(variants(runs[:2]).values()) == [{"model.zero_init_residual": "False"},
                                                 {"model.zero_init_residual": "True"}]
    # a setting no result depends on is not one (eval.batch_size: a cell split in two, 'variants' of one trial)
    for run, size in zip(runs[:2], ("1000", "500")):
        client.log_param(run.info.run_id, "eval.batch_size", size)
    runs[:2] = [client.get_run(r.info.run_id) for r in runs[:2]]
    assert list(variants(runs[:2]).values()) == [{"model.zero_init_residual": "False"},
                                                 {"model.zero_init_residual": "True"}]


def test_parameters_are_written_as_the_paper_writes_them():
    """Table 6: 0.27M, 0.46M, 0.66M, 0.85M, 1.7M, 19.4M (ResNet-20 ... 1202); "0.08M" hid ResNet-8's 0.075M."""
    from orchestrator.report import params_text
    counts = [count_parameters(create_model("resnet_cifar", depth=depth)) for depth in (20, 32, 44, 56, 110)]
    assert [params_text(n) for n in counts + [19_421_274, 75_290]] == \
        ["0.27M", "0.46M", "0.66M", "0.85M", "1.7M", "19.4M", "0.075M"]


# -- a sweep of learning rates x depth (what `space: optim.lr: {loguniform: ...}` leaves) ----------------------
_rng = random.Random(0)
LRS = [0.01 * 50 ** _rng.random() for _ in range(8)]  # log-uniform in [0.01, 0.5], long floats


@pytest.fixture(scope="module")
def lr_sweep(tmp_path_factory):
    """Real trials: ResNet-8 at 8 sampled learning rates (two seeds at the first), ResNet-14 and plain-8 at two
    of them. 13 short trials, ~10 s on 2 idle cores."""
    from resnet_core.train import train
    root = tmp_path_factory.mktemp("lr sweep")
    uri = f"sqlite:///{root}/mlruns.db"
    client = MlflowClient(uri)
    experiment_id = client.create_experiment("lr", artifact_location=(root / "artifacts").as_uri())
    trials = ([("resnet_cifar", 8, 0, lr) for lr in LRS] + [("resnet_cifar", 8, 1, LRS[0])]
              + [(model, depth, 0, lr) for model, depth in (("resnet_cifar", 14), ("plain_cifar", 8))
                 for lr in LRS[:2]])
    for model, depth, seed, lr in trials:
        config = {**trial_config(root, uri, model, depth, seed), "optim": {"lr": lr}}
        config["tracking"].update(experiment="lr", tags={"sweep": "lr", "kind": "trial"})
        assert train(config)["status"] == "FINISHED"
    out = root / "report"
    assert main(["report", "--tracking-uri", uri, "--out", str(out), "--no-log"]) == 0
    return client, experiment_id, out


def lr_cells(client, experiment_id) -> dict[tuple[str, int, str], list[float]]:
    """(family, depth, lr as logged) -> final test_error of each trial, straight from MLflow."""
    cells = defaultdict(list)
    for r in sorted(client.search_runs([experiment_id], "tags.kind = 'trial'"), key=lambda r: r.info.run_id):
        family = "plain" if r.data.params["model.name"] == "plain_cifar" else "ResNet"
        key = (family, int(r.data.params["model.depth"]), r.data.params["optim.lr"])
        cells[key].append(r.data.metrics["test_error"])
    return cells


def test_a_variant_sweep_is_one_row_per_depth_model_and_variant(lr_sweep):
    """Not one column family per learning rate (50 columns in one row): rows, the variants of a model at one depth
    adjacent and ordered by value, the sampled rate to 4 significant digits."""
    client, experiment_id, out = lr_sweep
    lines = [line for line in (out / "table6.md").read_text().splitlines() if line.startswith("| ")]
    assert lines[0] == "| layers | model | variant | # params | error (%) best | error (%) mean ± std | seeds |"
    expected = []
    for (family, depth, lr), errors in sorted(lr_cells(client, experiment_id).items(),
                                              key=lambda kv: (kv[0][1], kv[0][0] != "plain", float(kv[0][2]))):
        params = count_parameters(create_model(f"{family.lower()}_cifar", depth=depth))
        std = f"{100 * statistics.stdev(errors):.2f}" if len(errors) > 1 else "–"
        expected.append(f"| {depth} | {family}-{depth} | optim.lr={float(lr):.4g} | {params / 1e6:.2g}M | "
                        f"{100 * min(errors):.2f} | {100 * statistics.fmean(errors):.2f} ± {std} | {len(errors)} |")
    assert lines[1:] == expected and len(expected) == 12


def test_a_variant_sweeps_json_keeps_family_and_exact_variant_apart(lr_sweep):
    client, experiment_id, out = lr_sweep
    rows = json.loads((out / "table6.json").read_text())["rows"]
    assert {(r["family"], r["depth"], r["variant"]["optim.lr"]): r["errors"] for r in rows} == \
        dict(lr_cells(client, experiment_id))
    assert {r["model"] for r in rows} == {"ResNet-8", "ResNet-14", "plain-8"}


def test_a_variant_sweeps_figures_show_the_best_curves_only(lr_sweep, monkeypatch):
    """10 ResNet curves (and 10 family+lr lines) would repeat the 10 colours and bury the legend: at most
    8 (report.MAX_SERIES) are drawn and the titles say how many of how many. Fig. 6 keeps the curves of lowest mean test
    error; error_vs_depth keeps per family the lines over the most depths, then those of lowest error."""
    import matplotlib.pyplot as plt
    from orchestrator.report import build_cells, collect_trials, plot_curves, plot_error_vs_depth
    client, experiment_id, out = lr_sweep
    cells = build_cells(client, collect_trials(client, client.get_experiment(experiment_id)))
    figures = []
    monkeypatch.setattr(plt, "close", figures.append)  # keep the figures to read their legends
    plot_curves(client, cells, out / "curves.png", "lr")
    plot_error_vs_depth(cells, out / "depth.png", "lr")
    (plain, resnets), (depth,) = figures[0].axes, figures[1].axes
    legend = {ax: [t.get_text() for t in ax.get_legend().get_texts()] for ax in (plain, resnets, depth)}

    assert plain.get_title() == "plain networks" and len(legend[plain]) == 2
    assert resnets.get_title() == "ResNets (best 8 of 10 by mean test error)"
    assert len(legend[resnets]) == 8 and legend[resnets][0].startswith("ResNet-8 [optim.lr=")
    drawn = [c.mean for c in cells if c.label in legend[resnets]]
    assert max(drawn) <= min(c.mean for c in cells if c.family == "ResNet" and c.label not in legend[resnets])

    assert depth.get_title().endswith("\n6 of 10 lines: per family those over most depths, then lowest error")
    assert [name.split(" [")[0] for name in legend[depth]] == ["plain"] * 2 + ["ResNet"] * 4
    rank = defaultdict(lambda: [0, 1.0])  # ResNet line -> [-depths, lowest mean]
    for c in cells:
        if c.family == "ResNet":
            rank[c.series] = [rank[c.series][0] - 1, min(rank[c.series][1], c.mean)]
    assert max(rank[s] for s in legend[depth][2:]) <= min(rank[s] for s in rank if s not in legend[depth])
    assert f"ResNet [optim.lr={LRS[0]:.4g}]" in legend[depth]  # over depths 8 and 14, however bad


@pytest.mark.parametrize("params, family, depth", [
    ({"model.name": "resnet_cifar", "model.depth": "8"}, "ResNet", 8),
    ({"model.name": "plain_cifar", "model.depth": "8"}, "plain", 8),
    ({"model.name": "resnet_cifar", "model.depth": "8", "model.shortcut": "B"}, "ResNet (option B)", 8),
    # the name implies the unit, the bottleneck and the shortcut: a table must not pool them with ResNet-110
    ({"model.name": "preact_resnet110", "model.depth": "None"}, "ResNet (full_preact)", 110),
    ({"model.name": "preact_resnet164"}, "ResNet (option B, full_preact, bottleneck)", 164),
    ({"model.name": "resnet50"}, "ResNet (option B, bottleneck)", 50),
])
def test_a_runs_family_comes_from_the_model_it_names_not_only_from_its_overrides(params, family, depth):
    from types import SimpleNamespace
    from orchestrator.runs import family_of, model_info
    info = model_info(SimpleNamespace(data=SimpleNamespace(params=params)))
    assert (family_of(info), info.depth) == (family, depth)


def test_fig6_of_a_sweep_without_plain_nets_has_no_empty_plain_panel(smoke_sweep, tmp_path):
    from orchestrator.report import build_cells, collect_trials, plot_curves
    client = MlflowClient(smoke_sweep.uri)
    cells = build_cells(client, collect_trials(client, client.get_experiment(smoke_sweep.experiment_id)))
    widths = {}
    for name, chosen in {"both": cells, "resnets": [c for c in cells if c.family == "ResNet"]}.items():
        plot_curves(client, chosen, tmp_path / f"{name}.png", "smoke")
        widths[name] = matplotlib.image.imread(tmp_path / f"{name}.png").shape[1]
    assert widths["resnets"] == widths["both"] // 2  # one panel of the two


def test_a_curve_of_one_logged_point_is_a_dot_and_is_said(tmp_path, monkeypatch):
    """tracking.log_every >= the run's length logs train_error once: its dashed line was invisible, unannounced."""
    import matplotlib.pyplot as plt
    from orchestrator.report import Cell, plot_curves
    client = MlflowClient(f"sqlite:///{tmp_path}/mlruns.db")
    experiment = client.create_experiment("short", artifact_location=(tmp_path / "a").as_uri())
    run_id = client.create_run(experiment).info.run_id
    client.log_metric(run_id, "train_error", 0.5, step=30)
    for step in (10, 20, 30):
        client.log_metric(run_id, "test_error", 0.6 - step / 100, step=step)
    figures, said = [], []
    monkeypatch.setattr(plt, "close", figures.append)
    plot_curves(client, [Cell("ResNet", 8, "ResNet-8", None, [0.3], [run_id])], tmp_path / "c.png", "short",
                said.append)
    assert said == ["c.png: ResNet-8's train_error has 1 logged point(s), no curve; tracking.log_every below the "
                    "run's length gives one"]
    train, test = figures[0].axes[0].get_lines()
    assert (train.get_marker(), list(train.get_xdata())) == ("o", [30])
    assert test.get_marker() in (None, "None") and list(test.get_xdata()) == [10, 20, 30]
    # a run that went on from another store's checkpoint has its curve there: the advice above was wrong for it
    client.set_tag(run_id, "resumed_from_run", "elsewhere")
    said.clear()
    plot_curves(client, [Cell("ResNet", 8, "ResNet-8", None, [0.3], [run_id], {"optim.lr": "0.1"})],
                tmp_path / "d.png", "short", said.append)
    assert said == ["d.png: ResNet-8 [optim.lr=0.1]'s train_error has 1 logged point(s), no curve; its run went on "
                    "from a checkpoint written with another store (tag resumed_from_run): the curve is in that run"]


def test_log_every_is_a_variant_only_where_a_warm_up_ends_on_the_train_error():
    """There it changes the result (it is part of the trial key): such runs were averaged as seeds of one cell."""
    from mlflow.entities import Param, Run, RunData, RunInfo

    def run(run_id: str, **params) -> Run:
        info = RunInfo(run_id, "0", "u", "FINISHED", 0, 1, "active")
        return Run(info, RunData(params=[Param(k, str(v)) for k, v in params.items()]))
    for until, varies in (("0.8", True), ("None", False)):
        runs = [run(str(every), **{"schedule.warmup.until_train_error": until, "tracking.log_every": every,
                                   "checkpoint.every": every, "seed": every}) for every in (2, 10)]
        assert variants(runs) == ({"2": {"tracking.log_every": "2"}, "10": {"tracking.log_every": "10"}} if varies
                                  else {"2": {}, "10": {}}), until
