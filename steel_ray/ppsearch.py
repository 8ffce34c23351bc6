"""Exact, vectorised post-processing search over (pixel threshold x min area x classifier gate).

For a blend (uint8 probability maps), per-image counts of the blended values by threshold bin,
over all pixels and over true pixels (one compiled pass, :mod:`steel_ray.kernels`), give, by
suffix sums, the predicted area and the intersection for every pixel threshold at once. Whole-mask min area and the classifier gate are then plain
comparisons, so the Dice of every (image, grid point) follows without re-thresholding a mask.
The metric is a mean over (image, class) pairs, so classes are tuned independently.

Pixels are pruned exactly: the blend (a weighted mean) can reach level ``t`` only where some
member reaches ``t``, so only pixels where a member reaches the lowest grid level are kept
(:class:`ClassData`). Tables are kept per fold, so choosing on K-1 folds and scoring on the
held-out one (cross-fitting) costs nothing extra.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from . import kernels
from .data import N_CLASSES
from .metric import dice_from_counts

__all__ = ["Grid", "CHOICE_RULES", "default_grid", "smoothed", "ClassData", "blend_u8", "blend_cls", "fold_tables",
           "tables_from_counts", "area_inter", "RunIndex", "level_bins", "counts_from_bins", "image_histograms",
           "area_inter_dense", "area_inter_filled", "counts_from_histograms", "Choice", "choose", "cross_fitted", "in_sample",
           "score_point", "score_counts", "GATE_SOURCES", "GATE_MARGIN", "GateEvidence", "gate_signal", "choose_source",
           "cross_fitted_source", "in_sample_source"]

SEVERSTAL_AREA = 256 * 1600


CHOICE_RULES = ("smooth", "argmax")


@dataclass(frozen=True)
class Grid:
    """Search grid for one class: uint8 pixel levels, min areas (full-res pixels), gate thresholds.

    ``rule`` is how a point is chosen from a Dice table over the grid: ``argmax`` takes the
    best point; ``smooth`` (default) takes the best point of the table averaged over each
    point's neighbours (a 3x3x3 box, edges replicated), which small pools overfit less.
    """

    levels: np.ndarray  # uint8 levels k: a pixel is on when blended_u8 >= k (threshold k/255)
    min_areas: np.ndarray  # float, pixels at full resolution; 0 = off
    cls_thresholds: np.ndarray  # float; 0 = gate off
    rule: str = "smooth"

    def __post_init__(self):
        for name in ("levels", "min_areas", "cls_thresholds"):
            if np.any(np.diff(getattr(self, name)) < 0):  # the tables' binning needs them sorted
                raise ValueError(f"grid {name} must be in ascending order: {getattr(self, name)}")
        if self.rule not in CHOICE_RULES:
            raise ValueError(f"choice rule {self.rule!r} is not one of {list(CHOICE_RULES)}")

    @property
    def t_min(self) -> int:
        return int(self.levels.min())

    def edges(self, c: "Choice") -> list[str]:
        """Which of a chosen point's parameters sit on the grid's edge (the optimum may lie beyond).

        min area 0 and gate 0 are "off", a natural bound, not an edge.
        """
        t, a, g = self.index(c)
        out = []
        if t == 0 or t == len(self.levels) - 1:
            out.append(f"pixel_threshold {c.pixel_threshold:.3f} is the grid's {'lowest' if t == 0 else 'highest'} level")
        if a == len(self.min_areas) - 1 and len(self.min_areas) > 1:
            out.append(f"min_area {c.min_area:g} is the grid's largest")
        if g == len(self.cls_thresholds) - 1 and len(self.cls_thresholds) > 1:
            out.append(f"cls_threshold {c.cls_threshold:g} is the grid's highest")
        return out

    def index(self, c: "Choice") -> tuple[int, int, int]:
        """(level, area, gate) position of a chosen point in a ``(..., T, A, G)`` table."""
        return (int(np.flatnonzero(self.levels == c.level)[0]), int(np.flatnonzero(self.min_areas == c.min_area)[0]),
                int(np.flatnonzero(self.cls_thresholds == c.cls_threshold)[0]))


def default_grid(shape, rule: str = "smooth") -> Grid:
    """Thresholds 0.05..0.95, min areas 0..32000 px (scaled from 256x1600), gate off or 0.1..0.9.

    Wide enough that an optimum on the edge means something is off (a model that is
    under-confident everywhere, say): :meth:`Grid.edges` reports it.
    """
    levels = np.unique(np.ceil(np.round(np.arange(0.05, 0.9501, 0.05) * 255, 9)).astype(np.int64))
    scale = shape[0] * shape[1] / SEVERSTAL_AREA
    areas = np.array([0, 50, 100, 200, 300, 400, 500, 600, 800, 1000, 1200, 1500, 2000, 2500, 3000, 4000, 5000, 6500,
                      8000, 10000, 12000, 16000, 20000, 24000, 32000], float)
    cls = np.array([0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.55, 0.6, 0.65, 0.7, 0.75, 0.8, 0.85, 0.9])
    return Grid(levels, np.round(areas * scale), cls, rule)


@dataclass
class ClassData:
    """One class of a pool at one resolution, pruned to candidate pixels.

    ``img``/``vals``/``truth`` describe the kept pixels (those where some member reaches
    ``t_min``); ``true_area`` counts every true pixel of each image, kept or not.
    """

    img: np.ndarray  # (P,) int32/int64 image index of each kept pixel
    vals: np.ndarray  # (M, P) uint8 member probabilities
    truth: np.ndarray  # (P,) bool
    true_area: np.ndarray  # (N,) int64, in this resolution's pixels
    cls: np.ndarray  # (M, N) float32 member presence probabilities
    area_scale: float  # full-resolution pixels per pixel of this resolution
    t_min: int
    pix: np.ndarray | None = None  # (P,) int32 flat position of each kept pixel in its image (hole filling only)
    _runs: "RunIndex | None" = field(default=None, init=False, repr=False, compare=False)  # built on first use

    @property
    def n_images(self) -> int:
        return len(self.true_area)

    def run_index(self) -> "RunIndex":
        """Where each image's pixels lie (:class:`RunIndex`), built on first use and kept."""
        if self._runs is None:
            self._runs = RunIndex(self.img, self.truth, self.n_images)  # built once, reused by every candidate
        return self._runs

    def check_level(self, level) -> None:
        """Refuse a threshold level below the pruning level: the pixels under it were dropped."""
        if level < self.t_min:
            raise ValueError(f"grid level {level} is below the pruning level {self.t_min} of the data")

    @classmethod
    def from_dense(cls, probs: np.ndarray, truth: np.ndarray, cls_prob: np.ndarray, t_min: int, area_scale: float = 1.0,
                   positions: bool = True):
        """``probs`` (M, N, h, w) uint8, ``truth`` (N, h, w) bool, ``cls_prob`` (M, N); ``positions``:
        keep each kept pixel's position (``pix``, needed for hole filling only)."""
        m, n = probs.shape[:2]
        flat = probs.reshape(m, -1)
        top = flat[0] if m == 1 else flat.max(axis=0)
        idx = np.flatnonzero(top >= t_min)  # flat positions over (N, hw): one gather per array, no 2-D fancy index
        hw = flat.shape[1] // max(n, 1)
        img = idx // hw
        t = truth.reshape(-1)
        return cls(img.astype(np.int32 if n < 2**23 else np.int64), flat[:, idx], t[idx],
                   np.count_nonzero(truth.reshape(n, -1), axis=1).astype(np.int64), np.asarray(cls_prob, np.float32), area_scale,
                   t_min, (idx - img * hw).astype(np.int32) if positions else None)

    def subset(self, image_mask: np.ndarray) -> "ClassData":
        """The same data restricted to the images where ``image_mask`` is true (renumbered)."""
        new_index = np.cumsum(image_mask) - 1
        keep = image_mask[self.img]
        return ClassData(new_index[self.img[keep]], self.vals[:, keep], self.truth[keep], self.true_area[image_mask],
                         self.cls[:, image_mask], self.area_scale, self.t_min, None if self.pix is None else self.pix[keep])


