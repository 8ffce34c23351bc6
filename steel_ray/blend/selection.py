"""Ensemble selection: greedy forward selection with replacement (Caruana et al., ICML 2004) of
the segmentation members, then of the classifier ensemble, each scored by the cross-fitted Dice
after the per-class post-processing search."""
from __future__ import annotations

import numpy as np

from .. import postprocess as ps
from ..data import N_CLASSES


def _weights(counts) -> np.ndarray:
    counts = np.asarray(counts, np.float64)
    return counts / counts.sum(axis=-1, keepdims=True)


def _cf_score(datas, weights, folds, n_folds, grids, classes=range(N_CLASSES)) -> float:
    """Summed cross-fitted Dice over ``classes`` for per-class weights ``weights[c]``."""
    return sum(_cf_class(datas[c], ps.blend_u8(datas[c].vals, weights[c]), ps.blend_cls(datas[c].cls, weights[c]),
                         folds, n_folds, grids[c]) for c in classes)


def _cf_class(d, blended, cls_b, folds, n_folds, grid) -> float:
    return ps.cross_fitted(ps.fold_tables(blended, cls_b, d, folds, n_folds, grid), grid)[0]


def _forward(datas, folds, n_folds, grids, models, max_members, init, classes):
    """Greedy forward selection with replacement over ``models`` (indices).

    Returns the counts at the best step (truncation) and the trajectory (members, score, counts).
    Candidates are scored from running integer sums: with counts c and k = sum(c) slots the
    blend is floor(sum_m c_m p_m / k + 0.5) = (2 S + k) // (2 k), the blend rule exactly.
    """
    counts = np.zeros(datas[0].vals.shape[0], np.int64)
    for m in init:
        counts[m] += 1
    # running sums fit 16 bits up to 257 slots: half the memory traffic of int64
    dtype = np.uint16 if (max(max_members, len(init)) + 1) * 255 < 2**16 else np.int64
    sums = {}
    for c in classes:
        sums[c] = np.zeros(datas[c].vals.shape[1], dtype)
        for m in np.flatnonzero(counts):
            sums[c] += (counts[m] * datas[c].vals[m].astype(dtype)).astype(dtype)
    csum = {c: (counts[:, None] * datas[c].cls).sum(0) for c in classes}
    traj, best_counts, best_score = [], None, -np.inf

    folds = np.asarray(folds)
    unused = (folds < 0) | (folds >= n_folds)  # left out (nested selection): no table counts them
    skip = unused if unused.any() else None
    for c in classes:
        datas[c].check_level(grids[c].t_min)

    def score(add):
        k = int(counts.sum()) + (add is not None)
        # the blend rule as a lookup table over the possible sums, applied inside the counting pass
        lut = ((2 * np.arange(255 * k + 1) + k) // (2 * k)).astype(np.uint8)
        total = 0.0
        for c in classes:
            d, g = datas[c], grids[c]
            area, inter = d.run_index().counts(g.levels, sums[c], None if add is None else d.vals[add], lut, skip)
            cl = csum[c] + d.cls[add] if add is not None else csum[c]
            total += ps.cross_fitted(_tables((area, inter), d, cl / k, folds, n_folds, g), g)[0]
        return total

    if counts.sum():
        best_score, best_counts = score(None), counts.copy()
        traj.append((int(counts.sum()), best_score, counts.copy()))
    while counts.sum() < max_members:
        scores = np.array([score(m) for m in models])
        top = np.flatnonzero(scores >= scores.max() - 1e-12)
        # ties prefer a model already in the ensemble, then the lowest index
        already = [i for i in top if counts[models[i]] > 0]
        pick = models[already[0] if already else top[0]]
        counts[pick] += 1
        for c in classes:
            sums[c] += datas[c].vals[pick]
            csum[c] += datas[c].cls[pick]
        s = float(scores.max())
        traj.append((int(counts.sum()), s, counts.copy()))
        if s > best_score + 1e-12:
            best_counts, best_score = counts.copy(), s
    return best_counts, traj


def select(datas, folds, n_folds, grids, max_members=25, bags=1, bag_fraction=0.5, init_sorted=0,
           classes=range(N_CLASSES), seed=0):
    """Ensemble selection: weights (M,) averaged over bags, plus the first bag's trajectory."""
    m_all = datas[0].vals.shape[0]
    rng = np.random.default_rng(seed)
    singles = None
    if init_sorted:
        singles = [_cf_score(datas, [np.eye(m_all)[m]] * N_CLASSES, folds, n_folds, grids, classes) for m in range(m_all)]
    weights, first_traj = np.zeros(m_all), None
    for b in range(max(1, bags)):
        models = list(range(m_all))
        if bags > 1 and m_all > 1:
            k = max(1, int(round(bag_fraction * m_all)))
            models = sorted(rng.choice(m_all, k, replace=False).tolist())
        init = []
        if singles is not None:
            init = sorted(models, key=lambda m: -singles[m])[:init_sorted]
        counts, traj = _forward(datas, folds, n_folds, grids, models, max_members, init, classes)
        weights += _weights(counts)
        first_traj = first_traj or traj
    return weights / max(1, bags), first_traj


def select_classifiers(datas, seg_weights, clf, folds, n_folds, grid, max_members=25, patience=5, gates=ps.GatePolicy()):
    """Greedy forward selection with replacement of the classifier ensemble, with the segmentation
    blend ``seg_weights`` (4, M) fixed: the objective is the summed cross-fitted Dice where each
    class's gate source (segmentation, classifier, mean) is chosen with its post-processing.

    Starts from no classifier (the segmentation-only score); returns the classifier weights (Mc,)
    at the best step (all zero when no classifier beats segmentation-only gating) and the
    trajectory [(slots, summed score)]. Stops after ``patience`` steps without a gain. A class
    counts a classifier's gate only where it clears the noise, among ``gates``' sources (:class:`steel_ray.postprocess.GatePolicy`).
    """
    n_clf = clf.shape[0]
    soft = "product" in gates.sources
    # with the soft gate: every level from the pruning level up, for its per-image levels (the grid's are among them)
    all_counts = {c: ps.area_inter(ps.blend_u8(datas[c].vals, seg_weights[c]), datas[c], ps.all_levels(datas[c].t_min))
                  if soft else None for c in range(N_CLASSES)}
    counts = {c: at_levels(all_counts[c], datas[c].t_min, grid.levels) if soft
              else ps.area_inter(ps.blend_u8(datas[c].vals, seg_weights[c]), datas[c], grid.levels) for c in range(N_CLASSES)}
    seg_cls = {c: ps.blend_cls(datas[c].cls, seg_weights[c]) for c in range(N_CLASSES)}
    seg_tables = {c: _tables(counts[c], datas[c], seg_cls[c], folds, n_folds, grid) for c in range(N_CLASSES)}

    def score(k_counts) -> float:
        if not k_counts.sum():
            return sum(ps.cross_fitted(seg_tables[c], grid)[0] for c in range(N_CLASSES))
        q = np.tensordot(k_counts / k_counts.sum(), clf, axes=1)  # (N, 4)
        total = 0.0
        for c in range(N_CLASSES):
            prod = soft_counts(all_counts[c], datas[c], q[:, c], grid)
            tabs = _gate_tables(counts[c], datas[c], seg_cls[c], q[:, c], folds, n_folds, grid, seg_tables[c], prod, gates.sources)
            ev = _gate_evidence(counts[c], datas[c], seg_cls[c], q[:, c], folds, n_folds, gates.margin, prod)
            total += ps.cross_fitted_source(tabs, grid, ev)[0]
        return total

    k_counts = np.zeros(n_clf, np.int64)
    best_score = score(k_counts)
    best_counts, traj, stale = k_counts.copy(), [(0, best_score)], 0
    while k_counts.sum() < max_members and stale < patience:
        scores = []
        for m in range(n_clf):
            trial = k_counts.copy()
            trial[m] += 1
            scores.append(score(trial))
        scores = np.array(scores)
        top = np.flatnonzero(scores >= scores.max() - 1e-12)
        already = [i for i in top if k_counts[i] > 0]
        k_counts[already[0] if already else top[0]] += 1
        s = float(scores.max())
        traj.append((int(k_counts.sum()), s))
        if s > best_score + 1e-9:
            best_score, best_counts, stale = s, k_counts.copy(), 0
        else:
            stale += 1
    w = best_counts / best_counts.sum() if best_counts.sum() else np.zeros(n_clf)
    return w, traj


def _tables(counts, d: ps.ClassData, gate, folds, n_folds, grid):
    area, inter = counts
    return ps.tables_from_counts(area, inter, d.true_area, d.area_scale, gate, folds, n_folds, grid)


def at_levels(all_counts, t_min: int, levels):
    """The (N, T) counts at ``levels`` out of counts at every level from ``t_min`` (:func:`postprocess.all_levels`)."""
    idx = np.asarray(levels, np.int64) - int(t_min)
    return all_counts[0][:, idx], all_counts[1][:, idx]


def soft_counts(all_counts, d: ps.ClassData, q, grid):
    """The soft gate's (N, T) area and intersection of one class (:func:`postprocess.product_counts`),
    computed once for its tables, its evidence and its statistics; None without classifier presence
    ``q`` or without the blend's counts at every level (``all_counts``: not asked for, or holes filled)."""
    return None if q is None or all_counts is None else ps.product_counts(all_counts, d.t_min, q, grid.levels)


def _gate_tables(counts, d: ps.ClassData, seg_cls, q, folds, n_folds, grid, seg_tables=None, product=None,
                 sources=tuple(ps.GATE_SOURCES)) -> dict:
    """{gate source: (K, T, A, G) tables} of one class: the segmentation gate alone when there is no
    classifier presence ``q``, else every source of :data:`GATE_SOURCES` (``seg_tables``:
    the segmentation tables when already computed); the soft gate ``product`` only with its counts
    (:func:`soft_counts`); only ``sources`` compete."""
    out = {"segmentation": _tables(counts, d, seg_cls, folds, n_folds, grid) if seg_tables is None else seg_tables}
    if q is not None:
        for src in ("classifier", "mean"):
            if src in sources:
                out[src] = _tables(counts, d, ps.gate_signal(seg_cls, q, src), folds, n_folds, grid)
        if product is not None and "product" in sources:
            out["product"] = _tables(product, d, q, folds, n_folds, grid)
    return out


def _gate_evidence(counts, d: ps.ClassData, seg_cls, q, folds, n_folds, margin, product=None) -> ps.GateEvidence | None:
    """The per-image evidence a classifier's gate must clear in a class (None: no classifier, or no margin)."""
    if q is None or margin <= 0:
        return None
    gates = {src: ps.gate_signal(seg_cls, q, src) for src in ps.GATE_SOURCES}
    extra = {} if product is None else {"product": product}
    return ps.GateEvidence(*counts, d.true_area, d.area_scale, gates, folds, n_folds, margin, extra)

