"""Blend optimizer at Severstal scale on generated pools (nothing needs training).

Run:  .venv/bin/python benchmarks/bench_blend.py [--images 12568] [--models 20] [--folds 5] [--max-members 25]
      .venv/bin/python benchmarks/bench_blend.py --images 2000 --models 8     # a quick look

1. Generates realistic sparse OOF maps for N images x 4 classes x M models at 256x1600: true
   masks with the real class frequencies and typical areas, models that find most defects with
   their own noise, miss some, and fire on some empty pairs; everything below the lowest grid
   threshold is pruned at generation (the blend can only exceed t where a member does), the 4x
   maps are block means of the full-resolution ones.
2. Times the full blend: selection on the 4x maps, final tuning at full resolution, nested
   5-fold score; reports peak memory.
3. Ratios against two baselines on a subset of images, run in the same process: the naive
   per-grid-point re-thresholding of public kernels (threshold the dense maps, measure areas,
   filter, score, for every grid point; timed on a sample of points and scaled), and the fair one
   a careful user would write: exact and dense, thresholding once per level and treating min
   area and gate as comparisons on the counts.
4. The Dice difference between post-processing tuned on the 4x maps and at full resolution.
"""
from __future__ import annotations

import argparse
import resource
import time

import numpy as np

from steel_ray import blend
from steel_ray import ppsearch as ps
from steel_ray.metric import dice_per_pair

H, W = 256, 1600
T_MIN = ps.default_grid((H, W)).t_min  # pruning level: the grid's lowest threshold
FREQ = np.array([897, 247, 5150, 801]) / 12568
# typical mask box sizes (h, w) per class at 256x1600: areas ~ 1.5k / 0.6k / 10k / 25k px
BOX = [((20, 60), (40, 120)), ((24, 64), (8, 24)), ((40, 180), (60, 400)), ((80, 250), (120, 400))]


