"""The training step, the hot path: eager, torch.compile, one CUDA graph, or a DeepSpeed engine.

Each step returns a device tensor (loss * images, wrong predictions, images) and never syncs with the host, so
the loop can run ahead of the GPU; the trainer reads the sums only at log points.
"""
from __future__ import annotations

import contextlib
import os
import sys
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .config import GRAPH_STEPS, ConfigError, TrainConfig
from . import distributed
from .distributed import DistEnv

AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def autocast(precision: str, device: torch.device):
    """bf16/fp16 autocast on the device's type; none for fp32."""
    if precision not in AUTOCAST_DTYPES:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=AUTOCAST_DTYPES[precision])


def resolve_precision(cfg: TrainConfig, device: torch.device) -> str:
    return ("bf16" if device.type == "cuda" else "fp32") if cfg.precision == "auto" else cfg.precision


def warn_if_slow_precision(cfg: TrainConfig, device: torch.device) -> None:
    """bf16 autocast on a CPU without bf16 instructions (AVX512-BF16, AMX) is emulated: ResNet-20 on this project's
    2 AVX2 cores trained at 19 img/s in bf16, 242 in fp32. Said at the start, where it looked like a hang."""
    if device.type != "cpu" or resolve_precision(cfg, device) != "bf16":
        return
    try:
        if torch.ops.mkldnn._is_mkldnn_bf16_supported():
            return
    except (AttributeError, RuntimeError):  # a private check: absent from some builds
        pass
    print("warning: precision: bf16 on this CPU (no bf16 instructions) is about 10x slower than fp32; "
          "precision: auto (the default) takes fp32 on a CPU", file=sys.stderr, flush=True)


def resolve_step(cfg: TrainConfig, device: torch.device, world_size: int = 1) -> str:
    """``auto``: one CUDA graph for a single-GPU trial, eager otherwise (CPU, or DDP across ranks)."""
    if cfg.step != "auto":
        return cfg.step
    return "graph" if device.type == "cuda" and world_size == 1 else "eager"


def sgd(cfg: TrainConfig, params, lr: float | torch.Tensor, **kw) -> torch.optim.SGD:
    o = cfg.optim
    return torch.optim.SGD(params, lr=lr, momentum=o.momentum, weight_decay=o.weight_decay, nesterov=o.nesterov, **kw)


def step_stats(logits: torch.Tensor, labels: torch.Tensor, loss: torch.Tensor) -> torch.Tensor:
    n = labels.numel()
    loss = loss.detach().float()
    # new_full is a device-side fill: no host-to-device copy in the hot path, and capturable in a CUDA graph
    return torch.stack([loss * n, (logits.detach().argmax(1) != labels).sum().float(), loss.new_full((), float(n))])


