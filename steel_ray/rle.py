"""Run-length encoding of masks in the Kaggle Severstal convention (the only RLE code in steel_ray).

Pixels are numbered top to bottom, then left to right (column-major, ``mask.T.ravel()``),
starting at 1. An RLE string is space-separated ``start length`` pairs, sorted and
non-overlapping. An empty mask is the empty string.

Both directions are vectorised with numpy (no Python loop over runs).
"""
from __future__ import annotations

import re
import warnings

import numpy as np

__all__ = ["encode", "decode", "validate", "area"]


def encode(mask: np.ndarray) -> str:
    """Encode a 2-D mask (anything truthy is on) as a Kaggle RLE string."""
    mask = np.asarray(mask)
    if mask.ndim != 2:
        raise ValueError(f"encode expects a 2-D mask, but got shape {mask.shape}")
    flat = np.asarray(mask, dtype=bool).T.ravel()  # column-major order
    changes = np.flatnonzero(flat[1:] != flat[:-1]) + 1
    if flat[0]:
        changes = np.concatenate(([0], changes))
    if flat[-1]:
        changes = np.concatenate((changes, [flat.size]))
    if changes.size == 0:
        return ""
    runs = changes.copy()
    runs[0::2] += 1  # 1-indexed starts
    runs[1::2] -= changes[0::2]  # lengths
    return " ".join(map(str, runs.tolist()))


_ON_OFF = np.zeros(1, dtype=bool)  # grown on demand: False, True, False, ...


def _pattern(size: int) -> np.ndarray:
    global _ON_OFF
    if _ON_OFF.size < size:
        _ON_OFF = np.zeros(max(size, 2 * _ON_OFF.size), dtype=bool)
        _ON_OFF[1::2] = True
    return _ON_OFF[:size]


_INT = re.compile(r"[+-]?[0-9]+")


def _parse(rle: str) -> np.ndarray:
    # Fast path: numpy parses the text in C; the result is trusted only if it parsed without
    # complaint into exactly one number per space-separated token (the Kaggle form).
    # Anything else takes a token loop that names the bad token.
    runs = None
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        try:
            runs = np.fromstring(rle, dtype=np.int64, sep=" ")
        except (DeprecationWarning, ValueError):
            runs = None
    canonical = runs is not None and rle[0] != " " and rle[-1] != " " and rle.isascii()
    if not canonical or runs.size != rle.count(" ") + 1:
        tokens = rle.split()
        bad = next((t for t in tokens if not _INT.fullmatch(t)), None)
        if bad is not None:
            raise ValueError(f"RLE token {bad!r} is not an integer")
        runs = np.array(tokens, dtype=np.int64)
    if runs.size % 2:
        raise ValueError(f"RLE has an odd number of tokens ({runs.size}): expected start/length pairs")
    return runs.reshape(-1, 2)


def _check_runs(runs: np.ndarray, shape: tuple[int, int] | None) -> None:
    if runs.size == 0:
        return
    starts, lengths = runs[:, 0], runs[:, 1]
    ends = starts + lengths  # exclusive, 1-indexed
    # Cheap test first (hot path); the slow part below only explains a failure. With every
    # length >= 1 and each start >= the previous end, starts[0] is the smallest start.
    ok = starts[0] >= 1 and lengths.min() >= 1 and not (starts[1:] < ends[:-1]).any()
    if not ok:
        if (starts < 1).any():
            i = int(np.argmax(starts < 1))
            raise ValueError(f"RLE run {i} has start {starts[i]} < 1 (starts are 1-indexed)")
        if (lengths < 1).any():
            i = int(np.argmax(lengths < 1))
            raise ValueError(f"RLE run {i} has length {lengths[i]} < 1")
        i = int(np.argmax(starts[1:] < ends[:-1])) + 1
        kind = "unsorted" if starts[i] < starts[i - 1] else "overlapping"
        raise ValueError(
            f"RLE runs are {kind}: run {i} starts at {starts[i]} but run {i - 1} "
            f"covers {starts[i - 1]}..{ends[i - 1] - 1}"
        )
    if shape is not None and ends[-1] - 1 > int(shape[0]) * int(shape[1]):
        n_pixels = int(shape[0]) * int(shape[1])
        raise ValueError(
            f"RLE run {len(runs) - 1} ({starts[-1]} {lengths[-1]}) ends at pixel {ends[-1] - 1}, "
            f"past the end of a {shape[0]}x{shape[1]} image ({n_pixels} pixels)"
        )


def _is_empty(rle) -> bool:
    if isinstance(rle, str):
        return not rle or rle.isspace()
    return rle is None or (isinstance(rle, float) and np.isnan(rle))


def validate(rle: str | float | None, shape: tuple[int, int] | None = None) -> np.ndarray:
    """Parse and check an RLE string; returns its runs as an ``(n, 2)`` int64 array.

    Without ``shape`` every rule but "a run past the end of the image" is checked.
    """
    if _is_empty(rle):
        return np.zeros((0, 2), dtype=np.int64)
    runs = _parse(str(rle))
    _check_runs(runs, shape)
    return runs


def decode(rle: str | float | None, shape: tuple[int, int]) -> np.ndarray:
    """Decode a Kaggle RLE string into a boolean mask of ``shape`` (height, width).

    ``None``, NaN and the empty string decode to an empty mask. Invalid input raises
    ``ValueError`` saying what is wrong.
    """
    height, width = int(shape[0]), int(shape[1])
    n = height * width
    if _is_empty(rle):
        return np.zeros((height, width), dtype=bool)
    # No Python loop over runs: the run boundaries give the lengths of alternating off/on
    # stretches, and np.repeat fills the whole image from them in one C pass. The same
    # stretches validate the string: a negative gap means unsorted/overlapping runs or a
    # start < 1, a length < 1 is an empty run, a negative tail a run past the image end.
    bounds = _parse(str(rle)).ravel()
    bounds[0::2] -= 1
    bounds[1::2] += bounds[0::2]
    counts = np.diff(bounds, prepend=0, append=n)
    if counts.min() < 0 or counts[1::2].min() < 1:
        _check_runs(_parse(str(rle)), (height, width))  # raises with the exact reason
        raise ValueError(f"invalid RLE for a {height}x{width} image")  # not reached
    flat = np.repeat(_pattern(counts.size), counts)
    return flat.reshape((width, height)).T


def area(rle: str | float | None) -> int:
    """Number of on pixels of an RLE string, without decoding it."""
    if _is_empty(rle):
        return 0
    return int(_parse(str(rle))[:, 1].sum())
