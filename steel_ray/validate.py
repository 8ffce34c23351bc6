"""A fold's validation after each epoch: the competition metric at full resolution (threshold 0.5),
the post-processed Dice the blend's exact search finds on the fold (:class:`PPCounts`), the
classifiers' presence metrics (:func:`gate_metrics`) and the validation loss."""
from __future__ import annotations

import numpy as np
import torch

from . import postprocess as ps
from .infer import autocast, to_device
from .metric import dice_per_pair_torch
from .models import SteelClassifier
from .postprocess import default_grid


class PPCounts:
    """Per-image histograms of the quantised probabilities (all pixels, true pixels) and presence,
    accumulated batch by batch: the exact post-processing search of the blend (threshold x min
    area x gate) on one fold without keeping any map (a few KiB per image)."""

    def __init__(self):
        self.h_all, self.h_true, self.cls = [], [], []

    def add(self, probs, truth, cls):
        """``probs`` (B, C, H, W) float in [0, 1], ``truth`` (B, C, H, W) bool, ``cls`` (B, C)."""
        b, c = probs.shape[:2]
        q = torch.round(probs * 255).to(torch.int64).reshape(b * c, -1)  # the OOF quantisation
        key = (torch.arange(b * c, device=q.device)[:, None] * 256 + q).reshape(-1)
        t = truth.reshape(-1)
        self.h_all.append(torch.bincount(key, minlength=b * c * 256).reshape(b, c, 256).cpu().numpy())
        self.h_true.append(torch.bincount(key[t], minlength=b * c * 256).reshape(b, c, 256).cpu().numpy())
        self.cls.append(cls.float().cpu().numpy())

    def score(self, shape) -> float:
        """Mean pair Dice after per-class post-processing chosen on these images (in-sample)."""
        h_all, h_true, cls = np.concatenate(self.h_all), np.concatenate(self.h_true), np.concatenate(self.cls)
        grid = ps.default_grid(shape)
        n, n_cls = h_all.shape[:2]
        total = 0.0
        for c in range(n_cls):
            area, inter = ps.counts_from_histograms(h_all[:, c], h_true[:, c], grid.levels)
            tables = ps.tables_from_counts(area, inter, h_true[:, c].sum(1), 1.0, cls[:, c], np.zeros(n, int), 1, grid)
            total += ps.in_sample(tables, grid)[0]
        return total / (n * n_cls)


def gate_metrics(presence: np.ndarray, truth: np.ndarray) -> dict:
    """A classifier's validation metrics from its presence (N, 4) and the truth (N, 4) bool.

    ``val_auc_1..4`` and ``val_auc`` (mean over classes with both labels; NaN where a class has
    one) rank it; ``val_dice`` is the competition Dice of the gate alone at presence 0.5: every
    pair it calls present gets a mask (the true one where there is a defect, a false-positive
    mask where there is none: Dice 0), every other pair is empty; so it is the gate's pair
    accuracy. ``val_dice_pp`` is the same with each class's threshold chosen on the fold from the
    blend's gate grid (never-present included, so it is at least all-empty), like the
    segmentation models' post-processed Dice.
    """
    from sklearn.metrics import roc_auc_score

    truth = np.asarray(truth, bool)
    out = {"val_dice": float(((presence >= 0.5) == truth).mean()), "val_all_empty": float((~truth).mean())}
    ths = np.append(default_grid((1, 1)).cls_thresholds, np.inf)
    pp, aucs = 0.0, []
    for c in range(truth.shape[1]):
        t, p = truth[:, c], presence[:, c]
        auc = float(roc_auc_score(t, p)) if 0 < t.sum() < len(t) else float("nan")
        aucs.append(auc)
        out[f"val_auc_{c + 1}"] = auc
        out[f"val_dice_{c + 1}"] = float(((p >= 0.5) == t).mean())
        out[f"val_all_empty_{c + 1}"] = float((~t).mean())
        pp += max(float(((p >= th) == t).mean()) for th in ths)
    out["val_auc"] = float(np.nanmean(aucs)) if np.isfinite(aucs).any() else float("nan")
    out["val_dice_pp"] = pp / truth.shape[1]
    return out


def validate_classifier(model, loader, loss_fn, device, amp) -> tuple[float, dict]:
    """(val_loss, :func:`gate_metrics`) of a classifier on the fold."""
    model.eval()
    total, n, pres, truth = 0.0, 0, [], []
    with torch.no_grad():
        for b in loader:
            x = to_device(b["image"], device)
            with autocast(device, amp):
                _, cls_logits = model(x)
            target = b["presence"].to(device)
            loss, _ = loss_fn(None, None, cls_logits, target)
            total += float(loss) * len(x)
            n += len(x)
            pres.append(torch.sigmoid(cls_logits.float()).cpu().numpy())
            truth.append(b["presence"].numpy() > 0.5)
    return total / max(n, 1), gate_metrics(np.concatenate(pres), np.concatenate(truth))


def validate(model, loader, loss_fn, device, amp, shape) -> tuple[float, dict]:
    """(val_loss, metrics): Dice at threshold 0.5 (overall, per class, all-empty) and the post-processed Dice of the fold."""
    if isinstance(model, SteelClassifier):
        return validate_classifier(model, loader, loss_fn, device, amp)
    model.eval()
    total, n = 0.0, 0
    dice, empty = [], []
    pp = PPCounts()
    with torch.no_grad():
        for b in loader:
            x = to_device(b["image"], device)
            masks = b["mask"].to(device, non_blocking=True)
            with autocast(device, amp):
                logits, cls_logits = model(x)
            logits = logits.float()
            if tuple(logits.shape[-2:]) != tuple(shape):
                logits = torch.nn.functional.interpolate(logits, size=tuple(shape), mode="bilinear", align_corners=False)
            loss, _ = loss_fn(logits, masks, cls_logits, b["presence"].to(device))
            total += float(loss) * len(x)
            n += len(x)
            dice.append(dice_per_pair_torch(logits > 0, masks > 0.5).cpu())  # sigmoid >= 0.5 <=> logit >= 0
            empty.append((masks.amax(dim=(-2, -1)) <= 0.5).cpu())
            probs = torch.sigmoid(logits)
            pres = torch.sigmoid(cls_logits.float()) if cls_logits is not None else probs.amax(dim=(-2, -1))
            pp.add(probs, masks > 0.5, pres)
    return total / max(n, 1), {**dice_metrics(torch.cat(dice).numpy(), torch.cat(empty).numpy()), "val_dice_pp": pp.score(shape)}


def dice_metrics(pair_dice: np.ndarray, empty: np.ndarray) -> dict:
    """val_dice, per-class val_dice_1..4 and the all-empty score of the same pairs."""
    out = {"val_dice": float(pair_dice.mean()), "val_all_empty": float(empty.mean())}
    for c in range(pair_dice.shape[1]):
        out[f"val_dice_{c + 1}"] = float(pair_dice[:, c].mean())
        out[f"val_all_empty_{c + 1}"] = float(empty[:, c].mean())
    return out
