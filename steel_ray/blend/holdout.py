"""The holdout, looked at on purpose: a blend scored on the images the search set aside, through
the predict path, and every look recorded in RUN/holdout.json."""
from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import numpy as np

from .. import run as layout
from ..data import N_CLASSES
from ..io import write_json
from ..score import pair_dice

log = logging.getLogger("steel_ray.blend")


def score_holdout(run, doc: dict, blend_path, n_boot: int = 2000) -> dict:
    """Predict the run's holdout images with the chosen blend (the predict path, every fold model, on
    Ray's workers when Ray runs) and score them: ``scores.holdout`` with a 95% bootstrap interval over images, beside the
    holdout's all-empty score. The predictions are kept as RUN/blend/holdout_submission.csv."""
    from .. import predict  # lazy on purpose: predict loads torch, which a blend without a holdout look never needs

    h = json.loads(layout.holdout_path(run).read_text())
    paths = [Path(h["images_dir"]) / i for i in h["image_ids"]]
    sub = Path(blend_path).parent / "holdout_submission.csv"
    # on Ray's workers when Ray runs (the search's own blend), else in this process
    rows = predict.predict_rows(doc, paths, tuple(doc["image_shape"]), blend_path)
    predict.write_submission(rows, sub)
    pred = np.array([r for _, r in rows], dtype=object)
    truth = np.array(h["rles"], dtype=object)
    dice = pair_dice(truth, pred, tuple(doc["image_shape"]), "holdout truth", str(sub))
    per_image = dice.mean(1)
    rng = np.random.default_rng(0)
    boot = per_image[rng.integers(0, len(per_image), (n_boot, len(per_image)))].mean(1)
    empty = truth == ""
    doc = dict(doc)
    doc["scores"] = {**doc["scores"], "holdout": float(dice.mean())}
    doc["holdout"] = {"n_images": len(paths), "fraction": h["fraction"], "ci95": [float(np.quantile(boot, 0.025)),
                                                                                  float(np.quantile(boot, 0.975))],
                      "all_empty": float(empty.mean()), "per_class": {str(c + 1): float(dice[:, c].mean()) for c in range(N_CLASSES)},
                      "submission": str(sub)}
    log.info("holdout (%d images, never tuned on): %.6f [%.6f, %.6f], all-empty %.6f", len(paths), dice.mean(),
             *doc["holdout"]["ci95"], empty.mean())
    return doc


def record_look(run, doc: dict, blend_path, command: str) -> int:
    """Append a look at the holdout to RUN/holdout.json ``looks`` (time, command, blend, score);
    returns how many there have been. Every choice made after seeing the score tunes on it."""
    path = layout.holdout_path(run)
    h = json.loads(path.read_text())
    h.setdefault("looks", []).append({"time": time.strftime("%Y-%m-%dT%H:%M:%S"), "command": command, "blend": str(blend_path),
                                      "score": doc["scores"]["holdout"], "ci95": doc["holdout"]["ci95"]})
    write_json(path, h)
    return len(h["looks"])

