"""The CUDA-only paths on a real GPU: the captured steps compute what eager steps compute, and graph trials
(alone and fused) resume after a preemption in the same run. Skipped without CUDA (conftest.py); the device
plans run it (scripts/device/run_study.sh: `gputests` first in bench, `gputests_compile` first in compile).
"""
from __future__ import annotations

import copy
import os
import signal

import pytest
import torch

from resnet_core.config import build_config
from resnet_core.distributed import DistEnv
from resnet_core.fused import FusedModel, FusedStep, train_fused
from resnet_core.models import create_model
from resnet_core.steps import EagerStep, build_step
from resnet_core.train import Interrupted, train

from test_train import history, runs_of, tiny_config

pytestmark = pytest.mark.gpu
CUDA = torch.device("cuda")
ON_GPU = {"device": "cuda", "step": "graph", "precision": "bf16"}


@pytest.fixture
def exact_fp32(monkeypatch):
    """Full fp32 convolutions (matmuls are by default): graph and eager then differ by cuDNN's algorithms only."""
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)


def resnet8(seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    return create_model("resnet_cifar", depth=8).to(CUDA)


def step_config(step: str, **optim):
    return build_config({"model": {"name": "resnet_cifar", "depth": 8}, "device": "cuda", "precision": "fp32",
                         "step": step, "optim": optim})


def batches(n: int, shape=(32,)):
    data = torch.Generator(device=CUDA).manual_seed(0)
    return [(torch.randn(*shape, 3, 32, 32, device=CUDA, generator=data),
             torch.randint(0, 10, shape, device=CUDA, generator=data)) for _ in range(n)]


LR_SCALES = [1, 1, 1, 0.1, 0.1, 0.1]  # a milestone mid-way: the captured step must follow the lr tensor


def assert_same_stats(got: torch.Tensor, want: torch.Tensor) -> None:
    """Step stats (loss * n, wrong predictions, n): the loss within 1e-3; one prediction may flip on a near-tie."""
    torch.testing.assert_close(got[..., 0], want[..., 0], rtol=1e-3, atol=1e-3)
    assert (got[..., 1] - want[..., 1]).abs().max() <= 1 and torch.equal(got[..., 2], want[..., 2])


@pytest.mark.parametrize("step", ["graph", "compile_graph"])
def test_a_captured_step_follows_the_eager_step(step, exact_fp32):
    captured = build_step(step_config(step), resnet8(0), DistEnv(), CUDA)
    eager = EagerStep(step_config("eager"), resnet8(0), DistEnv(), CUDA)
    for (images, labels), scale in zip(batches(len(LR_SCALES)), LR_SCALES):
        lr = 0.1 * scale
        assert_same_stats(captured(images, labels, lr), eager(images, labels, lr))
    for a, b in zip(captured.model.parameters(), eager.model.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-4)


def test_fused_members_in_one_graph_follow_their_own_eager_steps(exact_fp32):
    cfgs = [step_config("graph", lr=0.1, weight_decay=1e-4), step_config("graph", lr=0.05, weight_decay=5e-4)]
    models = [resnet8(seed) for seed in (0, 1)]
    alone = [EagerStep(cfg, copy.deepcopy(m), DistEnv(), CUDA) for cfg, m in zip(cfgs, models)]
    fused = FusedStep(cfgs, FusedModel(models, CUDA), CUDA, graph=True)
    for (images, labels), scale in zip(batches(len(LR_SCALES), shape=(2, 16)), LR_SCALES):
        lrs = tuple(cfg.optim.lr * scale for cfg in cfgs)
        got = fused(images, labels, lrs, shared=False)
        want = torch.stack([step(images[k], labels[k], lrs[k]) for k, step in enumerate(alone)])
        assert_same_stats(got, want)
    for k, step in enumerate(alone):
        mine = fused.member_state(k)["model"]
        for name, value in step.model.state_dict().items():
            torch.testing.assert_close(mine[name].to(value.dtype), value, rtol=1e-3, atol=1e-4, msg=name)


def interrupt_after_first_epoch():
    """A report hook that sends SIGUSR1 once, after epoch 1's evaluation (what SLURM sends before a preemption)."""
    sent = []
    def report(metrics):
        if metrics.get("epoch") == 1 and not sent:
            sent.append(os.kill(os.getpid(), signal.SIGUSR1))
    return report


def test_a_graph_trial_resumes_in_its_run_on_the_gpu(tmp_path):
    """The checkpoint is loaded onto the GPU: the RNG states must go back to the host, the lr tensor must drive
    the re-captured graph (bf16 and cuDNN's algorithm choice make the curves close, not identical)."""
    straight_cfg = tiny_config(tmp_path / "straight", **ON_GPU)
    straight = train(straight_cfg)
    cfg = tiny_config(tmp_path / "stopped", **ON_GPU)
    with pytest.raises(Interrupted):
        train(cfg, report=interrupt_after_first_epoch())
    resumed = train(cfg)
    assert resumed["status"] == "FINISHED" and resumed["iteration"] == 40
    assert [r.info.run_id for r in runs_of(cfg)] == [resumed["run_id"]]
    got, want = history(cfg, resumed["run_id"]), history(straight_cfg, straight["run_id"])
    assert [s for s, _ in got] == [s for s, _ in want] == [5, 10, 15, 20, 25, 30, 35, 40]
    assert [v for _, v in got] == pytest.approx([v for _, v in want], rel=0.1, abs=0.05)
    assert history(cfg, resumed["run_id"], "lr") == history(straight_cfg, straight["run_id"], "lr")


def test_a_fused_graph_group_resumes_in_its_members_runs_on_the_gpu(tmp_path):
    base = tiny_config(tmp_path, **ON_GPU)
    cfgs = []
    for seed, lr in [(0, 0.1), (1, 0.05)]:
        cfg = copy.deepcopy(base)
        cfg["seed"], cfg["optim"] = seed, {"lr": lr}
        cfgs.append(cfg)
    with pytest.raises(Interrupted):
        train_fused(cfgs, report=interrupt_after_first_epoch())
    resumed = train_fused(cfgs)
    assert len(runs_of(cfgs[0])) == 2
    for result, cfg in zip(resumed, cfgs):
        assert result["status"] == "FINISHED" and result["iteration"] == 40
        assert [s for s, _ in history(cfg, result["run_id"])] == [5, 10, 15, 20, 25, 30, 35, 40]
        assert result["test_error"] < 0.9  # learned something on the synthetic classes (chance 0.9)
