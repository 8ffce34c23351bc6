"""Blend optimizer at Severstal scale on generated pools (nothing needs training).

Run:  .venv/bin/python benchmarks/bench_blend.py [--images 12568] [--models 20] [--folds 5] [--max-members 25]
          [--density D] [--haze F] [--pool RUN] [--skip-ds-check]
      .venv/bin/python benchmarks/bench_blend.py --images 2000 --models 8     # a quick look

1. Generates realistic sparse OOF maps for N images x 4 classes x M models at 256x1600: true
   masks with the real class frequencies and typical areas, models that find most defects with
   their own noise, miss some, and fire on some empty pairs (``--density``: more, and each in its
   own place; ``--haze F``: diffuse low probabilities on a fraction F of every image, as the demo's
   under-trained models give, for a kept fraction like a real pool's). Each image comes from its
   own seed: the selection maps (block means of the full-resolution ones: 4x, or 8x / 16x when the
   4x maps would not fit ``--selection-memory``, chosen as the blend chooses) are held like the
   blend holds them, full resolution is regenerated batch by batch when the blend reads it, as it reads the
   Parquet files (their decoding is not timed here).
2. Ratios of the post-processing search against two baselines on dense maps of a subset of
   images (and of a real pool's maps with ``--pool``), run in the same process: the naive
   per-grid-point re-thresholding of public kernels (threshold the dense maps, measure areas,
   filter, score, for every grid point; timed on a sample of points and scaled), and the fair one
   a careful user would write: exact and dense, thresholding once per level and treating min
   area and gate as comparisons on the counts. All three give identical tables (asserted).
3. Times the full blend: selection on the selection maps, nested selections on worker processes, one
   pass per class over full resolution; peak memory of all processes (summed PSS, sampled).
4. The Dice difference between post-processing tuned on the selection maps and at full resolution.
"""
from __future__ import annotations

import argparse
import glob
import os
import resource
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

from steel_ray import blend
from steel_ray import postprocess as ps
from steel_ray import run as layout
from steel_ray.blend import pool as bpool
from steel_ray.blend import selection as bselect
from steel_ray.blend import tune
from steel_ray.metric import dice_per_pair
from steel_ray.postprocess.counts import reused

H, W = 256, 1600
T_MIN = ps.default_grid((H, W)).t_min  # pruning level: the grid's lowest threshold
FREQ = np.array([897, 247, 5150, 801]) / 12568
# typical mask box sizes (h, w) per class at 256x1600: areas ~ 1.5k / 0.6k / 10k / 25k px
BOX = [((20, 60), (40, 120)), ((24, 64), (8, 24)), ((40, 180), (60, 400)), ((80, 250), (120, 400))]


def _normal(rng, sigma, shape):
    return rng.standard_normal(shape, dtype=np.float32) * np.float32(sigma)