def blend_u8(vals: np.ndarray, weights) -> np.ndarray:
    """The blend rule: ``floor(sum_m w_m * p_m + 0.5)`` on uint8 maps (weights sum to 1).

    The single definition used for scoring and for submissions. ``vals`` is (M, ...) uint8.
    """
    w = np.asarray(weights, np.float64)
    acc = np.zeros(vals.shape[1:], np.float64)
    for m in np.flatnonzero(w):
        acc += w[m] * vals[m]
    return np.floor(acc + 0.5 + 1e-9).astype(np.uint8)


def member_weights(m: dict) -> np.ndarray:
    """(4,) per-class blend weight of a blend.json member (``class_weights``) or classifier (``weight``)."""
    if m.get("weight") is None:
        return np.array([m["class_weights"][str(c + 1)] for c in range(N_CLASSES)])
    return np.full(N_CLASSES, float(m["weight"]))


def blend_cls(cls: np.ndarray, weights) -> np.ndarray:
    """Blended presence probability: the weighted mean of the members' ``cls``."""
    w = np.asarray(weights, np.float64)
    return (w[:, None] * cls).sum(0) if cls.ndim == 2 else (w[:, None, None] * cls).sum(0)


def area_inter(blended: np.ndarray, d: ClassData, levels: np.ndarray):
    """(N, T) predicted area and intersection at every level (any order), from per-image counts by
    level bin + suffix sums."""
    levels = np.asarray(levels)
    uniq, inv = np.unique(levels, return_inverse=True)
    area, inter = d.run_index().counts(uniq, blended)
    return (area, inter) if uniq.size == levels.size and np.all(inv == np.arange(levels.size)) else (area[:, inv], inter[:, inv])


