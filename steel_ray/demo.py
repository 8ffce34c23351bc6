"""The main job end to end on an embedded default (what `make demo` runs).

Usage::

    python -m steel_ray.demo [--data data/demo] [--run runs/demo]

1. generate a CPU-sized synthetic Severstal set (once; 160 train + 40 test images, 128x800),
2. search it on embedded Ray with two spaces, search_spaces/demo.yaml (segmentation) and
   search_spaces/demo_classifier.yaml (classifiers, the gate): set 20% of the training images
   aside (holdout), explore 6 segmentation and 3 classifier configs on fold 0 (Optuna TPE +
   ASHA), complete the best 3 segmentation models and the best classifier on 3 folds, blend them
   (classifier gate included) and score the blend on the holdout,
3. write a submission for the synthetic test images with the chosen blend,
4. score it against the synthetic test labels and print, each beside the all-empty score of the
   same pairs: the holdout score, the best single model and the blend's nested estimate with and
   without the classifiers (OOF pool), and the submission's test score.

About 4-5 minutes on 2 idle CPU cores of the development machine (sized to stay under 10 minutes
on a machine with half its speed per core). An interrupted demo continues where it stopped when rerun;
``--verbose`` shows Ray's own output (otherwise in RUN/logs/).
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from pathlib import Path

from . import console, predict, score, search, synth
from . import run as layout
from .blend.document import load_blend
from .blend.report import fmt_score, no_classifier_reason
from .tracking import resolve_uri

log = logging.getLogger("steel_ray.demo")
# the demo's scale: what 2 CPU cores search, blend and predict in 4-5 minutes (under 10 on slower cores)
DEMO = {"n_train": 160, "n_test": 40, "height": 128, "width": 800, "folds": 3, "holdout": 0.2,
        "spaces": ["search_spaces/demo.yaml", "search_spaces/demo_classifier.yaml"]}


def _vs(v, ref) -> str:
    return "" if v is None else f"({v - ref:+.6f} vs all-empty)"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m steel_ray.demo", description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("\n\n", 1)[1])
    ap.add_argument("--data", default="data/demo", help="synthetic data folder (generated if missing)")
    ap.add_argument("--run", default="runs/demo", help="run folder")
    ap.add_argument("--space", action="append", help=f"search space (repeatable; default: {' and '.join(DEMO['spaces'])})")
    ap.add_argument("--num-samples", type=int, help="configs explored per space (default: each space's num_samples)")
    ap.add_argument("--top", type=int, help="configs completed per space (default: each space's top)")
    ap.add_argument("--folds", type=int, default=DEMO["folds"])
    ap.add_argument("--holdout", type=float, default=DEMO["holdout"], help="training images set aside and scored at the end")
    ap.add_argument("--mlflow", metavar="URI",
                    help="MLflow store the search logs to (default: sqlite:///<the run's parent folder>/mlflow.db, e.g. "
                         "sqlite:///runs/mlflow.db; 'none': no MLflow)")
    ap.add_argument("--verbose", action="store_true", help="show Ray's own output on the console")
    a = ap.parse_args(argv)
    console.setup(None, a.verbose)
    t0 = time.time()
    data, run = Path(a.data), Path(a.run)
    if not (data / "train.csv").exists():
        log.info("generating the synthetic set %s (%d train + %d test images, %dx%d)", data, DEMO["n_train"], DEMO["n_test"],
                 DEMO["height"], DEMO["width"])
        synth.generate(data, n_train=DEMO["n_train"], n_test=DEMO["n_test"], height=DEMO["height"], width=DEMO["width"], seed=0)
    saved = layout.read_state(run)
    done = saved is not None and saved.stage == "done"
    uri = a.mlflow or f"sqlite:///{run.parent.as_posix()}/mlflow.db"
    uri = None if uri == "none" else uri
    if not done:
        # a resumed demo logs where it started (its search state keeps the URI)
        rc = search.search(run, a.space or DEMO["spaces"], data, folds=a.folds, max_concurrent=2, holdout=a.holdout,
                           num_samples=a.num_samples, top=a.top, resume=saved is not None, verbose=a.verbose,
                           mlflow=None if saved is not None else uri)
        if rc:
            return rc
    sub = run / "submission.csv"
    n = predict.predict_folder(layout.blend_json(run), data / "test_images", sub)
    print(f"wrote {sub}: {n} images x 4 classes")
    doc = load_blend(layout.blend_json(run))
    dice, truth_pos = score.score_submission(data / "test_labels.csv", sub, data / "test_images")
    s = doc["scores"]
    test, test_empty = float(dice.mean()), float((~truth_pos).mean())
    print(f"\n== steel_ray demo: {time.time() - t0:.0f} s ==")
    if "holdout" in doc:
        h = doc["holdout"]
        print(f"holdout ({h['n_images']} training images set aside before the folds; nobody tuned on them; "
              f"looked at {h.get('looks', 1)} time(s)):")
        print(f"  all-empty (no defects)     {h['all_empty']:.6f}")
        print(f"  blend                      {s['holdout']:.6f}  {_vs(s['holdout'], h['all_empty'])}  "
              f"95% CI {h['ci95'][0]:.4f}-{h['ci95'][1]:.4f}")
    print(f"OOF pool ({len(doc['members'])} blend member(s); every score on the same training pairs):")
    print(f"  all-empty (no defects)     {s['all_empty']:.6f}")
    print(f"  best single (cross-fitted) {s['best_single']:.6f}  {_vs(s['best_single'], s['all_empty'])}  {s['best_single_model']}")
    print(f"  blend nested               {fmt_score(s['nested'])}  {_vs(s['nested'], s['all_empty'])}")
    if "nested_segmentation_only" in s:
        used = len(doc.get("classifiers", []))
        print(f"  ... segmentation gate only {fmt_score(s['nested_segmentation_only'])}  "
              f"{_vs(s['nested_segmentation_only'], s['all_empty'])}  ({used} classifier(s) in the blend's gate"
              + ("" if used else f": {no_classifier_reason(doc)}") + ")")
    print(f"test set ({dice.shape[0]} images, scored with the synthetic labels):")
    print(f"  all-empty (no defects)     {test_empty:.6f}")
    print(f"  submission                 {test:.6f}  {_vs(test, test_empty)}")
    print(f"submission: {sub}")
    print(f"report:     {run / 'blend' / 'report.html'}  (and report.md)")
    state = layout.read_state(run)
    tracked = state.mlflow if state is not None else None
    bindir = Path(os.path.relpath(Path(sys.executable).parent))  # .venv/bin: where make install put the tools
    print("open the run in your tools:")
    print(f"  {bindir / 'tensorboard'} --logdir {run / 'ray'}")
    if tracked:
        print(f"  {bindir / 'mlflow'} ui --backend-store-uri {uri if uri and tracked == resolve_uri(uri) else tracked}")
    print(f"  {bindir / 'optuna-dashboard'} sqlite:///{layout.optuna_db(run).as_posix()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
