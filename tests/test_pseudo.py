"""Pseudo-labelling rounds on a tiny search run (real Ray, real JPEGs), and the training split they feed."""
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest

from steel_ray import oof, rle
from steel_ray.data import load_labelled
from steel_ray.train import prepare_run, train_dataset


def _run(mod, *args):
    return subprocess.run([sys.executable, "-m", f"steel_ray.{mod}", *map(str, args)], capture_output=True, text=True)


@pytest.fixture(scope="module")
def parent(tiny_set, tmp_path_factory):
    root = tmp_path_factory.mktemp("pseudo")
    space = root / "space.yaml"
    space.write_text("fixed: {batch_size: 8, epochs: 2, tta: none, arch: FPN, encoder: tu-test_resnet, lr: 3.0e-3, "
                     "aux_weight: 0.2, sampler: upsample}\nparams:\n  decoder_width: {type: categorical, choices: [64]}\n")
    run = root / "r0"
    r = _run("search", "--space", space, "--data", tiny_set, "--out", run, "--folds", 2, "--num-samples", 1, "--top", 1,
             "--holdout", 0.25)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return run


def test_round_trains_on_pseudo_images_without_ever_validating_on_them(parent, tiny_set, tmp_path):
    out = tmp_path / "r1"
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    r = _run("pseudo", "--run", parent, "--images", tiny_set / "test_images", "--out", out, "--min-confidence", 0.5,
             "--mlflow", uri)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    _round_in_mlflow(uri, parent, out)
    assert "pseudo-labelling round 1" in r.stdout and "round 0" in r.stdout and "holdout (the one to trust)" in r.stdout
    images = pd.read_csv(out / "pseudo" / "images.csv")
    assert sorted(images.image_id) == sorted(p.name for p in (tiny_set / "test_images").iterdir())
    kept = set(images[images.kept].image_id)
    assert kept and (images[images.kept].confidence >= 0.5).all() and (images[~images.kept].confidence < 0.5).all()
    labels = pd.read_csv(out / "pseudo" / "labels.csv", keep_default_na=False, dtype=str)
    assert list(labels.columns) == ["ImageId", "EncodedPixels", "ClassId"] and set(labels.ImageId) == kept
    for s in labels.EncodedPixels:
        rle.decode(s, (64, 256))
    # same folds as the parent; the pseudo images are in no fold table, truth table or OOF file
    assert pd.read_csv(out / "folds.csv").equals(pd.read_csv(parent / "folds.csv"))
    assert not kept & set(oof.read_truth(out).image_ids)
    for mid, folds in oof.list_pool(out).items():
        for f in folds:
            assert not kept & set(pq.read_table(oof.oof_path(out, mid, f), columns=["image_id"]).column("image_id").to_pylist())
    doc = json.loads((out / "blend" / "blend.json").read_text())
    assert doc["pseudo"]["parent"] == str(parent.resolve()) and doc["pseudo"]["n_images"] == len(kept)
    assert "Pseudo-labelling round 1" in (out / "blend" / "report.md").read_text()
    parent_models = {m["model_id"] for m in json.loads((parent / "blend" / "blend.json").read_text())["members"]}
    assert set(json.loads((out / "search.json").read_text())["selected_models"]) == parent_models
    _each_fold_trained_on_its_own_fold_models_labels(parent, tiny_set, out)


def _round_in_mlflow(uri, parent, out):
    """--mlflow on a round: its own experiment (the round's run id), the round's search run with its
    parent and cut-off as params, one child run per retraining trial, its blend with the scores."""
    from mlflow.tracking import MlflowClient

    state = json.loads((out / "search.json").read_text())
    client = MlflowClient(tracking_uri=uri)
    exp = client.get_experiment_by_name(state["run_id"])
    runs = client.search_runs([exp.experiment_id])
    search = [x for x in runs if x.data.tags.get("role") == "search"]
    assert len(search) == 1 and search[0].data.params["pseudo.parent"] == str(parent.resolve())
    assert search[0].data.params["pseudo.min_confidence"] == "0.5" and search[0].data.params["pseudo.round"] == "1"
    table = pd.read_parquet(out / "results.parquet")
    trials = [x for x in runs if x.data.tags.get("stage") == "complete"]
    assert sorted(x.data.tags["ray_trial_id"] for x in trials) == sorted(table.trial_id)
    blend = [x for x in runs if x.data.tags.get("role") == "blend"]
    doc = json.loads((out / "blend" / "blend.json").read_text())
    assert len(blend) == 1 and blend[0].data.metrics["score.nested"] == pytest.approx(doc["scores"]["nested"])


