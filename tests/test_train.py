import subprocess
import sys

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from steel_ray import oof
from steel_ray.config import ConfigError, TrialConfig
from steel_ray.train import NonFiniteLossError, checkpoint_dir, fit_fold, prepare_run

TINY = {"arch": "Unet", "encoder": "tu-test_resnet", "epochs": 2, "batch_size": 8, "crop_height": 32,
        "crop_width": 128, "lr": 3e-3, "aux_weight": 0.1, "sampler": "upsample", "tta": "hflip"}


class Stop(Exception):
    pass


def test_resume_equals_uninterrupted(tiny_set, tmp_path):
    cfg = TrialConfig.from_dict(TINY)
    data_a = prepare_run(tiny_set, tmp_path / "a", 3)
    full = fit_fold(cfg, 0, data_a, tmp_path / "a", progress=False, write_oof=False)

    def stop_after_first(metrics):
        if metrics["epoch"] == 1:
            raise Stop()

    data_b = prepare_run(tiny_set, tmp_path / "b", 3)
    with pytest.raises(Stop):
        fit_fold(cfg, 0, data_b, tmp_path / "b", report=stop_after_first, progress=False, write_oof=False)
    seen = []
    resumed = fit_fold(cfg, 0, data_b, tmp_path / "b", report=seen.append, progress=False, write_oof=False)
    assert [m["epoch"] for m in seen] == [2]  # epoch 1 was not redone
    for key in ("train_loss", "val_loss", "val_dice"):
        assert resumed.history[1][key] == pytest.approx(full.history[1][key], rel=1e-6, abs=1e-9), key
    # and a second uninterrupted run is the same too (deterministic for a seed on CPU)
    data_c = prepare_run(tiny_set, tmp_path / "c", 3)
    again = fit_fold(cfg, 0, data_c, tmp_path / "c", progress=False, write_oof=False)
    assert again.history[0]["train_loss"] == pytest.approx(full.history[0]["train_loss"], rel=1e-6)


def test_fit_writes_complete_valid_oof(tiny_set, tmp_path):
    cfg = TrialConfig.from_dict({**TINY, "arch": "FPN", "encoder": "tu-test_efficientnet", "aux_weight": 0.0})
    data = prepare_run(tiny_set, tmp_path, 3)
    reports = []
    res = fit_fold(cfg, 1, data, tmp_path, report=reports.append, progress=False)
    assert [r["epoch"] for r in reports] == [1, 2]
    assert {"epoch", "val_dice", "val_loss", "train_loss"} <= set(reports[0])
    assert 0.0 <= res.best_val_dice <= 1.0 and res.best_epoch in (1, 2)
    path = oof.oof_path(tmp_path, cfg.model_id(), 1)
    assert res.oof_path == str(path)
    t = pq.read_table(path)
    expected = sorted(np.asarray(data.train.image_ids)[data.folds == 1])
    assert sorted(t.column("image_id").to_pylist()) == expected
    assert len(t.column("p1")[0].as_py()) == 64 * 256 and len(t.column("p1_ds4")[0].as_py()) == 16 * 64
    pool = oof.read_pool(tmp_path, [cfg.model_id()], folds=[1])
    # no aux head -> cls is the max pixel probability, consistent with the stored maps
    np.testing.assert_allclose(pool.cls[0], pool.probs[0].max(axis=(2, 3)) / 255.0, atol=1 / 255 + 1e-6)
    # the stored maps at threshold 0.5 score the same as the best epoch's val_dice
    # (up to the TTA difference) -- a sanity bound rather than equality
    from steel_ray.metric import dice_per_pair
    truth = oof.read_truth(tmp_path)
    idx = [truth.image_ids.index(i) for i in pool.image_ids]
    d = dice_per_pair(pool.probs[0] >= 128, truth.masks(idx)).mean()
    assert abs(d - res.best_val_dice) < 0.1


