"""The optimizer: selection (and, for the nested score, the selection without each fold) on the
selection maps, then per-class post-processing and every honest score at full resolution
(:func:`optimize` returns a :class:`BlendResult`)."""
from __future__ import annotations

import logging
import multiprocessing as mp
import signal
import time
from dataclasses import dataclass, field

import numpy as np

from .. import postprocess as ps
from ..console import sigterm_as_exit
from ..data import N_CLASSES
from .pool import BlendPool, _StreamedFull, load_blend_pool
from .selection import _gate_evidence, _gate_tables, _tables, at_levels, select, select_classifiers, soft_counts

log = logging.getLogger("steel_ray.blend")


BASELINE_AREAS = (500, 500, 1000, 2000)  # px at 256x1600 (the original solution's recipe)


BASELINE_LEVEL = 128  # pixel threshold 0.5 as a uint8 level (a level of the default grid)


def _full_counts(pool: BlendPool, c: int, vectors, fill_holes: bool, levels, every_for=()) -> tuple[list, list, ps.ClassData]:
    """Class ``c`` at full resolution for every weight vector of ``vectors``: ``[(area, inter)]``,
    each (N, T) at ``levels``; for each vector ``j`` with ``every_for[j]`` also the counts at every
    level from the pruning level up (the soft gate's, :func:`postprocess.product_counts`; not with
    filled holes), else None; and the class's pixel-free data (true areas, presence, scale).

    A streamed pool is read once, a batch of images at a time, and every vector is evaluated on
    the batch before the next is read: peak memory is one batch of maps plus (N, T) counts per
    vector, whatever fraction of the pixels the models fire on. An in-memory pool is one batch.
    """
    n, m_all = len(pool.image_ids), len(pool.model_ids)
    vectors = [np.asarray(v, np.float64) for v in vectors]
    area = np.zeros((len(vectors), n, len(levels)), np.int64)
    inter = np.zeros_like(area)
    t_min = pool.ds[c].t_min if pool.ds else pool.full[c].t_min
    every = ps.all_levels(t_min)
    wanted = [j for j in range(len(vectors)) if not fill_holes and j < len(every_for) and every_for[j]]
    area_all = {j: np.zeros((n, len(every)), np.int64) for j in wanted}
    inter_all = {j: np.zeros((n, len(every)), np.int64) for j in wanted}
    true_area = np.zeros(n, np.int64)
    streamed = isinstance(pool.full, _StreamedFull)
    batches = (((rows, out["full"][c]) for rows, _, out in pool.full.reader.batches([c], ("full",))) if streamed
               else [(np.arange(n), pool.full[c])])
    truth_mask = pool.truth_mask(c) if fill_holes else None
    # a vector equal to an earlier one (a nested fold that selected the blend's members, a single
    # model the blend is made of) is counted once
    same = {}
    for j, v in enumerate(vectors):
        same.setdefault((v.tobytes(), j in area_all), j)
    first = [same[(v.tobytes(), j in area_all)] for j, v in enumerate(vectors)]
    for rows, d in batches:
        true_area[rows] = d.true_area
        for j, v in enumerate(vectors):
            if first[j] != j:
                area[j, rows], inter[j, rows] = area[first[j], rows], inter[first[j], rows]
                if j in area_all:
                    area_all[j][rows], inter_all[j][rows] = area_all[first[j]][rows], inter_all[first[j]][rows]
                continue
            single = np.count_nonzero(v) == 1  # a single model needs no arithmetic: its own map is the blend
            if fill_holes:
                blended = d.vals[int(np.argmax(v))] if single else ps.blend_u8(d.vals, v)
                a_, i_ = ps.area_inter_filled(blended, d, lambda i: truth_mask(rows[i]), pool.shape, levels,
                                              desc=f"fill holes, class {c + 1}")
            elif j in area_all:  # every level, the grid's among them
                all_ = (d.run_index().counts(every, d.vals[int(np.argmax(v))]) if single
                        else d.run_index().counts_weighted(every, d.vals, v))
                area_all[j][rows], inter_all[j][rows] = all_
                a_, i_ = at_levels(all_, t_min, levels)
            elif single:
                a_, i_ = d.run_index().counts(levels, d.vals[int(np.argmax(v))])
            else:  # the blend rule computed inside the counting pass (no blended map)
                a_, i_ = d.run_index().counts_weighted(levels, d.vals, v)
            area[j, rows], inter[j, rows] = a_, i_
    cls = pool.ds[c].cls if pool.ds else pool.full[c].cls
    meta = ps.ClassData(np.zeros(0, np.int32), np.zeros((m_all, 0), np.uint8), np.zeros(0, bool), true_area, cls, 1.0, t_min)
    return list(zip(area, inter)), [(area_all[j], inter_all[j]) if j in area_all else None for j in range(len(vectors))], meta


