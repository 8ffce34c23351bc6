"""Mask overlays: an image drawn with the truth and the blend's mask as outlines, captioned.

Usage::

    python -m steel_ray.overlay --run RUN --images DIR [--class C] [--out DIR] [--truth CSV] [--submission CSV]

For any image set: the run's blend predicts DIR's images (the predict path, every fold model),
or ``--submission`` gives the masks; ``--truth`` (train.csv, either format) adds the true
outlines and each pair's Dice. One PNG per (image, class) with a mask on either side, worst Dice
first (largest mask without --truth), at most --max, and ``overlays.csv`` listing them (file,
image, class, Dice, gate, true and predicted pixels). The blend report uses the same drawing for
its per-class OOF examples (largest false positives, largest misses, typical hits) and the
holdout's worst pairs.

Drawing: truth outline green, the blend's mask outline magenta (the legend names them); both
outlines where they coincide. Segmentation people judge a model by its masks (nnU-Net ships
``plot_overlay_pngs`` for this); outlines, not filled masks, keep the steel texture visible.
"""
from __future__ import annotations

import argparse
import base64
import html
import json
import logging
import sys
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from . import console, oof, rle
from . import run as layout
from .blend.document import load_blend
from .data import N_CLASSES, DataError, list_images, read_labels
from .dataset import read_image
from .io import atomic_write_bytes, atomic_write_text
from .metric import dice_per_pair
from .postprocess import PostProcess, apply_blend, member_weights
from .score import pair_dice, pair_rles

log = logging.getLogger(__name__)

__all__ = ["draw", "oof_pairs", "pick_examples", "report_section", "LEGEND"]

# BGR for OpenCV; LEGEND gives the same colours for HTML
TRUTH_BGR, PRED_BGR = (0, 200, 0), (255, 0, 255)
LEGEND = (("truth", "#00c800"), ("blend mask", "#ff00ff"))


def _outline(img: np.ndarray, mask: np.ndarray, colour, thickness: int) -> None:
    contours, _ = cv2.findContours(mask.astype(np.uint8), cv2.RETR_LIST, cv2.CHAIN_APPROX_SIMPLE)
    cv2.drawContours(img, contours, -1, colour, thickness)


def draw(image: np.ndarray, truth: np.ndarray | None, pred: np.ndarray | None, caption: str,
         max_width: int = 1600) -> np.ndarray:
    """(H', W', 3) BGR uint8: ``image`` (H, W[, 3] RGB, as :func:`read_image` gives it) with the truth
    (green) and predicted (magenta) outlines and ``caption`` on a band above; scaled down to
    ``max_width`` pixels wide."""
    img = cv2.cvtColor(image.astype(np.uint8), cv2.COLOR_RGB2BGR) if image.ndim == 3 else cv2.cvtColor(
        image.astype(np.uint8), cv2.COLOR_GRAY2BGR)
    thickness = max(1, round(img.shape[0] / 128))
    if truth is not None:
        _outline(img, truth, TRUTH_BGR, thickness)
    if pred is not None:
        _outline(img, pred, PRED_BGR, thickness)
    if img.shape[1] > max_width:
        img = cv2.resize(img, (max_width, round(img.shape[0] * max_width / img.shape[1])), interpolation=cv2.INTER_AREA)
    scale = 0.45 if img.shape[1] < 900 else 0.6
    band = np.zeros((round(28 * scale / 0.45), img.shape[1], 3), np.uint8)
    cv2.putText(band, caption, (6, band.shape[0] - 9), cv2.FONT_HERSHEY_SIMPLEX, scale, (255, 255, 255), 1, cv2.LINE_AA)
    return np.concatenate([band, img])


def encode(img: np.ndarray, ext: str = ".jpg") -> bytes:
    """PNG (lossless, files) or JPEG (quality 88: the report's embedded examples, a tenth of the size)."""
    ok, buf = cv2.imencode(ext, img, [cv2.IMWRITE_JPEG_QUALITY, 88] if ext == ".jpg" else [])
    if not ok:
        raise ValueError(f"cannot encode an overlay as {ext}")
    return buf.tobytes()


@dataclass
class OOFPairs:
    """The blend's out-of-fold result for every (training image, class) pair of the pool."""

    truth: oof.Truth
    dice: np.ndarray  # (N, 4)
    fp: np.ndarray  # (N, 4) predicted pixels outside the truth
    fn: np.ndarray  # (N, 4) true pixels the mask missed
    pred_area: np.ndarray  # (N, 4)
    gate: np.ndarray  # (N, 4) the presence each class was gated by


