"""Mask overlays: the drawing (known pixels), the blend's OOF masks (their mean Dice is the blend's
in-sample score), the report's Masks section and the overlay CLI on real images."""
import json

import cv2
import numpy as np
import pandas as pd
import pytest
from blend_pools import blob_noise_model, make_truth, signal_model, write_run
from test_predict import tiny_run  # noqa: F401 -- the module fixture: a real 2-model, 2-fold run, blended

from steel_ray import blend, overlay, rle

GREEN, MAGENTA = overlay.TRUTH_BGR, overlay.PRED_BGR


def _rect(shape, r0, r1, c0, c1):
    m = np.zeros(shape, bool)
    m[r0:r1, c0:c1] = True
    return m


def test_draw_puts_each_outline_on_its_mask_border_and_nothing_inside():
    img = np.full((64, 256, 3), 120, np.uint8)
    truth, pred = _rect((64, 256), 10, 30, 20, 60), _rect((64, 256), 20, 40, 40, 100)
    out = overlay.draw(img, truth, pred, "x class 1, Dice 0.200")
    band = out.shape[0] - 64
    assert out.shape[1] == 256 and band > 0
    body = out[band:]
    assert tuple(body[10, 30]) == GREEN and tuple(body[29, 25]) == GREEN  # the truth's top and bottom edges
    assert tuple(body[39, 70]) == MAGENTA and tuple(body[25, 99]) == MAGENTA  # the prediction's bottom and right edges
    assert tuple(body[15, 30]) == (120, 120, 120) and tuple(body[50, 150]) == (120, 120, 120)  # inside / outside: untouched
    coloured = np.all(body == GREEN, -1) | np.all(body == MAGENTA, -1)
    border = (truth ^ cv2.erode(truth.astype(np.uint8), np.ones((3, 3), np.uint8)).astype(bool)) | \
             (pred ^ cv2.erode(pred.astype(np.uint8), np.ones((3, 3), np.uint8)).astype(bool))
    assert np.array_equal(coloured, border)  # one-pixel outlines exactly on the masks' borders
    assert body[:, :, :].shape == (64, 256, 3) and out[:band].max() == 255  # the caption is written in the band
    small = overlay.draw(np.full((256, 1600), 90, np.uint8), None, _rect((256, 1600), 0, 10, 0, 10), "c", max_width=800)
    assert small.shape[1] == 800  # scaled to the page


def test_oof_masks_score_the_blends_in_sample_and_examples_are_the_extremes(tmp_path):
    """A planted pool (a signal model and a blob-noise one, real Parquet): the blend's rule applied
    pair by pair to the OOF maps gives back the blend's in-sample score, and each example kind is
    the extreme it names."""
    rng = np.random.default_rng(1)
    masks = make_truth(rng, n=60, shape=(32, 64))
    write_run(tmp_path, masks, {"a_signal": signal_model(rng, masks, 0.35, 0.65), "b_blobs": blob_noise_model(rng, masks)})
    doc = blend.blend_run(tmp_path, nested=False)
    pairs = overlay.oof_pairs(tmp_path, doc)
    assert doc["scores"]["in_sample"] > doc["scores"]["all_empty"] + 0.02  # the blend predicts defects
    assert pairs.dice.mean() == pytest.approx(doc["scores"]["in_sample"], abs=1e-12)
    assert pairs.fp.sum() > 0 and pairs.fn.sum() > 0  # it both over-predicts and misses: every kind has examples
    for c in range(4):
        picks = overlay.pick_examples(pairs, c, per_kind=2)
        rows = [i for _, i in picks]
        assert len(rows) == len(set(rows))  # an image once
        kinds = {k: [i for kk, i in picks if kk == k] for k in ("largest false positive", "largest miss", "typical hit")}
        if pairs.fp[:, c].max() > 0:
            assert pairs.fp[kinds["largest false positive"][0], c] == pairs.fp[:, c].max()
        if pairs.fn[:, c].max() > 0:
            assert max(pairs.fn[i, c] for i in kinds["largest miss"]) == pairs.fn[:, c].max()
        hits = np.flatnonzero((pairs.truth.areas[:, c] > 0) & (pairs.pred_area[:, c] > 0))
        for i in kinds["typical hit"]:
            assert i in hits
    # the report's Masks section says so when the training images are not at hand (no search state here)
    assert "Training images not found" in overlay.report_section(tmp_path, doc, tmp_path / "blend" / "blend.json")


