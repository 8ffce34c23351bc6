"""Severstal-layout data: labels from train.csv (both formats), the image list, shape checks and folds.

Layout: ``DIR/train.csv`` and ``DIR/train_images/*.jpg``. ``train.csv`` is either the old
format (``ImageId_ClassId,EncodedPixels``, 4 rows per image, empty where no defect) or the new
one (``ImageId,ClassId,EncodedPixels``, defective pairs only). The image list always comes from
the folder: an image with no rows has no defect.
"""
from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from . import rle
from .io import atomic_write_text

__all__ = [
    "N_CLASSES",
    "DataError",
    "Labels",
    "TrainSet",
    "read_labels",
    "image_shape",
    "load_train",
    "label_array",
    "make_folds",
    "folds_hash",
    "write_folds",
]

log = logging.getLogger(__name__)
N_CLASSES = 4
IMAGE_EXTS = (".jpg", ".jpeg", ".png")


class DataError(ValueError):
    """Bad input data; the message names the file (and row) and what was expected."""


@dataclass(frozen=True)
class Labels:
    """Positive (image, class) pairs of a label CSV, with the 1-based data row each came from."""

    path: Path
    format: str  # "old" or "new"
    table: pd.DataFrame  # columns ImageId, ClassId, EncodedPixels, row
    image_ids: tuple[str, ...]  # every image the CSV names (the old format names empty ones too)


def read_labels(path: str | Path) -> Labels:
    """Read a label or submission CSV in either format, detected from the header."""
    path = Path(path)
    try:
        df = pd.read_csv(path, dtype=str, keep_default_na=False)
    except FileNotFoundError:
        raise DataError(f"{path}: file not found") from None
    except (pd.errors.ParserError, UnicodeDecodeError, pd.errors.EmptyDataError) as e:
        raise DataError(f"{path}: not a readable CSV ({str(e).splitlines()[0]})") from None
    cols = [c.strip() for c in df.columns]
    df.columns = cols
    rows = np.arange(2, len(df) + 2)  # line numbers in the file (header is line 1)
    if {"ImageId_ClassId", "EncodedPixels"} <= set(cols):
        fmt = "old"
        key = df["ImageId_ClassId"].str.strip()
        parts = key.str.rsplit("_", n=1, expand=True)
        if parts.shape[1] != 2 or parts[1].isna().any():
            i = int(np.flatnonzero(parts.get(1, pd.Series([None] * len(df))).isna())[0])
            raise DataError(f"{path}, line {rows[i]}: ImageId_ClassId {key.iloc[i]!r} is not IMAGE_CLASS")
        image, cls = parts[0], parts[1]
    elif {"ImageId", "ClassId", "EncodedPixels"} <= set(cols):
        fmt = "new"
        image, cls = df["ImageId"].str.strip(), df["ClassId"].str.strip()
    else:
        raise DataError(
            f"{path}: unknown header {cols}; expected 'ImageId_ClassId,EncodedPixels' (old format) "
            f"or 'ImageId,ClassId,EncodedPixels' (new format)"
        )
    cls_num = pd.to_numeric(cls, errors="coerce")
    bad = cls_num.isna() | ~cls_num.isin(range(1, N_CLASSES + 1))
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        raise DataError(f"{path}, line {rows[i]}: ClassId {cls.iloc[i]!r} is outside 1..{N_CLASSES}")
    table = pd.DataFrame(
        {
            "ImageId": image.values,
            "ClassId": cls_num.astype(int).values,
            "EncodedPixels": df["EncodedPixels"].fillna("").str.strip().values,
            "row": rows,
        }
    )
    image_ids = tuple(dict.fromkeys(table["ImageId"]))
    # Duplicated pairs: identical repeats are harmless; different masks are a conflict.
    dup = table.duplicated(["ImageId", "ClassId"], keep=False)
    if dup.any():
        for (img, c), g in table[dup].groupby(["ImageId", "ClassId"], sort=False):
            if g["EncodedPixels"].nunique() > 1:
                r = g["row"].tolist()
                raise DataError(
                    f"{path}, lines {r[0]} and {r[1]}: conflicting masks for image {img} class {c}"
                )
        table = table.drop_duplicates(["ImageId", "ClassId"])
    for r, s in zip(table["row"], table["EncodedPixels"]):
        try:
            rle.validate(s)
        except ValueError as e:
            raise DataError(f"{path}, line {r}: {e}") from None
    table = table[table["EncodedPixels"] != ""].reset_index(drop=True)
    return Labels(path=path, format=fmt, table=table, image_ids=image_ids)


