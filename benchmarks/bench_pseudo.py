"""How good are pseudo labels at each --min-confidence? Measured on the run's out-of-fold training images, never its holdout.

Run:  .venv/bin/python benchmarks/bench_pseudo.py --run runs/demo [--confidence 0.5 0.6 0.7 0.8 0.9]

Every training image of the run has out-of-fold predictions in the OOF pool: each member's model
of the fold that did not train on it. Blending those maps and presences with the blend's weights,
gate and post-processing (the rules ``steel_ray.pseudo`` labels unlabelled images with, through
the same functions) gives each image the label and confidence a pseudo round would give it, from
models that never saw its labels; the table gives, per minimum confidence, how many images would
be kept and the competition Dice of their labels against the true ones, beside the all-empty score
of the same images and the blend's Dice on every image. A good threshold keeps labels whose Dice is
clearly above the blend's overall Dice.

The holdout is not used: choosing the confidence on it would make it a tuning set. What remains
optimistic here: the blend's members, weights and post-processing were chosen on these same OOF
images (its cross-fitted score, not its nested one, is the matching estimate).
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

import numpy as np

from steel_ray import oof, rle
from steel_ray.data import N_CLASSES
from steel_ray.postprocess import PostProcess, apply_blend
from steel_ray.predict import Prediction, member_weights
from steel_ray.pseudo import image_confidence
from steel_ray.score import pair_dice


def oof_labels(run: Path, doc: dict):
    """(image ids, confidences (N,), label RLEs (N, 4), truth RLEs (N, 4)) of every training image."""
    truth = oof.read_truth(run)
    pool = oof.read_pool(run, [m["model_id"] for m in doc["members"]], truth=truth)
    w = np.stack([member_weights(m) for m in doc["members"]], axis=1)  # (4, M), as predict reads them
    q = None
    if doc.get("classifiers"):
        cpool = oof.read_pool(run, [m["model_id"] for m in doc["classifiers"]], classes=[], truth=truth)
        cw = np.array([member_weights(m)[0] for m in doc["classifiers"]])
        q = (cw[:, None, None] * cpool.cls).sum(0)  # (N, 4) the classifier ensemble's presence
    post = [PostProcess(**doc["postprocess"][str(c + 1)]) for c in range(N_CLASSES)]
    conf, labels = np.zeros(len(pool.image_ids)), []
    for i, img in enumerate(pool.image_ids):
        # predict's own rule, one class at a time (apply_blend: the blend, the gate source, the post-processing)
        out = [apply_blend(pool.probs[:, i:i + 1, c], pool.cls[:, i:i + 1, c], w[c], None if q is None else q[i:i + 1, c], post[c])
               for c in range(N_CLASSES)]
        blended, gate, masks = (np.stack([o[j][0] for o in out]) for j in range(3))
        conf[i] = image_confidence(Prediction(img, masks, blended, gate))[0]
        labels.append([rle.encode(m) for m in masks])
    order = [truth.image_ids.index(i) for i in pool.image_ids]
    return pool.image_ids, conf, np.array(labels, dtype=object), truth.rles[order], truth.shape


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--run", default="runs/demo", help="a blended run (its OOF pool and blend/blend.json)")
    ap.add_argument("--confidence", type=float, nargs="+", default=[0.5, 0.6, 0.7, 0.8, 0.9])
    a = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    run = Path(a.run)
    doc = json.loads((run / "blend" / "blend.json").read_text())
    ids, conf, labels, truth, shape = oof_labels(run, doc)
    dice = pair_dice(truth, labels, shape, "OOF truth", "pseudo labels").mean(1)
    empty = (truth == "").mean(1)
    print(f"pseudo labels of the OOF training images of {run} ({len(ids)} images; each labelled by the fold models that "
          f"did not train on it; the blend's Dice on all of them {dice.mean():.4f}, all-empty {empty.mean():.4f})")
    print("| min confidence | kept | Dice of the kept labels | all-empty of the kept |\n|---|---|---|---|")
    for c in a.confidence:
        k = conf >= c
        d = f"{dice[k].mean():.4f}" if k.any() else "-"
        e = f"{empty[k].mean():.4f}" if k.any() else "-"
        print(f"| {c:.2f} | {int(k.sum())} | {d} | {e} |")
    print(f"reproduce: .venv/bin/python benchmarks/bench_pseudo.py --run {run} --confidence {' '.join(map(str, a.confidence))}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