def _members(doc: dict):
    ids = [m["model_id"] for m in doc["members"]]
    weights = np.stack([member_weights(m) for m in doc["members"]], axis=1)  # (4, M)
    return ids, weights


def _classifier_presence(run, doc: dict, truth: oof.Truth) -> np.ndarray | None:
    clfs = doc.get("classifiers") or []
    if not clfs:
        return None
    folds = sorted(set(truth.folds.tolist()))
    return sum(float(c["weight"]) * oof.read_presence(run, c["model_id"], truth, folds) for c in clfs)


def _blend_batches(run, doc: dict, truth: oof.Truth, rows_wanted: set | None = None):
    """Yield ``(rows, masks (B, 4, H, W) bool, gates (B, 4))``: the blend's rule (blend.json's
    weights, gates and post-processing) on the OOF maps, fold by fold, streamed; with
    ``rows_wanted`` only those truth rows (other batches are skipped after reading)."""
    ids, weights = _members(doc)
    post = [PostProcess(**doc["postprocess"][str(c + 1)]) for c in range(N_CLASSES)]
    q = _classifier_presence(run, doc, truth)
    cols = ["image_id", "cls"] + [f"p{c + 1}" for c in range(N_CLASSES)]
    for f in sorted(set(truth.folds.tolist())):
        for rows, batches, paths in oof.iter_fold_batches(run, ids, truth, f, cols):
            if rows_wanted is not None and not rows_wanted.intersection(rows.tolist()):
                continue
            cls = np.stack([np.asarray(b.column("cls").to_pylist(), np.float32).reshape(len(rows), N_CLASSES)
                            for b in batches])  # (M, B, 4)
            masks = np.zeros((len(rows), N_CLASSES, *truth.shape), bool)
            gates = np.zeros((len(rows), N_CLASSES))
            for c in range(N_CLASSES):
                maps = np.stack([oof.maps(b, f"p{c + 1}", truth.shape, p) for b, p in zip(batches, paths)])
                _, gates[:, c], masks[:, c] = apply_blend(maps, cls[:, :, c], weights[c], None if q is None else q[rows, c],
                                                          post[c])
            yield rows, masks, gates


def oof_pairs(run, doc: dict) -> OOFPairs:
    """Every pair's Dice, false-positive and missed pixels, mask area and gate under the blend (the
    mean Dice is the blend's in-sample score)."""
    truth = oof.read_truth(run)
    n = len(truth.image_ids)
    out = OOFPairs(truth, *(np.zeros((n, N_CLASSES)) for _ in range(5)))
    for rows, masks, gates in _blend_batches(run, doc, truth):
        t = truth.masks(rows)
        out.dice[rows] = dice_per_pair(masks, t)
        out.fp[rows] = (masks & ~t).sum((-2, -1))
        out.fn[rows] = (t & ~masks).sum((-2, -1))
        out.pred_area[rows] = masks.sum((-2, -1))
        out.gate[rows] = gates
    return out


def pick_examples(pairs: OOFPairs, c: int, per_kind: int = 2) -> list[tuple[str, int]]:
    """(kind, truth row) for class ``c``: the largest false positives (most predicted pixels outside
    the truth), the largest misses (most true pixels missed), and typical hits (true and predicted
    defect, Dice nearest the median of such pairs); an image appears once."""
    fp, fn = pairs.fp[:, c], pairs.fn[:, c]
    hit = np.flatnonzero((pairs.truth.areas[:, c] > 0) & (pairs.pred_area[:, c] > 0))
    med = np.median(pairs.dice[hit, c]) if len(hit) else 0.0
    kinds = [("largest false positive", [i for i in np.argsort(-fp, kind="stable") if fp[i] > 0]),
             ("largest miss", [i for i in np.argsort(-fn, kind="stable") if fn[i] > 0]),
             ("typical hit", list(hit[np.argsort(np.abs(pairs.dice[hit, c] - med), kind="stable")]))]
    seen, out = set(), []
    for kind, order in kinds:
        for i in [i for i in order if i not in seen][:per_kind]:
            seen.add(int(i))
            out.append((kind, int(i)))
    return out


def _img_tag(img: np.ndarray, alt: str) -> str:
    return (f"<img class='overlay' alt='{html.escape(alt)}' "
            f"src='data:image/jpeg;base64,{base64.b64encode(encode(img, '.jpg')).decode()}'/>")


