"""The `torch` loader: torchvision transforms in DataLoader worker processes, the reference everyone knows.

Same plan as the other loaders (resnet_core.data.sampling): the batch sampler hands each worker the sample
index together with its crop offsets and flip, so augmentation is the torchvision functional ops applied
with our parameters: pad-4 crop + flip (paper Sec. 4.2), random-resized crop 224 + flip for ImageNet-sized
images, resize 256 + centre 224 at eval.
"""
from __future__ import annotations

import re

import numpy as np
import torch

from .config import DataError
from .sampling import CIFAR_PAD, EpochPlan, Loader, normalisation, rrc_box

IMAGENET_CROP, IMAGENET_RESIZE = 224, 256


class PlannedImages(torch.utils.data.Dataset):
    """Items are (index, flip, crop_x, crop_y, rrc) tuples from the plan, not bare indices."""

    def __init__(self, labels: np.ndarray, images: np.ndarray | None, files: list[str] | None, cifar_sized: bool):
        import torchvision.transforms.functional  # noqa: F401  here, not first in each worker: ~2 s a worker
        self.labels, self.images, self.files, self.cifar_sized = labels, images, files, cifar_sized
        self.mean, self.std = normalisation(cifar_sized)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, item: tuple) -> tuple[torch.Tensor, int, int]:
        import torchvision.transforms.functional as TF
        index, flip, crop_x, crop_y, rrc = item
        image = self._pil(index)
        if crop_x is not None:
            size = image.size[::-1]
            image = TF.crop(TF.pad(image, CIFAR_PAD, fill=0), crop_y, crop_x, *size)
        elif rrc is not None:
            top, left, h, w = rrc_box(rrc, image.height, image.width)
            image = TF.resized_crop(image, top, left, h, w, [IMAGENET_CROP] * 2, antialias=True)
        elif not self.cifar_sized:
            image = TF.center_crop(TF.resize(image, IMAGENET_RESIZE, antialias=True), IMAGENET_CROP)
        if flip:
            image = TF.hflip(image)
        return TF.normalize(TF.to_tensor(image), self.mean, self.std), int(self.labels[index]), index

    def collate(self, items: list[tuple[torch.Tensor, int, int]]) -> tuple[torch.Tensor, torch.Tensor]:
        """One batch; in a CIFAR-sized folder an image of another size is named (torch.stack named no file)."""
        try:
            images = torch.stack([image for image, _, _ in items])
        except RuntimeError:
            if self.files is None:
                raise
            from .formats import other_size
            (first, _, at), (odd, _, index) = items[0], next(i for i in items if i[0].shape != items[0][0].shape)
            raise other_size(self.files[index], odd.shape[:0:-1], self.files[at], first.shape[:0:-1]) from None
        return images, torch.tensor([label for _, label, _ in items])

    def _pil(self, index: int):
        from PIL import Image
        if self.images is not None:
            return Image.fromarray(self.images[index])
        from .formats import decode_image  # a corrupt file becomes a ValueError naming it
        return Image.fromarray(decode_image(self.files[index]))


class TorchLoader(Loader):
    def __init__(self, labels: np.ndarray, images: np.ndarray | None, files: list[str] | None, num_classes: int,
                 device, num_workers: int, **common):
        super().__init__(split_size=len(labels), **common)
        self.num_classes, self.device, self.num_workers = num_classes, torch.device(device), num_workers
        self.dataset = PlannedImages(labels, images, files, self.cifar_sized)

    def _run(self, plan: EpochPlan):
        loader = torch.utils.data.DataLoader(
            self.dataset, batch_sampler=list(_planned_batches(plan)), num_workers=self.num_workers,
            collate_fn=self.dataset.collate,
            pin_memory=self.device.type == "cuda", prefetch_factor=4 if self.num_workers else None)
        try:
            for images, labels in loader:
                yield images.to(self.device, non_blocking=True), labels.to(self.device, non_blocking=True)
        except ValueError as err:
            # A worker's error arrives wrapped in its traceback; keep the line that names the file.
            raise DataError(re.sub(r"^[\w.]*Error: ", "", str(err).strip().splitlines()[-1])) from None


def _planned_batches(plan: EpochPlan):
    def column(values, part):
        return [None] * (part.stop - part.start) if values is None else values[part].tolist()

    for part in plan.batches():
        part = slice(part.start, min(part.stop, len(plan.indices)))
        yield list(zip(plan.indices[part].tolist(), column(plan.flip, part), column(plan.crop_x, part),
                       column(plan.crop_y, part), [None] * (part.stop - part.start) if plan.rrc is None
                       else list(plan.rrc[part])))
