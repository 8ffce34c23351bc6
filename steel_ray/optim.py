"""Optimizers and learning-rate schedules: the registries (``OPTIMIZERS``, ``SCHEDULERS``) config
validation reads its choices from, and the builders the training loop uses."""
from __future__ import annotations

import torch
from torch.optim import lr_scheduler as lr_sched

from .config import WARMUP_SCHEDULERS, TrialConfig, check_registry
from .models import encoder_parameters

__all__ = ["OPTIMIZERS", "SCHEDULERS", "WARMUP_SCHEDULERS", "build_optimizer", "build_scheduler"]

# name -> (optimizer class, extra keyword arguments)
OPTIMIZERS = {
    "adam": (torch.optim.Adam, {}),
    "adamw": (torch.optim.AdamW, {}),
    "radam": (torch.optim.RAdam, {}),
    "sgd": (torch.optim.SGD, {"momentum": 0.9, "nesterov": True}),
}


def _cosine(opt, total: int, warm: int):
    return lr_sched.CosineAnnealingLR(opt, T_max=max(1, total - warm)), True


def _onecycle(opt, total: int, warm: int):
    return lr_sched.OneCycleLR(opt, max_lr=[g["lr"] for g in opt.param_groups], total_steps=max(1, total)), True


def _plateau(opt, total: int, warm: int):
    return lr_sched.ReduceLROnPlateau(opt, mode="min", factor=0.5, patience=1), False


def _constant(opt, total: int, warm: int):
    return None, True


# name -> builder(optimizer, total steps, warm-up steps) -> (scheduler or None, steps per batch?)
SCHEDULERS = {"cosine": _cosine, "onecycle": _onecycle, "plateau": _plateau, "none": _constant}
check_registry("optimizer", OPTIMIZERS)
check_registry("scheduler", SCHEDULERS)


def build_optimizer(cfg: TrialConfig, model):
    """The config's optimizer over two groups: the encoder (lr * encoder_lr_mult) and the rest (lr)."""
    o = cfg.optim
    enc, rest = encoder_parameters(model)
    groups = [{"params": enc, "lr": o.lr * o.encoder_lr_mult}, {"params": rest, "lr": o.lr}]
    cls, extra = OPTIMIZERS[o.optimizer]
    return cls(groups, weight_decay=o.weight_decay, **extra)


def build_scheduler(cfg: TrialConfig, opt, steps_per_epoch: int):
    """(scheduler, per_step): cosine and onecycle step per batch, plateau per epoch.

    ``warmup_steps`` prepends a linear warm-up from lr/100 (``WARMUP_SCHEDULERS`` only; the config
    refuses it with the others).
    """
    total = cfg.train.epochs * steps_per_epoch
    warm = min(cfg.train.warmup_steps, max(0, total - 1))
    name = cfg.optim.scheduler
    main, per_step = SCHEDULERS[name](opt, total, warm)
    if not warm or name not in WARMUP_SCHEDULERS:
        return main, per_step and main is not None
    ramp = lr_sched.LinearLR(opt, start_factor=0.01, end_factor=1.0, total_iters=warm)
    main = main or lr_sched.ConstantLR(opt, factor=1.0, total_iters=0)
    return lr_sched.SequentialLR(opt, [ramp, main], milestones=[warm]), True