@dataclass
class BlendResult:
    model_ids: list[str]
    weights: np.ndarray  # (4, M) per-class weights (rows equal unless per-class)
    postprocess: dict  # "1".."4" -> dict
    scores: dict
    per_class: dict
    trajectory: list
    curves: dict
    nested_weights: list
    fill_holes: bool
    singles: dict
    left_out: list
    settings: dict
    classifiers: list = field(default_factory=list)  # classifier model ids of the pool
    clf_weights: np.ndarray | None = None  # (Mc,) classifier ensemble weights (all 0: none used)


def _clf_blend(pool: BlendPool, clf_weights):
    """(N, 4) classifier-ensemble presence, or None when no classifier has weight."""
    if pool.clf is None or clf_weights is None or not np.any(clf_weights):
        return None
    return np.tensordot(np.asarray(clf_weights, np.float64), pool.clf, axes=1)


def _gate_stats(gate, truth_present, threshold, q) -> dict:
    """Image-level quality of a class's gate at its chosen threshold (and the classifiers' AUC)."""
    from sklearn.metrics import roc_auc_score

    t = np.asarray(truth_present, bool)
    pred = np.asarray(gate) >= threshold
    tp, fp, fn = int((pred & t).sum()), int((pred & ~t).sum()), int((~pred & t).sum())
    both = 0 < t.sum() < len(t)
    return {
        "auc_gate": float(roc_auc_score(t, gate)) if both else None,
        "auc_classifiers": float(roc_auc_score(t, q)) if both and q is not None else None,
        "f1": float(2 * tp / (2 * tp + fp + fn)) if (tp + fp + fn) else 1.0,
        "fp_rate": float(fp / max(1, (~t).sum())), "fn_rate": float(fn / max(1, t.sum())),
        "n_pos": int(t.sum()),
    }


