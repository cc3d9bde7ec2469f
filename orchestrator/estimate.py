"""Cost estimates for dry runs: training multiply-adds and GPU-hours from a measured throughput table.

Small CIFAR nets are launch-bound, not compute-bound (../shared/docs/gpu.md), so GPU time is estimated from
measured images/s, scaled by multiply-adds between the measured models.
"""
from __future__ import annotations

import functools

from resnet_core.config import GRAPH_STEPS, TrainConfig

# Measured on one H100, batch 128, bf16, whole step in one CUDA graph (../shared/docs/gpu.md):
# model multiply-adds per image -> training images/s.
MEASURED_H100_GRAPH = {40.6e6: 63_800, 125.5e6: 23_300, 252.9e6: 12_000}  # ResNet-20, -56, -110
EAGER_SLOWDOWN = 63_800 / 11_000  # eager PyTorch ResNet-20 vs one CUDA graph, same GPU
CIFAR_TRAIN_IMAGES = 50_000
# Per GPU process, beyond what PyTorch allocates: the CUDA context, cuDNN/cuBLAS handles and workspaces. A
# conservative figure until measured (scripts/device/bench_train.py prints est_mem_gb beside peak_mem_gb).
CUDA_CONTEXT_BYTES = int(0.75 * 2**30)
DEFAULT_GPU_MEMORY_GB = 80.0  # an H100, the GPU this project targets, when neither the spec nor this machine says


@functools.lru_cache(maxsize=None)
def model_multiply_adds(name: str, overrides: tuple) -> int:
    import torch
    from resnet_core.models import count_multiply_adds, create_model
    with torch.device("meta"):
        return count_multiply_adds(create_model(name, **dict(overrides)))


def train_images(cfg: TrainConfig) -> int:
    """Images one trial trains on: iterations x global batch."""
    if cfg.schedule.unit == "iterations":
        return cfg.schedule.total * cfg.batch_size
    per_epoch = cfg.data.subset or (cfg.data.synthetic.train_size if cfg.data.path == "synthetic"
                                    else CIFAR_TRAIN_IMAGES) - cfg.data.val_split
    return cfg.schedule.total * per_epoch


def training_multiply_adds(cfg: TrainConfig) -> float:
    """Forward + backward ~ 3x the forward multiply-adds, for every training image."""
    macs = model_multiply_adds(cfg.model.name, tuple(sorted(cfg.model.overrides().items())))
    return 3.0 * macs * train_images(cfg)


def images_per_second(macs_per_image: float, graph: bool = True) -> float:
    """Interpolate the measured table in 1/multiply-adds; beyond it, assume compute-bound scaling."""
    points = sorted(MEASURED_H100_GRAPH.items())
    lo = max((p for p in points if p[0] <= macs_per_image), default=points[0])
    hi = min((p for p in points if p[0] >= macs_per_image), default=points[-1])
    if lo == hi:
        rate = lo[1] * lo[0] / macs_per_image
    else:
        t = (macs_per_image - lo[0]) / (hi[0] - lo[0])
        rate = 1 / ((1 - t) / lo[1] + t / hi[1])
    return rate if graph else rate / EAGER_SLOWDOWN


def gpu_hours(cfg: TrainConfig) -> float:
    macs = model_multiply_adds(cfg.model.name, tuple(sorted(cfg.model.overrides().items())))
    graph = cfg.step == "auto" or cfg.step in GRAPH_STEPS
    return train_images(cfg) / images_per_second(macs, graph) / 3600


@functools.lru_cache(maxsize=None)
def _model_training_bytes(name: str, overrides: tuple, batch_size: int) -> int:
    import torch
    from resnet_core.models import create_model
    from resnet_core.models.memory import training_memory_bytes
    with torch.device("meta"):
        return training_memory_bytes(create_model(name, **dict(overrides)), batch_size)


def trial_gpu_memory_bytes(cfg: TrainConfig, members: int = 1, ranks: int = 1) -> int:
    """Peak GPU memory of one trial's process (or one fused group of ``members``): weights, gradients, momentum
    and saved activations counted at fp32 on the meta device (an upper bound for bf16), the data the gpu loader
    holds, and the CUDA context."""
    batch = max(1, cfg.batch_size // ranks)
    per_member = _model_training_bytes(cfg.model.name, tuple(sorted(cfg.model.overrides().items())), batch)
    return members * per_member + gpu_loader_bytes(cfg) + CUDA_CONTEXT_BYTES


def gpu_loader_bytes(cfg: TrainConfig) -> int:
    """The `gpu` loader keeps its splits on the device as uint8 (shared by a fused group's seeds): CIFAR-10 is
    60,000 x 3 x 32 x 32 bytes (184 MB); the other loaders stream batches."""
    if cfg.data.loader != "gpu":
        return 0
    if cfg.data.path == "synthetic":
        s = cfg.data.synthetic
        return (s.train_size + s.test_size) * 3 * s.image_size ** 2
    return 60_000 * 3 * 32 * 32


def gpu_memory_gb(configured: float | None) -> tuple[float, str]:
    """The memory of one GPU and where the figure came from."""
    if configured:
        return configured, "resources.gpu_memory_gb"
    import torch
    if torch.cuda.is_available():
        return torch.cuda.get_device_properties(0).total_memory / 2**30, torch.cuda.get_device_name(0)
    return DEFAULT_GPU_MEMORY_GB, "default (H100 80GB)"
