"""Blend optimizer: ensemble weights and per-class post-processing from the OOF pool, honestly scored.

Usage::

    python -m steel_ray.blend --run runs/demo [--max-members 25] [--bags N] [--per-class-weights]
        [--allow-partial] [--workers N] [--fill-holes]

Greedy forward selection with replacement (Caruana et al., ICML 2004) on the 4x-downsampled
maps (8x or 16x when the 4x maps would hold more than ``--selection-memory``), whose objective
is the cross-fitted score after the per-class post-processing search; then the post-processing
is tuned at full resolution. Scores (all at full resolution):
``in_sample``, ``cross_fitted`` (post-processing chosen on K-1 folds, scored on the held-out
one), ``nested`` (the whole procedure, selection included, rerun without fold k and scored on
fold k), ``best_single`` and ``baseline`` (plain mean, threshold 0.5, min areas
500/500/1000/2000 px at 256x1600, gate 0.5). Writes RUN/blend/blend.json, report.html, report.md.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from .. import console
from .. import postprocess as ps
from .. import run as layout
from ..config import model_ids
from ..data import DataError
from .document import blend_json, summary_lines, write_blend_json
from .holdout import record_look, score_holdout
from .pool import SELECTION_MEMORY_GIB, load_blend_pool
from .report import write_report
from .tune import optimize

log = logging.getLogger("steel_ray.blend")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m steel_ray.blend", description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("\n\n", 1)[1])
    ap.add_argument("--run", required=True, help="run folder with truth.parquet and oof/")
    ap.add_argument("--models", nargs="+", metavar="MODEL_ID",
                    help="models to blend (default: the search's completed models from RUN/search.json, else the whole pool)")
    ap.add_argument("--max-members", type=int, default=25, help="cap on selection slots (repeats allowed)")
    ap.add_argument("--bags", type=int, default=1, help="bagged selections (half the models each), weights averaged")
    ap.add_argument("--init-sorted", type=int, default=0, help="start from the N best single models")
    ap.add_argument("--per-class-weights", action="store_true", help="select weights per class")
    ap.add_argument("--allow-partial", action="store_true", help="blend only models with every fold; report the others")
    ap.add_argument("--fill-holes", action="store_true", help="fill mask holes (exact, streamed image by image: slower than without)")
    ap.add_argument("--no-nested", action="store_true", help="skip the nested score (faster)")
    ap.add_argument("--workers", type=int, default=1, help="processes for the nested folds")
    ap.add_argument("--selection-resolution", choices=["auto", "ds4", "ds8", "ds16", "full"], default="auto",
                    help="maps the selection runs on (auto: when the image is at least 128 px high ds4, or ds8 / ds16 when "
                         "the 4x maps would hold more than --selection-memory); the final tuning and the scores are always "
                         "at full resolution")
    ap.add_argument("--selection-memory", type=float, default=SELECTION_MEMORY_GIB, metavar="GIB",
                    help="most memory the selection maps may hold, every class and model together (default "
                         f"{SELECTION_MEMORY_GIB:g}): they grow with the pixels where some member reaches the lowest threshold, "
                         "up to (models + 5) bytes per 4x pixel; auto picks the finest factor that fits, estimated from a "
                         "sample of the pool. A fixed default, not the free memory: the same pool blends the same everywhere")
    ap.add_argument("--choice", choices=list(ps.CHOICE_RULES), default="smooth",
                    help="how a post-processing point is chosen: smooth (best mean over neighbouring grid points, "
                         "default: small pools overfit less) or argmax (the best point)")
    ap.add_argument("--gate-margin", type=float, default=ps.GATE_MARGIN, metavar="Z",
                    help="a classifier's gate replaces the segmentation gate in a class only when its per-image Dice gain "
                         "exceeds Z standard errors on the images it is chosen on (default 1.645: one-sided 5%%; 0: any gain)")
    ap.add_argument("--gate-sources", nargs="+", choices=list(ps.GATE_SOURCES), metavar="SOURCE",
                    help="the gate sources that compete in each class (default: all: segmentation, classifier, mean, "
                         "product = the soft gate, pixel probability times the classifiers' presence); segmentation always does")
    ap.add_argument("--stream", choices=["auto", "on", "off"], default="auto",
                    help="read full-resolution maps one class at a time from the Parquet files (auto: when the selection "
                         "runs on downsampled maps); off keeps every class in memory")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", metavar="DIR",
                    help="folder for blend.json and the report (default: RUN/blend when the run has no blend yet, else the "
                         "next free RUN/blend-N beside it: the run's own blend, which predict and pseudo rounds use, is kept)")
    ap.add_argument("--replace", action="store_true",
                    help="overwrite the blend in the output folder (with no --out: replace the run's own RUN/blend)")
    ap.add_argument("--score-holdout", action="store_true",
                    help="score this blend on the run's holdout: a look that RUN/holdout.json records (the search "
                         "looked once); without it a re-blend does not score the holdout, so trying options cannot tune on it")
    ap.add_argument("--no-overlays", action="store_true",
                    help="leave the report's Masks section out (it reads the members' full-resolution OOF once more, "
                         "as long as the blend's full-resolution pass on a Severstal-scale pool)")
    ap.add_argument("--mlflow", metavar="URI",
                    help="log this blend to MLflow as a run of the run's experiment (under the search's run when the "
                         "search logged there): sqlite:///runs/mlflow.db, a folder or a tracking server")
    a = ap.parse_args(argv)
    console.setup(a.run if Path(a.run).is_dir() else None, False, "blend")
    try:
        out = _out_dir(a.run, a.out, a.replace)
        doc = blend_run(a.run, a.models, out=out, holdout_look=a.score_holdout, command=_command(argv), overlays=not a.no_overlays,
                  max_members=a.max_members, bags=a.bags, per_class_weights=a.per_class_weights,
                  init_sorted=a.init_sorted, allow_partial=a.allow_partial, fill_holes=a.fill_holes, nested=not a.no_nested,
                  workers=a.workers, seed=a.seed, selection_resolution=a.selection_resolution,
                  selection_memory=a.selection_memory, choice=a.choice,
                  gate_margin=a.gate_margin, gate_sources=None if a.gate_sources is None else ["segmentation", *a.gate_sources],
                  stream={"auto": "auto", "on": True, "off": False}[a.stream])
        if a.mlflow:
            from ..tracking import open_tracker, resolve_uri  # lazy on purpose: mlflow loads only with --mlflow

            open_tracker(resolve_uri(a.mlflow), Path(a.run), layout.read_state(a.run)).log_blend(doc, out, _command(argv))
    except DataError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


def _command(argv) -> str:
    return "python -m steel_ray.blend " + " ".join(sys.argv[1:] if argv is None else map(str, argv))


def _out_dir(run, out, replace: bool) -> Path:
    """Where a CLI re-blend writes: --out, else RUN/blend when it holds no blend (or --replace), else
    the next free RUN/blend-N. An existing blend is overwritten only with --replace."""
    own = layout.blend_dir(run)
    if out is None:
        if replace or not (own / "blend.json").exists():
            return own
        n = 2
        while (Path(run) / f"blend-{n}").exists():
            n += 1
        out = Path(run) / f"blend-{n}"
        log.info("the run's own blend %s is kept (predict and pseudo rounds use it); this blend goes to %s "
                 "(--replace overwrites the run's own)", own, out)
        return out
    out = Path(out)
    if (out / "blend.json").exists() and not replace:
        raise DataError(f"--out {out}: holds a blend already; pass --replace to overwrite it, or choose another folder")
    return out


def search_models(run) -> list[str] | None:
    """The search's completed models (RUN/search.json), or None when the run has no search state."""
    saved = layout.read_state(run)
    if saved is None:
        return None
    return list(saved.selected_models or model_ids(saved.selected)) or None


