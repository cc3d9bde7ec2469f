"""Dataset formats, detected from `data.path`: torchvision CIFAR-10 pickles, ImageFolder trees of JPEG/PNG,
a .tar.gz of such a tree (unpacked once into a cache, verified, reused), and seeded synthetic images.

CIFAR-sized images (<= 64 px, all one size) are decoded once into cached .npy arrays, so the gpu loader and the
ensemble evaluator get a whole split as one uint8 NHWC array; the dali and torch loaders read the files.
Paper Sec. 4.2: the 45k/5k train/val split is `val_split: 5000` (seeded, class-stratified).
"""
from __future__ import annotations

import hashlib
import json
import os
import pickle
import shutil
import subprocess
import sys
import tarfile
import zlib
import multiprocessing
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..locks import taking_turns
from .config import DataConfig, DataError, SyntheticConfig

LAYOUTS = ("'synthetic'", "a torchvision 'cifar-10-batches-py' folder (or its parent)",
           "an ImageFolder tree 'train/<class>/*.jpg' + 'test/<class>/*.jpg'", "a .tar.gz of such a tree")
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")
CIFAR_SIZED_MAX = 64  # larger images get the ImageNet recipe (random-resized crop 224) instead of pad-4 crops
SPLIT_SEED = 0  # fixed, not the training seed: every trial of a sweep must validate on the same 5k images
CIFAR_PICKLES = {"train": [f"data_batch_{i}" for i in range(1, 6)], "test": ["test_batch"]}
PROJECT_ROOT = Path(__file__).resolve().parents[2]


@dataclass
class SourceSplit:
    """All samples of one on-disk split: labels, plus either decoded pixels or image files (or both, lazily)."""
    labels: np.ndarray  # int64
    images: np.ndarray | None = None  # uint8 NHWC
    files: list[str] | None = None


@dataclass
class Dataset:
    """An opened dataset: class names in label order and its on-disk 'train' and 'test' splits."""
    root: str
    kind: str  # "synthetic" | "cifar-pickle" | "imagefolder"
    class_names: list[str]
    cifar_sized: bool
    splits: dict[str, SourceSplit]
    cache_root: Path | None = None
    _decoded: dict = field(default_factory=dict, repr=False)

    def arrays(self, source: str) -> np.ndarray:
        """uint8 NHWC pixels of a whole on-disk split, decoded once and cached as .npy for image folders."""
        split = self.splits[source]
        if split.images is None:
            if not self.cifar_sized:
                raise DataError(f"{self.root}: images larger than {CIFAR_SIZED_MAX} px are not held as one array "
                                 "(data.loader gpu holds CIFAR-sized data); set data.loader to dali or torch")
            split.images = _decoded_cache(split.files, self.cache_root, self.root, source)
        return split.images


# ---------------------------------------------------------------- opening


_OPENED: dict[tuple, Dataset] = {}


def open_dataset(cfg: DataConfig) -> Dataset:
    """The dataset at cfg.path, opened once per process (bench --compare opens it for three loaders)."""
    key = (cfg.path, cfg.download, cfg.cache_dir, cfg.synthetic, str(Path.cwd()))
    if key not in _OPENED:
        _OPENED[key] = _open(cfg)
    return _OPENED[key]


def _open(cfg: DataConfig) -> Dataset:
    if cfg.path == "synthetic":
        return synthetic_dataset(cfg.synthetic)
    path = resolve_path(cfg.path, cfg.download)
    cache_root = choose_cache_root(cfg.cache_dir, path)
    if path.is_file():
        if not path.name.endswith((".tar.gz", ".tgz")):
            raise DataError(f"data.path: {path} is a file but not a .tar.gz; accepted: {'; '.join(LAYOUTS)}")
        path = unpack_archive(path, cache_root)
    if cfg.download and _find_cifar_pickles(path) is None:
        _download_cifar(path)
    pickles = _find_cifar_pickles(path)
    if pickles is not None:
        return read_cifar_pickles(pickles)
    return read_image_folder(_find_image_folder(path), cache_root)