def test_nan_loss_stops_fold_with_clear_error(tiny_set, tmp_path):
    cfg = TrialConfig.from_dict({**TINY, "epochs": 3})
    data = prepare_run(tiny_set, tmp_path, 3)

    def stop(metrics):
        raise Stop()

    with pytest.raises(Stop):
        fit_fold(cfg, 0, data, tmp_path, report=stop, progress=False, write_oof=False)
    last = checkpoint_dir(tmp_path, cfg.model_id(), 0) / "last.pt"
    st = torch.load(last, weights_only=False)
    for v in st["model"].values():
        if v.dtype.is_floating_point:
            v.fill_(float("nan"))  # a corrupted checkpoint
    torch.save(st, last)
    with pytest.raises(NonFiniteLossError, match=r"fold 0 epoch 2 steps 0-\d+: training loss is nan"):
        fit_fold(cfg, 0, data, tmp_path, progress=False, write_oof=False)


def test_split_mismatch_refused(tiny_set, tmp_path):
    from steel_ray.data import DataError

    prepare_run(tiny_set, tmp_path, 3)
    with pytest.raises(DataError, match="split differently"):
        prepare_run(tiny_set, tmp_path, 4)


def test_core_does_not_import_ray(tiny_set, tmp_path):
    code = (
        "import sys; from steel_ray import train, oof, data, dataset, models, losses, metric, infer;"
        f"from steel_ray.config import TrialConfig; d = train.prepare_run({str(tiny_set)!r}, {str(tmp_path)!r}, 3);"
        "train.fit_fold(TrialConfig.from_dict({'encoder': 'tu-test_resnet', 'epochs': 1, 'batch_size': 16}), 0, d,"
        f" {str(tmp_path)!r}, progress=False);"
        "assert 'ray' not in sys.modules, 'ray was imported'; assert 'optuna' not in sys.modules"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]


def test_cli(tiny_set, tmp_path):
    r = subprocess.run(
        [sys.executable, "-m", "steel_ray.train", "--data", str(tiny_set), "--out", str(tmp_path), "--fold", "0",
         "--folds", "3", "--set", "arch=FPN", "--set", "encoder=tu-test_efficientnet", "--set", "epochs=1"],
        capture_output=True, text=True,
    )
    assert r.returncode == 0, r.stderr[-2000:]
    assert len(list(tmp_path.glob("oof/model_id=*/fold=0/*.parquet"))) == 1
    r = subprocess.run([sys.executable, "-m", "steel_ray.train", "--data", str(tiny_set), "--out", str(tmp_path),
                        "--fold", "0", "--folds", "3", "--set", "arch=Nope"], capture_output=True, text=True)
    assert r.returncode == 2 and "arch='Nope' is not valid" in r.stderr and "Traceback" not in r.stderr


def test_post_processed_val_dice_equals_the_blend_search_on_the_same_maps():
    """The streamed per-image histograms give the same score as the blend's exact search on dense maps."""
    from steel_ray import postprocess as ps
    from steel_ray.validate import PPCounts as _PPCounts

    rng = np.random.default_rng(0)
    n, h, w = 12, 32, 64
    truth = np.zeros((n, 4, h, w), bool)
    for i in range(n):
        for c in range(4):
            if rng.random() < 0.4:
                y, x = rng.integers(0, h - 8), rng.integers(0, w - 20)
                truth[i, c, y:y + rng.integers(2, 8), x:x + rng.integers(3, 20)] = True
    probs = np.clip(truth * rng.uniform(0.2, 0.7) + rng.random(truth.shape) * 0.5, 0, 1).astype(np.float32)
    cls = rng.random((n, 4)).astype(np.float32)
    acc = _PPCounts()
    for s in (slice(0, 5), slice(5, 12)):  # two batches
        acc.add(torch.from_numpy(probs[s]), torch.from_numpy(truth[s]), torch.from_numpy(cls[s]))
    fast = acc.score((h, w))
    grid = ps.default_grid((h, w))
    q = np.round(probs * 255).astype(np.uint8)
    total = 0.0
    for c in range(4):
        d = ps.ClassData.from_dense(q[None, :, c], truth[:, c], cls[None, :, c], t_min=grid.t_min)
        total += ps.in_sample(ps.fold_tables(d.vals[0], cls[:, c], d, np.zeros(n, int), 1, grid), grid)[0]
    assert fast == pytest.approx(total / (n * 4), abs=1e-12)
    assert fast > (~truth.any((2, 3))).mean()  # the planted signal beats all-empty


