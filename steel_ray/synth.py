"""Synthetic Severstal-layout data set: steel-like texture with four imitation defect families.

Usage::

    python -m steel_ray.synth data/synth --n-train 200 --n-test 20 [--height 256 --width 1600 --seed 0]

Writes ``OUT/train_images/*.jpg``, ``OUT/train.csv`` (new format, defective pairs only),
``OUT/test_images/*.jpg`` and ``OUT/test_labels.csv`` (old format: every image x class pair,
empty where no defect) for scoring a submission. The real Kaggle data cannot be downloaded
here; the loaders that read this folder are the ones that read the real one.

Class frequencies follow the real train set (image has class 1/2/3/4: 7.1%/2.0%/41%/6.4%,
47% of images defect-free). Masks of different classes never overlap. Hard cases: ~15% of
defects are faint, ~30% of images carry unlabeled defect-like texture (smudges, specks,
full-width rolling marks), so a better model scores visibly better.
"""
from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
from scipy.ndimage import gaussian_filter1d

from . import rle
from .console import progress
from .io import atomic_path, atomic_write_text

log = logging.getLogger(__name__)

P_EMPTY = 5902 / 12568
# P(class present | image has a defect), from the real per-class image counts.
P_CLASS_GIVEN_DEFECT = np.array([897, 247, 5150, 801]) / (12568 - 5902)
# One primary class per defective image, then each other class as a secondary defect with
# the probability that makes every marginal match (real: 7,095 masks on 6,666 images).
P_PRIMARY = P_CLASS_GIVEN_DEFECT / P_CLASS_GIVEN_DEFECT.sum()
P_SECONDARY = (P_CLASS_GIVEN_DEFECT - P_PRIMARY) / (1 - P_PRIMARY)
P_FAINT = 0.15
P_DISTRACTOR = 0.30


