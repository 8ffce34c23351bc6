"""RLE decode/encode throughput on Severstal-sized masks vs the common public-kernel code.

Run:  .venv/bin/python benchmarks/bench_rle.py [--n 300]

The baseline is the widely copied Kaggle kernel pair (a Python loop over runs for decode,
``np.where`` + string join for encode), run in the same process on the same masks.
"""
from __future__ import annotations

import argparse
import time

import numpy as np

from steel_ray import rle, synth


def kernel_decode(mask_rle: str, shape=(256, 1600)):
    s = mask_rle.split()
    starts, lengths = [np.asarray(x, dtype=int) for x in (s[0:][::2], s[1:][::2])]
    starts -= 1
    ends = starts + lengths
    img = np.zeros(shape[0] * shape[1], dtype=np.uint8)
    for lo, hi in zip(starts, ends):
        img[lo:hi] = 1
    return img.reshape(shape[1], shape[0]).T


def kernel_encode(img):
    pixels = img.T.flatten()
    pixels = np.concatenate([[0], pixels, [0]])
    runs = np.where(pixels[1:] != pixels[:-1])[0] + 1
    runs[1::2] -= runs[::2]
    return " ".join(str(x) for x in runs)


def _time(fn, items, repeat=7):
    best = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        for x in items:
            fn(x)
        best = min(best, time.perf_counter() - t0)
    return len(items) / best


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=300, help="number of non-empty masks")
    a = ap.parse_args()
    shape = (256, 1600)
    masks = []
    for ss in np.random.SeedSequence(0).spawn(a.n * 3):
        m = synth.render(ss, *shape)[1]
        masks += [x for x in m if x.any()]
        if len(masks) >= a.n:
            break
    masks = masks[: a.n]
    strings = [rle.encode(m) for m in masks]
    assert all((kernel_decode(s) == rle.decode(s, shape)).all() for s in strings[:20])
    assert all(kernel_encode(m.astype(np.uint8)) == s for m, s in zip(masks[:20], strings[:20]))
    runs = np.mean([len(s.split()) // 2 for s in strings])
    rows = [
        ("decode", _time(kernel_decode, strings), _time(lambda s: rle.decode(s, shape), strings)),
        ("encode", _time(kernel_encode, [m.astype(np.uint8) for m in masks]), _time(rle.encode, masks)),
    ]
    print(f"{len(masks)} Severstal-sized masks (256x1600), {runs:.0f} runs per mask on average")
    print(f"{'op':8}{'kernel masks/s':>16}{'steel_ray masks/s':>20}{'ratio':>8}")
    for name, base, ours in rows:
        print(f"{name:8}{base:16.0f}{ours:20.0f}{ours / base:8.1f}x")
    print("reproduce: .venv/bin/python benchmarks/bench_rle.py --n", a.n)


if __name__ == "__main__":
    main()
