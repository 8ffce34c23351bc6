"""Score a submission CSV against labels with the competition metric.

Usage::

    python -m steel_ray.score --truth data/synth/test_labels.csv --pred submission.csv \
        [--images data/synth/test_images]

Either CSV format is accepted for both files. Pairs missing from the submission count as
empty predictions; a submission naming an image outside the truth set is an error. The image
list comes from ``--images`` (required when the truth is in the new format, which lists only
defective images); without it the shape is ``--height`` x ``--width`` (default 256x1600).
"""
from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

import numpy as np

from . import rle
from .data import N_CLASSES, DataError, Labels, check_shapes, label_array, list_images, read_labels
from .metric import dice_from_counts

__all__ = ["score_labels", "score_submission", "pair_rles"]

log = logging.getLogger(__name__)


def pair_rles(labels: Labels, image_ids: list[str], shape=None) -> np.ndarray:
    """(N, 4) array of RLE strings for ``image_ids``; an image outside the list is an error, and
    with ``shape`` so is an RLE that does not fit the image (naming the file, line and image)."""
    return label_array(labels, image_ids, "the truth set", shape)


def pair_dice(truth: np.ndarray, pred: np.ndarray, shape, truth_name="truth", pred_name="pred") -> np.ndarray:
    """Dice of every pair of two (N, 4) RLE arrays; only pairs with a mask are decoded."""
    dice = np.ones(truth.shape, dtype=np.float64)
    for i, c in zip(*np.nonzero((truth != "") | (pred != ""))):
        try:
            t = rle.decode(truth[i, c], shape)
        except ValueError as e:
            raise DataError(f"{truth_name}: pair ({i}, class {c + 1}): {e}") from None
        try:
            p = rle.decode(pred[i, c], shape)
        except ValueError as e:
            raise DataError(f"{pred_name}: pair ({i}, class {c + 1}): {e}") from None
        dice[i, c] = dice_from_counts((t & p).sum(), p.sum(), t.sum())
    return dice


def score_labels(truth: Labels, pred: Labels, image_ids: list[str], shape) -> np.ndarray:
    """Per-pair Dice ``(N, 4)`` of a submission against the truth over ``image_ids``."""
    t = pair_rles(truth, image_ids, shape)
    p = pair_rles(pred, image_ids, shape)
    return pair_dice(t, p, shape, str(truth.path), str(pred.path))


def score_submission(truth_csv, pred_csv, images=None, shape=(256, 1600)) -> tuple[np.ndarray, np.ndarray]:
    """(per-pair Dice (N, 4), truth-has-a-mask (N, 4)) of a submission file against a label file.

    ``images`` (a folder) gives the image list and size; without it the truth must be in the
    old format (every pair listed) and ``shape`` is the image size.
    """
    truth = read_labels(truth_csv)
    pred = read_labels(pred_csv)
    if images:
        folder = Path(images)
        image_ids = list_images(folder)
        known = set(image_ids)
        for img, r in zip(truth.table["ImageId"], truth.table["row"]):
            if img not in known:
                raise DataError(f"{truth.path}, line {r}: image {img} is not in {folder}")
        shape = check_shapes(folder, image_ids)
    elif truth.format == "new":
        raise DataError(
            f"{truth.path} is in the new format, which lists only defective images; "
            "pass --images DIR so that defect-free images are counted"
        )
    else:
        image_ids = list(truth.image_ids)
    return score_labels(truth, pred, image_ids, shape), pair_rles(truth, image_ids) != ""


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m steel_ray.score", description=__doc__.split("\n\n")[0])
    ap.add_argument("--truth", required=True, help="label CSV (old or new format)")
    ap.add_argument("--pred", required=True, help="submission CSV (old or new format)")
    ap.add_argument("--images", help="folder of the truth images: gives the image list and size")
    ap.add_argument("--height", type=int, default=256, help="image height when --images is not given")
    ap.add_argument("--width", type=int, default=1600, help="image width when --images is not given")
    a = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    try:
        dice, truth_pos = score_submission(a.truth, a.pred, a.images, (a.height, a.width))
    except DataError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    empty = ~truth_pos  # the all-empty submission scores 1 exactly on these pairs
    print(f"score {dice.mean():.6f}  all-empty {empty.mean():.6f}  ({dice.mean() - empty.mean():+.6f})  "
          f"({dice.shape[0]} images x {N_CLASSES} classes)")
    for c in range(N_CLASSES):
        print(f"class {c + 1}: dice {dice[:, c].mean():.6f}  all-empty {empty[:, c].mean():.6f}  "
              f"({int(truth_pos[:, c].sum())} true masks)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
