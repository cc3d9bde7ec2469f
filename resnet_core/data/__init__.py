"""Data loading for the paper's experiments: one interface, three loaders, every dataset format.

    loader = build_loader(cfg, "train", batch_size=128, device="cuda", rank=r, world_size=w, seed=s)
    for images, labels in loader.iterate(epoch, start_batch): ...

Loaders are chosen by `cfg.loader` and imported only when chosen (DALI and torchvision are optional at
import time): "gpu" (gpu.py), "dali" (dali.py), "torch" (torch_loader.py). Formats live in formats.py,
the shared order/augmentation plan in sampling.py.
"""
from __future__ import annotations

import importlib
from typing import Literal

import numpy as np

from .config import LOADER_NAMES, DataConfig, DataError, SyntheticConfig
from .formats import Dataset, open_dataset, split_indices
from .sampling import Loader

SPLITS = ("train", "val", "test")
# loader key -> (module, class): the table the registry pattern asks for; nothing imported until chosen
LOADERS = {"gpu": ("gpu", "GpuLoader"), "dali": ("dali", "DaliLoader"), "torch": ("torch_loader", "TorchLoader")}

__all__ = ["DataConfig", "DataError", "SyntheticConfig", "Loader", "build_loader", "load_split", "LOADER_NAMES", "SPLITS"]


def build_loader(cfg: DataConfig, split: Literal["train", "val", "test"], batch_size: int, device="cpu",
                 rank: int = 0, world_size: int = 1, seed: int = 0) -> Loader:
    """A loader over this rank's part of `split`; `batch_size` is per rank."""
    if cfg.loader not in LOADERS:  # reachable through model_construct / model_copy(update=...)
        raise DataError(f"data.loader: unknown loader {cfg.loader!r}; valid loaders: {', '.join(LOADERS)}")
    dataset, indices = _select(cfg, split)
    source = dataset.splits["test" if split == "test" else "train"]
    common = dict(split=split, batch_size=batch_size, train=split == "train", augment=cfg.augment,
                  cifar_sized=dataset.cifar_sized, seed=seed, rank=rank, world_size=world_size)
    module, name = LOADERS[cfg.loader]
    cls = getattr(importlib.import_module(f"{__name__}.{module}"), name)
    labels = source.labels[indices]
    if cfg.loader == "gpu":
        images = dataset.arrays("test" if split == "test" else "train")[indices]
        return cls(images, labels, len(dataset.class_names), device, **common)
    images = None if source.images is None else source.images[indices]
    files = None if source.files is None else [source.files[i] for i in indices]
    return cls(labels, images, files, len(dataset.class_names), device, cfg.num_workers, **common)


def load_split(cfg: DataConfig, split: Literal["train", "val", "test"]) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """A whole CIFAR-sized split as (uint8 NHWC images, int64 labels, class names), in the loaders' eval order."""
    dataset, indices = _select(cfg, split)
    source = "test" if split == "test" else "train"
    return dataset.arrays(source)[indices], dataset.splits[source].labels[indices], list(dataset.class_names)


def _select(cfg: DataConfig, split: str) -> tuple[Dataset, np.ndarray]:
    if split not in SPLITS:
        raise DataError(f"split: unknown split {split!r}; valid splits: {', '.join(SPLITS)}")
    dataset = open_dataset(cfg)
    source = dataset.splits["test" if split == "test" else "train"]
    return dataset, split_indices(cfg, source.labels, split)
