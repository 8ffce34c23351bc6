import numpy as np
import pytest

from steel_ray import data, synth


def test_same_seed_byte_identical_csvs(tmp_path):
    a = synth.generate(tmp_path / "a", n_train=12, n_test=3, height=32, width=160, seed=5)
    b = synth.generate(tmp_path / "b", n_train=12, n_test=3, height=32, width=160, seed=5)
    c = synth.generate(tmp_path / "c", n_train=12, n_test=3, height=32, width=160, seed=6)
    for name in ("train.csv", "test_labels.csv"):
        assert (a / name).read_bytes() == (b / name).read_bytes()
    assert (a / "train.csv").read_bytes() != (c / "train.csv").read_bytes()


def test_layout_shapes_and_no_overlap(tiny_set):
    t = data.load_train(tiny_set)
    assert t.shape == (64, 256)
    for i in range(len(t.image_ids)):
        assert t.mask(i).sum(axis=0).max() <= 1  # classes never overlap
    test = data.load_train(tiny_set, "test_labels.csv", "test_images")
    assert test.label_format == "old" and len(test.image_ids) == 6


def test_class_frequencies_close_to_severstal(tmp_path):
    # statistics only: no images are encoded
    n = 1500
    ss = np.random.SeedSequence(0).spawn(n)
    pres = np.array([synth.render(s, 32, 200)[1].any(axis=(1, 2)) for s in ss])
    empty = (~pres.any(1)).mean()
    assert abs(empty - 0.47) < 0.05
    freq = pres.mean(0)
    np.testing.assert_allclose(freq, [0.071, 0.020, 0.41, 0.064], atol=0.035)
    assert freq[2] == freq.max() and freq[1] == freq.min()


def test_refuses_to_overwrite(tiny_set):
    with pytest.raises(FileExistsError, match="--overwrite"):
        synth.generate(tiny_set, n_train=2, n_test=1, height=32, width=64)


def test_cli(tmp_path, capsys):
    assert synth.main([str(tmp_path / "s"), "--n-train", "4", "--n-test", "2", "--height", "32", "--width", "96"]) == 0
    assert (tmp_path / "s" / "train.csv").exists() and len(list((tmp_path / "s" / "test_images").glob("*.jpg"))) == 2
    assert synth.main([str(tmp_path / "s"), "--n-train", "4"]) == 2


def test_cli_refuses_empty_training_set_before_writing(tmp_path, capsys):
    assert synth.main([str(tmp_path / "z"), "--n-train", "0"]) == 2
    assert "n_train >= 1" in capsys.readouterr().err and not (tmp_path / "z").exists()
