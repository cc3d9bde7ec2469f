"""The `dali` loader: NVIDIA DALI pipelines, iterated through DALI's PyTorch plugin (DALIGenericIterator).

Image folders: fn.readers.file -> fn.decoders.image (nvJPEG via device="mixed" on a GPU, libjpeg-turbo on CPU)
-> pad-4 crop (fn.slice) or random-resized crop (fn.slice + fn.resize) -> fn.crop_mirror_normalize.
CIFAR arrays (pickles, synthetic): fn.external_source -> the same ops.
Randomness does not come from DALI's own RNGs: the crop offsets and flips of the shared plan
(resnet_core.data.sampling) enter through an external_source, so DALI, gpu and torch loaders apply the same
augmentation and a resumed run replays an epoch exactly. Without CUDA the pipeline runs in DALI's CPU mode
(device_id=None); see ../shared/docs/environment.md.
"""
from __future__ import annotations

import warnings

import numpy as np
import torch

from .sampling import CIFAR_PAD, EpochPlan, Loader, normalisation

IMAGENET_CROP, IMAGENET_RESIZE = 224, 256
PREFETCH = 2


def _dali():
    try:
        from nvidia import dali
        from nvidia.dali.plugin import pytorch as dali_torch
    except ImportError as err:
        raise ImportError(f"loader 'dali' needs NVIDIA DALI: pip install nvidia-dali-cuda120==2.4.0 ({err})") from None
    return dali, dali_torch


class PlanFeed:
    """external_source callback: batch `iteration` of the plan, always full (DALI pads, the iterator trims).

    Indices wrap modulo the plan so DALI's prefetch running past the end gets valid (discarded) batches.
    """

    def __init__(self, plan: EpochPlan, labels: np.ndarray, images: np.ndarray | None):
        self.plan, self.labels, self.images = plan, labels, images

    def __call__(self, info):
        n, size = len(self.plan.indices), self.plan.batch_size
        at = (np.arange(size) + info.iteration * size) % n
        out = [] if self.images is None else [list(self.images[self.plan.indices[at]])]
        if self.images is not None:
            out.append(list(self.labels[self.plan.indices[at]].reshape(-1, 1).astype(np.int32)))
        flip = np.zeros(size, np.int32) if self.plan.flip is None else self.plan.flip[at]
        out.append(list(flip))
        out.append(list(self._window(at)))
        return tuple(out)

    def _window(self, at: np.ndarray) -> np.ndarray:
        """Per sample 4 floats: CIFAR (anchor x, anchor y, 0, 0) in the unpadded image; ImageNet: rrc numbers."""
        if self.plan.crop_x is not None:
            anchor = np.stack([self.plan.crop_x[at], self.plan.crop_y[at]], 1) - CIFAR_PAD
            return np.concatenate([anchor, np.zeros_like(anchor)], 1).astype(np.float32)
        if self.plan.rrc is not None:
            return self.plan.rrc[at]
        return np.zeros((len(at), 4), np.float32)


