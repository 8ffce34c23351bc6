import cv2
import numpy as np
import pytest
import torch

from steel_ray import data, rle
from steel_ray.data import DataError
from steel_ray.dataset import BalancedSampler, SteelDataset, build_transforms


def _planted(tmp_path, h=64, w=256):
    """One image with a bright 6x10 mark at a known place and its class-2 mask."""
    import cv2

    img = np.full((h, w, 3), 60, np.uint8)
    img[10:16, 200:210] = 250
    folder = tmp_path / "imgs"
    folder.mkdir()
    cv2.imwrite(str(folder / "a.png"), img)
    m = np.zeros((h, w), bool)
    m[10:16, 200:210] = True
    rles = np.array([["", rle.encode(m), "", ""]], dtype=object)
    return folder, rles


def test_augmented_pair_stays_aligned(tmp_path):
    folder, rles = _planted(tmp_path)
    tf = build_transforms(train=True, crop=(32, 64), resize=(32, 128), brightness_contrast=0.0)
    ds = SteelDataset(folder, ["a.png"], rles, (64, 256), tf)
    for seed in range(25):
        torch.manual_seed(seed)
        np.random.seed(seed)
        item = ds[0]
        img, mask = item["image"], item["mask"]
        assert img.shape == (3, 32, 64) and mask.shape == (4, 32, 64)
        on = mask[1] > 0
        assert on.any(), "CropNonEmptyMaskIfExists must keep the defect"
        assert item["presence"].tolist() == [0.0, 1.0, 0.0, 0.0]
        bright = img[0] > 1.0  # normalised: background ~ -1.0, mark ~ +2.2
        # the planted mark moves with its mask (resize blurs one pixel of border)
        assert (bright & on).sum() >= 0.8 * on.sum()
        assert (bright & ~on).sum() <= 0.5 * on.sum()


def test_validation_transform_keeps_full_image(tiny_set):
    t = data.load_train(tiny_set)
    ds = SteelDataset(t.images_dir, t.image_ids, t.rles, t.shape, build_transforms(train=False))
    i = int(np.flatnonzero(t.presence.any(1))[0])
    item = ds[i]
    assert item["image"].shape == (3, 64, 256)
    np.testing.assert_array_equal(item["mask"].numpy().astype(bool), t.mask(i))


def test_wrong_size_image_named(tiny_set):
    t = data.load_train(tiny_set)
    ds = SteelDataset(t.images_dir, t.image_ids, t.rles, (32, 32))
    with pytest.raises(DataError, match=rf"{t.image_ids[0]}: image is 64x256, expected 32x32"):
        ds[0]


def test_balanced_sampler_modes():
    presence = np.zeros((100, 4), bool)
    presence[:10, 0] = True  # 10 class-1
    presence[10:12, 1] = True  # 2 class-2
    presence[12:50, 2] = True  # 38 class-3
    presence[5, 2] = True  # a class-1 + class-3 image belongs to the rarer class 1
    up = BalancedSampler(presence, "upsample", seed=1)
    idx = list(up)
    assert len(idx) == len(up) == 4 * 50  # 4 groups (no class 4) x the largest (50 empty)
    assert set(range(100)) <= set(idx)
    counts = np.bincount(idx, minlength=100)
    assert counts[10:12].sum() == 50 and counts[:10].sum() == 50
    down = list(BalancedSampler(presence, "downsample", seed=1))
    assert len(down) == 4 * 2 and len(set(down)) == 8
    w = BalancedSampler(presence, "weighted", seed=1)
    assert len(list(w)) == 100
    s = BalancedSampler(presence, "upsample", seed=1)
    s.set_epoch(3)
    assert list(s) != idx and list(BalancedSampler(presence, "upsample", seed=1)) == idx
    with pytest.raises(ValueError, match="sampler mode 'x'"):
        BalancedSampler(presence, "x")


def test_truncated_jpeg_read_quietly_names_itself(tmp_path):
    """libjpeg's own 'Premature end of JPEG file' is silenced; our warning names the file instead."""
    import subprocess
    import sys

    ok, buf = cv2.imencode(".jpg", (np.random.default_rng(0).random((64, 96, 3)) * 255).astype(np.uint8))
    path = tmp_path / "cut.jpg"
    path.write_bytes(buf.tobytes()[: len(buf) // 2])
    code = ("import logging; logging.basicConfig(level=logging.WARNING, format='%(message)s');"
            f"from steel_ray.dataset import read_image; print(read_image({str(path)!r}, (64, 96), quiet={{}}).shape)")
    loud = subprocess.run([sys.executable, "-c", code.format(False)], capture_output=True, text=True)
    quiet = subprocess.run([sys.executable, "-c", code.format(True)], capture_output=True, text=True)
    assert loud.returncode == quiet.returncode == 0 and "(64, 96, 3)" in quiet.stdout
    assert "Premature end of JPEG file" in loud.stderr  # the case really happens
    assert "Premature end" not in quiet.stderr and f"{path}: truncated JPEG" in quiet.stderr
