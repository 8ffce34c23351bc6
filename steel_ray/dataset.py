"""Torch dataset of Severstal images and masks, albumentations pipelines and a class-balancing sampler."""
from __future__ import annotations

import contextlib
import logging
import os
from pathlib import Path

import albumentations as A
import cv2
import numpy as np
import torch
from torch.utils.data import Dataset, Sampler

from . import rle
from .config import registry
from .data import N_CLASSES, DataError

__all__ = ["SteelDataset", "build_transforms", "BalancedSampler", "StepsSampler", "read_image", "SAMPLERS"]

# the config's sampler choices: none (shuffle), or a BalancedSampler mode; config validation reads these
SAMPLERS = registry("sampler")  # implemented by BalancedSampler (none: plain shuffling)

log = logging.getLogger(__name__)
MEAN = (0.485, 0.456, 0.406)


def _has_jpeg_end(path) -> bool:
    with open(path, "rb") as f:
        f.seek(0, os.SEEK_END)
        f.seek(max(0, f.tell() - 16))
        return b"\xff\xd9" in f.read()
STD = (0.229, 0.224, 0.225)


@contextlib.contextmanager
def _quiet_stderr():
    """Silence file descriptor 2 (libjpeg prints "Premature end of JPEG file" there, not through Python)."""
    try:
        saved, null = os.dup(2), os.open(os.devnull, os.O_WRONLY)
    except OSError:
        yield
        return
    os.dup2(null, 2)
    try:
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(null)


def read_image(path: str | Path, shape: tuple[int, int] | None = None, quiet: bool = False) -> np.ndarray:
    """Read an image as HxWx3 uint8 RGB; an unreadable or wrongly sized file names itself.

    ``quiet``: the decoder's own stderr chatter is silenced and a truncated JPEG (no end-of-image
    marker) is logged once, by name, as a warning of ours (single-threaded callers only).
    """
    if quiet:
        with _quiet_stderr():
            img = cv2.imread(str(path), cv2.IMREAD_COLOR)
        if img is not None and str(path).lower().endswith((".jpg", ".jpeg")) and not _has_jpeg_end(path):
            log.warning("%s: truncated JPEG (no end-of-image marker); the decoded part is used, the rest is grey", path)
    else:
        img = cv2.imread(str(path), cv2.IMREAD_COLOR)
    if img is None:
        raise DataError(f"{path}: unreadable or corrupt image")
    if shape is not None and img.shape[:2] != tuple(shape):
        raise DataError(f"{path}: image is {img.shape[0]}x{img.shape[1]}, expected {shape[0]}x{shape[1]}")
    return cv2.cvtColor(img, cv2.COLOR_BGR2RGB)


class DefectBlackout(A.MaskDropout):
    """albumentations' MaskDropout (the 1st-place Severstal team's "defect blackout": a defect's
    region set to black in the image and removed from every class's mask) on our (H, W, 4) masks.

    The library labels one-channel instance masks only (``cv2.connectedComponents`` refuses 4
    channels), so the objects here are the connected components of the union of the classes; the
    rest (how many objects, which, the fill) is the library's.
    """

    def get_params_dependent_on_data(self, params, data):
        mask = data["mask"]
        union = (mask.max(-1) if mask.ndim == 3 else mask) > 0
        return super().get_params_dependent_on_data(params, {**data, "mask": union.astype(np.uint8)})


def build_transforms(
    train: bool,
    crop: tuple[int, int] | None = None,
    resize: tuple[int, int] | None = None,
    hflip: float = 0.5,
    vflip: float = 0.5,
    brightness_contrast: float = 0.5,
    mask_dropout: float = 0.0,
) -> A.Compose:
    """Image+mask pipeline. Train: resize, crop preferring a defect, flips, brightness/contrast,
    then (``mask_dropout`` > 0) a defect blacked out with that probability (:class:`DefectBlackout`).

    Validation and inference: resize only (full image). Both end with ImageNet normalisation.
    """
    ops = []
    if resize:
        ops.append(A.Resize(height=int(resize[0]), width=int(resize[1])))
    if train:
        if crop:
            ops.append(A.CropNonEmptyMaskIfExists(height=int(crop[0]), width=int(crop[1])))
        ops += [
            A.HorizontalFlip(p=hflip),
            A.VerticalFlip(p=vflip),
            A.RandomBrightnessContrast(brightness_limit=0.2, contrast_limit=0.2, p=brightness_contrast),
        ]
        if mask_dropout > 0:
            ops.append(DefectBlackout(max_objects=1, fill=0, fill_mask=0, p=mask_dropout))
    ops.append(A.Normalize(mean=MEAN, std=STD))
    return A.Compose(ops)


