"""Dataset formats (resnet_core.data.formats): each read correctly, splits seeded and disjoint, bad input named."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
from test_data_helpers import (CLASSES, cifar_pickles, jpeg_folder, known_image, png_folder,  # noqa: F401
                               write_cifar_pickles, write_image_folder, write_tar_gz)

from resnet_core.data import DataConfig, SyntheticConfig, build_loader, load_split
from resnet_core.data.formats import open_dataset, stratified_order

pytestmark = pytest.mark.timeout(120)


def cfg_for(path, tmp_path, **kw) -> DataConfig:
    return DataConfig(path=str(path), cache_dir=str(tmp_path / "cache"), **kw)


def test_cifar_pickles_counts_label_names_and_known_pixel(cifar_pickles, tmp_path):
    for path in (cifar_pickles, cifar_pickles.parent):  # the folder itself or its parent
        images, labels, names = load_split(cfg_for(path, tmp_path), "train")
        assert images.shape == (150, 32, 32, 3) and images.dtype == np.uint8 and labels.dtype == np.int64
        assert names[:3] == ["airplane", "automobile", "bird"] and len(names) == 10
        assert np.bincount(labels).tolist() == [15] * 10
        # sample 37 sits in data_batch_2 at row 7: label 7, pixel (0, 0) = (70, 37, 7), CHW rows -> HWC
        assert labels[37] == 7 and images[37, 0, 0].tolist() == [70, 37, 7]
        assert np.array_equal(images[37], known_image(7, 37))
    test_images, test_labels, _ = load_split(cfg_for(cifar_pickles, tmp_path), "test")
    assert len(test_images) == 30 and test_labels[:3].tolist() == [0, 1, 2]


def test_cifar_pickles_saved_from_python_3_with_str_keys_read_the_same(cifar_pickles, tmp_path):
    """A subset a user pickled from Python 3 ({"data": ..., "labels": ...}) was "not a CIFAR-10 pickle batch"."""
    str_keyed = write_cifar_pickles(tmp_path / "py3" / "cifar-10-batches-py", key=str)
    images, labels, names = load_split(cfg_for(str_keyed, tmp_path), "train")
    want_images, want_labels, want_names = load_split(cfg_for(cifar_pickles, tmp_path / "b"), "train")
    assert np.array_equal(images, want_images) and np.array_equal(labels, want_labels) and names == want_names


def test_image_folder_png_labels_follow_sorted_class_names(png_folder, tmp_path):
    images, labels, names = load_split(cfg_for(png_folder, tmp_path), "train")
    assert names == sorted(CLASSES) == ["airplane", "cat", "dog"]
    assert np.bincount(labels).tolist() == [8, 8, 8]
    # files are listed class by class, name by name: position 8 + 5 is cat/0005.png
    assert labels[13] == 1 and images[13, 0, 0].tolist() == [10, 5, 7]
    assert np.array_equal(images[13], known_image(1, 5))
    test_images, test_labels, _ = load_split(cfg_for(png_folder, tmp_path), "test")
    assert np.bincount(test_labels).tolist() == [4, 4, 4] and np.array_equal(test_images[4 + 2], known_image(1, 2))


def test_image_folder_jpeg_pixels_close_to_source(jpeg_folder, tmp_path):
    images, labels, _ = load_split(cfg_for(jpeg_folder, tmp_path), "train")
    source = known_image(2, 3, smooth=True)
    assert labels[16 + 3] == 2
    assert np.abs(images[16 + 3].astype(int) - source).mean() < 3  # JPEG quality 95 is lossy, slightly


def test_val_folder_is_accepted_as_the_test_split(tmp_path):
    root = write_image_folder(tmp_path / "imagenet-like", {"train": 2, "val": 1})
    _, labels, names = load_split(cfg_for(root, tmp_path), "test")
    assert labels.tolist() == [0, 1, 2] and names == ["airplane", "cat", "dog"]


def test_tar_gz_unpacked_once_verified_and_reused(png_folder, tmp_path, capfd):
    archive = write_tar_gz(png_folder, tmp_path / "pngs.tar.gz")
    cfg = cfg_for(archive, tmp_path)
    images, labels, names = load_split(cfg, "train")
    assert f"data: unpacking {archive} into " in capfd.readouterr().err  # the first use's pause is explained
    assert names == ["airplane", "cat", "dog"] and np.array_equal(images[13], known_image(1, 5))
    unpacked = [p for p in (tmp_path / "cache").iterdir() if p.name.startswith("pngs-")]
    assert len(unpacked) == 1 and (unpacked[0] / ".unpacked.json").is_file()
    marker_time = (unpacked[0] / ".unpacked.json").stat().st_mtime_ns
    open_dataset.__globals__["_OPENED"].clear()  # a new process would not have it opened
    assert np.array_equal(load_split(cfg, "train")[0], images)
    assert (unpacked[0] / ".unpacked.json").stat().st_mtime_ns == marker_time  # reused, not re-extracted
    assert "data: unpacking" not in capfd.readouterr().err
    copy = tmp_path / "elsewhere" / "pngs.tar.gz"  # a copy (new path, new mtime) is the same data
    copy.parent.mkdir()
    copy.write_bytes(archive.read_bytes())
    open_dataset.__globals__["_OPENED"].clear()
    assert np.array_equal(load_split(cfg_for(copy, tmp_path), "train")[0], images)
    assert [p for p in (tmp_path / "cache").iterdir() if p.name.startswith("pngs-")] == unpacked
    assert (unpacked[0] / ".unpacked.json").stat().st_mtime_ns == marker_time
    # a damaged unpack (a file deleted) fails verification and is unpacked again
    os.remove(next((unpacked[0] / "pngs" / "train" / "cat").iterdir()))
    open_dataset.__globals__["_OPENED"].clear()
    assert np.bincount(load_split(cfg, "train")[1]).tolist() == [8, 8, 8]


def test_truncated_tar_gz_is_a_one_line_error_naming_it(png_folder, tmp_path):
    archive = write_tar_gz(png_folder, tmp_path / "broken.tar.gz")
    archive.write_bytes(archive.read_bytes()[: archive.stat().st_size // 2])
    with pytest.raises(ValueError, match="truncated or corrupt") as err:
        load_split(cfg_for(archive, tmp_path), "train")
    assert str(archive) in str(err.value) and "\n" not in str(err.value)
    assert not [p for p in (tmp_path / "cache").iterdir() if p.name.startswith("broken")]  # nothing half-unpacked kept


def test_decoded_arrays_are_cached_and_reused(jpeg_folder, tmp_path, capfd):
    cfg = cfg_for(jpeg_folder, tmp_path)
    first = load_split(cfg, "train")[0]
    assert f"data: decoding the {len(first)} train images of " in capfd.readouterr().err
    cached = list((tmp_path / "cache").glob("decoded-jpegs-train-*.npy"))
    assert len(cached) == 1
    cached[0].write_bytes(b"")  # would crash if read again...
    np.save(cached[0], first + 1)  # ...so plant recognisable content: a reload must come from the cache
    open_dataset.__globals__["_OPENED"].clear()
    assert np.array_equal(load_split(cfg, "train")[0], first + 1)
    assert "data: decoding" not in capfd.readouterr().err


def test_synthetic_is_seeded_and_sized():
    cfg = DataConfig(path="synthetic", synthetic=SyntheticConfig(num_classes=4, image_size=16, train_size=40, test_size=8))
    images, labels, names = load_split(cfg, "train")
    assert images.shape == (40, 16, 16, 3) and np.bincount(labels).tolist() == [10] * 4 and len(names) == 4
    other = DataConfig(path="synthetic", synthetic=SyntheticConfig(num_classes=4, image_size=16, train_size=40,
                                                                   test_size=8, seed=1))
    assert not np.array_equal(load_split(other, "train")[0], images)
    assert np.array_equal(load_split(cfg.model_copy(), "train")[0], images)


def test_val_split_disjoint_stratified_and_seeded():
    cfg = DataConfig(path="synthetic", synthetic=SyntheticConfig(train_size=1000), val_split=100)
    dataset = open_dataset(cfg)
    labels = dataset.splits["train"].labels
    from resnet_core.data.formats import split_indices
    train, val = split_indices(cfg, labels, "train"), split_indices(cfg, labels, "val")
    assert len(train) == 900 and len(val) == 100 and not set(train) & set(val)
    assert sorted(set(train) | set(val)) == list(range(1000))
    assert np.bincount(labels[val]).tolist() == [10] * 10  # 5000/45000-style: stratified by class
    assert np.array_equal(split_indices(cfg, labels, "val"), val)  # same images every call (fixed split seed)
    subset = split_indices(cfg.model_copy(update={"subset": 50}), labels, "train")
    assert len(subset) == 50 and np.bincount(labels[subset]).tolist() == [5] * 10 and not set(subset) & set(val)


def test_stratified_order_prefixes_are_balanced_for_uneven_classes():
    labels = np.array([0] * 60 + [1] * 30 + [2] * 10)
    first = labels[stratified_order(labels)[:50]]
    assert np.bincount(first).tolist() == [30, 15, 5]


def test_missing_path_names_it_and_the_layouts(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist") as err:
        load_split(DataConfig(path=str(tmp_path / "nowhere")), "train")
    assert "nowhere" in str(err.value) and "ImageFolder" in str(err.value) and "\n" not in str(err.value)


def test_a_download_that_fails_is_one_line_saying_where_the_files_go(tmp_path, monkeypatch):
    from torchvision.datasets import CIFAR10
    monkeypatch.setattr(CIFAR10, "url", "http://127.0.0.1:9/cifar-10-python.tar.gz")  # refused at once, offline too
    with pytest.raises(FileNotFoundError, match="data.download: CIFAR-10 could not be fetched into") as err:
        load_split(DataConfig(path=str(tmp_path / "dl"), download=True), "train")
    assert "cifar-10-batches-py" in str(err.value) and "\n" not in str(err.value)


def test_unknown_layout_names_the_path(tmp_path):
    (tmp_path / "random" / "stuff").mkdir(parents=True)
    (tmp_path / "random" / "other").mkdir()
    with pytest.raises(ValueError, match="no recognised layout") as err:
        load_split(cfg_for(tmp_path / "random", tmp_path), "train")
    assert str(tmp_path / "random") in str(err.value)
    # the train folder itself given: said so, with the folder to give
    (tmp_path / "ds" / "train" / "cat").mkdir(parents=True)
    with pytest.raises(ValueError, match=f"{tmp_path / 'ds' / 'train'} is one split of a dataset; name the folder "
                                         f"that holds it: {tmp_path / 'ds'}"):
        load_split(cfg_for(tmp_path / "ds" / "train", tmp_path), "train")


def test_empty_class_folder_is_named(png_folder, tmp_path):
    (png_folder / "train" / "zebra").mkdir()
    (png_folder / "test" / "zebra").mkdir()
    with pytest.raises(ValueError, match="empty class folder") as err:
        load_split(cfg_for(png_folder, tmp_path), "train")
    assert str(png_folder / "train" / "zebra") in str(err.value)


def test_one_small_image_leaves_a_folder_imagenet_sized(tmp_path):
    """The first file alone decided: a 40 px first image made a 96 px folder CIFAR-sized (a traceback in torch's
    collate, uncropped images of every size)."""
    from PIL import Image
    root = write_image_folder(tmp_path / "inet", {"train": 4, "test": 2}, suffix=".jpg", size=96)
    Image.new("RGB", (40, 30)).save(root / "train" / "airplane" / "0000.jpg")
    cfg = cfg_for(root, tmp_path, loader="torch", num_workers=0)
    assert not open_dataset(cfg).cifar_sized
    images, labels = next(iter(build_loader(cfg, "train", 4)))
    assert images.shape == (4, 3, 224, 224) and labels.shape == (4,)


def test_corrupt_jpeg_is_reported_with_its_path(jpeg_folder, tmp_path):
    bad = jpeg_folder / "train" / "dog" / "0003.jpg"
    bad.write_bytes(bad.read_bytes()[:200])  # truncated mid-scan
    with pytest.raises(ValueError, match="corrupt or unreadable image") as err:
        load_split(cfg_for(jpeg_folder, tmp_path), "train")
    assert str(bad) in str(err.value) and "\n" not in str(err.value)


def test_unknown_loader_and_split_names_are_errors(png_folder, tmp_path):
    with pytest.raises(ValueError, match="'tpu'.*gpu, dali, torch"):
        DataConfig(loader="tpu")
    with pytest.raises(ValueError, match="data.loader: unknown loader 'tpu'"):
        build_loader(DataConfig.model_construct(path="synthetic", loader="tpu"), "train", 8)
    with pytest.raises(ValueError, match="unknown split 'dev'"):
        load_split(DataConfig(path="synthetic"), "dev")
    with pytest.raises(ValueError, match="data.subset: 9999"):
        load_split(cfg_for(png_folder, tmp_path, subset=9999), "train")


def test_cache_goes_next_to_the_data_unless_its_folder_is_read_only(tmp_path):
    from resnet_core.data.formats import choose_cache_root
    data = tmp_path / "sets" / "data.tar.gz"
    data.parent.mkdir()
    assert choose_cache_root(None, data) == tmp_path / "sets" / ".resnet_core_cache"
    data.parent.chmod(0o555)  # like ../shared; as root, os.access alone would still say writable
    try:
        assert choose_cache_root(None, data) == Path.home() / ".cache" / "resnet_core"
    finally:
        data.parent.chmod(0o755)
    assert choose_cache_root(str(tmp_path / "mine"), data) == tmp_path / "mine"


def _unpack_and_count(archive: str, cache: str, start) -> int:
    """The fewest files seen in the unpacked tree while "training" on it for 2 s (as a trial reads its data)."""
    import time
    from resnet_core.data.formats import unpack_archive
    start.wait()
    target = unpack_archive(Path(archive), Path(cache))
    fewest, until = 10**9, time.monotonic() + 2
    while time.monotonic() < until:
        fewest = min(fewest, sum(len(names) for _, _, names in os.walk(target)))
        time.sleep(0.01)
    return fewest


def test_trials_that_unpack_one_archive_together_all_get_the_whole_tree(tmp_path):
    """Trials of a sweep start together on the same .tar.gz: a slower one must not replace (delete) the tree a
    faster one is already reading."""
    import multiprocessing
    import tarfile
    tree = tmp_path / "many" / "train" / "cat"
    tree.mkdir(parents=True)
    for i in range(3000):  # enough files that extraction takes a while, so the processes overlap
        (tree / f"{i:04d}.txt").write_text(str(i))
    with tarfile.open(tmp_path / "many.tar.gz", "w:gz") as tar:
        tar.add(tmp_path / "many", arcname="many")
    (tmp_path / "cache").mkdir()
    ctx = multiprocessing.get_context("spawn")  # a fork of a pytest-xdist worker (threads) hung in CI
    start = ctx.Manager().Barrier(4)
    with ctx.Pool(4) as pool:
        counts = pool.starmap(_unpack_and_count, [(str(tmp_path / "many.tar.gz"), str(tmp_path / "cache"), start)] * 4)
    assert counts == [3001] * 4  # the files and the completion marker, in every process
    assert len([p for p in (tmp_path / "cache").iterdir() if p.name.startswith("many-")]) == 1


def _decode_and_log(cfg: DataConfig, log: str, start) -> int:
    """A trial reading a JPEG folder's train split; every decode it does is logged (and takes 1 s, as 60k do)."""
    import time
    from resnet_core.data import formats
    decode = formats.decode_many

    def logged(files):
        with open(log, "a") as handle:
            handle.write(f"{os.getpid()}\n")
        time.sleep(1.0)
        return decode(files)
    formats.decode_many = logged
    start.wait()
    return int(formats.open_dataset(cfg).arrays("train").astype(np.int64).sum())


