"""Small generated datasets for the data tests (no test functions here; other test_data_* modules import these).

Every image carries a known pixel: image j of class c has pixel (0, 0) = (10 c, j, 7), so a test can check
that a format reader put the right pixels under the right label.
"""
from __future__ import annotations

import pickle
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

CLASSES = ["cat", "airplane", "dog"]  # deliberately unsorted: labels must follow sorted names


def known_image(label: int, index: int, size: int = 32, smooth: bool = False) -> np.ndarray:
    """Noise (PNG fixtures, exact) or a smooth gradient (JPEG fixtures, decoders differ little on it)."""
    rng = np.random.default_rng(label * 1000 + index)
    if smooth:
        ramp = np.linspace(0, 1, size)
        base = np.stack([np.add.outer(ramp, ramp) * 60, np.outer(ramp, 1 - ramp) * 200, np.full((size, size), 90.0)], -1)
        image = np.clip(base + 40 * label + rng.uniform(0, 20, 3), 0, 255).astype(np.uint8)
    else:
        image = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
    image[0, 0] = (10 * label, index, 7)
    return image


def write_image_folder(root: Path, per_class: dict[str, int], suffix: str = ".png", size: int = 32,
                       classes: list[str] = CLASSES) -> Path:
    """root/{train,test}/<class>/NNNN<suffix>; returns root."""
    for split, count in per_class.items():
        for label, name in enumerate(sorted(classes)):
            folder = root / split / name
            folder.mkdir(parents=True, exist_ok=True)
            for j in range(count):
                image = known_image(label, j, size, smooth=suffix == ".jpg")
                Image.fromarray(image).save(folder / f"{j:04d}{suffix}", **({"quality": 95} if suffix == ".jpg" else {}))
    return root


def write_cifar_pickles(folder: Path, per_batch: int = 30, key=str.encode) -> Path:
    """torchvision's cifar-10-batches-py layout with small batches; labels cycle 0..9, pixel (0,0) known.
    ``key``: bytes keys (as the original files read with encoding="bytes"), or ``str`` (a subset saved from
    Python 3)."""
    folder.mkdir(parents=True)
    names = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
    for name, offset in [(f"data_batch_{i}", (i - 1) * per_batch) for i in range(1, 6)] + [("test_batch", 0)]:
        labels = [(offset + j) % 10 for j in range(per_batch)]
        hwc = np.stack([known_image(label, offset + j) for j, label in enumerate(labels)])
        rows = hwc.transpose(0, 3, 1, 2).reshape(per_batch, 3072)  # CIFAR rows are CHW-flattened
        with open(folder / name, "wb") as f:
            pickle.dump({key("data"): rows, key("labels"): labels, key("batch_label"): name.encode()}, f)
    with open(folder / "batches.meta", "wb") as f:
        pickle.dump({key("label_names"): [n.encode() for n in names], key("num_cases_per_batch"): per_batch}, f)
    return folder


def write_tar_gz(tree: Path, archive: Path) -> Path:
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(tree, arcname=tree.name)
    return archive


@pytest.fixture
def png_folder(tmp_path) -> Path:
    return write_image_folder(tmp_path / "pngs", {"train": 8, "test": 4})


@pytest.fixture
def jpeg_folder(tmp_path) -> Path:
    return write_image_folder(tmp_path / "jpegs", {"train": 8, "test": 4}, suffix=".jpg")


@pytest.fixture
def cifar_pickles(tmp_path) -> Path:
    return write_cifar_pickles(tmp_path / "cifar-10-batches-py")
