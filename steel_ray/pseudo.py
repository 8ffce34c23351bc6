"""Pseudo-labelling rounds: label unlabelled images with a run's blend, retrain its members with them, blend again.

Usage::

    python -m steel_ray.pseudo --run runs/demo --images data/demo/test_images --out runs/demo_r1 \
        [--min-confidence 0.8] [--max-images N] [--members blend | --members top K] \
        [--max-concurrent N] [--cpus-per-trial C] [--gpus-per-trial G] [--address ADDR] [--storage URI] [--resume]

1. label: RUN's blend predicts the images through the predict path (members, classifiers, gate,
   post-processing); an image is kept only where every class decision is confident: an empty
   class has presence <= 1 - C, a kept mask has presence >= C and a mean pixel probability >= C
   (C = --min-confidence). Writes OUT/pseudo/labels.csv (Kaggle new format, every class of every
   kept image) and OUT/pseudo/images.csv (every image: its confidence, kept or not, classes).
2. retrain: RUN's blend members (the same configs, folds and seeds; classifiers included) train
   on every fold with the kept images added to the training split only: they never appear in
   validation, the OOF files or the fold table. Ray runs it as the search's complete stage (same
   resources, retries and --resume).
3. blend OUT and print, side by side, the nested (and holdout) scores of RUN and OUT.

A second round is ``--run OUT --out OUT2``. An image that is also a training (or holdout) image of
RUN, or of another size, is refused with a one-line error.
"""
from __future__ import annotations

import argparse
import contextlib
import csv
import io
import json
import logging
import sys
import time
import uuid
from pathlib import Path

import numpy as np

from . import console, search
from . import run as layout
from .blend.document import load_blend
from .blend.report import fmt_score
from .config import ID_SCHEME, model_ids
from .data import N_CLASSES, DataError, check_shapes, list_images
from .io import atomic_write_text
from .oof import read_truth
from .run import where
from .tracking import resolve_uri

__all__ = ["image_confidence", "label_images", "fold_doc", "round_lines", "main"]

log = logging.getLogger("steel_ray.pseudo")
# Measured with benchmarks/bench_pseudo.py on the demo run's holdout (32 labelled images, blend Dice
# 0.9306 on all of them): kept at 0.5 / 0.6 / 0.7 / 0.75 / 0.8: 22 / 20 / 13 / 5 / 2 images whose
# labels score 0.943 / 0.950 / 0.962 / 1.0 / 1.0. 0.7 keeps 40% of the images at labels clearly
# better than the blend's average; stronger models are more confident (more images pass).
DEFAULT_MIN_CONFIDENCE = 0.5  # chosen on the demo run's OOF images (benchmarks/bench_pseudo.py), not its holdout


SELECT = ("confidence", "agreement")
DEFAULT_AGREEMENT = 0.95  # the 1st-place team's cut-offs: presence above 0.95 or below 0.05


def image_confidence(pred, select: str = "confidence") -> tuple[float, np.ndarray]:
    """(the image's confidence, per-class confidence (4,)) of a :class:`predict.Prediction`.

    ``confidence``: a class predicted empty is as confident as its gate is low (1 - presence); a
    kept mask as the lower of its presence and its pixels' mean probability. ``agreement`` (the
    1st-place team's selection): a class is as confident as its gate agrees with its mask, the
    gate's presence for a kept mask and 1 - presence for an empty one, so a cut-off of 0.95 keeps
    the classes whose gate is above 0.95 with a mask or below 0.05 without one. The image is as
    confident as its least confident class.
    """
    conf = np.zeros(N_CLASSES)
    for c in range(N_CLASSES):
        g = float(pred.gate[c])
        m = pred.masks[c]
        if select == "agreement":
            conf[c] = g if m.any() else 1.0 - g
        else:
            conf[c] = min(g, float(pred.blended[c][m].mean()) / 255.0) if m.any() else 1.0 - g
    return float(conf.min()), conf


def _label(pred, select: str = "confidence") -> dict:
    """What a worker sends back for one image: its confidences, classes and RLE strings."""
    from .predict import rles  # lazy: torch, after the round's input is checked

    conf, per_class = image_confidence(pred, select)
    return {"confidence": round(conf, 6), **{f"class_{c + 1}": bool(pred.masks[c].any()) for c in range(N_CLASSES)},
            **{f"confidence_{c + 1}": round(float(per_class[c]), 6) for c in range(N_CLASSES)},
            "_rles": rles(pred)}


