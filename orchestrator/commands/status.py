"""`orchestrate status [SWEEP]`: a sweep's trials as MLflow records them (or, without SWEEP, every sweep)."""
from __future__ import annotations

import argparse


def add_parser(p: argparse.ArgumentParser) -> None:
    p.add_argument("sweep", nargs="?", help="sweep name (its MLflow experiment); omitted: list the sweeps")
    p.add_argument("--tracking-uri", help="MLflow store (default: $MLFLOW_TRACKING_URI, else sqlite:///mlruns.db)")


def trial_state(run) -> str:
    from orchestrator.runs import stopped_early
    return "STOPPED (early)" if stopped_early(run) else run.info.status


def run(args: argparse.Namespace) -> int:
    from orchestrator.cli import console
    from rich.markup import escape
    from rich.table import Table

    from orchestrator.cli import UserError
    from orchestrator.runs import check_store, sweep_names, trial_runs
    from resnet_core.tracking import absolute_uri, mlflow_client, tracking_uri

    uri = absolute_uri(tracking_uri(args.tracking_uri))
    check_store(uri)
    client = mlflow_client(uri)
    if args.sweep is None:
        table = Table(title=f"sweeps in {uri}")
        for column in ("sweep", "trials", "finished", "running/interrupted", "failed", "stopped early",
                       "not started"):
            table.add_column(column)
        for exp in client.search_experiments():
            runs = trial_runs(client, exp.experiment_id)
            if runs or exp.tags.get("planned_trials"):
                states = [trial_state(r) for r in runs]
                table.add_row(exp.name, str(len(runs)), str(states.count("FINISHED")),
                              str(sum(s in ("RUNNING", "KILLED", "SCHEDULED") for s in states)),
                              str(states.count("FAILED")), str(states.count("STOPPED (early)")),
                              not_started(exp, runs))
        console().print(table)
        return 0
    exp = client.get_experiment_by_name(args.sweep)
    if exp is None:
        names = ", ".join(sweep_names(client))
        raise UserError(f"no sweep named {args.sweep!r} in {uri}; sweeps there: {names or 'none'}")
    runs = trial_runs(client, exp.experiment_id, order_by=["metrics.test_error ASC"])
    # val_error: the final weights' error, what `ensemble --top K` ranks by; best_val_error: the best evaluation on
    # the way (an ASHA-stopped trial's only fair figure)
    table = Table(title=f"sweep {args.sweep} ({len(runs)} trials)",
                  caption="`orchestrate ensemble --top K` takes the K finished trials of lowest val_error")
    for column in ("trial", "key", "status", "epoch", "test_error", "val_error", "best_val_error", "run id", "note"):
        table.add_column(column)
    from orchestrator.ledger import PLANNED_KEY_LENGTH
    planned = planned_keys(exp)
    for r in runs:
        m, tags = r.data.metrics, r.data.tags
        note = tags.get("status_reason", "") if r.info.status != "FINISHED" else ""
        if planned and tags.get("trial_key", "")[:PLANNED_KEY_LENGTH] not in planned:
            note = "; ".join(filter(None, ["not a trial of the last sweep call's spec", note]))
        table.add_row(escape(tags.get("trial_overrides", "")), tags.get("trial_key", "")[:8], trial_state(r),
                      f"{m['epoch']:.0f}" if "epoch" in m else "", _fmt(m.get("test_error")),
                      _fmt(m.get("val_error")), _fmt(m.get("best_val_error")), r.info.run_id[:12], escape(note))
    console().print(table)
    from orchestrator.ledger import describe_owner, live_owner, recorded_owner
    owner = live_owner(recorded_owner(exp))
    if owner:
        console().print(f"running now: `orchestrate sweep`, {escape(describe_owner(owner))}")
    pending = not_started(exp, runs)
    if pending not in ("", "0"):
        # escaped: rich read "[resnet20,plain20]" of a --set as markup and dropped it from the command
        console().print(f"{pending} of the {exp.tags['planned_trials']} trials planned by the last "
                        f"`orchestrate sweep {escape(exp.tags.get('spec', ''))}` have no run yet (queued, or not "
                        "started: the same command starts them)")
    return 0


def planned_keys(exp) -> set[str]:
    """The (shortened) trial keys the last sweep call planned (ledger.record_plan); empty when not recorded
    (an older sweep, or too many trials to list)."""
    planned = exp.tags.get("planned_keys")
    return set(planned.split(",")) if planned else set()


def not_started(exp, runs) -> str:
    """Trials the last sweep call planned that have no run."""
    from orchestrator.ledger import PLANNED_KEY_LENGTH
    planned = planned_keys(exp)
    if not planned:
        return ""
    started = {r.data.tags.get("trial_key", "")[:PLANNED_KEY_LENGTH] for r in runs}
    return str(len(planned - started))


def _fmt(value) -> str:
    return "" if value is None else f"{value:.4f}"
