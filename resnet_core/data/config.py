"""The data section of a run's config: where the images are, which loader reads them, how they are split.

Paper Sec. 4.2: CIFAR-10 with pad-4 random crop + flip, schedule chosen on a 45k/5k train/val split.
"""
from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

LOADER_NAMES = ("gpu", "dali", "torch")


class DataError(ValueError):
    """Data that cannot be read as asked (a bad layout, a corrupt file, a split too small): the user's to fix,
    told in one line naming the file or key."""


class SyntheticConfig(BaseModel):
    """Seeded random images for tests and dry benchmarks (path: "synthetic")."""
    model_config = ConfigDict(extra="forbid", frozen=True)

    num_classes: int = Field(10, ge=1, description="number of classes; labels are balanced")
    image_size: int = Field(32, ge=8, description="side of the square RGB images, pixels")
    train_size: int = Field(512, ge=1, description="images in the train split")
    test_size: int = Field(128, ge=1, description="images in the test split")
    seed: int = Field(0, ge=0, description="seed of the pixels (not of the training order)")


class DataConfig(BaseModel):
    """Dataset location, loader choice and split; every loader reads every format."""
    model_config = ConfigDict(extra="forbid", frozen=True)

    path: str = Field("../shared/datasets/cifar10-jpeg.tar.gz", description=(
        "torchvision cifar-10-batches-py folder (or its parent), ImageFolder tree (train/<class>/*.jpg, "
        "test/<class>/*.jpg), a .tar.gz of such a tree, or 'synthetic'"))
    loader: Literal["gpu", "dali", "torch"] = Field("gpu", description=(
        "gpu: whole uint8 dataset on the device, batched augmentation; dali: NVIDIA DALI pipelines; "
        "torch: torchvision transforms + DataLoader workers"))
    val_split: int = Field(0, ge=0, description="train images held out (seeded, class-stratified) as 'val'; paper: 5000")
    subset: int | None = Field(None, ge=1, description="use only N train images (seeded, class-balanced)")
    test_subset: int | None = Field(None, ge=1, description="use only N test images (seeded, class-balanced)")
    augment: bool = Field(True, description=(
        "train split only: pad-4 random crop + flip (CIFAR-size), random-resized-crop 224 + flip (ImageNet-size)"))
    num_workers: int = Field(2, ge=0, description="CPU workers (torch DataLoader processes / DALI threads)")
    download: bool = Field(False, description="download torchvision CIFAR-10 into path when it is missing")
    cache_dir: str | None = Field(None, description=(
        "where a .tar.gz is unpacked and decoded arrays are cached; default: next to the data if writable, "
        "else ~/.cache/resnet_core"))
    synthetic: SyntheticConfig = SyntheticConfig()

    @field_validator("loader", mode="before")
    @classmethod
    def _known_loader(cls, value):
        # pydantic's own Literal message is long and multi-line; the CLI prints errors as one line.
        if value not in LOADER_NAMES:
            raise ValueError(f"data.loader: unknown loader {value!r}; valid loaders: {', '.join(LOADER_NAMES)}")
        return value

    @model_validator(mode="after")
    def _synthetic_split_leaves_train_images(self) -> "DataConfig":
        # known before any data is read: a sweep refuses it up front (every trial failed on it once started)
        if self.path == "synthetic" and self.val_split >= self.synthetic.train_size:
            raise ValueError(f"val_split: {self.val_split} leaves no train images (data.synthetic.train_size is "
                             f"{self.synthetic.train_size})")
        return self
