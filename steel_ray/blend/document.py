"""blend.json: the document predict, pseudo rounds and the report read (written from a
:class:`BlendResult`), which choices each score saw, and the console summary of its scores."""
from __future__ import annotations

import json
import time
from pathlib import Path
from typing import TypedDict

import numpy as np

from .. import oof
from .. import postprocess as ps
from .. import run as layout
from ..data import N_CLASSES, DataError
from ..io import write_json
from .pool import BlendPool
from .report import fmt_score, no_classifier_reason, warnings
from .tune import BlendResult

SCHEMA_VERSION = 1  # blend.json's "version": raise it when a reader would misread an older document


class Member(TypedDict, total=False):
    model_id: str
    weight: float | None  # None with per-class weights
    class_weights: dict[str, float]  # "1".."4" -> weight, only with per-class weights
    checkpoints: list[str]  # best.pt of each fold


class Classifier(TypedDict):
    model_id: str
    weight: float
    checkpoints: list[str]


class ClassRule(TypedDict):
    pixel_threshold: float
    min_area: float
    cls_threshold: float
    fill_holes: bool
    gate_source: str  # a key of GATE_SOURCES


class BlendDoc(TypedDict, total=False):
    """blend.json (``semantics`` states the rule in words). Predict, pseudo rounds, overlays and the
    demo read it through :func:`load_blend`."""

    version: int
    run: str
    created: str
    image_shape: list[int]
    semantics: str
    members: list[Member]
    classifiers: list[Classifier]  # only classifiers some class gates with
    classifier_pool: list[str]
    classifiers_unused: list[str]  # weighted, but no class gates with them
    postprocess: dict[str, ClassRule]  # "1".."4"
    scores: dict
    per_class: dict
    single_models_cross_fitted: dict
    left_out_models: list[str]
    selection: dict
    scores_include: dict
    curves: dict
    holdout: dict  # with a holdout look
    pseudo: dict  # a pseudo-labelling round's settings


def load_blend(path) -> BlendDoc:
    """Read and check a blend.json; an old, foreign or damaged document is a one-line
    :class:`DataError` that names the file and what was expected."""
    path = Path(path)
    try:
        doc = json.loads(path.read_text())
    except FileNotFoundError:
        raise DataError(f"{path}: no blend.json there; run python -m steel_ray.blend --run RUN first") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DataError(f"{path}: not a JSON document ({e})") from None
    if not isinstance(doc, dict) or "members" not in doc or "postprocess" not in doc:
        raise DataError(f"{path}: not a steel_ray blend.json (expected an object with 'version', 'members' and 'postprocess')")
    if doc.get("version") != SCHEMA_VERSION:
        raise DataError(f"{path}: blend.json schema version {doc.get('version')!r}; this steel_ray reads version "
                        f"{SCHEMA_VERSION}: blend the run again (python -m steel_ray.blend --run RUN)")
    _check(path, doc)
    doc.setdefault("classifiers", [])
    return doc


def _check(path, doc: dict) -> None:
    need = {"image_shape": list, "members": list, "postprocess": dict, "scores": dict}
    for key, typ in need.items():
        if not isinstance(doc.get(key), typ):
            raise DataError(f"{path}: key {key!r} missing or not a {typ.__name__}")
    if not doc["members"]:
        raise DataError(f"{path}: 'members' is empty; a blend needs at least one member")
    for i, m in enumerate(doc["members"] + doc.get("classifiers", [])):
        if not isinstance(m, dict) or not isinstance(m.get("model_id"), str) or not isinstance(m.get("checkpoints"), list):
            raise DataError(f"{path}: member {i} needs 'model_id' (text) and 'checkpoints' (a list), got {m!r}")
        if m.get("weight") is None and not isinstance(m.get("class_weights"), dict):
            raise DataError(f"{path}: member {m['model_id']!r} has neither 'weight' nor 'class_weights'")
    for c in range(1, N_CLASSES + 1):
        rule = doc["postprocess"].get(str(c))
        if not isinstance(rule, dict):
            raise DataError(f"{path}: postprocess of class {c} missing entirely")
        missing = [k for k in ClassRule.__annotations__ if k != "gate_source" and k not in rule]
        if missing:
            raise DataError(f"{path}: postprocess of class {c} missing {missing}")
        if rule.get("gate_source", "segmentation") not in ps.GATE_SOURCES:
            raise DataError(f"{path}: class {c}'s gate_source {rule['gate_source']!r} is not one of {list(ps.GATE_SOURCES)}")


