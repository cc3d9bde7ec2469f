"""The `gpu` loader: a whole CIFAR-sized split held on the device as uint8, augmented in a few batched kernels.

Paper Sec. 4.2 augmentation (pad 4, random 32x32 crop, horizontal flip) as one gather over index grids:
no per-sample Python, so on a GPU the loader costs microseconds per batch (the idea airbench made famous).
On CPU it runs the same code on CPU tensors (tests, laptops). ImageNet-sized arrays (synthetic) get the
random-resized crop as one batched affine `grid_sample`.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from .sampling import CIFAR_PAD, EpochPlan, Loader, normalisation, rrc_box

IMAGENET_CROP, IMAGENET_RESIZE = 224, 256


class GpuLoader(Loader):
    def __init__(self, images: np.ndarray, labels: np.ndarray, num_classes: int, device: str | torch.device,
                 **common):
        super().__init__(split_size=len(labels), **common)
        self.num_classes, self.device = num_classes, torch.device(device)
        # NHWC uint8 -> NCHW uint8 once: a quarter of float32's memory (all of CIFAR-10 is 184 MB).
        self.images = torch.from_numpy(np.ascontiguousarray(images)).to(self.device).permute(0, 3, 1, 2).contiguous()
        self.labels = torch.from_numpy(labels).to(self.device)
        mean, std = normalisation(self.cifar_sized)
        # (x - mean) / std as one fused x * scale + shift
        self.scale = 1 / (torch.tensor(std, device=self.device).view(1, 3, 1, 1) * 255)
        self.shift = -torch.tensor(mean, device=self.device).view(1, 3, 1, 1) * 255 * self.scale

    def _run(self, plan: EpochPlan):
        indices = torch.from_numpy(plan.indices).to(self.device)
        # The epoch's whole plan goes to the device once: no host-to-device copy (a host sync) per batch.
        aug = {k: torch.from_numpy(v).to(self.device) for k, v in
               dict(flip=plan.flip, crop_x=plan.crop_x, crop_y=plan.crop_y).items() if v is not None}
        height, width = self.images.shape[2:]
        if plan.rrc is not None:
            aug["boxes"] = torch.from_numpy(rrc_boxes(plan.rrc, height, width)).to(self.device)
        elif not self.cifar_sized:
            aug["boxes"] = centre_box(height, width, self.device).expand(len(plan.indices), 4)
            aug["flip"] = torch.zeros(len(plan.indices), device=self.device)
        for part in plan.batches():
            batch = self.images[indices[part]]
            if plan.crop_x is not None:
                batch = pad_crop_flip(batch, aug["crop_x"][part], aug["crop_y"][part], aug["flip"][part])
            elif "boxes" in aug:  # ImageNet-sized: random-resized crop (train) or resize + centre crop (eval)
                batch = affine_crop(batch, aug["boxes"][part], aug["flip"][part])
            yield self._normalise(batch), self.labels[indices[part]]

    def _normalise(self, batch: torch.Tensor) -> torch.Tensor:
        return torch.addcmul(self.shift, batch.float(), self.scale)


def pad_crop_flip(batch: torch.Tensor, crop_x: torch.Tensor, crop_y: torch.Tensor, flip: torch.Tensor) -> torch.Tensor:
    """Zero-pad by CIFAR_PAD, take the h x w window at (crop_y, crop_x), mirror where flip: one gather.

    The window is a flat index into each padded image, shared by the channels (an expanded view, not a copy),
    so it is one `gather` kernel whatever the batch size.
    """
    n, c, h, w = batch.shape
    padded = F.pad(batch, (CIFAR_PAD,) * 4)
    padded_w = w + 2 * CIFAR_PAD
    cols = torch.arange(w, device=batch.device)
    cols = torch.where(flip.bool()[:, None], w - 1 - cols, cols) + crop_x[:, None]  # (n, w)
    rows = torch.arange(h, device=batch.device) + crop_y[:, None]  # (n, h)
    window = (rows[:, :, None] * padded_w + cols[:, None, :]).view(n, 1, h * w).expand(n, c, h * w)
    return padded.view(n, c, -1).gather(2, window).view(n, c, h, w)


def rrc_boxes(rrc: np.ndarray, height: int, width: int) -> np.ndarray:
    """The random-resized-crop boxes (top, left, crop_h, crop_w) of equal-sized images, as float32 rows."""
    return np.array([rrc_box(r, height, width) for r in rrc], np.float32).reshape(-1, 4)


def centre_box(height: int, width: int, device) -> torch.Tensor:
    """Eval recipe: shorter side to 256, centre 224 crop, i.e. the central 224/256 of the shorter side."""
    side = min(height, width) * IMAGENET_CROP / IMAGENET_RESIZE
    return torch.tensor([[(height - side) / 2, (width - side) / 2, side, side]], device=device)


def affine_crop(batch: torch.Tensor, boxes: torch.Tensor, flip: torch.Tensor) -> torch.Tensor:
    """Crop each image to its box (top, left, h, w), resize to 224, mirror where flip: one grid_sample."""
    n, _, h, w = batch.shape
    top, left, crop_h, crop_w = boxes.unbind(1)
    sign = 1 - 2 * flip.float()
    theta = torch.zeros(n, 2, 3, device=batch.device)
    theta[:, 0, 0] = crop_w / w * sign  # align_corners=False coordinates: [-1, 1] spans the pixel edges
    theta[:, 0, 2] = (2 * left + crop_w) / w - 1
    theta[:, 1, 1] = crop_h / h
    theta[:, 1, 2] = (2 * top + crop_h) / h - 1
    grid = F.affine_grid(theta, (n, 3, IMAGENET_CROP, IMAGENET_CROP), align_corners=False)
    out = F.grid_sample(batch.float(), grid, mode="bilinear", padding_mode="border", align_corners=False)
    return out.round().clamp(0, 255)
