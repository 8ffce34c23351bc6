"""How far the suite's learning tests pass when the float paths change (another CPU model).

Usage::

    .venv/bin/python benchmarks/bench_test_margins.py [--cases classifier,demo,asha] [--seeds 0,1,2] [--quick]

Each learning test asserts that a tiny model learns (a classifier's AUC, the demo settings'
post-processed Dice over all-empty, ASHA's good trial over its weak one). CPU float results
differ between processor models (vector width, BLAS and oneDNN kernels), so a threshold tuned
on one machine can fail on another. This runs the core of each test in a fresh process under
each variation of what changes the float paths here: torch threads (1, 2),
``ATEN_CPU_CAPABILITY`` (avx512 / avx2 / default = no vector kernels), ``ONEDNN_MAX_CPU_ISA``
(AVX2: the convolution kernels of a CPU without AVX-512, e.g. AMD EPYC before Zen 4), and the
data seed, then prints each test's metric, its minimum and the margin over the test's threshold.
"""
from __future__ import annotations

import argparse
import itertools
import json
import os
import subprocess
import sys
import tempfile
import time

# (name, env): the float-path variations
VARIANTS = [
    ("avx512, 2 threads", {"ATEN_CPU_CAPABILITY": "avx512"}, 2),
    ("avx512, 1 thread", {"ATEN_CPU_CAPABILITY": "avx512"}, 1),
    ("avx2 + oneDNN AVX2, 2 threads", {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2"}, 2),
    ("avx2 + oneDNN AVX2, 1 thread", {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2"}, 1),
    ("no vector kernels + oneDNN SSE4.1, 2 threads", {"ATEN_CPU_CAPABILITY": "default", "ONEDNN_MAX_CPU_ISA": "SSE41"}, 2),
]

# the learning tests' cores; each prints one JSON line {"metric": value, ...}
CHILD = r'''
import json, sys, tempfile
from pathlib import Path
import torch
case, seed, threads = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
torch.set_num_threads(threads)
sys.path.insert(0, "tests")
from learning_cases import CASES
print(json.dumps(CASES[case](Path(tempfile.mkdtemp()), seed)))
'''


def run_case(case: str, seed: int, env: dict, threads: int) -> dict:
    e = {**os.environ, **env, "OMP_NUM_THREADS": str(threads)}
    t0 = time.time()
    r = subprocess.run([sys.executable, "-c", CHILD, case, str(seed), str(threads)], capture_output=True, text=True, env=e)
    if r.returncode:
        return {"error": r.stderr.strip().splitlines()[-1] if r.stderr.strip() else f"exit {r.returncode}"}
    out = json.loads(r.stdout.strip().splitlines()[-1])
    out["s"] = round(time.time() - t0, 1)
    return out


def main(argv=None) -> int:
    sys.path.insert(0, "tests")
    from learning_cases import CASES, THRESHOLDS

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cases", default=",".join(CASES), help=f"comma list of {list(CASES)}")
    ap.add_argument("--seeds", default="0,1,2", help="data seeds (the tests use the first)")
    ap.add_argument("--quick", action="store_true", help="only the first and third variations")
    a = ap.parse_args(argv)
    variants = [VARIANTS[0], VARIANTS[2]] if a.quick else VARIANTS
    seeds = [int(s) for s in a.seeds.split(",")]
    rows = []
    for case in a.cases.split(","):
        for (vname, env, threads), seed in itertools.product(variants, seeds):
            res = run_case(case, seed, env, threads)
            rows.append((case, vname, seed, res))
            print(f"{case:11} {vname:44} seed {seed}: {res}", file=sys.stderr, flush=True)
    print("\n| test | metric | threshold | min | median | max | min margin | runs |\n|---|---|---|---|---|---|---|---|")
    for case in a.cases.split(","):
        for metric, thr in THRESHOLDS[case].items():
            vals = sorted(r[metric] for c, _, _, r in rows if c == case and metric in r)
            if not vals:
                continue
            print(f"| {case} | {metric} | > {thr} | {vals[0]:.4f} | {vals[len(vals) // 2]:.4f} | {vals[-1]:.4f} | "
                  f"{vals[0] - thr:+.4f} | {len(vals)} |")
    print(f"\nreproduce: {sys.executable} benchmarks/bench_test_margins.py --cases {a.cases} --seeds {a.seeds}"
          + (" --quick" if a.quick else ""))
    return 0


if __name__ == "__main__":
    with tempfile.TemporaryDirectory():
        sys.exit(main())