def _texture(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """Rolled-steel background: horizontal streaks, low-frequency shading and grain."""
    base = rng.uniform(95, 145)
    rows = gaussian_filter1d(rng.normal(0, 1, h), sigma=rng.uniform(0.8, 3)) * rng.uniform(4, 12)
    # Streaks change slowly along x: stretch a coarse noise field horizontally.
    coarse = rng.normal(0, 1, (h, max(2, w // 150))).astype(np.float32)
    streak = cv2.resize(coarse, (w, h), interpolation=cv2.INTER_CUBIC) * rng.uniform(2, 6)
    yy = np.linspace(-1, 1, h, dtype=np.float32)[:, None]
    xx = np.linspace(-1, 1, w, dtype=np.float32)[None, :]
    shading = rng.uniform(-12, 12) * xx + rng.uniform(-8, 8) * yy - rng.uniform(0, 15) * xx**2
    grain = rng.normal(0, rng.uniform(2.5, 6), (h, w)).astype(np.float32)
    return (base + rows[:, None] + streak + shading + grain).astype(np.float32)


def _canvas(h, w):
    return np.zeros((h, w), np.uint8), np.zeros((h, w), np.float32)


def _pits(rng, h, w, sy, sx):
    """Class 1: clusters of small pits; the mask covers the cluster region."""
    mask, delta = _canvas(h, w)
    for _ in range(rng.integers(1, 4)):
        cy, cx = rng.uniform(0.1, 0.9) * h, rng.uniform(0.03, 0.97) * w
        ry, rx = rng.uniform(8, 30) * sy, rng.uniform(10, 60) * sx
        sign = -1 if rng.random() < 0.75 else 1
        for _ in range(rng.integers(5, 25)):
            py, px = int(cy + rng.normal(0, ry / 2)), int(cx + rng.normal(0, rx / 2))
            r = max(1, int(round(rng.uniform(1.5, 4.5) * min(sx, sy) ** 0.5)))
            cv2.circle(delta, (px, py), r, float(sign * rng.uniform(30, 70)), -1)
            cv2.circle(mask, (px, py), r + max(1, int(4 * min(sx, sy) ** 0.5)), 1, -1)
    k = max(3, int(9 * min(sx, sy) ** 0.5) | 1)
    mask = cv2.morphologyEx(mask, cv2.MORPH_CLOSE, np.ones((k, k), np.uint8))
    return mask.astype(bool), delta


def _vertical_marks(rng, h, w, sy, sx):
    """Class 2: rare, small, mostly vertical marks."""
    mask, delta = _canvas(h, w)
    for _ in range(rng.integers(1, 3)):
        cy, cx = rng.uniform(0.2, 0.8) * h, rng.uniform(0.03, 0.97) * w
        ax = (max(1, int(rng.uniform(3, 8) * sx)), max(2, int(rng.uniform(12, 45) * sy)))
        angle = rng.normal(0, 12)
        cv2.ellipse(mask, (int(cx), int(cy)), ax, angle, 0, 360, 1, -1)
        cv2.ellipse(delta, (int(cx), int(cy)), ax, angle, 0, 360, float(-rng.uniform(30, 60)), -1)
    return mask.astype(bool), delta


def _scratches(rng, h, w, sy, sx):
    """Class 3: elongated scratches and textured patches (the most common, most varied class)."""
    mask, delta = _canvas(h, w)
    for _ in range(rng.integers(1, 4)):
        sign = 1 if rng.random() < 0.5 else -1
        level = float(sign * rng.uniform(25, 55))
        if rng.random() < 0.6:  # scratch: a slightly bent thick line
            length = rng.uniform(80, 700) * sx
            angle = rng.choice([rng.normal(0, 6), rng.normal(35, 15) * rng.choice([-1, 1])])
            x0, y0 = rng.uniform(0, w), rng.uniform(0.1, 0.9) * h
            t = np.linspace(0, 1, 8)
            bend = rng.normal(0, 6 * sy) * np.sin(np.pi * t)
            xs = x0 + t * length * np.cos(np.deg2rad(angle))
            ys = y0 + t * length * np.sin(np.deg2rad(angle)) * sy / sx + bend
            pts = np.stack([xs, ys], 1).astype(np.int32).reshape(-1, 1, 2)
            thick = max(2, int(rng.uniform(4, 14) * min(sx, sy) ** 0.5))
            cv2.polylines(mask, [pts], False, 1, thick)
            cv2.polylines(delta, [pts], False, level, thick)
        else:  # patch: irregular polygon with its own grain
            cy, cx = rng.uniform(0.2, 0.8) * h, rng.uniform(0.05, 0.95) * w
            ry, rx = rng.uniform(15, 70) * sy, rng.uniform(40, 220) * sx
            ang = np.sort(rng.uniform(0, 2 * np.pi, rng.integers(6, 12)))
            rad = rng.uniform(0.6, 1.0, ang.size)
            pts = np.stack([cx + rx * rad * np.cos(ang), cy + ry * rad * np.sin(ang)], 1)
            pts = pts.astype(np.int32).reshape(-1, 1, 2)
            cv2.fillPoly(mask, [pts], 1)
            patch = level * 0.7 + rng.normal(0, 10, (h, w)).astype(np.float32)
            delta = np.where(mask > 0, patch, delta).astype(np.float32)
    return mask.astype(bool), delta


def _blotches(rng, h, w, sy, sx):
    """Class 4: large dark blotches (unions of ellipses)."""
    mask, delta = _canvas(h, w)
    cy, cx = rng.uniform(0.25, 0.75) * h, rng.uniform(0.08, 0.92) * w
    for _ in range(rng.integers(3, 8)):
        c = (int(cx + rng.normal(0, 60 * sx)), int(cy + rng.normal(0, 25 * sy)))
        ax = (max(3, int(rng.uniform(25, 110) * sx)), max(3, int(rng.uniform(15, 60) * sy)))
        cv2.ellipse(mask, c, ax, rng.uniform(0, 180), 0, 360, 1, -1)
    m = mask.astype(bool)
    delta[m] = -rng.uniform(45, 85) + rng.normal(0, 8, m.sum())
    return m, delta


RENDERERS = (_pits, _vertical_marks, _scratches, _blotches)


def _distract(rng, img, sy, sx):
    """Unlabeled defect-like texture: faint smudges, bright specks or full-width rolling marks."""
    h, w = img.shape
    kind = rng.integers(0, 3)
    if kind == 0:
        layer = np.zeros((h, w), np.float32)
        c = (int(rng.uniform(0, w)), int(rng.uniform(0, h)))
        ax = (max(2, int(rng.uniform(20, 80) * sx)), max(2, int(rng.uniform(10, 40) * sy)))
        cv2.ellipse(layer, c, ax, rng.uniform(0, 180), 0, 360, -float(rng.uniform(8, 16)), -1)
        img += cv2.GaussianBlur(layer, (0, 0), max(1.0, 6 * min(sx, sy)))
    elif kind == 1:
        for _ in range(rng.integers(3, 15)):
            cv2.circle(img, (int(rng.uniform(0, w)), int(rng.uniform(0, h))), 1, float(img.mean() + 35), -1)
    else:
        y = int(rng.uniform(0.05, 0.95) * h)
        cv2.line(img, (0, y), (w - 1, y + int(rng.normal(0, 3))), float(img.mean() - 18), max(1, int(2 * sy)))


def render(seed_seq: np.random.SeedSequence, h: int, w: int):
    """One image and its four class masks, from its own seed (order-independent)."""
    rng = np.random.default_rng(seed_seq)
    sy, sx = h / 256.0, w / 1600.0
    img = _texture(rng, h, w)
    if rng.random() < P_DISTRACTOR:
        _distract(rng, img, sy, sx)
    masks = np.zeros((4, h, w), bool)
    if rng.random() >= P_EMPTY:
        present = rng.random(4) < P_SECONDARY
        present[rng.choice(4, p=P_PRIMARY)] = True
        claimed = np.zeros((h, w), bool)
        for c in np.flatnonzero(present)[rng.permutation(int(present.sum()))]:
            m, delta = RENDERERS[c](rng, h, w, sy, sx)
            m &= ~claimed  # classes never overlap
            if m.sum() < 4:
                continue
            strength = rng.uniform(0.25, 0.4) if rng.random() < P_FAINT else 1.0
            soft = cv2.GaussianBlur(m.astype(np.float32), (0, 0), 1.0)
            img += strength * delta * soft
            masks[c] = m
            claimed |= m
    out = np.clip(img, 0, 255).astype(np.uint8)
    return out, masks


def _image_ids(rng, n, taken):
    ids = []
    while len(ids) < n:
        name = f"{int(rng.integers(0, 16**9)):09x}.jpg"
        if name not in taken:
            taken.add(name)
            ids.append(name)
    return ids


def write_split(out: Path, subdir: str, ids, seeds, h, w, desc):
    folder = out / subdir
    folder.mkdir(parents=True, exist_ok=True)
    rows = []
    for name, ss in progress(list(zip(ids, seeds)), desc=desc, unit="img"):
        img, masks = render(ss, h, w)
        ok, buf = cv2.imencode(".jpg", cv2.cvtColor(img, cv2.COLOR_GRAY2BGR), [cv2.IMWRITE_JPEG_QUALITY, 95])
        if not ok:
            raise RuntimeError(f"could not encode {name} as JPEG")
        with atomic_path(folder / name) as tmp:
            tmp.write_bytes(buf.tobytes())
        for c in range(4):
            rows.append((name, c + 1, rle.encode(masks[c])))
    return pd.DataFrame(rows, columns=["ImageId", "ClassId", "EncodedPixels"])


def generate(out, n_train=200, n_test=20, height=256, width=1600, seed=0, overwrite=False):
    """Write a synthetic Severstal-layout data set to ``out``; returns the output path."""
    out = Path(out)
    if (out / "train.csv").exists() and not overwrite:
        raise FileExistsError(f"{out}/train.csv exists; pass --overwrite to replace the data set")
    if n_train < 1 or n_test < 0:
        raise ValueError(f"n_train >= 1 and n_test >= 0 must hold, but got (n_train={n_train}, n_test={n_test})")
    if height < 16 or width < 16:
        raise ValueError(f"height >= 16 and width >= 16 must hold, but got {height}x{width}")
    root = np.random.SeedSequence(seed)
    name_ss, train_ss, test_ss = root.spawn(3)
    taken: set = set()
    name_rng = np.random.default_rng(name_ss)
    train_ids = sorted(_image_ids(name_rng, n_train, taken))
    test_ids = sorted(_image_ids(name_rng, n_test, taken))
    train = write_split(out, "train_images", train_ids, train_ss.spawn(n_train), height, width, "train")
    test = write_split(out, "test_images", test_ids, test_ss.spawn(n_test), height, width, "test")
    pos = train[train["EncodedPixels"] != ""].sort_values(["ImageId", "ClassId"])
    atomic_write_text(out / "train.csv", pos.to_csv(index=False, lineterminator="\n"))
    old = pd.DataFrame(
        {"ImageId_ClassId": test["ImageId"] + "_" + test["ClassId"].astype(str), "EncodedPixels": test["EncodedPixels"]}
    )
    atomic_write_text(out / "test_labels.csv", old.to_csv(index=False, lineterminator="\n"))
    per_class = (pos.groupby("ClassId").size().reindex(range(1, 5), fill_value=0)).tolist()
    empty = 1 - pos["ImageId"].nunique() / max(1, n_train)
    log.info("wrote %s: %d train (%.0f%% defect-free, masks per class %s), %d test", out, n_train, 100 * empty, per_class, n_test)
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m steel_ray.synth", description=__doc__.split("\n\n")[0])
    p.add_argument("out", help="output folder")
    p.add_argument("--n-train", type=int, default=200, help="training images (default 200; at least 1)")
    p.add_argument("--n-test", type=int, default=20, help="test images with labels for scoring (default 20; 0 for none)")
    p.add_argument("--height", type=int, default=256, help="image height in pixels (default 256, as Severstal)")
    p.add_argument("--width", type=int, default=1600, help="image width in pixels (default 1600, as Severstal)")
    p.add_argument("--seed", type=int, default=0, help="random seed: the same seed writes the same data set (default 0)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing data set in OUT")
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        generate(a.out, a.n_train, a.n_test, a.height, a.width, a.seed, a.overwrite)
    except (FileExistsError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
