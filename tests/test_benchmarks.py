"""The GPU check script runs on CPU-only machines in --dry-run mode (no GPU in CI, ever)."""
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _dry(script: Path):
    return subprocess.run(["bash", str(script), "--dry-run"], capture_output=True, text=True, cwd=ROOT,
                          env={"PATH": "/usr/bin:/bin", "PY": sys.executable})


def test_gpu_check_dry_run_parses_every_command():
    r = _dry(ROOT / "benchmarks" / "gpu_check.sh")
    assert r.returncode == 0, r.stdout + r.stderr
    assert r.stdout.count("ok: ") == 4 and "done (dry run)" in r.stdout


def test_gpu_check_dry_run_catches_an_unknown_option(tmp_path):
    bad = tmp_path / "benchmarks" / "gpu_check.sh"
    bad.parent.mkdir()
    text = (ROOT / "benchmarks" / "gpu_check.sh").read_text().replace("--gpus-per-trial 0.5", "--gpus-per-trail 0.5")
    bad.write_text(text.replace('cd "$(dirname "$0")/.."', f'cd "{ROOT}"'))
    r = _dry(bad)
    assert r.returncode != 0 and "option --gpus-per-trail is not accepted" in r.stdout, r.stdout + r.stderr


def test_bench_blend_runs_small_and_its_three_searches_agree():
    """bench_blend end to end on a small generated pool: the streamed blend runs, the reader's
    counters reach the parent from the workers, and the fast, dense and kernel searches agree
    (the script asserts identical tables)."""
    r = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_blend.py"), "--images", "60", "--models", "3",
                        "--subset", "6", "--kernel-points", "2", "--density", "3", "--haze", "0.02"],
                       capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert r.returncode == 0, r.stdout + r.stderr
    out = r.stdout
    assert "fair: exact dense" in out and "naive kernel" in out and "reproduce:" in out
    assert "4 passes over the generated maps" in out  # counted on the 2 worker processes
    kept = float(out.split("full resolution: kept ")[1].split("%")[0])
    assert 1.5 < kept < 10, kept  # the haze (2% of every image) is in it


def test_bench_value_scores_each_move_on_the_same_holdout_images(tiny_set, tmp_path):
    """bench_value on a tiny searched run with a holdout: each row's holdout numbers are the
    variants' own holdout scores, its gain their difference on the same images, and every variant
    is a recorded look at the holdout."""
    import json

    import numpy as np
    import pytest

    from steel_ray import blend
    from steel_ray.config import TrialConfig
    from steel_ray.train import fit_fold, prepare_run

    sys.path.insert(0, str(ROOT / "benchmarks"))
    import bench_value

    # the paired bootstrap: a constant difference has no spread; +1 on half the images and -1 on the other half is 0
    assert bench_value.paired(np.full(7, 0.9), np.full(7, 0.4), 100) == pytest.approx((0.5, 0.5, 0.5))
    m, lo, hi = bench_value.paired(np.r_[np.ones(20), np.zeros(20)], np.r_[np.zeros(20), np.ones(20)], 2000)
    assert m == 0 and -0.45 < lo < -0.15 and 0.15 < hi < 0.45
    run = tmp_path / "run"
    data = prepare_run(tiny_set, run, 2, holdout=0.25)
    for cfg in ({"encoder": "tu-test_resnet", "epochs": 1, "batch_size": 8, "lr": 3e-3},
                {"arch": "FPN", "encoder": "tu-test_efficientnet", "epochs": 1, "batch_size": 8, "lr": 3e-3}):
        for k in range(2):
            fit_fold(TrialConfig.from_dict(cfg), k, data, run, progress=False)
    own = blend.blend_run(run, max_members=2, nested=False)
    r = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_value.py"), "--run", str(run), "--boot", "200",
                        "--versus", str(run)],
                       capture_output=True, text=True, cwd=ROOT, timeout=900)
    assert r.returncode == 0, r.stdout + r.stderr
    rows = {line.split(" | ")[0][2:]: line.strip("| ").split(" | ") for line in r.stdout.splitlines()
            if line.startswith("| ") and not line.startswith("| move")}
    ens = rows["ensemble vs best single"]
    docs = {p.parent.name: json.loads(p.read_text()) for p in (run / "value").glob("*/blend.json")}
    assert set(docs) == {"default", "best_single", "fill_holes", "argmax"}  # no classifiers in this pool
    # the default re-blend is the run's own blend: the same holdout score
    assert docs["default"]["scores"]["holdout"] == pytest.approx(own["scores"]["holdout"])
    assert float(ens[3]) == pytest.approx(docs["default"]["scores"]["holdout"], abs=5e-5)
    assert float(ens[4]) == pytest.approx(docs["best_single"]["scores"]["holdout"], abs=5e-5)
    assert float(ens[5].split()[0]) == pytest.approx(float(ens[3]) - float(ens[4]), abs=1.5e-4)
    assert float(ens[6]) == pytest.approx(docs["default"]["scores"]["nested"] - docs["best_single"]["scores"]["nested"], abs=5e-5)
    versus = rows["complete-by single vs complete-by single"]  # the run against itself: its own blend, no new look
    assert versus[3] == versus[4] and versus[5] == "+0.0000 [+0.0000, +0.0000]" and f"--versus {run}" in r.stdout
    looks = json.loads((run / "holdout.json").read_text())["looks"]
    assert len(looks) == 1 + 4 and all("bench_value" in x["command"] for x in looks[1:])
