"""Train one (config, fold) and write its out-of-fold predictions. Pure PyTorch: no Ray here.

Usage::

    python -m steel_ray.train --data data/synth --out runs/one --fold 0 --folds 3 \
        [--config trial.yaml] [--set arch=FPN --set encoder=tu-test_efficientnet --set epochs=2]

Each epoch trains, validates with the competition metric (pixel threshold 0.5, no other
post-processing) at full resolution, reports ``{"epoch", "val_dice", "val_loss", ...}`` and
saves a checkpoint; a rerun resumes after the last finished epoch. At the end the best epoch's
weights predict the fold's validation images (with the config's flip TTA) into
``RUN/oof/model_id=<id>/fold=<k>/part-0.parquet``.
"""
from __future__ import annotations

import argparse
import dataclasses
import logging
import math
import os
import random
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch.utils.data import DataLoader

from . import oof, validate
from . import run as layout
from .config import ConfigError, TrialConfig, parse_set
from .data import DataError
from .dataset import BalancedSampler, SteelDataset, StepsSampler, build_transforms
from .infer import autocast, pick_device, predict_batch, to_device
from .io import atomic_path, write_json
from .losses import build_loss
from .models import build_model, check_model_config
from .optim import build_optimizer, build_scheduler
from .split import FOLD_SEED, FoldData, prepare_run  # noqa: F401 -- the split lives there (torch-free); the names stay here

__all__ = ["FoldData", "FoldResult", "prepare_run", "fit_fold", "checkpoint_dir", "load_weights", "NonFiniteLossError"]

log = logging.getLogger(__name__)
SYNC_EVERY = 25  # training steps between host syncs (loss read, NaN/inf check, progress bar)


class NonFiniteLossError(FloatingPointError):
    """The training loss became NaN or inf; the fold stops instead of training on garbage."""


def train_dataset(data: FoldData, fold: int, transform) -> tuple[torch.utils.data.Dataset, np.ndarray]:
    """The training split of ``fold`` (every other fold's images, plus the pseudo-labelled ones)
    and its presence (N, 4), for the balanced samplers."""
    ts = data.train
    tr_idx = np.flatnonzero(data.folds != fold)
    ids = np.asarray(ts.image_ids, dtype=object)
    ds = SteelDataset(ts.images_dir, ids[tr_idx], ts.rles[tr_idx], ts.shape, transform)
    presence = ts.presence[tr_idx]
    ex = data.extra_for(fold)
    if ex is None:
        return ds, presence
    pseudo = SteelDataset(ex.images_dir, list(ex.image_ids), ex.rles, ex.shape, transform)
    return torch.utils.data.ConcatDataset([ds, pseudo]), np.concatenate([presence, ex.presence])


@dataclass
class FoldResult:
    model_id: str
    fold: int
    epochs_run: int
    best_epoch: int
    best_val_dice: float  # at the best epoch (threshold 0.5)
    best_val_dice_pp: float  # post-processing chosen on the fold (what selects the best epoch)
    oof_path: str | None
    weights_path: str
    history: list = field(default_factory=list)


checkpoint_dir = layout.checkpoint_dir


def _num_workers(cfg: TrialConfig, dev: torch.device, cpus: float | None) -> int:
    """DataLoader workers: the config's ``num_workers``, else (null) the CPUs given to the trial
    when a GPU trains (the CPUs then only feed it), and 0 on CPU (the CPUs train)."""
    if cfg.data.num_workers is not None:
        return int(cfg.data.num_workers)
    if dev.type != "cuda":
        return 0
    return max(1, int(cpus if cpus is not None else (os.cpu_count() or 1)))


def _cuda_flags(deterministic: bool) -> None:
    """cuDNN autotuning for speed; ``deterministic`` trades it for reproducible kernels."""
    torch.backends.cudnn.benchmark = not deterministic
    torch.backends.cudnn.deterministic = deterministic
    torch.use_deterministic_algorithms(deterministic, warn_only=True)


def _seed_everything(seed: int, fold: int, epoch: int, transform) -> int:
    """Seed every RNG from (seed, fold, epoch): an epoch replays identically after a resume."""
    s = int(np.random.SeedSequence([seed, fold, epoch]).generate_state(1)[0])
    random.seed(s)
    np.random.seed(s)
    torch.manual_seed(s)
    transform.set_random_seed(s)
    return s


