"""Model inference shared by out-of-fold prediction and submission: TTA, upsampling, presence.

One code path turns a batch of images into full-resolution probabilities and per-class
presence probabilities, so OOF scores and submissions cannot drift apart.
"""
from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F

from .config import check_registry

__all__ = ["TTA_FLIPS", "VIEWS", "tta_views", "predict_batch", "autocast", "pick_device", "to_device"]

# dims to flip for each TTA view of an NCHW batch
TTA_FLIPS = {
    "none": [()],
    "hflip": [(), (3,)],
    "vflip": [(), (2,)],
    "hflip_vflip": [(), (3,), (2,), (2, 3)],
}
check_registry("tta", TTA_FLIPS)
# single views, for an explicit list such as "none,hflip,vflip" (exactly those views)
VIEWS = {"none": (), "hflip": (3,), "vflip": (2,), "hvflip": (2, 3)}


def tta_views(spec: str) -> list[tuple]:
    """Flip dims of each TTA view: a config name (``TTA_FLIPS``, a set of views) or a comma list of ``VIEWS``.

    Each view has one name (``hvflip`` is the one view flipped both ways); ``hflip_vflip`` is the
    trial config's name for the set of all four views, not a view.
    """
    if spec in TTA_FLIPS:
        return list(TTA_FLIPS[spec])
    names = [p.strip() for p in str(spec).split(",") if p.strip()]
    bad = [p for p in names if p not in VIEWS]
    if bad or not names:
        sets = "; ".join(f"{k} = {','.join(_view_name(v) for v in vs)}" for k, vs in TTA_FLIPS.items() if k != "none")
        raise ValueError(f"TTA {spec!r}: unknown view(s) {bad}; give a comma list of the views {', '.join(VIEWS)} "
                         f"(hvflip: flipped both ways at once), or a trial config's tta set ({sets})")
    return list(dict.fromkeys(VIEWS[p] for p in names))


def _view_name(dims: tuple) -> str:
    return next(k for k, v in VIEWS.items() if v == dims)


def pick_device(device: str | None = "auto") -> torch.device:
    """``auto``: CUDA when a GPU is visible (Ray sets CUDA_VISIBLE_DEVICES per trial), else CPU."""
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("device=cuda requested but no CUDA GPU is visible")
    return torch.device(device)


def to_device(images: torch.Tensor, device: torch.device) -> torch.Tensor:
    """An NCHW image batch on ``device``: channels_last on CUDA (what its convolution kernels prefer)."""
    x = images.to(device, non_blocking=True)
    return x.contiguous(memory_format=torch.channels_last) if device.type == "cuda" else x


def autocast(device: torch.device, enabled: bool = True):
    """bf16 autocast on CUDA where supported, fp16 otherwise; nothing on CPU."""
    if device.type != "cuda" or not enabled:
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.autocast("cuda", dtype=dtype)


@torch.no_grad()
def predict_batch(model, images: torch.Tensor, out_size, tta="none", amp: bool = True):
    """Probabilities ``(B, 4, H, W)`` at ``out_size`` (None for a classifier) and presence ``(B, 4)``, averaged over TTA.

    ``tta`` is a spec for :func:`tta_views` or a list of flip-dim tuples; ``amp`` is the
    model's own setting (its config's ``amp``): OOF maps and submissions are computed alike.

    Presence is the aux head's sigmoid when the model has one, else the max pixel probability.
    """
    device = next(model.parameters()).device
    x = to_device(images, device)
    probs, cls = 0.0, 0.0
    views = tta_views(tta) if isinstance(tta, str) else list(tta)
    for dims in views:
        xi = torch.flip(x, dims) if dims else x
        with autocast(device, amp):
            logits, cls_logits = model(xi)
        if cls_logits is not None:  # image-level: the same for a flipped view
            cls = cls + torch.sigmoid(cls_logits.float())
        if logits is None:  # a classifier (task: classify) has no masks
            probs = None
            continue
        logits = logits.float()
        if dims:
            logits = torch.flip(logits, dims)
        if tuple(logits.shape[-2:]) != tuple(out_size):
            logits = F.interpolate(logits, size=tuple(out_size), mode="bilinear", align_corners=False)
        probs = probs + torch.sigmoid(logits)
    if probs is not None:
        probs = probs / len(views)
    if model.has_aux:
        cls = cls / len(views)
    else:
        cls = probs.amax(dim=(2, 3))
    return probs, cls