def blend_json(result: BlendResult, pool: BlendPool, run) -> dict:
    members = []
    shared = np.allclose(result.weights, result.weights[0])
    for mi, mid in enumerate(result.model_ids):
        if result.weights[:, mi].max() <= 0:
            continue
        entry = {"model_id": mid, "weight": float(result.weights[0, mi]), "checkpoints": pool.checkpoints[mid]}
        if not shared:
            entry["weight"] = None
            entry["class_weights"] = {str(c + 1): float(result.weights[c, mi]) for c in range(N_CLASSES)}
        members.append(entry)
    classifiers = [{"model_id": mid, "weight": float(w), "checkpoints": pool.checkpoints[mid]}
                   for mid, w in zip(result.classifiers, result.clf_weights if result.clf_weights is not None else []) if w > 0]
    unused = []
    if all(pp.get("gate_source", "segmentation") == "segmentation" for pp in result.postprocess.values()):
        # weighted, but no class gates with them: predict and pseudo rounds would run their folds for nothing
        classifiers, unused = [], [c["model_id"] for c in classifiers]
    return {
        "version": SCHEMA_VERSION,
        "run": str(Path(run).resolve()),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "image_shape": list(pool.shape),
        "semantics": ("blended_u8 = floor(sum_m weight_m * p_m + 0.5) over members' uint8 maps (round(255 p)); a pixel "
                      "is on when blended_u8 / 255 >= pixel_threshold; holes are filled if fill_holes; the class mask is "
                      "emptied when its area (pixels at image resolution) < min_area or when its gate < cls_threshold. "
                      "The gate depends on the class's gate_source: segmentation = sum_m weight_m * cls_m over members "
                      "(aux head, or max pixel probability); classifier = sum_j weight_j * presence_j over classifiers; "
                      "mean = the mean of the two; product = the classifier's presence, and the pixel test is "
                      "blended_u8 * presence >= 255 * pixel_threshold instead (the soft gate). Each member's (and "
                      "classifier's) output is the mean of its fold models' probabilities; maps are quantised."),
        "members": members,
        "classifiers": classifiers,
        "classifier_pool": list(result.classifiers),
        "classifiers_unused": unused,
        "postprocess": result.postprocess,
        "scores": result.scores,
        "per_class": result.per_class,
        "single_models_cross_fitted": result.singles,
        "left_out_models": result.left_out,
        "selection": {**result.settings, "trajectory": result.trajectory, "nested_weights": result.nested_weights},
        "scores_include": score_selections(run, pool),
        "curves": result.curves,
    }


def score_selections(run, pool: BlendPool) -> dict:
    """Per score: the choices made with the labels of the very images it is scored on (an empty
    list: none, the score is unbiased by selection). Upstream choices come from the run: the
    explore stage's config choice (a search state with explored spaces, or a pseudo round that
    reuses them) and each member's OOF epoch policy (its config in the OOF file)."""
    folds = sorted(set(pool.folds.tolist()))
    configs = {m: oof.read_meta(layout.oof_path(run, m, folds[0])).get("config") or {} for m in pool.model_ids + pool.classifiers}
    best_epoch = [m for m, c in configs.items() if c.get("oof_epoch", "last") == "best"]
    state = layout.read_state(run)
    upstream = []
    if state is not None and (state.explored or state.pseudo):
        upstream.append("config choice (explore stage, screening-fold validation Dice)")
    if best_epoch:
        upstream.append(f"epoch choice on each fold's own labels (oof_epoch=best: {len(best_epoch)} of {len(configs)} models)")
    ps = state.pseudo if state is not None else None
    if ps:
        # fold k trained on labels of the parent's fold-k models (never trained on fold k), but the
        # parent blend that made them chose its members, weights and post-processing on every fold
        per_fold = "per fold" if "labels_by_fold" in ps else "from every fold's models (fold k's own included)"
        upstream.append(f"pseudo labels {per_fold}: the parent blend's members, weights and post-processing "
                        f"(chosen on all folds' OOF); {ps.get('select', 'confidence')} cut-off {ps.get('min_confidence')}"
                        + (f", at most {ps['max_images']} images" if ps.get("max_images") else ""))
    ens, pp = "ensemble weights and classifier ensemble", "post-processing (pixel threshold, min area, gate)"
    return {"in_sample": [ens, pp, *upstream], "cross_fitted": [ens, *upstream], "cross_fitted_segmentation_only": [ens, *upstream],
            "nested": upstream, "nested_segmentation_only": upstream, "best_single": ["which single model is best", *upstream],
            "baseline": upstream, "all_empty": [], "holdout": []}


def write_blend_json(doc: dict, path) -> None:
    write_json(path, doc)


def summary_lines(doc: dict) -> list[str]:
    """The blend's scores for the console, each beside the all-empty score of the same pairs."""
    s = doc["scores"]
    clf = doc.get("classifiers", [])
    lines = [f"blend: {len(doc['members'])} member(s)" + (f", {len(clf)} classifier(s) in the gate" if clf else "")]
    if doc.get("classifier_pool") and not clf:
        lines.append(f"  no classifier used: {no_classifier_reason(doc)}")
    if clf or doc.get("classifier_pool"):
        lines.append("  gate source per class: " + ", ".join(f"{c}: {pp.get('gate_source', 'segmentation')}"
                                                        for c, pp in doc["postprocess"].items()))
    keys = [("all_empty", "all-empty (no defects)"), ("best_single", "best single (cross-fitted)"),
            ("baseline", "baseline recipe"), ("in_sample", "blend in-sample"), ("cross_fitted", "blend cross-fitted"),
            ("nested", "blend nested")]
    if doc.get("classifier_pool"):
        keys[-1:-1] = [("cross_fitted_segmentation_only", "cross-fitted, segmentation gate")]
        keys.append(("nested_segmentation_only", "nested, segmentation gate"))
    for k, label in keys:
        v = s.get(k)
        rel = "" if k == "all_empty" or v is None else f"  ({v - s['all_empty']:+.6f} vs all-empty)"
        lines.append(f"  {label:32} {fmt_score(v)}{rel}")
    if "holdout" in doc:
        h = doc["holdout"]
        lines.append(f"holdout ({h['n_images']} images nobody tuned on; look {h.get('looks', 1)} at it):")
        lines.append(f"  {'all-empty (no defects)':32} {h['all_empty']:.6f}")
        lines.append(f"  {'blend':32} {s['holdout']:.6f}  ({s['holdout'] - h['all_empty']:+.6f} vs all-empty; "
                     f"95% CI {h['ci95'][0]:.6f}-{h['ci95'][1]:.6f})")
    lines += [w for _, w in warnings(doc)]
    return lines