def _worker_init(worker_id: int) -> None:
    info = torch.utils.data.get_worker_info()
    s = torch.initial_seed() % 2**32
    random.seed(s)
    np.random.seed(s)
    for ds in getattr(info.dataset, "datasets", [info.dataset]):  # a ConcatDataset with pseudo labels
        ds.transform.set_random_seed(s)


def load_weights(path, device="cpu"):
    """Rebuild a model from a saved best-weights file (config travels inside it)."""
    blob = torch.load(path, map_location=device, weights_only=False)
    cfg = TrialConfig.from_dict(blob["config"])
    # the saved weights replace the pretrained ones: build without them (no download, works offline)
    model = build_model(dataclasses.replace(cfg.model, encoder_weights=None))
    model.load_state_dict(blob["model"])
    return model.to(device).eval(), cfg


@dataclass
class _FoldLoaders:
    """What one fold trains and validates on (datasets, sampler, validation loader, step counts)."""

    train_tf: object
    train_ds: object
    full_tf: object | None  # fine-tuning: whole images
    full_ds: object | None
    sampler: object | None
    val_loader: DataLoader
    batch_size: int
    drop_last: bool
    steps: int  # optimizer steps per epoch
    workers: int


def _fold_loaders(cfg: TrialConfig, data: FoldData, fold: int, dev, cpus) -> _FoldLoaders:
    ts = data.train
    base = cfg.data.resize or ts.shape
    if cfg.data.crop and (cfg.data.crop[0] > base[0] or cfg.data.crop[1] > base[1]):
        raise ConfigError(f"crop {cfg.data.crop[0]}x{cfg.data.crop[1]} does not fit the {base[0]}x{base[1]} training images")
    va_idx = np.flatnonzero(data.folds == fold)
    ids = np.asarray(ts.image_ids, dtype=object)
    train_tf = build_transforms(True, cfg.data.crop, cfg.data.resize, mask_dropout=cfg.data.mask_dropout)
    train_ds, train_presence = train_dataset(data, fold, train_tf)
    # fine-tuning epochs train on whole images (no crop, same resize): attention blocks and pooling
    # then see at training the input size they get at inference
    full_tf = build_transforms(True, None, cfg.data.resize, mask_dropout=cfg.data.mask_dropout) if cfg.train.finetune_epochs else None
    full_ds = train_dataset(data, fold, full_tf)[0] if full_tf else None
    val_ds = SteelDataset(ts.images_dir, ids[va_idx], ts.rles[va_idx], ts.shape, build_transforms(False, resize=cfg.data.resize),
                          full_size_mask=True)
    sampler = None if cfg.data.sampler == "none" else BalancedSampler(train_presence, cfg.data.sampler, cfg.train.seed)
    bs = cfg.data.batch_size
    if cfg.train.steps_per_epoch:  # an epoch is a fixed number of optimizer steps, whatever the data size
        sampler = StepsSampler(len(train_ds), cfg.train.steps_per_epoch * bs, sampler, cfg.train.seed)
    n_samples = len(sampler) if sampler is not None else len(train_ds)
    drop_last = n_samples >= bs
    nw = _num_workers(cfg, dev, cpus)
    # the validation loader lives for the whole fold: its workers persist; the training loader is
    # rebuilt each epoch because its workers are reseeded from (seed, fold, epoch) for resumable runs
    val_loader = DataLoader(val_ds, batch_size=bs, shuffle=False, num_workers=nw, pin_memory=dev.type == "cuda",
                            persistent_workers=nw > 0)
    return _FoldLoaders(train_tf, train_ds, full_tf, full_ds, sampler, val_loader, bs, drop_last,
                        n_samples // bs if drop_last else 1, nw)


def _epoch_loader(fl: _FoldLoaders, cfg: TrialConfig, fold: int, epoch: int, finetune: bool, dev) -> DataLoader:
    """The epoch's training loader, every RNG seeded from (seed, fold, epoch): a resumed epoch replays."""
    s = _seed_everything(cfg.train.seed, fold, epoch, fl.full_tf if finetune else fl.train_tf)
    if fl.sampler is not None:
        fl.sampler.set_epoch(epoch)
    bs, drop_last = fl.batch_size, fl.drop_last
    if finetune and cfg.train.finetune_batch_size:  # whole images: a smaller batch fits the card (same images per epoch)
        bs = cfg.train.finetune_batch_size
        drop_last = (len(fl.sampler) if fl.sampler is not None else len(fl.full_ds)) >= bs
    return DataLoader(fl.full_ds if finetune else fl.train_ds, batch_size=bs, shuffle=fl.sampler is None,
                      sampler=fl.sampler, num_workers=fl.workers, drop_last=drop_last, generator=torch.Generator().manual_seed(s),
                      worker_init_fn=_worker_init if fl.workers else None, pin_memory=dev.type == "cuda")


def _restore(last: Path, model_id: str, fold: int, model, opt, sched, scaler, dev) -> tuple:
    """(first epoch to run, best val_dice, best post-processed, best epoch, history) from last.pt, or a fresh start."""
    if not last.exists():
        return 1, -1.0, -1.0, 0, []
    st = torch.load(last, map_location=dev, weights_only=False)
    if st["model_id"] != model_id:
        raise DataError(f"{last}: checkpoint belongs to model {st['model_id']}, not {model_id}")
    model.load_state_dict(st["model"])
    opt.load_state_dict(st["optimizer"])
    if sched is not None:
        sched.load_state_dict(st["scheduler"])
    scaler.load_state_dict(st["scaler"])
    log.info("%s fold %d: resuming after epoch %d", model_id, fold, st["epoch"])
    return st["epoch"] + 1, st["best_val_dice"], st["best_val_dice_pp"], st["best_epoch"], st["history"]


def _train_epoch(step_model, model, loader, opt, sched, scaler, loss_fn, cfg: TrialConfig, dev, amp: bool, step_sched: bool,
                 label: str, progress: bool) -> tuple[float, tuple]:
    """One pass of optimizer steps; returns (mean training loss, the last batch's input size).

    The loss is summed on the device and read (one host sync) every SYNC_EVERY steps: a NaN/inf
    anywhere in the interval poisons the sum, so the check still stops the fold.
    """
    from tqdm import tqdm

    model.train()
    run_loss, seen, checked, total, size = torch.zeros((), dtype=torch.float64, device=dev), 0, 0, 0.0, ()
    bar = tqdm(loader, desc=label, leave=False, disable=not progress or None)
    n_steps = len(loader)
    for step, b in enumerate(bar):
        x = to_device(b["image"], dev)
        with autocast(dev, amp):
            logits, cls_logits = step_model(x)
        loss, _ = loss_fn(logits, b["mask"].to(dev, non_blocking=True), cls_logits, b["presence"].to(dev, non_blocking=True))
        opt.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        if cfg.train.grad_clip > 0:
            scaler.unscale_(opt)
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.train.grad_clip)
        scaler.step(opt)
        scaler.update()
        if step_sched:
            sched.step()
        run_loss += loss.detach().double() * len(x)
        seen += len(x)
        size = tuple(x.shape[-2:])
        if (step + 1) % SYNC_EVERY == 0 or step + 1 == n_steps:
            total = float(run_loss)
            if not math.isfinite(total):
                raise NonFiniteLossError(f"{label} steps {checked}-{step}: training loss is {total} "
                                         f"(lr={cfg.optim.lr}, loss={cfg.loss.loss}); stopping this fold")
            checked = step + 1
            bar.set_postfix(loss=f"{total / seen:.4f}")
    return total / max(seen, 1), size


