"""Blend optimizer: ensemble weights and per-class post-processing from the OOF pool, honestly scored.

Usage::

    python -m steel_ray.blend --run runs/demo [--max-members 25] [--bags N] [--per-class-weights]
        [--allow-partial] [--workers N] [--fill-holes]

Greedy forward selection with replacement (Caruana et al., ICML 2004) on the 4x-downsampled
maps, whose objective is the cross-fitted score after the per-class post-processing search;
then the post-processing is tuned at full resolution. Scores (all at full resolution):
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
import time
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np

from . import oof
from . import ppsearch as ps
from . import run as layout
from .config import model_ids
from .data import N_CLASSES, DataError
from .io import write_json

__all__ = ["BlendPool", "load_blend_pool", "optimize", "BlendResult", "select", "write_blend_json", "blend_run", "summary_lines", "main"]

log = logging.getLogger("steel_ray.blend")
BASELINE_AREAS = (500, 500, 1000, 2000)  # px at 256x1600 (the original solution's recipe)
BASELINE_LEVEL = 128  # pixel threshold 0.5 as a uint8 level (a level of the default grid)


@dataclass
class BlendPool:
    """Everything the optimizer needs, per class, at both resolutions (pixels pruned at t_min)."""

    model_ids: list[str]
    image_ids: list[str]
    folds: np.ndarray
    n_folds: int
    shape: tuple[int, int]
    full: list[ps.ClassData]  # 4 classes, full resolution (or a _StreamedFull reading one class at a time)
    ds: list[ps.ClassData]  # 4 classes, 4x downsampled
    left_out: list[str] = field(default_factory=list)
    checkpoints: dict = field(default_factory=dict)  # model_id -> [best.pt per fold]
    truth: oof.Truth | None = None  # ground truth (RLE per image x class), for --fill-holes
    classifiers: list[str] = field(default_factory=list)  # task: classify models of the pool
    clf: np.ndarray | None = None  # (Mc, N, 4) float32 classifier presence (OOF), None without classifiers

    def truth_mask(self, c: int):
        """``i -> (H, W) bool`` truth of class ``c`` (None where empty), decoded on demand."""
        from . import rle

        def get(i):
            s = self.truth.rles[i, c]
            return rle.decode(s, self.shape) if s else None

        return get

    @property
    def n_pairs(self) -> int:
        return len(self.image_ids) * N_CLASSES


def _truth_ds(mask: np.ndarray) -> np.ndarray:
    """4x area-downsampled truth (a cell is true when at least half of it is)."""
    h, w = mask.shape
    hh, ww = -(-h // oof.DS), -(-w // oof.DS)
    return cv2.resize(mask.astype(np.float32), (ww, hh), interpolation=cv2.INTER_AREA) >= 0.5


def load_blend_pool(run, model_ids=None, allow_partial=False, t_min=None, fill_holes=False, stream="auto") -> BlendPool:
    """Stream the run's OOF pool into pruned per-class arrays (memory ~ kept pixels x models).

    ``fill_holes`` also keeps each kept pixel's position (4 bytes a pixel) for the hole-filling search.
    ``stream`` (``auto``: when the selection runs on the 4x maps, i.e. images at least 128 px high)
    keeps only the 4x maps of every class in memory and reads one class at full resolution at a
    time from the Parquet files, when the blend asks for it (:class:`_StreamedFull`): peak memory
    is then about one class's kept full-resolution pixels, however many fire where.
    """
    run = Path(run)
    truth = oof.read_truth(run)
    present = oof.list_pool(run)
    folds_all = sorted(set(truth.folds.tolist()))
    candidates = list(model_ids) if model_ids is not None else sorted(present)
    gaps = [(m, f) for m in candidates for f in folds_all if f not in present.get(m, [])]
    left_out = sorted({m for m, _ in gaps})
    if gaps and not allow_partial:
        raise oof.PoolGapError(gaps)
    models = [m for m in candidates if m not in left_out]
    if not models:
        raise DataError(f"{run}: no model has OOF for every fold ({len(folds_all)} folds); nothing to blend")
    tasks = {m: oof.task_of(run, m, folds_all) for m in models}
    classifiers = [m for m in models if tasks[m] == "classify"]
    models = [m for m in models if tasks[m] == "segment"]
    if not models:
        raise DataError(f"{run}: the pool has classifiers {classifiers} but no segmentation model; a blend needs masks")
    clf = np.stack([oof.read_presence(run, m, truth, folds_all) for m in classifiers]) if classifiers else None
    grid = ps.default_grid(truth.shape)
    t_min = grid.t_min if t_min is None else t_min
    n, h, w = len(truth.image_ids), *truth.shape
    streamed = stream is True or (stream == "auto" and min(h, w) >= 128)
    reader = _ClassReader(run, models, truth, folds_all, t_min, fill_holes)
    if streamed:
        ds = list(reader.read(range(N_CLASSES), ("ds",))["ds"].values())
        full = _StreamedFull(reader)
        log.info("pool: %d models x %d images, kept %.2f%% of 4x pixels (t_min %d); full resolution streamed class by class",
                 len(models), n, 100 * sum(d.vals.shape[1] for d in ds) / (N_CLASSES * n * -(-h // oof.DS) * -(-w // oof.DS)), t_min)
    else:
        both = reader.read(range(N_CLASSES), ("full", "ds"))
        full, ds = list(both["full"].values()), list(both["ds"].values())
        log.info("pool: %d models x %d images, kept %.2f%% of full-res pixels (t_min %d)", len(models), n,
                 100 * sum(d.vals.shape[1] for d in full) / (N_CLASSES * n * h * w), t_min)
    ckpts = {m: [str(layout.best_weights(run, m, f)) for f in folds_all] for m in models + classifiers}
    if classifiers:
        log.info("pool: %d classifier(s) for the gate: %s", len(classifiers), classifiers)
    return BlendPool(models, list(truth.image_ids), truth.folds, len(folds_all), (h, w), full, ds,
                     left_out, ckpts, truth if fill_holes else None, classifiers, clf)


class _ClassReader:
    """Reads chosen classes at chosen resolutions from a pool's OOF files into pruned ClassData,
    batch by batch (only the needed map columns are read); every file is checked first."""

    def __init__(self, run, models, truth, folds_all, t_min, fill_holes):
        self.run, self.models, self.truth, self.folds_all = run, models, truth, folds_all
        self.t_min, self.fill_holes = t_min, fill_holes
        self.passes = 0  # reads of the files (each reads only the asked-for columns)
        self.buffers = {}  # resolution -> reused batch buffer

    def _buffer(self, res, shape) -> np.ndarray:
        """A reused uint8 array of ``shape`` per resolution (fresh pages cost as much as the copy)."""
        size = int(np.prod(shape))
        if res not in self.buffers or self.buffers[res].size < size:
            self.buffers[res] = np.empty(size, np.uint8)
        return self.buffers[res][:size].reshape(shape)

    def batches(self, classes, resolutions):
        """Yield ``(rows, cls, {resolution: {class: ClassData of the batch's images}})`` over the pool,
        one batch of images at a time (``rows``: the images' indices; ``cls``: (M, B, 4) presence)."""
        models, truth, t_min = self.models, self.truth, self.t_min
        h, w = truth.shape
        hh, ww = -(-h // oof.DS), -(-w // oof.DS)
        classes = list(classes)
        cols = ["image_id", "cls"] + [f"p{c + 1}{'' if r == 'full' else f'_ds{oof.DS}'}" for r in resolutions for c in classes]
        self.passes += 1
        for f in self.folds_all:
            # the one OOF reader: files checked (split, size, image set), read in lockstep
            for rows, batches, paths in oof.iter_fold_batches(self.run, models, truth, f, cols):
                cls = np.stack([np.asarray(b.column("cls").to_pylist(), np.float32) for b in batches])
                out = {r: {} for r in resolutions}
                for c in classes:
                    tmask = truth.masks(rows, [c])[:, 0]
                    for res in resolutions:
                        col, shape = (f"p{c + 1}", (h, w)) if res == "full" else (f"p{c + 1}_ds{oof.DS}", (hh, ww))
                        # every model's maps copied once into one reused (M, B, h, w) buffer
                        probs = self._buffer(res, (len(models), len(rows), *shape))
                        for mi, (b, p) in enumerate(zip(batches, paths)):
                            oof.maps(b, col, shape, p, out=probs[mi])
                        if res == "full":
                            tm, scale = tmask, 1.0
                        else:
                            tm, scale = np.stack([_truth_ds(t) for t in tmask]), float(oof.DS * oof.DS)
                        out[res][c] = ps.ClassData.from_dense(probs, tm, cls[:, :, c], t_min, scale,
                                                              positions=self.fill_holes and res == "full")
                yield rows, cls, out

    def read(self, classes, resolutions) -> dict:
        """``{resolution: {class: ClassData}}`` for the given classes and resolutions (``full``, ``ds``)."""
        n = len(self.truth.image_ids)
        classes = list(classes)
        m = len(self.models)
        idt = np.int32 if n < 2**23 else np.int64
        pos = self.fill_holes and "full" in resolutions
        # kept pixels go into blocks as they are read, then into one array per column block by block
        # (_Blocks): the kept count is known only after the last batch, and concatenating the
        # batches' pieces would hold the pool twice for a moment
        parts = {r: {c: {"img": _Blocks((), idt), "vals": _Blocks((m,), np.uint8), "truth": _Blocks((), bool),
                         **({"pix": _Blocks((), np.int32)} if pos and r == "full" else {})} for c in classes} for r in resolutions}
        cls = np.zeros((m, n, N_CLASSES), np.float32)
        true_area = {r: np.zeros((N_CLASSES, n), np.int64) for r in resolutions}
        for rows, cls_b, out in self.batches(classes, resolutions):
            cls[:, rows] = cls_b
            for res in resolutions:
                for c in classes:
                    d, p = out[res][c], parts[res][c]
                    true_area[res][c, rows] = d.true_area
                    p["img"].add(rows[d.img].astype(idt, copy=False))
                    p["vals"].add(d.vals)
                    p["truth"].add(d.truth)
                    if "pix" in p:
                        p["pix"].add(d.pix)
        out = {}
        for res in resolutions:
            scale = 1.0 if res == "full" else float(oof.DS * oof.DS)
            out[res] = {}
            for c in classes:
                p = {k: b.finish() for k, b in parts[res].pop(c).items()}
                out[res][c] = ps.ClassData(p["img"], p["vals"], p["truth"], true_area[res][c], cls[:, :, c].copy(), scale,
                                           self.t_min, p.get("pix"))
        return out


class _Blocks:
    """An array of shape ``(*lead, n)`` built by appending pieces along its last axis, for an ``n``
    known only at the end. Pieces are copied into blocks as they come (1 MiB, doubling up to 64 MiB:
    a small pool does not pay for large blocks, whose first touch commits whole huge pages, and
    numpy takes the large ones from mmap, so freeing one gives its memory back at once); ``finish``
    allocates the result (pages committed as they are written) and moves the blocks in one by one,
    freeing each: the peak is the result plus one block, where ``np.concatenate`` over the pieces
    holds the pieces and the result together. Written here because numpy has no growable array
    with this property."""

    FIRST, BLOCK = 1 << 20, 64 << 20

    def __init__(self, lead: tuple, dtype):
        self.lead, self.dtype = tuple(lead), np.dtype(dtype)
        self.col_bytes = max(1, int(np.prod(self.lead))) * self.dtype.itemsize
        self.blocks, self.fill = [], 0  # fill: columns used in the last block

    def add(self, piece: np.ndarray) -> None:
        off, n = 0, piece.shape[-1]
        while off < n:
            if not self.blocks or self.fill == self.blocks[-1].shape[-1]:
                size = min(self.BLOCK, self.FIRST << len(self.blocks))
                self.blocks.append(np.empty((*self.lead, max(1, size // self.col_bytes)), self.dtype))
                self.fill = 0
            k = min(n - off, self.blocks[-1].shape[-1] - self.fill)
            self.blocks[-1][..., self.fill:self.fill + k] = piece[..., off:off + k]
            self.fill, off = self.fill + k, off + k

    def finish(self) -> np.ndarray:
        total = sum(b.shape[-1] for b in self.blocks[:-1]) + self.fill
        out = np.empty((*self.lead, total), self.dtype)
        off = 0
        while self.blocks:
            block = self.blocks.pop(0)
            k = block.shape[-1] if self.blocks else self.fill
            out[..., off:off + k] = block[..., :k]
            off += k
            del block
        return out


class _StreamedFull:
    """``pool.full[c]`` of a streamed pool: class ``c`` at full resolution, read from the Parquet
    files on use and kept until another class is asked for. The optimizer does not use it (it
    reads batches, :func:`_full_counts`); it serves ad-hoc access such as tests and reports."""

    def __init__(self, reader: _ClassReader):
        self.reader, self.loaded, self.data = reader, None, None

    def __len__(self) -> int:
        return N_CLASSES

    def __getitem__(self, c: int) -> ps.ClassData:
        if self.loaded != c:
            self.data = None  # release the previous class before reading the next
            self.data = self.reader.read([c], ("full",))["full"][c]
            self.loaded = c
        return self.data

    def __iter__(self):
        return (self[c] for c in range(N_CLASSES))


def _full_counts(pool: BlendPool, c: int, vectors, fill_holes: bool, levels) -> tuple[list, ps.ClassData]:
    """Class ``c`` at full resolution for every weight vector of ``vectors``: ``[(area, inter)]``,
    each (N, T) at ``levels``, and the class's pixel-free data (true areas, presence, scale).

    A streamed pool is read once, a batch of images at a time, and every vector is evaluated on
    the batch before the next is read: peak memory is one batch of maps plus (N, T) counts per
    vector, whatever fraction of the pixels the models fire on. An in-memory pool is one batch.
    """
    n, m_all = len(pool.image_ids), len(pool.model_ids)
    vectors = [np.asarray(v, np.float64) for v in vectors]
    area = np.zeros((len(vectors), n, len(levels)), np.int64)
    inter = np.zeros_like(area)
    true_area = np.zeros(n, np.int64)
    streamed = isinstance(pool.full, _StreamedFull)
    batches = (((rows, out["full"][c]) for rows, _, out in pool.full.reader.batches([c], ("full",))) if streamed
               else [(np.arange(n), pool.full[c])])
    truth_mask = pool.truth_mask(c) if fill_holes else None
    for rows, d in batches:
        true_area[rows] = d.true_area
        for j, v in enumerate(vectors):
            single = np.count_nonzero(v) == 1  # a single model needs no arithmetic: its own map is the blend
            if fill_holes:
                blended = d.vals[int(np.argmax(v))] if single else ps.blend_u8(d.vals, v)
                a_, i_ = ps.area_inter_filled(blended, d, lambda i: truth_mask(rows[i]), pool.shape, levels,
                                              desc=f"fill holes, class {c + 1}")
            elif single:
                a_, i_ = d.run_index().counts(levels, d.vals[int(np.argmax(v))])
            else:  # the blend rule computed inside the counting pass (no blended map)
                a_, i_ = d.run_index().counts_weighted(levels, d.vals, v)
            area[j, rows], inter[j, rows] = a_, i_
    cls = pool.ds[c].cls if pool.ds else pool.full[c].cls
    meta = ps.ClassData(np.zeros(0, np.int32), np.zeros((m_all, 0), np.uint8), np.zeros(0, bool), true_area, cls, 1.0,
                        pool.ds[c].t_min if pool.ds else pool.full[c].t_min)
    return list(zip(area, inter)), meta


# --------------------------------------------------------------------------- selection


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


def select_classifiers(datas, seg_weights, clf, folds, n_folds, grid, max_members=25, patience=5, margin=ps.GATE_MARGIN):
    """Greedy forward selection with replacement of the classifier ensemble, with the segmentation
    blend ``seg_weights`` (4, M) fixed: the objective is the summed cross-fitted Dice where each
    class's gate source (segmentation, classifier, mean) is chosen with its post-processing.

    Starts from no classifier (the segmentation-only score); returns the classifier weights (Mc,)
    at the best step (all zero when no classifier beats segmentation-only gating) and the
    trajectory [(slots, summed score)]. Stops after ``patience`` steps without a gain. A class
    counts a classifier's gate only where it clears the noise (``margin``, :class:`ppsearch.GateEvidence`).
    """
    n_clf = clf.shape[0]
    counts = {c: ps.area_inter(ps.blend_u8(datas[c].vals, seg_weights[c]), datas[c], grid.levels) for c in range(N_CLASSES)}
    seg_cls = {c: ps.blend_cls(datas[c].cls, seg_weights[c]) for c in range(N_CLASSES)}
    seg_tables = {c: _tables(counts[c], datas[c], seg_cls[c], folds, n_folds, grid) for c in range(N_CLASSES)}

    def score(k_counts) -> float:
        if not k_counts.sum():
            return sum(ps.cross_fitted(seg_tables[c], grid)[0] for c in range(N_CLASSES))
        q = np.tensordot(k_counts / k_counts.sum(), clf, axes=1)  # (N, 4)
        return sum(ps.cross_fitted_source(_gate_tables(counts[c], datas[c], seg_cls[c], q[:, c], folds, n_folds, grid, seg_tables[c]),
                                          grid, _gate_evidence(counts[c], datas[c], seg_cls[c], q[:, c], folds, n_folds, margin))[0]
                   for c in range(N_CLASSES))

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


def _gate_tables(counts, d: ps.ClassData, seg_cls, q, folds, n_folds, grid, seg_tables=None) -> dict:
    """{gate source: (K, T, A, G) tables} of one class: the segmentation gate alone when there is no
    classifier presence ``q``, else every source of :data:`ppsearch.GATE_SOURCES` (``seg_tables``:
    the segmentation tables when already computed)."""
    out = {"segmentation": _tables(counts, d, seg_cls, folds, n_folds, grid) if seg_tables is None else seg_tables}
    if q is not None:
        for src in ("classifier", "mean"):
            out[src] = _tables(counts, d, ps.gate_signal(seg_cls, q, src), folds, n_folds, grid)
    return out


def _gate_evidence(counts, d: ps.ClassData, seg_cls, q, folds, n_folds, margin) -> ps.GateEvidence | None:
    """The per-image evidence a classifier's gate must clear in a class (None: no classifier, or no margin)."""
    if q is None or margin <= 0:
        return None
    gates = {src: ps.gate_signal(seg_cls, q, src) for src in ps.GATE_SOURCES}
    return ps.GateEvidence(*counts, d.true_area, d.area_scale, gates, folds, n_folds, margin)


# --------------------------------------------------------------------------- scoring


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
             selection_resolution: str = "auto", choice: str = "smooth", gate_margin: float = ps.GATE_MARGIN) -> BlendResult:
    """Select the ensemble, tune per-class post-processing and compute the honest scores.

    Steps: segmentation selection (greedy, on the selection maps); classifier selection (greedy,
    segmentation blend fixed; only with classifiers in the pool); final per-class tuning at full
    resolution (gate source, pixel threshold, min area, gate threshold); best single model and
    baseline; nested (all of it without fold k, scored on fold k). ``choice`` is how a point is
    chosen from a Dice table (``smooth`` or ``argmax``, see :class:`ppsearch.Grid`), everywhere;
    ``gate_margin`` how far a classifier's gate must beat the segmentation gate (standard errors of
    the per-image gain, :class:`ppsearch.GateEvidence`; 0: any gain), everywhere too.
    """
    t0 = time.time()
    grid = ps.default_grid(pool.shape, choice)
    grids = [grid] * N_CLASSES
    k = pool.n_folds
    settings = {"max_members": max_members, "bags": bags, "per_class_weights": per_class_weights,
                "init_sorted": init_sorted, "seed": seed, "choice": choice, "gate_margin": gate_margin,
                "grid": {"pixel_levels": grid.levels.tolist(), "min_areas": grid.min_areas.tolist(),
                         "cls_thresholds": grid.cls_thresholds.tolist(), "gate_sources": list(ps.GATE_SOURCES)}}

    def run_selection(ds, folds, clf):
        """(segmentation weights (4, M), classifier weights (Mc,) or None, trajectories) on images ``folds``."""
        if per_class_weights:
            ws, trajs = [], []
            for c in range(N_CLASSES):
                w, tr = select(ds, folds, k, grids, max_members, bags, init_sorted=init_sorted, classes=[c], seed=seed)
                ws.append(w)
                trajs.append(tr)
            w, tr = np.array(ws), trajs[0]
        else:
            w, tr = select(ds, folds, k, grids, max_members, bags, init_sorted=init_sorted, seed=seed)
            w = np.tile(w, (N_CLASSES, 1))
        if clf is None:
            return w, None, tr, []
        cw, ctr = select_classifiers(ds, w, clf, folds, k, grid, max_members, margin=gate_margin)
        return w, cw, tr, ctr

    if selection_resolution == "auto":
        # 4x maps track the full-resolution objective once they keep some detail (Severstal:
        # 64x400); tiny images are cheap at full resolution and too coarse at 4x.
        selection_resolution = "ds4" if min(pool.shape) >= 128 else "full"
    if selection_resolution not in ("ds4", "full"):
        raise ValueError(f"selection_resolution={selection_resolution!r}; choose 'auto', 'ds4' or 'full'")
    settings["selection_resolution"] = selection_resolution
    # a streamed pool selecting at full resolution needs every class at once: read them all
    sel_data = pool.ds if selection_resolution == "ds4" else [pool.full[c] for c in range(N_CLASSES)]
    # the selection and, for nested, the selections without each fold (the expensive part) run
    # together on the worker processes (K + 1 tasks), on the selection maps
    for d in sel_data:
        d.run_index()  # built once here, shared by the forked workers
    tasks = [None] + (list(range(k)) if nested and k > 1 else [])
    outs = _map(lambda f: _select_without(pool, sel_data, f, run_selection), tasks, workers)
    (weights, clf_w, traj, clf_traj), picks = outs[0], ([o[:2] for o in outs[1:]] if len(outs) > 1 else None)
    timings = {"selections": time.time() - t0}
    log.info("%d selection(s) done in %.1fs: %s", len(tasks), time.time() - t0,
             {pool.model_ids[i]: round(float(x), 3) for i, x in enumerate(weights[0]) if x > 0})
    if clf_w is not None:
        used = {pool.classifiers[i]: round(float(x), 3) for i, x in enumerate(clf_w) if x > 0}
        log.info("classifier ensemble: %s", used or "none (no classifier beats the segmentation gate, cross-fitted)")

    # then everything at full resolution: a streamed pool reads each class once
    q_all = _clf_blend(pool, clf_w)
    # the report's classifier AUC: the chosen ensemble's, else the plain mean of the pool's classifiers
    q_report = q_all if q_all is not None else (None if pool.clf is None else pool.clf.mean(0))
    tuned = {"post": {}, "curves": {}, "per_class": {}, "in_sample": 0.0, "cross_fitted": 0.0, "cross_fitted_seg": 0.0,
             "all_empty": 0.0}
    nested_q = [_clf_blend(pool, cw) for _, cw in picks or []]  # each fold's classifier presence, once
    single_sums, base = np.zeros(len(pool.model_ids)), 0.0
    nested_total, nested_seg = (0.0, 0.0) if picks is not None else (None, None)
    m_all, n_nested = len(pool.model_ids), len(picks or [])
    mean_w = np.full(m_all, 1.0 / m_all)
    # one pass over each class at full resolution, classes in parallel: the blend, every nested
    # fold's blend, each model alone and the baseline's plain mean, counted on each batch as it is read
    t1 = time.time()
    vectors = [[weights[c], *[w[c] for w, _ in picks or []], *np.eye(m_all), mean_w] for c in range(N_CLASSES)]
    per_class = _map(lambda c: _full_counts(pool, c, vectors[c], fill_holes, grid.levels), list(range(N_CLASSES)), workers)
    timings["full_resolution_pass"] = time.time() - t1
    t2 = time.time()
    for c, (counts, meta) in enumerate(per_class):
        _tune_class(meta, c, weights[c], counts[0], q_all, q_report, pool.folds, pool.n_folds, fill_holes, grid, tuned, gate_margin)
        single_sums += [ps.cross_fitted(_tables(counts[1 + n_nested + mi], meta, meta.cls[mi], pool.folds, pool.n_folds, grid),
                                        grid)[0] for mi in range(m_all)]
        base += _baseline_class(counts[-1], meta, mean_w, c, pool.shape, grid)
        for f, ((w, _), q) in enumerate(zip(picks or [], nested_q)):
            s_all, s_seg = _nested_score(meta, counts[1 + f], f, w[c], None if q is None else q[:, c], pool.folds, pool.n_folds, grid,
                                         gate_margin)
            nested_total += s_all
            nested_seg += s_seg
    timings["tuning_and_scores"] = time.time() - t2
    singles = {mid: float(single_sums[mi] / pool.n_pairs) for mi, mid in enumerate(pool.model_ids)}
    best_single = max(singles.values())
    nested_weights = [{"segmentation": w.tolist(), "classifiers": None if cw is None else cw.tolist()} for w, cw in picks or []]
    if picks is not None:
        nested_total /= pool.n_pairs
        nested_seg /= pool.n_pairs
    settings["timings"] = {k_: round(v, 2) for k_, v in timings.items()}
    settings["classifier_trajectory"] = [{"slots": int(n), "cross_fitted": float(v) / pool.n_pairs} for n, v in clf_traj]
    n_pairs = pool.n_pairs
    scores = {"in_sample": float(tuned["in_sample"] / n_pairs), "cross_fitted": float(tuned["cross_fitted"] / n_pairs),
              "nested": None if nested_total is None else float(nested_total),
              "cross_fitted_segmentation_only": float(tuned["cross_fitted_seg"] / n_pairs),
              "nested_segmentation_only": None if nested_seg is None else float(nested_seg),
              "best_single": float(best_single), "best_single_model": max(singles, key=singles.get), "baseline": float(base / n_pairs),
              "all_empty": float(tuned["all_empty"] / n_pairs)}
    traj_out = [{"members": int(s), "cross_fitted": float(v) / pool.n_pairs} for s, v, _ in traj]
    log.info("scores: %s (%.1fs)", {k_: (round(v, 6) if isinstance(v, float) else v) for k_, v in scores.items()}, time.time() - t0)
    return BlendResult(pool.model_ids, weights, tuned["post"], scores, tuned["per_class"], traj_out, tuned["curves"], nested_weights,
                       fill_holes, singles, pool.left_out, settings, list(pool.classifiers), clf_w)


def _tune_class(d: ps.ClassData, c: int, w, counts, q_all, q_report, folds, n_folds, fill_holes: bool, grid, out: dict,
                margin: float = ps.GATE_MARGIN) -> None:
    """Class ``c`` at full resolution (``counts``: the blend's (N, T) area and intersection, ``d``
    the class's true areas and presence): its gate source and post-processing (in-sample), the
    cross-fitted scores with and without classifiers, curves and statistics, added to ``out``."""
    n = d.n_images
    seg_cls = ps.blend_cls(d.cls, w)
    q = None if q_all is None else q_all[:, c]
    tabs = _gate_tables(counts, d, seg_cls, q, folds, n_folds, grid)
    ev = _gate_evidence(counts, d, seg_cls, q, folds, n_folds, margin)
    s_in, src, ch = ps.in_sample_source(tabs, grid, ev)
    s_in_seg, _ = ps.in_sample(tabs["segmentation"], grid)
    out["in_sample"] += s_in
    out["cross_fitted"] += ps.cross_fitted_source(tabs, grid, ev)[0]
    out["cross_fitted_seg"] += ps.cross_fitted(tabs["segmentation"], grid)[0]
    out["post"][str(c + 1)] = {"pixel_threshold": ch.pixel_threshold, "min_area": ch.min_area,
                               "cls_threshold": ch.cls_threshold, "fill_holes": fill_holes, "gate_source": src}
    edges = grid.edges(ch)
    if edges:
        log.warning("class %d: chosen point on the grid's edge (%s): the optimum may lie outside the grid", c + 1, "; ".join(edges))
    ti, ai, gi = grid.index(ch)
    tot = tabs[src].sum(0) / n
    out["curves"][str(c + 1)] = {"pixel_threshold": (grid.levels / 255).tolist(), "dice_vs_threshold": tot[:, ai, gi].tolist(),
                                 "min_area": grid.min_areas.tolist(), "dice_vs_min_area": tot[ti, :, gi].tolist(),
                                 "cls_threshold": grid.cls_thresholds.tolist(), "dice_vs_cls": tot[ti, ai, :].tolist()}
    gate = ps.gate_signal(seg_cls, q, src)
    empty = d.true_area == 0
    out["all_empty"] += float(empty.sum())
    pc = {"dice": float(s_in / n), "dice_segmentation_only": float(s_in_seg / n), "n_true": int((~empty).sum()),
          "n_empty": int(empty.sum()), "all_empty": float(empty.mean()), "on_grid_edge": edges,
          "gate": {"source": src, "threshold": ch.cls_threshold,
                   **_gate_stats(gate, ~empty, ch.cls_threshold, None if q_report is None else q_report[:, c])}}
    if not fill_holes:
        area, _ = counts
        kept = (area[:, ti] > 0) & (area[:, ti] * d.area_scale >= ch.min_area) & (gate >= ch.cls_threshold)
        pc["fp_rate_on_empty"] = float(kept[empty].mean()) if empty.any() else 0.0
    out["per_class"][str(c + 1)] = pc


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


def _nested_score(d: ps.ClassData, counts, f: int, w, q, folds, n_folds, grid, margin=ps.GATE_MARGIN) -> tuple[float, float]:
    """Held-out Dice sums of one class on fold ``f`` (with the classifiers, segmentation gate only)
    for segmentation weights ``w`` and classifier presence ``q`` (N,) chosen without fold ``f``
    (``counts``: that blend's (N, T) area and intersection); the post-processing is chosen on the
    other folds too."""
    seg_cls = ps.blend_cls(d.cls, w)
    tabs = _gate_tables(counts, d, seg_cls, q, folds, n_folds, grid)
    src, ch = ps.choose_source(tabs, grid, exclude=f, evidence=_gate_evidence(counts, d, seg_cls, q, folds, n_folds, margin))
    ch_seg = ps.choose(tabs["segmentation"], grid, exclude=f)
    return float(tabs[src][(f, *grid.index(ch))]), float(tabs["segmentation"][(f, *grid.index(ch_seg))])


def _map(fn, items, workers):
    if workers <= 1 or len(items) <= 1:
        return [fn(x) for x in items]
    import multiprocessing as mp

    from .console import sigterm_as_exit

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
    import signal

    signal.signal(signal.SIGTERM, signal.SIG_DFL)


def _call_map_fn(x):
    return _MAP_FN(x)


# --------------------------------------------------------------------------- output


def blend_json(result: BlendResult, pool: BlendPool, run) -> dict:
    members = []
    shared = np.allclose(result.weights, result.weights[0])
    for mi, mid in enumerate(result.model_ids):
        if result.weights[:, mi].max() <= 0:
            continue
        entry = {"model_id": mid, "weight": float(result.weights[0, mi]), "checkpoints": pool.checkpoints[mid]}
        if not shared:
            entry["weight"] = None
            entry["class_weights"] = {str(c + 1): float(result.weights[c, mi]) for c in range(N_CLASSES)}
        members.append(entry)
    classifiers = [{"model_id": mid, "weight": float(w), "checkpoints": pool.checkpoints[mid]}
                   for mid, w in zip(result.classifiers, result.clf_weights if result.clf_weights is not None else []) if w > 0]
    unused = []
    if all(pp.get("gate_source", "segmentation") == "segmentation" for pp in result.postprocess.values()):
        # weighted, but no class gates with them: predict and pseudo rounds would run their folds for nothing
        classifiers, unused = [], [c["model_id"] for c in classifiers]
    return {
        "version": 1,
        "run": str(Path(run).resolve()),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "image_shape": list(pool.shape),
        "semantics": ("blended_u8 = floor(sum_m weight_m * p_m + 0.5) over members' uint8 maps (round(255 p)); a pixel "
                      "is on when blended_u8 / 255 >= pixel_threshold; holes are filled if fill_holes; the class mask is "
                      "emptied when its area (pixels at image resolution) < min_area or when its gate < cls_threshold. "
                      "The gate depends on the class's gate_source: segmentation = sum_m weight_m * cls_m over members "
                      "(aux head, or max pixel probability); classifier = sum_j weight_j * presence_j over classifiers; "
                      "mean = the mean of the two. Each member's (and classifier's) output is the mean of its fold "
                      "models' probabilities; maps are quantised."),
        "members": members,
        "classifiers": classifiers,
        "classifier_pool": list(result.classifiers),
        "classifiers_unused": unused,
        "postprocess": result.postprocess,
        "scores": result.scores,
        "per_class": result.per_class,
        "single_models_cross_fitted": result.singles,
        "left_out_models": result.left_out,
        "selection": {**result.settings, "trajectory": result.trajectory, "nested_weights": result.nested_weights},
        "scores_include": score_selections(run, pool),
        "curves": result.curves,
    }


def score_selections(run, pool: BlendPool) -> dict:
    """Per score: the choices made with the labels of the very images it is scored on (an empty
    list: none, the score is unbiased by selection). Upstream choices come from the run: the
    explore stage's config choice (a search state with explored spaces, or a pseudo round that
    reuses them) and each member's OOF epoch policy (its config in the OOF file)."""
    folds = sorted(set(pool.folds.tolist()))
    configs = {m: oof.read_meta(layout.oof_path(run, m, folds[0])).get("config") or {} for m in pool.model_ids + pool.classifiers}
    best_epoch = [m for m, c in configs.items() if c.get("oof_epoch", "last") == "best"]
    state = layout.read_state(run) or {}
    upstream = []
    if state.get("explored") or state.get("pseudo"):
        upstream.append("config choice (explore stage, screening-fold validation Dice)")
    if best_epoch:
        upstream.append(f"epoch choice on each fold's own labels (oof_epoch=best: {len(best_epoch)} of {len(configs)} models)")
    ps = state.get("pseudo")
    if ps:
        # fold k trained on labels of the parent's fold-k models (never trained on fold k), but the
        # parent blend that made them chose its members, weights and post-processing on every fold
        per_fold = "per fold" if "labels_by_fold" in ps else "from every fold's models (fold k's own included)"
        upstream.append(f"pseudo labels {per_fold}: the parent blend's members, weights and post-processing "
                        f"(chosen on all folds' OOF); {ps.get('select', 'confidence')} cut-off {ps.get('min_confidence')}"
                        + (f", at most {ps['max_images']} images" if ps.get("max_images") else ""))
    ens, pp = "ensemble weights and classifier ensemble", "post-processing (pixel threshold, min area, gate)"
    return {"in_sample": [ens, pp, *upstream], "cross_fitted": [ens, *upstream], "cross_fitted_segmentation_only": [ens, *upstream],
            "nested": upstream, "nested_segmentation_only": upstream, "best_single": ["which single model is best", *upstream],
            "baseline": upstream, "all_empty": [], "holdout": []}


def write_blend_json(doc: dict, path) -> None:
    write_json(path, doc)


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
    ap.add_argument("--selection-resolution", choices=["auto", "ds4", "full"], default="auto",
                    help="maps the selection runs on (auto: ds4 when the image is at least 128 px high); "
                         "the final tuning and the scores are always at full resolution")
    ap.add_argument("--choice", choices=list(ps.CHOICE_RULES), default="smooth",
                    help="how a post-processing point is chosen: smooth (best mean over neighbouring grid points, "
                         "default: small pools overfit less) or argmax (the best point)")
    ap.add_argument("--gate-margin", type=float, default=ps.GATE_MARGIN, metavar="Z",
                    help="a classifier's gate replaces the segmentation gate in a class only when its per-image Dice gain "
                         "exceeds Z standard errors on the images it is chosen on (default 1.645: one-sided 5%%; 0: any gain)")
    ap.add_argument("--stream", choices=["auto", "on", "off"], default="auto",
                    help="read full-resolution maps one class at a time from the Parquet files (auto: when the selection "
                         "runs on the 4x maps); off keeps every class in memory")
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
    from . import console

    console.setup(a.run if Path(a.run).is_dir() else None, False, "blend")
    try:
        out = _out_dir(a.run, a.out, a.replace)
        doc = blend_run(a.run, a.models, out=out, holdout_look=a.score_holdout, command=_command(argv), overlays=not a.no_overlays,
                  max_members=a.max_members, bags=a.bags, per_class_weights=a.per_class_weights,
                  init_sorted=a.init_sorted, allow_partial=a.allow_partial, fill_holes=a.fill_holes, nested=not a.no_nested,
                  workers=a.workers, seed=a.seed, selection_resolution=a.selection_resolution, choice=a.choice,
                  gate_margin=a.gate_margin,
                  stream={"auto": "auto", "on": True, "off": False}[a.stream])
        if a.mlflow:
            from .tracking import open_tracker, resolve_uri

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
    models = saved.get("selected_models")
    if models is None and saved.get("selected"):
        models = model_ids(saved["selected"])
    return models or None


def blend_run(run, models=None, allow_partial: bool = False, fill_holes: bool = False, stream="auto", out=None,
              holdout_look: bool = True, command: str = "search (the run's own blend)", overlays: bool = True, **opts) -> dict:
    """Blend a run's pool (default: the search's completed models, else the whole pool), write
    blend.json and the report into ``out`` (default: the run's own RUN/blend), print the score
    summary; returns the blend.json document.

    With a holdout and ``holdout_look``, the blend is scored on it and the look is appended to
    RUN/holdout.json ``looks`` (``command`` says who looked); the CLI looks only when asked."""
    if models is None:
        models = search_models(run)
        if models:
            log.info("blending the search's completed models %s (screening-only configs are left out)", models)
    pool = load_blend_pool(run, model_ids=models, allow_partial=allow_partial, fill_holes=fill_holes, stream=stream)
    if pool.left_out:
        log.warning("left out (missing folds): %s", pool.left_out)
    res = optimize(pool, fill_holes=fill_holes, **opts)
    out = Path(out) if out is not None else layout.blend_dir(run)
    doc = blend_json(res, pool, run)
    if layout.holdout_path(run).exists():
        if holdout_look:
            doc = score_holdout(run, doc, out / "blend.json")
            doc["holdout"]["looks"] = record_look(run, doc, out / "blend.json", command)
        else:
            n = len(json.loads(layout.holdout_path(run).read_text()).get("looks", []))
            log.info("the holdout is not scored (looked at %d time(s) so far): pass --score-holdout to look at it", n)
    state = layout.read_state(run) or {}
    if "pseudo" in state:  # a pseudo-labelling round (steel_ray.pseudo)
        doc["pseudo"] = state["pseudo"]
    write_blend_json(doc, out / "blend.json")
    from .report import write_report

    html = write_report(doc, pool, run, out, overlays=overlays)
    for line in summary_lines(doc):
        print(line)
    print(f"blend.json: {out / 'blend.json'}\nreport:     {html}  (and report.md)")
    return doc


def score_holdout(run, doc: dict, blend_path, n_boot: int = 2000) -> dict:
    """Predict the run's holdout images with the chosen blend (the predict path, every fold model, on
    Ray's workers when Ray runs) and score them: ``scores.holdout`` with a 95% bootstrap interval over images, beside the
    holdout's all-empty score. The predictions are kept as RUN/blend/holdout_submission.csv."""
    from . import predict
    from .score import pair_dice

    h = json.loads(layout.holdout_path(run).read_text())
    paths = [Path(h["images_dir"]) / i for i in h["image_ids"]]
    sub = Path(blend_path).parent / "holdout_submission.csv"
    # on Ray's workers when Ray runs (the search's own blend), else in this process
    rows = predict.predict_rows(doc, paths, tuple(doc["image_shape"]), blend_path)
    predict.write_submission(rows, sub)
    pred = np.array([r for _, r in rows], dtype=object)
    truth = np.array(h["rles"], dtype=object)
    dice = pair_dice(truth, pred, tuple(doc["image_shape"]), "holdout truth", str(sub))
    per_image = dice.mean(1)
    rng = np.random.default_rng(0)
    boot = per_image[rng.integers(0, len(per_image), (n_boot, len(per_image)))].mean(1)
    empty = truth == ""
    doc = dict(doc)
    doc["scores"] = {**doc["scores"], "holdout": float(dice.mean())}
    doc["holdout"] = {"n_images": len(paths), "fraction": h["fraction"], "ci95": [float(np.quantile(boot, 0.025)),
                                                                                  float(np.quantile(boot, 0.975))],
                      "all_empty": float(empty.mean()), "per_class": {str(c + 1): float(dice[:, c].mean()) for c in range(N_CLASSES)},
                      "submission": str(sub)}
    log.info("holdout (%d images, never tuned on): %.6f [%.6f, %.6f], all-empty %.6f", len(paths), dice.mean(),
             *doc["holdout"]["ci95"], empty.mean())
    return doc


def record_look(run, doc: dict, blend_path, command: str) -> int:
    """Append a look at the holdout to RUN/holdout.json ``looks`` (time, command, blend, score);
    returns how many there have been. Every choice made after seeing the score tunes on it."""
    path = layout.holdout_path(run)
    h = json.loads(path.read_text())
    h.setdefault("looks", []).append({"time": time.strftime("%Y-%m-%dT%H:%M:%S"), "command": command, "blend": str(blend_path),
                                      "score": doc["scores"]["holdout"], "ci95": doc["holdout"]["ci95"]})
    write_json(path, h)
    return len(h["looks"])


def summary_lines(doc: dict) -> list[str]:
    """The blend's scores for the console, each beside the all-empty score of the same pairs."""
    from .report import fmt_score, no_classifier_reason, warnings

    s = doc["scores"]
    clf = doc.get("classifiers", [])
    lines = [f"blend: {len(doc['members'])} member(s)" + (f", {len(clf)} classifier(s) in the gate" if clf else "")]
    if doc.get("classifier_pool") and not clf:
        lines.append(f"  no classifier used: {no_classifier_reason(doc)}")
    if clf or doc.get("classifier_pool"):
        lines.append("  gate source per class: " + ", ".join(f"{c}: {pp.get('gate_source', 'segmentation')}"
                                                        for c, pp in doc["postprocess"].items()))
    keys = [("all_empty", "all-empty (no defects)"), ("best_single", "best single (cross-fitted)"),
            ("baseline", "baseline recipe"), ("in_sample", "blend in-sample"), ("cross_fitted", "blend cross-fitted"),
            ("nested", "blend nested")]
    if doc.get("classifier_pool"):
        keys[-1:-1] = [("cross_fitted_segmentation_only", "cross-fitted, segmentation gate")]
        keys.append(("nested_segmentation_only", "nested, segmentation gate"))
    for k, label in keys:
        v = s.get(k)
        rel = "" if k == "all_empty" or v is None else f"  ({v - s['all_empty']:+.6f} vs all-empty)"
        lines.append(f"  {label:32} {fmt_score(v)}{rel}")
    if "holdout" in doc:
        h = doc["holdout"]
        lines.append(f"holdout ({h['n_images']} images nobody tuned on; look {h.get('looks', 1)} at it):")
        lines.append(f"  {'all-empty (no defects)':32} {h['all_empty']:.6f}")
        lines.append(f"  {'blend':32} {s['holdout']:.6f}  ({s['holdout'] - h['all_empty']:+.6f} vs all-empty; "
                     f"95% CI {h['ci95'][0]:.6f}-{h['ci95'][1]:.6f})")
    lines += [w for _, w in warnings(doc)]
    return lines


if __name__ == "__main__":
    sys.exit(main())