def _each_fold_trained_on_its_own_fold_models_labels(parent, tiny_set, out):
    """Fold k's pseudo labels are those of the parent's fold-k models alone (which never trained on
    fold k's labels): recomputed here from those models, they match RUN/pseudo/images_fold<k>.csv
    image by image, and differ from the whole blend's (so labels from every fold's models, fold k's
    own included, would fail this); fold k's training split holds exactly labels_fold<k>.csv."""
    from steel_ray import pseudo
    from steel_ray.dataset import build_transforms

    state = json.loads((out / "search.json").read_text())["pseudo"]
    pdoc = json.loads((parent / "blend" / "blend.json").read_text())
    paths = sorted((tiny_set / "test_images").iterdir())
    whole = pd.read_csv(out / "pseudo" / "images.csv").set_index("image_id").confidence
    data = prepare_run(tiny_set, out, 2, holdout=0.25, pseudo=state)
    differs = 0
    for k in range(2):
        mine = pd.read_csv(out / "pseudo" / f"images_fold{k}.csv").set_index("image_id")
        rows, labels = pseudo.label_images(pseudo.fold_doc(pdoc, k), parent / "blend" / "blend.json", paths, (64, 256),
                                           min_confidence=0.5)
        assert [r["confidence"] for r in rows] == mine.confidence.loc[[p.name for p in paths]].tolist()
        differs += int((mine.confidence.loc[whole.index] != whole).sum())
        kept = pd.read_csv(out / "pseudo" / f"labels_fold{k}.csv", keep_default_na=False, dtype=str)
        assert set(kept.ImageId) == set(labels) == set(mine[mine.kept].index)
        ds, _ = train_dataset(data, k, build_transforms(False))
        assert len(ds) == int((data.folds != k).sum()) + len(labels)
        # the search itself handed fold k's labels to fold k's trials: every OOF file of the round says so
        for mid in oof.list_pool(out):
            meta = oof.read_meta(oof.oof_path(out, mid, k))
            assert (meta["n_pseudo_images"], meta["n_train_images"]) == (len(labels), int((data.folds != k).sum())), mid
        if labels:  # a fold whose models keep no image trains without pseudo labels (not with the whole blend's)
            assert state["labels_by_fold"][str(k)] == str(out / "pseudo" / f"labels_fold{k}.csv")
            assert sorted(data.extra_for(k).image_ids) == sorted(labels)
        else:
            assert str(k) not in state["labels_by_fold"] and data.extra_for(k) is None
    assert differs > 0  # the per-fold labels are not the whole blend's
    doc = json.loads((out / "blend" / "blend.json").read_text())
    assert any(c.startswith("pseudo labels per fold") for c in doc["scores_include"]["nested"])


def test_pseudo_images_reach_every_training_split_with_their_masks(tiny_set, tmp_path):
    from steel_ray.dataset import build_transforms

    src = tiny_set / "test_images"
    names = sorted(p.name for p in src.iterdir())[:3]
    mask = np.zeros((64, 256), bool)
    mask[10:20, 30:90] = True
    lab = tmp_path / "labels.csv"
    lab.write_text("ImageId,EncodedPixels,ClassId\n" + "".join(
        f"{n},{rle.encode(mask) if (n == names[0] and c == 3) else ''},{c}\n" for n in names for c in (1, 2, 3, 4)))
    data = prepare_run(tiny_set, tmp_path / "run", 3, pseudo={"labels": lab, "images": src})
    assert data.extra.image_ids == names
    for fold in range(3):
        ds, presence = train_dataset(data, fold, build_transforms(False))
        n_train = int((data.folds != fold).sum())
        assert len(ds) == n_train + 3 and presence.shape == (n_train + 3, 4)
        item = ds[n_train + names.index(names[0])]
        assert item["mask"].shape == (4, 64, 256) and np.array_equal(item["mask"][2].numpy() > 0.5, mask)
        assert item["mask"][[0, 1, 3]].sum() == 0 and presence[n_train].tolist() == [False, False, True, False]
    assert load_labelled(lab, src).rles[0, 2] == rle.encode(mask)


