"""Planted OOF pools written as real Parquet runs (no training needed)."""
from __future__ import annotations

import numpy as np

from steel_ray import oof, rle
from steel_ray.data import TrainSet, folds_hash


def make_truth(rng, n=60, shape=(32, 64), p_defect=0.5):
    masks = np.zeros((n, 4, *shape), bool)
    for i in range(n):
        for c in range(4):
            if rng.random() < p_defect / 2:
                h, w = rng.integers(3, 10), rng.integers(4, 24)
                y, x = rng.integers(0, shape[0] - h), rng.integers(0, shape[1] - w)
                masks[i, c, y:y + h, x:x + w] = True
    return masks


def write_run(run, masks, models: dict, n_folds=3, seed=0, configs=None):
    """``models``: model_id -> (probs (N,4,H,W) float in [0,1], cls (N,4)); ``configs``: model_id -> the
    flat config written into its OOF files' metadata."""
    n, _, h, w = masks.shape
    ids = [f"{i:09x}.jpg" for i in range(n)]
    rles = np.array([[rle.encode(masks[i, c]) for c in range(4)] for i in range(n)], dtype=object)
    ts = TrainSet(run, run, ids, rles, (h, w))
    folds = np.arange(n) % n_folds
    fh = folds_hash(ids, folds)
    oof.write_truth(run, ts, folds, fh)
    for mid, (probs, cls) in models.items():
        for k in range(n_folds):
            idx = np.flatnonzero(folds == k)
            oof.write_oof(run, mid, k, [ids[i] for i in idx], oof.quantize(probs[idx]), cls[idx], h, w, fh, (configs or {}).get(mid))
    return ids, folds


def signal_model(rng, masks, strength=0.6, noise=0.35):
    p = masks * strength + rng.random(masks.shape) * noise
    cls = np.clip(masks.any((2, 3)) * 0.6 + rng.random(masks.shape[:2]) * 0.4, 0, 1)
    return np.clip(p, 0, 1), cls.astype(np.float32)


def noise_model(rng, masks):
    return rng.random(masks.shape) * rng.uniform(0.5, 1.0), rng.random(masks.shape[:2]).astype(np.float32)


def blob_noise_model(rng, masks):
    """Confident random rectangles unrelated to the truth, with random presence scores."""
    p = rng.random(masks.shape) * 0.3
    n, c, h, w = masks.shape
    for i in range(n):
        for k in range(c):
            if rng.random() < 0.5:
                bh, bw = rng.integers(3, 12), rng.integers(4, 30)
                y, x = rng.integers(0, h - bh), rng.integers(0, w - bw)
                p[i, k, y:y + bh, x:x + bw] = rng.uniform(0.4, 1.0)
    return p, rng.random((n, c)).astype(np.float32)


def write_classifiers(run, masks, classifiers: dict, n_folds=3):
    """``classifiers``: model_id -> presence (N, 4) in [0, 1], written as task=classify OOF files."""
    n, _, h, w = masks.shape
    ids = [f"{i:09x}.jpg" for i in range(n)]
    folds = np.arange(n) % n_folds
    fh = folds_hash(ids, folds)
    for mid, pres in classifiers.items():
        for k in range(n_folds):
            idx = np.flatnonzero(folds == k)
            with oof.OOFWriter(run, mid, k, h, w, fh, {"task": "classify"}, task="classify") as wr:
                wr.add([ids[i] for i in idx], None, pres[idx])


def false_positive_model(rng, masks):
    """Finds every true defect but also paints a confident blob on every empty pair, with a presence
    score that does not tell the two apart: only a gate from elsewhere can remove its false positives."""
    p = masks * 0.8 + rng.random(masks.shape) * 0.1
    n, c, h, w = masks.shape
    for i in range(n):
        for k in range(c):
            if not masks[i, k].any():
                bh, bw = rng.integers(3, 10), rng.integers(4, 24)
                y, x = rng.integers(0, h - bh), rng.integers(0, w - bw)
                p[i, k, y:y + bh, x:x + bw] = 0.8 + rng.random((bh, bw)) * 0.1
    return np.clip(p, 0, 1), rng.uniform(0.5, 1.0, (n, c)).astype(np.float32)