def test_trials_that_start_together_decode_a_jpeg_folder_once(jpeg_folder, tmp_path):
    """Packed trials on one machine: one decodes the split (on every core), the others wait and load its .npy."""
    import multiprocessing
    ctx = multiprocessing.get_context("spawn")
    start = ctx.Manager().Barrier(3)
    with ctx.Pool(3) as pool:
        sums = pool.starmap(_decode_and_log, [(cfg_for(jpeg_folder, tmp_path), str(tmp_path / "decodes"), start)] * 3)
    assert len((tmp_path / "decodes").read_text().split()) == 1
    assert len(set(sums)) == 1 and sums[0] > 0


def test_a_pool_worker_decodes_too(jpeg_folder):
    """A daemonic process (a multiprocessing.Pool worker, as a user's own launcher may be) may not start the
    decoding processes: it decodes in itself."""
    import multiprocessing
    from resnet_core.data.formats import DECODE_CHUNK, decode_many
    files = [str(next(Path(jpeg_folder).rglob("*.jpg")))] * (2 * DECODE_CHUNK + 1)  # enough for several processes
    with multiprocessing.get_context("spawn").Pool(1) as pool:
        images = pool.apply(decode_many, (files,))
    assert images.shape[0] == len(files) and (images == images[0]).all()
