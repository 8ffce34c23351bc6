"""Segmentation losses (built on segmentation_models_pytorch.losses), the aux-head loss and the classifier loss."""
from __future__ import annotations

import torch.nn.functional as F
from torch import nn

from .config import LOSSES, ConfigError, LossConfig

__all__ = ["build_loss", "SteelLoss", "PresenceLoss"]


def _seg_loss(cfg: LossConfig) -> nn.Module:
    from segmentation_models_pytorch import losses as L

    if cfg.loss == "bce":
        return L.SoftBCEWithLogitsLoss()
    if cfg.loss == "dice":
        return L.DiceLoss(mode=L.MULTILABEL_MODE, from_logits=True)
    if cfg.loss == "bce_dice":
        return _Weighted(
            [(cfg.bce_weight, L.SoftBCEWithLogitsLoss()), (1 - cfg.bce_weight, L.DiceLoss(mode=L.MULTILABEL_MODE, from_logits=True))]
        )
    if cfg.loss == "lovasz":
        return L.LovaszLoss(mode=L.MULTILABEL_MODE, per_image=True, from_logits=True)
    if cfg.loss == "focal":
        return L.FocalLoss(mode=L.MULTILABEL_MODE, gamma=cfg.focal_gamma)
    raise ConfigError(f"loss={cfg.loss!r} is not valid; choose one of {list(LOSSES)}")


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
        self.kind, self.gamma = cfg.cls_loss, cfg.focal_gamma

    def forward(self, mask_logits, masks, cls_logits=None, presence=None):
        logits = cls_logits.float()
        if self.kind == "focal":
            from torchvision.ops import sigmoid_focal_loss

            loss = sigmoid_focal_loss(logits, presence, alpha=-1, gamma=self.gamma, reduction="mean")
        else:
            loss = F.binary_cross_entropy_with_logits(logits, presence)
        return loss, {"cls_loss": loss.detach()}


def build_loss(cfg: LossConfig, aux_weight: float = 0.0, task: str = "segment") -> SteelLoss | PresenceLoss:
    return PresenceLoss(cfg) if task == "classify" else SteelLoss(cfg, aux_weight)