def resolve_path(raw: str, download: bool = False) -> Path:
    """A relative path is tried against the working directory, then the project root (SLURM jobs start elsewhere)."""
    path = Path(raw).expanduser()
    candidates = [path] if path.is_absolute() else list(dict.fromkeys([Path.cwd() / path, PROJECT_ROOT / path]))
    for candidate in candidates:
        if candidate.exists():
            return candidate.resolve()
    if download:
        return candidates[0]
    tried = " or ".join(str(c) for c in candidates)
    raise FileNotFoundError(f"data.path: {raw} does not exist (looked at {tried}); accepted: {'; '.join(LAYOUTS)}")


def choose_cache_root(cache_dir: str | None, data_path: Path) -> Path:
    """cache_dir if given; else next to the data when that folder is writable; else ~/.cache/resnet_core."""
    if cache_dir:
        root = Path(cache_dir).expanduser()
    elif _writable(data_path.parent):
        root = data_path.parent / ".resnet_core_cache"
    else:  # e.g. ../shared is read-only
        root = Path.home() / ".cache" / "resnet_core"
    root.mkdir(parents=True, exist_ok=True)
    return root


def _writable(folder: Path) -> bool:
    """os.access alone says yes to root everywhere; a folder without write bits (../shared) counts as read-only."""
    return os.access(folder, os.W_OK) and bool(folder.stat().st_mode & 0o222)


# ---------------------------------------------------------------- .tar.gz


def unpack_archive(archive: Path, cache_root: Path) -> Path:
    """Unpacks once into cache_root; a folder with a matching completion marker is reused as it is. Trials and
    ranks that start together take turns (a lock file): the first unpacks, the others find its tree."""
    stat = archive.stat()
    target = cache_root / f"{archive.name.split('.')[0]}-{archive_identity(archive)}"
    if _unpacked_ok(target, stat.st_size):
        return target
    with taking_turns(cache_root / f".{target.name}.lock"):
        if _unpacked_ok(target, stat.st_size):  # another process unpacked it while we waited
            return target
        say_first_use(f"unpacking {archive} into {target}")
        scratch = cache_root / f".{target.name}.partial-{os.getpid()}"
        shutil.rmtree(scratch, ignore_errors=True)
        try:
            count = _extract(archive, scratch)
            (scratch / ".unpacked.json").write_text(json.dumps({"archive_bytes": stat.st_size, "files": count}))
            shutil.rmtree(target, ignore_errors=True)  # a stale, unverified unpack
            os.replace(scratch, target)  # atomic: a reader that skipped the lock sees nothing or a whole tree
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
    return target


def say_first_use(doing: str) -> None:
    """The first use of a dataset pauses for a while (CIFAR-10's JPEGs: ~1 min on 2 cores): say why."""
    print(f"data: {doing} (once: later runs reuse it)", file=sys.stderr, flush=True)


def archive_identity(archive: Path, edge: int = 2**20) -> str:
    """Its size and the hash of its first and last MiB, not its path or mtime: copies of one archive (a
    checkout's copy, a node's local copy) share one unpacked tree; reading 2 MiB costs milliseconds even for
    ImageNet. A changed archive changes its size or its compressed bytes at both ends (gzip's trailer holds the
    CRC of the whole content)."""
    size = archive.stat().st_size
    digest = hashlib.sha1(str(size).encode())
    with open(archive, "rb") as handle:
        digest.update(handle.read(edge))
        handle.seek(max(0, size - edge))
        digest.update(handle.read(edge))
    return digest.hexdigest()[:12]


def _extract(archive: Path, into: Path) -> int:
    """GNU tar when present (2.6 s for CIFAR-10 against Python tarfile's 11 s); it refuses absolute and '..'
    member names by default, as tarfile's "data" filter does."""
    into.mkdir(parents=True)
    tar = shutil.which("tar")
    if tar:
        done = subprocess.run([tar, "-xzf", str(archive), "-C", str(into), "--no-same-owner"],
                              capture_output=True, text=True)
        if done.returncode != 0:
            reason = " ".join(done.stderr.split())[:300]
            raise DataError(f"{archive}: truncated or corrupt .tar.gz archive (tar: {reason})")
    else:
        try:
            with tarfile.open(archive, "r:gz") as handle:
                handle.extractall(into, filter="data")
        except (tarfile.TarError, EOFError, zlib.error, OSError) as err:
            raise DataError(f"{archive}: truncated or corrupt .tar.gz archive ({type(err).__name__}: {err})") from None
    return _count_files(into)


def _count_files(folder: Path) -> int:
    return sum(len(names) for _, _, names in os.walk(folder))


