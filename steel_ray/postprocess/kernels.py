"""Compiled inner loops of the post-processing search (numba).

Every candidate blend the ensemble selection scores, and every blend scored at full resolution,
needs the same thing: for each image, how many of its kept pixels (and of its true pixels) the
blend puts at or above each threshold level. Written with numpy that is a chain of passes, each
writing a full-length temporary (the blend's sums, the rounding lookup, the histogram keys) and
numpy has no segmented histogram (``np.bincount`` over (image, value) keys costs an int64 key
per pixel and scattered writes). Written by hand because no library fuses them: one loop reads
each kept pixel's bytes once, rounds the blend, maps the value to its threshold bin and counts
it in its image's row. Pixels come in runs of one image (:class:`steel_ray.postprocess.RunIndex`),
so the image index is read once per run, not once per pixel. ``nogil`` so threads could share it;
the blend runs it in worker processes.
"""
from __future__ import annotations

import numba
import numpy as np
from numba import types
from numba.extending import overload


@numba.njit(cache=True, nogil=True)
def binned_counts(starts, ends, run_img, skip, truth, lut, sums, add, n, n_bins):
    """(n, n_bins) int64 counts of bin ``lut[sums[i] + add[i]]`` (``add`` empty: ``lut[sums[i]]``)
    per image, over all pixels of the runs and over the true ones. Images with ``skip[image]``
    (``skip`` empty: none) are not counted (their rows stay zero).

    Neighbouring pixels mostly fall in the same bin, and incrementing one counter back to back
    waits on the previous store: four interleaved local histograms per run break that chain
    (measured on clustered values: 1.4 vs 2.4 ns a pixel, 2 cores of this machine)."""
    h_all = np.zeros((n, n_bins), np.int64)
    h_true = np.zeros((n, n_bins), np.int64)
    loc = np.zeros((4, n_bins), np.int64)
    loc_true = np.zeros(n_bins, np.int64)
    has_add = add.size > 0
    has_skip = skip.size > 0
    for r in range(starts.size):
        g = run_img[r]
        if has_skip and skip[g]:
            continue
        loc[:] = 0
        loc_true[:] = 0
        e = ends[r]
        i = starts[r]
        while i + 4 <= e:  # unrolled by hand: numba does not unroll the four counters
            if has_add:
                b0 = lut[np.int64(sums[i]) + np.int64(add[i])]
                b1 = lut[np.int64(sums[i + 1]) + np.int64(add[i + 1])]
                b2 = lut[np.int64(sums[i + 2]) + np.int64(add[i + 2])]
                b3 = lut[np.int64(sums[i + 3]) + np.int64(add[i + 3])]
            else:
                b0 = lut[np.int64(sums[i])]
                b1 = lut[np.int64(sums[i + 1])]
                b2 = lut[np.int64(sums[i + 2])]
                b3 = lut[np.int64(sums[i + 3])]
            loc[0, b0] += 1
            loc[1, b1] += 1
            loc[2, b2] += 1
            loc[3, b3] += 1
            if truth[i]:  # true pixels come in runs: branches predict well, unlike adding 0 or 1
                loc_true[b0] += 1
            if truth[i + 1]:
                loc_true[b1] += 1
            if truth[i + 2]:
                loc_true[b2] += 1
            if truth[i + 3]:
                loc_true[b3] += 1
            i += 4
        while i < e:
            b0 = lut[np.int64(sums[i]) + np.int64(add[i])] if has_add else lut[np.int64(sums[i])]
            loc[0, b0] += 1
            if truth[i]:
                loc_true[b0] += 1
            i += 1
        for b in range(n_bins):  # the run's local counts into its image's rows
            h_all[g, b] += loc[0, b] + loc[1, b] + loc[2, b] + loc[3, b]
            h_true[g, b] += loc_true[b]
    return h_all, h_true


CHUNK = 2048  # pixels blended at a time: the sums stay in L1 and each member's row streams


def _round(x):
    """The blend rule's rounding of a chunk sum to the index of the caller's lookup table."""
    raise NotImplementedError  # only its compiled overloads below are called


@overload(_round, inline="always")
def _round_typed(x):
    if isinstance(x, types.Integer):  # slot-count sums: the table maps each sum to its rounded bin
        return lambda x: np.int64(x)
    return lambda x: np.int64(np.floor(x + 0.5 + 1e-9))  # float64 sums: blend_u8's rounding


@numba.njit(cache=True, nogil=True)
def binned_counts_weighted(starts, ends, run_img, truth, vals, members, weights, lut, n, n_bins):
    """Like :func:`binned_counts` for the blend rule of :func:`steel_ray.postprocess.blend_u8`.

    Float64 ``weights``: ``floor(sum_j weights[j] * vals[members[j], i] + 0.5 + 1e-9)``, summed in
    the same order with the same float64 operations (so bit-identical), then ``lut[value]`` (the
    level bins). Int32 ``weights`` (a greedy selection's slot counts over their total T): the
    sums ``S`` are int32 (eight lanes a vector where float64 has four, no conversion to float)
    and ``lut[S]`` is the bin of ``floor(S / T + 1/2)``, which
    :meth:`steel_ray.postprocess.RunIndex.counts_weighted` uses only where that equals the float
    rule bit for bit. The sums are built a chunk of pixels at a time, member by member
    (contiguous rows: the loop vectorises); numba compiles one version per weight type."""
    h_all = np.zeros((n, n_bins), np.int64)
    h_true = np.zeros((n, n_bins), np.int64)
    acc = np.empty(CHUNK, weights.dtype)
    loc = np.zeros((4, n_bins), np.int64)  # interleaved local counts, as in binned_counts
    loc_true = np.zeros(n_bins, np.int64)
    for r in range(starts.size):
        g = run_img[r]
        loc[:] = 0
        loc_true[:] = 0
        for a in range(starts[r], ends[r], CHUNK):
            size = min(CHUNK, ends[r] - a)
            acc[:size] = 0
            for j in range(members.size):
                wj = weights[j]
                row = vals[members[j], a:a + size]
                for k in range(size):
                    acc[k] += wj * row[k]
            for k in range(size):
                b = lut[_round(acc[k])]
                loc[k & 3, b] += 1
                if truth[a + k]:
                    loc_true[b] += 1
        for b in range(n_bins):
            h_all[g, b] += loc[0, b] + loc[1, b] + loc[2, b] + loc[3, b]
            h_true[g, b] += loc_true[b]
    return h_all, h_true
