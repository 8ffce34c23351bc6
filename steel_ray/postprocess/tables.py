"""Choosing a class's post-processing from its Dice tables: per-fold (K, T, A, G) tables over the
grid, the point chosen in-sample or cross-fitted (on the other folds), and the gate source, which
must clear its noise to replace the segmentation gate (:class:`GateEvidence`)."""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from ..metric import dice_from_counts
from .counts import ClassData, Grid, area_inter
from .rule import GATE_SOURCES, Choice


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


# A gate source with a classifier in it enters a class's rule only when its gain over the
# segmentation gate clears the noise of the images it was chosen on: a one-sided test of the
# paired per-image Dice differences, mean > GATE_MARGIN standard errors (1.645: 5%). Without it a
# classifier that wins by a few lucky images of the tuning folds is kept and loses on new ones
# (issue 22: a fresh demo kept one whose cross-fitted score was 0.003 below the plain gate).
GATE_MARGIN = 1.645


@dataclass(frozen=True)
class GatePolicy:
    """Which gate sources compete in a class (the segmentation gate always does) and how far one
    with a classifier in it must beat the segmentation gate (``margin``, :class:`GateEvidence`)."""

    margin: float = GATE_MARGIN
    sources: tuple = tuple(GATE_SOURCES)

    def __post_init__(self):
        bad = [s for s in self.sources if s not in GATE_SOURCES]
        if bad:
            raise ValueError(f"gate sources {bad} unknown; choose among {list(GATE_SOURCES)}")


@dataclass
class GateEvidence:
    """What the per-image Dice of a class at any (gate source, grid point) needs: the blend's
    (N, T) predicted areas and intersections at the grid's levels, the true areas, each source's
    gate signal (N,), and the images' folds (-1: left out); ``source_counts`` the (area, inter) of a
    source that thresholds other pixels (the soft gate, ``product``)."""

    area: np.ndarray
    inter: np.ndarray
    true_area: np.ndarray
    area_scale: float
    gates: dict
    folds: np.ndarray
    n_folds: int
    margin: float = GATE_MARGIN
    source_counts: dict = field(default_factory=dict)

    def dice(self, source: str, choice: Choice, grid: Grid) -> np.ndarray:
        t = grid.index(choice)[0]
        area, inter = self.source_counts.get(source, (self.area, self.inter))
        return score_counts(area[:, t], inter[:, t], self.true_area, self.area_scale, self.gates[source], choice)

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

