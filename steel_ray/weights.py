"""Pretrained encoder weights, fetched once per node: ``python -m steel_ray.weights --space SPACE``.

The cluster files run it in every node's setup: each encoder of the spaces that trains from
pretrained weights (``encoder_weights: imagenet``) is built once, which downloads its weights into
the node's cache (torch hub / Hugging Face). The outcome per (encoder, weights) is written to the
node's status file (``$STEEL_RAY_WEIGHTS_STATUS``, default ``~/.cache/steel_ray/weights.json``).

A trial that needs weights its node could not fetch then fails at once, with the setup's reason
in one line, instead of each trial retrying the download (the Hugging Face client retries for up
to a minute) and Tune retrying the trial: :func:`check` raises :class:`WeightsUnavailable`, and
the trial reports it as its error without being retried. A node whose status file does not list
an encoder tries to download it once when a trial first builds it, and records the outcome.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import socket
import sys
import time
from pathlib import Path

from .io import write_json
from .space import load_space

__all__ = ["WeightsUnavailable", "status_path", "check", "record", "unavailable", "encoders_of", "fetch", "main"]

log = logging.getLogger(__name__)


class WeightsUnavailable(RuntimeError):
    """This node cannot get an encoder's pretrained weights (one line: node, encoder, reason)."""


def status_path() -> Path:
    return Path(os.environ.get("STEEL_RAY_WEIGHTS_STATUS") or Path.home() / ".cache" / "steel_ray" / "weights.json")


def _read() -> dict:
    p = status_path()
    try:
        return json.loads(p.read_text()) if p.exists() else {}
    except (OSError, ValueError):
        return {}


def _key(encoder: str, weights: str) -> str:
    return f"{encoder}/{weights}"


def _message(encoder: str, weights: str, reason: str) -> str:
    return (f"node {socket.gethostname()} cannot get encoder_weights={weights!r} for encoder {encoder!r}: {reason} "
            f"(status {status_path()}; fetch them in the node's setup with python -m steel_ray.weights --space SPACE, "
            "or use encoder_weights: null)")


def check(encoder: str, weights: str | None) -> None:
    """Raise :class:`WeightsUnavailable` at once when this node's status file records that the
    weights could not be fetched; nothing when they were, or were never tried."""
    if not weights:
        return
    entry = _read().get(_key(encoder, weights))
    if entry is not None and not entry.get("ok"):
        raise WeightsUnavailable(_message(encoder, weights, entry.get("error", "the fetch failed")))


def record(encoder: str, weights: str, ok: bool, error: str = "") -> None:
    """Note the outcome of fetching (encoder, weights) in this node's status file."""
    status = _read()
    status[_key(encoder, weights)] = {"ok": ok, "error": error.strip().splitlines()[-1][:300] if error else "",
                                      "at": time.strftime("%Y-%m-%dT%H:%M:%S")}
    with contextlib.suppress(OSError):
        write_json(status_path(), status)


def unavailable(encoder: str, weights: str, error: BaseException) -> WeightsUnavailable:
    """Record a failed download and return the one-line error to raise."""
    reason = f"{type(error).__name__}: {str(error).strip().splitlines()[0][:300] if str(error).strip() else ''}"
    record(encoder, weights, False, reason)
    return WeightsUnavailable(_message(encoder, weights, reason))


def encoders_of(space_paths: list[str]) -> list[tuple[str, str]]:
    """The (encoder, weights) pairs the spaces can train from pretrained weights."""
    out: list[tuple[str, str]] = []
    for p in space_paths:
        sp = load_space(p)
        weights = sp.fixed.get("encoder_weights")
        choices = next((list(q.choices) for q in sp.params if q.name == "encoder"), None) or [sp.fixed.get("encoder", "resnet34")]
        wchoices = next((list(q.choices) for q in sp.params if q.name == "encoder_weights"), None) or [weights]
        for w in wchoices:
            if w and str(w).lower() not in ("none", "null"):
                out += [(str(e), str(w)) for e in choices if (str(e), str(w)) not in out]
    return out


def fetch(pairs: list[tuple[str, str]]) -> dict:
    """Build each encoder with its weights (downloading them into this node's cache); returns
    {encoder/weights: ok or the error}, also written to the status file."""
    import segmentation_models_pytorch as smp

    out = {}
    for enc, w in pairs:
        t = time.time()
        try:
            smp.encoders.get_encoder(enc, in_channels=3, depth=5, weights=w)
        except Exception as e:  # noqa: BLE001 - any failure is recorded with its reason, then reported
            err = unavailable(enc, w, e)
            out[_key(enc, w)] = str(err)
            log.error("%s", err)
            continue
        record(enc, w, True)
        out[_key(enc, w)] = "ok"
        log.info("%s %s: in the cache (%.0f s)", enc, w, time.time() - t)
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m steel_ray.weights", description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("\n\n", 1)[1])
    ap.add_argument("--space", action="append", required=True, help="search space YAML (repeatable)")
    a = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    pairs = encoders_of(a.space)
    if not pairs:
        print("no encoder in these spaces trains from pretrained weights: nothing to fetch")
        return 0
    res = fetch(pairs)
    bad = {k: v for k, v in res.items() if v != "ok"}
    print(f"{len(res) - len(bad)} of {len(res)} encoder weight set(s) in this node's cache; status: {status_path()}")
    for v in bad.values():
        print(f"  {v}")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