def blend_run(run, models=None, allow_partial: bool = False, fill_holes: bool = False, stream="auto", out=None,
              holdout_look: bool = True, command: str = "search (the run's own blend)", overlays: bool = True,
              selection_resolution: str = "auto", selection_memory: float = SELECTION_MEMORY_GIB, **opts) -> dict:
    """Blend a run's pool (default: the search's completed models, else the whole pool), write
    blend.json and the report into ``out`` (default: the run's own RUN/blend), print the score
    summary; returns the blend.json document.

    With a holdout and ``holdout_look``, the blend is scored on it and the look is appended to
    RUN/holdout.json ``looks`` (``command`` says who looked); the CLI looks only when asked."""
    if models is None:
        models = search_models(run)
        if models:
            log.info("blending the search's completed models %s (screening-only configs are left out)", models)
    pool = load_blend_pool(run, model_ids=models, allow_partial=allow_partial, fill_holes=fill_holes, stream=stream,
                           selection=selection_resolution, selection_memory=selection_memory)
    if pool.left_out:
        log.warning("left out (missing folds): %s", pool.left_out)
    res = optimize(pool, fill_holes=fill_holes, selection_resolution=selection_resolution, **opts)
    out = Path(out) if out is not None else layout.blend_dir(run)
    doc = blend_json(res, pool, run)
    if layout.holdout_path(run).exists():
        if holdout_look:
            doc = score_holdout(run, doc, out / "blend.json")
            doc["holdout"]["looks"] = record_look(run, doc, out / "blend.json", command)
        else:
            n = len(json.loads(layout.holdout_path(run).read_text()).get("looks", []))
            log.info("the holdout is not scored (looked at %d time(s) so far): pass --score-holdout to look at it", n)
    state = layout.read_state(run)
    if state is not None and state.pseudo is not None:  # a pseudo-labelling round (steel_ray.pseudo)
        doc["pseudo"] = state.pseudo
    write_blend_json(doc, out / "blend.json")
    html = write_report(doc, pool, run, out, overlays=overlays)
    for line in summary_lines(doc):
        print(line)
    print(f"blend.json: {out / 'blend.json'}\nreport:     {html}  (and report.md)")
    return doc