def optimize(pool: BlendPool, max_members: int = 25, bags: int = 1, per_class_weights: bool = False,
             init_sorted: int = 0, fill_holes: bool = False, nested: bool = True, workers: int = 1, seed: int = 0,
             selection_resolution: str = "auto", choice: str = "smooth", gate_margin: float = ps.GATE_MARGIN,
             gate_sources=None) -> BlendResult:
    """Select the ensemble, tune per-class post-processing and compute the honest scores.

    Steps: segmentation selection (greedy, on the selection maps); classifier selection (greedy,
    segmentation blend fixed; only with classifiers in the pool); final per-class tuning at full
    resolution (gate source, pixel threshold, min area, gate threshold); best single model and
    baseline; nested (all of it without fold k, scored on fold k). ``choice`` is how a point is
    chosen from a Dice table (``smooth`` or ``argmax``, see :class:`steel_ray.postprocess.Grid`), everywhere;
    ``gate_margin`` how far a classifier's gate must beat the segmentation gate (standard errors of
    the per-image gain, :class:`steel_ray.postprocess.GateEvidence`; 0: any gain) and ``gate_sources``
    which sources compete (default: all of :data:`postprocess.GATE_SOURCES`), everywhere too.
    """
    t0 = time.time()
    grid = ps.default_grid(pool.shape, choice)
    gates = ps.GatePolicy(gate_margin, tuple(ps.GATE_SOURCES) if gate_sources is None else tuple(gate_sources))
    settings = {"max_members": max_members, "bags": bags, "per_class_weights": per_class_weights,
                "init_sorted": init_sorted, "seed": seed, "choice": choice, "gate_margin": gate_margin,
                "gate_sources": list(gates.sources),
                "grid": {"pixel_levels": grid.levels.tolist(), "min_areas": grid.min_areas.tolist(),
                         "cls_thresholds": grid.cls_thresholds.tolist(), "gate_sources": list(ps.GATE_SOURCES)}}
    held = f"ds{pool.ds_factor}"  # the pool's selection maps (load_blend_pool chose their factor)
    if selection_resolution == "auto":
        # 4x maps track the full-resolution objective once they keep some detail (Severstal:
        # 64x400; 8x when the 4x maps would not fit the memory budget); tiny images are cheap at
        # full resolution and too coarse downsampled.
        selection_resolution = held if min(pool.shape) >= 128 else "full"
    if selection_resolution not in (held, "full"):
        raise ValueError(f"selection_resolution={selection_resolution!r}: the pool holds {held} maps; choose 'auto', "
                         f"{held!r} or 'full' (or load the pool with selection={selection_resolution!r})")
    settings["selection_resolution"] = selection_resolution
    if pool.ds_choice and selection_resolution != "full":
        settings["selection_maps"] = pool.ds_choice
    rule = _Selection(pool.n_folds, grid, max_members, bags, per_class_weights, init_sorted, seed, gates)
    (weights, clf_w, traj, clf_traj), picks = _selections(pool, rule, selection_resolution, nested, workers)
    timings = {"selections": time.time() - t0}
    full = _full_resolution(pool, weights, clf_w, picks, fill_holes, grid, gates, workers)
    timings.update(full.timings)
    settings["timings"] = {k_: round(v, 2) for k_, v in timings.items()}
    settings["classifier_trajectory"] = [{"slots": int(n), "cross_fitted": float(v) / pool.n_pairs} for n, v in clf_traj]
    scores = full.scores(pool.n_pairs)
    nested_weights = [{"segmentation": w.tolist(), "classifiers": None if cw is None else cw.tolist()} for w, cw in picks or []]
    traj_out = [{"members": int(s), "cross_fitted": float(v) / pool.n_pairs} for s, v, _ in traj]
    log.info("scores: %s (%.1fs)", {k_: (round(v, 6) if isinstance(v, float) else v) for k_, v in scores.items()}, time.time() - t0)
    return BlendResult(pool.model_ids, weights, full.post, scores, full.per_class, traj_out, full.curves, nested_weights,
                       fill_holes, full.singles, pool.left_out, settings, list(pool.classifiers), clf_w)


def ensemble_order(run, model_ids, fold: int, inner_folds: int = 3, max_members: int = 25, seed: int = 0) -> list[str]:
    """The models of ``model_ids`` in the order the blend's greedy selection picks them on fold
    ``fold``'s OOF alone (an explore stage's screening fold), cross-fitted on an inner split of its
    images into ``inner_folds``: the members of the best step first, then the models it adds after.
    The complete stage's ``--complete-by ensemble`` completes the first ``top``."""
    pool = load_blend_pool(run, model_ids, folds=[fold])  # full resolution streamed (unused here) when the selection is downsampled
    inner = np.random.default_rng(seed).permutation(len(pool.image_ids)) % inner_folds
    grid = ps.default_grid(pool.shape)
    data = pool.ds if min(pool.shape) >= 128 else [pool.full[c] for c in range(N_CLASSES)]
    weights, traj = select(data, inner, inner_folds, [grid] * N_CLASSES, max_members, seed=seed)
    picked: list[int] = []  # every model the greedy selection adds, in the order it first adds it
    for _, _, counts in traj:
        picked += [int(m) for m in np.flatnonzero(counts) if m not in picked]
    order = [m for m in picked if weights[m] > 0] + [m for m in picked if weights[m] == 0]
    return [pool.model_ids[m] for m in order]


@dataclass(frozen=True)
class _Selection:
    """The selection's settings: :meth:`run` selects on the images of ``folds`` (fold -1: left out)."""

    n_folds: int
    grid: ps.Grid
    max_members: int
    bags: int
    per_class_weights: bool
    init_sorted: int
    seed: int
    gates: ps.GatePolicy

    def run(self, ds, folds, clf):
        """(segmentation weights (4, M), classifier weights (Mc,) or None, trajectories)."""
        grids, k = [self.grid] * N_CLASSES, self.n_folds
        if self.per_class_weights:
            ws, trajs = [], []
            for c in range(N_CLASSES):
                w, tr = select(ds, folds, k, grids, self.max_members, self.bags, init_sorted=self.init_sorted, classes=[c],
                               seed=self.seed)
                ws.append(w)
                trajs.append(tr)
            w, tr = np.array(ws), trajs[0]
        else:
            w, tr = select(ds, folds, k, grids, self.max_members, self.bags, init_sorted=self.init_sorted, seed=self.seed)
            w = np.tile(w, (N_CLASSES, 1))
        if clf is None:
            return w, None, tr, []
        cw, ctr = select_classifiers(ds, w, clf, folds, k, self.grid, self.max_members, gates=self.gates)
        return w, cw, tr, ctr


