"""Segmentation losses (built on segmentation_models_pytorch.losses), the aux-head loss and the classifier loss."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .config import ConfigError, LossConfig, check_registry

__all__ = ["SEG_LOSSES", "CLS_LOSSES", "build_loss", "SteelLoss", "PresenceLoss"]


def _smp():
    from segmentation_models_pytorch import losses

    return losses


def _bce(cfg: LossConfig):
    """smp's BCE on (B, 4, H, W) logits; ``pos_weight`` (4,) weights each class's positive pixels
    (shaped (4, 1, 1) to broadcast over the pixels)."""
    pw = None if cfg.pos_weight is None else torch.tensor(cfg.pos_weight, dtype=torch.float32).view(-1, 1, 1)
    return _smp().SoftBCEWithLogitsLoss(pos_weight=pw)


# name -> builder(LossConfig) of the mask loss; config validation reads the keys
SEG_LOSSES = {
    "bce": _bce,
    "dice": lambda cfg: _smp().DiceLoss(mode=_smp().MULTILABEL_MODE, from_logits=True),
    "bce_dice": lambda cfg: _Weighted([(cfg.bce_weight, _bce(cfg)),
                                       (1 - cfg.bce_weight, _smp().DiceLoss(mode=_smp().MULTILABEL_MODE, from_logits=True))]),
    "lovasz": lambda cfg: _smp().LovaszLoss(mode=_smp().MULTILABEL_MODE, per_image=True, from_logits=True),
    "focal": lambda cfg: _smp().FocalLoss(mode=_smp().MULTILABEL_MODE, gamma=cfg.focal_gamma),
}


def _focal_presence(logits, target, cfg: LossConfig):
    from torchvision.ops import sigmoid_focal_loss

    return sigmoid_focal_loss(logits, target, alpha=-1, gamma=cfg.focal_gamma, reduction="mean")


# name -> loss(presence logits, presence targets, LossConfig) of a classifier (task: classify)
CLS_LOSSES = {
    "bce": lambda logits, target, cfg: F.binary_cross_entropy_with_logits(
        logits, target, pos_weight=None if cfg.pos_weight is None else logits.new_tensor(cfg.pos_weight)),
    "focal": _focal_presence,
}
check_registry("loss", SEG_LOSSES)
check_registry("cls_loss", CLS_LOSSES)


def _seg_loss(cfg: LossConfig) -> nn.Module:
    if cfg.loss not in SEG_LOSSES:
        raise ConfigError(f"loss={cfg.loss!r} is not valid; choose one of {list(SEG_LOSSES)}")
    return SEG_LOSSES[cfg.loss](cfg)


class _Weighted(nn.Module):
    def __init__(self, parts):
        super().__init__()
        self.weights = [w for w, _ in parts]
        self.parts = nn.ModuleList([m for _, m in parts])

    def forward(self, logits, target):
        return sum(w * m(logits, target) for w, m in zip(self.weights, self.parts) if w)


class SteelLoss(nn.Module):
    """Mask loss plus ``aux_weight`` x BCE of the presence logits (when the model has an aux head).

    ``forward`` returns ``(total, parts)`` where parts holds the float value of each term.
    """

    def __init__(self, cfg: LossConfig, aux_weight: float = 0.0):
        super().__init__()
        self.seg = _seg_loss(cfg)
        self.aux_weight = float(aux_weight)

    def forward(self, mask_logits, masks, cls_logits=None, presence=None):
        seg = self.seg(mask_logits.float(), masks)
        total, parts = seg, {"seg_loss": seg.detach()}
        if cls_logits is not None and self.aux_weight > 0:
            aux = F.binary_cross_entropy_with_logits(cls_logits.float(), presence)
            total = total + self.aux_weight * aux
            parts["aux_loss"] = aux.detach()
        return total, parts


class PresenceLoss(nn.Module):
    """Classifier (task: classify) loss on the 4 presence logits: BCE, or sigmoid focal loss
    (torchvision's, no alpha balancing) with ``focal_gamma``. Same call as :class:`SteelLoss`;
    the masks are not used."""

    def __init__(self, cfg: LossConfig):
        super().__init__()
        self.cfg, self.fn = cfg, CLS_LOSSES[cfg.cls_loss]

    def forward(self, mask_logits, masks, cls_logits=None, presence=None):
        loss = self.fn(cls_logits.float(), presence, self.cfg)
        return loss, {"cls_loss": loss.detach()}


def build_loss(cfg: LossConfig, aux_weight: float = 0.0, task: str = "segment") -> SteelLoss | PresenceLoss:
    return PresenceLoss(cfg) if task == "classify" else SteelLoss(cfg, aux_weight)