def _legend() -> str:
    return ("<p class='legend'>Outlines: " + ", ".join(
        f"<span style='color:{col};font-weight:bold'>&#9632; {html.escape(name)}</span>" for name, col in LEGEND)
        + " (both where they coincide). Drawn on the image at full resolution, shown scaled to the page.</p>")


def _images_dir(run) -> Path | None:
    state = layout.read_state(run)
    data = state.data if state is not None else None
    return Path(data) / "train_images" if data else None


def report_section(run, doc: dict, blend_path, per_kind: int = 2, holdout_worst: int = 2, max_width: int = 800) -> str:
    """The report's "Masks" section (HTML): per class, OOF examples of the blend and the holdout's
    worst pairs, each captioned with the image id, fold, the pair's Dice and the gate value."""
    run = Path(run)
    images = _images_dir(run)
    parts = ["<h2>Masks: out-of-fold examples and the holdout's worst pairs</h2>", _legend()]
    if images is None or not images.is_dir():
        return "\n".join(parts + [f"<p>Training images not found ({html.escape(str(images))}): no overlays.</p>"])
    pairs = oof_pairs(run, doc)
    picks = {c: pick_examples(pairs, c, per_kind) for c in range(N_CLASSES)}
    wanted = {i for p in picks.values() for _, i in p}
    drawn: dict[tuple[int, int], np.ndarray] = {}
    truth = pairs.truth
    for rows, masks, _ in _blend_batches(run, doc, truth, wanted):
        for j, i in enumerate(rows.tolist()):
            for c in range(N_CLASSES):
                if any(i == r for _, r in picks[c]):
                    drawn[(i, c)] = masks[j, c]
    held = _holdout_worst(run, doc, blend_path, holdout_worst)
    for c in range(N_CLASSES):
        parts.append(f"<h3>Class {c + 1}</h3>")
        if not picks[c] and not held.get(c):
            parts.append("<p>No defect predicted or true in this class's out-of-fold pairs.</p>")
        for kind, i in picks[c]:
            iid = truth.image_ids[i]
            cap = (f"{iid} class {c + 1} fold {int(truth.folds[i])}: {kind}, Dice {pairs.dice[i, c]:.3f}, "
                   f"gate {pairs.gate[i, c]:.3f}")
            t = truth.masks([i], [c])[0, 0]
            img = draw(read_image(images / iid, truth.shape, quiet=True), t, drawn[(i, c)], cap, max_width)
            parts.append(f"<figure>{_img_tag(img, cap)}<figcaption>{html.escape(cap)}</figcaption></figure>")
        for cap, img in held.get(c, []):
            parts.append(f"<figure>{_img_tag(img, cap)}<figcaption>{html.escape(cap)}</figcaption></figure>")
    return "\n".join(parts)


def _holdout_worst(run, doc: dict, blend_path, k: int, max_width: int = 800) -> dict[int, list]:
    """Per class, the holdout's ``k`` worst pairs (Dice below 1) drawn from the blend's predictions
    (re-predicted through the predict path for their gate values; the masks are the submission's)."""
    h = doc.get("holdout")
    if not h or not layout.holdout_path(run).exists() or k <= 0:
        return {}
    held = json.loads(layout.holdout_path(run).read_text())
    shape = tuple(doc["image_shape"])
    truth_rles = np.array(held["rles"], dtype=object)
    pred_rles = pair_rles(read_labels(h["submission"]), held["image_ids"])
    dice = pair_dice(truth_rles, pred_rles, shape, "holdout truth", h["submission"])
    picks = {c: [i for i in np.argsort(dice[:, c], kind="stable") if dice[i, c] < 1][:k] for c in range(N_CLASSES)}
    rows = sorted({int(i) for p in picks.values() for i in p})
    if not rows:
        return {}
    from . import predict  # lazy: torch, only when overlays predict images

    paths = [Path(held["images_dir"]) / held["image_ids"][i] for i in rows]
    members = predict.load_members(doc, blend_path, predict.pick_device("cpu"))
    preds = {p.image_id: p for _, p in predict.iter_predictions(doc, members, paths, shape, progress=False)}
    out = {}
    for c in range(N_CLASSES):
        for i in picks[c]:
            iid = held["image_ids"][i]
            p = preds[iid]
            cap = f"{iid} class {c + 1} holdout: worst pairs, Dice {dice[i, c]:.3f}, gate {p.gate[c]:.3f}"
            img = draw(read_image(Path(held["images_dir"]) / iid, shape, quiet=True), rle.decode(truth_rles[i, c], shape),
                       p.masks[c], cap, max_width)
            out.setdefault(c, []).append((cap, img))
    return out