def _unpacked_ok(target: Path, archive_bytes: int) -> bool:
    marker = target / ".unpacked.json"
    if not marker.is_file():
        return False
    info = json.loads(marker.read_text())
    # a file count, not checksums: catches an interrupted copy or a deleted class folder in ~0.1 s
    return info["archive_bytes"] == archive_bytes and info["files"] == _count_files(target) - 1  # minus marker


# ---------------------------------------------------------------- torchvision CIFAR-10 pickles


def _find_cifar_pickles(path: Path) -> Path | None:
    for folder in (path, path / "cifar-10-batches-py"):
        if (folder / "data_batch_1").is_file():
            return folder
    return None


def _download_cifar(path: Path) -> None:
    from torchvision.datasets import CIFAR10  # only when the user asked for a download
    path.mkdir(parents=True, exist_ok=True)
    try:
        CIFAR10(str(path), train=True, download=True)
    except OSError as err:  # no network (URLError), a proxy, a full disk: say where the files must go instead
        raise FileNotFoundError(f"data.download: CIFAR-10 could not be fetched into {path} ({err}); fetch "
                                "cifar-10-python.tar.gz elsewhere and unpack its cifar-10-batches-py there") from None


def read_cifar_pickles(folder: Path) -> Dataset:
    """torchvision's layout: data_batch_1..5 and test_batch, each {b'data': N x 3072 CHW rows, b'labels'}."""
    splits = {name: _read_batches(folder, files) for name, files in CIFAR_PICKLES.items()}
    meta = folder / "batches.meta"
    if meta.is_file():
        with open(meta, "rb") as f:
            names = [n.decode() if isinstance(n, bytes) else n for n in entry(pickle.load(f, encoding="latin1"),
                                                                               "label_names")]
    else:
        names = [str(i) for i in range(int(splits["train"].labels.max()) + 1)]
    return Dataset(root=str(folder), kind="cifar-pickle", class_names=names, cifar_sized=True, splits=splits)


def entry(batch: dict, key: str):
    """``batch[key]``: the original (Python 2) files read as str keys; a subset saved from Python 3 may hold
    str or bytes keys."""
    return batch[key] if key in batch else batch[key.encode()]


def _read_batches(folder: Path, names: list[str]) -> SourceSplit:
    images, labels = [], []
    for name in names:
        file = folder / name
        if not file.is_file():
            raise FileNotFoundError(f"{file}: missing from the CIFAR-10 folder (expected {', '.join(names)})")
        try:
            with open(file, "rb") as f:
                batch = pickle.load(f, encoding="latin1")  # as torchvision: Python 2's byte strings become str
            images.append(np.asarray(entry(batch, "data"), np.uint8).reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))
            labels.append(np.asarray(entry(batch, "labels"), np.int64))
        except (pickle.UnpicklingError, EOFError, KeyError, ValueError) as err:
            raise DataError(f"{file}: not a CIFAR-10 pickle batch ({type(err).__name__}: {err})") from None
    return SourceSplit(labels=np.concatenate(labels), images=np.ascontiguousarray(np.concatenate(images)))


# ---------------------------------------------------------------- ImageFolder


def _find_image_folder(path: Path) -> Path:
    """The folder holding train/ (an archive usually wraps the tree in one top-level folder)."""
    if (path / "train").is_dir():
        return path
    subdirs = [d for d in path.iterdir() if d.is_dir() and not d.name.startswith(".")]
    if len(subdirs) == 1 and (subdirs[0] / "train").is_dir():
        return subdirs[0]
    if path.name in ("train", "test", "val") and (path.parent / "train").is_dir():
        raise DataError(f"data.path: {path} is one split of a dataset; name the folder that holds it: {path.parent}")
    raise DataError(f"data.path: {path} has no recognised layout; accepted: {'; '.join(LAYOUTS)}")


def read_image_folder(root: Path, cache_root: Path) -> Dataset:
    """train/<class>/* and test/<class>/* (or val/<class>/*, as ImageNet ships); labels = sorted class names."""
    test_dir = root / "test" if (root / "test").is_dir() else root / "val"
    if not test_dir.is_dir():
        raise DataError(f"{root}: has train/ but neither test/ nor val/; accepted: {'; '.join(LAYOUTS)}")
    class_names = _class_names(root / "train")
    if _class_names(test_dir) != class_names:
        raise DataError(f"{test_dir}: its class folders differ from {root / 'train'}'s")
    splits = {"train": _list_files(root / "train", class_names), "test": _list_files(test_dir, class_names)}
    return Dataset(root=str(root), kind="imagefolder", class_names=class_names,
                   cifar_sized=_is_cifar_sized(splits["train"].files), splits=splits, cache_root=cache_root)