def generate(n, m, n_folds, seed=0, density=None):
    """A pool of n images x m models. ``density`` None: the original generator (every model that
    fires on an empty pair fires inside one box per image, ~2% of pairs). ``density`` D: each model
    that fires on an empty pair (2% x D of pairs) paints its own box at its own place (diverse
    false positives: the kept pixels add up over models), so the kept fraction grows with D."""
    rng = np.random.default_rng(seed)
    skill = rng.uniform(0.55, 0.85, m)  # models differ in quality
    full, ds = [], []
    for c in range(4):
        acc = _ClassParts(n, m)
        has = rng.random(n) < FREQ[c]
        fp = rng.random((m, n)) < (0.02 if density is None else min(1.0, 0.02 * density))  # a model fires on 2% (x D) of pairs
        cls = np.where(has[None], rng.beta(5, 2, (m, n)), rng.beta(1.5, 6, (m, n))).astype(np.float32)
        (h0, h1), (w0, w1) = BOX[c]
        for i in np.flatnonzero(has | fp.any(0)):
            if density is None:  # one box per image: the defect and every model's false positive share it
                shrink = 1 if has[i] else 2  # false-positive blobs are smaller than real defects
                bh = int(rng.integers(h0, h1)) // shrink // 4 * 4 + 4
                bw = int(rng.integers(w0, w1)) // shrink // 4 * 4 + 4
                truth = np.zeros((bh, bw), bool)
                if has[i]:
                    truth[bh // 6:bh - bh // 6, bw // 6:bw - bw // 6] = True
                conf = np.where(has[i], skill * rng.uniform(0.6, 1.2, m), 0.0) + fp[:, i] * rng.uniform(0.4, 0.8, m)
                acc.add(i, conf[:, None, None] * (0.55 + 0.45 * truth[None]) + rng.normal(0, 0.12, (m, bh, bw)), truth)
                continue
            if has[i]:  # the defect: every model sees it, with its own skill and noise
                bh, bw = int(rng.integers(h0, h1)) // 4 * 4 + 4, int(rng.integers(w0, w1)) // 4 * 4 + 4
                truth = np.zeros((bh, bw), bool)
                truth[bh // 6:bh - bh // 6, bw // 6:bw - bw // 6] = True
                conf = skill * rng.uniform(0.6, 1.2, m)
                acc.add(i, conf[:, None, None] * (0.55 + 0.45 * truth[None]) + rng.normal(0, 0.12, (m, bh, bw)), truth)
            for j in np.flatnonzero(fp[:, i]):  # each false positive in its own place: only model j is confident
                bh, bw = int(rng.integers(h0, h1)) // 2 // 4 * 4 + 4, int(rng.integers(w0, w1)) // 2 // 4 * 4 + 4
                v = np.abs(rng.normal(0, 0.03, (m, bh, bw)))
                v[j] += rng.uniform(0.4, 0.8) * 0.55 + rng.normal(0, 0.12, (bh, bw))
                acc.add(i, v, np.zeros((bh, bw), bool))
        f, d = acc.finish(cls)
        full.append(f)
        ds.append(d)
    folds = np.arange(n) % n_folds
    rng.shuffle(folds)
    return blend.BlendPool([f"m{j:02d}" for j in range(m)], [f"{i:09x}.jpg" for i in range(n)], folds, n_folds, (H, W), full, ds)


class _ClassParts:
    """One class's kept pixels, box by box, at full resolution and 4x; :meth:`finish` makes the ClassData."""

    def __init__(self, n, m):
        self.m, self.parts = m, {"f": [], "d": []}
        self.true = {"f": np.zeros(n, np.int64), "d": np.zeros(n, np.int64)}

    def add(self, i, vals_f, truth):
        """Image ``i``'s box: probabilities (m, bh, bw) (clipped and quantised here) and its truth (bh, bw)."""
        m = self.m
        bh, bw = truth.shape
        vals = np.rint(np.clip(vals_f, 0, 1) * 255).astype(np.uint8)
        keep = vals.reshape(m, -1).max(0) >= T_MIN
        dv = np.rint(vals.reshape(m, bh // 4, 4, bw // 4, 4).mean((2, 4))).astype(np.uint8).reshape(m, -1)
        dt = (truth.reshape(bh // 4, 4, bw // 4, 4).mean((1, 3)) >= 0.5).ravel()
        kd = dv.max(0) >= T_MIN
        self.parts["f"].append((np.full(int(keep.sum()), i, np.int32), vals.reshape(m, -1)[:, keep], truth.ravel()[keep]))
        self.parts["d"].append((np.full(int(kd.sum()), i, np.int32), dv[:, kd], dt[kd]))
        self.true["f"][i] += int(truth.sum())
        self.true["d"][i] += int(dt.sum())

    def finish(self, cls):
        out = []
        for key, scale in (("f", 1.0), ("d", 16.0)):
            parts = self.parts[key]
            img = np.concatenate([p[0] for p in parts])
            tr = np.concatenate([p[2] for p in parts])
            vals = np.empty((self.m, img.size), np.uint8)  # filled part by part: no second full copy
            at = 0
            while parts:
                v = parts.pop(0)[1]
                vals[:, at:at + v.shape[1]] = v
                at += v.shape[1]
            out.append(ps.ClassData(img, vals, tr, self.true[key], cls, scale, T_MIN))
        return out


def real_kept_fraction(run) -> str:
    """The kept fraction of a real pool (what the generated one should resemble), read from its OOF files."""
    pool = blend.load_blend_pool(run, stream=False)
    h, w = pool.shape
    n = len(pool.image_ids)
    kept = sum(d.vals.shape[1] for d in pool.full)
    return (f"real pool {run}: {len(pool.model_ids)} models x {n} images at {h}x{w}: kept full-res pixels {kept:,} "
            f"({100 * kept / (4 * n * h * w):.2f}%)")


def dense_subset(pool: blend.BlendPool, c: int, n_sub: int, weights):
    """Dense full-res blended maps + truth for the first n_sub images of class c."""
    d = pool.full[c]
    sel = d.img < n_sub
    maps = np.zeros((n_sub, H * W), np.uint8)
    truth = np.zeros((n_sub, H * W), bool)
    # kept pixels are not located in the generator's output; place them in a fixed raster per image
    # (the metric only depends on counts, so placement does not change any score)
    order = np.argsort(d.img[sel], kind="stable")
    img = d.img[sel][order]
    start = np.searchsorted(img, np.arange(n_sub))
    pos = np.arange(img.size) - start[img]
    vals = ps.blend_u8(d.vals[:, sel][:, order], weights)
    maps[img, pos] = vals
    truth[img, pos] = d.truth[sel][order]
    extra = d.true_area[:n_sub] - np.bincount(img[truth[img, pos]], minlength=n_sub)
    for i in np.flatnonzero(extra > 0):  # true pixels below the pruning level
        free = np.flatnonzero(~truth[i] & (maps[i] == 0))[: extra[i]]
        truth[i, free] = True
    return maps.reshape(n_sub, H, W), truth.reshape(n_sub, H, W), ps.blend_cls(d.cls, weights)[:n_sub]


def kernel_search(maps, truth, cls_b, grid, points):
    """Public-kernel style: for each grid point, threshold the masks, filter by area, gate, score."""
    out = []
    for t, a, g in points:
        m = maps >= grid.levels[t]
        area = m.sum((1, 2))
        keep = (area >= grid.min_areas[a]) & (cls_b >= grid.cls_thresholds[g])
        m &= keep[:, None, None]
        out.append(dice_per_pair(m, truth).sum())
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--images", type=int, default=12568)
    ap.add_argument("--models", type=int, default=20)
    ap.add_argument("--folds", type=int, default=5)
    ap.add_argument("--max-members", type=int, default=25)
    ap.add_argument("--subset", type=int, default=200, help="images for the re-thresholding comparison")
    ap.add_argument("--kernel-points", type=int, default=12, help="grid points timed for the kernel baseline")
    ap.add_argument("--workers", type=int, default=2, help="processes for the nested folds (blend --workers)")
    ap.add_argument("--density", type=float, default=None,
                    help="diverse false positives: each model that fires on an empty pair (2%% x D of pairs) paints "
                         "its own box; default: the original generator (shared boxes)")
    ap.add_argument("--pool", help="a real run whose pool's kept fraction to print beside the generated one (e.g. runs/demo)")
    a = ap.parse_args()
    t0 = time.time()
    if a.pool:
        print(real_kept_fraction(a.pool))
    pool = generate(a.images, a.models, a.folds, density=a.density)
    kept = sum(d.vals.shape[1] for d in pool.full)
    print(f"pool: {a.images} images x 4 classes x {a.models} models at {H}x{W}; kept full-res pixels {kept:,} "
          f"({100 * kept / (4 * a.images * H * W):.2f}%), 4x: {sum(d.vals.shape[1] for d in pool.ds):,}; generated in {time.time() - t0:.0f}s")

    grid = ps.default_grid((H, W))
    # 1. exactness + speed vs the per-grid-point kernel on a dense subset
    w = np.full(a.models, 1 / a.models)
    maps, truth, cls_b = dense_subset(pool, 2, a.subset, w)
    # the fair baseline: exact and dense, thresholding once per level (not once per grid point),
    # then min area and gate as comparisons on the counts -- what a careful user would write
    t1 = time.perf_counter()
    area, inter = ps.area_inter_dense(maps, truth, grid.levels)
    dense_tables = ps.tables_from_counts(area, inter, truth.sum((1, 2)), 1.0, cls_b, np.zeros(a.subset, int), 1, grid)[0]
    t_dense = time.perf_counter() - t1
    t1 = time.perf_counter()  # ours: prune the dense maps, histograms, suffix sums, whole grid
    sub = ps.ClassData.from_dense(maps[None], truth, cls_b[None], grid.t_min)
    ours = ps.fold_tables(sub.vals[0], cls_b, sub, np.zeros(a.subset, int), 1, grid)[0]
    t_ours = time.perf_counter() - t1
    n_points = ours.size
    rng = np.random.default_rng(0)
    pts = [tuple(int(rng.integers(0, s)) for s in ours.shape) for _ in range(a.kernel_points)]
    t1 = time.perf_counter()
    ref = kernel_search(maps, truth, cls_b, grid, pts)
    t_kernel = (time.perf_counter() - t1) / len(pts) * n_points
    assert np.allclose([ours[p] for p in pts], ref), "fast search disagrees with re-thresholding"
    assert np.allclose(ours, dense_tables), "fast search disagrees with the dense per-level search"
    del maps, truth, area, inter
    print(f"\npost-processing search, class 3, {a.subset} dense images, {n_points} grid points (identical tables):")
    print(f"  {'method':62}{'seconds':>10}{'steel_ray is':>14}")
    print(f"  {'naive kernel: re-threshold per grid point (scaled from ' + str(len(pts)) + ')':62}{t_kernel:10.2f}"
          f"{t_kernel / t_ours:13.0f}x")
    print(f"  {'fair: exact dense, threshold once per level + comparisons':62}{t_dense:10.2f}{t_dense / t_ours:13.1f}x")
    print(f"  {'steel_ray: prune + histograms + suffix sums':62}{t_ours:10.3f}")

    # 2. the full blend
    t1 = time.time()
    res = blend.optimize(pool, max_members=a.max_members, nested=True, selection_resolution="ds4", workers=a.workers)
    total = time.time() - t1
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    peak_child = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 2**20
    s, tm = res.scores, res.settings["timings"]
    print(f"\nfull blend (max {a.max_members} members, {a.folds} folds, nested folds on {a.workers} processes), seconds:")
    for k in ("selection", "final_tuning", "singles_and_baseline", "nested"):
        print(f"  {k:24}{tm[k]:8.1f}")
    print(f"  {'total':24}{total:8.1f}   peak RSS: main {peak:.2f} GiB, largest nested worker {peak_child:.2f} GiB "
          f"(all processes <= {peak + a.workers * peak_child:.2f} GiB)")
    print(f"  scores: in_sample {s['in_sample']:.5f} cross_fitted {s['cross_fitted']:.5f} nested {s['nested']:.5f} "
          f"best_single {s['best_single']:.5f} baseline {s['baseline']:.5f}")
    print(f"  members: {sum(1 for x in res.weights[0] if x > 0)} distinct models")

    # 3. tuning on 4x maps vs full resolution (same weights): held-out Dice difference
    diff_rows = []
    for c in range(4):
        wc = res.weights[c]
        tf = ps.fold_tables(ps.blend_u8(pool.full[c].vals, wc), ps.blend_cls(pool.full[c].cls, wc), pool.full[c], pool.folds, a.folds, grid)
        td = ps.fold_tables(ps.blend_u8(pool.ds[c].vals, wc), ps.blend_cls(pool.ds[c].cls, wc), pool.ds[c], pool.folds, a.folds, grid)
        ch_full, ch_ds = ps.choose(tf, grid), ps.choose(td, grid)
        full_at_full = tf.sum(0)[grid.index(ch_full)] / a.images
        full_at_ds = tf.sum(0)[grid.index(ch_ds)] / a.images
        diff_rows.append((c + 1, full_at_full, full_at_ds))
    print("\nper-class Dice at full resolution: parameters tuned at full res vs tuned on 4x maps")
    for c, f, d in diff_rows:
        print(f"  class {c}: {f:.5f} vs {d:.5f}  (diff {f - d:+.5f})")
    print(f"  mean over classes: {np.mean([f - d for _, f, d in diff_rows]):+.5f}")
    print(f"\nreproduce: .venv/bin/python benchmarks/bench_blend.py --images {a.images} --models {a.models} --folds {a.folds} "
          f"--max-members {a.max_members} --workers {a.workers}" + (f" --density {a.density:g}" if a.density else "")
          + (f" --pool {a.pool}" if a.pool else ""))


if __name__ == "__main__":
    main()
