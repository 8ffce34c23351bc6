"""Shared fixtures: tiny synthetic Severstal-layout sets (real JPEGs, real CSVs)."""
from __future__ import annotations

import pytest

from steel_ray import synth


@pytest.fixture(scope="session")
def tiny_set(tmp_path_factory):
    """48 train + 6 test images at 64x256 (about 1 s to generate)."""
    out = tmp_path_factory.mktemp("synth") / "tiny"
    synth.generate(out, n_train=48, n_test=6, height=64, width=256, seed=3)
    return out
