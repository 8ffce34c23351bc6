import numpy as np
import pytest
import torch

from steel_ray import metric


def test_hand_computed_pairs():
    z = np.zeros((4, 4), bool)
    one = z.copy()
    one[0, 0] = True
    two = z.copy()
    two[0, :2] = True
    # empty/empty = 1, empty/non-empty = 0, 1 px false positive on empty = 0
    assert metric.dice_per_pair(z, z) == 1.0
    assert metric.dice_per_pair(one, z) == 0.0
    assert metric.dice_per_pair(z, one) == 0.0
    # |X|=1, |Y|=2, |X∩Y|=1 -> 2/3
    assert metric.dice_per_pair(one, two) == pytest.approx(2 / 3)
    assert metric.dice_per_pair(two, two) == 1.0


def test_mean_over_pairs_not_per_image():
    # 1 image x 2 classes: class 1 perfect (4 px), class 2 one FP pixel on an empty pair.
    truth = np.zeros((1, 2, 4, 4), bool)
    pred = truth.copy()
    truth[0, 0, :2, :2] = pred[0, 0, :2, :2] = True
    pred[0, 1, 3, 3] = True
    assert metric.mean_dice(pred, truth) == pytest.approx(0.5)
    # a flattened-per-image Dice would give 2*4/(5+4) = 0.888..., not the metric
    assert metric.mean_dice(pred, truth) != pytest.approx(8 / 9)


def test_torch_matches_numpy():
    rng = np.random.default_rng(0)
    truth = rng.random((5, 4, 8, 8)) < 0.1
    pred = rng.random((5, 4, 8, 8)) < 0.1
    truth[0] = False
    pred[0, :2] = False
    ref = metric.dice_per_pair(pred, truth)
    got = metric.dice_per_pair_torch(torch.from_numpy(pred), torch.from_numpy(truth)).numpy()
    np.testing.assert_allclose(got, ref)
