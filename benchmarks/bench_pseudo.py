"""How good are pseudo labels at each --min-confidence? Measured on a run's holdout (labelled images nobody tuned on).

Run:  .venv/bin/python benchmarks/bench_pseudo.py --run runs/demo [--confidence 0.5 0.6 0.7 0.8 0.9]

The run's blend labels its holdout images exactly as ``steel_ray.pseudo`` labels unlabelled ones
(the predict path, then the confidence rule); the table gives, per minimum confidence, how many
images would be kept and the competition Dice of their pseudo labels against the true labels,
beside the all-empty score of the same kept images and the blend's Dice on every holdout image.
A good threshold keeps labels whose Dice is clearly above the blend's overall Dice (the labels
a round trains on are then better than what the blend does on average).
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

import numpy as np

from steel_ray import pseudo
from steel_ray.score import pair_dice


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--run", default="runs/demo", help="a blended run with a holdout (search --holdout)")
    ap.add_argument("--confidence", type=float, nargs="+", default=[0.5, 0.6, 0.7, 0.8, 0.9])
    a = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    run = Path(a.run)
    h = json.loads((run / "holdout.json").read_text())
    doc = json.loads((run / "blend" / "blend.json").read_text())
    shape = tuple(doc["image_shape"])
    paths = [Path(h["images_dir"]) / i for i in h["image_ids"]]
    # confidence 0 keeps every image: its labels are what the blend predicts for it
    rows, labels = pseudo.label_images(doc, run / "blend" / "blend.json", paths, shape, min_confidence=0.0)
    conf = np.array([r["confidence"] for r in rows])
    truth = np.array(h["rles"], dtype=object)
    pred = np.array([labels[i] for i in h["image_ids"]], dtype=object)
    dice = pair_dice(truth, pred, shape, "holdout truth", "pseudo labels").mean(1)
    empty = (truth == "").mean(1)
    print(f"pseudo labels on the holdout of {run} ({len(paths)} images; the blend's Dice on all of them {dice.mean():.4f}, "
          f"all-empty {empty.mean():.4f})")
    print(f"{'min confidence':>15} {'kept':>6} {'Dice of kept labels':>20} {'all-empty of kept':>18}")
    for c in a.confidence:
        k = conf >= c
        d = f"{dice[k].mean():.4f}" if k.any() else "-"
        e = f"{empty[k].mean():.4f}" if k.any() else "-"
        print(f"{c:>15.2f} {int(k.sum()):>6} {d:>20} {e:>18}")
    print(f"reproduce: .venv/bin/python benchmarks/bench_pseudo.py --run {run} --confidence {' '.join(map(str, a.confidence))}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
