"""Inference on Ray's workers: images per second with 1 and 2 CPU workers, against this process.

Run:  .venv/bin/python benchmarks/bench_infer.py --run runs/demo --images data/demo/test_images [--repeat 2]

The run's blend predicts the images (the submission path, every fold model of every member) three
ways in one process: in this process without Ray (the baseline), then on an embedded Ray (2 CPUs)
with 1 and with 2 workers of 1 CPU each (torch 1 thread each; the baseline also gets 1 thread,
so that the ratio is the workers' and not torch's own threading). Each way's time includes
loading the models (per worker) and starting its actors; the submissions are compared byte for
byte. The table gives seconds, images/s and the ratio to 1 worker.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

import torch

from steel_ray import predict
from steel_ray.data import list_images


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--run", default="runs/demo")
    ap.add_argument("--images", default="data/demo/test_images")
    ap.add_argument("--repeat", type=int, default=2, help="copies of the image list (more images per worker)")
    ap.add_argument("--shard-size", type=int, default=8)
    a = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    import ray

    blend_path = Path(a.run) / "blend" / "blend.json"
    doc = json.loads(blend_path.read_text())
    paths = [Path(a.images) / n for n in list_images(a.images)] * a.repeat
    shape = tuple(doc["image_shape"])
    n_models = sum(len(m["checkpoints"]) for m in doc["members"] + doc.get("classifiers", []))
    torch.set_num_threads(1)
    rows, out = [], {}
    t = time.perf_counter()
    out["in process"] = predict.predict_rows(doc, paths, shape, blend_path, workers=0, progress=False)
    rows.append(("in process (no Ray), 1 thread", 0, time.perf_counter() - t))
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        for w in (1, 2):
            t = time.perf_counter()
            out[w] = predict.predict_rows(doc, paths, shape, blend_path, workers=w, cpus_per_task=1, gpus_per_task=0,
                                          shard_size=a.shard_size, progress=False)
            rows.append((f"Ray, {w} worker(s) x 1 CPU", w, time.perf_counter() - t))
    finally:
        ray.shutdown()
    same = all(v == out["in process"] for v in out.values())
    one = next(s for _, w, s in rows if w == 1)
    print(f"{len(paths)} images {shape[0]}x{shape[1]}, {len(doc['members'])} member(s), {n_models} fold model(s); "
          f"{torch.__version__}, {torch.get_num_threads()} thread(s) in this process")
    print("| path | seconds | images/s | vs 1 worker |\n|---|---|---|---|")
    for name, _, s in rows:
        print(f"| {name} | {s:.1f} | {len(paths) / s:.2f} | {one / s:.2f}x |")
    print(f"submissions identical: {same}")
    print(f"reproduce: .venv/bin/python benchmarks/bench_infer.py --run {a.run} --images {a.images} --repeat {a.repeat}")
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
