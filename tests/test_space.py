import optuna
import pytest

from steel_ray.config import TrialConfig
from steel_ray.space import SpaceError, load_space


def _write(tmp_path, text):
    p = tmp_path / "s.yaml"
    p.write_text(text)
    return p


def test_shipped_spaces_parse():
    demo = load_space("search_spaces/demo.yaml")
    assert demo.max_epochs() == 3 and demo.points_to_evaluate
    sev = load_space("search_spaces/severstal.yaml")
    names = {p.name for p in sev.params}
    assert {"arch", "encoder", "loss", "crop_width", "lr", "attention", "aux_weight"} <= names
    enc = next(p for p in sev.params if p.name == "encoder")
    assert {"resnet34", "se_resnext50_32x4d", "efficientnet-b3", "efficientnet-b5"} <= set(enc.choices)


def test_conditionals_and_types(tmp_path):
    space = load_space(_write(tmp_path, """
fixed: {epochs: 2}
params:
  loss: {type: categorical, choices: [bce, focal]}
  focal_gamma: {type: float, low: 1.0, high: 3.0, when: {loss: focal}}
  arch: {type: categorical, choices: [Unet, FPN]}
  attention: {type: categorical, choices: [none, scse], when: {arch: Unet}}
  lr: {type: logfloat, low: 1.0e-4, high: 1.0e-2}
  batch_size: {type: int, low: 2, high: 8, step: 2}
points_to_evaluate:
  - {loss: bce, arch: FPN, lr: 1.0e-3}
"""))
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=1))
    seen_focal = seen_bce = 0
    for _ in range(60):
        t = study.ask()
        const = space.define_by_run(t)
        p = t.params
        assert const == {"epochs": 2}
        assert ("focal_gamma" in p) == (p["loss"] == "focal")
        assert ("attention" in p) == (p["arch"] == "Unet")
        assert 1e-4 <= p["lr"] <= 1e-2 and p["batch_size"] in (2, 4, 6, 8)
        TrialConfig.from_dict({**p, **const})
        seen_focal += p["loss"] == "focal"
        seen_bce += p["loss"] == "bce"
        study.tell(t, 0.0)
    assert seen_focal and seen_bce
    lr = next(q for q in space.params if q.name == "lr")
    assert lr.log


@pytest.mark.parametrize("text, msg", [
    ("params: {archh: {type: categorical, choices: [Unet]}}", r"archh: not a trial config key"),
    ("params: {arch: {type: categorical, choices: [Unet, Nope]}}", r"arch: choice 'Nope': arch='Nope' is not valid"),
    ("params: {lr: {type: float, low: 1.0, high: 0.1}}", r"lr: low <= high must hold, but got \(low=1, high=0.1\)"),
    ("params: {lr: {type: logfloat, low: 0, high: 0.1}}", r"lr: a log scale needs low > 0"),
    ("params: {lr: {type: uniform, low: 0, high: 0.1}}", r"lr: type='uniform' is not one of"),
    ("params: {lr: {type: float, low: a, high: 0.1}}", r"lr: low='a' must be a number"),
    ("params: {focal_gamma: {type: float, low: 1, high: 2, when: {loss: focal}}}", r"focal_gamma: 'when' refers to 'loss'"),
    ("params: {arch: {type: categorical, choices: []}}", r"arch: categorical needs a non-empty list"),
    ("fixed: {epochs: 0}\nparams: {}", r"fixed: epochs >= 1 must hold"),
    ("fixed: {lr: 0.1}\nparams: {lr: {type: float, low: 0.1, high: 0.2}}", r"lr: is both fixed and a parameter"),
    ("params: {arch: {type: categorical, choices: [Unet]}}\npoints_to_evaluate: [{arch: FPN}]",
     r"points_to_evaluate\[0\].arch: value 'FPN' is outside"),
    ("params: {arch: {type: categorical, choices: [Unet]}}\npoints_to_evaluate: [{lr: 0.1}]",
     r"points_to_evaluate\[0\].lr: is not a parameter"),
    ("params: {arch: {type: categorical, choices: [Unet, FPN]}, attention: {type: categorical, choices: [scse]}}",
     r"attention: 'scse' can be sampled with arch='FPN'.*add a 'when' on arch"),
    ("paramz: {}", r"unknown section\(s\) \['paramz'\]"),
    ("params: [1, 2", r"not valid YAML"),
])
def test_invalid_spaces_name_the_key(tmp_path, text, msg):
    with pytest.raises(SpaceError, match=msg):
        load_space(_write(tmp_path, text))


def test_missing_file():
    with pytest.raises(SpaceError, match="nope.yaml: file not found"):
        load_space("nope.yaml")


@pytest.mark.slow
def test_every_severstal_family_builds():
    """Each arch x encoder of severstal.yaml constructs and runs a forward pass (no weights)."""
    import torch

    from steel_ray.models import build_model

    sev = load_space("search_spaces/severstal.yaml")
    archs = next(p for p in sev.params if p.name == "arch").choices
    encoders = next(p for p in sev.params if p.name == "encoder").choices
    for arch in archs:
        for enc in encoders:
            m = build_model(TrialConfig.from_dict({"arch": arch, "encoder": enc, "aux_weight": 0.2}).model).eval()
            with torch.no_grad():
                masks, cls = m(torch.randn(1, 3, 64, 128))
            assert masks.shape == (1, 4, 64, 128) and cls.shape == (1, 4), (arch, enc)


def test_task_is_declared_at_the_top_level(tmp_path):
    sp = load_space("search_spaces/demo_classifier.yaml")
    assert sp.task == "classify" and sp.fixed["task"] == "classify" and sp.name == "demo_classifier"
    assert load_space("search_spaces/severstal_classifier.yaml").task == "classify"
    assert load_space("search_spaces/demo.yaml").task == "segment"
    bad = tmp_path / "bad.yaml"
    bad.write_text("task: classify\nparams:\n  arch: {type: categorical, choices: [Unet, FPN]}\n")
    with pytest.raises(SpaceError, match="apply to task 'segment' only"):
        load_space(bad)
    bad.write_text("fixed:\n  task: classify\n")
    with pytest.raises(SpaceError, match="top level"):
        load_space(bad)