def _class_names(split_dir: Path) -> list[str]:
    names = sorted(d.name for d in split_dir.iterdir() if d.is_dir() and not d.name.startswith("."))
    if not names:
        raise DataError(f"{split_dir}: no class folders (expected {split_dir}/<class>/*.jpg)")
    return names


def _list_files(split_dir: Path, class_names: list[str]) -> SourceSplit:
    files, labels = [], []
    for label, name in enumerate(class_names):
        found = sorted(e.path for e in os.scandir(split_dir / name) if e.name.lower().endswith(IMAGE_SUFFIXES))
        if not found:
            raise DataError(f"{split_dir / name}: empty class folder (no {'/'.join(IMAGE_SUFFIXES)} files)")
        files += found
        labels += [label] * len(found)
    return SourceSplit(labels=np.asarray(labels, np.int64), files=files)


SIZE_SAMPLE = 32  # images whose headers decide whether a folder is CIFAR-sized


def _is_cifar_sized(files: list[str]) -> bool:
    """Whether most of a sample across the classes are CIFAR-sized: ImageNet has some small images, and the first
    file alone made a whole ImageNet-sized folder CIFAR-sized (uncropped images of every size, then a traceback).
    A CIFAR-sized folder with an image of another size is an error naming it: when the gpu loader decodes the
    folder, when the dali or torch loader meets it in a batch."""
    from PIL import Image
    sample = files[::max(1, len(files) // SIZE_SAMPLE)][:SIZE_SAMPLE]
    small = 0
    for file in sample:
        try:
            with Image.open(file) as img:  # reads the header only
                small += max(img.size) <= CIFAR_SIZED_MAX
        except OSError as err:
            raise DataError(f"{file}: corrupt or unreadable image ({err})") from None
    return 2 * small > len(sample)


def other_size(file: str, size: tuple[int, int], reference: str, reference_size: tuple[int, int]) -> DataError:
    """The error of an image whose (width, height) differs from another's in a CIFAR-sized folder, which every
    loader batches uncropped to a size."""
    return DataError(f"{file}: {size[0]}x{size[1]} px, but {reference} is {reference_size[0]}x{reference_size[1]}; "
                     "CIFAR-sized folders need one image size")


def decode_image(file: str) -> np.ndarray:
    """One image as uint8 HWC RGB; a corrupt file is a one-line error naming it."""
    from PIL import Image
    try:
        with Image.open(file) as img:
            return np.asarray(img.convert("RGB"))
    except (OSError, SyntaxError, ValueError) as err:  # PIL raises all three for broken files
        raise DataError(f"{file}: corrupt or unreadable image ({err})") from None


def _decoded_cache(files: list[str], cache_root: Path, root: str, source: str) -> np.ndarray:
    """Decodes a split's files into one array, saved as .npy so the next process loads it in a blink."""
    listing = []
    for file in files:
        stat = os.stat(file)
        listing.append(f"{file}|{stat.st_size}|{stat.st_mtime_ns}")
    key = hashlib.sha1("\n".join(listing).encode()).hexdigest()[:16]
    cached = cache_root / f"decoded-{Path(root).name}-{source}-{key}.npy"
    if cached.is_file():
        return np.load(cached)
    with taking_turns(cache_root / f".{cached.name}.lock"):  # packed trials: one decodes, not each
        if cached.is_file():
            return np.load(cached)
        say_first_use(f"decoding the {len(files)} {source} images of {root} into {cached}")
        images = decode_many(files)
        scratch = cached.with_suffix(f".partial-{os.getpid()}.npy")
        np.save(scratch, images)
        os.replace(scratch, cached)  # atomic: a reader that skipped the lock never reads half a file
    return images


DECODE_CHUNK = 1000


def decode_many(files: list[str]) -> np.ndarray:
    """All files as one uint8 NHWC array, decoded in chunks by one process per core.

    Processes, not threads: a 32x32 JPEG decodes in ~30 us, so the GIL-holding Python around each decode
    dominates; measured on 2 cores for 20k CIFAR JPEGs: threads 4.0 s, serial 3.1 s, 2 processes 1.8 s.
    """
    chunks = [files[i:i + DECODE_CHUNK] for i in range(0, len(files), DECODE_CHUNK)]
    workers = min(len(chunks), os.cpu_count() or 1)
    if multiprocessing.current_process().daemon:  # a multiprocessing.Pool worker may not start processes
        workers = 1
    if workers <= 1:
        parts = [_decode_chunk(chunk) for chunk in chunks]
    else:
        with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("fork")) as pool:
            parts = list(pool.map(_decode_chunk, chunks))
    shapes = {part.shape[1:] for part in parts}
    if len(shapes) > 1:
        raise DataError(f"{Path(files[0]).parent.parent}: images of several sizes {sorted(shapes)}; "
                         "CIFAR-sized folders need one image size")
    return np.concatenate(parts)


def _decode_chunk(files: list[str]) -> np.ndarray:
    first = decode_image(files[0])
    out = np.empty((len(files), *first.shape), np.uint8)
    out[0] = first
    for i, file in enumerate(files[1:], 1):
        image = decode_image(file)
        if image.shape != first.shape:
            raise other_size(file, image.shape[1::-1], files[0], first.shape[1::-1])
        out[i] = image
    return out


# ---------------------------------------------------------------- synthetic


def synthetic_dataset(cfg: SyntheticConfig) -> Dataset:
    """Seeded noise with a per-class colour, so a model can learn it (smoke runs) and pixels are reproducible."""
    rng = np.random.default_rng(cfg.seed)
    colours = rng.integers(0, 256, (cfg.num_classes, 1, 1, 3))

    def make(n: int) -> SourceSplit:
        labels = rng.permutation(np.arange(n) % cfg.num_classes).astype(np.int64)
        noise = rng.integers(0, 256, (n, cfg.image_size, cfg.image_size, 3), dtype=np.uint8)  # uint8: 50k in 0.3 s
        images = (noise >> 1) + (colours[labels] >> 1).astype(np.uint8)  # mean of noise and colour, no overflow
        return SourceSplit(labels=labels, images=images)

    return Dataset(root="synthetic", kind="synthetic", class_names=[f"class_{i}" for i in range(cfg.num_classes)],
                   cifar_sized=cfg.image_size <= CIFAR_SIZED_MAX,
                   splits={"train": make(cfg.train_size), "test": make(cfg.test_size)})


# ---------------------------------------------------------------- train / val / test selection


def split_indices(cfg: DataConfig, labels: np.ndarray, split: str) -> np.ndarray:
    """Sorted positions into the on-disk split (train source for train/val, test source for test)."""
    if split == "test":
        return _take(labels, cfg.test_subset, "data.test_subset", skip=0)
    if cfg.val_split >= len(labels):
        raise DataError(f"data.val_split: {cfg.val_split} leaves no train images (the train split has {len(labels)})")
    if split == "val":
        if cfg.val_split == 0:
            raise DataError("split 'val' is empty: set data.val_split (the paper holds out 5000)")
        return np.sort(stratified_order(labels)[: cfg.val_split])
    return _take(labels, cfg.subset, "data.subset", skip=cfg.val_split)


def _take(labels: np.ndarray, count: int | None, key: str, skip: int) -> np.ndarray:
    order = stratified_order(labels)[skip:]
    if count is not None:
        if count > len(order):
            raise DataError(f"{key}: {count} is more than the {len(order)} images available")
        order = order[:count]
    return np.sort(order)


def stratified_order(labels: np.ndarray) -> np.ndarray:
    """A seeded permutation whose every prefix holds the classes in proportion (class-stratified / balanced).

    Each sample's key is its (random) rank within its class divided by the class size; sorting by it
    interleaves the classes, so the first 5000 of CIFAR-10 are 500 per class.
    """
    rng = np.random.default_rng(SPLIT_SEED)
    key = np.empty(len(labels))
    for c in np.unique(labels):
        members = np.flatnonzero(labels == c)
        key[members] = (rng.permutation(len(members)) + rng.uniform(0.0, 1.0)) / len(members)
    return np.argsort(key, kind="stable")
