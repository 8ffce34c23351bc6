"""The main job end to end on an embedded default (what `make demo` runs).

Usage::

    python -m steel_ray.demo --data data/demo --run runs/demo

Generates a CPU-sized synthetic Severstal set (once), then scores the all-empty submission on
its test images: the floor every model has to beat.
"""
from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

import pandas as pd

from . import score, synth
from .io import atomic_write_text

log = logging.getLogger("steel_ray.demo")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m steel_ray.demo", description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", default="data/demo", help="synthetic data folder (generated if missing)")
    ap.add_argument("--run", default="runs/demo", help="run folder")
    ap.add_argument("--n-train", type=int, default=160)
    ap.add_argument("--n-test", type=int, default=40)
    ap.add_argument("--height", type=int, default=128)
    ap.add_argument("--width", type=int, default=800)
    a = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    data, run = Path(a.data), Path(a.run)
    if not (data / "train.csv").exists():
        synth.generate(data, a.n_train, a.n_test, a.height, a.width, seed=0)
    empty = run / "empty_submission.csv"
    atomic_write_text(empty, pd.DataFrame(columns=["ImageId", "EncodedPixels", "ClassId"]).to_csv(index=False))
    log.info("all-empty submission on the synthetic test set:")
    return score.main(["--truth", str(data / "test_labels.csv"), "--pred", str(empty), "--images", str(data / "test_images")])


if __name__ == "__main__":
    sys.exit(main())