class SteelDataset(Dataset):
    """Items: ``{"image": (3,H,W) float, "mask": (4,H,W) float, "presence": (4,) float, "index": int}``.

    ``rles`` is an (N, 4) array of RLE strings (``None`` for unlabeled test images: the mask is
    then all zeros). Presence labels are computed after the transform, so a crop that misses a
    defect says "absent". ``full_size_mask=True`` (validation): the transform touches the image
    only and the mask stays at the original resolution, where the metric is computed.
    """

    def __init__(self, images_dir, image_ids, rles=None, shape=None, transform=None, full_size_mask=False):
        self.full_size_mask = full_size_mask
        self.images_dir = Path(images_dir)
        self.image_ids = list(image_ids)
        self.rles = rles
        self.shape = tuple(shape) if shape is not None else None
        self.transform = transform

    def __len__(self) -> int:
        return len(self.image_ids)

    def __getitem__(self, i: int) -> dict:
        img = read_image(self.images_dir / self.image_ids[i], self.shape)
        h, w = img.shape[:2]
        mask = np.zeros((h, w, N_CLASSES), np.uint8)
        if self.rles is not None:
            for c in range(N_CLASSES):
                s = self.rles[i][c]
                if s:
                    mask[..., c] = rle.decode(s, (h, w))
        if self.transform is not None and self.full_size_mask:
            img = self.transform(image=img)["image"]  # image-only (resize/normalise) transform
        elif self.transform is not None:
            out = self.transform(image=img, mask=mask)
            img, mask = out["image"], out["mask"]
        else:
            img = img.astype(np.float32) / 255.0
        image = torch.from_numpy(np.ascontiguousarray(img.transpose(2, 0, 1), dtype=np.float32))
        m = torch.from_numpy(np.ascontiguousarray(mask.transpose(2, 0, 1))).float()
        return {"image": image, "mask": m, "presence": (m.amax(dim=(1, 2)) > 0).float(), "index": i}


class BalancedSampler(Sampler):
    """Balances images by their rarest present class (group 0 = no defect).

    Modes (as catalyst's BalanceClassSampler, extended to multi-label images):
    ``upsample``: every group drawn as often as the largest; ``downsample``: as the smallest;
    ``weighted``: an epoch of N draws with equal expected share per group. Deterministic for
    ``seed`` and the epoch set with :meth:`set_epoch`.
    """

    def __init__(self, presence: np.ndarray, mode: str = "upsample", seed: int = 0):
        if mode not in SAMPLERS or mode == "none":
            raise ValueError(f"sampler mode {mode!r} is not one of {list(SAMPLERS[1:])}")
        presence = np.asarray(presence, dtype=bool)
        freq = presence.sum(axis=0)
        # rarest present class wins; images with no defect form group 0
        order = np.argsort(freq, kind="stable")
        group = np.zeros(len(presence), dtype=np.int64)
        for c in order[::-1]:
            group[presence[:, c]] = c + 1
        self.groups = [np.flatnonzero(group == g) for g in range(N_CLASSES + 1)]
        self.groups = [g for g in self.groups if g.size]
        self.mode, self.seed, self.epoch, self.n = mode, seed, 0, len(presence)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _per_group(self) -> int:
        sizes = [g.size for g in self.groups]
        if self.mode == "upsample":
            return max(sizes)
        if self.mode == "downsample":
            return min(sizes)
        return int(np.ceil(self.n / len(self.groups)))

    def __len__(self) -> int:
        return self._per_group() * len(self.groups)

    def __iter__(self):
        rng = np.random.default_rng([self.seed, self.epoch])
        k = self._per_group()
        picks = []
        for g in self.groups:
            if self.mode == "upsample":  # every member at least once, the rest drawn with replacement
                extra = rng.choice(g, k - g.size, replace=True) if k > g.size else g[:0]
                picks.append(np.concatenate([g, extra]))
            elif self.mode == "downsample":
                picks.append(rng.choice(g, k, replace=False))
            else:
                picks.append(rng.choice(g, k, replace=True))
        idx = np.concatenate(picks)
        return iter(rng.permutation(idx).tolist())


class StepsSampler(Sampler):
    """An epoch of exactly ``num_samples`` draws, for epochs defined by optimizer steps.

    Chains whole passes of ``base`` (a :class:`BalancedSampler`, re-seeded per pass) or, without
    one, whole random permutations of the ``n`` items, and cuts the chain at ``num_samples``:
    every item is seen about equally often, whatever the data set's size. Deterministic for
    ``seed`` and the epoch set with :meth:`set_epoch`.
    """

    def __init__(self, n: int, num_samples: int, base: BalancedSampler | None = None, seed: int = 0):
        if n < 1 or num_samples < 1:
            raise ValueError(f"n >= 1 and num_samples >= 1 must hold, but got (n={n}, num_samples={num_samples})")
        self.n, self.num_samples, self.base, self.seed, self.epoch = n, num_samples, base, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.num_samples

    def __iter__(self):
        rng = np.random.default_rng([self.seed, self.epoch, 7])
        out: list[int] = []
        rep = 0
        while len(out) < self.num_samples:
            if self.base is not None:
                self.base.set_epoch(self.epoch * 100_003 + rep)
                out.extend(iter(self.base))
            else:
                out.extend(rng.permutation(self.n).tolist())
            rep += 1
        return iter(out[: self.num_samples])
