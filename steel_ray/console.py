"""What the console shows: our progress and results; everything else goes to a log file in the run.

``setup(run_dir, verbose)`` sends the ``steel_ray`` loggers (INFO) to the console and every
logger (ours, Ray's, warnings, third-party) to ``RUN/logs/<name>.log``; ``verbose=True`` shows
everything on the console too. Progress bars are :mod:`tqdm` bars on stderr.
"""
from __future__ import annotations

import contextlib
import logging
import signal
import sys
import threading
from pathlib import Path

__all__ = ["setup", "log_dir", "route_ray_logs", "sigterm_as_exit"]

_FMT = "%(asctime)s %(name)s %(levelname)s %(message)s"
_CONSOLE_FMT = "%(asctime)s %(message)s"


class _OursOnly(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        # a failed trial's traceback (Ray logs it) is in the log file; our summary names the error
        return record.name.startswith("steel_ray")


def log_dir(run_dir) -> Path:
    from .run import logs_dir

    return logs_dir(run_dir)


def setup(run_dir=None, verbose: bool = False, name: str = "run") -> Path | None:
    """Configure the root logger once per process; returns the log file (None without a run)."""
    root = logging.getLogger()
    for h in list(root.handlers):
        if getattr(h, "_steel_ray", False):
            root.removeHandler(h)
            h.close()
    root.setLevel(logging.INFO)
    console = logging.StreamHandler(sys.stderr)
    console.setFormatter(logging.Formatter(_CONSOLE_FMT, datefmt="%H:%M:%S"))
    if not verbose:
        console.addFilter(_OursOnly())
    console._steel_ray = True  # type: ignore[attr-defined]
    root.addHandler(console)
    logging.captureWarnings(True)
    path = None
    if run_dir is not None:
        path = log_dir(run_dir) / f"{name}.log"
        path.parent.mkdir(parents=True, exist_ok=True)
        fh = logging.FileHandler(path)
        fh.setFormatter(logging.Formatter(_FMT))
        fh._steel_ray = True  # type: ignore[attr-defined]
        root.addHandler(fh)
    route_ray_logs()
    return path


def route_ray_logs() -> None:
    """Ray gives its loggers console handlers of their own (at import and at ``ray.init``):
    remove them so that Ray's records reach the run's log file through ours. Call again
    after ``ray.init``."""
    for lname in ("ray", "ray.tune", "ray.train", "ray.data", "ray.air"):
        lg = logging.getLogger(lname)
        for h in list(lg.handlers):
            lg.removeHandler(h)
        lg.propagate = True


@contextlib.contextmanager
def sigterm_as_exit():
    """Within the block, SIGTERM raises SystemExit(143) like Ctrl-C raises KeyboardInterrupt, so
    ``with``/``finally`` clean-ups (worker pools, an embedded Ray) run instead of leaving orphans."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def _exit(signum, frame):
        raise SystemExit(128 + signum)

    old = signal.signal(signal.SIGTERM, _exit)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, old)
