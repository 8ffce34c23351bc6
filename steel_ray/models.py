"""Model factory over segmentation-models-pytorch architectures and encoders.

``build_model(cfg)`` returns a :class:`SteelNet` for ``task: segment``: any smp architecture x
any smp encoder name (timm ``tu-*`` included), optional scSE decoder attention and an optional
auxiliary classification head; for ``task: classify`` a :class:`SteelClassifier`: the same
encoders with a pooled linear head (4 presence logits). ``forward`` always returns
``(mask_logits or None, cls_logits or None)`` and pads inputs to the encoder stride, so any
image size works.
"""
from __future__ import annotations

import inspect

import torch
import torch.nn.functional as F
from torch import nn

from . import weights
from .config import ARCHS, ConfigError, ModelConfig

__all__ = ["build_model", "check_model_config", "SteelNet", "SteelClassifier", "supports_attention", "encoder_parameters"]

N_CLASSES = 4


def _arch_class(arch: str):
    import segmentation_models_pytorch as smp

    cls = getattr(smp, arch, None) if arch in ARCHS else None
    if cls is None:
        raise ConfigError(f"arch={arch!r} is not valid; choose one of {list(ARCHS)}")
    return cls


def supports_attention(arch: str) -> bool:
    """Whether the smp architecture takes ``decoder_attention_type`` (scSE)."""
    return "decoder_attention_type" in inspect.signature(_arch_class(arch).__init__).parameters


