"""Kaggle submission from a blend: fold models -> members -> blend -> per-class post-processing -> RLE.

Usage::

    python -m steel_ray.predict --run runs/demo --images data/demo/test_images --out submission.csv \
        [--blend runs/demo/blend/blend.json] [--format new|old] [--tta none,hflip,vflip] \
        [--batch-size 8] [--device auto|cpu|cuda] [--skip-bad] \
        [--address auto] [--workers N] [--gpus-per-task 0.5] [--cpus-per-task 1]

The images are predicted on Ray's workers (an embedded Ray by default, or the cluster of
``--address``): shards of images go to a pool of workers that each load the blend's models once
and use a GPU where the cluster has one; the driver loads no model. ``--workers 0`` predicts in
this process without Ray (the same code; the submission is identical).

Each member's fold models are averaged (mean probability), quantised to uint8 exactly as the
OOF maps were, blended with the blend's weights and post-processed as blend.json defines it
(each class gated by its ``gate_source``: the members' presence, the classifiers', or their mean),
through the same functions the blend used for scoring (``postprocess.blend_u8``,
``postprocess.PostProcess``). TTA defaults to each member's own OOF TTA. Images are streamed in
batches; the CSV is written atomically.
"""
from __future__ import annotations

import argparse
import contextlib
import csv
import io
import logging
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from . import oof, rle
from . import run as layout
from .blend.document import load_blend
from .console import progress as progress_bar
from .data import N_CLASSES, DataError, list_images
from .dataset import build_transforms, read_image
from .infer import pick_device, predict_batch, tta_views
from .io import atomic_write_text
from .postprocess import PostProcess, apply_blend, member_weights
from .train import load_weights
from .workers import map_predictions, ray_session

__all__ = ["Member", "Prediction", "member_weights", "load_members", "member_maps", "iter_predictions", "rles",
           "predict_images", "predict_rows", "predict_folder", "write_submission", "main"]

log = logging.getLogger("steel_ray.predict")


@dataclass
class Member:
    model_id: str
    weights: np.ndarray  # (4,) per-class blend weight
    models: list  # fold models (eval mode, on device)
    transform: object  # the member's validation transform (resize + normalise)
    tta: list  # flip dims of each view
    amp: bool  # the member's config amp: predicted in the precision its OOF was scored in
    task: str = "segment"  # classify: a classifier of the gate (blend.json "classifiers"); weights then equal its weight


def _views(spec: str | None, default: str) -> list:
    try:
        return tta_views(default if spec is None else spec)
    except ValueError as e:
        raise DataError(f"--tta: {e}") from None


def load_members(doc: dict, blend_path, device, tta: str | None = None) -> list[Member]:
    """Load every fold checkpoint of every member and of every classifier of the gate (task
    ``classify``, listed after the members); missing checkpoints are listed by path."""
    entries = [(m, "segment") for m in doc["members"]] + [(m, "classify") for m in doc.get("classifiers", [])]
    missing = [p for m, _ in entries for p in m["checkpoints"] if not Path(p).exists()]
    if missing:
        raise DataError(f"{blend_path}: missing checkpoint(s): " + ", ".join(missing))
    members = []
    for m, task in entries:
        w = member_weights(m)
        models, cfg = [], None
        for p in m["checkpoints"]:
            model, cfg = load_weights(p, device)
            if device.type == "cuda":
                model = model.to(memory_format=torch.channels_last)
            models.append(model)
        if cfg.model.task != task:
            raise DataError(f"{blend_path}: {m['model_id']} is a {cfg.model.task} model but is listed as a {task} one")
        members.append(Member(m["model_id"], w, models, build_transforms(False, resize=cfg.data.resize),
                              _views(tta, cfg.train.tta), cfg.train.amp, task))
    return members


def member_maps(member: Member, images: list[np.ndarray], shape) -> tuple[np.ndarray, np.ndarray]:
    """(B, 4, H, W) uint8 map (None for a classifier) and (B, 4) presence of one member: mean over its fold models."""
    x = torch.stack([torch.from_numpy(np.ascontiguousarray(member.transform(image=im)["image"].transpose(2, 0, 1)))
                     for im in images]).float()
    probs, cls = 0.0, 0.0
    for model in member.models:
        p, c = predict_batch(model, x, shape, member.tta, member.amp)
        probs = None if p is None else probs + p
        cls = cls + c
    k = len(member.models)
    return None if probs is None else oof.quantize((probs / k).cpu().numpy()), (cls / k).cpu().numpy()