def image_shape(path: str | Path) -> tuple[int, int]:
    """(height, width) of an image from its header, without decoding it; names the file on error."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            w, h = im.size
    except (UnidentifiedImageError, OSError) as e:
        raise DataError(f"{path}: unreadable or corrupt image ({e})") from None
    return h, w


def list_images(folder: str | Path) -> list[str]:
    folder = Path(folder)
    if not folder.is_dir():
        raise DataError(f"{folder}: image folder not found")
    return sorted(p.name for p in folder.iterdir() if p.suffix.lower() in IMAGE_EXTS)


def check_shapes(folder: Path, image_ids) -> tuple[int, int]:
    """The common (height, width) of the images; mixed sizes are an error naming a file."""
    shape = None
    first = None
    for name in image_ids:
        s = image_shape(folder / name)
        if shape is None:
            shape, first = s, name
        elif s != shape:
            raise DataError(
                f"{folder / name}: image is {s[0]}x{s[1]} but {first} is {shape[0]}x{shape[1]}; "
                "all images must have one size"
            )
    if shape is None:
        raise DataError(f"{folder}: no images (*.jpg, *.png) found")
    return shape


@dataclass
class TrainSet:
    """A loaded training set: image ids (sorted), their RLE per class, and the image shape."""

    root: Path
    images_dir: Path
    image_ids: list[str]
    rles: np.ndarray  # object (N, 4): RLE string, "" when empty
    shape: tuple[int, int]
    label_format: str = "new"

    @property
    def presence(self) -> np.ndarray:
        """(N, 4) bool: does the image have a defect of each class."""
        return self.rles != ""

    def areas(self) -> np.ndarray:
        return np.vectorize(rle.area, otypes=[np.int64])(self.rles)

    def mask(self, i: int) -> np.ndarray:
        """(4, H, W) bool ground-truth mask of image ``i``."""
        return np.stack([rle.decode(s, self.shape) for s in self.rles[i]])

    def subset(self, keep: np.ndarray) -> "TrainSet":
        """The same set restricted to the images where ``keep`` (bool, N) is true."""
        keep = np.asarray(keep, bool)
        return TrainSet(self.root, self.images_dir, [i for i, k in zip(self.image_ids, keep) if k], self.rles[keep],
                        self.shape, self.label_format)


def label_array(labels: Labels, image_ids, where: str, shape=None) -> np.ndarray:
    """(N, 4) RLE strings of ``image_ids`` ("" = no defect) from a label table.

    A row naming an image outside ``image_ids`` is an error naming the file, line and ``where``;
    with ``shape`` every RLE is also checked against the image size.
    """
    idx = {k: i for i, k in enumerate(image_ids)}
    out = np.full((len(idx), N_CLASSES), "", dtype=object)
    for img, c, s, r in labels.table[["ImageId", "ClassId", "EncodedPixels", "row"]].itertuples(index=False):
        if img not in idx:
            raise DataError(f"{labels.path}, line {r}: image {img} is not in {where}")
        if shape is not None:
            try:
                rle.validate(s, shape)
            except ValueError as e:
                raise DataError(f"{labels.path}, line {r} (image {img}, class {c}): {e}") from None
        out[idx[img], c - 1] = s
    unknown = [x for x in labels.image_ids if x not in idx]
    if unknown:
        raise DataError(f"{labels.path}: image {unknown[0]} is not in {where}")
    return out


def load_train(
    root: str | Path, csv_name: str = "train.csv", images_subdir: str = "train_images"
) -> TrainSet:
    """Load a Severstal-layout folder, checking every row and every image header."""
    root = Path(root)
    images_dir = root / images_subdir
    image_ids = list_images(images_dir)
    labels = read_labels(root / csv_name)
    shape = check_shapes(images_dir, image_ids)
    rles = label_array(labels, image_ids, str(images_dir), shape)
    log.info("loaded %d images (%dx%d), %d masks from %s", len(image_ids), *shape, len(labels.table), root)
    return TrainSet(root, images_dir, image_ids, rles, shape, labels.format)


def load_labelled(csv_path: str | Path, images_dir: str | Path) -> TrainSet:
    """The images a label CSV names (every one of them, empty ones included, e.g. pseudo labels)
    from ``images_dir``, with their masks; every row and image header is checked."""
    labels = read_labels(csv_path)
    image_ids = sorted(labels.image_ids)
    if not image_ids:
        raise DataError(f"{csv_path}: names no image")
    images_dir = Path(images_dir)
    missing = [i for i in image_ids if not (images_dir / i).is_file()]
    if missing:
        raise DataError(f"{csv_path}: image {missing[0]} is not in {images_dir}")
    shape = check_shapes(images_dir, image_ids)
    rles = label_array(labels, image_ids, str(images_dir), shape)
    return TrainSet(Path(csv_path).parent, images_dir, image_ids, rles, shape, labels.format)


def make_folds(presence: np.ndarray, n_folds: int, seed: int = 0) -> np.ndarray:
    """Multilabel-stratified K-fold on the 4 class-presence labels plus "no defect".

    Returns the fold index of every image; deterministic for a seed.
    """
    from iterstrat.ml_stratifiers import MultilabelStratifiedKFold

    presence = np.asarray(presence, dtype=bool)
    if n_folds < 2:
        raise ValueError(f"n_folds >= 2 must hold, but got n_folds={n_folds}")
    if len(presence) < n_folds:
        raise ValueError(f"need at least n_folds={n_folds} images, but got {len(presence)}")
    y = np.concatenate([presence, ~presence.any(axis=1, keepdims=True)], axis=1).astype(int)
    folds = np.full(len(presence), -1, dtype=np.int64)
    skf = MultilabelStratifiedKFold(n_splits=n_folds, shuffle=True, random_state=seed)
    for k, (_, val) in enumerate(skf.split(np.zeros(len(y)), y)):
        folds[val] = k
    return folds


def make_holdout(presence: np.ndarray, fraction: float, seed: int = 0) -> np.ndarray:
    """Bool (N,) mask of a multilabel-stratified holdout of ``fraction`` of the images (same labels
    as the folds: 4 class presences plus "no defect"); deterministic for a seed."""
    from iterstrat.ml_stratifiers import MultilabelStratifiedShuffleSplit

    presence = np.asarray(presence, dtype=bool)
    if not 0 < fraction < 1:
        raise ValueError(f"0 < holdout < 1 must hold, but got holdout={fraction}")
    y = np.concatenate([presence, ~presence.any(axis=1, keepdims=True)], axis=1).astype(int)
    split = MultilabelStratifiedShuffleSplit(n_splits=1, test_size=fraction, random_state=seed)
    _, test = next(split.split(np.zeros(len(y)), y))
    out = np.zeros(len(y), bool)
    out[test] = True
    return out


def folds_hash(image_ids, folds) -> str:
    """Short hash of an (image -> fold) assignment, stored with every OOF file."""
    h = hashlib.sha256()
    for img, f in zip(image_ids, folds):
        h.update(f"{img}:{int(f)}\n".encode())
    return h.hexdigest()[:16]


def write_folds(path: str | Path, image_ids, folds) -> None:
    """Save the fold table (image_id, fold) as CSV, atomically."""
    df = pd.DataFrame({"image_id": list(image_ids), "fold": np.asarray(folds, dtype=int)})
    atomic_write_text(path, df.to_csv(index=False))
