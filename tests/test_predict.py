import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from steel_ray import blend, oof, predict, rle
from steel_ray.config import TrialConfig
from steel_ray.train import fit_fold, prepare_run


@pytest.fixture(scope="module")
def tiny_run(tiny_set, tmp_path_factory):
    run = tmp_path_factory.mktemp("predrun")
    data = prepare_run(tiny_set, run, 2)
    for cfg in ({"encoder": "tu-test_resnet", "epochs": 1, "batch_size": 8, "tta": "hflip", "lr": 3e-3, "aux_weight": 0.1},
                {"arch": "FPN", "encoder": "tu-test_efficientnet", "epochs": 1, "batch_size": 8, "tta": "none", "lr": 3e-3,
                 "resize_height": 32, "resize_width": 128}):
        for k in range(2):
            fit_fold(TrialConfig.from_dict(cfg), k, data, run, progress=False)
    assert blend.main(["--run", str(run), "--max-members", "3", "--no-nested"]) == 0
    return run, data


def _predict(*args):
    return subprocess.run([sys.executable, "-m", "steel_ray.predict", *map(str, args)], capture_output=True, text=True)


@pytest.mark.parametrize("fmt", ["new", "old"])
def test_every_pair_once_with_valid_rle(tiny_run, tiny_set, tmp_path, fmt):
    run, _ = tiny_run
    out = tmp_path / "sub.csv"
    # the new format through the CLI's default path (an embedded Ray's workers), the old one in process
    r = _predict("--run", run, "--images", tiny_set / "test_images", "--out", out, "--format", fmt,
                 *(["--workers", 0] if fmt == "old" else []))
    assert ("on Ray's workers" in r.stdout) == (fmt == "new"), r.stdout
    assert r.returncode == 0, r.stderr[-3000:]
    df = pd.read_csv(out, keep_default_na=False, dtype=str)
    images = sorted(p.name for p in (tiny_set / "test_images").iterdir())
    if fmt == "new":
        assert list(df.columns) == ["ImageId", "EncodedPixels", "ClassId"]
        keys = list(zip(df.ImageId, df.ClassId))
    else:
        assert list(df.columns) == ["ImageId_ClassId", "EncodedPixels"]
        keys = [tuple(k.rsplit("_", 1)) for k in df.ImageId_ClassId]
    assert sorted(keys) == sorted((i, str(c)) for i in images for c in range(1, 5))
    for s in df.EncodedPixels:
        rle.decode(s, (64, 256))  # valid for the image size (raises otherwise)
    r = subprocess.run([sys.executable, "-m", "steel_ray.score", "--truth", str(tiny_set / "test_labels.csv"),
                        "--pred", str(out), "--images", str(tiny_set / "test_images")], capture_output=True, text=True)
    assert r.returncode == 0 and r.stdout.startswith("score ")


def test_fold_models_reproduce_stored_oof(tiny_run):
    run, data = tiny_run
    doc = json.loads((run / "blend" / "blend.json").read_text())
    members = predict.load_members(doc, "blend.json", torch.device("cpu"))
    ts = data.train
    for m, spec in zip(members, doc["members"]):
        for k in range(2):
            single = predict.Member(m.model_id, m.weights, [m.models[k]], m.transform, m.tta, m.amp)
            idx = np.flatnonzero(data.folds == k)[:6]
            images = [predict.read_image(ts.images_dir / ts.image_ids[i], ts.shape) for i in idx]
            maps, cls = predict.member_maps(single, images, ts.shape)
            pool = oof.read_pool(run, [m.model_id], folds=[k])
            rows = [pool.image_ids.index(ts.image_ids[i]) for i in idx]
            np.testing.assert_array_equal(maps, pool.probs[0, rows])
            np.testing.assert_allclose(cls, pool.cls[0, rows], atol=1e-6)


