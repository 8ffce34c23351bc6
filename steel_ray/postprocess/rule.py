"""The post-processing rule of one class, as blend.json states it and predict applies it: the blend
of the members' uint8 maps, the gate signal of the class's gate source, and :class:`PostProcess`
(pixel threshold, fill holes, min area, gate). :class:`Choice` is a point of the search grid."""
from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
from scipy import ndimage

from ..data import N_CLASSES


def threshold(prob: np.ndarray, t: float) -> np.ndarray:
    """Pixel threshold: on where ``prob >= t``. uint8 input is read as ``prob/255``."""
    prob = np.asarray(prob)
    if prob.dtype == np.uint8:
        return prob >= _u8_level(t)
    return prob >= t


def _u8_level(t: float) -> int:
    """Smallest uint8 level ``k`` with ``k/255 >= t`` (exact, no float drift at k/255)."""
    k = int(np.ceil(round(float(t) * 255.0, 9)))
    return min(max(k, 0), 256)


def remove_small(mask: np.ndarray, min_area: float) -> np.ndarray:
    """Whole-mask minimum area: empty every ``(..., H, W)`` mask whose area < ``min_area``."""
    mask = np.asarray(mask, dtype=bool)
    keep = mask.sum(axis=(-2, -1)) >= min_area
    return mask & keep[..., None, None]


def gate(mask: np.ndarray, cls_prob, cls_threshold: float) -> np.ndarray:
    """Classifier gate: empty masks whose presence probability < ``cls_threshold``."""
    mask = np.asarray(mask, dtype=bool)
    keep = np.asarray(cls_prob) >= cls_threshold
    return mask & np.asarray(keep)[..., None, None]


def fill_holes(mask: np.ndarray) -> np.ndarray:
    """Fill holes of each 2-D mask in ``(..., H, W)`` (scipy's binary_fill_holes)."""
    mask = np.asarray(mask, dtype=bool)
    if mask.ndim == 2:
        return ndimage.binary_fill_holes(mask)
    out = np.empty_like(mask)
    for idx in np.ndindex(mask.shape[:-2]):
        out[idx] = ndimage.binary_fill_holes(mask[idx])
    return out


@dataclass(frozen=True)
class PostProcess:
    """One class's post-processing, applied in this order: threshold, fill holes, min area, gate.

    With ``gate_source`` ``product`` (the soft gate, 4th place) the threshold applies to the pixel
    probability times the presence (:func:`product_on`): ``prob`` must be uint8 and ``cls_prob`` given.
    """

    pixel_threshold: float = 0.5
    min_area: float = 0.0
    cls_threshold: float = 0.0
    fill_holes: bool = False
    gate_source: str = "segmentation"  # which presence the caller passes as cls_prob (see GATE_SOURCES)

    def apply(self, prob: np.ndarray, cls_prob=None) -> np.ndarray:
        """``prob`` is ``(..., H, W)`` (uint8 = prob*255, or float); ``cls_prob`` is ``(...)``."""
        if self.gate_source == "product":
            if cls_prob is None or np.asarray(prob).dtype != np.uint8:
                raise ValueError("gate_source 'product' needs uint8 maps and the presence (cls_prob)")
            mask = product_on(prob, cls_prob, _u8_level(self.pixel_threshold))
        else:
            mask = threshold(prob, self.pixel_threshold)
        if self.fill_holes:
            mask = fill_holes(mask)
        mask = remove_small(mask, self.min_area)
        if cls_prob is not None and self.cls_threshold > 0:
            mask = gate(mask, cls_prob, self.cls_threshold)
        return mask

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class Choice:
    level: int
    min_area: float
    cls_threshold: float

    @property
    def pixel_threshold(self) -> float:
        return self.level / 255.0


def blend_u8(vals: np.ndarray, weights) -> np.ndarray:
    """The blend rule: ``floor(sum_m w_m * p_m + 0.5)`` on uint8 maps (weights sum to 1).

    The single definition used for scoring and for submissions. ``vals`` is (M, ...) uint8.
    """
    w = np.asarray(weights, np.float64)
    acc = np.zeros(vals.shape[1:], np.float64)
    for m in np.flatnonzero(w):
        acc += w[m] * vals[m]
    return np.floor(acc + 0.5 + 1e-9).astype(np.uint8)


