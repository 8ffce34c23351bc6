"""The blend's pool: every member's OOF maps per class, read from the run's Parquet files, pruned
at the grid's lowest level, at full resolution and downsampled for the selection (4x, or 8x / 16x
when the 4x maps would hold more than the selection's memory budget: :func:`selection_factor`)
(:class:`BlendPool`), and the classifiers' presence. Full-resolution maps can be streamed one
class at a time."""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np

from .. import oof, rle
from .. import postprocess as ps
from .. import run as layout
from ..data import N_CLASSES, DataError
from ..postprocess.counts import reused

log = logging.getLogger("steel_ray.blend")


@dataclass
class BlendPool:
    """Everything the optimizer needs, per class, at both resolutions (pixels pruned at t_min)."""

    model_ids: list[str]
    image_ids: list[str]
    folds: np.ndarray
    n_folds: int
    shape: tuple[int, int]
    full: list[ps.ClassData]  # 4 classes, full resolution (or a _StreamedFull reading one class at a time)
    ds: list[ps.ClassData]  # 4 classes, downsampled ds_factor x (the selection maps)
    left_out: list[str] = field(default_factory=list)
    checkpoints: dict = field(default_factory=dict)  # model_id -> [best.pt per fold]
    truth: oof.Truth | None = None  # ground truth (RLE per image x class), for --fill-holes
    classifiers: list[str] = field(default_factory=list)  # task: classify models of the pool
    clf: np.ndarray | None = None  # (Mc, N, 4) float32 classifier presence (OOF), None without classifiers
    ds_factor: int = oof.DS  # downsampling of ``ds`` (4, or 8 / 16 when 4x maps would not fit the budget)
    ds_choice: dict = field(default_factory=dict)  # how ds_factor was chosen (:func:`selection_factor`), for the report

    def truth_mask(self, c: int):
        """``i -> (H, W) bool`` truth of class ``c`` (None where empty), decoded on demand."""
        def get(i):
            s = self.truth.rles[i, c]
            return rle.decode(s, self.shape) if s else None

        return get

    @property
    def n_pairs(self) -> int:
        return len(self.image_ids) * N_CLASSES


SELECTION_MEMORY_GIB = 8.0  # default budget of the selection maps (--selection-memory)
FACTORS = (4, 8, 16)  # selection map downsampling, finest first (4x is what the OOF files store)
SAMPLE_BATCHES = 4  # batches of 32 images per fold read to estimate the kept fraction at each factor