def test_skip_bad_and_missing_checkpoint(tiny_run, tiny_set, tmp_path):
    run, _ = tiny_run
    images = tmp_path / "imgs"
    shutil.copytree(tiny_set / "test_images", images)
    (images / "0000bad00.jpg").write_bytes(b"\xff\xd8 broken")
    out = tmp_path / "sub.csv"
    # in process (--workers 0); the workers' path of the same errors: test_workers_write_the_single_process_submission_...
    r = _predict("--run", run, "--images", images, "--out", out, "--workers", 0)
    assert r.returncode == 2 and "0000bad00.jpg: unreadable or corrupt image" in r.stderr and not out.exists()
    r = _predict("--run", run, "--images", images, "--out", out, "--skip-bad", "--workers", 0)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "1 bad image(s)" in r.stdout and "0000bad00.jpg" in r.stdout
    df = pd.read_csv(out, keep_default_na=False)
    assert len(df) == 4 * 7 and (df[df.ImageId == "0000bad00.jpg"].EncodedPixels == "").all()
    doc = json.loads((run / "blend" / "blend.json").read_text())
    doc["members"][0]["checkpoints"][1] = str(tmp_path / "gone" / "best.pt")
    bj = tmp_path / "blend.json"
    bj.write_text(json.dumps(doc))
    r = _predict("--run", run, "--images", images, "--out", out, "--blend", bj, "--workers", 0)
    assert r.returncode == 2 and "missing checkpoint(s): " + str(tmp_path / "gone" / "best.pt") in r.stderr


@pytest.mark.parametrize("change, says", [
    (lambda d: d.update(version=0), "blend.json schema version 0; this steel_ray reads version 1"),
    (lambda d: d.clear() or d.update(members=[], weights=[1.0]), "not a steel_ray blend.json"),
    (lambda d: d["postprocess"].pop("3"), "postprocess of class 3 missing entirely"),
    (lambda d: d["postprocess"]["2"].pop("min_area"), "postprocess of class 2 missing ['min_area']"),
    (lambda d: d["postprocess"]["4"].update(gate_source="soft"), "class 4's gate_source 'soft' is not one of"),
    (lambda d: d["members"][0].pop("checkpoints"), "member 0 needs 'model_id' (text) and 'checkpoints' (a list)"),
])
def test_an_old_foreign_or_damaged_blend_json_is_one_line_naming_the_file(tiny_run, tiny_set, tmp_path, change, says):
    run, _ = tiny_run
    doc = blend.load_blend(run / "blend" / "blend.json")
    assert doc["version"] == blend.SCHEMA_VERSION and doc["members"]
    change(doc)
    bj = tmp_path / "blend.json"
    bj.write_text(json.dumps(doc))
    r = _predict("--run", run, "--images", tiny_set / "test_images", "--out", tmp_path / "sub.csv", "--blend", bj, "--workers", 0)
    err = r.stderr.strip().splitlines()
    assert r.returncode == 2 and len(err) == 1 and err[0].startswith(f"error: {bj}: ") and says in err[0], r.stderr[-2000:]
    assert not (tmp_path / "sub.csv").exists()


def test_tta_list_means_exactly_those_views():
    from steel_ray.infer import tta_views

    assert tta_views("none,hflip,vflip") == [(), (3,), (2,)]  # no combined flip
    assert tta_views("hflip_vflip") == [(), (3,), (2,), (2, 3)]  # the config name keeps its meaning
    assert tta_views("hflip") == [(), (3,)] and tta_views("vflip,vflip") == [(2,)]
    with pytest.raises(ValueError, match=r"unknown view\(s\) \['diag'\]"):
        tta_views("none,diag")
    # one spelling per view: the error names the combined view once (hvflip), and hflip_vflip only as a set
    with pytest.raises(ValueError) as e:
        tta_views("bogus")
    msg = str(e.value)
    assert "views none, hflip, vflip, hvflip " in msg and "hflip_vflip = none,hflip,vflip,hvflip" in msg
    assert msg.count("hflip_vflip") == 1


def test_predict_uses_each_members_precision_and_views(tiny_run, monkeypatch):
    """The amp setting of a member's config reaches the forward pass, as in its OOF."""
    run, data = tiny_run
    doc = json.loads((run / "blend" / "blend.json").read_text())
    members = predict.load_members(doc, "blend.json", torch.device("cpu"), tta="none,vflip")
    configs = {m["model_id"]: TrialConfig.from_dict(json.loads((run / "checkpoints" / m["model_id"] / "fold=0" / "config.json")
                                                               .read_text())) for m in doc["members"]}
    seen = []
    real = predict.predict_batch

    def spy(model, x, shape, tta, amp):
        seen.append((tta, amp))
        return real(model, x, shape, tta, amp)

    monkeypatch.setattr(predict, "predict_batch", spy)
    ts = data.train
    images = [predict.read_image(ts.images_dir / ts.image_ids[0], ts.shape)]
    for m in members:
        assert m.amp == configs[m.model_id].train.amp
        seen.clear()
        predict.member_maps(m, images, ts.shape)
        assert seen == [([(), (2,)], configs[m.model_id].train.amp)] * len(m.models)
    off = predict.Member(members[0].model_id, members[0].weights, members[0].models, members[0].transform, [()], False)
    seen.clear()
    predict.member_maps(off, images, ts.shape)
    assert {a for _, a in seen} == {False}