def rle_lookup(labels) -> dict:
    """``{(image id, class 1-4): RLE}`` of a label or submission CSV's positive pairs; ``"_images"``:
    every image it names."""
    t = labels.table
    out = {(i, int(c)): e for i, c, e in zip(t.ImageId, t.ClassId, t.EncodedPixels)}
    out["_images"] = set(labels.image_ids) | set(t.ImageId)
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m steel_ray.overlay", description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("\n\n", 1)[1])
    ap.add_argument("--run", required=True, help="run folder with a blend (RUN/blend/blend.json)")
    ap.add_argument("--images", required=True, help="folder of images to draw")
    ap.add_argument("--blend", help="blend.json to predict with (default: RUN/blend/blend.json)")
    ap.add_argument("--class", dest="cls", type=int, choices=range(1, N_CLASSES + 1), metavar="C",
                    help="only class C (1-4); default: every class")
    ap.add_argument("--out", help="folder for the PNGs (default: RUN/overlays)")
    ap.add_argument("--truth", help="labels CSV (train.csv, either format) for the true outlines and each pair's Dice")
    ap.add_argument("--submission", help="draw this submission's masks instead of predicting (no gate values then)")
    ap.add_argument("--max", type=int, default=50, help="at most N PNGs (default 50)")
    ap.add_argument("--device", default="auto", help="auto, cpu or cuda[:N] (prediction only)")
    a = ap.parse_args(argv)
    console.setup(None, False)
    try:
        n, out = write_overlays(a)
    except DataError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {n} overlay PNG(s) to {out}")
    return 0


def write_overlays(a) -> tuple[int, Path]:
    run = Path(a.run)
    blend_path = Path(a.blend) if a.blend else layout.blend_json(run)
    if not blend_path.exists():
        raise DataError(f"{blend_path} not found: --run needs a blended run (or pass --blend)")
    doc = load_blend(blend_path)
    shape = tuple(doc["image_shape"])
    images = Path(a.images)
    names = list_images(images)
    classes = [a.cls - 1] if a.cls else list(range(N_CLASSES))
    truth = rle_lookup(read_labels(a.truth)) if a.truth else None
    if a.submission:
        sub = rle_lookup(read_labels(a.submission))
        missing = [i for i in names if i not in sub.get("_images", ())]
        if missing:
            raise DataError(f"{a.submission}: no rows for {len(missing)} image(s) of {images} (e.g. {missing[0]})")
        preds = {i: ([rle.decode(sub.get((i, c + 1), ""), shape) for c in range(N_CLASSES)], None) for i in names}
    else:
        from . import predict  # lazy: torch, only when overlays predict images

        members = predict.load_members(doc, blend_path, predict.pick_device(a.device))
        preds = {p.image_id: (list(p.masks), p.gate) for _, p in
                 predict.iter_predictions(doc, members, [images / n for n in names], shape)}
    items = []
    for iid in names:
        masks, gate = preds[iid]
        for c in classes:
            t = rle.decode(truth.get((iid, c + 1), ""), shape) if truth else None
            if not masks[c].any() and (t is None or not t.any()):
                continue
            d = float(dice_per_pair(masks[c], t)) if t is not None else None
            key = d if d is not None else -float(masks[c].sum())
            items.append((key, iid, c, t, masks[c], d, None if gate is None else float(gate[c])))
    items.sort(key=lambda x: x[0])
    out = Path(a.out) if a.out else run / "overlays"
    out.mkdir(parents=True, exist_ok=True)
    index = ["file,image_id,class,dice,gate,true_pixels,predicted_pixels"]
    for _, iid, c, t, m, d, g in items[:a.max]:
        cap = f"{iid} class {c + 1}" + (f", Dice {d:.3f}" if d is not None else "") + (f", gate {g:.3f}" if g is not None else "")
        img = draw(read_image(images / iid, shape, quiet=True), t, m, cap)
        dest = out / f"{Path(iid).stem}_class{c + 1}.png"
        atomic_write_bytes(dest, encode(img, ".png"))
        index.append(f"{dest.name},{iid},{c + 1},{'' if d is None else f'{d:.6f}'},{'' if g is None else f'{g:.6f}'},"
                     f"{'' if t is None else int(t.sum())},{int(m.sum())}")
    atomic_write_text(out / "overlays.csv", "\n".join(index) + "\n")
    return min(len(items), a.max), out


if __name__ == "__main__":
    sys.exit(main())