def fit_fold(
    config: TrialConfig,
    fold: int,
    data: FoldData,
    out_dir,
    report: Callable[[dict], None] | None = None,
    *,
    device: str | None = "auto",
    write_oof: bool = True,
    progress: bool = True,
    cpus: float | None = None,
) -> FoldResult:
    """Train ``config`` on every fold but ``fold``, validate on ``fold``, write its OOF to ``out_dir``.

    ``out_dir`` is the run folder. Resumes from ``checkpoint_dir(out_dir, model_id, fold)/last.pt``
    when it exists. ``report`` is called after every epoch with that epoch's metrics; the last
    epoch's call comes after the OOF file is written.
    """
    if not 0 <= fold < data.n_folds:
        raise ConfigError(f"fold={fold} must be in 0..{data.n_folds - 1}")
    cfg = config
    run = Path(out_dir)
    model_id = cfg.model_id()
    ckdir, best_pt = checkpoint_dir(run, model_id, fold), layout.best_weights(run, model_id, fold)
    identity = {"config": cfg.to_dict(), "model_id": model_id, "fold": fold}  # what every saved weights file says it is
    dev = pick_device(device)
    amp = cfg.train.amp and dev.type == "cuda"
    fl = _fold_loaders(cfg, data, fold, dev, cpus)

    torch.manual_seed(cfg.train.seed)
    model = build_model(cfg.model).to(dev)
    if dev.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
        _cuda_flags(cfg.train.deterministic)
    # compiled for the training steps only; weights are saved from (and validation runs) the plain module
    step_model = torch.compile(model) if cfg.train.compile else model
    opt = build_optimizer(cfg, model)
    base_lrs = [g["lr"] for g in opt.param_groups]
    sched, per_step = build_scheduler(cfg, opt, fl.steps)
    scaler = torch.amp.GradScaler("cuda", enabled=amp and not torch.cuda.is_bf16_supported())
    loss_fn = build_loss(cfg.loss, cfg.model.aux_weight, cfg.model.task)

    done = _finished(run, model_id, fold, data.folds_hash) if write_oof else None
    if done is not None:
        return done
    last = ckdir / "last.pt"
    start, best, best_pp, best_epoch, history = _restore(last, model_id, fold, model, opt, sched, scaler, dev)
    write_json(ckdir / "config.json", cfg.to_dict())

    n_epochs = cfg.train.total_epochs
    for epoch in range(start, n_epochs + 1):
        t0 = time.time()
        finetune = epoch > cfg.train.epochs
        if finetune:  # constant lr * finetune_lr_mult (set every epoch: a resume lands here too)
            for g, lr in zip(opt.param_groups, base_lrs):
                g["lr"] = lr * cfg.train.finetune_lr_mult
        loader = _epoch_loader(fl, cfg, fold, epoch, finetune, dev)
        train_loss, size = _train_epoch(step_model, model, loader, opt, sched, scaler, loss_fn, cfg, dev, amp,
                                        per_step and not finetune, f"{model_id} fold {fold} epoch {epoch}", progress)
        val_loss, dm = validate.validate(model, fl.val_loader, loss_fn, dev, amp, data.train.shape)
        val_dice, val_pp = dm["val_dice"], dm["val_dice_pp"]
        if sched is not None and not per_step and not finetune:
            sched.step(val_loss)
        # the best epoch is the one the blend would do best with: highest post-processed Dice;
        # oof_epoch=last keeps the last epoch instead (no choice made on the fold's labels)
        if val_pp > best_pp or cfg.train.oof_epoch == "last":
            best_pp, best, best_epoch = val_pp, val_dice, epoch
            _save(best_pt, {**identity, "model": model.state_dict(), "epoch": epoch, "val_dice": val_dice})
        metrics = {
            "epoch": epoch, "train_loss": train_loss, "val_loss": val_loss, **dm,
            "best_val_dice": best, "best_val_dice_pp": best_pp, "best_epoch": best_epoch, "lr": opt.param_groups[-1]["lr"],
            "phase": "finetune" if finetune else "train",
            "train_size": "x".join(str(v) for v in size),  # the last batch's input size
            "train_batch_size": loader.batch_size,
            "epoch_seconds": time.time() - t0,
        }
        history.append(metrics)
        if cfg.train.avg_checkpoints > 1:  # this epoch's weights, while it is one of the K to average
            _save(ckdir / f"epoch{epoch}.pt", {"model": model.state_dict()})
            _drop_unkept(ckdir, averaged_epochs(history, cfg.train.avg_checkpoints, cfg.train.oof_epoch))
        _save(last, {
            **identity, "model": model.state_dict(), "optimizer": opt.state_dict(),
            "scheduler": sched.state_dict() if sched is not None else None, "scaler": scaler.state_dict(),
            "epoch": epoch, "best_val_dice": best, "best_val_dice_pp": best_pp, "best_epoch": best_epoch, "history": history,
        })
        log.info(
            "%s fold %d epoch %d/%d: train_loss %.4f val_loss %.4f val_dice %.4f post-processed %.4f (all-empty %.4f; "
            "best %.4f @ %d) %.1fs", model_id, fold, epoch, n_epochs, train_loss, val_loss, val_dice, val_pp,
            dm["val_all_empty"], best_pp, best_epoch, metrics["epoch_seconds"],
        )
        if report is not None and epoch < n_epochs:
            report({**metrics, "resumed_after": start - 1})

    oof_file = None
    if write_oof and cfg.train.avg_checkpoints > 1 and history:
        kept = averaged_epochs(history, cfg.train.avg_checkpoints, cfg.train.oof_epoch)
        model.load_state_dict(average_state_dicts([torch.load(ckdir / f"epoch{e}.pt", map_location=dev)["model"] for e in kept]))
        _, dm = validate.validate(model, fl.val_loader, loss_fn, dev, amp, data.train.shape)
        best, best_pp, best_epoch = dm["val_dice"], dm["val_dice_pp"], kept[-1]
        _save(best_pt, {**identity, "model": model.state_dict(), "epoch": best_epoch, "val_dice": best, "averaged_epochs": kept})
        # the final report is the averaged model's: what goes into the pool is what the search ranks
        history[-1] = {**history[-1], "best_val_dice": best, "best_val_dice_pp": best_pp, "best_epoch": best_epoch,
                       "averaged_epochs": ",".join(map(str, kept))}
        log.info("%s fold %d: the average of epochs %s: val_dice %.4f post-processed %.4f", model_id, fold, kept, best, best_pp)
    if write_oof:
        ex = data.extra_for(fold)
        # what the fold trained on, so that a reader of the pool sees whether a round's pseudo labels reached it
        extra = {"best_val_dice": best, "best_val_dice_pp": best_pp, "best_epoch": best_epoch, "epochs_run": len(history),
                 "history": history, "n_train_images": int((data.folds != fold).sum()),
                 "n_pseudo_images": len(ex.image_ids) if ex is not None else 0}
        oof_file = str(predict_oof(best_pt, fold, data, run, model_id, dev, cfg, progress, extra))
        last.unlink(missing_ok=True)  # the fold is finished (its OOF is the marker): best.pt is all that is needed
        _drop_unkept(ckdir, [])
    # The final epoch is reported only once its OOF is on disk: a scheduler may stop the
    # trial as soon as it sees the last epoch's result.
    if report is not None and history:
        report({**history[-1], "resumed_after": start - 1})
    return FoldResult(model_id, fold, len(history), best_epoch, best, best_pp, oof_file, str(best_pt), history)