def test_steps_per_epoch_and_warmup(tiny_set, tmp_path):
    from steel_ray.dataset import BalancedSampler, StepsSampler

    presence = np.array([[0, 0, 0, 0]] * 6 + [[0, 0, 1, 0]] * 3 + [[1, 0, 0, 0]], bool)
    s = StepsSampler(len(presence), 25, BalancedSampler(presence, "upsample", seed=1), seed=1)
    s.set_epoch(3)
    first = list(s)
    assert len(first) == 25 and list(s) == first  # deterministic for the epoch
    s.set_epoch(4)
    assert list(s) != first
    plain = StepsSampler(10, 25, None, seed=0)
    draws = list(plain)
    assert np.bincount(draws, minlength=10).min() >= 2  # whole passes, then a cut
    cfg = TrialConfig.from_dict({**TINY, "epochs": 3, "steps_per_epoch": 3, "warmup_steps": 4, "sampler": "none"})
    data = prepare_run(tiny_set, tmp_path, 3)
    res = fit_fold(cfg, 0, data, tmp_path, progress=False, write_oof=False)
    lrs = [m["lr"] for m in res.history]
    lr = cfg.optim.lr
    # 3 of 4 warm-up steps: lr/100 + 3/4 of the way up; then cosine over the remaining 5 steps
    assert lrs[0] == pytest.approx(lr * (0.01 + 0.99 * 3 / 4))
    assert lrs[1] == pytest.approx(lr * (1 + np.cos(np.pi * 2 / 5)) / 2)
    assert lrs[2] == pytest.approx(0.0, abs=1e-12)
    assert {"val_dice_pp", "val_all_empty", "val_dice_3", "val_all_empty_3"} <= set(res.history[0])
    assert res.best_val_dice_pp == max(m["val_dice_pp"] for m in res.history)


def test_demo_settings_learn_better_than_all_empty(tmp_path):
    """The demo space's reference trial, trained for its steps on a small synthetic set, beats all-empty
    (benchmarks/bench_test_margins.py over float paths and seeds: +0.038 to +0.062 in 8 runs vs > +0.01)."""
    import learning_cases as lc

    got = lc.demo(tmp_path)
    assert got["pp_over_empty"] > lc.THRESHOLDS["demo"]["pp_over_empty"], got


@pytest.mark.parametrize("sets,msg", [(["--set", "encoder=resnet35"], "encoder='resnet35' is not an smp encoder"),
                                      (["--fold", "5"], "--fold 5 must be in 0..2"),
                                      (["--set", "arch=Linknet", "--set", "decoder_width=64"], "decoder_width is not supported")])
def test_cli_errors_before_side_effects(tiny_set, tmp_path, sets, msg):
    out = tmp_path / "run"
    args = ["--data", str(tiny_set), "--out", str(out), "--fold", "0", "--folds", "3", "--set", "encoder=tu-test_resnet", *sets]
    r = subprocess.run([sys.executable, "-m", "steel_ray.train", *args], capture_output=True, text=True)
    assert r.returncode == 2 and msg in r.stderr and "Traceback" not in r.stderr, r.stderr[-2000:]
    assert not out.exists()  # nothing written, not even folds.csv


