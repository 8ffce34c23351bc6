import subprocess
import sys

import pandas as pd

from steel_ray import score


def _run(*args):
    return subprocess.run([sys.executable, "-m", "steel_ray.score", *args], capture_output=True, text=True)


def test_self_score_is_one(tiny_set):
    r = _run("--truth", str(tiny_set / "train.csv"), "--pred", str(tiny_set / "train.csv"), "--images", str(tiny_set / "train_images"))
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("score 1.000000")


def test_old_and_new_format_same_score(tiny_set, tmp_path):
    truth = tiny_set / "test_labels.csv"  # old format, every pair
    old = pd.read_csv(truth, keep_default_na=False)
    parts = old.ImageId_ClassId.str.rsplit("_", n=1, expand=True)
    img, cls = parts[0], parts[1]
    new = pd.DataFrame({"ImageId": img, "EncodedPixels": old.EncodedPixels, "ClassId": cls})
    new = new[new.EncodedPixels != ""]
    # drop one mask: the score must fall below 1 identically for both formats
    new.iloc[1:].to_csv(tmp_path / "new.csv", index=False)
    dropped = new.iloc[0]
    old_sub = old[old.ImageId_ClassId != f"{dropped.ImageId}_{dropped.ClassId}"]
    old_sub.to_csv(tmp_path / "old.csv", index=False)
    a = _run("--truth", str(truth), "--pred", str(tmp_path / "new.csv"), "--height", "64", "--width", "256")
    b = _run("--truth", str(truth), "--pred", str(tmp_path / "old.csv"), "--images", str(tiny_set / "test_images"))
    assert a.returncode == 0 and b.returncode == 0, a.stderr + b.stderr
    n_pairs = 6 * 4
    expected = f"score {(n_pairs - 1) / n_pairs:.6f}"
    assert a.stdout.splitlines()[0].startswith(expected) and b.stdout.splitlines()[0].startswith(expected)
    # beside it, the all-empty score of the same truth: the share of pairs without a mask
    n_empty = int((old.EncodedPixels == "").sum())
    assert f"all-empty {n_empty / n_pairs:.6f}" in a.stdout.splitlines()[0]


def test_all_empty_submission_scores_the_all_empty_value(tiny_set, tmp_path):
    pd.DataFrame({"ImageId": [], "EncodedPixels": [], "ClassId": []}).to_csv(tmp_path / "empty.csv", index=False)
    r = _run("--truth", str(tiny_set / "test_labels.csv"), "--pred", str(tmp_path / "empty.csv"),
             "--images", str(tiny_set / "test_images"))
    assert r.returncode == 0, r.stderr
    first = r.stdout.splitlines()[0].split()
    assert first[0] == "score" and first[2] == "all-empty" and first[1] == first[3] and first[4] == "(+0.000000)"


def test_errors_one_line_no_traceback(tiny_set, tmp_path):
    bad = tmp_path / "bad.csv"
    bad.write_text("ImageId,EncodedPixels,ClassId\nunknown.jpg,1 3,1\n")
    r = _run("--truth", str(tiny_set / "test_labels.csv"), "--pred", str(bad), "--height", "64", "--width", "256")
    assert r.returncode == 2
    assert "bad.csv, line 2: image unknown.jpg is not in the truth set" in r.stderr
    assert "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1
    r = _run("--truth", str(tiny_set / "train.csv"), "--pred", str(tiny_set / "train.csv"))
    assert r.returncode == 2 and "pass --images" in r.stderr
    img = pd.read_csv(tiny_set / "test_labels.csv").ImageId_ClassId[0].rsplit("_", 1)[0]
    bad.write_text(f"ImageId,EncodedPixels,ClassId\n{img},1 3 5,1\n")
    r = _run("--truth", str(tiny_set / "test_labels.csv"), "--pred", str(bad), "--height", "64", "--width", "256")
    assert r.returncode == 2 and "bad.csv, line 2: RLE has an odd number" in r.stderr
    bad.write_text(f"ImageId,EncodedPixels,ClassId\n{img},,2\n{img},16380 10,1\n")  # runs past 64*256 pixels
    r = _run("--truth", str(tiny_set / "test_labels.csv"), "--pred", str(bad), "--height", "64", "--width", "256")
    assert r.returncode == 2 and f"bad.csv, line 3 (image {img}, class 1):" in r.stderr, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1


def test_pair_dice_known_value():
    import numpy as np

    truth = np.array([["1 4", "", "", ""]], dtype=object)
    pred = np.array([["3 4", "", "1 1", ""]], dtype=object)
    d = score.pair_dice(truth, pred, (4, 4))
    # class 1: |T|=4 (px 1-4), |P|=4 (px 3-6), overlap 2 -> 0.5; class 3: FP -> 0
    assert d.tolist() == [[0.5, 1.0, 0.0, 1.0]]