def averaged_epochs(history: list[dict], k: int, policy: str) -> list[int]:
    """The epochs whose weights make the fold model (``avg_checkpoints`` = k): the last k (oof_epoch
    last), or the k best by val_dice_pp (oof_epoch best; ties to the later epoch), in epoch order."""
    if policy == "last":
        return [h["epoch"] for h in history[-k:]]
    ranked = sorted(history, key=lambda h: (h["val_dice_pp"], h["epoch"]), reverse=True)[:k]
    return sorted(h["epoch"] for h in ranked)


def average_state_dicts(states: list[dict]) -> dict:
    """The element-wise mean of several state dicts of one model (checkpoint averaging); integer
    buffers (BatchNorm's batch counters) are taken from the last."""
    out = {}
    for key, v in states[-1].items():
        out[key] = torch.stack([s[key].float() for s in states]).mean(0).to(v.dtype) if v.is_floating_point() else v.clone()
    return out


def _drop_unkept(ckdir: Path, keep: list[int]) -> None:
    """Delete the per-epoch weights not among ``keep`` (a resumed fold may find a later epoch's
    file, saved just before an interruption)."""
    for f in ckdir.glob("epoch*.pt"):
        if int(f.stem[5:]) not in keep:
            f.unlink(missing_ok=True)


