import numpy as np
import pandas as pd
import pytest

from steel_ray import data
from steel_ray.data import DataError


def _copy_set(src, dst, csv_text=None):
    import shutil

    shutil.copytree(src, dst)
    if csv_text is not None:
        (dst / "train.csv").write_text(csv_text)
    return dst


def test_load_new_and_old_format_agree(tiny_set, tmp_path):
    new = data.load_train(tiny_set)
    assert new.shape == (64, 256) and len(new.image_ids) == 48 and new.label_format == "new"
    df = pd.read_csv(tiny_set / "train.csv", keep_default_na=False)
    rows = []
    for img in new.image_ids:
        for c in range(1, 5):
            m = df[(df.ImageId == img) & (df.ClassId == c)]
            rows.append((f"{img}_{c}", m.EncodedPixels.iloc[0] if len(m) else ""))
    old_csv = pd.DataFrame(rows, columns=["ImageId_ClassId", "EncodedPixels"]).to_csv(index=False)
    old = data.load_train(_copy_set(tiny_set, tmp_path / "old", old_csv))
    assert old.label_format == "old"
    assert old.image_ids == new.image_ids
    assert (old.rles == new.rles).all()


def test_image_without_rows_is_defect_free(tiny_set):
    t = data.load_train(tiny_set)
    df = pd.read_csv(tiny_set / "train.csv")
    listed = set(df.ImageId)
    for i, img in enumerate(t.image_ids):
        assert t.presence[i].any() == (img in listed)


@pytest.mark.parametrize(
    "row, msg",
    [
        ("nothere.jpg,1,1 5", r"line 2: image nothere.jpg is not in"),
        ("{img},5,1 5", r"line 2: ClassId '5' is outside 1..4"),
        ("{img},1,1 5 3", r"line 2: RLE has an odd number"),
        ("{img},1,16380 10", r"line 2 \(image \w+\.jpg, class 1\): .*past the end of a 64x256 image"),
    ],
)
def test_bad_rows_name_file_and_row(tiny_set, tmp_path, row, msg):
    img = sorted(p.name for p in (tiny_set / "train_images").iterdir())[0]
    d = _copy_set(tiny_set, tmp_path / "bad", "ImageId,ClassId,EncodedPixels\n" + row.format(img=img) + "\n")
    with pytest.raises(DataError, match=msg) as e:
        data.load_train(d)
    assert "train.csv" in str(e.value)


def test_conflicting_duplicates(tiny_set, tmp_path):
    img = sorted(p.name for p in (tiny_set / "train_images").iterdir())[0]
    csv = f"ImageId,ClassId,EncodedPixels\n{img},1,1 5\n{img},1,1 5\n{img},2,1 5\n{img},2,10 5\n"
    d = _copy_set(tiny_set, tmp_path / "dup", csv)
    with pytest.raises(DataError, match="lines 4 and 5: conflicting masks"):
        data.load_train(d)


def test_corrupt_and_mixed_size_images(tiny_set, tmp_path):
    import cv2

    d = _copy_set(tiny_set, tmp_path / "corrupt")
    (d / "train_images" / "zzzzzzzzz.jpg").write_bytes(b"not a jpeg")
    with pytest.raises(DataError, match="zzzzzzzzz.jpg: unreadable or corrupt"):
        data.load_train(d)
    d2 = _copy_set(tiny_set, tmp_path / "mixed")
    cv2.imwrite(str(d2 / "train_images" / "zzzzzzzzz.jpg"), np.zeros((32, 256, 3), np.uint8))
    with pytest.raises(DataError, match="zzzzzzzzz.jpg: image is 32x256 but"):
        data.load_train(d2)


def test_unknown_header(tmp_path):
    p = tmp_path / "x.csv"
    p.write_text("a,b\n1,2\n")
    with pytest.raises(DataError, match="unknown header"):
        data.read_labels(p)


def test_folds_balanced_and_deterministic():
    rng = np.random.default_rng(0)
    n = 600
    presence = np.zeros((n, 4), bool)
    for c, p in enumerate([0.07, 0.02, 0.41, 0.064]):
        presence[:, c] = rng.random(n) < p
    for k in (3, 5):
        f = data.make_folds(presence, k, seed=7)
        assert set(f) == set(range(k))
        labels = np.concatenate([presence, ~presence.any(1, keepdims=True)], 1)
        for c in range(5):
            counts = np.bincount(f[labels[:, c]], minlength=k)
            assert counts.max() - counts.min() <= 1, (k, c, counts)
        np.testing.assert_array_equal(f, data.make_folds(presence, k, seed=7))
    assert not np.array_equal(data.make_folds(presence, 5, 1), data.make_folds(presence, 5, 2))


def test_write_folds(tmp_path):
    data.write_folds(tmp_path / "folds.csv", ["a.jpg", "b.jpg"], [0, 1])
    df = pd.read_csv(tmp_path / "folds.csv")
    assert df.to_dict("list") == {"image_id": ["a.jpg", "b.jpg"], "fold": [0, 1]}
    assert len(data.folds_hash(["a.jpg"], [0])) == 16
