"""What the console shows: our progress and results; everything else goes to a log file in the run.

``setup(run_dir, verbose)`` sends the ``steel_ray`` loggers (INFO) to the console and every
logger (ours, Ray's, warnings, third-party) to ``RUN/logs/<name>.log``; ``verbose=True`` shows
everything on the console too. Progress is :func:`progress`: a :mod:`tqdm` bar on a terminal,
a plain line every few percent when stderr is a pipe or a file (CI logs, ``| tee``).
"""
from __future__ import annotations

import contextlib
import logging
import signal
import sys
import threading
import time
from pathlib import Path

from .run import logs_dir

__all__ = ["setup", "log_dir", "route_ray_logs", "sigterm_as_exit", "progress", "LineProgress"]

_FMT = "%(asctime)s %(name)s %(levelname)s %(message)s"
_CONSOLE_FMT = "%(asctime)s %(message)s"


class _OursOnly(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        # a failed trial's traceback (Ray logs it) is in the log file; our summary names the error
        return record.name.startswith("steel_ray")


def log_dir(run_dir) -> Path:
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


class LineProgress:
    """The bar's stand-in off a terminal: one plain line on stderr each time another ``step``
    fraction of the total is done, at most one per ``min_interval`` seconds, and one at the end;
    never a carriage return.

    Only the calls the project makes on a tqdm bar: ``update``, ``set_postfix_str``, ``close``,
    iteration, and ``n`` / ``total``.
    """

    def __init__(self, iterable=None, total=None, desc: str = "", unit: str = "it", step: float = 0.1, file=None,
                 min_interval: float = 5.0, **_):
        self.iterable, self.desc, self.unit, self.step, self.min_interval = iterable, desc, unit, step, min_interval
        self.total = total if total is not None else (len(iterable) if hasattr(iterable, "__len__") else None)
        self.n, self.n_start, self.postfix, self.file = 0, 0, "", file or sys.stderr
        self._t0, self._last, self._closed, self._printed = time.monotonic(), -1, False, None

    def __iter__(self):
        for x in self.iterable:
            yield x
            self.update(1)
        self.close()

    def set_postfix_str(self, s: str = "", refresh: bool = True) -> None:
        self.postfix = s

    def update(self, n: int = 1) -> None:
        self.n += n
        if self.total:
            mark = int(self.n / self.total / self.step)
            now = time.monotonic()
            # a new step of the total, and not within min_interval of the last line (a 1-second
            # loop prints its final line only)
            if mark > self._last and self.n < self.total and now - (self._printed or self._t0) >= self.min_interval:
                self._last = mark
                self._line()

    def _line(self) -> None:
        el = time.monotonic() - self._t0
        if self.total:
            done = self.n - self.n_start  # items counted before this run (a resume) carry no rate
            eta = f", ETA {el / done * (self.total - self.n):.0f} s" if done > 0 and self.n < self.total else ""
            head = f"{self.desc}: {self.n}/{self.total} {self.unit} ({100 * self.n / self.total:.0f}%)"
        else:
            eta, head = "", f"{self.desc}: {self.n} {self.unit}"
        print(f"{head}, {el:.0f} s{eta}" + (f"; {self.postfix}" if self.postfix else ""), file=self.file, flush=True)
        self._printed = time.monotonic()

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            if self.n:
                self._line()


def progress(iterable=None, total=None, desc: str = "", unit: str = "it", leave: bool = True, enabled: bool = True, **kw):
    """A progress display on stderr: a tqdm bar on a terminal, :class:`LineProgress` lines otherwise
    (``enabled=False``: nothing at all, e.g. inside a trial whose log is a file)."""
    from tqdm import tqdm

    if not enabled:
        return tqdm(iterable, total=total, disable=True)
    if sys.stderr.isatty():
        return tqdm(iterable, total=total, desc=desc, unit=unit, leave=leave, file=sys.stderr, dynamic_ncols=True, **kw)
    return LineProgress(iterable, total=total, desc=desc, unit=unit)
