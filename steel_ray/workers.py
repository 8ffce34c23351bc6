"""Inference on the Ray workers: holdout scoring, pseudo-labelling and predict.

The images are cut into shards of ``shard_size``; a pool of Ray actors (Ray's own batch-inference
idiom, as in Ray Data's ``map_batches`` with an actor pool) each loads the blend's members once and
predicts shard after shard; the driver keeps one shard per actor in flight and merges the results
in image order. The driver loads no model. Each actor uses a GPU where the cluster has one
(``gpus_per_task``, fractions allowed: several actors then share a card).

What travels: each shard's JPEG files as bytes (the images need not exist on the workers) and the
blend document; each actor finds a checkpoint at its path (one machine, a shared folder) or
fetches it from its run's pool (``--storage``, e.g. S3) into its own temporary folder. A worker
reduces each :class:`~steel_ray.predict.Prediction` to what the caller needs (RLE strings, a
pseudo label's confidences) before it travels back: full-size maps never cross the network.

Ray lives here, in ``search.py`` and in ``tune_adapter.py``. Without a running Ray (or with
``workers=0``) the same functions run in this process, through the same code.
"""
from __future__ import annotations

import contextlib
import logging
import math
import shutil
import time
from pathlib import Path
from typing import Callable

from . import run as layout
from .console import progress as progress_bar
from .console import route_ray_logs
from .data import DataError

__all__ = ["map_predictions", "ray_session", "checkpoint_sources", "default_workers"]

log = logging.getLogger(__name__)


def checkpoint_sources(doc: dict) -> dict[str, tuple[str, str] | None]:
    """Each checkpoint of a blend document (members and classifiers) -> (its run's pool, its path in
    the pool) when that run writes to ``--storage``, else None (the path itself is the only copy)."""
    out: dict[str, tuple[str, str] | None] = {}
    for m in [*doc["members"], *doc.get("classifiers", [])]:
        for p in map(Path, m["checkpoints"]):
            run = p.parents[3]  # RUN/checkpoints/<model>/fold=<k>/best.pt
            state = layout.read_state(run)
            out[str(p)] = (layout.pool_uri(state, run), p.relative_to(run).as_posix()) if state and state.storage else None
    return out


def _localise(doc: dict, sources: dict, scratch: Path) -> dict:
    """The document with each checkpoint path replaced by where this node has the file: the path
    itself when it exists here, else a copy fetched from the run's pool into ``scratch``."""
    from .tune_adapter import get_file, is_remote  # lazy: Ray and torch, on the workers only

    def where(p: str) -> str:
        if Path(p).exists():
            return p
        src = sources.get(p)
        if src is not None:
            pool, rel = src
            if not is_remote(pool):
                if (Path(pool) / rel).exists():
                    return str(Path(pool) / rel)
            elif get_file(pool, rel, scratch / "weights" / rel):
                return str(scratch / "weights" / rel)
        raise DataError(f"checkpoint {p} is neither on node {_node()} nor in its run's pool "
                        f"({src[0] if src else 'the run has no --storage'})")

    doc = dict(doc)
    for key in ("members", "classifiers"):
        doc[key] = [{**m, "checkpoints": [where(p) for p in m["checkpoints"]]} for m in doc.get(key, [])]
    return doc


def _node() -> str:
    with contextlib.suppress(Exception):
        import ray

        return ray.get_runtime_context().get_node_id()[:12]
    return "this machine"


class Predictor:
    """One inference worker: the blend's members loaded once, then shard after shard."""

    def __init__(self, doc: dict, sources: dict, tta: str | None, threads: int):
        import torch

        from .infer import pick_device  # lazy: torch, on the workers only
        from .predict import load_members  # lazy: torch, on the workers only
        from .tune_adapter import scratch_dir  # lazy: Ray and torch, on the workers only

        torch.set_num_threads(max(1, int(threads)))
        self.scratch = scratch_dir()
        self.doc = _localise(doc, sources, self.scratch)
        self.device = pick_device("auto")  # CUDA when Ray gave this actor a GPU
        self.members = load_members(self.doc, "blend.json", self.device, tta)

    def run(self, names: list[str], blobs: list[bytes], origins: list[str], shape, reduce: Callable, batch_size: int,
            skip_bad: bool):
        """Predict one shard (its files' bytes); returns ([result or None per image], bad images'
        errors, node id). Errors name the caller's paths, not this worker's copies."""
        import torch

        from .predict import iter_predictions  # lazy: torch, on the workers only

        folder = self.scratch / f"shard-{time.monotonic_ns()}"
        folder.mkdir()
        try:
            for n, b in zip(names, blobs):
                (folder / n).write_bytes(b)
            back = {str(folder / n): o for n, o in zip(names, origins)}

            def named(msg: str) -> str:
                for mine, theirs in back.items():
                    msg = msg.replace(mine, theirs)
                return msg

            bad: list[str] = []
            out = []
            try:
                with torch.inference_mode():
                    for _, pred in iter_predictions(self.doc, self.members, [folder / n for n in names], tuple(shape),
                                                    skip_bad, progress=False, batch_size=batch_size, bad=bad):
                        out.append(None if pred is None else reduce(pred))
            except DataError as e:
                raise DataError(named(str(e))) from None
            return out, [named(b) for b in bad], _node()
        finally:
            shutil.rmtree(folder, ignore_errors=True)

    def close(self) -> None:
        shutil.rmtree(self.scratch, ignore_errors=True)


