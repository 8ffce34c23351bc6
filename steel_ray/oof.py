"""Out-of-fold (OOF) prediction store: Parquet files in a hive layout, plus the run's ground truth.

Layout (an interface users query with pandas / duckdb / pyarrow.dataset)::

    RUN/oof/model_id=<id>/fold=<k>/part-0.parquet   one row per validation image of fold k
    RUN/truth.parquet                                image_id, fold, rle_1..4, area_1..4

OOF columns: ``image_id`` (string); ``p1``..``p4`` (binary: uint8 row-major H x W,
``round(255 * probability)``, full resolution); ``p1_ds4``..``p4_ds4`` (the same maps 4x
area-downsampled, ``ceil(H/4) x ceil(W/4)``); ``cls`` (4 x float32 per-class presence
probability: the aux head, or the max pixel probability without one). zstd compression; no
statistics or dictionary on the blob columns. Schema metadata (``steel_ray.*`` keys): task,
height, width, quantisation, ds factor, fold-split hash, package version, model id, fold, config.

A classifier's file (``task: classify``) has the same layout and metadata with ``task=classify``
and two columns only: ``image_id`` and ``cls`` (its presence probabilities, TTA-averaged).
Files are written to a dot-prefixed temporary name and renamed when complete: a crash never
leaves a readable half file (dot-files are also skipped by pyarrow dataset discovery).
"""
from __future__ import annotations

import contextlib
import json
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from . import __version__, rle
from . import run as layout
from .config import ID_SCHEME, ID_SCHEME_CHANGE, TASKS
from .data import N_CLASSES, DataError
from .io import atomic_path

__all__ = [
    "DS",
    "OOFWriter",
    "write_oof",
    "quantize",
    "downsample",
    "write_truth",
    "read_truth",
    "list_pool",
    "task_of",
    "read_presence",
    "check_fold_file",
    "iter_fold_batches",
    "read_pool",
    "Pool",
    "PoolGapError",
]

DS = 4
QUANTISATION = "uint8 = round(255 * probability)"
BLOB_COLS = [f"p{c}" for c in range(1, 5)] + [f"p{c}_ds{DS}" for c in range(1, 5)]


class PoolGapError(DataError):
    """A pool is missing (model, fold) parts; ``gaps`` lists them."""

    def __init__(self, gaps):
        self.gaps = list(gaps)
        super().__init__("OOF pool is incomplete; missing (model, fold): " + ", ".join(f"({m}, {f})" for m, f in self.gaps))


def quantize(prob) -> np.ndarray:
    """Probabilities in [0, 1] -> uint8 ``round(255 p)`` (the OOF and blend quantisation)."""
    return np.rint(np.clip(np.asarray(prob, dtype=np.float32), 0.0, 1.0) * 255.0).astype(np.uint8)


