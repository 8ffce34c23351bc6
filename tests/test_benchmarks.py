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