def _decoder_kwargs(arch: str, width: int) -> dict:
    """smp keyword arguments that set an architecture's decoder width (channels at its coarsest stage).

    Unet-like decoders halve the width at each of their 5 stages, down to 16 (smp default
    256..16; 16 keeps scSE's channel squeeze, width // 16, at least one channel); FPN
    uses ``width`` for the pyramid and ``width // 2`` (a multiple of 32) for the segmentation
    head (default 256/128); DeepLabV3(+) uses ``width`` throughout (default 256).
    """
    params = inspect.signature(_arch_class(arch).__init__).parameters
    if "decoder_pyramid_channels" in params:
        # the segmentation blocks use GroupNorm(32): a multiple of 32 channels
        return {"decoder_pyramid_channels": width, "decoder_segmentation_channels": max(32, width // 64 * 32)}
    if "decoder_channels" in params and arch in ("Unet", "UnetPlusPlus", "MAnet"):
        return {"decoder_channels": [max(16, width >> i) for i in range(5)]}
    if "decoder_channels" in params and arch in ("DeepLabV3", "DeepLabV3Plus"):
        return {"decoder_channels": width}
    ok = [a for a in ARCHS if a in ("Unet", "UnetPlusPlus", "MAnet", "FPN", "DeepLabV3", "DeepLabV3Plus")]
    raise ConfigError(f"decoder_width is not supported by arch={arch!r}; use it with {ok} or leave it null")


def _check_encoder(name: str) -> None:
    import segmentation_models_pytorch as smp

    if name.startswith("tu-"):
        import timm

        if not timm.is_model(name[3:]):
            raise ConfigError(f"encoder={name!r}: timm has no model {name[3:]!r} (see timm.list_models())")
        return
    names = smp.encoders.get_encoder_names()
    if name not in names:
        raise ConfigError(f"encoder={name!r} is not an smp encoder; supported encoders: {names} or tu-<timm model>")


class SteelNet(nn.Module):
    """smp model wrapper: pads to the stride, returns ``(mask_logits, cls_logits | None)``."""

    def __init__(self, net: nn.Module, stride: int, has_aux: bool):
        super().__init__()
        self.net = net
        self.stride = stride
        self.has_aux = has_aux

    @property
    def encoder(self) -> nn.Module:
        return self.net.encoder

    def forward(self, x: torch.Tensor):
        h, w = x.shape[-2:]
        ph, pw = (-h) % self.stride, (-w) % self.stride
        x = _pad(x, self.stride)
        out = self.net(x)
        masks, labels = out if self.has_aux else (out, None)
        if ph or pw:
            masks = masks[..., :h, :w]
        return masks, labels


def _pad(x: torch.Tensor, stride: int) -> torch.Tensor:
    h, w = x.shape[-2:]
    ph, pw = (-h) % stride, (-w) % stride
    if ph or pw:
        x = F.pad(x, (0, pw, 0, ph), mode="reflect" if min(h, w) > max(ph, pw) else "replicate")
    return x


class SteelClassifier(nn.Module):
    """Image-level multilabel classifier: smp/timm encoder -> pooled last feature map -> dropout ->
    linear (4 presence logits). ``forward`` returns ``(None, cls_logits)``.

    smp's ``aux_params`` head hangs off a segmentation model (a decoder is built and run for
    nothing); this is the same encoder factory without the decoder.
    """

    has_aux = True  # presence comes from the head (see infer.predict_batch)

    def __init__(self, encoder: nn.Module, pool: str, dropout: float, stride: int = 32):
        super().__init__()
        self.encoder = encoder
        self.pool = pool
        self.stride = stride
        width = encoder.out_channels[-1] * (2 if pool == "avgmax" else 1)
        self.head = nn.Sequential(nn.Dropout(dropout), nn.Linear(width, N_CLASSES))

    def forward(self, x: torch.Tensor):
        f = self.encoder(_pad(x, self.stride))[-1]
        if self.pool == "avg":
            v = f.mean(dim=(-2, -1))
        elif self.pool == "max":
            v = f.amax(dim=(-2, -1))
        else:
            v = torch.cat([f.mean(dim=(-2, -1)), f.amax(dim=(-2, -1))], dim=1)
        return None, self.head(v)


def _build_kwargs(cfg: ModelConfig) -> dict:
    """smp constructor arguments for ``cfg``; every name and combination is checked, nothing is built."""
    _check_encoder(cfg.encoder)
    if cfg.task == "classify":  # smp.encoders.get_encoder's arguments
        return {"name": cfg.encoder, "in_channels": 3, "depth": 5, "weights": cfg.encoder_weights}
    _arch_class(cfg.arch)
    kwargs = {"encoder_name": cfg.encoder, "encoder_weights": cfg.encoder_weights, "classes": N_CLASSES}
    if cfg.attention != "none":
        if not supports_attention(cfg.arch):
            ok = [a for a in ARCHS if supports_attention(a)]
            raise ConfigError(f"attention={cfg.attention!r} is not supported by arch={cfg.arch!r}; use it with {ok}")
        kwargs["decoder_attention_type"] = cfg.attention
    if cfg.decoder_width is not None:
        kwargs.update(_decoder_kwargs(cfg.arch, int(cfg.decoder_width)))
    return kwargs


def check_model_config(cfg: ModelConfig) -> None:
    """Raise :class:`ConfigError` for a model that cannot be built (arch, encoder, attention,
    decoder width), before anything is written or trained."""
    _build_kwargs(cfg)


def build_model(cfg: ModelConfig) -> SteelNet | SteelClassifier:
    """Create the model a :class:`ModelConfig` describes (4 outputs, one per class)."""
    import segmentation_models_pytorch as smp

    kwargs = _build_kwargs(cfg)
    classify = cfg.task == "classify"
    has_aux = cfg.aux_weight > 0
    if has_aux and not classify:
        kwargs["aux_params"] = {"classes": N_CLASSES, "dropout": 0.2}
    factory = smp.encoders.get_encoder if classify else _arch_class(cfg.arch)
    # a node whose setup could not fetch these weights (python -m steel_ray.weights) fails at once
    weights.check(cfg.encoder, cfg.encoder_weights)
    try:
        net = factory(**kwargs)
    except (OSError, ConnectionError, RuntimeError) as e:
        if cfg.encoder_weights:  # recorded: this node's next trial with them fails at once
            raise weights.unavailable(cfg.encoder, cfg.encoder_weights, e) from e
        raise
    except (KeyError, ValueError) as e:
        if cfg.encoder_weights:
            raise ConfigError(f"encoder {cfg.encoder!r} has no {cfg.encoder_weights!r} weights: {e}") from e
        raise
    stride = int(getattr(net if classify else net.encoder, "output_stride", 32) or 32)
    if classify:
        return SteelClassifier(net, cfg.pool, cfg.dropout, stride)
    return SteelNet(net, stride, has_aux)


def encoder_parameters(model: SteelNet):
    """(encoder params, everything else): the two learning-rate groups."""
    enc = {id(p) for p in model.encoder.parameters()}
    rest = [p for p in model.parameters() if id(p) not in enc]
    return list(model.encoder.parameters()), rest