def downsample(u8: np.ndarray, factor: int = DS) -> np.ndarray:
    """Area-downsample uint8 maps ``(..., H, W)`` by ``factor`` (edge blocks averaged over what exists)."""
    h, w = u8.shape[-2:]
    hh, ww = -(-h // factor), -(-w // factor)
    flat = u8.reshape(-1, h, w)
    out = np.empty((flat.shape[0], hh, ww), np.uint8)
    for i, m in enumerate(flat):
        out[i] = cv2.resize(m, (ww, hh), interpolation=cv2.INTER_AREA)
    return out.reshape(u8.shape[:-2] + (hh, ww))


def _schema(meta: dict) -> pa.Schema:
    fields = [pa.field("image_id", pa.string())]
    if meta.get("task", "segment") == "segment":
        fields += [pa.field(c, pa.binary()) for c in BLOB_COLS]
    fields += [pa.field("cls", pa.list_(pa.float32(), N_CLASSES))]
    md = {f"steel_ray.{k}": (v if isinstance(v, str) else json.dumps(v)) for k, v in meta.items()}
    return pa.schema(fields, metadata=md)


oof_path = layout.oof_path


class OOFWriter:
    """Streams OOF rows into one Parquet file; the file appears only on :meth:`close` success.

    Use as a context manager; an exception inside the block discards the temporary file.
    """

    def __init__(self, run, model_id, fold, height, width, folds_hash, config=None, row_group=32, extra=None, task="segment"):
        if task not in TASKS:
            raise ValueError(f"task={task!r}; choose one of {list(TASKS)}")
        self.path = oof_path(run, model_id, fold)
        self.task = task
        self.meta = {
            "task": task,
            "height": int(height),
            "width": int(width),
            "quantisation": QUANTISATION,
            "ds_factor": DS,
            "folds_hash": folds_hash,
            "version": __version__,
            "model_id": model_id,
            "id_scheme": ID_SCHEME,
            "fold": int(fold),
            "config": config or {},
            **(extra or {}),
        }
        self.schema = _schema(self.meta)
        self.row_group = row_group
        self._buf: list[dict] = []
        self._ctx = None
        self._writer = None
        self.rows = 0

    def __enter__(self):
        self._ctx = atomic_path(self.path)
        tmp = self._ctx.__enter__()
        self._writer = pq.ParquetWriter(
            tmp,
            self.schema,
            compression="zstd",
            use_dictionary=["image_id"],
            write_statistics=["image_id"],
        )
        return self

    def add(self, image_ids, probs_u8: np.ndarray | None, cls: np.ndarray) -> None:
        """Append images: ``probs_u8`` ``(n, 4, H, W)`` uint8 at full resolution (None for a
        classifier), ``cls`` ``(n, 4)``."""
        cls = np.asarray(cls, np.float32)
        if self.task == "classify" and cls.shape != (len(image_ids), N_CLASSES):
            raise ValueError(f"classifier OOF presence must be ({len(image_ids)}, {N_CLASSES}), got {cls.shape}")
        rows = [{"image_id": str(img), "cls": [float(x) for x in cls[i]]} for i, img in enumerate(image_ids)]
        if self.task == "segment":  # the maps, full resolution and 4x
            probs_u8 = np.ascontiguousarray(probs_u8, dtype=np.uint8)
            h, w = self.meta["height"], self.meta["width"]
            if probs_u8.shape[1:] != (N_CLASSES, h, w):
                raise ValueError(f"OOF maps must be (n, {N_CLASSES}, {h}, {w}), got {probs_u8.shape}")
            ds = downsample(probs_u8)
            for i, row in enumerate(rows):
                for c in range(N_CLASSES):
                    row[f"p{c + 1}"] = probs_u8[i, c].tobytes()
                    row[f"p{c + 1}_ds{DS}"] = ds[i, c].tobytes()
        self._buf += rows
        if len(self._buf) >= self.row_group:
            self._flush()

    def _flush(self):
        if self._buf:
            self._writer.write_table(pa.Table.from_pylist(self._buf, schema=self.schema))
            self.rows += len(self._buf)
            self._buf = []

    def __exit__(self, exc_type, exc, tb):
        try:
            if exc_type is None:
                self._flush()
            self._writer.close()
        finally:
            self._ctx.__exit__(exc_type, exc, tb)
        return False


def write_oof(run, model_id, fold, image_ids, probs_u8, cls, height, width, folds_hash, config=None) -> Path:
    """Write a whole fold's OOF at once (see :class:`OOFWriter` for streaming)."""
    with OOFWriter(run, model_id, fold, height, width, folds_hash, config) as w:
        w.add(image_ids, probs_u8, cls)
    return w.path


def write_truth(run, train_set, folds, folds_hash) -> Path:
    """RUN/truth.parquet: image_id, fold, rle_1..4, area_1..4 (+ height/width/folds hash metadata)."""
    areas = train_set.areas()
    cols = {"image_id": pa.array(train_set.image_ids, pa.string()), "fold": pa.array(np.asarray(folds), pa.int32())}
    for c in range(N_CLASSES):
        cols[f"rle_{c + 1}"] = pa.array(list(train_set.rles[:, c]), pa.string())
    for c in range(N_CLASSES):
        cols[f"area_{c + 1}"] = pa.array(areas[:, c], pa.int64())
    h, w = train_set.shape
    meta = {"steel_ray.height": str(h), "steel_ray.width": str(w), "steel_ray.folds_hash": folds_hash}
    table = pa.table(cols).replace_schema_metadata(meta)
    path = layout.truth_path(run)
    with atomic_path(path) as tmp:
        pq.write_table(table, tmp, compression="zstd")
    return path


@dataclass
class Truth:
    image_ids: list[str]
    folds: np.ndarray
    rles: np.ndarray  # (N, 4) object
    areas: np.ndarray  # (N, 4) int64
    shape: tuple[int, int]
    folds_hash: str

    def masks(self, idx, classes=range(N_CLASSES)) -> np.ndarray:
        """(len(idx), len(classes), H, W) bool full-resolution ground truth of images ``idx``."""
        h, w = self.shape
        out = np.zeros((len(idx), len(classes), h, w), bool)
        for j, i in enumerate(idx):
            for k, c in enumerate(classes):
                if self.rles[i, c]:
                    out[j, k] = rle.decode(self.rles[i, c], (h, w))
        return out


@contextlib.contextmanager
def unreadable_named(path, what: str = "OOF file"):
    """Within the block, a Parquet file that Arrow cannot read (truncated, not Parquet, a corrupt
    page) is a one-line :class:`DataError` naming it, instead of Arrow's error without a path."""
    try:
        yield
    except FileNotFoundError:
        raise
    except (pa.ArrowException, OSError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise DataError(f"{path}: unreadable {what} ({first}); delete it and rerun that fold (the search's --resume "
                        "retrains a fold whose OOF file is missing)") from None


def read_truth(run) -> Truth:
    path = layout.truth_path(run)
    if not Path(run).is_dir():
        raise DataError(f"{run}: run folder not found")
    if not path.exists():
        raise DataError(f"{path}: ground-truth table not found (written when the first fold is trained)")
    with unreadable_named(path, "ground-truth table"):
        t = pq.read_table(path)
    md = {k.decode(): v.decode() for k, v in (t.schema.metadata or {}).items()}
    d = t.to_pydict()
    return Truth(
        image_ids=d["image_id"],
        folds=np.asarray(d["fold"], np.int64),
        rles=np.array([d[f"rle_{c + 1}"] for c in range(N_CLASSES)], dtype=object).T.copy(),
        areas=np.array([d[f"area_{c + 1}"] for c in range(N_CLASSES)], dtype=np.int64).T.copy(),
        shape=(int(md["steel_ray.height"]), int(md["steel_ray.width"])),
        folds_hash=md["steel_ray.folds_hash"],
    )


def task_of(run, model_id: str, folds) -> str:
    """The task (segment | classify) of a pool model, from its OOF files' metadata (files written
    before classifiers existed are segmentation); one model with files of two tasks is refused."""
    tasks = {}
    for f in folds:
        path = oof_path(run, model_id, f)
        tasks[str(path)] = read_meta(path).get("task", "segment")
    if len(set(tasks.values())) > 1:
        raise DataError(f"model {model_id} has OOF files of different tasks: {tasks}")
    return next(iter(tasks.values()), "segment")


def read_presence(run, model_id: str, truth: Truth, folds) -> np.ndarray:
    """(N, 4) float32 presence of one model over the truth's images (its folds' files checked)."""
    out = np.full((len(truth.image_ids), N_CLASSES), np.nan, np.float32)
    for f in folds:
        for rows, (batch,), (path,) in iter_fold_batches(run, [model_id], truth, f, ["image_id", "cls"]):
            cls = np.asarray(batch.column("cls").to_pylist(), np.float32).reshape(len(rows), N_CLASSES)
            if not np.isfinite(cls).all() or cls.min() < 0 or cls.max() > 1:
                raise DataError(f"{path}: presence probabilities must be finite and in [0, 1]")
            out[rows] = cls
    return out


def list_pool(run) -> dict[str, list[int]]:
    """{model_id: sorted folds} of the complete OOF files present in RUN/oof."""
    root = layout.oof_root(run)
    out: dict[str, list[int]] = {}
    if not root.is_dir():
        return out
    for mdir in sorted(root.glob("model_id=*")):
        folds = sorted(int(f.name.split("=", 1)[1]) for f in mdir.glob("fold=*") if (f / "part-0.parquet").exists())
        if folds:
            out[mdir.name.split("=", 1)[1]] = folds
    return out


def finished(meta: dict | None, folds_hash: str | None, where) -> dict | None:
    """Is a (model, fold) done? ``meta`` is its OOF file's metadata (None: no file; the file is the
    "fold done" marker, weights alone do not count). Returns the metadata of a fold finished on this
    split (``folds_hash``; None: any), None when there is nothing to reuse; an OOF of another split
    is refused naming ``where``. The one answer for training, trials and the search driver."""
    if meta is None:
        return None
    if folds_hash is not None and meta.get("folds_hash") != folds_hash:
        raise DataError(f"{where}: OOF of another fold split (folds_hash {meta.get('folds_hash')} != {folds_hash}); "
                        "it is not reused: use a new run folder")
    return meta


def read_meta(path, filesystem=None) -> dict:
    """The ``steel_ray.*`` schema metadata of an OOF file, JSON values decoded."""
    with unreadable_named(path):
        md = pq.read_schema(path, filesystem=filesystem).metadata or {}
    out = {}
    for k, v in md.items():
        k = k.decode()
        if k.startswith("steel_ray."):
            v = v.decode()
            try:
                out[k[10:]] = json.loads(v)
            except json.JSONDecodeError:
                out[k[10:]] = v
    return out


@dataclass
class Pool:
    """OOF maps of several models over the same images, in truth order (restricted to ``folds``)."""

    model_ids: list[str]
    image_ids: list[str]
    folds: np.ndarray  # (N,) fold of each image
    classes: list[int]  # 0-based
    probs: np.ndarray  # (M, N, C, h, w) uint8
    cls: np.ndarray  # (M, N, 4) float32
    shape: tuple[int, int]  # full-resolution image shape
    resolution: str  # "full" or "ds4"


def check_fold_file(path, truth: Truth, fold: int) -> list[str]:
    """Check one (model, fold) OOF file against the run before any map is read; returns its image ids.

    Refused, with a one-line error naming the file: another fold split (folds_hash), another
    image size, a duplicate image, and an image set that is not exactly the fold's (missing or
    extra images).
    """
    meta = read_meta(path)
    if meta.get("id_scheme", 1) != ID_SCHEME:
        raise DataError(f"{path}: written by steel_ray {meta.get('version', '?')} with model ids of scheme "
                        f"{meta.get('id_scheme', 1)}; this version names models by scheme {ID_SCHEME} ({ID_SCHEME_CHANGE}), "
                        f"so the pool's ids no longer match its "
                        f"configs: run the search again into a new folder")
    if meta.get("folds_hash") != truth.folds_hash:
        raise DataError(f"{path}: fold split {meta.get('folds_hash')} differs from the run's {truth.folds_hash}")
    shape = (int(meta.get("height", -1)), int(meta.get("width", -1)))
    if shape != tuple(truth.shape):
        raise DataError(f"{path}: maps are {shape[0]}x{shape[1]}, the run's images {truth.shape[0]}x{truth.shape[1]}")
    with unreadable_named(path):
        ids = pq.read_table(path, columns=["image_id"]).column("image_id").to_pylist()
    if len(set(ids)) != len(ids):
        dup = next(i for i in ids if ids.count(i) > 1)
        raise DataError(f"{path}: image {dup} appears more than once")
    expected = {truth.image_ids[i] for i in np.flatnonzero(truth.folds == fold)}
    missing, extra = sorted(expected - set(ids)), sorted(set(ids) - expected)
    if missing or extra:
        what = (f"{len(missing)} image(s) of fold {fold} missing (e.g. {missing[0]})" if missing else
                f"{len(extra)} image(s) not in fold {fold} (e.g. {extra[0]})")
        raise DataError(f"{path}: {what}; the file holds {len(ids)} images, the fold {len(expected)}")
    return ids


def iter_fold_batches(run, model_ids, truth: Truth, fold: int, columns, batch_size: int = 32):
    """The one OOF reader: yield ``(rows, batches, paths)`` for fold ``fold``, the models' files read in
    lockstep (``rows``: the images' indices in ``truth``; ``batches``: one record batch per model with
    ``columns``). Every file is checked first (:func:`check_fold_file`: split, size, image set,
    duplicates); files that list the fold's images in different orders are refused."""
    paths = [oof_path(run, m, fold) for m in model_ids]
    for p in paths:
        check_fold_file(p, truth, fold)
    pos = {k: i for i, k in enumerate(truth.image_ids)}
    readers = []
    for p in paths:
        with unreadable_named(p):
            readers.append(pq.ParquetFile(p).iter_batches(batch_size=batch_size, columns=list(columns)))
    while True:
        batches = []
        for r, p in zip(readers, paths):
            with unreadable_named(p):  # a corrupt data page shows only when its batch is decoded
                batches.append(next(r, None))
        if any(b is None for b in batches):  # every file holds exactly the fold's images (checked above)
            return
        ids = batches[0].column("image_id").to_pylist()
        for b, p in zip(batches[1:], paths[1:]):
            if b.column("image_id").to_pylist() != ids:
                raise DataError(f"{p}: lists the images of fold {fold} in another order than {paths[0]}; rewrite it with one version")
        yield np.array([pos[i] for i in ids], dtype=np.int64), batches, paths


def maps(batch, column: str, shape, path, out: np.ndarray | None = None) -> np.ndarray:
    """(B, h, w) uint8 maps of one blob column; a blob of the wrong size names the file and image.

    Read straight from the Arrow buffers (no Python bytes objects): a read-only view, or copied
    once into ``out`` (a (B, h, w) uint8 array, e.g. one model's slot of a stacked batch).
    """
    col = batch.column(column)
    size = shape[0] * shape[1]
    n = len(col)
    offsets = np.frombuffer(col.buffers()[1], np.int32, count=n + 1, offset=4 * col.offset)
    lengths = np.diff(offsets)
    if col.null_count or np.any(lengths != size):
        i = int(np.flatnonzero((lengths != size) | np.asarray(col.is_null()))[0])
        raise DataError(f"{path}: {column} of image {batch.column('image_id')[i]} has "
                        f"{0 if col[i].as_py() is None else lengths[i]} bytes, expected {shape[0]}x{shape[1]} = {size}")
    data = np.frombuffer(col.buffers()[2], np.uint8)[offsets[0]:offsets[0] + n * size].reshape(n, *shape)
    if out is None:
        return data
    out[...] = data
    return out


def read_pool(run, model_ids=None, folds=None, classes=None, resolution: str = "full", truth: Truth | None = None) -> Pool:
    """Read OOF maps into numpy, column by column (only the requested classes and resolution).

    Every requested (model, fold) must exist: otherwise :class:`PoolGapError` lists the gaps.
    """
    if resolution not in ("full", f"ds{DS}"):
        raise ValueError(f"resolution={resolution!r}; choose 'full' or 'ds{DS}'")
    truth = truth or read_truth(run)
    present = list_pool(run)
    model_ids = list(model_ids) if model_ids is not None else sorted(present)
    folds = sorted(set(int(f) for f in (folds if folds is not None else np.unique(truth.folds))))
    classes = list(classes) if classes is not None else list(range(N_CLASSES))
    gaps = [(m, f) for m in model_ids for f in folds if f not in present.get(m, [])]
    if gaps:
        raise PoolGapError(gaps)
    sel = np.flatnonzero(np.isin(truth.folds, folds))
    local = np.full(len(truth.image_ids), -1, np.int64)
    local[sel] = np.arange(len(sel))
    h, w = truth.shape
    hh, ww = (h, w) if resolution == "full" else (-(-h // DS), -(-w // DS))
    suffix = "" if resolution == "full" else f"_ds{DS}"
    probs = np.zeros((len(model_ids), len(sel), len(classes), hh, ww), np.uint8)
    cls = np.zeros((len(model_ids), len(sel), N_CLASSES), np.float32)
    for mi, m in enumerate(model_ids):
        for f in folds:
            cols = ["image_id", "cls"] + [f"p{c + 1}{suffix}" for c in classes]
            # the files are checked to hold exactly the fold's images, so every row is filled once
            for truth_rows, (batch,), (path,) in iter_fold_batches(run, [m], truth, f, cols, batch_size=64):
                rows = local[truth_rows]
                cls[mi, rows] = np.asarray(batch.column("cls").to_pylist(), np.float32)
                for k, c in enumerate(classes):
                    probs[mi, rows, k] = maps(batch, f"p{c + 1}{suffix}", (hh, ww), path)
    return Pool(model_ids, [truth.image_ids[i] for i in sel], truth.folds[sel], classes, probs, cls, (h, w), resolution)
