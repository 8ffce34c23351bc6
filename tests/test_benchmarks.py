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
