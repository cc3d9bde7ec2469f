"""The learning rate as a function of the iteration: the paper's recipe (Sec. 4.2) and the warm-ups."""
from __future__ import annotations

import pytest

from resnet_core.config import ScheduleConfig
from resnet_core.schedule import LRSchedule


def schedule(**cfg) -> LRSchedule:
    return LRSchedule(ScheduleConfig(**cfg), base_lr=0.1, iterations_per_epoch=10)


def test_the_papers_cifar_steps():
    """0.1, divided by 10 at 32k and 48k iterations, over 64k."""
    lr = schedule()
    assert [lr(i) for i in (0, 31999, 32000, 47999, 48000, 63999)] == pytest.approx(
        [0.1, 0.1, 0.01, 0.01, 0.001, 0.001])


def test_resnet110_warms_up_at_001_until_the_caller_says_the_error_fell():
    lr = schedule(warmup={"kind": "constant", "lr": 0.01, "until_train_error": 0.8})
    assert lr(0) == lr(5000) == 0.01  # however long it takes
    assert lr(400, warmup_ended=True) == 0.1


@pytest.mark.parametrize("kind", ["linear", "constant"])
def test_a_warm_up_with_a_length_and_an_error_target_ends_at_its_length_at_the_latest(kind):
    """It ran on until the target: a linear ramp reached 0.46 at iteration 500 with a base lr of 0.1."""
    lr = schedule(total=1000, milestones=[800], warmup={"kind": kind, "lr": 0.01, "length": 100,
                                                         "until_train_error": 0.5})
    assert all(lr(i) <= 0.1 + 1e-12 for i in range(1000))
    assert lr(100) == lr(500) == 0.1 and lr(50, warmup_ended=True) == 0.1
    assert lr(50) == pytest.approx(0.055 if kind == "linear" else 0.01)


def test_epochs_scale_milestones_and_warm_up():
    lr = schedule(unit="epochs", total=10, milestones=[5], warmup={"kind": "linear", "lr": 0.01, "length": 2})
    assert [lr(i) for i in (0, 10, 20, 49, 50)] == pytest.approx([0.01, 0.055, 0.1, 0.1, 0.01])


def test_cosine_starts_after_the_warm_up_and_ends_at_zero():
    lr = schedule(kind="cosine", total=110, warmup={"kind": "linear", "lr": 0.01, "length": 10})
    assert lr(10) == pytest.approx(0.1) and lr(60) == pytest.approx(0.05) and lr(110) == pytest.approx(0.0)


def test_a_schedule_partly_past_the_runs_end_is_warned_of():
    from resnet_core.config import build_config
    from resnet_core.schedule import schedule_warnings
    paper = build_config({"schedule": {"warmup": {"kind": "constant", "lr": 0.01, "length": 400}}})
    assert schedule_warnings(paper) == []
    short = build_config({"schedule": {"total": 200, "warmup": {"kind": "constant", "lr": 0.01, "length": 400}}})
    assert schedule_warnings(short) == [
        "schedule.milestones 32000, 48000 >= schedule.total 200: the lr never drops there (set schedule.milestones "
        "too)",
        "schedule.warmup.length 400 >= schedule.total 200: the whole run warms up, never at optim.lr 0.1 (set "
        "schedule.warmup.length too)"]


def test_log_every_is_part_of_a_trial_only_when_a_warm_up_ends_on_the_train_error():
    """That warm-up is judged at each logging step: log_every 2 and 10 trained differently under one trial key,
    so a re-run with another log_every skipped or resumed a trial that computes something else."""
    from resnet_core.config import build_config, trial_key

    def key(log_every: int, **warmup) -> str:
        return trial_key(build_config({"schedule": {"warmup": warmup}, "tracking": {"log_every": log_every}}))

    assert key(2, kind="constant", until_train_error=0.8) != key(10, kind="constant", until_train_error=0.8)
    assert key(2) == key(10)
    assert key(2, kind="constant", length=5) == key(10, kind="constant", length=5)


def test_schedule_settings_that_do_nothing_or_the_reverse_are_warned_of(capsys):
    """Milestones under a cosine schedule were ignored without a word, and a linear warm-up from above optim.lr
    ramped the lr down (test_loss 4305); --print-config, where a user checks a config, said neither."""
    from orchestrator.cli import main as orchestrate
    assert orchestrate(["train", "--print-config", "--set", "schedule.kind=cosine", "schedule.milestones=[1]",
                        "schedule.warmup.kind=linear", "schedule.warmup.length=10", "schedule.warmup.lr=0.5"]) == 0
    assert capsys.readouterr().err.splitlines() == [
        "warning: schedule.milestones [1]: a cosine schedule has none; they are ignored (schedule.kind step uses "
        "them)",
        "warning: schedule.warmup.lr 0.5 > optim.lr 0.1: the linear warm-up ramps the lr down, not up"]
    assert orchestrate(["train", "--print-config", "--set", "schedule.kind=cosine"]) == 0  # the recipe's milestones
    assert capsys.readouterr().err == ""


def test_a_warm_up_the_train_error_never_ended_is_said_at_the_end():
    from resnet_core.config import build_config
    from resnet_core.train import warmup_never_ended
    cfg = build_config({"schedule": {"total": 20, "milestones": [18],
                                     "warmup": {"kind": "constant", "until_train_error": 0.8}}})
    schedule = LRSchedule(cfg.schedule, cfg.optim.lr, 16)
    assert warmup_never_ended(schedule, 20, warmup_ended=True) is None
    assert warmup_never_ended(schedule, 20, warmup_ended=False) == (
        "the warm-up never ended: the train error stayed >= schedule.warmup.until_train_error 0.8 at every logging "
        "step, so the run trained at schedule.warmup.lr 0.01 throughout")
    with_length = build_config({"schedule": {"total": 20, "milestones": [18], "warmup": {
        "kind": "constant", "until_train_error": 0.8, "length": 5}}})  # its length ended it
    assert warmup_never_ended(LRSchedule(with_length.schedule, 0.1, 16), 20, warmup_ended=False) is None


def test_no_milestones_under_a_cosine_schedule_is_no_warning(capsys):
    from orchestrator.cli import main as orchestrate
    assert orchestrate(["train", "--print-config", "--set", "schedule.kind=cosine", "schedule.milestones=[]"]) == 0
    assert capsys.readouterr().err == ""  # clearing them is how one says "none"