def label_images(doc: dict, blend_path, paths: list[Path], shape, min_confidence: float, max_images: int | None = None,
                 device="auto", select: str = "confidence"):
    """Predict ``paths`` with the blend (on Ray's workers when Ray runs); returns (rows for
    images.csv, {image_id: [rle x 4]} of the kept images); ``select``: :func:`image_confidence`."""
    import functools

    from .workers import map_predictions  # lazy: Ray, after the round's input is checked

    labels = map_predictions(doc, paths, shape, functools.partial(_label, select=select), blend_path=blend_path, device=device)
    rows = [{"image_id": Path(p).name, "confidence": r["confidence"], "kept": r["confidence"] >= min_confidence,
             **{k: v for k, v in r.items() if k != "confidence"}} for p, r in zip(paths, labels)]
    kept = sorted((r for r in rows if r["kept"]), key=lambda r: -r["confidence"])
    if max_images is not None:
        for r in kept[max_images:]:
            r["kept"] = False
        kept = kept[:max_images]
    labels = {r["image_id"]: r["_rles"] for r in kept}
    for r in rows:
        r.pop("_rles")
    return rows, labels


def _write_csvs(out: Path, rows: list[dict], labels: dict, suffix: str = "") -> tuple[Path, Path]:
    """RUN/pseudo/labels<suffix>.csv (the kept images' labels) and images<suffix>.csv (every image's row)."""
    from .predict import write_submission  # lazy: torch, after the round's input is checked

    lab = layout.pseudo_dir(out) / f"labels{suffix}.csv"
    write_submission(sorted(labels.items()), lab, "new")  # the Kaggle new format, as a submission
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=list(rows[0]), lineterminator="\n")
    w.writeheader()
    w.writerows(rows)
    imgs = layout.pseudo_dir(out) / f"images{suffix}.csv"
    atomic_write_text(imgs, buf.getvalue())
    return lab, imgs


def fold_doc(doc: dict, fold: int) -> dict:
    """The blend document with only the fold-``fold`` model of each member and classifier: the
    parent's models that never trained on fold ``fold``'s labels (same weights, same post-processing)."""
    def only(m):
        ck = [p for p in m["checkpoints"] if Path(p).parent.name == f"fold={int(fold)}"]
        if len(ck) != 1:
            raise DataError(f"{m['model_id']}: the blend lists {len(ck)} fold-{fold} checkpoint(s), expected 1")
        return {**m, "checkpoints": ck}

    return {**doc, "members": [only(m) for m in doc["members"]], "classifiers": [only(m) for m in doc.get("classifiers", [])]}


def _member_configs(run: Path, doc: dict, members: list[str]) -> list[dict]:
    """The trial configs of the models to retrain (blend members and classifiers, or the top K singles)."""
    if members[0] == "blend":
        ids = [m["model_id"] for m in doc["members"]] + [m["model_id"] for m in doc.get("classifiers", [])]
    else:
        k = int(members[1])
        singles = doc["single_models_cross_fitted"]
        ids = sorted(singles, key=lambda m: -singles[m])[:k] + [m["model_id"] for m in doc.get("classifiers", [])]
    out = []
    for mid in ids:
        path = layout.checkpoint_dir(run, mid, 0) / "config.json"
        if not path.exists():
            raise DataError(f"{path}: config of {mid} not found; the run's checkpoints are needed to retrain its members")
        out.append(json.loads(path.read_text()))
    return out