@pytest.fixture(scope="module")
def gated_run(tiny_set, tmp_path_factory):
    """A segmentation model and a classifier on 2 folds, blended; blend.json then set to gate each
    class from a different source (the blend alone may not pick a 1-epoch classifier); class 3 with
    the soft gate (pixel probability times the classifier's presence)."""
    run = tmp_path_factory.mktemp("gatedrun")
    data = prepare_run(tiny_set, run, 2)
    seg = TrialConfig.from_dict({"encoder": "tu-test_resnet", "epochs": 1, "batch_size": 8, "tta": "hflip", "lr": 3e-3,
                                 "aux_weight": 0.1})
    clf = TrialConfig.from_dict({"task": "classify", "encoder": "tu-test_resnet", "pool": "max", "epochs": 2, "batch_size": 8,
                                 "tta": "hflip", "lr": 3e-3, "sampler": "upsample"})
    for cfg in (seg, clf):
        for k in range(2):
            fit_fold(cfg, k, data, run, progress=False)
    doc = blend.blend_run(run, max_members=2, nested=False)
    assert doc["classifier_pool"] == [clf.model_id()]
    doc["classifiers"] = [{"model_id": clf.model_id(), "weight": 1.0,
                           "checkpoints": [str(run / "checkpoints" / clf.model_id() / f"fold={k}" / "best.pt") for k in range(2)]}]
    for c, src in zip("1234", ["classifier", "mean", "product", "classifier"]):
        doc["postprocess"][c].update(gate_source=src, cls_threshold=0.3)
    doc["postprocess"]["3"].update(pixel_threshold=64 / 255, min_area=0.0)  # some pixels on, some the soft gate turns off
    return run, data, doc, clf.model_id()


def test_fold_k_classifier_reproduces_its_stored_oof_presence(gated_run):
    run, data, doc, clf_id = gated_run
    members = predict.load_members(doc, "blend.json", torch.device("cpu"))
    c = next(m for m in members if m.task == "classify")
    assert c.model_id == clf_id
    truth = oof.read_truth(run)
    stored = oof.read_presence(run, clf_id, truth, [0, 1])
    ts = data.train
    for k in range(2):
        single = predict.Member(c.model_id, c.weights, [c.models[k]], c.transform, c.tta, c.amp, c.task)
        idx = np.flatnonzero(data.folds == k)[:6]
        images = [predict.read_image(ts.images_dir / ts.image_ids[i], ts.shape) for i in idx]
        maps, cls = predict.member_maps(single, images, ts.shape)
        assert maps is None
        rows = [truth.image_ids.index(ts.image_ids[i]) for i in idx]
        np.testing.assert_allclose(cls, stored[rows], atol=1e-6)


