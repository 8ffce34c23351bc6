"""What each move earns: the gain of each of the blend's moves on the same images, holdout first.

Run:  .venv/bin/python benchmarks/bench_value.py --run runs/demo [--round RUN2 ...] [--boot 2000]

For a searched run (with a holdout), each move is a re-blend of the run's own pool with one
option changed (written under RUN/value/<move>/, the run's own blend is not touched), scored on
the holdout through the predict path like the run's own blend. Per move the table gives the
holdout Dice of the variant and of its reference, their difference on the same images with a 95%
paired bootstrap interval over images (the same resamples for both), and the nested estimates'
difference beside it (the nested estimate has no per-image record: no interval). The moves:

- ensemble vs best single: the blend against a blend of its best single model alone (same
  classifiers, same post-processing search);
- classifier gate vs segmentation gate: the blend against the same selection with the classifiers
  kept out of every gate (``--gate-margin 1e9``); and the classifier gate taken on any gain
  (``--gate-margin 0``) against the default margin;
- the soft gate (``gate_source`` product): every gate source against all but product, at the
  default margin and on any gain;
- fill holes, and the smooth vs argmax post-processing choice, each against the default;
- each pseudo-label round (``--round``) against its parent: their own blends' holdout
  submissions, no new look;
- another search of the same data and holdout (``--versus RUN_B``, e.g. ``--complete-by ensemble``
  against ``single`` at the same explore budget): the two runs' own blends, no new look.

Every variant's holdout score is a look at the holdout and is recorded in RUN/holdout.json
``looks`` like any other: run this after the choices are made, not to make them.
"""
from __future__ import annotations

import argparse
import contextlib
import io
import json
import sys
import time
from pathlib import Path

import numpy as np

from steel_ray import blend
from steel_ray import run as layout
from steel_ray.data import read_labels
from steel_ray.score import pair_dice, pair_rles

HARD = ["segmentation", "classifier", "mean"]  # every gate source but the soft gate


def holdout_dice(run: Path, submission: Path) -> tuple[list[str], np.ndarray]:
    """(image ids, per-image Dice (N,)) of a holdout submission against the run's holdout labels."""
    h = json.loads(layout.holdout_path(run).read_text())
    shape = tuple(h.get("image_shape") or blend.load_blend(layout.blend_json(run))["image_shape"])
    truth = np.array(h["rles"], dtype=object)
    pred = pair_rles(read_labels(submission), h["image_ids"], shape)
    return h["image_ids"], pair_dice(truth, pred, shape, "holdout truth", str(submission)).mean(1)


def paired(a: np.ndarray, b: np.ndarray, n_boot: int, seed: int = 0) -> tuple[float, float, float]:
    """Mean of a - b and its 95% bootstrap interval over images (the same resamples for both)."""
    d = np.asarray(a, np.float64) - np.asarray(b, np.float64)
    idx = np.random.default_rng(seed).integers(0, len(d), (n_boot, len(d)))
    boot = d[idx].mean(1)
    return float(d.mean()), float(np.quantile(boot, 0.025)), float(np.quantile(boot, 0.975))


def variant(run: Path, name: str, models=None, **opts) -> dict:
    """Re-blend the run's pool with ``opts`` into RUN/value/<name>/ and score it on the holdout
    (a recorded look); returns its blend.json document."""
    out = run / "value" / name
    t0 = time.time()
    with contextlib.redirect_stdout(io.StringIO()):  # the blend's own summary: the table below says it
        doc = blend.blend_run(run, models, out=out, holdout_look=True, overlays=False,
                              command=f"benchmarks/bench_value.py {name}", **opts)
    print(f"  {name}: holdout {doc['scores']['holdout']:.6f}, nested {doc['scores']['nested']:.6f} ({time.time() - t0:.0f} s)",
          file=sys.stderr)
    return doc


