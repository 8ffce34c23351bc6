"""Atomic file output: write to a temporary file beside the target, then rename over it.

A crash mid-write leaves the old file (or nothing) at the target path, never half a file.
"""
from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path

__all__ = ["atomic_path", "atomic_write_text", "atomic_write_bytes", "write_json"]


@contextlib.contextmanager
def atomic_path(path: str | Path, suffix: str = ".tmp"):
    """Yield a temporary path in the target's folder; rename it to ``path`` on success.

    The temporary name starts with a dot, so globs such as ``*.parquet`` never see it.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=suffix, dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        # mkstemp makes the file 0600; the output gets the mode a normal file gets under the umask
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def write_json(path: str | Path, obj, indent: int | None = 1) -> None:
    """Strict JSON, atomically: NaN and infinities are refused (write ``None`` for "no value"),
    so every parser, in any language, reads what the project writes."""
    import json

    atomic_write_text(path, json.dumps(obj, indent=indent, allow_nan=False))