class EagerStep:
    """Plain PyTorch (DDP when several ranks); ``compile=True`` wraps the model in torch.compile."""

    def __init__(self, cfg: TrainConfig, model: nn.Module, env: DistEnv, device: torch.device, compile: bool = False):
        self.cfg, self.model, self.device = cfg, model, device
        self.precision = resolve_precision(cfg, device)
        if self.precision == "fp16":
            raise ConfigError("precision: fp16 needs loss scaling; use bf16, or dist.engine: deepspeed")
        self.optimizer = sgd(cfg, model.parameters(), cfg.optim.lr)
        net = model
        if env.enabled:
            net = nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
        self.net = torch.compile(net) if compile else net

    def autocast(self):  # DeepSpeedStep: evaluation only (its training casts the batch into the engine's dtype)
        return autocast(self.precision, self.device)

    def forward_backward(self, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        with self.autocast():
            logits = self.net(images)
            loss = F.cross_entropy(logits.float(), labels)
        loss.backward()
        if self.cfg.optim.grad_clip:
            nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.optim.grad_clip)
        return step_stats(logits, labels, loss)

    def __call__(self, images: torch.Tensor, labels: torch.Tensor, lr: float) -> torch.Tensor:
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.optimizer.zero_grad(set_to_none=True)
        stats = self.forward_backward(images, labels)
        self.optimizer.step()
        return stats

    def eval_model(self) -> nn.Module:
        return self.model

    def state_dict(self) -> dict[str, Any]:
        return {"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])


class GraphStep(EagerStep):
    """Forward, backward and SGD update captured once in a CUDA graph and replayed every iteration.

    The lr lives in a device tensor (fused SGD reads it there), so the schedule changes it without a re-capture.
    The warm-up iterations that capture needs are undone, so the run follows the same recipe as eager mode.
    """

    def __init__(self, cfg: TrainConfig, model: nn.Module, env: DistEnv, device: torch.device,
                 compile: bool = False):
        if env.enabled:
            raise ConfigError(f"step: {cfg.step!r} trains one GPU per trial; use eager or compile with DDP")
        # compile=True: the capture records torch.compile's fused kernels (compiled during the warm-up steps)
        super().__init__(cfg, model, env, device, compile=compile)
        self.lr = torch.tensor(cfg.optim.lr, device=device)
        self.optimizer = sgd(cfg, model.parameters(), self.lr, fused=True)
        self.graph: torch.cuda.CUDAGraph | None = None

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Loading a checkpoint replaces the param groups, lr included: point them back at the lr tensor that
        the graph reads (else a resumed run would keep the checkpoint's lr for ever)."""
        if self.graph is not None:
            raise RuntimeError("GraphStep: load a checkpoint before the first step, not after the capture")
        super().load_state_dict(state)
        for group in self.optimizer.param_groups:
            group["lr"], group["fused"] = self.lr, True
        # Fused SGD needs each momentum buffer in its parameter's layout (channels_last here); a checkpoint of a
        # fused member or of a CPU run holds contiguous ones, and loading keeps the saved strides.
        for param, st in self.optimizer.state.items():
            if st.get("momentum_buffer") is not None and st["momentum_buffer"].stride() != param.stride():
                st["momentum_buffer"] = torch.empty_like(param).copy_(st["momentum_buffer"])

    def __call__(self, images: torch.Tensor, labels: torch.Tensor, lr: float) -> torch.Tensor:
        self.lr.fill_(lr)
        if self.graph is None:
            self.capture(images, labels)
        self.static_images.copy_(images, non_blocking=True)
        self.static_labels.copy_(labels, non_blocking=True)
        self.graph.replay()
        return self.static_stats.clone()

    def capture(self, images: torch.Tensor, labels: torch.Tensor) -> None:
        self.static_images, self.static_labels = images.clone(), labels.clone()
        saved = self.snapshot()
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # warm-up: allocates momentum buffers, picks cuDNN algorithms
            for _ in range(3):
                self.optimizer.zero_grad(set_to_none=True)
                self.forward_backward(self.static_images, self.static_labels)
                self.optimizer.step()
        torch.cuda.current_stream().wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        self.optimizer.zero_grad(set_to_none=True)
        # thread_local: a CUDA call from another thread (the torch loader's pin-memory thread, DALI's workers)
        # during the capture must not invalidate it.
        with torch.cuda.graph(self.graph, capture_error_mode="thread_local"):
            self.static_stats = self.forward_backward(self.static_images, self.static_labels)
            self.optimizer.step()
        self.restore(saved)

    def snapshot(self) -> dict[str, Any]:
        """Weights, BN statistics and momentum (a resumed run has some) before the capture's warm-up steps."""
        momentum = {p: st["momentum_buffer"].clone() for p, st in self.optimizer.state.items()
                    if st.get("momentum_buffer") is not None}
        return {"model": {k: v.clone() for k, v in self.model.state_dict().items()}, "momentum": momentum}

    @torch.no_grad()
    def restore(self, saved: dict[str, Any]) -> None:
        """Undo the warm-up in place (the graph holds these tensors' addresses). Momentum the run did not have
        yet becomes zeros: with dampening 0, SGD's first step from zeros equals its first step from none."""
        for key, value in self.model.state_dict().items():
            value.copy_(saved["model"][key])
        for param, state in self.optimizer.state.items():
            buffer = state.get("momentum_buffer")
            if buffer is None:
                continue
            before = saved["momentum"].get(param)
            if before is None:
                buffer.zero_()
            else:
                buffer.copy_(before)


def half_batch_norm_statistics(model: nn.Module, dtype: torch.dtype) -> None:
    """DeepSpeed's bf16/fp16 casts parameters, not buffers: batch norm then gets bf16 weights with fp32 running
    statistics, which its kernels refuse ("expected scalar type BFloat16 but found Float"). The statistics follow
    the weights, as in a model.half() run."""
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm) and module.running_mean is not None:
            module.running_mean = module.running_mean.to(dtype)
            module.running_var = module.running_var.to(dtype)


class DeepSpeedStep(EagerStep):
    """The same model and SGD through ``deepspeed.initialize`` (ZeRO stage, bf16/fp16, clipping from the config)."""

    def __init__(self, cfg: TrainConfig, model: nn.Module, env: DistEnv, device: torch.device):
        import deepspeed
        self.cfg, self.model, self.device = cfg, model, device
        self.precision = resolve_precision(cfg, device)
        optimizer = sgd(cfg, model.parameters(), cfg.optim.lr)
        if not env.enabled:
            distributed.set_world_of_one()
        self.engine, self.optimizer, _, _ = deepspeed.initialize(
            model=model, optimizer=optimizer, config=deepspeed_config(cfg, env.world_size, self.precision))
        unlink_shm_allreduce_buffer(env)
        if self.precision in AUTOCAST_DTYPES:
            half_batch_norm_statistics(self.engine.module, AUTOCAST_DTYPES[self.precision])

    def __call__(self, images: torch.Tensor, labels: torch.Tensor, lr: float) -> torch.Tensor:
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        images = images.to(AUTOCAST_DTYPES[self.precision]) if self.precision in AUTOCAST_DTYPES else images
        logits = self.engine(images)
        loss = F.cross_entropy(logits.float(), labels)
        self.engine.backward(loss)
        self.engine.step()
        return step_stats(logits, labels, loss)

    def eval_model(self) -> nn.Module:
        return self.engine.module

    def state_dict(self) -> dict[str, Any]:
        return {"model": self.engine.module.state_dict(), "optimizer": self.optimizer.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.engine.module.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])


