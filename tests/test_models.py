import pytest
import torch

from steel_ray.config import ConfigError, TrialConfig
from steel_ray.losses import build_loss
from steel_ray.models import build_model, supports_attention

ARCHS = ["Unet", "UnetPlusPlus", "FPN", "PSPNet", "Linknet", "DeepLabV3Plus"]


@pytest.mark.parametrize("arch", ARCHS)
def test_forward_backward_with_aux_head(arch):
    torch.manual_seed(0)
    cfg = TrialConfig.from_dict({"arch": arch, "encoder": "tu-test_resnet", "aux_weight": 0.2})
    model = build_model(cfg.model)
    x = torch.randn(2, 3, 64, 64)
    masks, cls = model(x)
    assert masks.shape == (2, 4, 64, 64) and cls.shape == (2, 4)
    (masks.mean() + cls.mean()).backward()
    assert all(p.grad is not None for p in model.encoder.parameters() if p.requires_grad)


def test_any_size_is_padded_to_stride():
    model = build_model(TrialConfig.from_dict({"encoder": "tu-test_efficientnet"}).model).eval()
    masks, cls = model(torch.randn(1, 3, 50, 70))
    assert masks.shape == (1, 4, 50, 70) and cls is None


def test_scse_attention():
    assert supports_attention("Unet") and not supports_attention("FPN")
    m = build_model(TrialConfig.from_dict({"arch": "Unet", "encoder": "tu-test_resnet", "attention": "scse"}).model)
    assert any("SCSE" in type(x).__name__ for x in m.modules())
    with pytest.raises(ConfigError, match=r"attention='scse' is not supported by arch='FPN'; use it with \['Unet', 'UnetPlusPlus'"):
        build_model(TrialConfig.from_dict({"arch": "FPN", "encoder": "tu-test_resnet", "attention": "scse"}).model)


def test_bad_encoder_names():
    with pytest.raises(ConfigError, match="encoder='resnet35' is not an smp encoder; supported encoders"):
        build_model(TrialConfig.from_dict({"encoder": "resnet35"}).model)
    with pytest.raises(ConfigError, match="timm has no model 'nope'"):
        build_model(TrialConfig.from_dict({"encoder": "tu-nope"}).model)


@pytest.mark.parametrize("loss", ["bce", "dice", "bce_dice", "lovasz", "focal"])
def test_losses_finite_and_falling(loss):
    torch.manual_seed(0)
    target = (torch.rand(2, 4, 16, 16) > 0.8).float()
    logits = torch.zeros(2, 4, 16, 16, requires_grad=True)
    cls = torch.zeros(2, 4, requires_grad=True)
    fn = build_loss(TrialConfig.from_dict({"loss": loss}).loss, aux_weight=0.5)
    opt = torch.optim.Adam([logits, cls], lr=0.1)
    values = []
    for _ in range(10):
        total, parts = fn(logits, target, cls, target.amax((2, 3)))
        assert torch.isfinite(total) and "aux_loss" in parts
        opt.zero_grad()
        total.backward()
        opt.step()
        values.append(total.item())
    assert values[-1] < 0.8 * values[0]


@pytest.mark.slow
def test_imagenet_without_internet_is_a_clear_error():
    """Offline (as on CI machines) the download fails; the error says what to do."""
    try:
        build_model(TrialConfig.from_dict({"encoder": "resnet18", "encoder_weights": "imagenet"}).model)
    except RuntimeError as e:
        assert "encoder_weights='imagenet'" in str(e) and "encoder_weights=null" in str(e)
    # with internet the weights load and there is nothing to check


@pytest.mark.parametrize("arch,attention", [("Unet", "scse"), ("UnetPlusPlus", "none"), ("FPN", "none"), ("DeepLabV3Plus", "none")])
def test_decoder_width_narrows_the_decoder(arch, attention):
    base = build_model(TrialConfig.from_dict({"arch": arch, "encoder": "tu-test_resnet", "attention": attention}).model)
    narrow = build_model(TrialConfig.from_dict({"arch": arch, "encoder": "tu-test_resnet", "attention": attention,
                                                "decoder_width": 32}).model)
    count = lambda m: sum(p.numel() for p in m.net.decoder.parameters())  # noqa: E731
    assert count(narrow) < count(base) / 3
    masks, _ = narrow.eval()(torch.randn(2, 3, 64, 96))
    assert masks.shape == (2, 4, 64, 96)


def test_decoder_width_refused_where_it_means_nothing():
    with pytest.raises(ConfigError, match=r"decoder_width is not supported by arch='Linknet'; use it with \['Unet'"):
        build_model(TrialConfig.from_dict({"arch": "Linknet", "encoder": "tu-test_resnet", "decoder_width": 64}).model)