def default_workers(gpus_per_task: float, cpus_per_task: float) -> int:
    """One worker per free slot of the cluster: its GPUs / gpus_per_task, else its CPUs / cpus_per_task."""
    import ray

    free = ray.available_resources()
    if gpus_per_task:
        return max(1, int(free.get("GPU", 0) // gpus_per_task))
    return max(1, int(free.get("CPU", 1) // max(cpus_per_task, 1e-9)))


def map_predictions(doc: dict, paths: list[Path], shape, reduce: Callable, *, tta: str | None = None, batch_size: int = 8,
                    skip_bad: bool = False, bad: list | None = None, workers: int | None = None, gpus_per_task: float | None = None,
                    cpus_per_task: float = 1, shard_size: int = 32, progress: bool = True, blend_path="blend.json",
                    device: str = "auto") -> list:
    """``reduce(prediction)`` for every image of ``paths``, in their order (None for a bad image
    skipped with ``skip_bad``, its error appended to ``bad``).

    On Ray's workers when Ray is running and ``workers`` is not 0 (default: one per free slot;
    ``gpus_per_task`` default: 1 on a cluster with GPUs, else 0); else in this process, on ``device``
    (``cpu`` also keeps Ray's workers off the GPUs).
    """
    import ray

    bad = [] if bad is None else bad
    if workers == 0 or not ray.is_initialized():
        return _in_process(doc, paths, shape, reduce, tta, batch_size, skip_bad, bad, progress, blend_path, device)
    sources = checkpoint_sources(doc)
    missing = [p for p, s in sources.items() if s is None and not Path(p).exists()]
    if missing:
        raise DataError(f"{blend_path}: missing checkpoint(s): " + ", ".join(missing))
    if gpus_per_task is None:
        gpus_per_task = 1 if ray.cluster_resources().get("GPU", 0) > 0 and device != "cpu" else 0
    if not paths:
        return []
    n = min(workers or default_workers(gpus_per_task, cpus_per_task), len(paths))
    # shards of at most shard_size, and at least one per worker
    size = max(1, min(shard_size, math.ceil(len(paths) / n)))
    shards = [paths[i:i + size] for i in range(0, len(paths), size)]
    actor = ray.remote(Predictor).options(num_cpus=cpus_per_task, num_gpus=gpus_per_task, max_restarts=1, max_task_retries=1)
    # the blend document goes by value (a few KB, inlined in each creation task): a restarted actor
    # needs its constructor arguments, and Ray's core worker warns on the console about any held in
    # the object store (ray-project/ray#53727)
    pool = [actor.remote(doc, sources, tta, math.ceil(cpus_per_task)) for _ in range(n)]
    log.info("predicting %d image(s) on %d Ray worker(s) (%s CPU, %s GPU each; %d shard(s) of up to %d)", len(paths), n,
             cpus_per_task, gpus_per_task, len(shards), size)
    results: list = [None] * len(shards)
    nodes: set = set()
    bar = progress_bar(total=len(paths), desc="predict", unit="img", enabled=progress)
    pending, todo, idle = {}, list(range(len(shards)))[::-1], list(pool)
    try:
        while todo or pending:
            while todo and idle:
                k, a = todo.pop(), idle.pop()
                blobs = [Path(p).read_bytes() if Path(p).is_file() else b"" for p in shards[k]]
                ref = a.run.remote([Path(p).name for p in shards[k]], blobs, [str(p) for p in shards[k]], tuple(shape), reduce,
                                   batch_size, skip_bad)
                pending[ref] = (k, a)
            done, _ = ray.wait(list(pending), num_returns=1)
            k, a = pending.pop(done[0])
            try:
                results[k] = ray.get(done[0])
            except ray.exceptions.RayTaskError as e:
                # a bad image or checkpoint, a GPU out of memory: the worker's own error, as in this process
                if isinstance(e.cause, (DataError, MemoryError)) or type(e.cause).__name__ == "OutOfMemoryError":
                    raise e.cause from None
                raise
            nodes.add(results[k][2])
            idle.append(a)
            bar.update(len(shards[k]))
    finally:
        bar.close()
        for a in pool:
            with contextlib.suppress(Exception):
                ray.get(a.close.remote(), timeout=30)
            ray.kill(a)
    out = []
    for r in results:
        out.extend(r[0])
        bad.extend(r[1])
    log.info("predicted %d image(s) on %d node(s): %s", len(paths), len(nodes), ", ".join(sorted(nodes)))
    return out


def _in_process(doc, paths, shape, reduce, tta, batch_size, skip_bad, bad, progress, blend_path, device) -> list:
    import torch

    from .infer import pick_device  # lazy: torch, on the workers only
    from .predict import iter_predictions, load_members  # lazy: torch, on the workers only

    members = load_members(doc, blend_path, pick_device(device), tta)
    with torch.inference_mode():
        return [None if pred is None else reduce(pred)
                for _, pred in iter_predictions(doc, members, paths, tuple(shape), skip_bad, progress, batch_size, bad)]


@contextlib.contextmanager
def ray_session(address: str | None = None, verbose: bool = False):
    """Join ``address`` or start an embedded Ray for the block (nothing when Ray is already running);
    Ray is shut down at the end only when this block started it."""
    import ray

    if ray.is_initialized():
        yield
        return
    route_ray_logs()  # Ray's import-time handlers off before init: its start-up lines go to our log
    if address:
        ray.init(address=address, log_to_driver=verbose)
    else:
        ray.init(include_dashboard=False, log_to_driver=verbose)
    route_ray_logs()
    try:
        yield
    finally:
        ray.shutdown()