def unlink_shm_allreduce_buffer(env: DistEnv) -> None:
    """Remove this rank's name of DeepSpeed's CPU all-reduce segment (69 MB in /dev/shm) once every rank has it open.

    DeepSpeed (0.19) creates one segment a rank when all ranks share a host and never unlinks it, so every master
    port used leaves ~69 MB a rank in /dev/shm for good. The mappings outlive the name: unlinking it now frees the
    memory when the ranks exit, crashed or not. DeepSpeed's initialize returns only after a rank has opened all its
    peers' segments, hence the barrier before the unlink.
    """
    if not torch.distributed.is_initialized():
        return
    torch.distributed.barrier()
    address, port = os.environ.get("MASTER_ADDR", ""), os.environ.get("MASTER_PORT", "")
    Path(f"/dev/shm/deepspeed_allreduce_buffer_{os.getuid()}_{address}_{port}_{env.rank}").unlink(missing_ok=True)


def deepspeed_config(cfg: TrainConfig, world_size: int, precision: str) -> dict[str, Any]:
    """The DeepSpeed JSON for a trial: a pure function, golden-tested."""
    ds: dict[str, Any] = {
        "train_batch_size": cfg.batch_size,
        "train_micro_batch_size_per_gpu": cfg.batch_size // world_size,
        "gradient_accumulation_steps": 1,
        "zero_optimization": {"stage": cfg.dist.zero_stage},
        "bf16": {"enabled": precision == "bf16"},
        "fp16": {"enabled": precision == "fp16"},
        # Always explicit: left out, DeepSpeed 0.19 clips the gradient norm at 1.0, silently changing the recipe.
        "gradient_clipping": cfg.optim.grad_clip or 0.0,
        "steps_per_print": 10**9,  # the trainer logs; DeepSpeed's own prints would flood worker logs
    }
    return ds


def build_step(cfg: TrainConfig, model: nn.Module, env: DistEnv, device: torch.device) -> EagerStep:
    if cfg.dist.engine == "deepspeed":
        return DeepSpeedStep(cfg, model, env, device)
    kind = resolve_step(cfg, device, env.world_size)
    if kind in GRAPH_STEPS:
        if device.type != "cuda":
            raise ConfigError(f"step: {kind!r} needs a CUDA GPU; use eager or compile on CPU")
        return GraphStep(cfg, model, env, device, compile=kind == "compile_graph")
    return EagerStep(cfg, model, env, device, compile=kind == "compile")
