"""What every loader shares: which samples a rank sees in which order, and each sample's augmentation.

All three loaders (gpu, dali, torch) consume the same `EpochPlan`, so for the same (seed, epoch, rank) they
see the same images in the same order with the same crop offsets and flips; a run resumed at
(epoch, start_batch) sees exactly the batches an uninterrupted run would, because nothing here has state.
Augmentation: CIFAR follows the paper (Sec. 4.2: pad 4, random 32x32 crop, horizontal flip). ImageNet uses the
now-common random-resized crop 224 (area 8-100 %) + flip and one centre crop to test, not the paper's (Sec. 3.4:
shorter side resized in [256, 480], a random 224 crop, flip, colour augmentation; 10-crop testing in Table 3).
"""
from __future__ import annotations

import copy
from dataclasses import dataclass

import numpy as np

from .config import DataError

CIFAR_PAD = 4  # paper Sec. 4.2: "4 pixels are padded on each side"
RRC_AREA = (0.08, 1.0)  # Inception-style scale augmentation, as torchvision's RandomResizedCrop
RRC_LOG_RATIO = (np.log(3 / 4), np.log(4 / 3))

# Per-channel statistics (0..1 scale). Fixed constants rather than computed from the data, so every loader,
# every subset and every rank normalise identically (the JPEG copy differs from these by < 0.01).
CIFAR_MEAN, CIFAR_STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def normalisation(cifar_sized: bool) -> tuple[tuple[float, ...], tuple[float, ...]]:
    return (CIFAR_MEAN, CIFAR_STD) if cifar_sized else (IMAGENET_MEAN, IMAGENET_STD)


