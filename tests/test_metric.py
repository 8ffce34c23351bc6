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


def test_threshold_uint8_is_exact_at_levels():
    p = np.arange(256, dtype=np.uint8)
    assert metric.threshold(p, 0.5).sum() == 256 - 128  # 128/255 >= 0.5 > 127/255
    assert metric.threshold(p, 128 / 255).sum() == 128
    assert metric.threshold(p, 0.0).all()
    assert not metric.threshold(p, 1.01).any()


def test_postprocess_order_and_gate():
    prob = np.zeros((2, 6, 6), np.uint8)
    prob[0, :3, :3] = 200  # area 9
    prob[1, :2, :2] = 200  # area 4
    pp = metric.PostProcess(pixel_threshold=0.5, min_area=5, cls_threshold=0.6)
    out = pp.apply(prob, cls_prob=np.array([0.9, 0.9]))
    assert out[0].sum() == 9 and out[1].sum() == 0
    out = pp.apply(prob, cls_prob=np.array([0.5, 0.9]))
    assert out.sum() == 0


def test_fill_holes():
    m = np.zeros((5, 5), bool)
    m[1:4, 1:4] = True
    m[2, 2] = False
    assert metric.fill_holes(m).sum() == 9
    assert metric.fill_holes(np.stack([m, m])).sum() == 18