def _args(argv=None):
    ap = argparse.ArgumentParser(prog="python -m steel_ray.pseudo", description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("\n\n", 1)[1])
    ap.add_argument("--run", required=True, help="the labelling run (its blend/blend.json and search.json)")
    ap.add_argument("--images", help="folder of unlabelled images to pseudo-label (required, except with --resume)")
    ap.add_argument("--out", required=True, help="the new run folder")
    ap.add_argument("--min-confidence", type=float, default=None,
                    help=f"keep an image only when every class decision is at least this confident (default: "
                         f"{DEFAULT_AGREEMENT} with --select agreement, else {DEFAULT_MIN_CONFIDENCE}: on the demo run's "
                         "out-of-fold training images it kept 88 of 128 "
                         "whose labels scored 0.937 against the truth, vs 0.909 for the blend on all 128 and 0.926 for "
                         "no defects on the same 88; benchmarks/bench_pseudo.py measures it on any run's OOF images, "
                         "never its holdout)")
    ap.add_argument("--select", choices=SELECT, default="confidence",
                    help="how an image's confidence is measured: confidence (default: gate and mask probability) or "
                         "agreement (the 1st-place team's: every class's gate confident and its mask agreeing; the "
                         f"cut-off then defaults to {DEFAULT_AGREEMENT}, i.e. presence above 0.95 or below 0.05)")
    ap.add_argument("--max-images", type=int, help="keep at most N images (the most confident)")
    ap.add_argument("--members", nargs="+", default=["blend"], metavar="blend|top K",
                    help="retrain the blend's members (default) or the K best single models (plus the blend's classifiers)")
    ap.add_argument("--max-concurrent", type=int, default=None)
    ap.add_argument("--cpus-per-trial", type=float, default=1.0)
    ap.add_argument("--gpus-per-trial", type=float, default=0.0)
    ap.add_argument("--max-failures", type=int, default=2)
    ap.add_argument("--address", help="join a running Ray cluster (default: embedded Ray)")
    ap.add_argument("--storage", help="shared storage every node writes to (default: OUT)")
    ap.add_argument("--resume", action="store_true", help="continue an interrupted round in OUT")
    ap.add_argument("--mlflow", metavar="URI",
                    help="log the round to MLflow (its own experiment, as a search's): sqlite:///runs/mlflow.db, a folder "
                         "or a tracking server")
    ap.add_argument("--verbose", action="store_true")
    a = ap.parse_args(argv)
    if a.members[0] not in ("blend", "top") or (a.members[0] == "top" and (len(a.members) != 2 or not a.members[1].isdigit())) \
            or (a.members[0] == "blend" and len(a.members) != 1):
        ap.error(f"--members {' '.join(a.members)}: use 'blend' or 'top K'")
    if a.min_confidence is None:
        a.min_confidence = DEFAULT_AGREEMENT if a.select == "agreement" else DEFAULT_MIN_CONFIDENCE
    if not 0.5 <= a.min_confidence <= 1.0:
        ap.error(f"--min-confidence must be in [0.5, 1], got {a.min_confidence}")
    return a


def _start_round(a, run: Path, out: Path, start_ray=lambda: None) -> dict:
    """Check the input, then (``start_ray()``) label the images and write OUT's search state (stage
    complete: retrain the members)."""
    parent_state_path = layout.state_path(run)
    blend_path = layout.blend_json(run)
    for p in (parent_state_path, blend_path):
        if not p.exists():
            raise DataError(f"{p} not found: --run must be a search run that was blended")
    if out.exists() and any(out.iterdir()):
        raise DataError(f"{out} already exists and is not empty; pass --resume to continue it, or choose a new --out")
    if not a.images:
        raise DataError("--images is required for a new round")
    parent, doc = layout.read_state(run), load_blend(blend_path)
    images = Path(a.images).resolve()
    names = list_images(images)
    train_ids = set(read_truth(run).image_ids)
    held_ids = set(json.loads(layout.holdout_path(run).read_text())["image_ids"]) if layout.holdout_path(run).exists() else set()
    for ids, what in ((train_ids, "training"), (held_ids, "holdout")):
        clash = sorted(set(names) & ids)
        if clash:
            raise DataError(f"{images / clash[0]}: also a {what} image of {run} ({len(clash)} {what} image(s) in {images}); "
                            "pseudo labels are for images without labels")
    shape = tuple(doc["image_shape"])
    got = check_shapes(images, names)
    if tuple(got) != shape:
        raise DataError(f"{images}: images are {got[0]}x{got[1]}, the run's {shape[0]}x{shape[1]}")
    configs = _member_configs(run, doc, a.members)
    start_ray()
    log.info("labelling %d images of %s with %s's blend (%s >= %.2f)", len(names), images, run, a.select, a.min_confidence)
    paths = [images / n for n in names]
    # the whole blend's labels: for reference and for the next round's parent (labels.csv)
    rows, labels = label_images(doc, blend_path, paths, shape, a.min_confidence, a.max_images, select=a.select)
    if not labels:
        raise DataError(f"no image of {images} reaches confidence {a.min_confidence} (best "
                        f"{max(r['confidence'] for r in rows):.3f}); lower --min-confidence")
    lab, imgs = _write_csvs(out, rows, labels)
    # what fold k trains on: labels made by the parent's fold-k models only, which never trained
    # on fold k's labels, so the round's fold-k OOF stays independent of them
    by_fold, tables, n_by_fold = {}, {}, {}
    for k in range(parent.folds):
        log.info("labelling with the parent's fold-%d models (the labels fold %d trains on)", k, k)
        rows_k, labels_k = label_images(fold_doc(doc, k), blend_path, paths, shape, a.min_confidence, a.max_images,
                                        select=a.select)
        lab_k, imgs_k = _write_csvs(out, rows_k, labels_k, f"_fold{k}")
        tables[str(k)], n_by_fold[str(k)] = str(imgs_k), len(labels_k)
        if labels_k:
            by_fold[str(k)] = str(lab_k)
        else:
            log.warning("fold %d: no image reaches confidence %s with the fold-%d models; the fold trains without "
                        "pseudo labels", k, a.min_confidence, k)
    per_class = {str(c + 1): int(sum(bool(v[c]) for v in labels.values())) for c in range(N_CLASSES)}
    state = layout.SearchState(
        data=parent.data, folds=parent.folds, holdout=parent.holdout, seed=parent.seed, storage=where(a.storage),
        stage="complete", selected=tuple(configs), selected_models=tuple(model_ids(configs)),
        started=time.strftime("%Y-%m-%dT%H:%M:%S"), run_id=f"{out.name}-{uuid.uuid4().hex[:12]}",
        id_scheme=ID_SCHEME, mlflow=resolve_uri(a.mlflow),
        pseudo={"parent": str(run), "round": int((parent.pseudo or {}).get("round", 0)) + 1, "labels": str(lab),
                   "labels_by_fold": by_fold, "image_tables_by_fold": tables, "n_images_by_fold": n_by_fold,
                   "images": str(images), "image_table": str(imgs), "min_confidence": a.min_confidence, "select": a.select,
                   "max_images": a.max_images, "members": " ".join(a.members),
                   "n_candidates": len(rows), "n_images": len(labels), "per_class": per_class,
                   "parent_scores": {k: doc["scores"].get(k) for k in ("nested", "holdout", "all_empty", "cross_fitted")},
                   "parent_holdout_all_empty": doc.get("holdout", {}).get("all_empty")})
    layout.write_state(out, state)
    log.info("kept %d of %d images with the whole blend (defects per class %s), per fold %s; retraining %d model(s) on "
             "%d folds", len(labels), len(rows), per_class, n_by_fold, len(configs), parent.folds)
    return state


