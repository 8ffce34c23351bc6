"""The fast post-processing search against brute force on random pools: identical results."""
import numpy as np
import pytest

from steel_ray import postprocess as ps
from steel_ray.blend import selection
from steel_ray.metric import dice_per_pair
from steel_ray.postprocess import PostProcess


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


def _brute(blend, truth, cls_b, folds, grid, fill=False, source="segmentation"):
    """Threshold, fill, area-filter, gate and score each mask explicitly (with ``source`` product:
    the soft gate, pixel probability times ``cls_b``)."""
    out = np.zeros((3, len(grid.levels), len(grid.min_areas), len(grid.cls_thresholds)))
    for t, lv in enumerate(grid.levels):
        for a, ma in enumerate(grid.min_areas):
            for g, ct in enumerate(grid.cls_thresholds):
                pp = PostProcess(pixel_threshold=lv / 255, min_area=ma, cls_threshold=ct, fill_holes=fill, gate_source=source)
                d = dice_per_pair(pp.apply(blend, cls_b), truth)
                for k in range(3):
                    out[k, t, a, g] = d[folds == k].sum()
    return out


GRIDS = [
    ps.Grid(np.array([64, 100, 128, 200]), np.array([0.0, 5, 10, 30]), np.array([0.0, 0.3, 0.6]), rule="argmax"),
    ps.Grid(np.array([90, 91, 255]), np.array([0.0, 1, 2, 240]), np.array([0.0, 0.5, 0.99]), rule="argmax"),
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


def test_product_levels_are_the_first_value_product_on_turns_on():
    rng = np.random.default_rng(0)
    q = np.r_[rng.random(3000), [0.0, 1.0, 0.5, 1 / 3, 2 / 3, 0.1, 0.7, 1e-9, 254 / 255]]
    levels = np.arange(1, 256)
    b = np.arange(256, dtype=np.uint8)
    got = ps.product_levels(q, levels)
    for i in range(len(q)):
        on = ps.product_on(np.broadcast_to(b, (len(levels), 1, 256)), np.full(len(levels), q[i]), levels[:, None, None])[:, 0]
        np.testing.assert_array_equal(got[i], np.where(on.any(1), on.argmax(1), 256), err_msg=f"presence {q[i]!r}")


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("grid", GRIDS)
def test_soft_gate_tables_equal_brute_force(seed, grid):
    """The soft gate's tables from the counts at every level, read at per-image levels, equal
    thresholding the pixel probability times the presence mask by mask (then min area, then the
    gate on the same presence)."""
    probs, truth, _, folds = _pool(seed)
    q = np.random.default_rng(seed + 10).random(probs.shape[1])
    q[:3] = (0.0, 1.0, 0.5)
    w = np.array([0.5, 0.25, 0.25])
    data = ps.ClassData.from_dense(probs, truth, np.zeros((3, probs.shape[1]), np.float32), t_min=grid.t_min)
    every = ps.area_inter(ps.blend_u8(data.vals, w), data, ps.all_levels(data.t_min))
    area, inter = ps.product_counts(every, data.t_min, q, grid.levels)
    fast = ps.tables_from_counts(area, inter, data.true_area, 1.0, q, folds, 3, grid)
    brute = _brute(ps.blend_u8(probs, w), truth, q, folds, grid, source="product")
    np.testing.assert_allclose(fast, brute, rtol=0, atol=1e-9)
    plain = ps.fold_tables(ps.blend_u8(data.vals, w), q, data, folds, 3, grid)
    assert not np.allclose(fast, plain)  # the soft gate is not the plain threshold here


def test_fill_holes_dense_path_equals_brute_force():
    probs, truth, cls, folds = _pool(5, h=16, w=16)
    probs[:, :, 5, 5] = 0  # punch holes
    grid = GRIDS[0]
    blend = ps.blend_u8(probs, [1 / 3] * 3)
    area, inter = ps.area_inter_dense(blend, truth, grid.levels, fill_holes=True)
    fast = ps.tables_from_counts(area, inter, truth.sum((1, 2)), 1.0, cls.mean(0), folds, 3, grid)
    brute = _brute(blend, truth, cls.mean(0), folds, grid, fill=True)
    np.testing.assert_allclose(fast, brute, atol=1e-9)


def _differing_folds_pool(grid):
    """The first planted pool whose folds choose different points (so cross-fitting is exercised)."""
    for seed in range(40):
        probs, truth, cls = _class_pool(np.random.default_rng(seed), 30)
        folds = np.arange(30) % 3
        data = ps.ClassData.from_dense(probs, truth, cls, t_min=grid.t_min)
        tables = ps.fold_tables(data.vals[0], cls[0], data, folds, 3, grid)
        total, picks = ps.cross_fitted(tables, grid)
        if len(set(picks)) > 1:
            return tables, total, picks
    raise AssertionError("no planted pool with folds that choose differently")


def test_cross_fitted_chooses_on_other_folds():
    grid = GRIDS[0]
    tables, total, picks = _differing_folds_pool(grid)
    assert len(set(picks)) > 1
    # the held-out score differs from scoring each fold with its own best point
    own = sum(tables[k].max() for k in range(3))
    assert total < own - 1e-9
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


def test_smooth_rule_picks_the_best_neighbourhood_not_the_spike():
    table = np.zeros((5, 4, 3))
    table[0, 0, 0] = 10.0  # an isolated spike on a corner (what a small pool overfits)
    table[2:5, 1:4, :] = 6.0  # a broad plateau
    table[3, 2, 1] = 7.0
    g = ps.Grid(np.arange(10, 15), np.array([0.0, 1, 2, 3]), np.array([0.0, 0.5, 0.9]), rule="smooth")
    c = ps.choose(table[None], g)
    assert g.index(c) == (3, 2, 1)
    a = ps.choose(table[None], ps.Grid(g.levels, g.min_areas, g.cls_thresholds, rule="argmax"))
    assert (a.level, a.min_area, a.cls_threshold) == (10, 0.0, 0.0)


def _class_pool(rng, n, h=16, w=24):
    """One class: half the images hold a rectangle; a noisy, under-confident model."""
    truth = np.zeros((n, h, w), bool)
    for i in range(n):
        if rng.random() < 0.4:
            bh, bw = rng.integers(2, 7), rng.integers(3, 12)
            y, x = rng.integers(0, h - bh), rng.integers(0, w - bw)
            truth[i, y:y + bh, x:x + bw] = True
    p = np.clip(truth * rng.uniform(0.15, 0.6, (n, 1, 1)) + rng.random((n, h, w)) * rng.uniform(0.2, 0.6, (n, 1, 1)), 0, 1)
    probs = (p * 255).round().astype(np.uint8)[None]
    cls = np.clip(truth.any((1, 2)) * 0.35 + rng.random(n) * 0.65, 0, 1).astype(np.float32)[None]
    return probs, truth, cls


def test_smooth_choice_generalises_at_least_as_well_as_argmax_on_small_pools():
    """Choose on a small pool (30 images), score the choice on 2,000 fresh images of the same kind."""
    grid_s = ps.Grid(np.arange(26, 230, 13), np.array([0.0, 5, 10, 20, 30, 45, 60]), np.array([0.0, 0.2, 0.35, 0.5, 0.65, 0.8]))
    grid_a = ps.Grid(grid_s.levels, grid_s.min_areas, grid_s.cls_thresholds, rule="argmax")
    rng = np.random.default_rng(0)
    big_probs, big_truth, big_cls = _class_pool(rng, 2000)
    big = ps.ClassData.from_dense(big_probs, big_truth, big_cls, t_min=grid_s.t_min)
    big_tables = ps.fold_tables(big.vals[0], big_cls[0], big, np.zeros(2000, int), 1, grid_s)[0] / 2000
    held = {"smooth": [], "argmax": []}
    differ = 0
    for seed in range(1, 25):
        probs, truth, cls = _class_pool(np.random.default_rng(seed), 30)
        d = ps.ClassData.from_dense(probs, truth, cls, t_min=grid_s.t_min)
        tables = ps.fold_tables(d.vals[0], cls[0], d, np.zeros(30, int), 1, grid_s)
        cs, ca = ps.choose(tables, grid_s), ps.choose(tables, grid_a)
        differ += cs != ca
        held["smooth"].append(big_tables[grid_s.index(cs)])
        held["argmax"].append(big_tables[grid_a.index(ca)])
    assert differ >= 5  # the two rules really choose differently on these pools
    assert np.mean(held["smooth"]) >= np.mean(held["argmax"])


def test_edge_of_grid_is_reported():
    g = ps.default_grid((256, 1600))
    assert g.edges(ps.Choice(int(g.levels[0]), 0.0, 0.0)) == [f"pixel_threshold {g.levels[0] / 255:.3f} is the grid's lowest level"]
    assert g.edges(ps.Choice(int(g.levels[5]), float(g.min_areas[3]), 0.5)) == []
    assert len(g.edges(ps.Choice(int(g.levels[-1]), float(g.min_areas[-1]), float(g.cls_thresholds[-1])))) == 3
    assert g.levels[0] / 255 <= 0.05 + 1 / 255 and g.levels[-1] / 255 >= 0.95


def test_streamed_hole_filling_equals_the_dense_reference():
    """Rings whose centres sit below the pruning level, rings cut by the image border (not holes),
    several components per image: the per-image crop fill must equal filling whole images."""
    rng = np.random.default_rng(7)
    n, h, w = 24, 24, 40
    yy, xx = np.mgrid[:h, :w]
    probs = (rng.random((2, n, h, w)) * 40).astype(np.uint8)  # mostly below t_min
    truth = np.zeros((n, h, w), bool)
    for i in range(n):
        for _ in range(rng.integers(0, 3)):
            cy, cx = rng.integers(-2, h + 2), rng.integers(-2, w + 2)  # some rings cut by the border
            r = np.hypot(yy - cy, xx - cx)
            ring = (r >= rng.uniform(2, 4)) & (r < rng.uniform(5, 7))
            probs[:, i][:, ring] = rng.integers(90, 255, (2, 1))
            truth[i] |= r < 6
    cls = rng.random((2, n)).astype(np.float32)
    grid = ps.Grid(np.array([64, 100, 128, 200]), np.array([0.0, 5, 30, 80]), np.array([0.0, 0.5]), rule="argmax")
    w_ = [0.5, 0.5]
    blend = ps.blend_u8(probs, w_)
    dense_area, dense_inter = ps.area_inter_dense(blend, truth, grid.levels, fill_holes=True)
    plain_area, _ = ps.area_inter_dense(blend, truth, grid.levels, fill_holes=False)
    assert (dense_area > plain_area).any()  # holes were really filled somewhere
    d = ps.ClassData.from_dense(probs, truth, cls, t_min=grid.t_min)
    area, inter = ps.area_inter_filled(ps.blend_u8(d.vals, w_), d, lambda i: truth[i] if truth[i].any() else None,
                                       (h, w), grid.levels)
    np.testing.assert_array_equal(area, dense_area)
    np.testing.assert_array_equal(inter, dense_inter)
    # and a subset keeps the positions aligned
    keep = np.arange(n) % 2 == 0
    sub = d.subset(keep)
    a2, i2 = ps.area_inter_filled(ps.blend_u8(sub.vals, w_), sub, lambda i: truth[keep][i] if truth[keep][i].any() else None,
                                  (h, w), grid.levels)
    np.testing.assert_array_equal(a2, dense_area[keep])


def _runs_case(seed, n=300):
    """Pixels in runs of one image: 700 runs over 300 images (runs 300..699 repeat images, as a
    batch read per fold does), some empty images, random values and truth."""
    rng = np.random.default_rng(seed)
    sizes = rng.integers(0, 60, 700)
    sizes[np.arange(700) % n < 10] = 0  # images 0..9 have no kept pixel
    img = np.concatenate([np.full(int(k), i % n, np.int32) for i, k in enumerate(sizes)])
    return rng, img, rng.random(img.size) < 0.3


def _brute_counts(img, blended, truth, levels, n, skip=None):
    area = np.zeros((n, len(levels)), np.int64)
    inter = np.zeros_like(area)
    for t, lv in enumerate(levels):
        np.add.at(area[:, t], img, blended >= lv)
        np.add.at(inter[:, t], img, (blended >= lv) & truth)
    if skip is not None:
        area[skip], inter[skip] = 0, 0
    return area, inter


def test_run_histograms_equal_brute_force():
    """The compiled per-run counts give exact per-image histograms; images split into several
    runs add up; empty images stay empty."""
    rng, img, truth = _runs_case(3)
    n = 300
    vals = rng.integers(0, 256, img.size).astype(np.uint8)
    h_all, h_true = ps.image_histograms(img, vals, truth, n)
    ref_all = np.zeros((n, 256), np.int64)
    ref_true = np.zeros((n, 256), np.int64)
    np.add.at(ref_all, (img, vals), 1)
    np.add.at(ref_true, (img[truth], vals[truth]), 1)
    np.testing.assert_array_equal(h_all, ref_all)
    np.testing.assert_array_equal(h_true, ref_true)
    assert (h_all.sum(1) == 0).any() and ps.RunIndex(img, truth, n).starts.size > n


def test_run_counts_of_a_running_sum_equal_brute_force():
    """The greedy's fused pass (blend rule as a lookup over running sums, plus one more member,
    thresholds as bins, images left out) equals thresholding the blended values one level at a time."""
    rng, img, truth = _runs_case(4)
    n, k = 300, 7
    members = rng.integers(0, 256, (k, img.size)).astype(np.uint8)
    sums = members[:-1].astype(np.uint16).sum(0).astype(np.uint16)
    lut = ((2 * np.arange(255 * k + 1) + k) // (2 * k)).astype(np.uint8)
    blended = ps.blend_u8(members, np.full(k, 1 / k))
    np.testing.assert_array_equal(lut[sums + members[-1]], blended)  # the lookup is the blend rule
    levels = np.array([0, 13, 64, 127, 128, 200, 255])
    skip = rng.random(n) < 0.2
    idx = ps.RunIndex(img, truth, n)
    got = idx.counts(levels, sums, members[-1], lut, skip)
    for g, r in zip(got, _brute_counts(img, blended, truth, levels, n, skip)):
        np.testing.assert_array_equal(g, r)
    for g, r in zip(idx.counts(levels, blended), _brute_counts(img, blended, truth, levels, n)):
        np.testing.assert_array_equal(g, r)
    with pytest.raises(ValueError, match="ascend"):
        idx.counts(levels[::-1], blended)


@pytest.mark.parametrize("weights", [[0.5, 0.5, 0], [1 / 3, 1 / 3, 1 / 3], [0.1, 0.7, 0.2], [0.6, 0.0, 0.4],
                                     [7 / 25, 0, 18 / 25], [0.123456789, 0.5, 0.376543211], [0.2, 0.3, 0.5000001]])
def test_run_counts_weighted_are_blend_u8_bit_for_bit(weights):
    """The fused weighted blend rounds exactly like blend_u8, ties at .5 included ([0.5, 0.5] on odd
    sums), and skips zero-weight members: in integers for slot-count weights (the first five), in
    float64 for the others (the last two)."""
    w = np.asarray(weights)
    assert (ps.counts.rational_weights(w[w > 0]) is None) == (weights[0] in (0.123456789, 0.2))
    rng, img, truth = _runs_case(5)
    n = 300
    vals = rng.integers(0, 256, (3, img.size)).astype(np.uint8)
    vals[1, ::2] = vals[0, ::2] + 1  # odd pair sums: exact .5 ties for [0.5, 0.5]
    blended = ps.blend_u8(vals, weights)
    levels = np.arange(1, 256)  # every value boundary
    got = ps.RunIndex(img, truth, n).counts_weighted(levels, vals, weights)
    for g, r in zip(got, _brute_counts(img, blended, truth, levels, n)):
        np.testing.assert_array_equal(g, r)


def test_tables_from_counts_equal_a_direct_loop():
    """The binned suffix sums equal the definition, pair by pair, with a grid whose lowest min area
    and gate are above every pair's (bin 0) and images left out with fold -1."""
    rng = np.random.default_rng(5)
    n = 80
    area = rng.integers(0, 40, (n, 3))
    inter = np.minimum(area, rng.integers(0, 20, (n, 3)))
    true = np.where(rng.random(n) < 0.4, 0, rng.integers(1, 30, n))
    inter[true == 0] = 0
    cls_b = rng.random(n)
    folds = rng.integers(-1, 3, n)
    grid = ps.Grid(np.array([50, 100, 150]), np.array([2.0, 10, 25]), np.array([0.05, 0.5, 0.8]), rule="argmax")
    got = ps.tables_from_counts(area, inter, true, 1.5, cls_b, folds, 3, grid)
    ref = np.zeros_like(got)
    for i in range(n):
        if folds[i] < 0:
            continue
        for t in range(3):
            for a, ma in enumerate(grid.min_areas):
                for g, ct in enumerate(grid.cls_thresholds):
                    keep = area[i, t] * 1.5 >= ma and cls_b[i] >= ct
                    p, q = (area[i, t], inter[i, t]) if keep else (0, 0)
                    ref[folds[i], t, a, g] += 1.0 if p + true[i] == 0 else 2 * q / (p + true[i])
    np.testing.assert_allclose(got, ref, rtol=0, atol=1e-9)
    with pytest.raises(ValueError, match="ascending"):
        ps.Grid(np.array([50, 40]), np.array([0.0]), np.array([0.0]))


def test_counts_at_levels_in_any_order_equal_suffix_sums():
    rng = np.random.default_rng(8)
    h_all = rng.integers(0, 50, (6, 256))
    h_true = np.minimum(h_all, rng.integers(0, 20, (6, 256)))
    for levels in (np.array([13, 26, 128, 255]), np.array([128, 13, 13, 200]), np.array([0])):
        a, t = ps.counts_from_histograms(h_all, h_true, levels)
        np.testing.assert_array_equal(a, np.stack([h_all[:, lv:].sum(1) for lv in levels], 1))
        np.testing.assert_array_equal(t, np.stack([h_true[:, lv:].sum(1) for lv in levels], 1))


def test_levels_below_the_pruning_level_are_refused():
    """Pixels under the pruning level were dropped, so a search or a fill below it would count
    them as empty: every entry point refuses it, naming both levels."""
    rng = np.random.default_rng(8)
    probs = rng.integers(0, 256, (2, 3, 8, 8)).astype(np.uint8)
    truth = rng.random((3, 8, 8)) < 0.3
    d = ps.ClassData.from_dense(probs, truth, rng.random((2, 3)), t_min=40)
    low = ps.Grid(np.array([20, 128]), np.array([0.0, 10]), np.array([0.0, 0.5]), rule="argmax")
    with pytest.raises(ValueError, match="grid level 20 is below the pruning level 40"):
        ps.fold_tables(ps.blend_u8(d.vals, [0.5, 0.5]), np.zeros(3), d, np.zeros(3, int), 1, low)
    with pytest.raises(ValueError, match="grid level 20 is below the pruning level 40"):
        ps.area_inter_filled(ps.blend_u8(d.vals, [0.5, 0.5]), d, lambda i: None, (8, 8), low.levels)
    with pytest.raises(ValueError, match="grid level 20 is below the pruning level 40"):
        selection._forward([d] * 4, np.zeros(3, int), 1, [low] * 4, [0, 1], 2, [], range(4))


def _gate_case(n_lucky, n=40):
    """20 images with a defect found exactly, 20 empty ones with a false positive of 10 px on
    ``n_lucky`` of them. The segmentation presence is 0.9 everywhere (it cannot tell the false
    positives apart); the classifier's is 0.1 on those, 0.9 elsewhere: its gate gains exactly one
    image's Dice (0 -> 1) per false positive."""
    has = np.arange(n) < n // 2
    fp = ~has & (np.arange(n) < n // 2 + n_lucky)
    area = np.where(has | fp, 10.0, 0.0)[:, None]
    inter = np.where(has, 10.0, 0.0)[:, None]
    true_area = np.where(has, 10.0, 0.0)
    seg, clf = np.full(n, 0.9), np.where(fp, 0.1, 0.9)
    folds = np.arange(n) % 2
    grid = ps.Grid(np.array([128], np.uint8), np.array([0.0]), np.array([0.0, 0.5]), rule="argmax")
    gates = {src: ps.gate_signal(seg, clf, src) for src in ps.GATE_SOURCES}
    tables = {src: ps.tables_from_counts(area, inter, true_area, 1.0, g, folds, 2, grid) for src, g in gates.items()}
    return tables, ps.GateEvidence(area, inter, true_area, 1.0, gates, folds, 2), grid


def test_a_classifier_gate_must_clear_the_noise_of_its_per_image_gain():
    # one lucky image of n: gain mean 1/n with standard error exactly 1/n (t = 1), below 1.645
    tables, ev, grid = _gate_case(1)
    base, gated = ps.Choice(128, 0.0, 0.0), ps.Choice(128, 0.0, 0.5)
    assert ev.gain("classifier", gated, base, grid) == pytest.approx((1 / 40, 1 / 40))
    assert ps.choose_source(tables, grid)[0] == "classifier"  # any gain wins without the evidence
    assert ps.choose_source(tables, grid, evidence=ev) == ("segmentation", base)
    ev.margin = 0.9  # t = 1 clears a margin below 1
    assert ps.choose_source(tables, grid, evidence=ev) == ("classifier", gated)
    # on fold 0 alone (exclude fold 1) the lucky image (index 20, fold 0) is the same 1 of 20
    assert ev.gain("classifier", gated, base, grid, exclude=1) == pytest.approx((1 / 20, 1 / 20))
    # four lucky images: mean 0.1, sd sqrt((4 * 0.81 + 36 * 0.01) / 39), t = 2.08: the gate is earned
    tables, ev, grid = _gate_case(4)
    mean, se = ev.gain("classifier", gated, base, grid)
    assert mean == pytest.approx(0.1) and se == pytest.approx(np.sqrt(3.6 / 39 / 40))
    assert ps.choose_source(tables, grid, evidence=ev) == ("classifier", gated)
    total, picks = ps.cross_fitted_source(tables, grid, ev)  # each fold has 2 lucky images: t = sqrt(2) < 1.645
    assert [s for s, _ in picks] == ["segmentation", "segmentation"] and total == pytest.approx(36.0)


# the rule's primitives (moved from metric with the rule)
def test_threshold_uint8_is_exact_at_levels():
    p = np.arange(256, dtype=np.uint8)
    assert ps.threshold(p, 0.5).sum() == 256 - 128  # 128/255 >= 0.5 > 127/255
    assert ps.threshold(p, 128 / 255).sum() == 128
    assert ps.threshold(p, 0.0).all()
    assert not ps.threshold(p, 1.01).any()


def test_postprocess_order_and_gate():
    prob = np.zeros((2, 6, 6), np.uint8)
    prob[0, :3, :3] = 200  # area 9
    prob[1, :2, :2] = 200  # area 4
    pp = ps.PostProcess(pixel_threshold=0.5, min_area=5, cls_threshold=0.6)
    out = pp.apply(prob, cls_prob=np.array([0.9, 0.9]))
    assert out[0].sum() == 9 and out[1].sum() == 0
    out = pp.apply(prob, cls_prob=np.array([0.5, 0.9]))
    assert out.sum() == 0


def test_fill_holes():
    m = np.zeros((5, 5), bool)
    m[1:4, 1:4] = True
    m[2, 2] = False
    assert ps.fill_holes(m).sum() == 9
    assert ps.fill_holes(np.stack([m, m])).sum() == 18


def test_from_dense_into_reused_buffers_equals_fresh_arrays():
    """The streamed reader's batches go into reused buffers: the same kept pixels, images, truth and
    positions as fresh arrays, for a dense batch (every pixel kept: a plain copy), a sparse one (a
    gather) and a smaller batch after a larger one (no stale pixels from the first)."""
    rng = np.random.default_rng(3)
    reuse = {}
    dense = rng.integers(13, 200, (3, 5, 16, 24), dtype=np.uint8)
    sparse = np.where(rng.random((3, 5, 16, 24)) < 0.15, dense, 0).astype(np.uint8)
    for probs in (dense, sparse, sparse[:, :2], dense[:, :1]):
        n = probs.shape[1]
        truth = rng.random((n, 16, 24)) < 0.3
        cls = rng.random((3, n)).astype(np.float32)
        fresh = ps.ClassData.from_dense(probs, truth, cls, t_min=13)
        kept = ps.ClassData.from_dense(probs, truth, cls, t_min=13, reuse=reuse)
        assert kept.vals.shape[1] == int((probs.max(0) >= 13).sum())
        for k in ("img", "vals", "truth", "true_area", "cls", "pix"):
            np.testing.assert_array_equal(getattr(kept, k), getattr(fresh, k), err_msg=k)
        assert kept.img.dtype == fresh.img.dtype and kept.vals.flags.c_contiguous
    assert (dense.max(0) >= 13).all() and (sparse.max(0) >= 13).mean() < 0.5  # both paths really taken


def test_rational_weights_known_answers():
    """Slot counts over their total, and None where the integer rule could round otherwise."""
    r = ps.counts.rational_weights
    for w, counts, total in (([0.25, 0.75], [1, 3], 4), ([1 / 3] * 3, [1, 1, 1], 3), ([1.0], [1], 1),
                             ([3 / 25, 22 / 25], [3, 22], 25), ([1 / 20] * 20, [1] * 20, 20)):
        got = r(np.array(w))
        assert got is not None and got[1] == total and got[0].tolist() == counts, w
    assert r(np.array([0.3, 0.7000001])) is None  # near 3/10, 7/10 but not within the bound
    assert r(np.array([0.5, 0.6])) is None  # sums to more than 1: no common total
    assert r(np.array([-0.5, 1.5])) is None
    assert r(np.array([1 / 4097, 4096 / 4097])) is None  # total over max_total
