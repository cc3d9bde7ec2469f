"""The three loaders (gpu, dali, torch): one interface, same labels and pixels, sharding, resume, DALI CPU mode."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from test_data_helpers import jpeg_folder, known_image, png_folder, write_image_folder  # noqa: F401

from resnet_core.data import DataConfig, DataError, SyntheticConfig, build_loader
from resnet_core.data.sampling import CIFAR_MEAN, CIFAR_STD

pytestmark = pytest.mark.timeout(180)
LOADERS = ("gpu", "dali", "torch")
# ids "gpu_loader", not "gpu": conftest skips any test with a "gpu" keyword, and a bare id would be one
BY_LOADER = dict(argvalues=LOADERS, ids=[f"{name}_loader" for name in LOADERS])
SMALL = SyntheticConfig(train_size=96, test_size=40)


def batches(cfg: DataConfig, loader: str, split: str, batch_size: int, epoch: int = 0, start_batch: int = 0, **kw):
    built = build_loader(cfg.model_copy(update={"loader": loader}), split, batch_size, **kw)
    return list(built.iterate(epoch, start_batch))


def stacked(result):
    return torch.cat([b[0] for b in result]), torch.cat([b[1] for b in result])


def unnormalise(images: torch.Tensor) -> np.ndarray:
    mean, std = torch.tensor(CIFAR_MEAN).view(1, 3, 1, 1), torch.tensor(CIFAR_STD).view(1, 3, 1, 1)
    return ((images * std + mean) * 255).round().permute(0, 2, 3, 1).numpy()


@pytest.mark.parametrize("loader", **BY_LOADER)
def test_batches_are_normalised_float_nchw_with_int64_labels(loader):
    cfg = DataConfig(path="synthetic", synthetic=SMALL, num_workers=0)
    built = build_loader(cfg.model_copy(update={"loader": loader}), "train", 32)
    assert (built.num_classes, built.num_samples, len(built)) == (10, 96, 3)
    result = list(built)
    assert len(result) == 3
    images, labels = result[0]
    assert images.shape == (32, 3, 32, 32) and images.dtype == torch.float32 and labels.dtype == torch.int64
    assert -2.2 < images.min() < -1.5 and 1.5 < images.max() < 2.2  # 0..255 mapped by CIFAR mean/std


@pytest.mark.parametrize("split", ["train", "test"])
def test_three_loaders_agree_exactly_on_cifar_arrays(split):
    """Same plan -> same crops and flips: on uint8 arrays the three loaders agree to float rounding."""
    cfg = DataConfig(path="synthetic", synthetic=SMALL, num_workers=0)
    results = {name: stacked(batches(cfg, name, split, 16, epoch=2, seed=5)) for name in LOADERS}
    for name in ("dali", "torch"):
        assert torch.equal(results[name][1], results["gpu"][1])
        assert torch.allclose(results[name][0], results["gpu"][0], atol=1e-5)
    if split == "test":  # un-augmented: the pixels are the source pixels, in the split's order
        from resnet_core.data import load_split
        source, labels, _ = load_split(cfg, "test")
        assert np.array_equal(unnormalise(results["gpu"][0]), source) and np.array_equal(results["gpu"][1], labels)


def test_a_cifar_sized_image_other_than_32_px_is_cropped_to_its_own_size():
    """DALI cropped every CIFAR-sized image to 32 px (a 48 px dataset trained on 32 px crops, tested on 48)."""
    cfg = DataConfig(path="synthetic", synthetic=SyntheticConfig(image_size=48, train_size=32, test_size=16),
                     num_workers=0)
    results = {name: stacked(batches(cfg, name, "train", 16, epoch=1, seed=3)) for name in LOADERS}
    assert results["gpu"][0].shape == (32, 3, 48, 48)
    for name in ("dali", "torch"):
        assert torch.equal(results[name][1], results["gpu"][1])
        assert torch.allclose(results[name][0], results["gpu"][0], atol=1e-5), name


def test_train_augmentation_is_pad4_crop_and_flip():
    cfg = DataConfig(path="synthetic", synthetic=SMALL, num_workers=0)
    loader = build_loader(cfg, "train", 96, seed=1)
    plan = loader.plan(0)
    images = unnormalise(next(loader.iterate(0))[0])
    from resnet_core.data import load_split
    source = load_split(cfg, "train")[0]
    for k in range(10):
        padded = np.pad(source[plan.indices[k]], ((4, 4), (4, 4), (0, 0)))
        window = padded[plan.crop_y[k]:plan.crop_y[k] + 32, plan.crop_x[k]:plan.crop_x[k] + 32]
        assert np.array_equal(images[k], window[:, ::-1] if plan.flip[k] else window)
    assert 0 < plan.flip.mean() < 1 and len(set(plan.crop_x.tolist())) == 9


@pytest.mark.parametrize("suffix,tolerance", [(".png", 0.0), (".jpg", 8.0)])
def test_three_loaders_agree_on_an_image_folder(tmp_path, suffix, tolerance):
    """gpu reads decoded arrays (PIL), torch decodes files with PIL, DALI decodes files itself."""
    root = write_image_folder(tmp_path / "tree", {"train": 8, "test": 4}, suffix=suffix)
    cfg = DataConfig(path=str(root), cache_dir=str(tmp_path / "cache"), num_workers=1, augment=False)
    for split in ("train", "test"):
        results = {name: stacked(batches(cfg, name, split, 4, epoch=1)) for name in LOADERS}
        for name in ("dali", "torch"):
            assert torch.equal(results[name][1], results["gpu"][1])
            worst = np.abs(unnormalise(results[name][0]) - unnormalise(results["gpu"][0])).max()
            assert worst <= tolerance, f"{name} {split}: pixels differ by {worst} levels"
    test_images, test_labels = results["gpu"]
    assert test_labels.tolist() == [0] * 4 + [1] * 4 + [2] * 4
    if suffix == ".png":
        assert np.array_equal(unnormalise(test_images[5:6])[0], known_image(1, 1))


def test_dali_cpu_mode_over_an_image_folder(jpeg_folder, tmp_path):
    cfg = DataConfig(path=str(jpeg_folder), loader="dali", cache_dir=str(tmp_path / "cache"), num_workers=2)
    loader = build_loader(cfg, "test", 5)
    assert type(loader).__name__ == "DaliLoader" and (loader.num_samples, len(loader)) == (12, 3)
    result = list(loader)
    assert [len(b[1]) for b in result] == [5, 5, 2]  # eval: no drop, last batch partial
    images, labels = stacked(result)
    assert images.shape == (12, 3, 32, 32) and images.dtype == torch.float32 and images.device.type == "cpu"
    assert labels.tolist() == [0] * 4 + [1] * 4 + [2] * 4
    pixels = unnormalise(images)
    assert np.abs(pixels[6] - known_image(1, 2, smooth=True)).mean() < 4  # cat/0002.jpg, JPEG-close
    train = list(build_loader(cfg, "train", 8, seed=3).iterate(0))
    assert len(train) == 3 and all(b[0].shape == (8, 3, 32, 32) for b in train)
    assert sorted(torch.cat([b[1] for b in train]).tolist()) == [0] * 8 + [1] * 8 + [2] * 8


@pytest.mark.parametrize("loader", **BY_LOADER)
def test_resume_replays_exactly_the_uninterrupted_batches(loader):
    cfg = DataConfig(path="synthetic", synthetic=SMALL, num_workers=0)
    full = batches(cfg, loader, "train", 16, epoch=3, seed=7, rank=1, world_size=2)
    resumed = batches(cfg, loader, "train", 16, epoch=3, start_batch=2, seed=7, rank=1, world_size=2)
    assert len(full) == 3 and len(resumed) == 1
    assert torch.equal(resumed[0][0], full[2][0]) and torch.equal(resumed[0][1], full[2][1])
    again = batches(cfg, loader, "train", 16, epoch=3, seed=7, rank=1, world_size=2)
    assert all(torch.equal(a[0], b[0]) for a, b in zip(full, again))
    other_epoch = batches(cfg, loader, "train", 16, epoch=4, seed=7, rank=1, world_size=2)
    assert not torch.equal(stacked(other_epoch)[1], stacked(full)[1])  # reshuffled per epoch


def test_set_epoch_drives_iter():
    cfg = DataConfig(path="synthetic", synthetic=SMALL)
    loader = build_loader(cfg, "train", 16, seed=2)
    loader.set_epoch(5)
    assert torch.equal(stacked(list(loader))[1], stacked(list(loader.iterate(5)))[1])


@pytest.mark.parametrize("world_size", [2, 3])
def test_sharding_gives_disjoint_covers(world_size):
    cfg = DataConfig(path="synthetic", synthetic=SyntheticConfig(train_size=100, test_size=40), augment=False)
    seen = []
    for rank in range(world_size):
        loader = build_loader(cfg, "train", 8, rank=rank, world_size=world_size, seed=1)
        assert loader.num_samples == 100 // world_size
        assert len(loader) == (100 // world_size) // 8  # equal step counts on every rank (DDP)
        seen.append(loader.plan(0).indices)
    flat = np.concatenate(seen)
    assert len(set(flat.tolist())) == len(flat)  # disjoint
    assert len(flat) >= 100 - world_size * 8  # nearly everything: only remainders are dropped
    eval_parts = [build_loader(cfg, "test", 7, rank=r, world_size=world_size).plan(0).indices for r in range(world_size)]
    assert np.concatenate(eval_parts).tolist() == list(range(40))  # eval: every image once, in order


def test_train_epochs_use_every_image_on_one_rank():
    cfg = DataConfig(path="synthetic", synthetic=SyntheticConfig(train_size=64, test_size=8))
    labels = stacked(list(build_loader(cfg, "train", 16).iterate(0)))[1]
    from resnet_core.data import load_split
    assert sorted(labels.tolist()) == sorted(load_split(cfg, "train")[1].tolist())


@pytest.mark.parametrize("loader", **BY_LOADER)
def test_imagenet_sized_images_get_224_crops(loader):
    cfg = DataConfig(path="synthetic", synthetic=SyntheticConfig(image_size=96, train_size=16, test_size=8),
                     loader=loader, num_workers=0)
    train = list(build_loader(cfg, "train", 8).iterate(0))
    test = list(build_loader(cfg, "test", 8).iterate(0))
    assert train[0][0].shape == (8, 3, 224, 224) and test[0][0].shape == (8, 3, 224, 224)
    reference = list(build_loader(cfg.model_copy(update={"loader": "torch"}), "test", 8).iterate(0))
    assert (test[0][0] - reference[0][0]).abs().mean() < 0.05  # resize 256 + centre 224: interpolation only


@pytest.mark.parametrize("split, name", [("test", "cat/0001.jpg"), ("test", "airplane/0000.jpg")])
def test_corrupt_file_inside_dali_and_torch_loaders_is_named(jpeg_folder, tmp_path, split, name):
    """Also in DALI's first batch, which its iterator runs when it is made (a 51-line traceback, no file named)."""
    bad = jpeg_folder / split / name
    bad.write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg" * 4)
    for loader in ("dali", "torch"):
        cfg = DataConfig(path=str(jpeg_folder), loader=loader, cache_dir=str(tmp_path / "cache"), num_workers=1)
        with pytest.raises(DataError, match="corrupt or unreadable image") as err:
            list(build_loader(cfg, split, 4))
        assert str(err.value).startswith(f"{bad}: ") and "\n" not in str(err.value)  # not the worker's type name