def _selections(pool: BlendPool, rule: _Selection, resolution: str, nested: bool, workers: int):
    """The blend's selection and, for nested, the selections without each fold (the expensive part),
    together on the worker processes (K + 1 tasks), on the selection maps. Returns the blend's
    (weights, classifier weights, trajectories) and each fold's (weights, classifier weights), or None."""
    # a streamed pool selecting at full resolution needs every class at once: read them all
    sel_data = pool.ds if resolution != "full" else [pool.full[c] for c in range(N_CLASSES)]
    for d in sel_data:
        d.run_index()  # built once here, shared by the forked workers
    t0 = time.time()
    tasks = [None] + (list(range(pool.n_folds)) if nested and pool.n_folds > 1 else [])
    outs = _map(lambda f: _select_without(pool, sel_data, f, rule.run), tasks, workers)
    weights, clf_w = outs[0][:2]
    log.info("%d selection(s) done in %.1fs: %s", len(tasks), time.time() - t0,
             {pool.model_ids[i]: round(float(x), 3) for i, x in enumerate(weights[0]) if x > 0})
    if clf_w is not None:
        used = {pool.classifiers[i]: round(float(x), 3) for i, x in enumerate(clf_w) if x > 0}
        log.info("classifier ensemble: %s", used or "none (no classifier beats the segmentation gate, cross-fitted)")
    return outs[0], ([o[:2] for o in outs[1:]] if len(outs) > 1 else None)


@dataclass
class _Tuned:
    """What the full-resolution pass finds: each class's rule, curves and statistics, and the Dice
    sums of every score (divided by the pair count in :meth:`scores`)."""

    post: dict = field(default_factory=dict)
    curves: dict = field(default_factory=dict)
    per_class: dict = field(default_factory=dict)
    sums: dict = field(default_factory=lambda: dict.fromkeys(("in_sample", "cross_fitted", "cross_fitted_seg", "all_empty",
                                                              "baseline"), 0.0))
    nested: float | None = None
    nested_seg: float | None = None
    singles: dict = field(default_factory=dict)
    timings: dict = field(default_factory=dict)

    def scores(self, n_pairs: int) -> dict:
        s = {k: float(v / n_pairs) for k, v in self.sums.items()}
        return {"in_sample": s["in_sample"], "cross_fitted": s["cross_fitted"],
                "nested": None if self.nested is None else float(self.nested / n_pairs),
                "cross_fitted_segmentation_only": s["cross_fitted_seg"],
                "nested_segmentation_only": None if self.nested_seg is None else float(self.nested_seg / n_pairs),
                "best_single": float(max(self.singles.values())), "best_single_model": max(self.singles, key=self.singles.get),
                "baseline": s["baseline"], "all_empty": s["all_empty"]}


