"""The fast post-processing search against brute force on random pools: identical results."""
import numpy as np
import pytest

from steel_ray import ppsearch as ps
from steel_ray.metric import PostProcess, dice_per_pair


def _pool(seed, m=3, n=30, h=12, w=20):
    rng = np.random.default_rng(seed)
    truth = np.zeros((n, h, w), bool)
    for i in range(n):
        if rng.random() < 0.5:
            y, x = rng.integers(0, h - 4), rng.integers(0, w - 6)
            truth[i, y:y + rng.integers(2, 5), x:x + rng.integers(2, 7)] = True
    noise = rng.random((m, n, h, w))
    probs = np.clip(truth[None] * rng.uniform(0.3, 0.9, (m, n, 1, 1)) + noise * rng.uniform(0.2, 0.8, (m, 1, 1, 1)), 0, 1)
    probs = (probs * 255).round().astype(np.uint8)
    cls = rng.random((m, n)).astype(np.float32)
    folds = rng.integers(0, 3, n)
    return probs, truth, cls, folds


def _brute(blend, truth, cls_b, folds, grid, fill=False):
    """Threshold, fill, area-filter, gate and score each mask explicitly."""
    out = np.zeros((3, len(grid.levels), len(grid.min_areas), len(grid.cls_thresholds)))
    for t, lv in enumerate(grid.levels):
        for a, ma in enumerate(grid.min_areas):
            for g, ct in enumerate(grid.cls_thresholds):
                pp = PostProcess(pixel_threshold=lv / 255, min_area=ma, cls_threshold=ct, fill_holes=fill)
                d = dice_per_pair(pp.apply(blend, cls_b), truth)
                for k in range(3):
                    out[k, t, a, g] = d[folds == k].sum()
    return out


GRIDS = [
    ps.Grid(np.array([64, 100, 128, 200]), np.array([0.0, 5, 10, 30]), np.array([0.0, 0.3, 0.6])),
    ps.Grid(np.array([90, 91, 255]), np.array([0.0, 1, 2, 240]), np.array([0.0, 0.5, 0.99])),
]


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("grid", GRIDS)
def test_fast_tables_equal_brute_force(seed, grid):
    probs, truth, cls, folds = _pool(seed)
    w = np.array([0.5, 0.25, 0.25])
    data = ps.ClassData.from_dense(probs, truth, cls, t_min=grid.t_min)
    assert data.vals.shape[1] < probs[0].size  # pixels were pruned
    blended_sparse = ps.blend_u8(data.vals, w)
    cls_b = ps.blend_cls(cls, w)
    fast = ps.fold_tables(blended_sparse, cls_b, data, folds, 3, grid)
    brute = _brute(ps.blend_u8(probs, w), truth, cls_b, folds, grid)
    np.testing.assert_allclose(fast, brute, rtol=0, atol=1e-9)


def test_fill_holes_dense_path_equals_brute_force():
    probs, truth, cls, folds = _pool(5, h=16, w=16)
    probs[:, :, 5, 5] = 0  # punch holes
    grid = GRIDS[0]
    blend = ps.blend_u8(probs, [1 / 3] * 3)
    area, inter = ps.area_inter_dense(blend, truth, grid.levels, fill_holes=True)
    fast = ps.tables_from_counts(area, inter, truth.sum((1, 2)), 1.0, cls.mean(0), folds, 3, grid)
    brute = _brute(blend, truth, cls.mean(0), folds, grid, fill=True)
    np.testing.assert_allclose(fast, brute, atol=1e-9)


def test_cross_fitted_chooses_on_other_folds():
    probs, truth, cls, folds = _pool(3)
    grid = GRIDS[0]
    data = ps.ClassData.from_dense(probs, truth, cls, t_min=grid.t_min)
    tables = ps.fold_tables(ps.blend_u8(data.vals, [1, 0, 0]), cls[0], data, folds, 3, grid)
    total, picks = ps.cross_fitted(tables, grid)
    manual = 0.0
    for k in range(3):
        other = tables[[f for f in range(3) if f != k]].sum(0)
        t, a, g = np.unravel_index(np.argmax(other), other.shape)
        manual += tables[k, t, a, g]
    assert total == pytest.approx(manual)
    best, choice = ps.in_sample(tables, grid)
    assert best == pytest.approx(tables.sum(0).max()) and best >= total - 1e-12


def test_blend_rule_rounds_half_up():
    vals = np.array([[1, 2, 255], [2, 3, 0]], np.uint8)
    assert ps.blend_u8(vals, [0.5, 0.5]).tolist() == [2, 3, 128]


def test_score_point_matches_postprocess():
    probs, truth, cls, folds = _pool(4)
    data = ps.ClassData.from_dense(probs, truth, cls, t_min=64)
    w = [0.2, 0.3, 0.5]
    c = ps.Choice(128, 10.0, 0.4)
    fast = ps.score_point(ps.blend_u8(data.vals, w), ps.blend_cls(cls, w), data, c)
    pp = PostProcess(128 / 255, 10.0, 0.4)
    np.testing.assert_allclose(fast, dice_per_pair(pp.apply(ps.blend_u8(probs, w), ps.blend_cls(cls, w)), truth))