@dataclass(frozen=True)
class EpochPlan:
    """One rank's batches of one epoch, from `start_batch` on. Arrays are aligned per sample.

    indices: positions into the split's samples. For CIFAR-sized train data `crop_x/crop_y` are the top-left
    corner in the 4-padded image (0..8) and `flip` is 0/1. For ImageNet-sized train data `rrc` holds per
    sample (area fraction, log aspect ratio, x fraction, y fraction) of a random-resized crop.
    """
    indices: np.ndarray
    batch_size: int
    flip: np.ndarray | None = None
    crop_x: np.ndarray | None = None
    crop_y: np.ndarray | None = None
    rrc: np.ndarray | None = None

    def batches(self):
        """Yields slices of the plan's arrays, one per batch (the last may be short on eval splits)."""
        for start in range(0, len(self.indices), self.batch_size):
            yield slice(start, start + self.batch_size)

    def __len__(self) -> int:
        return -(-len(self.indices) // self.batch_size)


def rank_share(num_samples: int, rank: int, world_size: int, train: bool) -> int:
    """Samples this rank sees per epoch: train parts are equal on all ranks (DDP needs the same step count)."""
    if train:
        return num_samples // world_size
    return len(np.array_split(np.arange(num_samples), world_size)[rank])


def rank_indices(num_samples: int, *, train: bool, seed: int, epoch: int, rank: int, world_size: int) -> np.ndarray:
    """Train: one global permutation per (seed, epoch), dealt round-robin so ranks are disjoint and equal.
    Eval: fixed order in contiguous chunks, so concatenating the ranks in order gives the split in order."""
    if not train:
        return np.array_split(np.arange(num_samples), world_size)[rank]
    order = np.random.default_rng([seed, epoch, 0xDA7A]).permutation(num_samples)
    per_rank = num_samples // world_size
    return order[: per_rank * world_size][rank::world_size]


def make_plan(num_samples: int, batch_size: int, *, train: bool, augment: bool, cifar_sized: bool,
              seed: int, epoch: int, rank: int, world_size: int, start_batch: int = 0) -> EpochPlan:
    """The batches `iterate(epoch, start_batch)` must deliver, as a pure function of its arguments."""
    indices = rank_indices(num_samples, train=train, seed=seed, epoch=epoch, rank=rank, world_size=world_size)
    if train:  # drop_last: every batch full, so every rank takes the same number of optimizer steps
        indices = indices[: len(indices) // batch_size * batch_size]
    aug = _augmentation(len(indices), cifar_sized, seed, epoch, rank) if (train and augment) else {}
    begin = start_batch * batch_size
    return EpochPlan(indices=indices[begin:], batch_size=batch_size,
                     **{key: value[begin:] for key, value in aug.items()})


def _augmentation(n: int, cifar_sized: bool, seed: int, epoch: int, rank: int) -> dict[str, np.ndarray]:
    # Drawn for the whole epoch at once, so a resumed run slices the very same numbers.
    rng = np.random.default_rng([seed, epoch, rank, 0xA06])
    flip = rng.integers(0, 2, n, dtype=np.int32)
    if cifar_sized:
        crop = rng.integers(0, 2 * CIFAR_PAD + 1, (2, n), dtype=np.int32)
        return dict(flip=flip, crop_x=crop[0], crop_y=crop[1])
    area = rng.uniform(*RRC_AREA, n)
    log_ratio = rng.uniform(*RRC_LOG_RATIO, n)
    where = rng.uniform(0.0, 1.0, (2, n))
    return dict(flip=flip, rrc=np.stack([area, log_ratio, where[0], where[1]], 1).astype(np.float32))


def rrc_box(rrc: np.ndarray, height: int, width: int) -> tuple[int, int, int, int]:
    """(top, left, crop_h, crop_w) in pixels for one sample's random-resized-crop numbers.

    torchvision retries up to 10 draws until the box fits; we clamp instead, so the box is a pure function of
    four numbers (the DALI pipeline computes the same formula on its own side).
    """
    area, log_ratio, fx, fy = (float(v) for v in rrc)
    target = area * height * width
    ratio = np.exp(log_ratio)
    crop_w = int(min(width, max(1, round(np.sqrt(target * ratio)))))
    crop_h = int(min(height, max(1, round(np.sqrt(target / ratio)))))
    return int(fy * (height - crop_h)), int(fx * (width - crop_w)), crop_h, crop_w


class Loader:
    """The interface every loader implements: batches of (float32 NCHW normalised images, int64 labels).

    Subclasses set `num_classes`, `num_samples`, and implement `_run(plan)` yielding batches for a plan.
    """
    num_classes: int
    num_samples: int  # this rank's samples per epoch (before drop_last)

    def __init__(self, *, split: str, batch_size: int, train: bool, augment: bool, cifar_sized: bool,
                 split_size: int, seed: int, rank: int, world_size: int):
        if batch_size < 1:
            raise DataError(f"batch_size: must be >= 1, got {batch_size}")
        if not 0 <= rank < world_size:
            raise DataError(f"rank: must be in [0, {world_size}), got {rank}")
        self.split, self.batch_size, self.train = split, batch_size, train
        self.augment, self.cifar_sized, self.split_size = augment and train, cifar_sized, split_size
        self.seed, self.rank, self.world_size = seed, rank, world_size
        self.num_samples = rank_share(split_size, rank, world_size, train)
        self.epoch = 0
        if train and self.num_samples < batch_size:
            raise DataError(f"batch_size: split {split!r} has {self.num_samples} images per rank, less than one "
                             f"batch of {batch_size} (train batches are full: drop_last); lower batch_size, or "
                             "give the split more images (data.subset, data.val_split)")

    def __len__(self) -> int:
        if self.train:
            return self.num_samples // self.batch_size
        return -(-self.num_samples // self.batch_size)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def with_seed(self, seed: int) -> "Loader":
        """The same images in another seed's order and augmentation, sharing this loader's data (fused trials:
        one copy of the split on the GPU for all seeds). Only for loaders that keep no state while iterating."""
        twin = copy.copy(self)
        twin.seed = seed
        return twin

    def __iter__(self):
        return self.iterate(self.epoch)

    def plan(self, epoch: int, start_batch: int = 0) -> EpochPlan:
        return make_plan(self.split_size, self.batch_size, train=self.train, augment=self.augment,
                         cifar_sized=self.cifar_sized, seed=self.seed, epoch=epoch, rank=self.rank,
                         world_size=self.world_size, start_batch=start_batch)

    def iterate(self, epoch: int, start_batch: int = 0):
        """Batches of `epoch` from `start_batch` on: (images float32 NCHW on device, labels int64 on device)."""
        if not 0 <= start_batch <= len(self):
            raise DataError(f"start_batch: must be in [0, {len(self)}], got {start_batch}")
        plan = self.plan(epoch, start_batch)
        if len(plan.indices):
            yield from self._run(plan)

    def _run(self, plan: EpochPlan):
        raise NotImplementedError