def _full_resolution(pool: BlendPool, weights, clf_w, picks, fill_holes: bool, grid, gates: ps.GatePolicy, workers: int) -> _Tuned:
    """Everything at full resolution, one pass over each class (classes in parallel; a streamed pool
    reads each class once): the blend, every nested fold's blend, each model alone and the
    baseline's plain mean, counted on each batch as it is read; then each class's tuning and scores."""
    q_all = _clf_blend(pool, clf_w)
    # the report's classifier AUC: the chosen ensemble's, else the plain mean of the pool's classifiers
    q_report = q_all if q_all is not None else (None if pool.clf is None else pool.clf.mean(0))
    out = _Tuned()
    nested_q = [_clf_blend(pool, cw) for _, cw in picks or []]  # each fold's classifier presence, once
    single_sums = np.zeros(len(pool.model_ids))
    if picks is not None:
        out.nested, out.nested_seg = 0.0, 0.0
    m_all, n_nested = len(pool.model_ids), len(picks or [])
    mean_w = np.full(m_all, 1.0 / m_all)
    t1 = time.time()
    vectors = [[weights[c], *[w[c] for w, _ in picks or []], *np.eye(m_all), mean_w] for c in range(N_CLASSES)]
    # the counts at every level too where the soft gate competes: the blend's and each nested fold's
    # blend that has a classifier ensemble
    every_for = [q is not None and "product" in gates.sources for q in (q_all, *nested_q)]
    per_class = _map(lambda c: _full_counts(pool, c, vectors[c], fill_holes, grid.levels, every_for), list(range(N_CLASSES)),
                     workers)
    out.timings["full_resolution_pass"] = time.time() - t1
    t2 = time.time()
    for c, (counts, every, meta) in enumerate(per_class):
        _tune_class(meta, c, weights[c], counts[0], q_all, q_report, pool.folds, pool.n_folds, fill_holes, grid, out, gates,
                    every[0])
        single_sums += [ps.cross_fitted(_tables(counts[1 + n_nested + mi], meta, meta.cls[mi], pool.folds, pool.n_folds, grid),
                                        grid)[0] for mi in range(m_all)]
        out.sums["baseline"] += _baseline_class(counts[-1], meta, mean_w, c, pool.shape, grid)
        for f, ((w, _), q) in enumerate(zip(picks or [], nested_q)):
            s_all, s_seg = _nested_score(meta, counts[1 + f], f, w[c], None if q is None else q[:, c], pool.folds, pool.n_folds, grid,
                                         gates, every[1 + f])
            out.nested += s_all
            out.nested_seg += s_seg
    out.timings["tuning_and_scores"] = time.time() - t2
    out.singles = {mid: float(single_sums[mi] / pool.n_pairs) for mi, mid in enumerate(pool.model_ids)}
    return out


def _tune_class(d: ps.ClassData, c: int, w, counts, q_all, q_report, folds, n_folds, fill_holes: bool, grid, out: "_Tuned",
                gates: ps.GatePolicy = ps.GatePolicy(), all_counts=None) -> None:
    """Class ``c`` at full resolution (``counts``: the blend's (N, T) area and intersection, ``all_counts``
    the same at every level for the soft gate, or None; ``d`` the class's true areas and presence):
    its gate source and post-processing (in-sample), the
    cross-fitted scores with and without classifiers, curves and statistics, added to ``out``."""
    n = d.n_images
    seg_cls = ps.blend_cls(d.cls, w)
    q = None if q_all is None else q_all[:, c]
    prod = soft_counts(all_counts, d, q, grid)
    tabs = _gate_tables(counts, d, seg_cls, q, folds, n_folds, grid, product=prod, sources=gates.sources)
    ev = _gate_evidence(counts, d, seg_cls, q, folds, n_folds, gates.margin, prod)
    s_in, src, ch = ps.in_sample_source(tabs, grid, ev)
    s_in_seg, _ = ps.in_sample(tabs["segmentation"], grid)
    out.sums["in_sample"] += s_in
    out.sums["cross_fitted"] += ps.cross_fitted_source(tabs, grid, ev)[0]
    out.sums["cross_fitted_seg"] += ps.cross_fitted(tabs["segmentation"], grid)[0]
    out.post[str(c + 1)] = {"pixel_threshold": ch.pixel_threshold, "min_area": ch.min_area,
                               "cls_threshold": ch.cls_threshold, "fill_holes": fill_holes, "gate_source": src}
    edges = grid.edges(ch)
    if edges:
        log.warning("class %d: chosen point on the grid's edge (%s): the optimum may lie outside the grid", c + 1, "; ".join(edges))
    ti, ai, gi = grid.index(ch)
    tot = tabs[src].sum(0) / n
    out.curves[str(c + 1)] = {"pixel_threshold": (grid.levels / 255).tolist(), "dice_vs_threshold": tot[:, ai, gi].tolist(),
                                 "min_area": grid.min_areas.tolist(), "dice_vs_min_area": tot[ti, :, gi].tolist(),
                                 "cls_threshold": grid.cls_thresholds.tolist(), "dice_vs_cls": tot[ti, ai, :].tolist()}
    gate = ps.gate_signal(seg_cls, q, src)
    empty = d.true_area == 0
    out.sums["all_empty"] += float(empty.sum())
    pc = {"dice": float(s_in / n), "dice_segmentation_only": float(s_in_seg / n), "n_true": int((~empty).sum()),
          "n_empty": int(empty.sum()), "all_empty": float(empty.mean()), "on_grid_edge": edges,
          "gate": {"source": src, "threshold": ch.cls_threshold,
                   **_gate_stats(gate, ~empty, ch.cls_threshold, None if q_report is None else q_report[:, c])}}
    if not fill_holes:
        area, _ = prod if src == "product" else counts
        kept = (area[:, ti] > 0) & (area[:, ti] * d.area_scale >= ch.min_area) & (gate >= ch.cls_threshold)
        pc["fp_rate_on_empty"] = float(kept[empty].mean()) if empty.any() else 0.0
    out.per_class[str(c + 1)] = pc


