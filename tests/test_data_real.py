"""The real JPEG CIFAR-10 copy in ../shared (read-only), through the path a config would give, relative to the repo."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from resnet_core.data import DataConfig, build_loader, load_split
from resnet_core.data.formats import open_dataset

REPO = Path(__file__).resolve().parents[1]
RELATIVE = "../shared/datasets/cifar10-jpeg.tar.gz"
CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]

pytestmark = [pytest.mark.timeout(300),
              pytest.mark.skipif(not (REPO / RELATIVE).is_file(), reason=f"{RELATIVE} is absent (no ../shared checkout)")]


def test_real_cifar10_jpeg_counts_classes_and_pixels(tmp_path, monkeypatch):
    monkeypatch.chdir(REPO)  # the relative path is resolved as a run started from the repo root would
    cfg = DataConfig(path=RELATIVE, cache_dir=str(tmp_path))  # ../shared is read-only: cache elsewhere
    dataset = open_dataset(cfg)
    assert dataset.kind == "imagefolder" and dataset.class_names == CLASSES and dataset.cifar_sized
    assert len(dataset.splits["train"].labels) == 50_000 and len(dataset.splits["test"].labels) == 10_000
    assert np.bincount(dataset.splits["train"].labels).tolist() == [5_000] * 10
    assert np.bincount(dataset.splits["test"].labels).tolist() == [1_000] * 10
    images, labels, names = load_split(cfg, "test")
    assert images.shape == (10_000, 32, 32, 3) and images.dtype == np.uint8 and names == CLASSES
    mean = images.reshape(-1, 3).mean(0) / 255
    assert np.allclose(mean, [0.4914, 0.4822, 0.4465], atol=0.02)  # CIFAR-10's channel means, JPEG or not
    # dali reads the JPEG files (no 50k decode into the cache first): a quick walk over the 5k val images
    split = cfg.model_copy(update={"val_split": 5000, "loader": "dali"})
    loader = build_loader(split, "val", 500)
    assert loader.num_samples == 5_000 and len(loader) == 10
    val_labels = np.concatenate([b[1].numpy() for b in loader])
    assert np.bincount(val_labels).tolist() == [500] * 10  # the paper's 45k/5k split, stratified
    assert build_loader(split, "train", 128).num_samples == 45_000
