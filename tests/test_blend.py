"""Blend optimizer on planted pools written as real OOF Parquet runs."""
import json
import os
import shutil
from html.parser import HTMLParser

import numpy as np
import pytest
from blend_pools import blob_noise_model, make_truth, noise_model, signal_model, write_run

from steel_ray import blend, oof
from steel_ray import postprocess as ps
from steel_ray.blend import pool as bpool
from steel_ray.blend import report, tune
from steel_ray.metric import dice_per_pair
from steel_ray.postprocess import PostProcess, blend_cls, blend_u8


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    rng = np.random.default_rng(0)
    masks = make_truth(rng, n=60, shape=(32, 64))
    good = signal_model(rng, masks, 0.45, 0.55)
    models = {"a_good": good, "b_good2": signal_model(rng, masks, 0.45, 0.55), "c_noise": noise_model(rng, masks)}
    run = tmp_path_factory.mktemp("planted")
    write_run(run, masks, models)
    run_dup = tmp_path_factory.mktemp("planted_dup")
    write_run(run_dup, masks, {**models, "a_good_dup": good})
    return run, run_dup, masks


def test_noise_model_gets_zero_weight_and_duplicate_changes_nothing(planted):
    run, run_dup, _ = planted
    r = blend.optimize(blend.load_blend_pool(run), max_members=8, selection_resolution="full")
    w = dict(zip(r.model_ids, r.weights[0]))
    assert w["c_noise"] == 0 and w["a_good"] > 0 and w["b_good2"] > 0
    assert r.scores["in_sample"] >= r.scores["best_single"] - 1e-9
    r2 = blend.optimize(blend.load_blend_pool(run_dup), max_members=8, selection_resolution="full")
    for k in ("in_sample", "cross_fitted", "nested", "best_single"):
        assert r2.scores[k] == pytest.approx(r.scores[k], abs=1e-12), k


def test_signal_blend_beats_baseline_also_when_selected_on_ds4(planted):
    run, _, _ = planted
    r = blend.optimize(blend.load_blend_pool(run), max_members=6, selection_resolution="ds4")
    assert r.settings["selection_resolution"] == "ds4"
    assert r.scores["nested"] > r.scores["baseline"] + 0.01
    assert r.scores["cross_fitted"] > r.scores["baseline"] + 0.01


@pytest.mark.parametrize("seed", [1, 2])
def test_pure_noise_pool_shows_overfitting(tmp_path, seed):
    rng = np.random.default_rng(seed)
    masks = make_truth(rng, n=30, shape=(32, 64), p_defect=1.0)
    write_run(tmp_path, masks, {f"n{i}": blob_noise_model(rng, masks) for i in range(6)})
    r = blend.optimize(blend.load_blend_pool(tmp_path), max_members=6, choice="argmax")
    s = r.scores
    # tuning on the rows it scores is optimistic (argmax: the most so); the nested estimate exposes it
    assert s["in_sample"] - s["nested"] > 0.03
    assert s["nested"] < s["cross_fitted"] <= s["in_sample"]


def test_in_sample_reproduced_from_blend_json_with_competition_metric(planted, tmp_path):
    run, _, masks = planted
    work = tmp_path / "run"
    shutil.copytree(run, work)
    assert blend.main(["--run", str(work), "--max-members", "6"]) == 0
    doc = json.loads((work / "blend" / "blend.json").read_text())
    assert set(doc["scores"]) >= {"in_sample", "cross_fitted", "nested", "best_single", "baseline"}
    assert set(doc["postprocess"]) == {"1", "2", "3", "4"}
    truth = oof.read_truth(work)
    ids = [m["model_id"] for m in doc["members"]]
    weights = np.array([m["weight"] for m in doc["members"]])
    pool = oof.read_pool(work, ids)  # full resolution, dense
    assert pool.image_ids == truth.image_ids
    tmask = truth.masks(range(len(truth.image_ids)))
    dice = []
    for c in range(4):
        pp = PostProcess(**doc["postprocess"][str(c + 1)])
        b = blend_u8(pool.probs[:, :, c], weights)
        dice.append(dice_per_pair(pp.apply(b, blend_cls(pool.cls[:, :, c], weights)), tmask[:, c]))
    assert np.mean(dice) == pytest.approx(doc["scores"]["in_sample"], abs=1e-12)
    # report.html parses and embeds its plots
    html = (work / "blend" / "report.html").read_text()

    class P(HTMLParser):
        imgs, tables = [], 0

        def handle_starttag(self, tag, attrs):
            if tag == "img":
                self.imgs.append(dict(attrs)["src"])
            self.tables += tag == "table"

    p = P()
    p.feed(html)
    assert len(p.imgs) >= 3 and all(s.startswith("data:image/png;base64,") and len(s) > 1000 for s in p.imgs)
    assert p.tables >= 4 and "python -m steel_ray.predict" in html
    md = (work / "blend" / "report.md").read_text()
    assert "| score" in md and "nested" in md


def test_gaps_refused_unless_allow_partial(planted, tmp_path):
    run, _, _ = planted
    work = tmp_path / "run"
    shutil.copytree(run, work)
    shutil.rmtree(work / "oof" / "model_id=b_good2" / "fold=1")
    with pytest.raises(oof.PoolGapError, match=r"\(b_good2, 1\)"):
        blend.load_blend_pool(work)
    assert blend.main(["--run", str(work), "--no-nested"]) == 2
    assert blend.main(["--run", str(work), "--allow-partial", "--no-nested", "--max-members", "3"]) == 0
    doc = json.loads((work / "blend" / "blend.json").read_text())
    assert doc["left_out_models"] == ["b_good2"]
    assert "b_good2" in (work / "blend" / "report.md").read_text()


def test_per_class_weights_and_bags(planted):
    run, _, _ = planted
    pool = blend.load_blend_pool(run)
    r = blend.optimize(pool, max_members=4, per_class_weights=True, bags=3, nested=False, selection_resolution="full")
    assert r.weights.shape == (4, 3)
    np.testing.assert_allclose(r.weights.sum(1), 1.0)