def _baseline_class(counts, d: ps.ClassData, mean_w, c: int, shape, grid) -> float:
    """Class ``c``'s Dice sum of the baseline recipe (plain mean, threshold 0.5, the recipe's min
    areas, gate 0.5) from the plain mean's counts at the grid's levels."""
    ch = ps.Choice(BASELINE_LEVEL, float(round(BASELINE_AREAS[c] * shape[0] * shape[1] / ps.SEVERSTAL_AREA)), 0.5)
    t = int(np.flatnonzero(grid.levels == BASELINE_LEVEL)[0])
    area, inter = counts
    return float(ps.score_counts(area[:, t], inter[:, t], d.true_area, d.area_scale, ps.blend_cls(d.cls, mean_w), ch).sum())


def _select_without(pool: BlendPool, sel_data, f, run_selection):
    """``run_selection``'s result (weights, classifier weights, trajectories) without fold ``f``
    (``None``: on every fold, the blend's own selection).

    Fold ``f``'s images stay in the arrays with fold -1, which no fold table counts: the same
    choices as on a copy without them, and a forked worker shares the parent's pages instead of
    copying most of the pool.
    """
    folds = pool.folds if f is None else np.where(pool.folds == f, -1, pool.folds)
    return run_selection(sel_data, folds, pool.clf)


def _nested_score(d: ps.ClassData, counts, f: int, w, q, folds, n_folds, grid, gates=ps.GatePolicy(), all_counts=None) -> tuple[float, float]:
    """Held-out Dice sums of one class on fold ``f`` (with the classifiers, segmentation gate only)
    for segmentation weights ``w`` and classifier presence ``q`` (N,) chosen without fold ``f``
    (``counts``: that blend's (N, T) area and intersection); the post-processing is chosen on the
    other folds too."""
    seg_cls = ps.blend_cls(d.cls, w)
    prod = soft_counts(all_counts, d, q, grid)
    tabs = _gate_tables(counts, d, seg_cls, q, folds, n_folds, grid, product=prod, sources=gates.sources)
    ev = _gate_evidence(counts, d, seg_cls, q, folds, n_folds, gates.margin, prod)
    src, ch = ps.choose_source(tabs, grid, exclude=f, evidence=ev)
    ch_seg = ps.choose(tabs["segmentation"], grid, exclude=f)
    return float(tabs[src][(f, *grid.index(ch))]), float(tabs["segmentation"][(f, *grid.index(ch_seg))])


def _map(fn, items, workers):
    if workers <= 1 or len(items) <= 1:
        return [fn(x) for x in items]
    global _MAP_FN
    _MAP_FN = fn
    # leaving the with-block (also on Ctrl-C or SIGTERM) terminates the workers: no orphans
    with sigterm_as_exit(), mp.get_context("fork").Pool(min(workers, len(items)), initializer=_worker_signals) as p:
        return p.map(_call_map_fn, items)


_MAP_FN = None


def _worker_signals():
    """A forked worker dies at once on SIGTERM (Pool.terminate's signal). It would otherwise inherit
    the parent's SIGTERM-as-SystemExit handler, unwind and hang in its exit clean-up (seen: a worker
    blocked on a lock forever, the parent in terminate's join, after the SIGTERM test)."""
    signal.signal(signal.SIGTERM, signal.SIG_DFL)


def _call_map_fn(x):
    return _MAP_FN(x)

