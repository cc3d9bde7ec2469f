"""Cost estimates for dry runs: training multiply-adds and GPU-hours from a measured throughput table.

Small CIFAR nets are launch-bound, not compute-bound (../shared/docs/gpu.md), so GPU time is estimated from
measured images/s, scaled by multiply-adds between the measured models.
"""
from __future__ import annotations

import functools

from resnet_core.config import GRAPH_STEPS, ModelConfig, TrainConfig, meta_model

# Model multiply-adds per image -> training images/s on one GPU. CIFAR ResNet-20, -56, -110: measured on one
# H100, batch 128, bf16, the whole step in one CUDA graph (../shared/docs/gpu.md). ResNet-50 (3.86G as counted
# here): NVIDIA's published single-A100 mixed-precision figure (DeepLearningExamples, ResNet-50 v1.5, 2,470 img/s),
# a lower bound for an H100 until measured. Between points the time per image is interpolated; past the last,
# it grows with the multiply-adds (compute-bound).
THROUGHPUT = {40.6e6: 63_800, 125.5e6: 23_300, 252.9e6: 12_000, 3.858e9: 2_470}
# Eager PyTorch against one CUDA graph for CIFAR-sized nets, which are launch-bound (ResNet-20, same GPU);
# ImageNet-sized nets are compute-bound, and the ResNet-50 figure is an eager one.
EAGER_SLOWDOWN = 63_800 / 11_000
CIFAR_TRAIN_IMAGES = 50_000
IMAGENET_TRAIN_IMAGES = 1_281_167  # ILSVRC-2012, the paper's ImageNet (Sec. 4.1: "1.28 million training images")
# Per GPU process, beyond what PyTorch allocates: the CUDA context, cuDNN/cuBLAS handles and workspaces. A
# conservative figure until measured (scripts/device/bench_train.py prints est_mem_gb beside peak_mem_gb).
CUDA_CONTEXT_BYTES = int(0.75 * 2**30)
DEFAULT_GPU_MEMORY_GB = 80.0  # an H100, the GPU this project targets, when neither the spec nor this machine says


@functools.lru_cache(maxsize=None)
def _model_facts(model: ModelConfig) -> tuple[int, int]:
    """(multiply-adds per image, native input size), from the model built on the meta device."""
    from resnet_core.models import count_multiply_adds
    net = meta_model(model)
    return count_multiply_adds(net), net.input_size


def model_multiply_adds(cfg: TrainConfig) -> int:
    return _model_facts(cfg.model)[0]


def train_images(cfg: TrainConfig) -> int:
    """Images one trial trains on: iterations x global batch, or epochs x the train split (without reading the
    data: CIFAR-10's or ImageNet's size by the model's input, unless a subset or synthetic data says)."""
    if cfg.schedule.unit == "iterations":
        return cfg.schedule.total * cfg.batch_size
    if cfg.data.subset:
        per_epoch = cfg.data.subset
    elif cfg.data.path == "synthetic":
        per_epoch = cfg.data.synthetic.train_size - cfg.data.val_split
    else:
        per_epoch = (IMAGENET_TRAIN_IMAGES if is_imagenet_sized(cfg) else CIFAR_TRAIN_IMAGES) - cfg.data.val_split
    return cfg.schedule.total * per_epoch


def training_multiply_adds(cfg: TrainConfig) -> float:
    """Forward + backward ~ 3x the forward multiply-adds, for every training image."""
    return 3.0 * model_multiply_adds(cfg) * train_images(cfg)


def images_per_second(macs_per_image: float, graph: bool = True) -> float:
    """Interpolate the table in time per image; beyond it, assume compute-bound scaling."""
    points = sorted(THROUGHPUT.items())
    lo = max((p for p in points if p[0] <= macs_per_image), default=points[0])
    hi = min((p for p in points if p[0] >= macs_per_image), default=points[-1])
    if lo == hi:
        rate = lo[1] * lo[0] / macs_per_image
    else:
        t = (macs_per_image - lo[0]) / (hi[0] - lo[0])
        rate = 1 / ((1 - t) / lo[1] + t / hi[1])
    return rate if graph else rate / EAGER_SLOWDOWN


def gpu_hours(cfg: TrainConfig) -> float:
    """GPU time of the whole trial at one GPU's rate: the same however many GPUs share it (linear scaling assumed,
    so a multi-GPU trial costs at least this). `compile` steps are priced as eager until measured; eager costs
    more than a graph only for the launch-bound CIFAR-sized nets."""
    graph = cfg.step == "auto" or cfg.step in GRAPH_STEPS or is_imagenet_sized(cfg)
    return train_images(cfg) / images_per_second(model_multiply_adds(cfg), graph) / 3600


def is_imagenet_sized(cfg: TrainConfig) -> bool:
    return _model_facts(cfg.model)[1] > 64


@functools.lru_cache(maxsize=None)
def _model_training_bytes(model: ModelConfig, batch_size: int) -> int:
    from resnet_core.models.memory import training_memory_bytes
    return training_memory_bytes(meta_model(model), batch_size)


def trial_gpu_memory_bytes(cfg: TrainConfig, members: int = 1, ranks: int = 1) -> int:
    """Peak GPU memory of one trial's process (or one fused group of ``members``): weights, gradients, momentum
    and saved activations counted at fp32 on the meta device (an upper bound for bf16), the data the gpu loader
    holds, and the CUDA context."""
    batch = max(1, cfg.batch_size // ranks)
    per_member = _model_training_bytes(cfg.model, batch)
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


def gpu_memory_gb(configured: float | None, gpu_type: str | None = None) -> tuple[float, str]:
    """The memory of one GPU and where the figure came from. A cluster profile that names its GPUs (SLURM GRES
    type) runs on those, not on this machine's card: the default then, said with the type it may not fit."""
    if configured:
        return configured, "resources.gpu_memory_gb"
    if gpu_type and "h100" in gpu_type.lower():
        return DEFAULT_GPU_MEMORY_GB, f"H100 80GB: the profile's gpu_type {gpu_type!r}"
    if gpu_type:
        return DEFAULT_GPU_MEMORY_GB, (f"default (H100 80GB); the profile's gpu_type is {gpu_type!r}: set "
                                       "resources.gpu_memory_gb to its memory")
    import torch
    if torch.cuda.is_available():
        return torch.cuda.get_device_properties(0).total_memory / 2**30, torch.cuda.get_device_name(0)
    return DEFAULT_GPU_MEMORY_GB, "default (H100 80GB)"