def test_finished_fold_is_a_no_op_and_keeps_only_best_weights(tiny_set, tmp_path):
    cfg = TrialConfig.from_dict({**TINY, "epochs": 1})
    data = prepare_run(tiny_set, tmp_path, 3)
    first = fit_fold(cfg, 0, data, tmp_path, progress=False)
    ck = checkpoint_dir(tmp_path, cfg.model_id(), 0)
    assert (ck / "best.pt").exists() and not (ck / "last.pt").exists()
    mtime = oof.oof_path(tmp_path, cfg.model_id(), 0).stat().st_mtime_ns
    again = fit_fold(cfg, 0, data, tmp_path, progress=False, device="cpu")
    assert oof.oof_path(tmp_path, cfg.model_id(), 0).stat().st_mtime_ns == mtime  # not recomputed
    assert (again.best_epoch, again.best_val_dice, again.best_val_dice_pp) == (first.best_epoch, first.best_val_dice,
                                                                              first.best_val_dice_pp)
    assert [h["epoch"] for h in again.history] == [1]


def test_oof_epoch_last_keeps_the_last_epoch(tiny_set, tmp_path):
    """oof_epoch=last: no epoch is chosen on the fold's labels, even when an earlier one scored higher."""
    cfg = TrialConfig.from_dict({**TINY, "epochs": 3, "steps_per_epoch": 2, "lr": 0.05, "oof_epoch": "last"})
    data = prepare_run(tiny_set, tmp_path, 3)
    res = fit_fold(cfg, 0, data, tmp_path, progress=False)
    assert res.best_epoch == 3 and res.best_val_dice_pp == res.history[-1]["val_dice_pp"]
    assert oof.read_meta(res.oof_path)["best_epoch"] == 3
    best = TrialConfig.from_dict({**TINY, "epochs": 3, "steps_per_epoch": 2, "lr": 0.05})
    res_b = fit_fold(best, 0, data, tmp_path, progress=False)
    assert res_b.best_val_dice_pp == max(h["val_dice_pp"] for h in res_b.history)


def test_classifier_learns_presence_and_writes_a_classify_oof(tmp_path):
    """Learns on any CPU: AUC bounds with a margin measured across float paths and seeds
    (benchmarks/bench_test_margins.py: 15 runs, class 3 0.711-0.838 vs > 0.62, class 4 0.957-1.0 vs > 0.85)."""
    import learning_cases as lc

    data = lc.classifier_set(tmp_path)
    res, fd = lc.train_classifier(tmp_path, data)
    last = res.history[-1]
    for k, bound in lc.THRESHOLDS["classifier"].items():
        assert last[k] > bound, (k, last)
    freq = fd.train.presence[fd.folds == 0].mean(0)
    assert last["val_all_empty"] == pytest.approx(1 - freq.mean())
    assert last["val_dice_pp"] >= last["val_all_empty"]  # never-present is on the gate grid
    cfg = TrialConfig.from_dict(lc.CLS)
    path = oof.oof_path(tmp_path / "run", cfg.model_id(), 0)
    t = pq.read_table(path)
    assert t.column_names == ["image_id", "cls"] and oof.read_meta(path)["task"] == "classify"
    assert sorted(t.column("image_id").to_pylist()) == sorted(np.asarray(fd.train.image_ids)[fd.folds == 0])
    assert cfg.model_id().startswith("cls-tu-test_resnet-bce-")


def test_gate_metrics_by_hand():
    from steel_ray.validate import gate_metrics

    truth = np.array([[1, 0, 0, 0], [0, 0, 1, 0], [1, 0, 1, 0], [0, 0, 0, 0]], bool)
    pres = np.array([[0.9, 0.1, 0.2, 0.1], [0.6, 0.0, 0.4, 0.1], [0.4, 0.2, 0.8, 0.0], [0.1, 0.3, 0.3, 0.2]])
    m = gate_metrics(pres, truth)
    # at 0.5: class 1 right on images 0 and 3, wrong on 1 (false positive) and 2 (miss); class 3 wrong on image 1 only
    assert m["val_dice_1"] == 0.5 and m["val_dice_3"] == 0.75 and m["val_dice_2"] == 1.0
    assert m["val_dice"] == pytest.approx((2 + 4 + 3 + 4) / 16)
    assert m["val_auc_1"] == pytest.approx(0.75) and m["val_auc_3"] == pytest.approx(1.0)
    assert np.isnan(m["val_auc_2"]) and m["val_auc"] == pytest.approx(0.875)
    # per-class best threshold from the gate grid: class 1 at 0.4 (3 of 4), class 3 at 0.4 (4 of 4)
    assert m["val_dice_pp"] == pytest.approx((0.75 + 1 + 1 + 1) / 4)


