"""Per-image counts of a blend at every threshold level at once: the search grid (:class:`Grid`),
a class's pruned pool (:class:`ClassData`), its runs of pixels per image (:class:`RunIndex`, the
compiled pass of :mod:`.kernels`) and the predicted area and intersection per (image, level),
with holes filled or not."""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from . import kernels
from .rule import Choice, product_levels
from .rule import fill_holes as fill

SEVERSTAL_AREA = 256 * 1600


CHOICE_RULES = ("smooth", "argmax")


def reused(reuse: dict, key: str, shape: tuple, dtype) -> np.ndarray:
    """A C-contiguous ``shape`` view of the reused buffer ``reuse[key]`` (grown when too small)."""
    size = int(np.prod(shape))
    if key not in reuse or reuse[key].size < size or reuse[key].dtype != np.dtype(dtype):
        reuse[key] = np.empty(max(size, 1), dtype)
    return reuse[key][:size].reshape(shape)


def rational_weights(w: np.ndarray, max_total: int = 4096) -> tuple[np.ndarray, int] | None:
    """``(counts, T)`` (int32 counts summing to T <= ``max_total``) when the float rule
    ``floor(sum_j w_j v_j + 0.5 + 1e-9)`` (:func:`blend_u8`) equals ``floor(sum_j counts_j v_j / T + 1/2)``
    for every uint8 ``v``, else None. It does when each ``w_j`` is within ``dev / T`` of ``counts_j / T``
    with ``255 * len(w) * dev`` (plus the float sum's rounding) under half the 1e-9 nudge: the nudge
    then absorbs the float error at exact halves, and elsewhere the exact value is at least
    ``1 / (2T)`` from a rounding boundary."""
    w = np.asarray(w, np.float64)
    if w.size == 0 or np.any(w < 0):
        return None
    totals = np.arange(1, max_total + 1)
    scaled = totals[:, None] * w[None, :]
    counts = np.rint(scaled)
    dev = np.abs(scaled - counts).max(axis=1)
    ok = (counts.sum(axis=1) == totals) & (255 * w.size * dev + 1e-12 * w.size < 5e-10 * totals)
    if not ok.any():
        return None
    t = int(np.argmax(ok))
    return counts[t].astype(np.int32), int(totals[t])


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
                   positions: bool = True, reuse: dict | None = None):
        """``probs`` (M, N, h, w) uint8, ``truth`` (N, h, w) bool, ``cls_prob`` (M, N); ``positions``:
        keep each kept pixel's position (``pix``, needed for hole filling only).

        ``reuse``: a dict the caller keeps between calls (one per stream of batches): the kept
        pixels go into buffers it holds, grown when needed, instead of fresh arrays, so the result
        is valid only until the next call with the same dict. On these machines the first touch
        of fresh pages costs more than the copy itself (copying a 262 MB batch: 0.62 s into fresh
        memory, 0.02 s into a used buffer; gathering its kept pixels: 0.75 s vs 0.25 s)."""
        m, n = probs.shape[:2]
        flat = probs.reshape(m, -1)
        hw = flat.shape[1] // max(n, 1)
        top = flat[0] if m == 1 else flat.max(axis=0)
        keep = top >= t_min
        t = truth.reshape(-1)
        idt = np.int32 if n < 2**23 else np.int64
        true_area = np.count_nonzero(truth.reshape(n, -1), axis=1).astype(np.int64)
        cls_prob = np.asarray(cls_prob, np.float32)
        if reuse is None:
            idx = np.flatnonzero(keep)  # flat positions over (N, hw): one gather per array, no 2-D fancy index
            img = idx // hw
            return cls(img.astype(idt), flat[:, idx], t[idx], true_area, cls_prob, area_scale, t_min,
                       (idx - img * hw).astype(np.int32) if positions else None)
        per_image = np.count_nonzero(keep.reshape(n, hw), axis=1)
        k = int(per_image.sum())
        vals, tr, img = reused(reuse, "vals", (m, k), np.uint8), reused(reuse, "truth", (k,), bool), reused(reuse, "img", (k,), idt)
        idx = None
        if k == flat.shape[1]:  # every pixel kept (a dense batch): a plain copy, no gather
            vals[...] = flat
            tr[...] = t
        else:
            idx = np.flatnonzero(keep)
            np.take(flat, idx, axis=1, out=vals, mode="clip")  # mode clip: written straight into the buffer
            np.take(t, idx, out=tr, mode="clip")
        at = 0
        for i, c in enumerate(per_image.tolist()):  # kept pixels come image by image
            img[at:at + c] = i
            at += c
        pix = None
        if positions:
            pix = (np.flatnonzero(keep) if idx is None else idx) - img.astype(np.int64) * hw
            pix = pix.astype(np.int32)
        return cls(img, vals, tr, true_area, cls_prob, area_scale, t_min, pix)

    def subset(self, image_mask: np.ndarray) -> "ClassData":
        """The same data restricted to the images where ``image_mask`` is true (renumbered)."""
        new_index = np.cumsum(image_mask) - 1
        keep = image_mask[self.img]
        return ClassData(new_index[self.img[keep]], self.vals[:, keep], self.truth[keep], self.true_area[image_mask],
                         self.cls[:, image_mask], self.area_scale, self.t_min, None if self.pix is None else self.pix[keep])


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
        """(N, T) area and intersection at ascending ``levels`` of ``blend_u8(vals, weights)``.

        Weights that are slot counts over a common total (what the greedy selection gives) are
        summed in integers (:func:`kernels.binned_counts_weighted` with int32 weights, 2-3x faster),
        others in float64."""
        w = np.asarray(weights, np.float64)
        members = np.flatnonzero(w)
        bins = level_bins(levels)
        slots = rational_weights(w[members])
        if slots is not None:
            counts, total = slots
            s = np.arange(255 * total + 1, dtype=np.int64)
            weights, lut = counts, bins[(2 * s + total) // (2 * total)]
        else:
            weights, lut = w[members], bins
        return counts_from_bins(*kernels.binned_counts_weighted(self.starts, self.ends, self.run_img, self.truth, vals, members,
                                                                weights, lut, self.n, len(levels) + 1))

    def histograms(self, vals: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(N, 256) per-image histograms of the uint8 ``vals``, over all pixels and over true ones."""
        ident = np.arange(256, dtype=np.int64)
        return kernels.binned_counts(self.starts, self.ends, self.run_img, _empty(None, np.bool_), self.truth, ident, vals,
                                     _empty(None, np.uint8), self.n, 256)


def _empty(a, dtype):
    """``a``, or an empty array standing for "none" in the kernels' signatures."""
    return np.zeros(0, dtype) if a is None else a


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


def area_inter(blended: np.ndarray, d: ClassData, levels: np.ndarray):
    """(N, T) predicted area and intersection at every level (any order), from per-image counts by
    level bin + suffix sums."""
    levels = np.asarray(levels)
    uniq, inv = np.unique(levels, return_inverse=True)
    area, inter = d.run_index().counts(uniq, blended)
    return (area, inter) if uniq.size == levels.size and np.all(inv == np.arange(levels.size)) else (area[:, inv], inter[:, inv])


def all_levels(t_min: int) -> np.ndarray:
    """Every uint8 level from the pruning level up: the counts the soft gate's per-image levels read."""
    return np.arange(int(t_min), 256)


def product_counts(all_counts, t_min: int, presence, levels) -> tuple[np.ndarray, np.ndarray]:
    """(N, T) area and intersection of the soft gate (``blended * presence >= level``) at ``levels``,
    from a blend's counts at :func:`all_levels` (each (N, 256 - t_min)): image ``i`` at level ``t``
    is its plain count at level :func:`product_levels` ``[i, t]`` (>= the level, so never below the
    pruning level: exact on the pruned pool)."""
    area, inter = all_counts
    idx = product_levels(presence, levels) - int(t_min)  # in 0 .. 256 - t_min (the last: nothing on)
    pad = np.zeros((area.shape[0], 1), area.dtype)
    return (np.take_along_axis(np.hstack([area, pad]), idx, 1), np.take_along_axis(np.hstack([inter, pad]), idx, 1))


def area_inter_dense(blended: np.ndarray, truth: np.ndarray, levels: np.ndarray, fill_holes: bool = False):
    """(N, T) area and intersection by explicit thresholding of dense maps (N, H, W).

    The slow exact path, needed when holes are filled (filling is not a histogram operation).
    """
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