def level_bins(levels) -> np.ndarray:
    """(256,) uint8: the bin of each uint8 value for ascending ``levels``, the number of levels <= it
    (a pixel of bin b is at or above the first b levels)."""
    levels = np.asarray(levels)
    if levels.size > 255 or not np.all(np.diff(levels) > 0):
        raise ValueError(f"levels must ascend strictly and be at most 255, got {levels.tolist()}")
    return np.searchsorted(levels, np.arange(256), side="right").astype(np.uint8)


def counts_from_bins(h_all: np.ndarray, h_true: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(N, T) area and intersection at each level from (N, T + 1) per-image counts by bin of
    :func:`level_bins` (suffix sums: level t counts the bins above t)."""
    return tuple(np.cumsum(h[:, :0:-1], axis=1)[:, ::-1] for h in (h_all, h_true))


class RunIndex:
    """Where each image's kept pixels lie, built once per :class:`ClassData` and reused by every
    candidate blend: pixels come in runs of one image (an image may have several runs, e.g. a
    batch read per fold). The per-image counts are one compiled pass over the runs
    (:mod:`steel_ray.kernels`, which says why by hand)."""

    def __init__(self, img: np.ndarray, truth: np.ndarray, n: int):
        p = img.size
        brk = np.flatnonzero(img[1:] != img[:-1]) + 1 if p else np.zeros(0, np.int64)
        self.starts = (np.concatenate([[0], brk]) if p else np.zeros(0, np.int64)).astype(np.int64)
        self.ends = np.concatenate([self.starts[1:], [p]]).astype(np.int64)
        self.run_img = img[self.starts].astype(np.int64)
        self.truth, self.n = truth, n

    def counts(self, levels, values: np.ndarray, add: np.ndarray | None = None, lut: np.ndarray | None = None,
               skip: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """(N, T) predicted area and intersection at ascending ``levels`` of the uint8 blend
        ``lut[values + add]`` (``lut`` None: ``values`` is the blend; ``add`` None: nothing added).
        Images with ``skip`` true are not counted (zero rows)."""
        bins = level_bins(levels)
        lut = bins if lut is None else bins[lut]
        h = kernels.binned_counts(self.starts, self.ends, self.run_img, _empty(skip, np.bool_), self.truth, lut, values,
                                  _empty(add, np.uint8), self.n, len(levels) + 1)
        return counts_from_bins(*h)

    def counts_weighted(self, levels, vals: np.ndarray, weights) -> tuple[np.ndarray, np.ndarray]:
        """(N, T) area and intersection at ascending ``levels`` of ``blend_u8(vals, weights)``."""
        w = np.asarray(weights, np.float64)
        members = np.flatnonzero(w)
        h = kernels.binned_counts_weighted(self.starts, self.ends, self.run_img, self.truth, vals, members, w[members],
                                           level_bins(levels), self.n, len(levels) + 1)
        return counts_from_bins(*h)

    def histograms(self, vals: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(N, 256) per-image histograms of the uint8 ``vals``, over all pixels and over true ones."""
        ident = np.arange(256, dtype=np.int64)
        return kernels.binned_counts(self.starts, self.ends, self.run_img, _empty(None, np.bool_), self.truth, ident, vals,
                                     _empty(None, np.uint8), self.n, 256)


def _empty(a, dtype):
    """``a``, or an empty array standing for "none" in the kernels' signatures."""
    return np.zeros(0, dtype) if a is None else a


def image_histograms(img: np.ndarray, vals: np.ndarray, truth: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
    """(N, 256) histograms of the uint8 ``vals`` of each image's pixels, over all of them and over
    the true ones (``img``: each pixel's image; see :class:`RunIndex`)."""
    return RunIndex(img, truth, n).histograms(vals)


def counts_from_histograms(h_all: np.ndarray, h_true: np.ndarray, levels) -> tuple[np.ndarray, np.ndarray]:
    """(N, T) predicted area and intersection at each level from (N, 256) per-image histograms of
    the uint8 values over all pixels and over true pixels (suffix sums: #pixels with value >= v)."""
    levels = np.asarray(levels)
    if levels.size and np.all(np.diff(levels) > 0):  # sums over [level_j, level_j+1), then suffix sums over T levels
        a, t = (np.cumsum(np.add.reduceat(h, levels, axis=1)[:, ::-1], axis=1)[:, ::-1] for h in (h_all, h_true))
        return a, t
    suf_all = np.cumsum(h_all[:, ::-1], axis=1)[:, ::-1]
    suf_true = np.cumsum(h_true[:, ::-1], axis=1)[:, ::-1]
    return suf_all[:, levels], suf_true[:, levels]


def fold_tables(blended: np.ndarray, cls_b: np.ndarray, d: ClassData, folds: np.ndarray, n_folds: int, grid: Grid):
    """Sum of pair Dice per fold at every grid point: ``(K, T, A, G)`` float64.

    ``blended`` is the blend's uint8 value at each kept pixel of ``d``; ``cls_b`` (N,) the
    blended presence probability.
    """
    d.check_level(grid.t_min)
    area, inter = area_inter(blended, d, grid.levels)
    return tables_from_counts(area, inter, d.true_area, d.area_scale, cls_b, folds, n_folds, grid)


def tables_from_counts(area, inter, true_area, area_scale, cls_b, folds, n_folds: int, grid: Grid) -> np.ndarray:
    """Per-fold Dice sums from (N, T) predicted areas and intersections (any exact source).

    Areas are in the data's pixels; the min-area test compares ``area * area_scale`` (full-res
    pixels) with the grid.
    """
    true = np.asarray(true_area, np.float64)
    drop = (true == 0).astype(np.float64)  # Dice of an emptied mask
    delta = dice_from_counts(inter, area, true[:, None]) - drop[:, None]  # (N, T)
    full_area = np.asarray(area, np.float64) * area_scale
    n_t, n_a, n_g = len(grid.levels), len(grid.min_areas), len(grid.cls_thresholds)
    # A pair adds its delta at (t, a, g) when full_area >= min_areas[a] and cls_b >= cls_thresholds[g]:
    # with both grids ascending that is a <= (its area bin), g <= (its gate bin). So bin every pair once
    # (bin 0: below the lowest value) and take suffix sums over the bins: O(N T) instead of O(N T A G).
    a_bin = np.searchsorted(grid.min_areas, full_area, side="right")  # (N, T) in 0..A
    g_bin = np.searchsorted(grid.cls_thresholds, np.asarray(cls_b, np.float64), side="right")  # (N,) in 0..G
    folds = np.asarray(folds)
    used = (folds >= 0) & (folds < n_folds)  # fold -1: left out (nested selection)
    t_idx = np.arange(n_t)[None, :]
    key = ((folds[used, None] * n_t + t_idx) * (n_a + 1) + a_bin[used]) * (n_g + 1) + g_bin[used, None]
    hist = np.bincount(key.ravel(), weights=delta[used].ravel(), minlength=n_folds * n_t * (n_a + 1) * (n_g + 1))
    hist = hist.reshape(n_folds, n_t, n_a + 1, n_g + 1)
    suffix = hist[:, :, ::-1, ::-1].cumsum(2).cumsum(3)[:, :, ::-1, ::-1][:, :, 1:, 1:]
    base = np.bincount(folds[used], weights=drop[used], minlength=n_folds)[:n_folds]
    return base[:, None, None, None] + suffix


def area_inter_dense(blended: np.ndarray, truth: np.ndarray, levels: np.ndarray, fill_holes: bool = False):
    """(N, T) area and intersection by explicit thresholding of dense maps (N, H, W).

    The slow exact path, needed when holes are filled (filling is not a histogram operation).
    """
    from .metric import fill_holes as fill

    n = blended.shape[0]
    area = np.zeros((n, len(levels)), np.int64)
    inter = np.zeros_like(area)
    for t, lv in enumerate(levels):
        m = blended >= lv
        if fill_holes:
            m = fill(m)
        area[:, t] = m.sum((1, 2))
        inter[:, t] = (m & truth).sum((1, 2))
    return area, inter


def area_inter_filled(blended: np.ndarray, d: ClassData, truth_mask, shape, levels: np.ndarray, desc: str | None = None):
    """(N, T) area and intersection with holes filled, streamed image by image from the kept pixels.

    Hole filling is not a histogram operation, so each image's mask is filled once per level,
    but only inside the bounding box of its kept pixels: a background region that touches that
    box's edge reaches the image border through the pixels outside the box, so filling the crop
    equals filling the image. ``truth_mask(i)`` returns image ``i``'s (H, W) bool truth or None
    when it has none. Memory: one crop at a time (no dense maps).
    """
    from scipy.ndimage import binary_fill_holes
    from tqdm import tqdm

    if d.pix is None:
        raise ValueError("hole filling needs the kept pixels' positions (load the pool with fill_holes=True)")
    levels = np.asarray(levels)
    d.check_level(levels.min())
    ascending = bool(np.all(np.diff(levels) > 0))
    h, w = shape
    n = d.n_images
    area = np.zeros((n, len(levels)), np.int64)
    inter = np.zeros_like(area)
    order = np.argsort(d.img, kind="stable")
    bounds = np.searchsorted(d.img[order], np.arange(n + 1))
    for i in tqdm(range(n), desc=desc or "fill holes", unit="img", leave=False, disable=None):
        sel = order[bounds[i]:bounds[i + 1]]
        if not sel.size:
            continue
        b = blended[sel]
        if b.max() < levels.min():
            continue
        ys, xs = np.divmod(d.pix[sel], w)
        y0, x0 = ys.min(), xs.min()
        crop = np.zeros((ys.max() - y0 + 1, xs.max() - x0 + 1), np.uint8)
        crop[ys - y0, xs - x0] = b
        tm = truth_mask(i)
        tcrop = None if tm is None else tm[y0:y0 + crop.shape[0], x0:x0 + crop.shape[1]]
        for t, lv in enumerate(levels):
            m = crop >= lv
            if not m.any():
                if ascending:
                    break
                continue
            f = binary_fill_holes(m)
            area[i, t] = f.sum()
            inter[i, t] = 0 if tcrop is None else (f & tcrop).sum()
    return area, inter


@dataclass(frozen=True)
class Choice:
    level: int
    min_area: float
    cls_threshold: float

    @property
    def pixel_threshold(self) -> float:
        return self.level / 255.0


def smoothed(table: np.ndarray) -> np.ndarray:
    """The (T, A, G) table averaged over each point's 3x3x3 neighbourhood (edges replicated)."""
    from scipy.ndimage import uniform_filter

    return uniform_filter(np.asarray(table, np.float64), size=3, mode="nearest")


def _best(table: np.ndarray, grid: Grid) -> tuple[float, Choice]:
    """(the value the rule ranks by, the chosen point) of a (T, A, G) table.

    The point is the first maximum in (level, area, gate) order: the lowest of tied parameter
    values. With ``grid.rule == "smooth"`` it is the maximum of the smoothed table (the value
    returned); ties in the smoothed table go to the point with the higher raw value, then the
    lowest parameters.
    """
    value = float(table.max())
    if grid.rule == "smooth":
        sm = smoothed(table)
        value = float(sm.max())
        top = sm >= value - 1e-9 * max(1.0, abs(value))
        table = np.where(top, table, -np.inf)
    t, a, g = np.unravel_index(int(np.argmax(table)), table.shape)
    return value, Choice(int(grid.levels[t]), float(grid.min_areas[a]), float(grid.cls_thresholds[g]))


def _argmax(table: np.ndarray, grid: Grid) -> Choice:
    return _best(table, grid)[1]


def _fold_sum(tables: np.ndarray, exclude=None) -> np.ndarray:
    """The (T, A, G) table summed over folds, leaving out ``exclude`` folds."""
    use = [f for f in range(tables.shape[0]) if exclude is None or f not in np.atleast_1d(exclude)]
    return tables[use].sum(0)


def choose(tables: np.ndarray, grid: Grid, exclude=None) -> Choice:
    """The grid point with the highest Dice summed over folds (leaving out ``exclude`` folds)."""
    return _argmax(_fold_sum(tables, exclude), grid)


def cross_fitted(tables: np.ndarray, grid: Grid) -> tuple[float, list[Choice]]:
    """Summed held-out Dice: fold k scored with the point chosen on the other folds."""
    total, picks = 0.0, []
    for k in range(tables.shape[0]):
        c = choose(tables, grid, exclude=k)
        total += tables[(k, *grid.index(c))]
        picks.append(c)
    return total, picks


def in_sample(tables: np.ndarray, grid: Grid) -> tuple[float, Choice]:
    c = choose(tables, grid)
    return float(tables.sum(0)[grid.index(c)]), c


def score_point(blended, cls_b, d: ClassData, choice: Choice, image_mask=None) -> np.ndarray:
    """Pair Dice of every image for one fixed choice (used for baselines and reports)."""
    area, inter = area_inter(blended, d, np.array([choice.level]))
    dice = score_counts(area[:, 0], inter[:, 0], d.true_area, d.area_scale, cls_b, choice)
    return dice if image_mask is None else dice[image_mask]


def score_counts(area, inter, true_area, area_scale, cls_b, choice: Choice) -> np.ndarray:
    """Pair Dice of every image from its (N,) predicted area and intersection at ``choice.level``."""
    kept = (area * area_scale >= choice.min_area) & (cls_b >= choice.cls_threshold)
    return dice_from_counts(np.where(kept, inter, 0), np.where(kept, area, 0), true_area)


# --------------------------------------------------------------------------- gate sources
# The presence signal that gates a class's masks: the segmentation members' (aux head or max
# pixel), the classifier ensemble's, or their mean. Listed in tie-break order: on equal scores
# the simpler gate (no classifier) wins.
GATE_SOURCES = {"segmentation": 0.0, "classifier": 1.0, "mean": 0.5}


def gate_signal(seg_cls: np.ndarray, clf: np.ndarray | None, source: str) -> np.ndarray:
    """``(1 - a) * seg_cls + a * clf`` with ``a`` the source's classifier share (0, 1 or 0.5)."""
    a = GATE_SOURCES[source]
    if a == 0.0:
        return np.asarray(seg_cls)
    if clf is None:
        raise ValueError(f"gate source {source!r} needs classifier presence")
    return (1.0 - a) * np.asarray(seg_cls, np.float64) + a * np.asarray(clf, np.float64)


def apply_blend(maps: np.ndarray, cls: np.ndarray, weights, clf, post) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One class of blend.json's rule on a batch: ``maps`` (M, B, H, W) uint8 and ``cls`` (M, B) of the
    members, ``clf`` (B,) the classifier ensemble's presence (None without classifiers), ``post`` the
    class's :class:`metric.PostProcess`. Returns (blended (B, H, W) uint8, gate (B,), mask (B, H, W)):
    the single path of submissions (predict) and of the blend's OOF masks (overlay)."""
    blended = blend_u8(maps, weights)
    gate = gate_signal(blend_cls(cls, weights), clf, post.gate_source)
    return blended, gate, post.apply(blended, gate)


# A gate source with a classifier in it enters a class's rule only when its gain over the
# segmentation gate clears the noise of the images it was chosen on: a one-sided test of the
# paired per-image Dice differences, mean > GATE_MARGIN standard errors (1.645: 5%). Without it a
# classifier that wins by a few lucky images of the tuning folds is kept and loses on new ones
# (issue 22: a fresh demo kept one whose cross-fitted score was 0.003 below the plain gate).
GATE_MARGIN = 1.645


@dataclass
class GateEvidence:
    """What the per-image Dice of a class at any (gate source, grid point) needs: the blend's
    (N, T) predicted areas and intersections at the grid's levels, the true areas, each source's
    gate signal (N,), and the images' folds (-1: left out)."""

    area: np.ndarray
    inter: np.ndarray
    true_area: np.ndarray
    area_scale: float
    gates: dict
    folds: np.ndarray
    n_folds: int
    margin: float = GATE_MARGIN

    def dice(self, source: str, choice: Choice, grid: Grid) -> np.ndarray:
        t = grid.index(choice)[0]
        return score_counts(self.area[:, t], self.inter[:, t], self.true_area, self.area_scale, self.gates[source], choice)

    def gain(self, source: str, choice: Choice, base: Choice, grid: Grid, exclude=None) -> tuple[float, float]:
        """(mean, standard error) of the per-image Dice gain of ``source`` at ``choice`` over the
        segmentation gate at ``base``, on the used images (folds other than ``exclude``)."""
        folds = np.asarray(self.folds)
        used = (folds >= 0) & (folds < self.n_folds) & ~np.isin(folds, np.atleast_1d(exclude if exclude is not None else []))
        d = (self.dice(source, choice, grid) - self.dice("segmentation", base, grid))[used]
        if d.size < 2:
            return float(d.sum()), 0.0
        return float(d.mean()), float(d.std(ddof=1) / np.sqrt(d.size))

    def clears(self, source: str, choice: Choice, base: Choice, grid: Grid, exclude=None) -> bool:
        mean, se = self.gain(source, choice, base, grid, exclude)
        return mean > 0 and mean > self.margin * se


def choose_source(tables: dict, grid: Grid, exclude=None, evidence: GateEvidence | None = None) -> tuple[str, Choice]:
    """The (gate source, grid point) with the highest Dice over the used folds.

    ``tables`` maps each available source to its ``(K, T, A, G)`` tables. Sources compete on the
    value the grid's rule ranks by (the smoothed table's maximum for ``smooth``); ties keep
    the earlier source of :data:`GATE_SOURCES`. With ``evidence`` (and a positive margin), a
    source other than the segmentation gate must also beat the segmentation gate's own choice
    by more than its noise on those folds' images (:meth:`GateEvidence.clears`).
    """
    best, seg = None, None
    for src in GATE_SOURCES:
        if src not in tables:
            continue
        val, choice = _best(_fold_sum(tables[src], exclude), grid)  # the table is smoothed once
        if src == "segmentation":
            seg = choice
        elif seg is not None and evidence is not None and evidence.margin > 0 \
                and not evidence.clears(src, choice, seg, grid, exclude):
            continue
        if best is None or val > best[0] + 1e-9 * max(1.0, abs(val)):
            best = (val, src, choice)
    return best[1], best[2]


def cross_fitted_source(tables: dict, grid: Grid, evidence: GateEvidence | None = None) -> tuple[float, list[tuple[str, Choice]]]:
    """:func:`cross_fitted` with the gate source chosen on the other folds too."""
    total, picks = 0.0, []
    k = next(iter(tables.values())).shape[0]
    for f in range(k):
        src, c = choose_source(tables, grid, exclude=f, evidence=evidence)
        total += tables[src][(f, *grid.index(c))]
        picks.append((src, c))
    return total, picks


def in_sample_source(tables: dict, grid: Grid, evidence: GateEvidence | None = None) -> tuple[float, str, Choice]:
    src, c = choose_source(tables, grid, evidence=evidence)
    return float(tables[src].sum(0)[grid.index(c)]), src, c