@dataclass
class Prediction:
    """One image's blend output: the post-processed masks, the blended uint8 maps and each class's gate."""

    image_id: str
    masks: np.ndarray  # (4, H, W) bool
    blended: np.ndarray  # (4, H, W) uint8, before post-processing
    gate: np.ndarray  # (4,) the presence each class was gated by (its gate_source)


def iter_predictions(doc: dict, members: list[Member], paths: list[Path], shape, skip_bad=False, progress=True,
                     batch_size=8, bad: list | None = None):
    """Yield a :class:`Prediction` per image (None in place of one for a skipped bad image, with its
    name), streaming in batches: the single path of submissions, holdout scores and pseudo labels.

    With ``skip_bad`` an unreadable or wrongly sized image is yielded as ``(name, None)`` and its
    error appended to ``bad``; otherwise it raises, naming the file.
    """
    post = [PostProcess(**doc["postprocess"][str(c + 1)]) for c in range(N_CLASSES)]
    clfs = [m for m in members if m.task == "classify"]
    members = [m for m in members if m.task == "segment"]
    weights = np.stack([m.weights for m in members], axis=1)  # (4, M)
    bad = [] if bad is None else bad
    bar = progress_bar(total=len(paths), desc="predict", unit="img", enabled=progress)
    for start in range(0, len(paths), batch_size):
        batch, ids = [], []
        for p in paths[start:start + batch_size]:
            try:
                batch.append(read_image(p, shape, quiet=True))
                ids.append(p.name)
            except DataError as e:
                if not skip_bad:
                    raise
                log.warning("skipping %s", e)
                bad.append(str(e))
                yield p.name, None
        if batch:
            maps, cls = zip(*(member_maps(m, batch, shape) for m in members))
            maps, cls = np.stack(maps), np.stack(cls)  # (M, B, 4, H, W), (M, B, 4)
            # the classifier ensemble's presence (B, 4): sum_j weight_j * presence_j, as the blend scored it
            q = sum(m.weights[0] * member_maps(m, batch, shape)[1] for m in clfs) if clfs else None
            per_class = [apply_blend(maps[:, :, c], cls[:, :, c], weights[c], None if q is None else q[:, c], post[c])
                          for c in range(N_CLASSES)]
            blended, gates, masks = (np.stack(x, axis=1) for x in zip(*per_class))
            for i, img in enumerate(ids):
                yield img, Prediction(img, masks[i], blended[i], gates[i])
        bar.update(len(paths[start:start + batch_size]))
    bar.close()


def rles(pred: Prediction) -> list[str]:
    """A prediction's four RLE strings (what a worker sends back for a submission)."""
    return [rle.encode(m) for m in pred.masks]


def predict_images(doc: dict, members: list[Member], paths: list[Path], shape, skip_bad=False, progress=True,
                   batch_size=8, bad: list | None = None):
    """Yield (image_id, [rle per class]) for every image with members loaded in this process
    (empty masks for a skipped bad one)."""
    for img, pred in iter_predictions(doc, members, paths, shape, skip_bad, progress, batch_size, bad):
        yield img, [""] * N_CLASSES if pred is None else rles(pred)


def predict_rows(doc: dict, paths: list[Path], shape, blend_path="blend.json", **options) -> list[tuple[str, list[str]]]:
    """(image_id, [rle per class]) for every image (empty masks for a skipped bad one), on Ray's
    workers when Ray runs (``options`` as in :func:`steel_ray.workers.map_predictions`)."""
    out = map_predictions(doc, paths, shape, rles, blend_path=blend_path, **options)
    return [(Path(p).name, [""] * N_CLASSES if r is None else r) for p, r in zip(paths, out)]


def predict_folder(blend_path, images, out, fmt: str = "new", tta: str | None = None, device: str = "auto",
                   batch_size: int = 8, skip_bad: bool = False, bad: list | None = None, **workers) -> int:
    """Library entry (and the CLI's body): a submission CSV for every image of ``images`` from a
    blend.json; returns the image count. ``skip_bad``/``bad`` as in :func:`iter_predictions`; on
    Ray's workers when Ray runs (``workers``: ``workers``, ``gpus_per_task``, ``cpus_per_task``,
    ``shard_size`` of :func:`steel_ray.workers.map_predictions`); ``device`` applies in this process."""
    blend_path = Path(blend_path)
    if not blend_path.exists():
        raise DataError(f"{blend_path}: blend file not found (blend the run first)")
    doc = load_blend(blend_path)
    paths = [Path(images) / n for n in list_images(images)]
    pick_device(device)  # an unavailable --device fails here, before any work
    rows = predict_rows(doc, paths, tuple(doc["image_shape"]), blend_path, tta=tta, batch_size=batch_size, skip_bad=skip_bad,
                        bad=bad, device=device, **workers)
    return write_submission(rows, out, fmt)