def test_search_run_blends_its_completed_models_only(planted, tmp_path):
    """A search pool also holds screening-only (fold 0) configs; the blend uses search.json's models."""
    run, _, masks = planted
    work = tmp_path / "run"
    shutil.copytree(run, work)
    extra = work / "oof" / "model_id=d_screen_only"
    shutil.copytree(work / "oof" / "model_id=c_noise" / "fold=0", extra / "fold=0")
    assert blend.main(["--run", str(work), "--no-nested"]) == 2  # the whole pool has a gap
    (work / "search.json").write_text(json.dumps({"data": "/d", "folds": 3, "selected_models": ["a_good", "b_good2"]}))
    assert blend.main(["--run", str(work), "--no-nested", "--max-members", "3"]) == 0
    doc = json.loads((work / "blend" / "blend.json").read_text())
    assert {m["model_id"] for m in doc["members"]} <= {"a_good", "b_good2"}
    assert set(doc["single_models_cross_fitted"]) == {"a_good", "b_good2"} and doc["left_out_models"] == []
    assert blend.main(["--run", str(work), "--no-nested", "--models", "a_good", "--max-members", "2"]) == 0
    # a re-blend goes beside the run's own blend (RUN/blend-2), which stays
    assert [m["model_id"] for m in json.loads((work / "blend-2" / "blend.json").read_text())["members"]] == ["a_good"]
    assert {m["model_id"] for m in json.loads((work / "blend" / "blend.json").read_text())["members"]} == {
        m["model_id"] for m in doc["members"]}


def test_all_empty_equals_hand_count_and_json_is_strict(planted, tmp_path):
    run, _, masks = planted
    work = tmp_path / "run"
    shutil.copytree(run, work)
    assert blend.main(["--run", str(work), "--max-members", "3", "--no-nested"]) == 0

    def refuse(name):
        raise ValueError(f"non-standard JSON constant {name}")

    doc = json.loads((work / "blend" / "blend.json").read_text(), parse_constant=refuse)
    empty_pairs = int((~masks.any(axis=(2, 3))).sum())  # masks: (N, 4, H, W)
    assert doc["scores"]["all_empty"] == pytest.approx(empty_pairs / masks[:, :, 0, 0].size, abs=1e-12)
    for c in range(4):
        assert doc["per_class"][str(c + 1)]["all_empty"] == pytest.approx((~masks[:, c].any(axis=(1, 2))).mean())
    assert doc["scores"]["nested"] is None  # --no-nested: null, not NaN
    md = (work / "blend" / "report.md").read_text()
    s = doc["scores"]
    # no nested score, no holdout: the headline leads with the cross-fitted score over all-empty
    assert md.splitlines()[2] == (f"**Blend {s['cross_fitted']:.4f} cross-fitted, {s['cross_fitted'] - s['all_empty']:+.4f} over "
                                  f"predicting no defects ({s['all_empty']:.4f}); no nested estimate, no holdout.**")
    assert f"(all-empty {s['all_empty']:.6f} on the same pairs)" in md
    assert "all_empty" in md  # a row of the score table


def test_report_says_plainly_when_worse_than_all_empty(tmp_path):
    rng = np.random.default_rng(5)
    masks = make_truth(rng, n=30, shape=(32, 64), p_defect=0.3)
    write_run(tmp_path, masks, {f"n{i}": blob_noise_model(rng, masks) for i in range(3)})
    assert blend.main(["--run", str(tmp_path), "--max-members", "3"]) == 0
    doc = json.loads((tmp_path / "blend" / "blend.json").read_text())
    s = doc["scores"]
    assert s["best_single"] <= s["all_empty"] + 1e-9 or s["nested"] <= s["all_empty"]
    md = (tmp_path / "blend" / "report.md").read_text()
    assert "worse than predicting no defects" in md or "no better than predicting no defects" in md


def test_edge_of_grid_warning_fires_when_the_optimum_is_the_lowest_level(tmp_path, caplog):
    """A model that is right but never confident: its best pixel threshold is the grid's lowest level."""
    rng = np.random.default_rng(1)
    masks = make_truth(rng, n=45, shape=(32, 64), p_defect=0.8)
    probs = masks * 0.07 + rng.random(masks.shape) * 0.02  # true pixels ~0.07-0.09, others <= 0.02
    cls = masks.any((2, 3)).astype(np.float32)
    write_run(tmp_path, masks, {"shy": (probs, cls)})
    with caplog.at_level("WARNING", logger="steel_ray.blend"):
        assert blend.main(["--run", str(tmp_path), "--no-nested"]) == 0
    doc = json.loads((tmp_path / "blend" / "blend.json").read_text())
    edges = [e for pc in doc["per_class"].values() for e in pc["on_grid_edge"]]
    assert any("lowest level" in e for e in edges)
    assert "grid's edge" in caplog.text
    assert "lowest level" in (tmp_path / "blend" / "report.md").read_text()


def test_missing_run_folder_named(capsys):
    assert blend.main(["--run", "runs/does-not-exist"]) == 2
    assert "runs/does-not-exist: run folder not found" in capsys.readouterr().err


def _children(pid):
    out = []
    for stat in __import__("glob").glob("/proc/[0-9]*/stat"):
        try:
            fields = open(stat).read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            out.append(int(stat.split("/")[2]))
    return out


