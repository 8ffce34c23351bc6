"""The winning Severstal teams' training moves as config keys, each against a hand-computed answer:
per-class BCE positive weights (1st place), defect blackout (1st place, albumentations'
MaskDropout), checkpoint averaging (12th place)."""
import numpy as np
import pytest
import torch

from steel_ray.config import ConfigError, TrialConfig
from steel_ray.dataset import build_transforms
from steel_ray.losses import build_loss


@pytest.mark.parametrize("given", [[2, 2, 1, 1.5], "2,2,1,1.5", (2.0, 2.0, 1.0, 1.5)])
def test_pos_weight_is_one_setting_however_it_is_written(given):
    cfg = TrialConfig.from_dict({"loss": "bce", "pos_weight": given})
    assert cfg.loss.pos_weight == (2.0, 2.0, 1.0, 1.5)
    assert cfg.model_id() == TrialConfig.from_dict({"loss": "bce", "pos_weight": [2, 2, 1, 1.5]}).model_id()
    assert cfg.model_id() != TrialConfig.from_dict({"loss": "bce"}).model_id()
    assert TrialConfig.from_dict({"pos_weight": "none"}).loss.pos_weight is None


@pytest.mark.parametrize("flat,msg", [
    ({"pos_weight": [1, 2, 3]}, "must be 4 positive numbers"),
    ({"pos_weight": [1, 2, 3, 0]}, "must be 4 positive numbers"),
    ({"pos_weight": [2, 2, 1, 1.5], "loss": "lovasz"}, "works with loss bce or bce_dice, not 'lovasz'"),
    ({"mask_dropout": 1.5}, "mask_dropout"),
    ({"avg_checkpoints": 4, "epochs": 3}, "avg_checkpoints=4 exceeds the 3 epoch(s)"),
])
def test_bad_winner_settings_are_one_line_errors(flat, msg):
    with pytest.raises(ConfigError, match=msg.replace("(", r"\(").replace(")", r"\)")):
        TrialConfig.from_dict(flat)


@pytest.mark.parametrize("loss", ["bce", "bce_dice"])
def test_pos_weight_weights_each_class_positive_pixels_in_bce(loss):
    torch.manual_seed(0)
    x, y = torch.randn(2, 4, 8, 8), (torch.rand(2, 4, 8, 8) > 0.7).float()
    w = torch.tensor([2.0, 1.0, 1.0, 3.0]).view(1, 4, 1, 1)
    s = torch.sigmoid(x)
    bce = -(w * y * torch.log(s) + (1 - y) * torch.log(1 - s)).mean()  # by hand
    cfg = TrialConfig.from_dict({"loss": loss, "pos_weight": [2, 1, 1, 3], "bce_weight": 1.0 if loss == "bce_dice" else 0.75})
    got = build_loss(cfg.loss)(x, y)[0]
    assert float(got) == pytest.approx(float(bce), rel=1e-6)
    plain = build_loss(TrialConfig.from_dict({"loss": loss, "bce_weight": 1.0 if loss == "bce_dice" else 0.75}).loss)(x, y)[0]
    assert float(plain) < float(got)  # weighting positives up raises the loss on these logits
    # classifier presence BCE: the same weights per class
    cls = TrialConfig.from_dict({"task": "classify", "pos_weight": [2, 1, 1, 3]})
    logits, target = torch.randn(5, 4), (torch.rand(5, 4) > 0.5).float()
    p = torch.sigmoid(logits)
    hand = -(torch.tensor([2.0, 1, 1, 3]) * target * torch.log(p) + (1 - target) * torch.log(1 - p)).mean()
    assert float(build_loss(cls.loss, task="classify")(None, None, logits, target)[0]) == pytest.approx(float(hand), rel=1e-6)


