"""The run's data split, torch-free (the search driver reads it without the training stack): the
training set with its folds (``FoldData``), the holdout set aside before the folds, the pseudo-labelled
sets of a round, and the run files they are kept in (folds.csv, holdout.json, truth.parquet)."""
from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from . import oof
from . import run as layout
from .data import DataError, TrainSet, folds_hash, load_labelled, load_train, make_folds, make_holdout, write_folds
from .io import write_json

__all__ = ["FOLD_SEED", "FoldData", "prepare_run"]

log = logging.getLogger("steel_ray.train")  # the name its messages have always had
FOLD_SEED = 42


@dataclass
class FoldData:
    """A training set with its fold assignment (saved in the run as folds.csv / truth.parquet)."""

    train: TrainSet
    folds: np.ndarray
    n_folds: int
    # pseudo-labelled images, added to training splits and never validated on: one set for every
    # fold, or (a round's per-fold labels) {fold: the set made by the parent's models of that fold}
    extra: TrainSet | dict[int, TrainSet] | None = None

    def extra_for(self, fold: int) -> TrainSet | None:
        """The pseudo-labelled images fold ``fold`` trains on (None: none)."""
        return self.extra.get(int(fold)) if isinstance(self.extra, dict) else self.extra

    @property
    def folds_hash(self) -> str:
        return folds_hash(self.train.image_ids, self.folds)


def prepare_run(data_dir, run_dir, n_folds: int, fold_seed: int = FOLD_SEED, holdout: float = 0.0,
                pseudo: dict | None = None) -> FoldData:
    """Load the data, make (or reuse) the run's folds and write folds.csv and truth.parquet once.

    ``holdout`` > 0 first sets aside that fraction of the images (multilabel-stratified, seeded):
    they are never trained on, validated on or blended, and are listed with their labels in
    RUN/holdout.json for the final, untouched score. An existing run with a different split
    (other images, holdout, fold count or seed) is an error: OOF files of two splits must never be mixed.

    ``pseudo`` (``{"labels": CSV, "images": DIR}``, see ``steel_ray.pseudo``) adds pseudo-labelled
    images to every fold's training split; with ``"labels_by_fold": {k: CSV}`` fold k trains on its
    own file (labels made by the parent's fold-k models, which never trained on fold k's labels).
    They are not in folds.csv, truth.parquet, validation or any OOF file. One that is also a
    training (or holdout) image, or of another size, is refused.
    """
    run = Path(run_dir)
    if not 0 <= holdout < 1:
        raise DataError(f"--holdout {holdout}: the fraction of the training images set aside must be 0 <= F < 1 (e.g. 0.2)")
    if n_folds < 2:
        raise DataError(f"--folds {n_folds}: at least 2 folds are needed")
    ts = load_train(data_dir)
    if holdout:
        left = len(ts.image_ids) - math.ceil(holdout * len(ts.image_ids))  # the split's own rounding
        if left < n_folds:
            raise DataError(f"--holdout {holdout} leaves {left} of {len(ts.image_ids)} training images of {data_dir} "
                            f"for --folds {n_folds}; each fold needs images (lower --holdout or --folds)")
        held = make_holdout(ts.presence, holdout, fold_seed)
        doc = {"fraction": holdout, "seed": fold_seed, "images_dir": str(Path(ts.images_dir).resolve()),
               "image_ids": [i for i, h in zip(ts.image_ids, held) if h], "rles": ts.rles[held].tolist()}
        hpath = layout.holdout_path(run)
        if hpath.exists() and json.loads(hpath.read_text())["image_ids"] != doc["image_ids"]:
            raise DataError(f"{hpath}: this run set aside other holdout images; use a new --out folder")
        ts = ts.subset(~held)
    all_ids = set(ts.image_ids) | (set(doc["image_ids"]) if holdout else set())
    if len(ts.image_ids) < n_folds:
        raise DataError(f"{data_dir}: {len(ts.image_ids)} training image(s) for --folds {n_folds}; each fold needs images")
    folds = make_folds(ts.presence, n_folds, fold_seed)
    extra = None
    if pseudo and "labels_by_fold" in pseudo:  # a fold missing from it trains without pseudo labels
        extra = {int(k): _load_pseudo({**pseudo, "labels": lab}, all_ids, ts.shape, f"fold {k}")
                 for k, lab in pseudo["labels_by_fold"].items()}
    elif pseudo:
        extra = _load_pseudo(pseudo, all_ids, ts.shape)
    fd = FoldData(ts, folds, n_folds, extra)
    fpath = layout.folds_path(run)
    if fpath.exists():
        old = pd.read_csv(fpath)
        if folds_hash(old["image_id"], old["fold"]) != fd.folds_hash:
            raise DataError(
                f"{fpath}: this run was split differently (other data, --folds or seed); "
                f"use a new --out folder"
            )
    else:
        write_folds(fpath, ts.image_ids, folds)
    if holdout and not layout.holdout_path(run).exists():
        write_json(layout.holdout_path(run), doc)
    if not layout.truth_path(run).exists():
        oof.write_truth(run, ts, folds, fd.folds_hash)
    return fd


def _load_pseudo(pseudo: dict, train_ids: set, shape, which: str = "every fold") -> TrainSet:
    extra = load_labelled(pseudo["labels"], pseudo["images"])
    clash = sorted(set(extra.image_ids) & train_ids)
    if clash:
        raise DataError(f"{pseudo['labels']}: pseudo image {clash[0]} is also a training image "
                        f"({len(clash)} such); pseudo labels are for images without labels")
    if tuple(extra.shape) != tuple(shape):
        raise DataError(f"{pseudo['images']}: pseudo images are {extra.shape[0]}x{extra.shape[1]}, "
                        f"the training images {shape[0]}x{shape[1]}")
    log.info("pseudo labels: %d images from %s added to the training split of %s", len(extra.image_ids), pseudo["labels"], which)
    return extra