def _rule(run: Path) -> str:
    """How a search chose the configs it completed (its --complete-by)."""
    state = layout.read_state(run)
    return f"complete-by {state.complete_by if state is not None else 'single'}"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--run", required=True, help="a searched run with a holdout (its own blend in RUN/blend)")
    ap.add_argument("--round", action="extend", nargs="+", default=[], metavar="RUN2", help="pseudo-label rounds of the run, each against its parent")
    ap.add_argument("--versus", action="extend", nargs="+", default=[], metavar="RUN_B",
                    help="other searches of the same data and holdout: the run's own blend against each one's")
    ap.add_argument("--boot", type=int, default=2000, help="bootstrap resamples over images")
    a = ap.parse_args(argv)
    run = Path(a.run)
    if not layout.holdout_path(run).exists():
        print(f"error: {run}: no holdout.json; bench_value needs a run searched with --holdout", file=sys.stderr)
        return 2
    own = blend.load_blend(layout.blend_json(run))
    models = None  # the search's completed models, as the run's own blend
    clfs = own.get("classifier_pool", [])
    print(f"re-blending {run} (each variant is a look at its holdout, recorded in holdout.json):", file=sys.stderr)
    base = variant(run, "default", models)
    single = variant(run, "best_single", [base["scores"]["best_single_model"], *clfs])
    rows = [("ensemble vs best single", base, single, "the blend", f"{base['scores']['best_single_model']} alone")]
    if clfs:
        seg = variant(run, "segmentation_gate", models, gate_margin=1e9)
        anyg = variant(run, "gate_any_gain", models, gate_margin=0.0)
        hard = variant(run, "no_soft_gate", models, gate_sources=HARD)
        anyhard = variant(run, "no_soft_gate_any_gain", models, gate_sources=HARD, gate_margin=0.0)
        rows += [("classifier gate vs segmentation gate", base, seg, "blend (margin 1.645)", "no classifier gate"),
                 ("classifier gate on any gain vs margin", anyg, base, "--gate-margin 0", "--gate-margin 1.645"),
                 ("soft gate (product, 4th place)", base, hard, "all gate sources", "without product"),
                 ("soft gate, on any gain", anyg, anyhard, "all, --gate-margin 0", "without product, --gate-margin 0")]
    rows += [("fill holes", variant(run, "fill_holes", models, fill_holes=True), base, "--fill-holes", "without"),
             ("smooth vs argmax choice", base, variant(run, "argmax", models, choice="argmax"), "smooth", "argmax")]
    h = json.loads(layout.holdout_path(run).read_text())
    empty = float((np.array(h["rles"], dtype=object) == "").mean())
    print(f"\n{run}: holdout {len(h['image_ids'])} images (all-empty {empty:.4f}); nested on the OOF pool "
          f"(all-empty {base['scores']['all_empty']:.4f})\n")
    print("| move | variant | reference | holdout variant | holdout reference | holdout gain [95% CI] | nested gain |")
    print("|---|---|---|---|---|---|---|")
    for move, va, ref, vname, rname in rows:
        _, da = holdout_dice(run, Path(va["holdout"]["submission"]))
        _, db = holdout_dice(run, Path(ref["holdout"]["submission"]))
        m, lo, hi = paired(da, db, a.boot)
        nested = va["scores"]["nested"] - ref["scores"]["nested"]
        print(f"| {move} | {vname} | {rname} | {da.mean():.4f} | {db.mean():.4f} | {m:+.4f} [{lo:+.4f}, {hi:+.4f}] | {nested:+.4f} |")
    others = [(f"pseudo round {r.name} vs parent", Path(r), run) for r in a.round]
    others += [(f"{_rule(run)} vs {_rule(Path(r))}", run, Path(r)) for r in a.versus]
    for move, ra, rb in others:
        da_doc, db_doc = blend.load_blend(layout.blend_json(ra)), blend.load_blend(layout.blend_json(rb))
        ids_a, da = holdout_dice(run, Path(da_doc["holdout"]["submission"]))
        ids_b, db = holdout_dice(run, Path(db_doc["holdout"]["submission"]))
        if ids_a != ids_b:
            print(f"error: {ra} and {rb} scored different holdout images", file=sys.stderr)
            return 2
        m, lo, hi = paired(da, db, a.boot)
        nested = (da_doc["scores"].get("nested") or float("nan")) - (db_doc["scores"].get("nested") or float("nan"))
        print(f"| {move} | {ra.name} | {rb.name} | {da.mean():.4f} | {db.mean():.4f} | {m:+.4f} [{lo:+.4f}, {hi:+.4f}] | "
              f"{nested:+.4f} |")
    looks = len(json.loads(layout.holdout_path(run).read_text()).get("looks", []))
    print(f"\nholdout looks recorded so far: {looks}")
    print(f"reproduce: .venv/bin/python benchmarks/bench_value.py --run {run}" + "".join(f" --round {r}" for r in a.round)
          + "".join(f" --versus {r}" for r in a.versus))
    return 0


if __name__ == "__main__":
    sys.exit(main())