def main(argv=None) -> int:
    a = _args(argv)
    out, run = Path(a.out).resolve(), Path(a.run).resolve()
    console.setup(None, a.verbose)
    from .workers import ray_session  # lazy: Ray, after the round's input is checked

    # one Ray for the round, started once the input is checked: the labelling runs on its workers,
    # then the retraining's trials
    with contextlib.ExitStack() as stack:
        def start_ray():
            stack.enter_context(ray_session(a.address, a.verbose))

        try:
            if a.resume and layout.state_path(out).exists():
                state = layout.read_state(out)
                if state.pseudo is None:
                    raise DataError(f"{out}: not a pseudo-labelling round")
            else:
                state = _start_round(a, run, out, start_ray)
        except DataError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        # the retraining is the search's complete stage (then its blend), resumed from the state written above
        rc = search.search(out, resume=True, cpus_per_trial=a.cpus_per_trial, gpus_per_trial=a.gpus_per_trial,
                           max_failures=a.max_failures, max_concurrent=a.max_concurrent, address=a.address, verbose=a.verbose,
                           mlflow=a.mlflow if a.resume else None)
    if rc:
        return rc
    doc = load_blend(layout.blend_json(out))
    for line in round_lines(state.pseudo, doc):
        print(line)
    return 0


def round_lines(pseudo: dict, doc: dict) -> list[str]:
    """The parent run's and this round's scores side by side, each beside its all-empty score."""
    p, s = pseudo["parent_scores"], doc["scores"]
    r = pseudo["round"]
    per_fold = pseudo.get("n_images_by_fold")
    lines = [f"pseudo-labelling round {r}: {pseudo['n_images']} of {pseudo['n_candidates']} images kept by the whole blend"
             + (f", per fold {per_fold} by that fold's models (what each fold trained on)" if per_fold else "")
             + f" (min confidence {pseudo['min_confidence']}; defects per class {pseudo['per_class']})",
             f"  {'':28} {'round ' + str(r - 1):>12} {'round ' + str(r):>12}"]
    # the holdout first: the only score no choice of the round (labels, members, cut-off) saw
    if "holdout" in s:
        lines.append(f"  {'holdout (the one to trust)':28} {fmt_score(p.get('holdout')):>12} {fmt_score(s['holdout']):>12}")
        lines.append(f"  {'holdout all-empty':28} {fmt_score(pseudo.get('parent_holdout_all_empty')):>12} "
                     f"{fmt_score(doc['holdout']['all_empty']):>12}")
    lines += [f"  {'blend nested':28} {fmt_score(p['nested']):>12} {fmt_score(s['nested']):>12}",
              f"  {'blend cross-fitted':28} {fmt_score(p.get('cross_fitted')):>12} {fmt_score(s['cross_fitted']):>12}",
              f"  {'all-empty (OOF pool)':28} {fmt_score(p['all_empty']):>12} {fmt_score(s['all_empty']):>12}"]
    if "holdout" not in s:
        lines.append("  (no holdout: the nested and cross-fitted scores of the round saw the parent blend's choices; "
                     "search with --holdout for a score to trust)")
    return lines


if __name__ == "__main__":
    sys.exit(main())