@pytest.mark.parametrize("loader", ["dali", "torch"])
def test_an_image_of_another_size_in_a_cifar_sized_folder_is_named(tmp_path, loader):
    """Each cropped to its own size, it made the batch uneven: DALI's "The batch must be representable as a
    tensor" or torch.stack's worker traceback, no file named (the gpu loader names it when it decodes the folder)."""
    from PIL import Image
    root = write_image_folder(tmp_path / "mixed", {"train": 4, "test": 2}, size=32)
    odd = root / "train" / "dog" / "0002.png"
    Image.new("RGB", (40, 40)).save(odd)
    cfg = DataConfig(path=str(root), loader=loader, cache_dir=str(tmp_path / "cache"), num_workers=1)
    with pytest.raises(DataError, match="40x40 px, but .* is 32x32; CIFAR-sized folders need one image size") as err:
        list(build_loader(cfg, "train", 4))
    assert str(odd) in str(err.value) and "\n" not in str(err.value)


def test_bad_batch_and_rank_arguments():
    cfg = DataConfig(path="synthetic", synthetic=SMALL)
    with pytest.raises(ValueError, match="less than one batch"):
        build_loader(cfg, "train", 1000)
    with pytest.raises(ValueError, match="rank: must be in"):
        build_loader(cfg, "train", 8, rank=2, world_size=2)
    with pytest.raises(ValueError, match="start_batch"):
        list(build_loader(cfg, "train", 8).iterate(0, start_batch=99))


def test_torch_loader_workers_start_with_torchvision_imported():
    """Each epoch forks new workers; one that imported torchvision itself spent ~2 s at every epoch's start (CIFAR
    test split, 2 workers: 2000 -> 3480 img/s across epochs, docs/benchmarks.md)."""
    import subprocess
    import sys
    code = ("import sys; from resnet_core.data import DataConfig, SyntheticConfig, build_loader; "
            "build_loader(DataConfig(path='synthetic', loader='torch', synthetic=SyntheticConfig(train_size=64, "
            "test_size=16)), 'train', 32); print('torchvision.transforms.functional' in sys.modules)")
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True).stdout == "True\n"