def member_weights(m: dict) -> np.ndarray:
    """(4,) per-class blend weight of a blend.json member (``class_weights``) or classifier (``weight``)."""
    if m.get("weight") is None:
        return np.array([m["class_weights"][str(c + 1)] for c in range(N_CLASSES)])
    return np.full(N_CLASSES, float(m["weight"]))


def blend_cls(cls: np.ndarray, weights) -> np.ndarray:
    """Blended presence probability: the weighted mean of the members' ``cls``."""
    w = np.asarray(weights, np.float64)
    return (w[:, None] * cls).sum(0) if cls.ndim == 2 else (w[:, None, None] * cls).sum(0)


# The presence signal that gates a class's masks: the segmentation members' (aux head or max
# pixel), the classifier ensemble's, or their mean; ``product`` also gates with the classifier
# ensemble's presence, after thresholding the pixel probability times that presence (the soft
# gate of the 4th place). Listed in tie-break order: on equal scores the simpler gate wins.
GATE_SOURCES = {"segmentation": 0.0, "classifier": 1.0, "mean": 0.5, "product": 1.0}


def product_on(blended: np.ndarray, presence, level: int) -> np.ndarray:
    """The soft gate's pixels: on where ``blended * presence >= level`` (uint8 maps (..., H, W),
    presence (...), float64 products): the one definition the search counts exactly
    (:func:`product_levels`) and predict applies."""
    q = np.asarray(presence, np.float64)[..., None, None]
    return np.asarray(blended).astype(np.float64) * q >= level


def product_levels(presence, levels) -> np.ndarray:
    """(N, T) smallest uint8 value ``b`` with ``b * presence_i >= levels[t]`` as :func:`product_on`
    computes it (256: none), so that the soft gate's pixels at level ``t`` of image ``i`` are its
    pixels with ``blended >= product_levels[i, t]``: the plain counts at per-image levels."""
    q = np.asarray(presence, np.float64)[:, None]
    lv = np.asarray(levels, np.float64)[None, :]
    with np.errstate(divide="ignore", invalid="ignore"):
        b = np.where(q > 0, np.ceil(lv / np.where(q > 0, q, 1.0)), 256.0)
    b = np.clip(b, 0, 256)
    # the division rounds: settle each candidate with the product itself, as product_on does
    lower = (b >= 1) & ((b - 1) * q >= lv)
    b = np.where(lower, b - 1, b)
    higher = (b <= 255) & (b * q < lv)
    b = np.where(higher, b + 1, b)
    return np.where(b * q >= lv, b, 256).astype(np.int64)


def gate_signal(seg_cls: np.ndarray, clf: np.ndarray | None, source: str) -> np.ndarray:
    """``(1 - a) * seg_cls + a * clf`` with ``a`` the source's classifier share (0, 1 or 0.5)."""
    a = GATE_SOURCES[source]
    if a == 0.0:
        return np.asarray(seg_cls)
    if clf is None:
        raise ValueError(f"gate source {source!r} needs classifier presence")
    return (1.0 - a) * np.asarray(seg_cls, np.float64) + a * np.asarray(clf, np.float64)


def apply_blend(maps: np.ndarray, cls: np.ndarray, weights, clf, post) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One class of blend.json's rule on a batch: ``maps`` (M, B, H, W) uint8 and ``cls`` (M, B) of the
    members, ``clf`` (B,) the classifier ensemble's presence (None without classifiers), ``post`` the
    class's :class:`PostProcess`. Returns (blended (B, H, W) uint8, gate (B,), mask (B, H, W)):
    the single path of submissions (predict) and of the blend's OOF masks (overlay)."""
    blended = blend_u8(maps, weights)
    gate = gate_signal(blend_cls(cls, weights), clf, post.gate_source)
    return blended, gate, post.apply(blended, gate)

