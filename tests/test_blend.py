"""Blend optimizer on planted pools written as real OOF Parquet runs."""
import json
import shutil
from html.parser import HTMLParser

import numpy as np
import pytest

from blend_pools import blob_noise_model, make_truth, noise_model, signal_model, write_run
from steel_ray import blend, oof
from steel_ray.metric import PostProcess, dice_per_pair
from steel_ray.ppsearch import blend_cls, blend_u8


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
    r = blend.optimize(blend.load_blend_pool(tmp_path), max_members=6)
    s = r.scores
    # tuning on the rows it scores is optimistic; the nested estimate exposes it
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
    (work / "search.json").write_text(json.dumps({"selected_models": ["a_good", "b_good2"]}))
    assert blend.main(["--run", str(work), "--no-nested", "--max-members", "3"]) == 0
    doc = json.loads((work / "blend" / "blend.json").read_text())
    assert {m["model_id"] for m in doc["members"]} <= {"a_good", "b_good2"}
    assert set(doc["single_models_cross_fitted"]) == {"a_good", "b_good2"} and doc["left_out_models"] == []
    assert blend.main(["--run", str(work), "--no-nested", "--models", "a_good", "--max-members", "2"]) == 0
    assert [m["model_id"] for m in json.loads((work / "blend" / "blend.json").read_text())["members"]] == ["a_good"]