def test_overlay_cli_draws_a_submission_against_the_truth_with_hand_computed_dice(tiny_run, tiny_set, tmp_path):  # noqa: F811
    run, _ = tiny_run
    names = sorted(p.name for p in (tiny_set / "train_images").iterdir())[:2]
    shape = (64, 256)
    truth, pred = _rect(shape, 10, 30, 20, 60), _rect(shape, 20, 40, 40, 100)
    pd.DataFrame({"ImageId": [names[0], names[1]], "ClassId": [2, 3],
                  "EncodedPixels": [rle.encode(truth), rle.encode(truth)]}).to_csv(tmp_path / "truth.csv", index=False)
    pd.DataFrame({"ImageId": [names[0], names[1]], "ClassId": [2, 4],
                  "EncodedPixels": [rle.encode(pred), rle.encode(pred)]}).to_csv(tmp_path / "sub.csv", index=False)
    images = tmp_path / "images"
    images.mkdir()
    for n in names:
        (images / n).write_bytes((tiny_set / "train_images" / n).read_bytes())
    out = tmp_path / "overlays"
    rc = overlay.main(["--run", str(run), "--images", str(images), "--truth", str(tmp_path / "truth.csv"),
                       "--submission", str(tmp_path / "sub.csv"), "--out", str(out)])
    assert rc == 0
    index = pd.read_csv(out / "overlays.csv")
    stem0, stem1 = (n.rsplit(".", 1)[0] for n in names)
    # worst Dice first: the missed class 3 and the predicted-but-false class 4 (0), then the overlap (0.2)
    assert list(index.dice) == [0.0, 0.0, 0.2]
    assert set(index.file[:2]) == {f"{stem1}_class3.png", f"{stem1}_class4.png"} and index.file[2] == f"{stem0}_class2.png"
    # hand count: truth 20x40 = 800 px, prediction 20x60 = 1200 px, overlap 10x20 = 200 -> 2*200/2000 = 0.2
    assert tuple(index.iloc[2][["true_pixels", "predicted_pixels"]]) == (800, 1200)
    png = cv2.imread(str(out / f"{stem0}_class2.png"))
    body = png[png.shape[0] - 64:]
    assert tuple(body[10, 30]) == GREEN and tuple(body[39, 70]) == MAGENTA
    only = overlay.main(["--run", str(run), "--images", str(images), "--submission", str(tmp_path / "sub.csv"),
                         "--out", str(tmp_path / "c4"), "--class", "4"])
    assert only == 0 and list(pd.read_csv(tmp_path / "c4" / "overlays.csv").file) == [f"{stem1}_class4.png"]


def test_overlay_cli_predicts_with_a_blend_exactly_as_predict_does(tiny_run, tiny_set, tmp_path, capsys):  # noqa: F811
    """The run's 1-epoch blend predicts nothing; a copy with the lowest pixel threshold and no min
    area or gate predicts masks everywhere the maps are above 0: the CLI draws those, largest
    first, with the pixel counts of predict's own submission for the same blend."""
    from steel_ray import predict

    run, _ = tiny_run
    doc = json.loads((run / "blend" / "blend.json").read_text())
    for pp in doc["postprocess"].values():
        pp.update(pixel_threshold=1 / 255, min_area=0.0, cls_threshold=0.0)
    bj = tmp_path / "blend.json"
    bj.write_text(json.dumps(doc))
    images, out = tiny_set / "test_images", tmp_path / "pred"
    assert overlay.main(["--run", str(run), "--blend", str(bj), "--images", str(images), "--out", str(out), "--max", "5"]) == 0
    index = pd.read_csv(out / "overlays.csv")
    assert len(index) == 5 and index.gate.between(0, 1).all() and index.dice.isna().all()
    assert list(index.predicted_pixels) == sorted(index.predicted_pixels, reverse=True)  # largest mask first
    predict.predict_folder(bj, images, tmp_path / "sub.csv", workers=0)
    sub = pd.read_csv(tmp_path / "sub.csv", keep_default_na=False)
    area = {(i, int(c)): rle.area(e) for i, c, e in zip(sub.ImageId, sub.ClassId, sub.EncodedPixels)}
    assert [area[(i, c)] for i, c in zip(index.image_id, index["class"])] == list(index.predicted_pixels)
    assert all((out / f).exists() for f in index.file)
    assert overlay.main(["--run", str(tmp_path), "--images", str(images)]) == 2
    assert "blend.json not found" in capsys.readouterr().err
