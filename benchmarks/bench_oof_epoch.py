"""oof_epoch best vs last: does the epoch choice flatter the nested estimate? Nested vs holdout, per policy.

Run:  .venv/bin/python benchmarks/bench_oof_epoch.py [--sets 0,7] [--out runs/oof_epoch]

For each synthetic set (the demo's generator settings, 160 train + 40 test images at 128x800,
with the given seeds; seed 0 is the demo's own set) and each policy, the demo's search runs
as ``make demo`` runs it (its two spaces, 3 folds, 20% holdout, 2 trials at a time), with
``oof_epoch`` fixed in both spaces: ``best`` keeps each fold's epoch with the best post-processed
Dice on that same fold, ``last`` keeps the last epoch (no choice made on the fold's labels). The
table gives, per set and policy: the blend's nested estimate, the holdout score with its 95%
interval, the gap nested - holdout, and the all-empty scores beside them. ASHA's stop decisions
depend on timing, so the two policies may complete different configs: read the table per set,
beside its all-empty scores.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import yaml

SPACES = ["search_spaces/demo.yaml", "search_spaces/demo_classifier.yaml"]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sets", default="0,7", help="generator seeds, comma-separated (0: the demo's set)")
    ap.add_argument("--policies", default="best,last")
    ap.add_argument("--out", default="runs/oof_epoch")
    a = ap.parse_args(argv)
    out = Path(a.out)
    rows = []
    for seed in map(int, a.sets.split(",")):
        data = Path("data") / ("demo" if seed == 0 else f"demo_seed{seed}")
        if not (data / "train.csv").exists():
            subprocess.run([sys.executable, "-m", "steel_ray.synth", str(data), "--n-train", "160", "--n-test", "40",
                            "--height", "128", "--width", "800", "--seed", str(seed)], check=True)
        for policy in a.policies.split(","):
            run = out / f"seed{seed}-{policy}"
            spaces = out / "spaces" / policy
            spaces.mkdir(parents=True, exist_ok=True)
            paths = []
            for sp in SPACES:  # the same file names: the same experiment names as the demo
                doc = yaml.safe_load(Path(sp).read_text())
                doc["fixed"] = {**doc.get("fixed", {}), "oof_epoch": policy}
                (spaces / Path(sp).name).write_text(yaml.safe_dump(doc, sort_keys=False))
                paths += ["--space", str(spaces / Path(sp).name)]
            if not (run / "blend" / "blend.json").exists():
                cmd = [sys.executable, "-m", "steel_ray.search", *paths, "--data", str(data), "--out", str(run), "--folds", "3",
                       "--holdout", "0.2", "--max-concurrent", "2"]
                if run.exists():
                    cmd.append("--resume")
                print("$", " ".join(cmd), flush=True)
                subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
            b = json.loads((run / "blend" / "blend.json").read_text())
            s, h = b["scores"], b["holdout"]
            rows.append((seed, policy, s["nested"], s["all_empty"], s["best_single"], s["holdout"], h["ci95"], h["all_empty"],
                         len(b["members"])))
    print("| set (seed) | oof_epoch | nested | all-empty (OOF) | best single | holdout [95% CI] | all-empty (holdout) "
          "| nested - holdout | members |")
    print("|---|---|---|---|---|---|---|---|---|")
    for seed, pol, n, ae, bs, ho, ci, hae, m in rows:
        print(f"| {seed} | {pol} | {n:.4f} | {ae:.4f} | {bs:.4f} | {ho:.4f} [{ci[0]:.4f}, {ci[1]:.4f}] | {hae:.4f} "
              f"| {n - ho:+.4f} | {m} |")
    print(f"reproduce: .venv/bin/python benchmarks/bench_oof_epoch.py --sets {a.sets} --policies {a.policies} --out {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