def test_defect_blackout_blacks_out_one_defect_in_the_image_and_every_class_mask():
    img = np.full((32, 64, 3), 100, np.uint8)
    mask = np.zeros((32, 64, 4), np.uint8)
    mask[5:10, 5:20, 1] = 1  # 75 px of class 2
    mask[20:30, 40:60, 3] = 1  # 200 px of class 4
    mask[22:26, 45:50, 2] = 1  # class 3 overlapping the class-4 blob: one object of the union
    t = build_transforms(True, mask_dropout=1.0, hflip=0, vflip=0, brightness_contrast=0)
    seen = set()
    for seed in range(12):
        t.set_random_seed(seed)
        out = t(image=img, mask=mask)
        black = out["image"][..., 0] < -1.5  # 0 after ImageNet normalisation
        kept = out["mask"].sum((0, 1)).tolist()
        assert kept in ([0, 75, 0, 0], [0, 0, 20, 200])  # exactly one object gone, from every class it covers
        gone = (mask.max(-1) > 0) & (out["mask"].max(-1) == 0)
        assert np.array_equal(black, gone)  # the image is black exactly where the masks were removed
        seen.add(tuple(kept))
    assert len(seen) == 2  # either object can go
    t0 = build_transforms(True, mask_dropout=0.0, hflip=0, vflip=0, brightness_contrast=0)
    assert t0(image=img, mask=mask)["mask"].sum() == mask.sum()


def test_checkpoint_averaging_makes_the_fold_model_the_mean_of_its_last_epochs(tiny_set, tmp_path):
    """avg_checkpoints 2 with oof_epoch last: best.pt is the mean of epoch 1's weights (copied when
    epoch 1 is reported) and epoch 2's (the same training without averaging: same seed, CPU); the
    stored OOF is that averaged model's, and the per-epoch files are gone."""
    from steel_ray import oof
    from steel_ray.infer import predict_batch
    from steel_ray.train import checkpoint_dir, fit_fold, load_weights, prepare_run

    data = prepare_run(tiny_set, tmp_path / "run", 2)
    base = {"encoder": "tu-test_resnet", "epochs": 2, "batch_size": 8, "tta": "none", "lr": 3e-3, "num_workers": 0}
    avg = TrialConfig.from_dict({**base, "avg_checkpoints": 2})
    ckdir = checkpoint_dir(tmp_path / "run", avg.model_id(), 0)
    epoch1 = {}

    def keep_epoch1(metrics):
        if metrics["epoch"] == 1:
            epoch1.update(torch.load(ckdir / "epoch1.pt")["model"])

    torch.manual_seed(0)
    res = fit_fold(avg, 0, data, tmp_path / "run", report=keep_epoch1, device="cpu", progress=False)
    torch.manual_seed(0)
    plain = fit_fold(TrialConfig.from_dict(base), 0, data, tmp_path / "run", device="cpu", progress=False)
    got = torch.load(res.weights_path)
    assert got["averaged_epochs"] == [1, 2] and not list(ckdir.glob("epoch*.pt"))
    epoch2 = torch.load(plain.weights_path)["model"]
    for k, v in got["model"].items():
        if v.is_floating_point():
            torch.testing.assert_close(v, (epoch1[k] + epoch2[k]) / 2, rtol=1e-5, atol=1e-6)
    assert any(not torch.equal(epoch1[k], epoch2[k]) for k in epoch2 if epoch2[k].is_floating_point())
    # the OOF in the pool is the averaged model's
    model, _ = load_weights(res.weights_path)
    pool = oof.read_pool(tmp_path / "run", [avg.model_id()], folds=[0])
    from steel_ray.dataset import read_image

    img = read_image(tiny_set / "train_images" / pool.image_ids[0])
    x = build_transforms(False)(image=img)["image"].transpose(2, 0, 1)[None]
    probs, _ = predict_batch(model, torch.from_numpy(np.ascontiguousarray(x)).float(), (64, 256), "none", False)
    assert np.abs(oof.quantize(probs.numpy())[0].astype(int) - pool.probs[0, 0].astype(int)).max() <= 1
    assert res.best_epoch == 2 and res.history[-1]["averaged_epochs"] == "1,2"