def test_predict_applies_the_gate_exactly_as_the_blend_scored_it(gated_run):
    """Fold-k models predicting fold k's images through predict_images give, pair by pair, the Dice
    the blend computes from the OOF pool for the same gate sources and post-processing; the soft
    gate (class 3) from the counts at per-image levels the blend's search uses."""
    from steel_ray import postprocess as ps
    from steel_ray.score import pair_dice

    run, data, doc, clf_id = gated_run
    pool = blend.load_blend_pool(run)
    w = np.array([m["weight"] for m in doc["members"]])
    q = pool.clf[pool.classifiers.index(clf_id)]
    expected = np.zeros((len(pool.image_ids), 4))
    softened = 0
    for c in range(4):
        pp, d = doc["postprocess"][str(c + 1)], pool.full[c]
        full_w = np.array([w[[m["model_id"] for m in doc["members"]].index(mid)] if mid in [m["model_id"] for m in doc["members"]]
                           else 0.0 for mid in pool.model_ids])
        gate = ps.gate_signal(ps.blend_cls(d.cls, full_w), q[:, c], pp["gate_source"])
        ch = ps.Choice(int(round(pp["pixel_threshold"] * 255)), pp["min_area"], pp["cls_threshold"])
        blended = ps.blend_u8(d.vals, full_w)
        if pp["gate_source"] == "product":
            every = ps.area_inter(blended, d, ps.all_levels(d.t_min))
            area, inter = ps.product_counts(every, d.t_min, q[:, c], [ch.level])
            expected[:, c] = ps.score_counts(area[:, 0], inter[:, 0], d.true_area, d.area_scale, gate, ch)
            softened = int((area[:, 0] < ps.area_inter(blended, d, [ch.level])[0][:, 0]).sum())
        else:
            expected[:, c] = ps.score_point(blended, gate, d, ch)
    members = predict.load_members(doc, "blend.json", torch.device("cpu"))
    ts = data.train
    gated = 0
    for k in range(2):
        fold_members = [predict.Member(m.model_id, m.weights, [m.models[k]], m.transform, m.tta, m.amp, m.task) for m in members]
        idx = np.flatnonzero(data.folds == k)
        paths = [ts.images_dir / ts.image_ids[i] for i in idx]
        rows = list(predict.predict_images(doc, fold_members, paths, ts.shape, progress=False))
        pred = np.array([r for _, r in rows], dtype=object)
        got = pair_dice(ts.rles[idx], pred, ts.shape, "truth", "pred")
        pos = [pool.image_ids.index(ts.image_ids[i]) for i in idx]
        np.testing.assert_allclose(got, expected[pos], atol=1e-9)
        gated += int(sum((q[p, c] < 0.3) for p in pos for c in (0, 3)))
    assert gated > 0  # the classifier gate really emptied some pairs
    assert softened > 0  # and the soft gate really turned pixels off


def test_workers_write_the_single_process_submission_fetching_weights_from_s3(tiny_run, tiny_set, tmp_path, monkeypatch):
    """Ray's workers (2 of them, shards of 2 images: several shards each, finishing in any order)
    write byte for byte the single-process submission. The run's weights exist only in its S3 pool
    (moto's server): the workers fetch them; the driver loads no model; a bad image is named by
    the caller's path, not a worker's copy."""
    import ray
    from s3_server import s3_storage

    from steel_ray import run as layout
    from steel_ray.data import DataError
    from steel_ray.tune_adapter import put_file

    src, _ = tiny_run
    images = tmp_path / "imgs"
    shutil.copytree(tiny_set / "test_images", images)
    (images / "0000bad00.jpg").write_bytes(b"\xff\xd8 broken")
    single, bad1 = tmp_path / "single.csv", []
    assert predict.predict_folder(src / "blend" / "blend.json", images, single, skip_bad=True, bad=bad1, workers=0) == 7
    with s3_storage() as storage:
        # a copy of the run whose weights are only in its pool: STORAGE/<run id>/pool/checkpoints/...
        run = tmp_path / "run"
        shutil.copytree(src, run)
        (run / "search.json").write_text(json.dumps({"data": "/d", "folds": 2, "storage": storage, "run_id": "r1"}))
        pool = layout.pool_uri(layout.SearchState(data="/d", folds=2, storage=storage, run_id="r1"), run)
        doc = json.loads((run / "blend" / "blend.json").read_text())
        for m in doc["members"]:
            m["checkpoints"] = [p.replace(str(src), str(run)) for p in m["checkpoints"]]
            for p in map(Path, m["checkpoints"]):
                put_file(p, pool, p.relative_to(run).as_posix())
        shutil.rmtree(run / "checkpoints")
        bj = run / "blend" / "blend.json"
        bj.write_text(json.dumps(doc))
        monkeypatch.setattr(predict, "load_members", lambda *a, **k: pytest.fail("the driver loaded the models"))
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
        try:
            sharded, bad2 = tmp_path / "sharded.csv", []
            assert predict.predict_folder(bj, images, sharded, skip_bad=True, bad=bad2, workers=2, shard_size=2) == 7
            with pytest.raises(DataError, match=f"{images / '0000bad00.jpg'}: unreadable or corrupt image"):
                predict.predict_folder(bj, images, tmp_path / "no.csv", workers=2, shard_size=2)
        finally:
            ray.shutdown()
    assert sharded.read_bytes() == single.read_bytes()
    assert bad2 == bad1 and len(bad1) == 1 and str(images / "0000bad00.jpg") in bad1[0]
    assert not (tmp_path / "no.csv").exists()
