"""The competition metric (mean Dice over image x class pairs) and post-processing primitives.

The Severstal metric is the mean over every (image, class) pair of
``2|X∩Y| / (|X|+|Y|)``, where a pair with both masks empty scores 1. It is *not* a
per-batch, per-image-over-4-channels or flattened-batch Dice.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
from scipy import ndimage

__all__ = [
    "dice_from_counts",
    "dice_per_pair",
    "mean_dice",
    "dice_per_pair_torch",
    "threshold",
    "remove_small",
    "gate",
    "fill_holes",
    "PostProcess",
]


def dice_from_counts(inter, pred_area, true_area):
    """Dice from intersection and areas (arrays broadcast); empty/empty scores 1.

    This is the single definition of the per-pair score: every fast path (histogram
    search, torch validation) reduces to these three counts.
    """
    inter = np.asarray(inter, dtype=np.float64)
    denom = np.asarray(pred_area, dtype=np.float64) + np.asarray(true_area, dtype=np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        d = np.where(denom > 0, 2.0 * inter / np.where(denom > 0, denom, 1.0), 1.0)
    return d


def _counts(pred: np.ndarray, truth: np.ndarray):
    pred = np.asarray(pred, dtype=bool)
    truth = np.asarray(truth, dtype=bool)
    if pred.shape != truth.shape:
        raise ValueError(f"prediction shape {pred.shape} != truth shape {truth.shape}")
    axes = (-2, -1)
    return (pred & truth).sum(axes), pred.sum(axes), truth.sum(axes)


def dice_per_pair(pred: np.ndarray, truth: np.ndarray) -> np.ndarray:
    """Dice of every pair: boolean masks ``(..., H, W)`` -> scores ``(...)``."""
    return dice_from_counts(*_counts(pred, truth))


def mean_dice(pred: np.ndarray, truth: np.ndarray) -> float:
    """The competition score of boolean masks ``(N, C, H, W)`` (or any ``(..., H, W)``)."""
    return float(dice_per_pair(pred, truth).mean())


def dice_per_pair_torch(pred, truth):
    """Torch version of :func:`dice_per_pair` for validation on the training device.

    ``pred`` and ``truth`` are boolean (or 0/1) tensors ``(N, C, H, W)``; returns ``(N, C)``
    float64 scores. Counts are summed in int64 so large images stay exact.
    """
    import torch

    pred = pred.bool()
    truth = truth.bool()
    inter = (pred & truth).sum(dim=(-2, -1), dtype=torch.int64)
    denom = pred.sum(dim=(-2, -1), dtype=torch.int64) + truth.sum(dim=(-2, -1), dtype=torch.int64)
    d = 2.0 * inter.double() / denom.clamp(min=1).double()
    return torch.where(denom > 0, d, torch.ones_like(d))


def threshold(prob: np.ndarray, t: float) -> np.ndarray:
    """Pixel threshold: on where ``prob >= t``. uint8 input is read as ``prob/255``."""
    prob = np.asarray(prob)
    if prob.dtype == np.uint8:
        return prob >= _u8_level(t)
    return prob >= t


def _u8_level(t: float) -> int:
    """Smallest uint8 level ``k`` with ``k/255 >= t`` (exact, no float drift at k/255)."""
    k = int(np.ceil(round(float(t) * 255.0, 9)))
    return min(max(k, 0), 256)


def remove_small(mask: np.ndarray, min_area: float) -> np.ndarray:
    """Whole-mask minimum area: empty every ``(..., H, W)`` mask whose area < ``min_area``."""
    mask = np.asarray(mask, dtype=bool)
    keep = mask.sum(axis=(-2, -1)) >= min_area
    return mask & keep[..., None, None]


def gate(mask: np.ndarray, cls_prob, cls_threshold: float) -> np.ndarray:
    """Classifier gate: empty masks whose presence probability < ``cls_threshold``."""
    mask = np.asarray(mask, dtype=bool)
    keep = np.asarray(cls_prob) >= cls_threshold
    return mask & np.asarray(keep)[..., None, None]


def fill_holes(mask: np.ndarray) -> np.ndarray:
    """Fill holes of each 2-D mask in ``(..., H, W)`` (scipy's binary_fill_holes)."""
    mask = np.asarray(mask, dtype=bool)
    if mask.ndim == 2:
        return ndimage.binary_fill_holes(mask)
    out = np.empty_like(mask)
    for idx in np.ndindex(mask.shape[:-2]):
        out[idx] = ndimage.binary_fill_holes(mask[idx])
    return out


@dataclass(frozen=True)
class PostProcess:
    """One class's post-processing, applied in this order: threshold, fill holes, min area, gate."""

    pixel_threshold: float = 0.5
    min_area: float = 0.0
    cls_threshold: float = 0.0
    fill_holes: bool = False
    gate_source: str = "segmentation"  # which presence the caller passes as cls_prob (see ppsearch.GATE_SOURCES)

    def apply(self, prob: np.ndarray, cls_prob=None) -> np.ndarray:
        """``prob`` is ``(..., H, W)`` (uint8 = prob*255, or float); ``cls_prob`` is ``(...)``."""
        mask = threshold(prob, self.pixel_threshold)
        if self.fill_holes:
            mask = fill_holes(mask)
        mask = remove_small(mask, self.min_area)
        if cls_prob is not None and self.cls_threshold > 0:
            mask = gate(mask, cls_prob, self.cls_threshold)
        return mask

    def to_dict(self) -> dict:
        return asdict(self)
