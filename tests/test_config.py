import pytest

from steel_ray.config import ConfigError, TrialConfig, parse_set

REQUIRED = [
    "arch", "encoder", "encoder_weights", "attention", "aux_weight", "loss", "focal_gamma", "bce_weight",
    "optimizer", "lr", "encoder_lr_mult", "weight_decay", "scheduler", "epochs", "batch_size", "crop_height",
    "crop_width", "resize_height", "resize_width", "sampler", "seed",
]


def test_flat_keys_round_trip():
    assert set(REQUIRED) <= set(TrialConfig.keys())
    cfg = TrialConfig.from_dict({"arch": "FPN", "lr": 1e-3, "crop_height": 64, "crop_width": 128})
    assert cfg.model.arch == "FPN" and cfg.optim.lr == 1e-3 and cfg.data.crop == (64, 128)
    assert TrialConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(Exception):
        cfg.model.arch = "Unet"  # frozen


def test_model_id_stable_and_sensitive():
    a = TrialConfig.from_dict({"lr": 1e-3})
    assert a.model_id() == TrialConfig.from_dict({"lr": 0.001}).model_id()
    assert a.model_id() != TrialConfig.from_dict({"lr": 2e-3}).model_id()
    assert a.model_id() == TrialConfig.from_dict({"lr": 1e-3, "num_workers": 3}).model_id()
    assert a.model_id().startswith("unet-resnet34-bce_dice-")


def test_model_id_hashes_only_the_keys_that_differ_from_their_defaults():
    """Known answers: the defaults hash ``{}``, one changed key hashes that key alone (runtime keys
    never); a key added to the config with a default keeps every existing id."""
    import hashlib
    import json

    from steel_ray.config import _DEFAULTS, identity_hash

    def h(d):
        return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:8]

    assert TrialConfig().model_id() == f"unet-resnet34-bce_dice-{h({})}"
    assert TrialConfig.from_dict({"lr": 0.01, "num_workers": 5}).model_id() == f"unet-resnet34-bce_dice-{h({'lr': 0.01})}"
    assert TrialConfig.from_dict({"oof_epoch": "best"}).model_id() == f"unet-resnet34-bce_dice-{h({'oof_epoch': 'best'})}"
    for flat in ({}, {"lr": 0.01, "arch": "FPN"}, {"epochs": 3, "oof_epoch": "best", "tta": "hflip"}):
        cfg = TrialConfig.from_dict(flat).to_dict()
        grown = identity_hash({**cfg, "new_key": 7}, {**_DEFAULTS, "new_key": 7})
        assert grown == identity_hash(cfg, _DEFAULTS) and TrialConfig.from_dict(flat).model_id().endswith(grown)
        assert identity_hash({**cfg, "new_key": 8}, {**_DEFAULTS, "new_key": 7}) != grown  # set away from its default: a new id


@pytest.mark.parametrize(
    "flat, msg",
    [
        ({"archh": "Unet"}, r"unknown config key\(s\) \['archh'\]"),
        ({"arch": "Unet3"}, r"arch='Unet3' is not valid; choose one of \['Unet'"),
        ({"loss": "ce"}, r"loss='ce' is not valid; choose one of \['bce', 'dice', 'bce_dice', 'lovasz', 'focal'\]"),
        ({"lr": 0}, r"lr > 0 must hold, but got lr=0"),
        ({"epochs": 1.5}, r"epochs=1.5 must be an integer"),
        ({"bce_weight": 2}, r"bce_weight <= 1 must hold"),
        ({"crop_height": 64}, r"crop_height and crop_width must be set together"),
        ({"crop_height": 60, "crop_width": 64}, r"crop_height=60 must be a multiple of 32"),
        ({"sampler": "x"}, r"sampler='x' is not valid"),
        ({"encoder_weights": "ssl"}, r"encoder_weights='ssl' is not valid"),
        ({"lr": "fast"}, r"lr='fast' must be a number"),
    ],
)
def test_errors_name_key_value_and_choices(flat, msg):
    with pytest.raises(ConfigError, match=msg):
        TrialConfig.from_dict(flat)


def test_parse_set():
    assert parse_set(["lr=1e-3", "arch=FPN", "epochs=2", "encoder_weights=null", "amp=false"]) == {
        "lr": 1e-3, "arch": "FPN", "epochs": 2, "encoder_weights": None, "amp": False,
    }
    assert TrialConfig.from_dict({"encoder_weights": "none"}).model.encoder_weights is None
    with pytest.raises(ConfigError, match="key=value"):
        parse_set(["lr"])


def test_task_keys_belong_to_their_task():
    from steel_ray.config import ConfigError, TrialConfig

    seg = TrialConfig.from_dict({"arch": "FPN"})
    assert seg.model.task == "segment" and seg.model_id().startswith("fpn-")
    clf = TrialConfig.from_dict({"task": "classify", "pool": "avgmax", "cls_loss": "focal", "dropout": 0.2})
    assert clf.model_id().startswith("cls-resnet34-focal-")
    with pytest.raises(ConfigError, match=r"\['pool'\] apply to task 'classify' only"):
        TrialConfig.from_dict({"pool": "max"})
    with pytest.raises(ConfigError, match=r"\['arch', 'loss'\] apply to task 'segment' only"):
        TrialConfig.from_dict({"task": "classify", "arch": "FPN", "loss": "dice"})
    with pytest.raises(ConfigError, match="task='detect' is not valid"):
        TrialConfig.from_dict({"task": "detect"})
    # a classifier's id ignores the segmentation defaults, a segmentation id the classifier's
    assert TrialConfig.from_dict({"task": "classify", "dropout": 0.1}).model_id() != clf.model_id()
    assert TrialConfig().model_id() == TrialConfig.from_dict({"dropout": 0.0}).model_id()


def test_the_search_driver_and_config_validation_do_not_import_torch():
    """No import cycle config <-> losses/optim: validating a config and importing the search driver
    leave torch (and the training modules) unloaded."""
    import subprocess
    import sys

    code = ("import sys, steel_ray.search\n"
            "from steel_ray.config import TrialConfig\n"
            "TrialConfig.from_dict({'loss': 'focal', 'optimizer': 'sgd', 'sampler': 'upsample', 'tta': 'hflip_vflip', "
            "'warmup_steps': 3})\n"
            "bad = [m for m in sys.modules if m == 'torch' or m in ('steel_ray.train', 'steel_ray.losses', 'steel_ray.optim')]\n"
            "assert not bad, bad\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]


def test_each_registry_implements_exactly_the_choices_config_validates():
    from steel_ray import config, dataset, infer, losses, optim

    assert tuple(losses.SEG_LOSSES) == config.CHOICES["loss"] and tuple(losses.CLS_LOSSES) == config.CHOICES["cls_loss"]
    assert tuple(optim.OPTIMIZERS) == config.CHOICES["optimizer"] and tuple(optim.SCHEDULERS) == config.CHOICES["scheduler"]
    assert dataset.SAMPLERS == config.CHOICES["sampler"] and tuple(infer.TTA_FLIPS) == config.CHOICES["tta"]
    with pytest.raises(RuntimeError, match="change both together"):
        config.check_registry("loss", {**losses.SEG_LOSSES, "new_loss": None})
    with pytest.raises(ConfigError, match="optimizer='lion' is not valid"):
        TrialConfig.from_dict({"optimizer": "lion"})