def _finished(run: Path, model_id: str, fold: int, fold_hash: str) -> FoldResult | None:
    """The result of a fold that is already done (its OOF of this split and its best weights exist)."""
    path = oof.oof_path(run, model_id, fold)
    best_pt = layout.best_weights(run, model_id, fold)
    meta = oof.finished(oof.read_meta(path) if path.exists() and best_pt.exists() else None, fold_hash, path)
    if meta is None:
        return None
    log.info("%s fold %d: already finished (%s); nothing to do", model_id, fold, path)
    return FoldResult(model_id, fold, int(meta.get("epochs_run", 0)), int(meta.get("best_epoch", 0)),
                      float(meta.get("best_val_dice", float("nan"))), float(meta.get("best_val_dice_pp", float("nan"))),
                      str(path), str(best_pt), list(meta.get("history", [])))


def _save(path: Path, obj) -> None:
    with atomic_path(path) as tmp:
        torch.save(obj, tmp)


def predict_oof(weights, fold, data: FoldData, run, model_id, device, cfg: TrialConfig, progress=True, extra=None) -> Path:
    """Predict fold ``fold``'s validation images with ``weights`` and write the OOF Parquet."""
    from tqdm import tqdm

    model, _ = load_weights(weights, device)
    if device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    ts = data.train
    va_idx = np.flatnonzero(data.folds == fold)
    ids = [ts.image_ids[i] for i in va_idx]
    ds = SteelDataset(ts.images_dir, ids, None, ts.shape, build_transforms(False, resize=cfg.data.resize), full_size_mask=True)
    loader = DataLoader(ds, batch_size=cfg.data.batch_size, shuffle=False, num_workers=_num_workers(cfg, device, None),
                        pin_memory=device.type == "cuda")
    h, w = ts.shape
    task = cfg.model.task
    with oof.OOFWriter(run, model_id, fold, h, w, data.folds_hash, cfg.to_dict(), extra=extra, task=task) as wr:
        for b in tqdm(loader, desc=f"oof {model_id} f{fold}", leave=False, disable=not progress or None):
            probs, cls = predict_batch(model, b["image"], (h, w), cfg.train.tta, cfg.train.amp)
            maps = None if probs is None else oof.quantize(probs.cpu().numpy())
            wr.add([ids[i] for i in b["index"].tolist()], maps, cls.cpu().numpy())
    log.info("wrote OOF %s (%d images)", wr.path, wr.rows)
    return wr.path