def test_sigterm_leaves_no_nested_worker_running(tmp_path):
    import os
    import signal
    import subprocess
    import sys
    import time

    rng = np.random.default_rng(3)
    masks = make_truth(rng, n=90, shape=(32, 64), p_defect=1.0)
    write_run(tmp_path, masks, {f"n{i}": blob_noise_model(rng, masks) for i in range(8)})
    p = subprocess.Popen([sys.executable, "-m", "steel_ray.blend", "--run", str(tmp_path), "--workers", "2",
                          "--selection-resolution", "full", "--max-members", "25"],
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline, kids = time.time() + 120, []
    while time.time() < deadline and p.poll() is None and not kids:
        kids = _children(p.pid)
        time.sleep(0.05)
    assert kids, "the nested workers never started (blend finished too fast to test)"
    os.kill(p.pid, signal.SIGTERM)
    p.wait(timeout=30)
    time.sleep(1.0)
    alive = [k for k in kids if os.path.exists(f"/proc/{k}") and "Z" not in open(f"/proc/{k}/stat").read().rsplit(")", 1)[1].split()[0]]
    assert not alive, f"worker(s) {alive} outlived the blend"


def test_fill_holes_blend_equals_dense_reference(planted):
    from steel_ray import postprocess as ps

    run, _, masks = planted
    pool = blend.load_blend_pool(run, fill_holes=True)
    r = blend.optimize(pool, max_members=4, fill_holes=True, nested=False, selection_resolution="full")
    assert all(pp["fill_holes"] for pp in r.postprocess.values())
    dense = oof.read_pool(run, pool.model_ids)  # full resolution, dense
    truth = oof.read_truth(run)
    order = [dense.image_ids.index(i) for i in truth.image_ids]
    grid = ps.default_grid(pool.shape)
    total = 0.0
    for c in range(4):
        b = blend_u8(dense.probs[:, order, c], r.weights[c])
        t = truth.masks(range(len(truth.image_ids)), [c])[:, 0]
        area, inter = ps.area_inter_dense(b, t, grid.levels, fill_holes=True)
        tables = ps.tables_from_counts(area, inter, t.sum((1, 2)), 1.0, blend_cls(dense.cls[:, order, c], r.weights[c]),
                                       truth.folds, pool.n_folds, grid)
        total += ps.in_sample(tables, grid)[0]
    assert r.scores["in_sample"] == pytest.approx(total / pool.n_pairs, abs=1e-12)


def _crafted(tmp_path, planted, how):
    """A copy of the planted run whose model b_good2 fold 1 file is rewritten as ``how`` says."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    run, _, masks = planted
    work = tmp_path / how
    shutil.copytree(run, work)
    path = oof.oof_path(work, "b_good2", 1)
    t = pq.read_table(path)
    md = dict(t.schema.metadata)
    if how == "other_split":
        md[b"steel_ray.folds_hash"] = b"0123456789abcdef"
    elif how == "missing":
        t = t.slice(0, t.num_rows - 3)
    elif how == "extra":
        other = pq.read_table(oof.oof_path(work, "b_good2", 0)).slice(0, 1)
        t = pa.concat_tables([t, other.cast(t.schema)])
    elif how == "duplicate":
        t = pa.concat_tables([t, t.slice(0, 1)])
    elif how == "wrong_shape":
        col = t.column("p2").to_pylist()
        col[4] = col[4][:-64]
        t = t.set_column(t.schema.get_field_index("p2"), "p2", pa.array(col, t.schema.field("p2").type))
    pq.write_table(t.replace_schema_metadata(md), path)
    if how == "truncated":  # an interrupted copy: the footer (schema, metadata) is gone
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    return work, path


@pytest.mark.parametrize("how,msg", [("other_split", "fold split 0123456789abcdef differs from the run's"),
                                     ("missing", "3 image(s) of fold 1 missing"),
                                     ("extra", "1 image(s) not in fold 1"),
                                     ("duplicate", "appears more than once"),
                                     ("wrong_shape", "p2 of image"),
                                     ("truncated", "unreadable OOF file (")])
def test_crafted_bad_oof_files_are_refused_naming_the_file(planted, tmp_path, capsys, how, msg):
    work, path = _crafted(tmp_path, planted, how)
    assert blend.main(["--run", str(work), "--no-nested"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"error: {path}: ") and msg in err and len(err.splitlines()) == 1, err
    with pytest.raises(oof.DataError, match=msg.replace("(", r"\(").replace(")", r"\)")):
        oof.read_pool(work, ["a_good", "b_good2"])


def test_holdout_is_never_trained_on_and_scored_like_a_submission(tiny_set, tmp_path):
    """A run with a holdout: the images are in no fold, truth or OOF file; scores.holdout equals
    steel_ray.score of the holdout predictions against the holdout labels."""
    import subprocess
    import sys

    import pandas as pd

    from steel_ray.config import TrialConfig
    from steel_ray.data import load_train
    from steel_ray.train import fit_fold, prepare_run

    run = tmp_path / "run"
    data = prepare_run(tiny_set, run, 2, holdout=0.25)
    h = json.loads((run / "holdout.json").read_text())
    held = set(h["image_ids"])
    # about 25% of 48 (stratification rounds per label), none in the training set
    assert 8 <= len(held) <= 14 and not held & set(data.train.image_ids)
    assert not held & set(pd.read_csv(run / "folds.csv").image_id)
    assert not held & set(oof.read_truth(run).image_ids)
    cfg = TrialConfig.from_dict({"arch": "FPN", "encoder": "tu-test_efficientnet", "epochs": 1, "batch_size": 8, "lr": 3e-3})
    for k in range(2):
        fit_fold(cfg, k, data, run, progress=False)
    assert not held & set(oof.read_pool(run).image_ids)
    doc = blend.blend_run(run, max_members=2, nested=False)
    s, hd = doc["scores"], doc["holdout"]
    assert hd["ci95"][0] <= s["holdout"] <= hd["ci95"][1] and hd["n_images"] == len(held)
    # the same number from the scoring CLI, on a label file of the holdout images
    ts = load_train(tiny_set)
    rows = [(i, c + 1, ts.rles[ts.image_ids.index(i), c]) for i in h["image_ids"] for c in range(4)]
    labels = pd.DataFrame(rows, columns=["ImageId", "ClassId", "EncodedPixels"])
    labels[labels.EncodedPixels != ""].to_csv(tmp_path / "holdout_labels.csv", index=False)
    img_dir = tmp_path / "holdout_images"
    img_dir.mkdir()
    for i in h["image_ids"]:
        shutil.copy(tiny_set / "train_images" / i, img_dir / i)
    # what was scored is what predict submits for those images: byte for byte
    from steel_ray import predict
    from steel_ray.score import pair_dice

    sub = tmp_path / "predict_holdout.csv"
    assert predict.predict_folder(run / "blend" / "blend.json", img_dir, sub, workers=0) == len(held)
    scored = pd.read_csv(hd["submission"], keep_default_na=False).sort_values(["ImageId", "ClassId"]).reset_index(drop=True)
    mine = pd.read_csv(sub, keep_default_na=False).sort_values(["ImageId", "ClassId"]).reset_index(drop=True)
    assert scored.equals(mine)
    r = subprocess.run([sys.executable, "-m", "steel_ray.score", "--truth", str(tmp_path / "holdout_labels.csv"),
                        "--pred", str(sub), "--images", str(img_dir)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split()[1] == f"{s['holdout']:.6f}" and f"all-empty {hd['all_empty']:.6f}" in r.stdout
    # the interval resamples images (each with its 4 pairs), not pairs: recomputed from predict's CSV
    pred = np.array([mine[mine.ImageId == i].sort_values("ClassId").EncodedPixels.tolist() for i in h["image_ids"]], dtype=object)
    per_image = pair_dice(np.array(h["rles"], dtype=object), pred, (64, 256), "t", "p").mean(1)
    boot = per_image[np.random.default_rng(0).integers(0, len(per_image), (2000, len(per_image)))].mean(1)
    assert hd["ci95"] == [float(np.quantile(boot, 0.025)), float(np.quantile(boot, 0.975))]
    pairs = pair_dice(np.array(h["rles"], dtype=object), pred, (64, 256), "t", "p").ravel()
    pboot = pairs[np.random.default_rng(0).integers(0, len(pairs), (2000, len(pairs)))].mean(1)
    assert hd["ci95"] != [float(np.quantile(pboot, 0.025)), float(np.quantile(pboot, 0.975))]  # the test can tell them apart
    md = (run / "blend" / "report.md").read_text()
    assert md.split("\n")[2] == (f"**Blend {s['holdout']:.4f} on the holdout, {s['holdout'] - doc['holdout']['all_empty']:+.4f} over "
                                  f"predicting no defects ({doc['holdout']['all_empty']:.4f}), 95% CI {doc['holdout']['ci95'][0]:.4f}-"
                                  f"{doc['holdout']['ci95'][1]:.4f} ({len(held)} images nobody tuned on).**")
    # the search's blend looked once; a plain CLI re-blend does not look; --score-holdout does, and
    # a second look is a warning in the console and the report
    looks = json.loads((run / "holdout.json").read_text())["looks"]
    assert len(looks) == 1 and looks[0]["score"] == s["holdout"] and doc["holdout"]["looks"] == 1
    assert "WARNING: the holdout" not in md
    r = subprocess.run([sys.executable, "-m", "steel_ray.blend", "--run", str(run), "--no-nested", "--max-members", "2"],
                       capture_output=True, text=True)
    assert r.returncode == 0 and not any(line.startswith("holdout") for line in r.stdout.splitlines()), r.stdout[-2000:]
    assert "holdout" not in json.loads((run / "blend-2" / "blend.json").read_text())
    assert "not scored (looked at 1 time(s) so far): pass --score-holdout" in r.stderr
    r = subprocess.run([sys.executable, "-m", "steel_ray.blend", "--run", str(run), "--no-nested", "--max-members", "2",
                        "--score-holdout"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    looks = json.loads((run / "holdout.json").read_text())["looks"]
    assert len(looks) == 2 and "--score-holdout" in looks[1]["command"] and looks[1]["blend"].endswith("blend-3/blend.json")
    assert "look 2 at it" in r.stdout and "WARNING: the holdout has been looked at 2 times" in r.stdout
    assert "WARNING: the holdout has been looked at 2 times" in (run / "blend-3" / "report.md").read_text()


def test_per_class_weights_follow_planted_per_class_skill(tmp_path):
    """Model a sees classes 1-2 and is noise on 3-4; model b the reverse: per-class weights must split."""
    rng = np.random.default_rng(4)
    masks = make_truth(rng, n=60, shape=(32, 64), p_defect=0.8)
    good_p, good_c = signal_model(rng, masks, 0.55, 0.35)
    bad_p, bad_c = blob_noise_model(rng, masks)
    a_p, b_p = good_p.copy(), bad_p.copy()
    a_c, b_c = good_c.copy(), bad_c.copy()
    a_p[:, 2:], a_c[:, 2:] = bad_p[:, 2:], bad_c[:, 2:]
    b_p[:, 2:], b_c[:, 2:] = good_p[:, 2:], good_c[:, 2:]
    write_run(tmp_path, masks, {"a": (a_p, a_c), "b": (b_p, b_c)})
    r = blend.optimize(blend.load_blend_pool(tmp_path), max_members=4, per_class_weights=True, nested=False,
                       selection_resolution="full")
    w = dict(zip(r.model_ids, r.weights.T))  # model -> (4,) weights
    assert (w["a"][:2] > w["b"][:2]).all() and (w["b"][2:] > w["a"][2:]).all(), w
    shared = blend.optimize(blend.load_blend_pool(tmp_path), max_members=4, nested=False, selection_resolution="full")
    assert r.scores["in_sample"] > shared.scores["in_sample"]  # per-class weights pay off here


def _gate_pool(tmp_path, classifiers):
    from blend_pools import false_positive_model, write_classifiers

    rng = np.random.default_rng(5)
    masks = make_truth(rng, n=60, shape=(32, 64), p_defect=0.6)
    write_run(tmp_path, masks, {"seg_fp": false_positive_model(rng, masks)})
    present = masks.any((2, 3))
    planted = {"perfect": np.where(present, 0.95, 0.05).astype(np.float32),
               "random": rng.random(present.shape).astype(np.float32)}
    write_classifiers(tmp_path, masks, {k: planted[k] for k in classifiers})
    return masks


def test_perfect_classifier_gates_a_noisy_segmenter(tmp_path):
    _gate_pool(tmp_path, ["perfect", "random"])
    pool = blend.load_blend_pool(tmp_path)
    assert pool.model_ids == ["seg_fp"] and pool.classifiers == ["perfect", "random"]
    r = blend.optimize(pool, max_members=4, selection_resolution="full", workers=1)
    s = r.scores
    cw = dict(zip(r.classifiers, r.clf_weights))
    assert cw["perfect"] > 0 and cw["random"] == 0, cw
    assert all(pp["gate_source"] in ("classifier", "mean") for pp in r.postprocess.values())
    # the segmenter's false positives on empty pairs cost it a lot; the classifier removes them
    assert s["nested"] > s["nested_segmentation_only"] + 0.1, s
    assert s["cross_fitted"] > s["cross_fitted_segmentation_only"] + 0.1, s
    doc = blend.blend_json(r, pool, tmp_path)
    assert [c["model_id"] for c in doc["classifiers"]] == ["perfect"] and len(doc["classifiers"][0]["checkpoints"]) == 3
    g = r.per_class["1"]["gate"]
    assert g["auc_classifiers"] == pytest.approx(1.0) and g["fp_rate"] == 0 and g["fn_rate"] == 0
    assert doc["classifiers_unused"] == []
    # weighted but gating no class: left out of the blend (predict would run its folds for nothing)
    for pp in r.postprocess.values():
        pp["gate_source"] = "segmentation"
    doc = blend.blend_json(r, pool, tmp_path)
    assert doc["classifiers"] == [] and doc["classifiers_unused"] == ["perfect"]
    assert "every class chose the segmentation gate" in "\n".join(blend.summary_lines(doc))


def test_random_classifier_is_not_used(tmp_path):
    _gate_pool(tmp_path, ["random"])
    pool = blend.load_blend_pool(tmp_path)
    r = blend.optimize(pool, max_members=4, selection_resolution="full", nested=False)
    used = r.clf_weights.sum() > 0
    assert not used or all(pp["gate_source"] == "segmentation" for pp in r.postprocess.values()), (r.clf_weights, r.postprocess)
    doc = blend.blend_json(r, pool, tmp_path)
    assert doc["classifiers"] == [] or all(pp["gate_source"] == "segmentation" for pp in doc["postprocess"].values())
    assert doc["classifier_pool"] == ["random"]


def test_a_classifier_that_wins_by_one_lucky_image_per_class_is_not_kept(tmp_path):
    """The segmenter finds every defect and paints a false positive on every empty image; its own
    presence gates out all but two empty images per class and fold. The classifier copies that
    presence except on one of the two, where it says 0.05: one image's Dice (0 -> 1) of 20 per
    fold in each class. Chosen on any gain (margin 0), it is kept; by default its gain is within its
    noise where it is chosen (t = 1.4 on two folds' images, below 1.645) and no class uses it, in
    the blend or in any nested fold."""
    from blend_pools import false_positive_model, write_classifiers

    rng = np.random.default_rng(5)
    masks = make_truth(rng, n=60, shape=(32, 64), p_defect=0.6)
    probs, _ = false_positive_model(rng, masks)
    empty, folds = ~masks.any((2, 3)), np.arange(60) % 3  # write_run's folds
    seg_cls, lucky = np.where(empty, 0.1, 0.9).astype(np.float32), None
    for c in range(4):
        for f in range(3):
            seg_cls[np.flatnonzero(empty[:, c] & (folds == f))[:2], c] = 0.9  # two false positives it keeps
    lucky = seg_cls.copy()
    for c in range(4):
        for f in range(3):
            lucky[np.flatnonzero(empty[:, c] & (folds == f))[0], c] = 0.05
    write_run(tmp_path, masks, {"seg_fp": (probs, seg_cls)})
    write_classifiers(tmp_path, masks, {"lucky": lucky})
    pool = blend.load_blend_pool(tmp_path)
    anyway = blend.optimize(pool, max_members=2, selection_resolution="full", gate_margin=0)
    assert anyway.clf_weights[0] > 0 and {pp["gate_source"] for pp in anyway.postprocess.values()} != {"segmentation"}
    assert anyway.scores["cross_fitted"] > anyway.scores["cross_fitted_segmentation_only"]
    r = blend.optimize(pool, max_members=2, selection_resolution="full")
    assert r.clf_weights.sum() == 0 and all(pp["gate_source"] == "segmentation" for pp in r.postprocess.values())
    assert all(w["classifiers"] == [0.0] for w in r.nested_weights)
    assert r.scores["nested"] == r.scores["nested_segmentation_only"]
    assert r.scores["cross_fitted"] == r.scores["cross_fitted_segmentation_only"]
    assert r.settings["gate_margin"] == pytest.approx(1.645)


def test_the_soft_gate_wins_where_the_best_pixel_threshold_depends_on_the_presence(tmp_path):
    """Class 1 has three kinds of images (20 each). A: a faint true defect (0.5) and a sure
    classifier (0.99). B: a strong true defect (0.95) in a halo of false pixels (0.6) and an unsure
    classifier (0.5). C: empty, with a strong false blob (0.95) and a classifier near 0 (0.05). No
    pixel threshold keeps A's defects and drops B's halo, whatever the gate; the pixel probability
    times the presence does (A 0.495, B 0.475 vs halo 0.3, C 0.05): the soft gate is chosen, and
    predict's rule (PostProcess with gate_source product) reproduces its in-sample Dice."""
    from blend_pools import write_classifiers

    n, shape = 60, (32, 64)
    masks = np.zeros((n, 4, *shape), bool)
    probs = np.zeros((n, 4, *shape))
    presence = np.full((n, 4), 0.05, np.float32)
    rng = np.random.default_rng(3)
    for i in range(n):
        y, x = rng.integers(6, 18), rng.integers(6, 40)
        box = (slice(y, y + 8), slice(x, x + 16))
        if i < 40:
            masks[i, 0][box] = True
        if i < 20:
            probs[i, 0][box], presence[i, 0] = 0.5, 0.99
        elif i < 40:
            probs[i, 0][y - 3:y + 11, x - 3:x + 19] = 0.6
            probs[i, 0][box], presence[i, 0] = 0.95, 0.5
        else:
            probs[i, 0][box] = 0.95
    write_run(tmp_path, masks, {"seg": (probs, np.full((n, 4), 0.9, np.float32))})
    write_classifiers(tmp_path, masks, {"clf": presence})
    pool = blend.load_blend_pool(tmp_path)
    r = blend.optimize(pool, max_members=2, selection_resolution="full")
    pp, pc = r.postprocess["1"], r.per_class["1"]
    assert pp["gate_source"] == "product", r.postprocess
    assert pc["dice"] == pytest.approx(1.0) and pc["dice_segmentation_only"] < 0.9, pc
    assert r.scores["nested"] > r.scores["nested_segmentation_only"] + 0.05, r.scores
    hard = blend.optimize(pool, max_members=2, selection_resolution="full", gate_sources=["segmentation", "classifier", "mean"])
    assert hard.postprocess["1"]["gate_source"] != "product" and hard.per_class["1"]["dice"] < 0.95, hard.per_class["1"]
    assert hard.settings["gate_sources"] == ["segmentation", "classifier", "mean"]
    # the submission rule on the same maps: the blend's in-sample Dice, pair by pair
    from steel_ray.postprocess import PostProcess

    post = PostProcess(**pp)
    u8 = np.round(probs[:, 0] * 255).astype(np.uint8)
    assert dice_per_pair(post.apply(u8, presence[:, 0]), masks[:, 0]).mean() == pytest.approx(pc["dice"])


def test_ensemble_order_skips_a_near_duplicate_for_a_model_that_adds(tmp_path):
    """--complete-by ensemble's order on one fold: the best model, then the one whose errors differ,
    not the best model's near-copy (which the single ranking puts second)."""
    rng = np.random.default_rng(0)
    masks = make_truth(rng, n=90, shape=(32, 64), p_defect=0.6)
    best = signal_model(rng, masks, 0.42, 0.6)
    near = best  # a config that trains to the same maps (another learning rate, say)
    other = signal_model(rng, masks, 0.40, 0.62)  # weaker alone, but its own noise: averaging with it helps
    write_run(tmp_path, masks, {"best": best, "near": near, "other": other})
    single = blend.optimize(blend.load_blend_pool(tmp_path), max_members=1, nested=False, selection_resolution="full").singles
    assert single["best"] == single["near"] > single["other"], single  # the single ranking completes best and near
    order = blend.ensemble_order(tmp_path, ["best", "near", "other"], 0)
    assert order[:2] == ["best", "other"], order
    pool0 = blend.load_blend_pool(tmp_path, ["best", "near", "other"], folds=[0])
    assert len(pool0.image_ids) == 30 and set(pool0.folds.tolist()) == {0}  # fold 0's images only


def test_pool_of_classifiers_only_is_refused(tmp_path):
    from blend_pools import write_classifiers

    rng = np.random.default_rng(0)
    masks = make_truth(rng, n=30, shape=(32, 64))
    write_run(tmp_path, masks, {})
    write_classifiers(tmp_path, masks, {"c": rng.random((30, 4)).astype(np.float32)})
    with pytest.raises(oof.DataError, match="no segmentation model"):
        blend.load_blend_pool(tmp_path)


def test_streamed_full_resolution_gives_the_same_blend_with_one_class_in_memory(tmp_path):
    """Images at least 128 px high select on the 4x maps and stream full resolution class by class:
    the same blend as the all-in-memory path, with a lower peak (measured by tracemalloc)."""
    import tracemalloc

    rng = np.random.default_rng(11)
    masks = make_truth(rng, n=24, shape=(128, 512), p_defect=0.8)
    write_run(tmp_path, masks, {"a": signal_model(rng, masks, 0.5, 0.5), "b": signal_model(rng, masks, 0.4, 0.6),
                                "n": noise_model(rng, masks)})
    out = {}
    for stream in (False, True):
        tracemalloc.start()
        pool = blend.load_blend_pool(tmp_path, stream=stream)
        r = blend.optimize(pool, max_members=4)
        out[stream] = (r, tracemalloc.get_traced_memory()[1], pool)
        tracemalloc.stop()
    (mem, peak_mem, _), (st, peak_st, pool_st) = out[False], out[True]
    assert isinstance(pool_st.full, bpool._StreamedFull) and not isinstance(out[False][2].full, bpool._StreamedFull)
    assert r.settings["selection_resolution"] == "ds4"
    for k in ("in_sample", "cross_fitted", "nested", "best_single", "baseline", "all_empty", "nested_segmentation_only"):
        assert st.scores[k] == pytest.approx(mem.scores[k], abs=1e-12), k
    np.testing.assert_array_equal(st.weights, mem.weights)
    assert st.postprocess == mem.postprocess and st.per_class == mem.per_class
    print(f"tracemalloc peak: in memory {peak_mem / 2**20:.1f} MiB, streamed {peak_st / 2**20:.1f} MiB, "
          f"{pool_st.full.reader.passes} passes over the files")
    assert pool_st.full.reader.passes == 1 + 4  # the 4x maps once, then each class once at full resolution
    assert peak_st < 0.6 * peak_mem, (peak_st, peak_mem)


def test_classifier_presence_outside_0_1_is_refused_naming_the_file(tmp_path):
    from blend_pools import write_classifiers

    rng = np.random.default_rng(0)
    masks = make_truth(rng, n=30, shape=(32, 64))
    write_run(tmp_path, masks, {"s": signal_model(rng, masks)})
    bad = rng.random((30, 4)).astype(np.float32)
    bad[4, 2] = 1.5
    write_classifiers(tmp_path, masks, {"c": bad})
    with pytest.raises(oof.DataError, match=r"model_id=c/fold=1/part-0.parquet: presence probabilities must be finite"):
        blend.load_blend_pool(tmp_path)


def test_nested_selection_on_masked_folds_equals_selection_on_a_copy(tmp_path):
    """Nested selection leaves fold f in the arrays (fold -1) instead of copying the rest: the
    same weights, fold by fold, as selecting on a copy without fold f; the planted pool makes the
    folds choose differently, so a mask that leaked fold f would show."""
    rng = np.random.default_rng(7)
    masks = make_truth(rng, n=45, shape=(32, 64), p_defect=0.7)
    good, bad = signal_model(rng, masks, 0.5, 0.4), blob_noise_model(rng, masks)
    fold2 = (np.arange(45) % 3 == 2)[:, None]  # write_run's folds
    # a sees the defects of folds 0-1 only, b those of fold 2 only: which helps depends on the fold left out
    a = (np.where(fold2[..., None, None], bad[0], good[0]), np.where(fold2, bad[1], good[1]))
    b = (np.where(fold2[..., None, None], good[0], bad[0]), np.where(fold2, good[1], bad[1]))
    write_run(tmp_path, masks, {"a": a, "b": b})
    pool = blend.load_blend_pool(tmp_path)
    grids = [ps.default_grid(pool.shape)] * 4

    def run_selection(ds, folds, clf):
        w, _ = blend.select(ds, folds, pool.n_folds, grids, max_members=5)
        return np.tile(w, (4, 1)), None, None, None

    picks = []
    for f in range(pool.n_folds):
        masked = tune._select_without(pool, pool.full, f, run_selection)[0]
        keep = pool.folds != f
        copy = run_selection([d.subset(keep) for d in pool.full], pool.folds[keep], None)[0]
        np.testing.assert_array_equal(masked, copy)
        picks.append(masked[0])
    assert len({tuple(np.round(p, 6)) for p in picks}) > 1, picks  # the folds do choose differently


def test_report_lists_the_choices_each_score_saw(tmp_path):
    """scores_include follows the run: a best-epoch member puts the epoch choice into nested; with
    every member at oof_epoch=last and no explore stage, nested has none; a search state with an
    explore stage adds the config choice; holdout and all-empty never have any."""
    rng = np.random.default_rng(2)
    masks = make_truth(rng, n=30, shape=(32, 64))
    models = {"a": signal_model(rng, masks, 0.5, 0.4), "b": signal_model(rng, masks, 0.4, 0.5)}
    for policy, explored in (("best", False), ("last", False), ("last", True)):
        run = tmp_path / f"{policy}{explored}"
        write_run(run, masks, models, configs={m: {"oof_epoch": policy} for m in models})
        if explored:
            (run / "search.json").write_text(json.dumps({"data": "/d", "folds": 3, "stage": "done", "explored": ["demo"],
                                                              "selected_models": ["a", "b"]}))
        doc = blend.blend_run(run, max_members=3, nested=False)
        inc = doc["scores_include"]
        assert inc["all_empty"] == [] and inc["holdout"] == []
        assert any("post-processing" in x for x in inc["in_sample"]) and not any("post-processing" in x for x in inc["cross_fitted"])
        assert any("epoch choice" in x for x in inc["nested"]) == (policy == "best")
        assert any("config choice" in x for x in inc["nested"]) == explored
        md = (run / "blend" / "report.md").read_text()
        assert ("| none" in md.split("| nested ")[1].split("\n")[0]) == (policy == "last" and not explored)
    # a pseudo round: its labels' choices (the parent blend's, the cut-off) join every score but the holdout's
    for per_fold in (True, False):
        run = tmp_path / f"pseudo{per_fold}"
        write_run(run, masks, models, configs={m: {"oof_epoch": "last"} for m in models})
        ps = {"min_confidence": 0.6, "max_images": 5, "parent": "r0", "round": 1, "n_images": 5, "n_candidates": 9,
              "per_class": {"1": 0, "2": 0, "3": 1, "4": 0}, "parent_scores": {"nested": 0.8},
              **({"labels_by_fold": {"0": "l0.csv"}, "n_images_by_fold": {"0": 3, "1": 0}} if per_fold else {})}
        (run / "search.json").write_text(json.dumps({"data": "/d", "folds": 3, "stage": "done", "explored": [],
                                                              "selected_models": ["a", "b"], "pseudo": ps}))
        inc = blend.blend_run(run, max_members=3, nested=False)["scores_include"]
        item = [x for x in inc["nested"] if x.startswith("pseudo labels")]
        assert len(item) == 1 and "confidence cut-off 0.6, at most 5 images" in item[0]
        assert ("per fold" in item[0]) == per_fold and ("fold k's own included" in item[0]) == (not per_fold)
        assert inc["holdout"] == [] and inc["all_empty"] == [] and item[0] in inc["cross_fitted"]
        md = (run / "blend" / "report.md").read_text()
        assert ("its fold's parent models labelled ({'0': 3, '1': 0} per fold)" in md) == per_fold, md[:1500]


def test_report_reads_plainly(tmp_path):
    """The report a person reads: a one-line headline over all-empty, numbers rounded (no 16-digit
    floats, members as integers), the selection curve named as on the 4x maps, "gate off" where
    the gate is off, an AUC from fewer than 5 defect images flagged, classifiers and segmenters in
    separate leaderboards, and a submission command with the run's test images and this Python."""
    import re
    import sys

    import pandas as pd
    from blend_pools import false_positive_model, write_classifiers


    rng = np.random.default_rng(5)
    masks = make_truth(rng, n=60, shape=(32, 64), p_defect=0.6)
    rare = np.flatnonzero(masks[:, 1].any((1, 2)))
    masks[rare[2:], 1] = False  # class 2: two defect images, an AUC to flag
    write_run(tmp_path, masks, {"seg_fp": false_positive_model(rng, masks)})
    present = masks.any((2, 3))
    write_classifiers(tmp_path, masks, {"perfect": np.where(present, 0.95, 0.05).astype(np.float32),
                                        "random": rng.random(present.shape).astype(np.float32)})
    data = tmp_path / "data"
    (data / "test_images").mkdir(parents=True)
    (tmp_path / "search.json").write_text(json.dumps({"stage": "done", "data": str(data), "folds": 3,
                                                               "selected_models": ["seg_fp", "perfect", "random"]}))
    pd.DataFrame([{"stage": "explore", "model_id": "seg_fp", "fold": 0, "status": "TERMINATED", "epochs_run": 3,
                   "best_val_dice_pp": 0.8123456789, "best_val_dice": 0.7, "wall_s": 12.3456, "error": None},
                  {"stage": "explore", "model_id": "cls-perfect", "fold": 0, "status": "TERMINATED", "epochs_run": 2,
                   "best_val_dice_pp": 0.95, "best_val_dice": 0.9, "wall_s": 7.0, "error": None}]).to_parquet(tmp_path / "results.parquet")
    doc = blend.blend_run(tmp_path, max_members=4, nested=False, selection_resolution="ds4")
    md = (tmp_path / "blend" / "report.md").read_text()
    assert md.splitlines()[2].startswith("**Blend ") and "over predicting no defects" in md.splitlines()[2]
    assert not re.search(r"\d\.\d{7,}", md), re.findall(r"\S*\d\.\d{7,}\S*", md)[:5]
    assert "on the ds4 maps (4x downsampled), not the full-resolution scores" in md
    # members as integers in the trajectory table: "| 1 |", never "| 1.0 |"
    traj = md.split("Ensemble score versus number of members")[1].split("##")[0]
    assert "| 1.0 " not in traj and re.search(r"\|\s+1\s+\|", traj), traj
    n_pos = masks.any(axis=(2, 3)).sum(0)
    assert n_pos[1] == 2 and min(n_pos[[0, 2, 3]]) >= report.FEW_POSITIVES, n_pos
    gate = md.split("## Per-class gate")[1].split("##")[0]
    for c in range(4):
        row = next(r for r in gate.splitlines() if r.startswith(f"| {c + 1} "))
        pp = doc["postprocess"][str(c + 1)]
        assert ("gate off" in row) == (pp["cls_threshold"] == 0), (row, pp)
        assert ("unreliable" in row) == (n_pos[c] < report.FEW_POSITIVES), (row, n_pos)
    seg_lb = md.split("Search leaderboard, segmentation trials")[1].split("##")[0]
    cls_lb = md.split("Search leaderboard, classifier trials")[1].split("##")[0]
    assert "seg_fp" in seg_lb and "cls-perfect" not in seg_lb and "cls-perfect" in cls_lb
    assert "0.8123" in seg_lb and "| 12 " in seg_lb  # rounded; wall_s in whole seconds
    cmd = md.split("## Make a submission from this blend")[1].strip().splitlines()[0].strip()
    assert f"--images {data / 'test_images'}" in cmd and "DATA/" not in cmd
    assert cmd.split()[0] in (sys.executable, os.path.relpath(sys.executable))
    assert f"--blend {tmp_path / 'blend' / 'blend.json'}" in cmd
    # a class whose gate is off (threshold 0) shows "gate off", not a failing gate's F1 and rates
    off = json.loads(json.dumps(doc))
    off["per_class"]["3"]["gate"] = {**off["per_class"]["3"]["gate"], "threshold": 0.0, "f1": 0.2, "fp_rate": 1.0}
    row = report._gate_table(off).set_index("class").loc["3"]
    assert row["gate"] == row["F1"] == row["FP rate (empty images)"] == "gate off"


def test_a_re_blend_goes_beside_the_runs_own_blend_unless_asked_to_replace_it(planted, tmp_path, capsys):
    """The run's own RUN/blend (predict and pseudo rounds use it) survives a re-blend with other
    options: that goes to RUN/blend-2, or --out DIR; --replace overwrites; an --out that holds a
    blend is refused in one line."""
    run, _, _ = planted
    work = tmp_path / "run"
    shutil.copytree(run, work)
    assert blend.main(["--run", str(work), "--max-members", "3", "--no-nested"]) == 0
    own = (work / "blend" / "blend.json").read_text()
    assert len(json.loads(own)["members"]) > 1  # so that the one-member blends below are told apart
    assert blend.main(["--run", str(work), "--max-members", "1", "--no-nested", "--choice", "argmax"]) == 0
    assert (work / "blend" / "blend.json").read_text() == own
    side = json.loads((work / "blend-2" / "blend.json").read_text())
    assert len(side["members"]) == 1 and (work / "blend-2" / "report.html").exists()
    assert "--blend " + str(work / "blend-2" / "blend.json") in (work / "blend-2" / "report.md").read_text()
    assert blend.main(["--run", str(work), "--max-members", "1", "--no-nested", "--no-overlays"]) == 0
    assert (work / "blend-3" / "blend.json").exists()
    # the Masks section is there by default (here it says the training images are not at hand) and left out on request
    assert "<h2>Masks" in (work / "blend-2" / "report.html").read_text()
    assert "<h2>Masks" not in (work / "blend-3" / "report.html").read_text()
    out = tmp_path / "mine"
    assert blend.main(["--run", str(work), "--max-members", "1", "--no-nested", "--out", str(out)]) == 0
    assert (out / "blend.json").exists()
    capsys.readouterr()
    assert blend.main(["--run", str(work), "--no-nested", "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"error: --out {out}: holds a blend already; pass --replace to overwrite it, or choose another folder"
    assert blend.main(["--run", str(work), "--max-members", "1", "--no-nested", "--replace"]) == 0
    assert len(json.loads((work / "blend" / "blend.json").read_text())["members"]) == 1


def test_blocks_equal_concatenation_across_block_boundaries(monkeypatch):
    """The OOF reader's growable array: pieces of any size (empty, inside one block, spanning
    several) come out equal to np.concatenate, for 1-D and (M, n) layouts."""
    monkeypatch.setattr(bpool._Blocks, "FIRST", 12)  # blocks of 12, 24, 48, 48 ... bytes
    monkeypatch.setattr(bpool._Blocks, "BLOCK", 48)
    rng = np.random.default_rng(0)
    for lead, dtype in [((), np.int32), ((3,), np.uint8), ((), bool)]:
        b = bpool._Blocks(lead, dtype)
        pieces = [rng.integers(0, 200, (*lead, k)).astype(dtype) for k in (5, 0, 16, 1, 37, 11)]
        for p in pieces:
            b.add(p)
        assert len(b.blocks) >= 3  # the planted sizes cross block boundaries, at the cap too
        out = b.finish()
        assert out.dtype == np.dtype(dtype) and np.array_equal(out, np.concatenate(pieces, axis=-1)) and not b.blocks
    assert bpool._Blocks((2,), np.uint8).finish().shape == (2, 0)


def test_selection_factor_takes_the_finest_maps_that_fit_the_budget():
    """Known answers: 10 sampled images keep 1000 4x pixels and 300 8x pixels; a pool of 100 images
    and 20 models keeps 10,000 and 3,000, at 25 bytes a kept pixel (20 maps, int32 image index,
    truth): 250,000 B at 4x, 75,000 B at 8x."""
    kept, pixels = {4: 1000, 8: 300}, {4: 4000, 8: 1000, "images": 10}
    gib = 2**30
    assert bpool.selection_factor(kept, pixels, 20, 100, 250_000 / gib)["factor"] == 4
    ch = bpool.selection_factor(kept, pixels, 20, 100, 249_999 / gib)
    assert ch["factor"] == 8 and ch["sampled_images"] == 10
    assert ch["estimate_gib"] == pytest.approx({"ds4": 250_000 / gib, "ds8": 75_000 / gib}, rel=1e-3)
    assert ch["kept_fraction"] == {"ds4": 0.25, "ds8": 0.3}
    assert bpool.selection_factor(kept, pixels, 20, 100, 1_000 / gib)["factor"] == 8  # none fits: the coarsest


def test_pool_over_the_selection_budget_selects_on_8x_maps(tmp_path, caplog):
    """A dense pool (noise everywhere: every 4x pixel kept) whose 4x maps exceed a small
    --selection-memory is loaded with 8x selection maps: each class's maps equal the files' 4x maps
    block-meaned 2x2 and pruned (truth from the full-resolution masks), the area scale is 64, the
    blend records ds8 and why, and its scores are still at full resolution (the same all-empty and
    best single as the 4x blend's, whose full-resolution pass is the same)."""
    rng = np.random.default_rng(5)
    masks = make_truth(rng, n=18, shape=(128, 256), p_defect=0.7)
    write_run(tmp_path, masks, {"a": signal_model(rng, masks, 0.5, 0.4), "n": noise_model(rng, masks)})
    four = blend.load_blend_pool(tmp_path)
    held4 = sum(d.vals.nbytes + d.img.nbytes + d.truth.nbytes for d in four.ds)
    assert four.ds_factor == 4 and four.ds_choice["estimate_gib"]["ds4"] == pytest.approx(held4 / 2**30, rel=1e-3)
    with caplog.at_level("WARNING", logger="steel_ray.blend"):
        eight = blend.load_blend_pool(tmp_path, selection_memory=0.5 * held4 / 2**30)
    assert eight.ds_factor == 8 and "the selection runs on 8x maps" in caplog.text
    truth = oof.read_truth(tmp_path)
    ref = oof.read_pool(tmp_path, ["a", "n"], resolution="ds4", truth=truth)
    for c in range(4):
        d = eight.ds[c]
        maps8 = np.stack([oof.downsample(ref.probs[m, :, c], 2) for m in range(2)])
        t8 = np.stack([bpool._truth_ds(t, 8) for t in truth.masks(np.arange(18), [c])[:, 0]])
        want = ps.ClassData.from_dense(maps8, t8, ref.cls[:, :, c], d.t_min, 64.0, positions=False)
        assert d.area_scale == 64.0 and d.vals.shape[1] == want.vals.shape[1] > 0.9 * maps8[0].size
        got = np.argsort(d.img, kind="stable")  # the pool reads fold by fold; each image's pixels in raster order
        np.testing.assert_array_equal(d.img[got], want.img)
        np.testing.assert_array_equal(d.vals[:, got], want.vals)
        np.testing.assert_array_equal(d.truth[got], want.truth)
        np.testing.assert_array_equal(d.true_area, want.true_area)
    r8, r4 = blend.optimize(eight, max_members=3, nested=False), blend.optimize(four, max_members=3, nested=False)
    assert r8.settings["selection_resolution"] == "ds8" and r8.settings["selection_maps"]["chosen_by"] == "selection_memory"
    for k in ("all_empty", "best_single", "baseline"):
        assert r8.scores[k] == r4.scores[k], k
    with pytest.raises(ValueError, match="the pool holds ds8 maps"):
        blend.optimize(eight, selection_resolution="ds4")