def _truth_ds(mask: np.ndarray, factor: int = oof.DS) -> np.ndarray:
    """Area-downsampled truth (a cell is true when at least half of it is)."""
    h, w = mask.shape
    hh, ww = -(-h // factor), -(-w // factor)
    return cv2.resize(mask.astype(np.float32), (ww, hh), interpolation=cv2.INTER_AREA) >= 0.5


def _ds_maps(maps4: np.ndarray, factor: int) -> np.ndarray:
    """Maps at ``factor`` x from the files' 4x maps (block means of block means, rounded: within
    one level of the full-resolution block mean)."""
    return maps4 if factor == oof.DS else oof.downsample(maps4, factor // oof.DS)


def held_bytes(kept_pixels: float, n_models: int, n_images: int) -> float:
    """Bytes the selection maps hold per kept pixels: every model's uint8, the image index, the truth."""
    return kept_pixels * (n_models + (4 if n_images < 2**23 else 8) + 1)


def selection_factor(kept: dict, pixels: dict, n_models: int, n_images: int, budget_gib: float) -> dict:
    """The finest factor of :data:`FACTORS` whose maps fit ``budget_gib`` (the coarsest when none
    does). ``kept[f]`` / ``pixels[f]``: kept and all pixels (every class) of a sample of
    ``pixels["images"]`` images at factor ``f``; ``n_images`` of the pool. Returns ``{"factor",
    "budget_gib", "kept_fraction": {f: ...}, "estimate_gib": {f: ...}}`` (the sample's kept pixels
    per image, times the pool's images)."""
    frac = {f: kept[f] / max(pixels[f], 1) for f in kept}
    est = {f: held_bytes(kept[f] / max(pixels["images"], 1) * n_images, n_models, n_images) / 2**30 for f in kept}
    fits = [f for f in sorted(kept) if est[f] <= budget_gib]
    factor = fits[0] if fits else max(kept)
    return {"factor": int(factor), "budget_gib": float(budget_gib), "sampled_images": int(pixels["images"]),
            "kept_fraction": {f"ds{f}": round(float(frac[f]), 4) for f in sorted(kept)},
            "estimate_gib": {f"ds{f}": float(f"{est[f]:.4g}") for f in sorted(kept)}}


def load_blend_pool(run, model_ids=None, allow_partial=False, t_min=None, fill_holes=False, stream="auto", folds=None,
                    selection: str = "auto", selection_memory: float = SELECTION_MEMORY_GIB) -> BlendPool:
    """Stream the run's OOF pool into pruned per-class arrays (memory ~ kept pixels x models).

    ``fill_holes`` also keeps each kept pixel's position (4 bytes a pixel) for the hole-filling search.
    ``stream`` (``auto``: when the selection runs on downsampled maps, i.e. images at least 128 px high)
    keeps only the selection maps of every class in memory and reads one class at full resolution at a
    time from the Parquet files, when the blend asks for it (:class:`_StreamedFull`): peak memory
    is then about one class's kept full-resolution pixels, however many fire where. ``folds`` keeps
    only those folds' images (e.g. the screening fold of an explore stage, whose models have no other).

    ``selection`` (``auto``, ``ds4``, ``ds8``, ``ds16`` or ``full``) sets the downsampling of the
    selection maps (``pool.ds``): ``auto`` takes the finest of 4x, 8x, 16x whose maps would hold at
    most ``selection_memory`` GiB, estimated from the kept fraction of the first
    :data:`SAMPLE_BATCHES` batches of every fold (what the maps hold grows with the pixels where
    some member reaches the lowest threshold: an uncalibrated member keeps almost all).
    """
    run = Path(run)
    truth = oof.read_truth(run)
    if folds is not None:
        keep = np.isin(truth.folds, list(folds))
        truth = oof.Truth([i for i, k in zip(truth.image_ids, keep) if k], truth.folds[keep], truth.rles[keep], truth.areas[keep],
                          truth.shape, truth.folds_hash)
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
    choice = _choose_factor(reader, selection, selection_memory, (h, w))
    reader.ds_factor = choice["factor"]
    if streamed:
        ds = list(reader.read(range(N_CLASSES), ("ds",))["ds"].values())
        full = _StreamedFull(reader)
        f = reader.ds_factor
        log.info("pool: %d models x %d images, kept %.2f%% of %dx pixels (t_min %d), %.2f GiB; full resolution streamed class by class",
                 len(models), n, 100 * sum(d.vals.shape[1] for d in ds) / (N_CLASSES * n * -(-h // f) * -(-w // f)), f, t_min,
                 sum(d.vals.nbytes + d.img.nbytes + d.truth.nbytes for d in ds) / 2**30)
    else:
        both = reader.read(range(N_CLASSES), ("full", "ds"))
        full, ds = list(both["full"].values()), list(both["ds"].values())
        log.info("pool: %d models x %d images, kept %.2f%% of full-res pixels (t_min %d)", len(models), n,
                 100 * sum(d.vals.shape[1] for d in full) / (N_CLASSES * n * h * w), t_min)
    ckpts = {m: [str(layout.best_weights(run, m, f)) for f in folds_all] for m in models + classifiers}
    if classifiers:
        log.info("pool: %d classifier(s) for the gate: %s", len(classifiers), classifiers)
    return BlendPool(models, list(truth.image_ids), truth.folds, len(folds_all), (h, w), full, ds,
                     left_out, ckpts, truth if fill_holes else None, classifiers, clf, reader.ds_factor, choice)


def _choose_factor(reader: "_ClassReader", selection: str, budget_gib: float, shape) -> dict:
    """The selection maps' factor: the one ``selection`` names, else (``auto``/``full``) by the
    budget (:func:`selection_factor`) over the factors that leave maps at least 16 px high."""
    named = {f"ds{f}": f for f in FACTORS}
    if selection not in (*named, "auto", "full"):
        raise ValueError(f"selection={selection!r}; choose 'auto', {', '.join(repr(k) for k in named)} or 'full'")
    if selection in named:
        return {"factor": named[selection], "budget_gib": None, "chosen_by": "selection_resolution"}
    factors = [f for f in FACTORS if min(shape) // f >= 16]
    if len(factors) < 2:  # small images: 4x is the only choice (the selection runs at full resolution anyway)
        return {"factor": oof.DS, "budget_gib": None, "chosen_by": "image size"}
    kept, pixels = reader.sample(factors)
    choice = {**selection_factor(kept, pixels, len(reader.models), len(reader.truth.image_ids), budget_gib),
              "chosen_by": "selection_memory"}
    if choice["factor"] != oof.DS:
        est = choice["estimate_gib"]
        log.warning("selection maps: 4x maps would hold ~%.3g GiB (%.1f%% of their pixels kept, sampled on %d images), over "
                    "--selection-memory %g GiB: the selection runs on %dx maps (~%.3g GiB)%s", est["ds4"],
                    100 * choice["kept_fraction"]["ds4"], choice["sampled_images"], budget_gib, choice["factor"],
                    est[f"ds{choice['factor']}"], "" if est[f"ds{choice['factor']}"] <= budget_gib else ", still over the budget")
    return choice


class _ClassReader:
    """Reads chosen classes at chosen resolutions from a pool's OOF files into pruned ClassData,
    batch by batch (only the needed map columns are read); every file is checked first."""

    def __init__(self, run, models, truth, folds_all, t_min, fill_holes):
        self.run, self.models, self.truth, self.folds_all = run, models, truth, folds_all
        self.t_min, self.fill_holes = t_min, fill_holes
        self.passes = 0  # reads of the files (each reads only the asked-for columns)
        self.buffers = {}  # resolution -> reused batch buffer of the dense maps (fresh pages cost more than the copy)
        self.kept = {}  # (resolution, class) -> reused buffers of a batch's kept pixels (ClassData.from_dense)
        self.ds_factor = oof.DS  # the "ds" resolution: the files' 4x maps, downsampled further when larger

    def sample(self, factors) -> tuple[dict, dict]:
        """Kept pixels at each of ``factors`` (and all pixels, ``"images"``: the images) of the first
        :data:`SAMPLE_BATCHES` batches of every fold, every class."""
        h, w = self.truth.shape
        kept, pixels = dict.fromkeys(factors, 0), {f: 0 for f in factors}
        pixels["images"] = 0
        for f in self.folds_all:
            for k, (rows, batches, paths) in enumerate(oof.iter_fold_batches(
                    self.run, self.models, self.truth, f, ["image_id"] + [f"p{c + 1}_ds{oof.DS}" for c in range(N_CLASSES)])):
                if k == SAMPLE_BATCHES:
                    break
                pixels["images"] += len(rows)
                for c in range(N_CLASSES):
                    maps4 = np.stack([oof.maps(b, f"p{c + 1}_ds{oof.DS}", (-(-h // oof.DS), -(-w // oof.DS)), p)
                                      for b, p in zip(batches, paths)])
                    for fac in factors:  # kept where some member reaches t_min, as ClassData.from_dense prunes
                        top = _ds_maps(maps4, fac).max(0)
                        kept[fac] += int(np.count_nonzero(top >= self.t_min))
                        pixels[fac] += top.size
        return kept, pixels

    def batches(self, classes, resolutions):
        """Yield ``(rows, cls, {resolution: {class: ClassData of the batch's images}})`` over the pool,
        one batch of images at a time (``rows``: the images' indices; ``cls``: (M, B, 4) presence).
        A batch's arrays live in reused buffers: use (or copy) them before asking for the next."""
        models, truth, t_min = self.models, self.truth, self.t_min
        h, w = truth.shape
        hh, ww = -(-h // oof.DS), -(-w // oof.DS)
        factor = self.ds_factor
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
                        probs = reused(self.buffers, res, (len(models), len(rows), *shape), np.uint8)
                        for mi, (b, p) in enumerate(zip(batches, paths)):
                            oof.maps(b, col, shape, p, out=probs[mi])
                        if res == "full":
                            tm, scale, maps = tmask, 1.0, probs
                        else:
                            tm, scale = np.stack([_truth_ds(t, factor) for t in tmask]), float(factor * factor)
                            maps = _ds_maps(probs, factor)
                        out[res][c] = ps.ClassData.from_dense(maps, tm, cls[:, :, c], t_min, scale,
                                                              positions=self.fill_holes and res == "full",
                                                              reuse=self.kept.setdefault((res, c), {}))
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
            scale = 1.0 if res == "full" else float(self.ds_factor ** 2)
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