def test_training_images_and_other_sizes_are_refused(parent, tiny_set, tmp_path):
    r = _run("pseudo", "--run", parent, "--images", tiny_set / "train_images", "--out", tmp_path / "x")
    assert r.returncode == 2 and "also a training image" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    # a folder of the run's holdout images alone: refused as holdout images (not as training ones)
    held = json.loads((parent / "holdout.json").read_text())["image_ids"]
    only_held = tmp_path / "held"
    only_held.mkdir()
    for i in held:
        shutil.copy(tiny_set / "train_images" / i, only_held / i)
    r = _run("pseudo", "--run", parent, "--images", only_held, "--out", tmp_path / "z")
    assert r.returncode == 2 and f"also a holdout image of {parent} ({len(held)} holdout image(s)" in r.stderr, r.stderr
    assert "training image" not in r.stderr and len(r.stderr.strip().splitlines()) == 1
    from steel_ray import synth

    other = tmp_path / "other"
    synth.generate(other, n_train=2, n_test=2, height=32, width=128, seed=9)
    r = _run("pseudo", "--run", parent, "--images", other / "test_images", "--out", tmp_path / "y")
    assert r.returncode == 2 and "the run's 64x256" in r.stderr, r.stderr
    shutil.rmtree(other)


def test_image_confidence_by_hand():
    from steel_ray.predict import Prediction
    from steel_ray.pseudo import image_confidence

    masks = np.zeros((4, 4, 8), bool)
    blended = np.zeros((4, 4, 8), np.uint8)
    masks[1, :2, :2] = True
    blended[1, :2, :2] = [[255, 204], [204, 153]]  # mean 204 / 255 = 0.8
    gate = np.array([0.1, 0.9, 0.3, 0.05])
    conf, per_class = image_confidence(Prediction("x.jpg", masks, blended, gate))
    # empty classes: 1 - presence; the mask: min(presence 0.9, mean pixel 0.8)
    np.testing.assert_allclose(per_class, [0.9, 0.8, 0.7, 0.95])
    assert conf == pytest.approx(0.7)
    # agreement (1st place): the gate's presence for a kept mask, 1 - presence for an empty class
    conf, per_class = image_confidence(Prediction("x.jpg", masks, blended, gate), "agreement")
    np.testing.assert_allclose(per_class, [0.9, 0.9, 0.7, 0.95])
    # a confident gate that the mask contradicts (presence 0.97, no mask) makes the image unsure
    disagree = np.array([0.01, 0.98, 0.97, 0.02])
    conf, per_class = image_confidence(Prediction("x.jpg", masks, blended, disagree), "agreement")
    np.testing.assert_allclose(per_class, [0.99, 0.98, 0.03, 0.98])
    agree = np.array([0.01, 0.98, 0.04, 0.02])
    assert image_confidence(Prediction("x.jpg", masks, blended, agree), "agreement")[0] == pytest.approx(0.96)


def test_max_images_keeps_the_most_confident(parent, tiny_set):
    from steel_ray import pseudo

    doc = json.loads((parent / "blend" / "blend.json").read_text())
    paths = sorted((tiny_set / "test_images").iterdir())
    rows, labels = pseudo.label_images(doc, parent / "blend" / "blend.json", paths, (64, 256), min_confidence=0.0, max_images=2)
    assert len(rows) == len(paths) and len(labels) == 2 and sum(r["kept"] for r in rows) == 2
    conf = sorted((r["confidence"] for r in rows), reverse=True)
    assert sorted(r["confidence"] for r in rows if r["kept"]) == sorted(conf[:2])
    for rles in labels.values():
        assert len(rles) == 4 and all(rle.decode(s, (64, 256)).shape == (64, 256) for s in rles)


def test_select_agreement_reaches_the_labelling_workers(parent, tiny_set):
    """label_images(select="agreement") measures each class as image_confidence(..., "agreement"):
    an empty class as in the default (1 - presence), a kept mask by its presence alone (at least
    the default's min(presence, mean pixel)); the image by its least confident class."""
    from steel_ray import pseudo

    doc = json.loads((parent / "blend" / "blend.json").read_text())
    for pp in doc["postprocess"].values():  # masks wherever a map is above 0: kept masks to measure
        pp.update(pixel_threshold=1 / 255, min_area=0.0, cls_threshold=0.0)
    paths = sorted((tiny_set / "test_images").iterdir())
    bj = parent / "blend" / "blend.json"
    plain, _ = pseudo.label_images(doc, bj, paths, (64, 256), min_confidence=0.0)
    agree, _ = pseudo.label_images(doc, bj, paths, (64, 256), min_confidence=0.0, select="agreement")
    for p, a in zip(plain, agree):
        for c in range(1, 5):
            if p[f"class_{c}"]:
                assert a[f"confidence_{c}"] >= p[f"confidence_{c}"]
            else:
                assert a[f"confidence_{c}"] == p[f"confidence_{c}"]
        assert a["confidence"] == min(a[f"confidence_{c}"] for c in range(1, 5))
    assert any(a[f"confidence_{c}"] > p[f"confidence_{c}"] for p, a in zip(plain, agree) for c in range(1, 5))


