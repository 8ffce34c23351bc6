"""The competition metric: mean Dice over image x class pairs.

The Severstal metric is the mean over every (image, class) pair of
``2|X∩Y| / (|X|+|Y|)``, where a pair with both masks empty scores 1. It is *not* a
per-batch, per-image-over-4-channels or flattened-batch Dice. The post-processing rule lives in
:mod:`steel_ray.postprocess`.
"""
from __future__ import annotations

import numpy as np

__all__ = ["dice_from_counts", "dice_per_pair", "mean_dice", "dice_per_pair_torch"]


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

