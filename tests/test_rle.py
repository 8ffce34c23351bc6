import numpy as np
import pytest

from steel_ray import rle

KAGGLE = "373611 89 373826 185 374041 226 374276 247 374532 248 374788 248 375045 247"


def test_known_kaggle_string_roundtrip():
    m = rle.decode(KAGGLE, (256, 1600))
    assert m.shape == (256, 1600) and m.dtype == bool
    assert m.sum() == 89 + 185 + 226 + 247 + 248 + 248 + 247
    # pixel 373611 (1-indexed, column-major) -> index 373610 -> column 1459, row 106
    assert m[373610 % 256, 373610 // 256]
    assert not m[(373610 - 1) % 256, (373610 - 1) // 256]
    assert rle.encode(m) == KAGGLE
    assert rle.area(KAGGLE) == m.sum()


def test_pixel_numbering_is_column_major_one_indexed():
    shape = (256, 1600)
    assert np.argwhere(rle.decode("1 1", shape)).tolist() == [[0, 0]]
    assert np.argwhere(rle.decode("2 1", shape)).tolist() == [[1, 0]]
    assert np.argwhere(rle.decode("257 1", shape)).tolist() == [[0, 1]]
    last = rle.decode(f"{256 * 1600} 1", shape)
    assert last[255, 1599] and last.sum() == 1


@pytest.mark.parametrize("shape", [(1, 1), (3, 5), (64, 256), (256, 1600)])
@pytest.mark.parametrize("density", [0.0, 0.01, 0.5, 0.99, 1.0])
def test_random_roundtrip(shape, density):
    rng = np.random.default_rng(hash((shape, density)) % 2**32)
    m = rng.random(shape) < density
    s = rle.encode(m)
    np.testing.assert_array_equal(rle.decode(s, shape), m)
    if density == 0.0:
        assert s == ""
    if density == 1.0:
        assert s == f"1 {shape[0] * shape[1]}"


def test_empty_inputs():
    for e in ("", "  ", None, float("nan")):
        assert not rle.decode(e, (4, 4)).any()
        assert rle.area(e) == 0


def test_touching_runs_decode():
    m = rle.decode("1 2 3 2", (2, 3))
    assert m.sum() == 4 and rle.encode(m) == "1 4"


@pytest.mark.parametrize(
    "bad, msg",
    [
        ("1 2 3", "odd number"),
        ("1 x", "not an integer"),
        ("1.5 2", "not an integer"),
        ("0 2", "start 0 < 1"),
        ("1 0", "length 0 < 1"),
        ("1 -3", "length -3 < 1"),
        ("1_0 2", "not an integer"),
        ("10 2 3 2", "unsorted"),
        ("1 5 3 2", "overlapping"),
        ("15 3", "past the end"),
    ],
)
def test_invalid_rle_raises(bad, msg):
    with pytest.raises(ValueError, match=msg):
        rle.decode(bad, (4, 4))


def test_encode_rejects_3d():
    with pytest.raises(ValueError, match="2-D"):
        rle.encode(np.zeros((2, 2, 2)))