def test_members_blend_or_top_k(parent):
    from steel_ray import pseudo
    from steel_ray.config import TrialConfig

    doc = json.loads((parent / "blend" / "blend.json").read_text())
    blend_ids = [m["model_id"] for m in doc["members"]]
    assert [TrialConfig.from_dict(c).model_id() for c in pseudo._member_configs(parent, doc, ["blend"])] == blend_ids
    best = max(doc["single_models_cross_fitted"], key=doc["single_models_cross_fitted"].get)
    assert [TrialConfig.from_dict(c).model_id() for c in pseudo._member_configs(parent, doc, ["top", "1"])] == [best]


def test_top_k_takes_the_k_best_single_models_in_order(tmp_path):
    """Three models with distinct cross-fitted scores (the parent fixture has one, where any order
    passes): top 2 is the best two, best first, then the blend's classifiers."""
    from steel_ray import pseudo
    from steel_ray import run as layout
    from steel_ray.config import TrialConfig

    cfgs = {lr: TrialConfig.from_dict({"encoder": "tu-test_resnet", "lr": lr}).to_dict() for lr in (1e-3, 2e-3, 3e-3)}
    cls = TrialConfig.from_dict({"encoder": "tu-test_resnet", "task": "classify"}).to_dict()
    ids = {lr: TrialConfig.from_dict(c).model_id() for lr, c in cfgs.items()}
    for c in [*cfgs.values(), cls]:
        d = layout.checkpoint_dir(tmp_path, TrialConfig.from_dict(c).model_id(), 0)
        d.mkdir(parents=True)
        (d / "config.json").write_text(json.dumps(c))
    doc = {"members": [{"model_id": ids[1e-3]}], "classifiers": [{"model_id": TrialConfig.from_dict(cls).model_id()}],
           "single_models_cross_fitted": {ids[1e-3]: 0.80, ids[2e-3]: 0.90, ids[3e-3]: 0.85}}
    got = [TrialConfig.from_dict(c).model_id() for c in pseudo._member_configs(tmp_path, doc, ["top", "2"])]
    assert got == [ids[2e-3], ids[3e-3], TrialConfig.from_dict(cls).model_id()]
    with pytest.raises(SystemExit):
        pseudo._args(["--run", "r", "--out", "o", "--members", "top"])


def test_bench_pseudo_oof_labels_are_what_the_fold_models_label(parent, tiny_set):
    """benchmarks/bench_pseudo.py labels each training image from the OOF pool (fast: no model run);
    brute force: the parent's fold-k models, run on fold k's images through the pseudo round's own
    path, give the same confidences and labels."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    import bench_pseudo

    from steel_ray import pseudo

    doc = json.loads((parent / "blend" / "blend.json").read_text())
    ids, conf, labels, truth, shape = bench_pseudo.oof_labels(parent, doc)
    folds = oof.read_truth(parent).folds
    order = {i: n for n, i in enumerate(oof.read_truth(parent).image_ids)}
    for k in (0, 1):
        mine = [n for n, i in enumerate(ids) if folds[order[i]] == k][:4]
        rows, kept = pseudo.label_images(pseudo.fold_doc(doc, k), parent / "blend" / "blend.json",
                                         [tiny_set / "train_images" / ids[n] for n in mine], shape, min_confidence=0.5)
        assert [r["confidence"] for r in rows] == [round(float(conf[n]), 6) for n in mine]
        assert kept == {ids[n]: list(labels[n]) for n in mine if conf[n] >= 0.5}
    assert truth.shape == labels.shape == (len(ids), 4) and (conf >= 0).all()


def test_select_agreement_defaults_to_the_first_place_cut_off():
    from steel_ray import pseudo

    base = ["--run", "r", "--images", "i", "--out", "o"]
    assert (pseudo._args(base).select, pseudo._args(base).min_confidence) == ("confidence", pseudo.DEFAULT_MIN_CONFIDENCE)
    a = pseudo._args(base + ["--select", "agreement"])
    assert (a.select, a.min_confidence) == ("agreement", 0.95)
    assert pseudo._args(base + ["--select", "agreement", "--min-confidence", "0.9"]).min_confidence == 0.9
