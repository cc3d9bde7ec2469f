"""Worker command lines and the DeepSpeed JSON are pure functions, checked against golden files.

A changed golden file is a changed launch: review it, then regenerate with UPDATE_GOLDEN=1 pytest tests/test_launch.py.
"""
from __future__ import annotations

import json
import os
import shlex
from pathlib import Path

import pytest

from orchestrator.launch import Rendezvous, deepspeed_command, torchrun_command
from resnet_core.config import build_config
from resnet_core.steps import deepspeed_config

GOLDEN = Path(__file__).parent / "golden" / "launch.txt"
WEIRD = "/runs/my sweep/it's \"quoted\"; rm -rf $HOME/trial.yaml"
OVERRIDES = ("optim.lr=0.05", "tracking.tags.sweep=a b;c")


def rendered_commands() -> str:
    rdzv = Rendezvous("127.0.0.1", 29400, "sweep-3")
    cases = {
        "torchrun one node": torchrun_command(WEIRD, OVERRIDES, nproc_per_node=4),
        "torchrun two nodes": torchrun_command(WEIRD, OVERRIDES, nproc_per_node=2, nnodes=2, rendezvous=rdzv),
        "deepspeed one node": deepspeed_command(WEIRD, OVERRIDES, gpus_per_node=8),
        "deepspeed two nodes": deepspeed_command(WEIRD, OVERRIDES, gpus_per_node=8, nnodes=2, node_rank=1,
                                                 rendezvous=rdzv),
        "deepspeed json": [json.dumps(deepspeed_config(
            build_config({"dist": {"engine": "deepspeed", "zero_stage": 0}, "precision": "bf16",
                          "optim": {"grad_clip": 5.0}}), 4, "bf16"), sort_keys=True)],
    }
    return "".join(f"# {name}\n{shlex.join(cmd) if name != 'deepspeed json' else cmd[0]}\n" for name, cmd in cases.items())


def test_launch_commands_match_golden():
    text = rendered_commands()
    if os.environ.get("UPDATE_GOLDEN"):
        GOLDEN.parent.mkdir(exist_ok=True)
        GOLDEN.write_text(text)
    assert text == GOLDEN.read_text(), "launch commands changed; review, then UPDATE_GOLDEN=1 pytest tests/test_launch.py"


def test_hostile_values_stay_single_arguments_through_the_shell():
    cmd = torchrun_command(WEIRD, OVERRIDES, nproc_per_node=2)
    assert shlex.split(shlex.join(cmd)) == cmd  # what a script runs is exactly the argv we built
    assert cmd[-4:] == [WEIRD, "--set", *OVERRIDES]  # each hostile value is one whole argument


def test_multi_node_launches_need_a_rendezvous():
    with pytest.raises(ValueError, match="rendezvous"):
        torchrun_command("t.yaml", nnodes=2)
    with pytest.raises(ValueError, match="master"):
        deepspeed_command("t.yaml", nnodes=2)


def test_deepspeed_config_follows_the_trial_config():
    cfg = build_config({"batch_size": 256, "dist": {"engine": "deepspeed"}})
    ds = deepspeed_config(cfg, 4, "fp32")
    assert ds["train_batch_size"] == 256 and ds["train_micro_batch_size_per_gpu"] == 64
    assert ds["zero_optimization"] == {"stage": 0} and ds["gradient_clipping"] == 0.0
    assert not ds["bf16"]["enabled"] and not ds["fp16"]["enabled"]