def load_config(path: str | None, sets: list[str] | None) -> TrialConfig:
    """YAML file (flat keys) overridden by ``--set key=value`` items."""
    import yaml

    flat = {}
    if path:
        try:
            flat = yaml.safe_load(Path(path).read_text()) or {}
        except FileNotFoundError:
            raise ConfigError(f"{path}: config file not found") from None
        if not isinstance(flat, dict):
            raise ConfigError(f"{path}: expected a mapping of config keys, got {type(flat).__name__}")
    flat.update(parse_set(sets))
    return TrialConfig.from_dict(flat)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m steel_ray.train", description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", required=True, help="Severstal-layout folder (train.csv, train_images/)")
    ap.add_argument("--out", required=True, help="run folder (folds, checkpoints, oof/)")
    ap.add_argument("--fold", type=int, required=True, help="the fold to validate on (0..FOLDS-1); the others train")
    ap.add_argument("--folds", type=int, default=5, help="number of folds (default 5)")
    ap.add_argument("--config", help="YAML file of flat trial config keys")
    ap.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a config key (repeatable)")
    ap.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"], help="auto (default): CUDA when a GPU is visible")
    a = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    try:
        # everything that can be checked is checked before the run folder is written
        cfg = load_config(a.config, a.set)
        check_model_config(cfg.model)
        if not 0 <= a.fold < a.folds:
            raise ConfigError(f"--fold {a.fold} must be in 0..{a.folds - 1} (--folds {a.folds})")
        data = prepare_run(a.data, a.out, a.folds)
        res = fit_fold(cfg, a.fold, data, a.out, device=a.device)
    except (ConfigError, DataError, NonFiniteLossError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"{res.model_id} fold {res.fold}: best epoch {res.best_epoch}: val_dice {res.best_val_dice:.4f} at threshold 0.5, "
          f"{res.best_val_dice_pp:.4f} post-processed; OOF {res.oof_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
