"""The CUDA-graph step's bookkeeping, on CPU: everything but the capture itself (that needs a GPU).

A GraphStep is built directly here (build_step refuses `graph` without CUDA); its optimizer is torch's fused
SGD reading the lr from a tensor, which runs on CPU too.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from resnet_core.config import ConfigError, build_config
from resnet_core.distributed import DistEnv
from resnet_core.models import create_model
from resnet_core.steps import EagerStep, GraphStep, build_step, resolve_step

CPU = torch.device("cpu")


def make(kind, seed: int = 0, **kw):
    torch.manual_seed(seed)
    cfg = build_config({"model": {"name": "resnet_cifar", "depth": 8}, "precision": "fp32"})
    return kind(cfg, create_model("resnet_cifar", depth=8), DistEnv(), CPU, **kw)


def batches(iters: int):
    torch.manual_seed(1)
    return [(torch.randn(8, 3, 32, 32), torch.randint(0, 10, (8,))) for _ in range(iters)]


def train_eagerly(step: EagerStep, iters: int, lr: float = 0.1) -> None:
    for images, labels in batches(iters):
        EagerStep.__call__(step, images, labels, lr)


def warm_up(step: GraphStep, iters: int) -> None:
    """What GraphStep.capture runs before capturing (the lr stays the tensor's)."""
    for images, labels in batches(iters):
        step.optimizer.zero_grad(set_to_none=True)
        step.forward_backward(images, labels)
        step.optimizer.step()


def test_a_resumed_graph_step_reads_the_lr_tensor_not_the_checkpoints_lr():
    eager = make(EagerStep)
    train_eagerly(eager, 2, lr=0.1)
    graph = make(GraphStep)
    graph.load_state_dict(eager.state_dict())
    for group in graph.optimizer.param_groups:
        assert group["lr"] is graph.lr and group["fused"] is True
    # The schedule moves the tensor; the optimizer must follow: lr 0 and no weight decay leave weights alone.
    graph.lr.fill_(0.0)
    for group in graph.optimizer.param_groups:
        group["weight_decay"] = 0.0
    before = [p.detach().clone() for p in graph.model.parameters()]
    graph.optimizer.zero_grad()
    graph.forward_backward(torch.randn(8, 3, 32, 32), torch.randint(0, 10, (8,)))
    graph.optimizer.step()
    assert all(torch.equal(a, b) for a, b in zip(before, graph.model.parameters()))


def test_a_graph_step_resumed_from_contiguous_momentum_gets_it_in_its_channels_last_layout():
    eager = make(EagerStep)  # contiguous, as a fused member's or a CPU run's checkpoint
    train_eagerly(eager, 2)
    graph = make(GraphStep)
    graph.model.to(memory_format=torch.channels_last)
    graph.load_state_dict(eager.state_dict())
    saved = {p: s["momentum_buffer"] for p, s in eager.optimizer.state.items()}
    for (param, st), want in zip(graph.optimizer.state.items(), saved.values()):
        assert st["momentum_buffer"].stride() == param.stride()  # what fused SGD's kernel requires
        torch.testing.assert_close(st["momentum_buffer"], want, rtol=0, atol=0)


def test_undoing_the_capture_warm_up_keeps_a_resumed_runs_momentum():
    eager = make(EagerStep)
    train_eagerly(eager, 2)
    graph = make(GraphStep)
    graph.load_state_dict(eager.state_dict())
    want = {k: {"momentum_buffer": v["momentum_buffer"].clone()} for k, v in graph.optimizer.state_dict()["state"].items()}
    weights = {k: v.clone() for k, v in graph.model.state_dict().items()}
    saved = graph.snapshot()
    warm_up(graph, 3)
    graph.restore(saved)
    got = graph.optimizer.state_dict()["state"]
    assert want and all(torch.equal(got[k]["momentum_buffer"], v["momentum_buffer"]) for k, v in want.items())
    assert all(torch.equal(weights[k], v) for k, v in graph.model.state_dict().items())


@pytest.mark.parametrize("compile", [False, True], ids=["graph", "compile_graph"])
def test_undoing_the_warm_up_of_a_fresh_run_leaves_zero_momentum_and_the_first_step_of_sgd(compile):
    graph, eager = make(GraphStep, compile=compile), make(EagerStep)
    assert isinstance(graph.net, torch._dynamo.eval_frame.OptimizedModule) == compile
    saved = graph.snapshot()
    warm_up(graph, 3)
    graph.restore(saved)
    assert all(torch.count_nonzero(s["momentum_buffer"]) == 0 for s in graph.optimizer.state.values())
    # from zero momentum, fused SGD's next step equals torch SGD's very first step (dampening 0)
    warm_up(graph, 1)
    train_eagerly(eager, 1)
    for a, b in zip(graph.model.parameters(), eager.model.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_auto_is_a_graph_on_one_gpu_and_eager_for_ddp_or_cpu():
    cfg = build_config({})
    assert resolve_step(cfg, torch.device("cuda", 0)) == "graph"
    assert resolve_step(cfg, torch.device("cuda", 0), world_size=2) == "eager"
    assert resolve_step(cfg, CPU) == "eager"


@pytest.mark.parametrize("kind", ["graph", "compile_graph"])
def test_graph_on_cpu_is_a_one_line_config_error(kind):
    cfg = build_config({"model": {"name": "resnet_cifar", "depth": 8}, "step": kind})
    with pytest.raises(ConfigError, match=f"step: '{kind}' needs a CUDA GPU"):
        build_step(cfg, create_model("resnet_cifar", depth=8), DistEnv(), CPU)