def test_finetune_runs_full_size_after_crops_and_resumes_across_the_boundary(tiny_set, tmp_path):
    cfg = TrialConfig.from_dict({**TINY, "finetune_epochs": 1, "finetune_lr_mult": 0.1, "scheduler": "none"})
    assert cfg.train.total_epochs == 3 and cfg.model_id() != TrialConfig.from_dict(TINY).model_id()
    data_a = prepare_run(tiny_set, tmp_path / "a", 3)
    reports = []
    full = fit_fold(cfg, 0, data_a, tmp_path / "a", report=reports.append, progress=False)
    assert [r["epoch"] for r in reports] == [1, 2, 3]  # one continuous count for ASHA
    assert [h["phase"] for h in full.history] == ["train", "train", "finetune"]
    assert [h["train_size"] for h in full.history] == ["32x128", "32x128", "64x256"]  # crops, then the whole image
    assert full.history[2]["lr"] == pytest.approx(3e-3 * 0.1) and full.history[1]["lr"] == pytest.approx(3e-3)
    assert oof.oof_path(tmp_path / "a", cfg.model_id(), 0).exists()

    def stop_at_boundary(metrics):
        if metrics["epoch"] == 2:
            raise Stop()

    data_b = prepare_run(tiny_set, tmp_path / "b", 3)
    with pytest.raises(Stop):
        fit_fold(cfg, 0, data_b, tmp_path / "b", report=stop_at_boundary, progress=False)
    seen = []
    resumed = fit_fold(cfg, 0, data_b, tmp_path / "b", report=seen.append, progress=False)
    assert [m["epoch"] for m in seen] == [3]
    for key in ("train_loss", "val_loss", "val_dice", "lr"):
        assert resumed.history[2][key] == pytest.approx(full.history[2][key], rel=1e-6, abs=1e-9), key
    # no fine-tuning: its settings do not change the model id
    assert TrialConfig.from_dict({**TINY, "finetune_lr_mult": 0.3}).model_id() == TrialConfig.from_dict(TINY).model_id()
    assert TrialConfig.from_dict({**TINY, "finetune_batch_size": 2}).model_id() == TrialConfig.from_dict(TINY).model_id()
    assert TrialConfig.from_dict({**TINY, "finetune_epochs": 1, "finetune_lr_mult": 0.1, "scheduler": "none",
                                  "finetune_batch_size": None}).model_id() == cfg.model_id()  # the default keeps ids


def test_finetune_batch_size_applies_to_the_whole_image_epochs_only(tiny_set, tmp_path):
    """Whole images need more memory than crops: finetune_batch_size (2 here, 8 for the crops)."""
    cfg = TrialConfig.from_dict({**TINY, "epochs": 1, "finetune_epochs": 1, "finetune_batch_size": 2, "steps_per_epoch": 2,
                                 "scheduler": "none"})
    res = fit_fold(cfg, 0, prepare_run(tiny_set, tmp_path, 3), tmp_path, progress=False, write_oof=False)
    assert [(h["phase"], h["train_batch_size"], h["train_size"]) for h in res.history] == [("train", 8, "32x128"),
                                                                                           ("finetune", 2, "64x256")]
    with pytest.raises(ConfigError, match="finetune_batch_size"):
        TrialConfig.from_dict({**TINY, "finetune_batch_size": 0})