class Generated:
    """A generated pool of n images x m models, image by image from its own seed, so any batch of
    images can be regenerated exactly: the selection maps are held (as the blend holds them), full
    resolution is produced batch by batch when the blend reads it (as from the Parquet files).

    ``density`` None: the original generator (every model that fires on an empty pair fires
    inside one box per image, ~2% of pairs). ``density`` D: each model that fires on an empty pair
    (2% x D of pairs) paints its own box at its own place (diverse false positives: the kept
    pixels add up over models), so the kept fraction grows with D.
    """

    HAZE_ALIGN = 16  # haze windows start on multiples of the coarsest selection factor (their block means are exact)

    def __init__(self, n, m, seed=0, density=None, haze=0.0):
        self.n, self.m, self.seed, self.density, self.haze = n, m, seed, density, haze
        rng = np.random.default_rng(seed)
        self.skill = rng.uniform(0.55, 0.85, m)  # models differ in quality
        self.has = rng.random((4, n)) < FREQ[:, None]
        fp_rate = 0.02 if density is None else min(1.0, 0.02 * density)  # a model fires on 2% (x D) of pairs
        self.fp = rng.random((4, m, n)) < fp_rate
        self.cls = np.where(self.has[:, None], rng.beta(5, 2, (4, m, n)), rng.beta(1.5, 6, (4, m, n))).astype(np.float32)
        # haze: one random tile per class, twice the image's width; each image takes its own window
        # of it (fresh random values per image cost most of the generating at high haze)
        self.haze_w = max(self.HAZE_ALIGN, int(haze * W) // self.HAZE_ALIGN * self.HAZE_ALIGN) if haze else 0
        self._tiles = {}

    def haze_tile(self, c, factor=1) -> np.ndarray:
        """Class ``c``'s haze tile (m, H, 2W) uint8 values T_MIN..51 (0.05-0.2), block-meaned at ``factor``."""
        if (c, factor) not in self._tiles:
            if factor == 1:
                self._tiles[c, 1] = np.random.default_rng([self.seed, c, 2**31]).integers(T_MIN, 52, (self.m, H, 2 * W), dtype=np.uint8)
            else:
                self._tiles[c, factor] = _block_mean(self.haze_tile(c), factor)
        return self._tiles[c, factor]

    def boxes(self, c, i):
        """Image i's boxes of class c: [(probabilities (m, bh, bw) float, truth (bh, bw))]; the haze
        is a window ``(c, offset, width)`` of the class's tile (see :meth:`class_data`), as wide as
        ``--haze`` asks and the other boxes leave room for (at most every pixel of the image kept)."""
        has, fp = self.has[c, i], self.fp[c, :, i]
        if not (has or fp.any() or self.haze):
            return []
        rng = np.random.default_rng([self.seed, c, i])
        off = int(rng.integers(0, W // self.HAZE_ALIGN + 1)) * self.HAZE_ALIGN if self.haze else 0
        out = self._objects(c, i, rng) if (has or fp.any()) else []
        if self.haze:  # diffuse low probabilities (0.05-0.2) on a fraction of the image, as under-trained models give
            free = H * W - sum(t.size for _, t in out)
            w = min(self.haze_w, free // H // self.HAZE_ALIGN * self.HAZE_ALIGN)
            if w:
                out.insert(0, ((c, off, w), np.zeros((H, w), bool)))
        return out

    def _objects(self, c, i, rng):
        """The defect and false-positive boxes of image i, class c (``rng``: the pair's own)."""
        has, fp, m = self.has[c, i], self.fp[c, :, i], self.m
        (h0, h1), (w0, w1) = BOX[c]
        out = []
        if self.density is None:  # one box per image: the defect and every model's false positive share it
            shrink = 1 if has else 2  # false-positive blobs are smaller than real defects
            bh = int(rng.integers(h0, h1)) // shrink // 4 * 4 + 4
            bw = int(rng.integers(w0, w1)) // shrink // 4 * 4 + 4
            truth = np.zeros((bh, bw), bool)
            if has:
                truth[bh // 6:bh - bh // 6, bw // 6:bw - bw // 6] = True
            conf = np.where(has, self.skill * rng.uniform(0.6, 1.2, m), 0.0) + fp * rng.uniform(0.4, 0.8, m)
            out.append((conf[:, None, None] * (0.55 + 0.45 * truth[None]) + _normal(rng, 0.12, (m, bh, bw)), truth))
            return out
        if has:  # the defect: every model sees it, with its own skill and noise
            bh, bw = int(rng.integers(h0, h1)) // 4 * 4 + 4, int(rng.integers(w0, w1)) // 4 * 4 + 4
            truth = np.zeros((bh, bw), bool)
            truth[bh // 6:bh - bh // 6, bw // 6:bw - bw // 6] = True
            conf = self.skill * rng.uniform(0.6, 1.2, m)
            out.append((conf[:, None, None] * (0.55 + 0.45 * truth[None]) + _normal(rng, 0.12, (m, bh, bw)), truth))
        for j in np.flatnonzero(fp):  # each false positive in its own place: only model j is confident
            bh, bw = int(rng.integers(h0, h1)) // 2 // 4 * 4 + 4, int(rng.integers(w0, w1)) // 2 // 4 * 4 + 4
            v = np.abs(_normal(rng, 0.03, (m, bh, bw)))
            v[j] += rng.uniform(0.4, 0.8) * 0.55 + _normal(rng, 0.12, (bh, bw))
            out.append((v, np.zeros((bh, bw), bool)))
        return out

    def class_data(self, c, rows, res, factor=4, reuse=None):
        """Class c of images ``rows`` (indices 0..len-1 in the result) at ``res`` (full, or ds: block
        means at ``factor``), pruned (``reuse``: see :meth:`_ClassParts.finish`)."""
        acc = _ClassParts(len(rows), self.m, res, factor)
        for k, i in enumerate(rows):
            for vals_f, truth in self.boxes(c, i):
                if isinstance(vals_f, tuple):  # a haze window: sliced from the tile at this resolution
                    f = 1 if res == "full" else factor
                    _, off, w = vals_f
                    acc.add(k, self.haze_tile(c, f)[:, :, off // f:(off + w) // f], truth, ready=True)
                else:
                    acc.add(k, vals_f, truth)
        return acc.finish(self.cls[c][:, rows], reuse)


class GeneratedReader:
    """The blend's full-resolution source for a generated pool: batches like the Parquet reader's.

    Its counters live in shared memory: the blend reads classes on forked worker processes.
    """

    def __init__(self, gen: Generated, batch=32):
        import multiprocessing as mp

        self.gen, self.batch = gen, batch
        self.reuse = {}  # (resolution, class) -> the batch's reused buffers (per process: forked copies)
        self._passes, self._kept = mp.Value("i", 0), mp.Value("q", 0)
        self._seconds = mp.Value("d", 0.0)  # spent generating maps (stands in for reading and decoding the Parquet files)
        self._counted = mp.Array("b", 4 * (-(-gen.n // batch)))  # (class, batch) already in kept

    passes = property(lambda self: self._passes.value)
    kept = property(lambda self: self._kept.value)
    seconds = property(lambda self: self._seconds.value)

    def batches(self, classes, resolutions):
        with self._passes.get_lock():
            self._passes.value += 1
        for start in range(0, self.gen.n, self.batch):
            rows = np.arange(start, min(self.gen.n, start + self.batch))
            t = time.perf_counter()
            out = {r: {c: self.gen.class_data(c, rows, r, reuse=self.reuse.setdefault((r, c), {}) if r == "full" else None)
                       for c in classes}
                   for r in resolutions}
            with self._seconds.get_lock():
                self._seconds.value += time.perf_counter() - t
            for c in classes:
                slot = c * len(self._counted) // 4 + start // self.batch
                if "full" in out and not self._counted[slot]:
                    self._counted[slot] = 1
                    with self._kept.get_lock():
                        self._kept.value += out["full"][c].vals.shape[1]
            yield rows, None, out


def generate(n, m, n_folds, seed=0, density=None, haze=0.0, workers=1,
             budget=bpool.SELECTION_MEMORY_GIB) -> tuple[blend.BlendPool, Generated]:
    """The blend pool of a generated set: the selection maps in memory (classes generated on
    ``workers`` processes), full resolution streamed. Their factor is chosen as the blend's loader
    chooses it (:func:`steel_ray.blend.pool.selection_factor` on a sample: here the first 640 images)."""
    gen = Generated(n, m, seed, density, haze)
    sample = np.arange(min(n, 5 * bpool.SAMPLE_BATCHES * 32))
    factors = [f for f in bpool.FACTORS if H // f >= 16]
    kept = {f: sum(gen.class_data(c, sample, "ds", f).vals.shape[1] for c in range(4)) for f in factors}
    pixels = {f: 4 * len(sample) * -(-H // f) * -(-W // f) for f in factors}
    pixels["images"] = len(sample)
    choice = {**bpool.selection_factor(kept, pixels, m, n, budget), "chosen_by": "selection_memory"}
    f = choice["factor"]
    ds = tune._map(lambda c: gen.class_data(c, np.arange(n), "ds", f), list(range(4)), workers)
    folds = np.arange(n) % n_folds
    np.random.default_rng(seed).shuffle(folds)
    full = bpool._StreamedFull(GeneratedReader(gen))
    pool = blend.BlendPool([f"m{j:02d}" for j in range(m)], [f"{i:09x}.jpg" for i in range(n)], folds, n_folds, (H, W), full, ds,
                           ds_factor=f, ds_choice=choice)
    return pool, gen


def _block_mean(vals: np.ndarray, f: int) -> np.ndarray:
    """(..., h, w) uint8 -> block means at ``f`` (rounded; h, w zero-padded to multiples of ``f``:
    the box's surroundings are empty), by 4x blocks first as the OOF writer's maps, then 2x2 blocks
    of those as the blend's 8x / 16x maps (:func:`steel_ray.blend.pool._ds_maps`)."""
    step = min(f, 4)
    h, w = vals.shape[-2:]
    ph, pw = -h % step, -w % step
    if ph or pw:
        vals = np.pad(vals, [(0, 0)] * (vals.ndim - 2) + [(0, ph), (0, pw)])
    h, w = vals.shape[-2:]
    out = np.rint(vals.reshape(*vals.shape[:-2], h // step, step, w // step, step).mean((-3, -1))).astype(np.uint8)
    return out if step == f else _block_mean(out, f // step)


class _ClassParts:
    """One class's kept pixels, box by box, at one resolution (full or ds at ``factor``); :meth:`finish` makes the ClassData."""

    def __init__(self, n, m, res, factor=4):
        self.m, self.res, self.factor, self.parts = m, res, factor, []
        self.true = np.zeros(n, np.int64)

    def add(self, i, vals_f, truth, ready=False):
        """Image ``i``'s box: probabilities (m, bh, bw) (clipped and quantised here; ``ready``: uint8 at
        this resolution already, every value at least T_MIN, no truth: a haze window, kept whole
        and copied only into the result) and its truth (bh, bw) at full resolution."""
        m, f = self.m, self.factor
        bh, bw = truth.shape
        if ready:
            self.parts.append((i, vals_f, None))
            return
        vals = vals_f if vals_f.dtype == np.uint8 else np.rint(np.clip(vals_f, 0, 1) * 255).astype(np.uint8)
        if self.res == "ds":  # block means, as the OOF writer's 4x maps (and the blend's 8x / 16x of those)
            vals = _block_mean(vals, f)
            ph, pw = -bh % f, -bw % f
            truth = np.pad(truth, [(0, ph), (0, pw)]).reshape((bh + ph) // f, f, (bw + pw) // f, f).mean((1, 3)) >= 0.5
        vals = vals.reshape(m, -1)
        keep = vals.max(0) >= T_MIN
        self.parts.append((i, vals[:, keep], truth.ravel()[keep]))
        self.true[i] += int(truth.sum())

    def finish(self, cls, reuse=None):
        """The ClassData; ``reuse`` (full resolution, read batch by batch): its arrays in buffers
        reused from batch to batch, as the blend's reader keeps them (ClassData.from_dense)."""
        parts = self.parts
        size = [int(np.prod(p[1].shape[1:])) for p in parts]
        k = sum(size)
        fresh = reuse is None
        img = np.empty(k, np.int32) if fresh else reused(reuse, "img", (k,), np.int32)
        tr = np.empty(k, bool) if fresh else reused(reuse, "truth", (k,), bool)
        vals = np.empty((self.m, k), np.uint8) if fresh else reused(reuse, "vals", (self.m, k), np.uint8)
        at = 0
        while parts:  # filled part by part: no second full copy
            i, v, t = parts.pop(0)
            n = size.pop(0)
            img[at:at + n] = i
            tr[at:at + n] = False if t is None else t
            vals[:, at:at + n].reshape(v.shape)[...] = v
            at += n
        return ps.ClassData(img, vals, tr, self.true, cls, 1.0 if self.res == "full" else float(self.factor ** 2), T_MIN)


def copied_run(run, copies, out) -> tuple[Path, list[str]]:
    """A run at ``out`` whose pool lists each of ``run``'s models ``copies`` times (``<id>-copyK``):
    symlinks to the same Parquet files, nothing copied. Reading its pool costs what reading
    ``copies`` x as many real models costs (decode, batch buffer, pruning over every model), where
    the demo has only 3: costs per pixel that do not grow with the models (truth masks, locating
    the kept pixels) are then shared as in a 20-model pool."""
    run, out = Path(run).resolve(), Path(out)
    out.mkdir(parents=True)
    for e in run.iterdir():
        if e.name != "oof":
            (out / e.name).symlink_to(e)
    (out / "oof").mkdir()
    base = blend.search_models(run)
    if not base:
        raise SystemExit(f"{run}: no completed search (search.json), so no model list to copy")
    for d in (run / "oof").iterdir():
        (out / "oof" / d.name).symlink_to(d)
    ids = list(base)
    for k in range(1, copies):
        for m in base:
            (out / "oof" / f"model_id={m}-copy{k}").symlink_to(run / "oof" / f"model_id={m}")
            ids.append(f"{m}-copy{k}")
    return out, ids


def _timed_read(pool) -> tuple[float, int]:
    """Seconds per pixel per model of reading ``pool``'s full resolution the way the blend does
    (Parquet decode, one batch buffer, pruning), and its kept pixels (counted during the read)."""
    (h, w), n, m = pool.shape, len(pool.image_ids), len(pool.model_ids)
    kept = 0
    t = time.perf_counter()
    for k in range(4):
        for _, _, out in pool.full.reader.batches([k], ("full",)):
            kept += out["full"][k].vals.shape[1]
    return (time.perf_counter() - t) / (4 * n * m * h * w), kept


def planted_pool(run: Path, n: int, shape=(128, 800), models=3) -> Path:
    """A run of ``n`` images with ``models`` segmentation models written as real Parquet OOF files
    (the tests' planted pools: truth boxes, maps = 0.6 x truth + uniform noise up to 0.35), with the
    search.json that lists its models."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    import blend_pools
    rng = np.random.default_rng(0)
    masks = blend_pools.make_truth(rng, n, shape)
    ids = [f"m{j}" for j in range(models)]
    blend_pools.write_run(run, masks, {m: blend_pools.signal_model(rng, masks) for m in ids})
    layout.write_state(run, layout.SearchState(data="", folds=3, stage="done", selected_models=tuple(ids)))  # write_run: 3 folds
    return run


def measured_load(run, ids):
    """The pool of ``run`` loaded from its Parquet files as the blend loads it (4x maps of every
    class held in memory), inside the memory sampler: a line with what the loaded maps hold and the
    peak above the process before the load (the reader's batch buffers and growing arrays)."""
    before = _pss_kib(os.getpid()) / 2**20
    mem = PeakMemory(every=0.02)
    mem.start()
    t = time.perf_counter()
    pool = blend.load_blend_pool(run, model_ids=ids)
    secs = time.perf_counter() - t
    peak = mem.stop() - before
    held = sum(d.vals.nbytes + d.img.nbytes + d.truth.nbytes for d in pool.ds) / 2**30
    return pool, (f"load of {len(ids)} models' 4x maps from Parquet ({secs:.1f}s): the maps hold {held:.3f} GiB, the "
                  f"process peaked {peak:.3f} GiB above its size before the load ({peak / max(held, 1e-9):.2f}x; "
                  f"summed PSS sampled every {mem.every}s)")


def real_pool(run, c=2, copies=1):
    """A real pool, loaded once (streamed, as the blend reads it): a line with its kept fraction of
    full-resolution pixels (what the generated pool should resemble), the seconds per pixel per
    model of reading its full resolution (:func:`_timed_read`: what the generator stands in for;
    ``copies`` > 1: of the pool's models listed ``copies`` times, see :func:`copied_run`), and
    class ``c``'s dense plain-mean blend, truth and presence for the search comparison (of the
    pool itself)."""
    if copies > 1:
        with tempfile.TemporaryDirectory(prefix="bench_blend_copies_") as tmp:
            path, ids = copied_run(run, copies, Path(tmp) / "run")
            copied, load_line = measured_load(path, ids)
            copy_cost, _ = _timed_read(copied)
            del copied
    else:
        load_line = measured_load(run, blend.search_models(run))[1]
    pool = blend.load_blend_pool(run, model_ids=blend.search_models(run))
    (h, w), n, m = pool.shape, len(pool.image_ids), len(pool.model_ids)
    read_cost, kept = _timed_read(pool)
    line = (f"real pool {run}: {m} models x {n} images at {h}x{w}: kept full-res pixels {kept:,} "
            f"({100 * kept / (4 * n * h * w):.2f}%); reading its full resolution: {read_cost * 1e9:.1f} ns per pixel per model\n"
            f"  {load_line}")
    if copies > 1:
        line += (f"\n  the same files listed {copies} times ({copies * m} models, --pool-copies): {copy_cost * 1e9:.1f} ns per pixel "
                 f"per model (used for the real-run estimate)")
        read_cost = copy_cost
    d = pool.full[c]
    mean = np.full(m, 1 / m)
    return line, read_cost, _dense(d, ps.blend_u8(d.vals, mean), ps.blend_cls(d.cls, mean), pool.shape)


def _dense(d: ps.ClassData, blended, cls_b, shape):
    """Dense (N, H, W) maps of kept pixels. Without positions (the generator does not locate its
    boxes) kept pixels go into a fixed raster per image: the metric only depends on counts, so
    placement does not change any score."""
    n, (h, w) = d.n_images, shape
    maps = np.zeros((n, h * w), np.uint8)
    truth = np.zeros((n, h * w), bool)
    order = np.argsort(d.img, kind="stable")
    img = d.img[order]
    pos = d.pix[order] if d.pix is not None else np.arange(img.size) - np.searchsorted(img, np.arange(n))[img]
    maps[img, pos] = blended[order]
    truth[img, pos] = d.truth[order]
    extra = d.true_area - np.bincount(img[truth[img, pos]], minlength=n)
    for i in np.flatnonzero(extra > 0):  # true pixels below the pruning level
        free = np.flatnonzero(~truth[i] & (maps[i] == 0))[: extra[i]]
        truth[i, free] = True
    return maps.reshape(n, h, w), truth.reshape(n, h, w), cls_b


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


def compare_search(maps, truth, cls_b, grid, kernel_points) -> dict:
    """Seconds of the three exact post-processing searches on the same dense blended maps (identical tables)."""
    n = len(maps)
    folds = np.zeros(n, int)
    t1 = time.perf_counter()  # the fair baseline: threshold once per level, min area and gate as comparisons
    area, inter = ps.area_inter_dense(maps, truth, grid.levels)
    dense_tables = ps.tables_from_counts(area, inter, truth.sum((1, 2)), 1.0, cls_b, folds, 1, grid)[0]
    t_dense = time.perf_counter() - t1
    tiny = ps.ClassData.from_dense(maps[None, :1], truth[:1], cls_b[None, :1], grid.t_min)
    ps.fold_tables(tiny.vals[0], cls_b[:1], tiny, folds[:1], 1, grid)  # not timed: compiles the kernels once per install
    t1 = time.perf_counter()  # steel_ray keeps only pixels where some member reaches the lowest level, once, at load
    sub = ps.ClassData.from_dense(maps[None], truth, cls_b[None], grid.t_min)
    t_prune = time.perf_counter() - t1
    t1 = time.perf_counter()  # ... and each candidate blend costs one counting pass + suffix sums + the tables
    ours = ps.fold_tables(sub.vals[0], cls_b, sub, folds, 1, grid)[0]
    t_ours = time.perf_counter() - t1
    rng = np.random.default_rng(0)
    pts = [tuple(int(rng.integers(0, s)) for s in ours.shape) for _ in range(kernel_points)]
    t1 = time.perf_counter()
    ref = kernel_search(maps, truth, cls_b, grid, pts)
    t_kernel = (time.perf_counter() - t1) / len(pts) * ours.size
    assert np.allclose([ours[p] for p in pts], ref), "fast search disagrees with re-thresholding"
    assert np.allclose(ours, dense_tables), "fast search disagrees with the dense per-level search"
    return {"kept": sub.vals.shape[1] / maps.size, "points": ours.size, "n": n, "kernel": t_kernel, "dense": t_dense,
            "prune": t_prune, "ours": t_ours, "sampled": len(pts)}


def print_search(title, r):
    print(f"\npost-processing search, {title}: {r['n']} dense images, kept {100 * r['kept']:.2f}% of pixels, "
          f"{r['points']} grid points (identical tables):")
    print(f"  {'method':66}{'seconds':>9}{'steel_ray search is':>21}")
    print(f"  {'naive kernel: re-threshold per grid point (scaled from ' + str(r['sampled']) + ' points)':66}"
          f"{r['kernel']:9.2f}{r['kernel'] / r['ours']:20.0f}x")
    print(f"  {'fair: exact dense, threshold once per level + comparisons':66}{r['dense']:9.3f}{r['dense'] / r['ours']:20.1f}x")
    print(f"  {'steel_ray search: one pass over kept pixels + suffix sums':66}{r['ours']:9.4f}")
    print(f"  {'  + pruning to kept pixels (once per pool, at load)':66}{r['prune']:9.4f}"
          f"   (fair / search incl. pruning: {r['dense'] / (r['ours'] + r['prune']):.1f}x)")


def _pss_kib(pid) -> int:
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("Pss:"))
    except (OSError, StopIteration):
        return 0


def _tree(pid) -> list[int]:
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        for t in glob.glob(f"/proc/{p}/task/*/children"):
            try:
                todo += [int(x) for x in open(t).read().split()]
            except OSError:
                pass
    return out


class PeakMemory(threading.Thread):
    """Peak of the summed PSS (proportional set size) of this process and all its descendants,
    sampled: pages a forked worker shares with the parent are counted once, not once per process."""

    def __init__(self, every=0.5):
        super().__init__(daemon=True)
        self.every, self.peak_kib, self.halt = every, 0, threading.Event()

    def run(self):
        while not self.halt.wait(self.every):
            self.peak_kib = max(self.peak_kib, sum(_pss_kib(p) for p in _tree(os.getpid())))

    def stop(self) -> float:
        self.halt.set()
        self.join()
        self.peak_kib = max(self.peak_kib, sum(_pss_kib(p) for p in _tree(os.getpid())))
        return self.peak_kib / 2**20


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
    ap.add_argument("--haze", type=float, default=0.0,
                    help="fraction F of every image where every model puts diffuse low probabilities (0.05-0.2), as the "
                         "demo's under-trained models do: a kept fraction near a real pool's (--pool prints it)")
    ap.add_argument("--pool", help="a real run (e.g. runs/demo): print its pool's kept fraction beside the generated one, "
                                   "measure its Parquet read cost and time the post-processing search on its real maps too")
    ap.add_argument("--pool-copies", type=int, default=1,
                    help="with --pool: also measure the read cost with its models listed K times (symlinks), as a "
                         "pool of K x as many models reads; the real-run estimate uses it")
    ap.add_argument("--planted-pool", type=int, metavar="N",
                    help="instead of --pool: write a run of N images at 128x800 with 3 models whose maps carry uniform "
                         "noise up to 0.35 (almost every pixel kept: the dense case) as real Parquet files in a temporary "
                         "folder, and use it as --pool")
    ap.add_argument("--selection-memory", type=float, default=bpool.SELECTION_MEMORY_GIB, metavar="GIB",
                    help="the blend's budget for the selection maps (blend --selection-memory): 4x maps when they fit, "
                         "else 8x or 16x")
    ap.add_argument("--skip-ds-check", action="store_true", help="skip part 4 (one more pass over full resolution)")
    ap.add_argument("--search-only", action="store_true", help="only the post-processing search comparison (part 2)")
    a = ap.parse_args()
    repro = (f"\nreproduce: .venv/bin/python benchmarks/bench_blend.py --images {a.images} --models {a.models} --folds {a.folds} "
          f"--max-members {a.max_members} --workers {a.workers} --subset {a.subset} --kernel-points {a.kernel_points}"
          + (f" --density {a.density:g}" if a.density else "") + (f" --haze {a.haze:g}" if a.haze else "")
          + (f" --planted-pool {a.planted_pool}" if a.planted_pool else f" --pool {a.pool}" if a.pool else "")
          + (f" --pool-copies {a.pool_copies}" if a.pool_copies > 1 else "")
          + (f" --selection-memory {a.selection_memory:g}" if a.selection_memory != bpool.SELECTION_MEMORY_GIB else "")
          + (" --skip-ds-check" if a.skip_ds_check else "") + (" --search-only" if a.search_only else ""))
    t0 = time.time()
    read_cost = real = None
    if a.planted_pool:
        planted = tempfile.TemporaryDirectory(prefix="bench_blend_planted_")
        a.pool = planted_pool(Path(planted.name) / "run", a.planted_pool)
    if a.pool:
        line, read_cost, real = real_pool(a.pool, copies=a.pool_copies)
        print(line)
    if a.search_only:  # no pool: only the subset's maps are generated
        pool, gen = None, Generated(a.images, a.models, density=a.density, haze=a.haze)
    else:
        pool, gen = generate(a.images, a.models, a.folds, density=a.density, haze=a.haze, workers=a.workers,
                             budget=a.selection_memory)
        f, ch = pool.ds_factor, pool.ds_choice
        print(f"pool: {a.images} images x 4 classes x {a.models} models at {H}x{W}; selection maps at {f}x "
              f"(the finest whose estimate fits --selection-memory {a.selection_memory:g} GiB; estimated from "
              f"{ch['sampled_images']} images: " + ", ".join(f"{k} {v:.2f} GiB" for k, v in ch["estimate_gib"].items())
              + f") in memory: kept {sum(d.vals.shape[1] for d in pool.ds):,} pixels "
              f"({100 * sum(d.vals.shape[1] for d in pool.ds) / (4 * a.images * -(-H // f) * -(-W // f)):.2f}%), "
              f"{sum(d.vals.nbytes + d.img.nbytes + d.truth.nbytes for d in pool.ds) / 2**30:.2f} GiB; full resolution generated "
              f"batch by batch when read; generated in {time.time() - t0:.0f}s")

    grid = ps.default_grid((H, W))
    # 2. exactness + speed of the post-processing search against the two baselines, on dense maps
    sub = gen.class_data(2, np.arange(a.subset), "full")
    w = np.full(a.models, 1 / a.models)
    maps, truth, cls_b = _dense(sub, ps.blend_u8(sub.vals, w), ps.blend_cls(sub.cls, w), (H, W))
    print_search(f"class 3 of the generated pool ({a.subset} images)", compare_search(maps, truth, cls_b, grid, a.kernel_points))
    del maps, truth, sub
    if real:
        maps, truth, cls_b = real
        print_search(f"class 3 of the real pool {a.pool} (plain mean of its models)",
                     compare_search(maps, truth, cls_b, ps.default_grid(maps.shape[1:]), a.kernel_points))
        del maps, truth, real

    if a.search_only:
        print(repro)
        return
    # 3. the full blend, full resolution streamed batch by batch; memory sampled from here on (the
    # sampler reads /proc, which must not disturb the timings above; the pool is already in memory)
    mem = PeakMemory()
    mem.start()
    t1 = time.time()
    res = blend.optimize(pool, max_members=a.max_members, nested=True, workers=a.workers)
    total = time.time() - t1
    peak = mem.stop()
    kept = gen_kept(pool)
    s, tm = res.scores, res.settings["timings"]
    print(f"\nfull blend (max {a.max_members} members, {a.folds} folds, nested on; the selection and the {a.folds} nested "
          f"selections, then the 4 classes' full-resolution passes, on {a.workers} processes), seconds:")
    for k, v in tm.items():
        print(f"  {k:24}{v:8.1f}")
    print(f"  {'total':24}{total:8.1f}")
    print(f"  full resolution: kept {100 * kept:.2f}% of pixels (pixels where some model reaches {T_MIN}/255), "
          f"{pool.full.reader.passes} passes over the generated maps (one per class, classes on {a.workers} processes); "
          f"generating them took {pool.full.reader.seconds:.0f} CPU-s of full_resolution_pass (in a real run: reading the "
          f"Parquet files)")
    if read_cost:
        est = read_cost * 4 * a.images * a.models * H * W / a.workers
        print(f"  reading this pool's full resolution from Parquet at {a.pool}'s measured cost would take ~{est:.0f}s "
              f"on {a.workers} processes, in place of the {pool.full.reader.seconds / a.workers:.0f}s of generating it "
              f"(an estimate: real run ~{total - pool.full.reader.seconds / a.workers + est:.0f}s)")
    print(f"  peak memory, all processes (summed PSS, sampled every {mem.every}s): {peak:.2f} GiB; "
          f"peak RSS of the main process {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.2f} GiB, "
          f"of the largest nested worker {resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 2**20:.2f} GiB (shared pages in both)")
    print(f"  scores: in_sample {s['in_sample']:.5f} cross_fitted {s['cross_fitted']:.5f} nested {s['nested']:.5f} "
          f"best_single {s['best_single']:.5f} baseline {s['baseline']:.5f} all_empty {s['all_empty']:.5f}")
    print(f"  members: {sum(1 for x in res.weights[0] if x > 0)} distinct models")

    # 4. tuning on the selection maps vs full resolution (same weights): held-out Dice difference
    if not a.skip_ds_check:
        diff_rows = []
        for c in range(4):
            wc = res.weights[c]
            (counts,), _, meta = tune._full_counts(pool, c, [wc], False, grid.levels)
            tf = bselect._tables(counts, meta, ps.blend_cls(meta.cls, wc), pool.folds, a.folds, grid)
            td = ps.fold_tables(ps.blend_u8(pool.ds[c].vals, wc), ps.blend_cls(pool.ds[c].cls, wc), pool.ds[c], pool.folds, a.folds, grid)
            ch_full, ch_ds = ps.choose(tf, grid), ps.choose(td, grid)
            diff_rows.append((c + 1, tf.sum(0)[grid.index(ch_full)] / a.images, tf.sum(0)[grid.index(ch_ds)] / a.images))
        print(f"\nper-class Dice at full resolution: parameters tuned at full res vs tuned on {pool.ds_factor}x maps")
        for c, f, d in diff_rows:
            print(f"  class {c}: {f:.5f} vs {d:.5f}  (diff {f - d:+.5f})")
        print(f"  mean over classes: {np.mean([f - d for _, f, d in diff_rows]):+.5f}")
    print(repro)


def gen_kept(pool) -> float:
    """Kept fraction of full-resolution pixels, counted by the reader as the blend read them."""
    r = pool.full.reader
    return r.kept / (4 * r.gen.n * H * W)


if __name__ == "__main__":
    main()
