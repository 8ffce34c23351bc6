"""Learning curves: val Dice per class next to the all-empty score, by optimizer steps and wall time.

Run:  .venv/bin/python benchmarks/bench_learning.py [--steps 240] [--checkpoints 4] \
          [--variant NAME:key=value,key=value ...] [--data data/demo] [--n-train 160 --height 128 --width 800]

Trains each variant (the demo space's fixed settings and first point, overridden by the
variant's keys) on fold 0 of 3 of a synthetic set for ``--steps`` optimizer steps, evaluated
``--checkpoints`` times (an epoch = steps / checkpoints optimizer steps), one CPU thread per run,
as a demo trial gets. Prints, per checkpoint, the competition Dice of the fold at threshold 0.5
(no post-processing), after the per-class post-processing search on the fold (``pp``, what the
search ranks by), and the all-empty score of the same pairs, overall and per class (c1..c4 at
threshold 0.5 beside e1..e4, their all-empty values).
"""
from __future__ import annotations

import argparse
import logging
import tempfile
import time
from pathlib import Path

import torch
import yaml

from steel_ray import synth
from steel_ray.config import TrialConfig, parse_set
from steel_ray.train import fit_fold, prepare_run

ROOT = Path(__file__).resolve().parents[1]


def demo_base() -> dict:
    """The demo space's fixed keys plus its first point to evaluate (the demo's reference trial)."""
    sp = yaml.safe_load((ROOT / "search_spaces" / "demo.yaml").read_text())
    base = dict(sp.get("fixed", {}))
    base.update((sp.get("points_to_evaluate") or [{}])[0])
    return base


def curve(cfg: TrialConfig, data, run: Path) -> list[dict]:
    rows, t0 = [], time.time()

    def report(m):
        rows.append({**m, "wall_s": time.time() - t0})

    res = fit_fold(cfg, 0, data, run, report=report, write_oof=False, progress=False)
    if len(rows) < len(res.history):  # the last epoch is reported after the (skipped) OOF
        rows.append({**res.history[-1], "wall_s": time.time() - t0})
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=240, help="optimizer steps per variant")
    ap.add_argument("--checkpoints", type=int, default=4, help="evaluations per variant (epochs)")
    ap.add_argument("--variant", action="append", default=[], metavar="NAME:k=v,k=v",
                    help="a config to train (repeatable); default: the demo's reference trial")
    ap.add_argument("--data", help="existing Severstal-layout folder (default: generate one)")
    ap.add_argument("--n-train", type=int, default=160)
    ap.add_argument("--height", type=int, default=128)
    ap.add_argument("--width", type=int, default=800)
    ap.add_argument("--threads", type=int, default=1)
    a = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(a.threads)
    tmp = Path(tempfile.mkdtemp(prefix="bench_learning_"))
    data_dir = Path(a.data) if a.data else synth.generate(tmp / "data", a.n_train, 1, a.height, a.width, seed=0)
    variants = a.variant or ["demo:"]
    base = demo_base()
    spe = max(1, a.steps // a.checkpoints)
    table = []
    for v in variants:
        name, _, sets = v.partition(":")
        flat = {**base, **parse_set([s for s in sets.split(",") if s])}
        flat.update(epochs=a.checkpoints, steps_per_epoch=spe)
        cfg = TrialConfig.from_dict(flat)
        data = prepare_run(data_dir, tmp / f"run_{name}", 3)
        print(f"\n{name}: {sets or '(demo reference trial)'}", flush=True)
        print(f"{'step':>6}{'wall s':>8}{'val_dice':>10}{'pp':>8}{'empty':>8}" + "".join(f"{'c' + str(c):>8}{'e' + str(c):>7}" for c in range(1, 5)))
        for r in curve(cfg, data, tmp / f"run_{name}"):
            print(f"{r['epoch'] * spe:6d}{r['wall_s']:8.0f}{r['val_dice']:10.4f}{r['val_dice_pp']:8.4f}{r['val_all_empty']:8.4f}"
                  + "".join(f"{r[f'val_dice_{c}']:8.4f}{r[f'val_all_empty_{c}']:7.3f}" for c in range(1, 5)), flush=True)
            table.append((name, r))
    best = max(table, key=lambda t: t[1]["val_dice_pp"])
    print(f"\nbest: {best[0]} at step {best[1]['epoch'] * spe}: post-processed val Dice {best[1]['val_dice_pp']:.4f} vs all-empty "
          f"{best[1]['val_all_empty']:.4f} ({best[1]['val_dice_pp'] - best[1]['val_all_empty']:+.4f})")
    cmd = " ".join(f"--variant '{v}'" for v in a.variant)
    data_arg = f"--data {a.data}" if a.data else f"--n-train {a.n_train} --height {a.height} --width {a.width}"
    print(f"reproduce: .venv/bin/python benchmarks/bench_learning.py --steps {a.steps} --checkpoints {a.checkpoints} {data_arg} {cmd}")


if __name__ == "__main__":
    main()