class DaliLoader(Loader):
    def __init__(self, labels: np.ndarray, images: np.ndarray | None, files: list[str] | None, num_classes: int,
                 device, num_workers: int, **common):
        super().__init__(split_size=len(labels), **common)
        _dali()  # fail at build time, with the install hint, when DALI is missing
        self.labels, self.images, self.files = labels, images, files
        self.num_classes, self.device, self.num_threads = num_classes, torch.device(device), max(1, num_workers)

    def _run(self, plan: EpochPlan):
        dali, dali_torch = _dali()
        pipe = self._pipeline(plan)
        with warnings.catch_warnings():  # DALI warns about `size` without a reader; our plan sets it exactly
            warnings.simplefilter("ignore")
            kwargs = dict(reader_name="Reader") if self.images is None else dict(size=len(plan.indices))
            try:  # the iterator runs the first batch already: a broken file among its images fails here
                batches = dali_torch.DALIGenericIterator(
                    [pipe], ["images", "labels"], last_batch_policy=dali_torch.LastBatchPolicy.PARTIAL, **kwargs)
            except RuntimeError as err:
                raise self._explain(err, plan, 0) from None
        for number in range(len(plan)):
            try:
                out = next(batches)[0]
            except RuntimeError as err:
                raise self._explain(err, plan, number) from None
            yield (out["images"].to(self.device, non_blocking=True),
                   out["labels"].reshape(-1).long().to(self.device, non_blocking=True))

    def _pipeline(self, plan: EpochPlan):
        dali, _ = _dali()
        on_gpu = self.device.type == "cuda"
        feed = PlanFeed(plan, self.labels, self.images)

        @dali.pipeline_def(batch_size=plan.batch_size, num_threads=self.num_threads, prefetch_queue_depth=PREFETCH,
                           device_id=(self.device.index or 0) if on_gpu else None)
        def pipeline():
            fn, types = dali.fn, dali.types
            if self.images is None:
                files = [self.files[i] for i in plan.indices]
                jpegs, labels = fn.readers.file(files=files, labels=self.labels[plan.indices].tolist(),
                                                random_shuffle=False, name="Reader")
                flip, window = fn.external_source(source=feed, num_outputs=2, batch=True, batch_info=True)
                shape = fn.peek_image_shape(jpegs)
                images = fn.decoders.image(jpegs, device="mixed" if on_gpu else "cpu", output_type=types.RGB)
            else:
                images, labels, flip, window = fn.external_source(
                    source=feed, num_outputs=4, batch=True, batch_info=True, layout=["HWC", "", "", ""])
                shape = images.shape()
                images = images.gpu() if on_gpu else images
            images = self._augment(images, shape, flip, window, plan)
            return images, labels

        with warnings.catch_warnings():  # eval pipelines leave the crop window unused, on purpose
            warnings.simplefilter("ignore")
            pipe = pipeline()
            pipe.build()
        return pipe

    def _augment(self, images, shape, flip, window, plan: EpochPlan):
        dali, _ = _dali()
        fn, types = dali.fn, dali.types
        mean, std = normalisation(self.cifar_sized)
        crop = None
        if plan.crop_x is not None:  # zero padding happens on uint8, as torchvision pads before ToTensor
            height, width = fn.cast(shape[0], dtype=types.FLOAT), fn.cast(shape[1], dtype=types.FLOAT)
            images = fn.slice(images, window[0:2], fn.stack(width, height),  # a crop of the image's own size
                              axis_names="WH", normalized_anchor=False, normalized_shape=False,
                              out_of_bounds_policy="pad", fill_values=0)
        elif plan.rrc is not None:
            anchor, extent = _rrc_window(dali, shape, window)
            images = fn.slice(images, anchor, extent, axis_names="WH", normalized_anchor=False,
                              normalized_shape=False, out_of_bounds_policy="trim_to_shape")
            images = fn.resize(images, size=[IMAGENET_CROP] * 2, antialias=True)
        elif not self.cifar_sized:
            images = fn.resize(images, resize_shorter=IMAGENET_RESIZE, antialias=True)
            crop = (IMAGENET_CROP, IMAGENET_CROP)
        return fn.crop_mirror_normalize(
            images, crop=crop, mirror=flip, dtype=types.FLOAT, output_layout="CHW",
            mean=[m * 255 for m in mean], std=[s * 255 for s in std])

    def _explain(self, err: RuntimeError, plan: EpochPlan, number: int) -> Exception:
        """DALI's errors are long and name no file: name the broken file of the failing batch instead, or in a
        CIFAR-sized folder the image of another size (its batch cannot be one tensor)."""
        if self.files is None:
            return err
        from .formats import decode_image, other_size
        part = slice(number * plan.batch_size, (number + PREFETCH + 1) * plan.batch_size)  # prefetched too
        shapes: dict[tuple, str] = {}
        for index in plan.indices[part]:
            try:
                shapes.setdefault(decode_image(self.files[index]).shape, self.files[index])
            except ValueError as bad:
                return bad
        if self.cifar_sized and len(shapes) > 1:
            (shape, file), (odd_shape, odd) = list(shapes.items())[:2]  # in the batch's order
            return other_size(odd, odd_shape[1::-1], file, shape[1::-1])
        return err


def _rrc_window(dali, shape, window):
    """The sampling.rrc_box formula on DALI's side, where the image size is known only inside the pipeline."""
    from nvidia.dali import math as dmath
    fn, types = dali.fn, dali.types
    height, width = fn.cast(shape[0], dtype=types.FLOAT), fn.cast(shape[1], dtype=types.FLOAT)
    target, ratio = window[0] * height * width, dmath.exp(window[1])
    crop_w = dmath.min(width, dmath.max(1.0, dmath.sqrt(target * ratio)))
    crop_h = dmath.min(height, dmath.max(1.0, dmath.sqrt(target / ratio)))
    left, top = window[2] * (width - crop_w), window[3] * (height - crop_h)
    return fn.stack(left, top), fn.stack(crop_w, crop_h)

