"""The main job end to end on an embedded default (what `make demo` runs).

Usage::

    python -m steel_ray.demo [--data data/demo] [--run runs/demo]

1. generate a CPU-sized synthetic Severstal set (once; 160 train + 40 test images, 128x800),
2. search it with search_spaces/demo.yaml on embedded Ray (explore -> complete -> blend),
3. write a submission for the synthetic test images with the chosen blend,
4. score it against the synthetic test labels and print it next to the blend's nested estimate.

An interrupted demo continues where it stopped when rerun.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from . import predict, score, search, synth

log = logging.getLogger("steel_ray.demo")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m steel_ray.demo", description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("\n\n", 1)[1])
    ap.add_argument("--data", default="data/demo", help="synthetic data folder (generated if missing)")
    ap.add_argument("--run", default="runs/demo", help="run folder")
    ap.add_argument("--space", default="search_spaces/demo.yaml")
    ap.add_argument("--num-samples", type=int, default=4)
    ap.add_argument("--top", type=int, default=2)
    ap.add_argument("--folds", type=int, default=3)
    a = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s", datefmt="%H:%M:%S")
    data, run = Path(a.data), Path(a.run)
    if not (data / "train.csv").exists():
        synth.generate(data, n_train=160, n_test=40, height=128, width=800, seed=0)
    state = run / "search.json"
    done = state.exists() and json.loads(state.read_text()).get("stage") == "done"
    if not done:
        args = ["--space", a.space, "--data", str(data), "--out", str(run), "--folds", str(a.folds),
                "--num-samples", str(a.num_samples), "--top", str(a.top), "--max-concurrent", "2"]
        if state.exists():
            args.append("--resume")
        rc = search.main(args)
        if rc:
            return rc
    sub = run / "submission.csv"
    rc = predict.main(["--run", str(run), "--images", str(data / "test_images"), "--out", str(sub)])
    if rc:
        return rc
    doc = json.loads((run / "blend" / "blend.json").read_text())
    print(f"\nsubmission: {sub}\ntest score of the submission on the synthetic test labels:")
    rc = score.main(["--truth", str(data / "test_labels.csv"), "--pred", str(sub), "--images", str(data / "test_images")])
    s = doc["scores"]
    print(f"blend estimates from the OOF pool: nested {s['nested']:.6f}  cross_fitted {s['cross_fitted']:.6f}  "
          f"in_sample {s['in_sample']:.6f}  baseline {s['baseline']:.6f}")
    print(f"blend selection report: {run / 'blend' / 'report.html'}")
    return rc


if __name__ == "__main__":
    sys.exit(main())