def write_submission(rows, out, fmt="new") -> int:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    if fmt == "new":
        w.writerow(["ImageId", "EncodedPixels", "ClassId"])
    else:
        w.writerow(["ImageId_ClassId", "EncodedPixels"])
    n = 0
    for img, rles in rows:
        for c, s in enumerate(rles):
            w.writerow([img, s, c + 1] if fmt == "new" else [f"{img}_{c + 1}", s])
        n += 1
    atomic_write_text(out, buf.getvalue())
    return n


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m steel_ray.predict", description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("\n\n", 1)[1])
    ap.add_argument("--run", required=True, help="run folder (blend/blend.json by default)")
    ap.add_argument("--images", required=True, help="folder of images to predict")
    ap.add_argument("--out", required=True, help="submission CSV to write")
    ap.add_argument("--blend", help="blend.json (default RUN/blend/blend.json)")
    ap.add_argument("--format", choices=["new", "old"], default="new",
                    help="new (default): ImageId,EncodedPixels,ClassId; old: ImageId_ClassId,EncodedPixels")
    ap.add_argument("--tta", help="a comma list of the views none, hflip, vflip, hvflip (flipped both ways), e.g. none,hflip; "
                                  "or a trial config's tta set: hflip, vflip, hflip_vflip (= none,hflip,vflip,hvflip) "
                                  "(default: each member's own OOF TTA)")
    ap.add_argument("--batch-size", type=int, default=8, help="images per forward pass (default 8)")
    ap.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto", help="auto (default): CUDA when a GPU is visible")
    ap.add_argument("--skip-bad", action="store_true", help="give unreadable/wrong-size images empty predictions and list them")
    ap.add_argument("--address", help="predict on this Ray cluster's workers (e.g. auto on a cluster's head; default: an embedded Ray)")
    ap.add_argument("--workers", type=int, help="inference workers (default: one per free GPU, or per free CPU on a cluster "
                                                "without GPUs); 0: in this process, without Ray")
    ap.add_argument("--gpus-per-task", type=float, help="GPUs per worker, fractions allowed (default: 1 where the cluster has "
                                                        "GPUs, else 0)")
    ap.add_argument("--cpus-per-task", type=float, default=1, help="CPUs per worker (default 1; its torch threads)")
    a = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s", datefmt="%H:%M:%S")
    if a.workers is not None and a.workers < 0:
        ap.error(f"--workers must be >= 0, got {a.workers}")
    blend_path = Path(a.blend or layout.blend_json(a.run))
    try:
        if not blend_path.exists():
            raise DataError(f"{blend_path}: blend file not found (run python -m steel_ray.blend --run {a.run} first)")
        doc = load_blend(blend_path)  # for the messages below
        device = pick_device(a.device)
        bad: list[str] = []
        with contextlib.nullcontext() if a.workers == 0 else ray_session(a.address):
            n = predict_folder(blend_path, a.images, a.out, a.format, a.tta, a.device, a.batch_size, a.skip_bad, bad,
                               workers=a.workers, gpus_per_task=a.gpus_per_task, cpus_per_task=a.cpus_per_task)
        where = device if a.workers == 0 else "Ray's workers"
    except torch.OutOfMemoryError:
        print(f"error: {a.device} out of memory predicting batches of {a.batch_size} image(s) with {len(doc['members'])} "
              f"member(s); rerun with a smaller --batch-size (e.g. {max(1, a.batch_size // 2)})", file=sys.stderr)
        return 2
    except (DataError, RuntimeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {a.out}: {n} images x {N_CLASSES} classes ({a.format} format), {len(doc['members'])} member(s)"
          + (f" and {len(doc['classifiers'])} classifier(s)" if doc.get("classifiers") else "") + f" on {where}")
    if bad:
        print(f"{len(bad)} bad image(s) given empty predictions:")
        for b in bad:
            print(f"  {b}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
