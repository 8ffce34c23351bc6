"""Trial configuration: a flat dict (YAML, CLI ``--set``, a Tune sample) -> frozen dataclasses.

Config flows one way: the flat dict is validated here, once, and only the typed
:class:`TrialConfig` goes further. Unknown keys and invalid values are errors that name the
key, the value and what is allowed.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, fields
from typing import Any

__all__ = [
    "ConfigError",
    "ModelConfig",
    "LossConfig",
    "OptimConfig",
    "DataConfig",
    "TrainConfig",
    "TrialConfig",
    "ARCHS",
    "TASKS",
    "POOLS",
    "registry",
    "parse_set",
]

ARCHS = ("Unet", "UnetPlusPlus", "FPN", "PSPNet", "Linknet", "DeepLabV3Plus", "DeepLabV3", "MAnet", "PAN")
ATTENTIONS = ("none", "scse")
ENCODER_WEIGHTS = (None, "imagenet")
TASKS = ("segment", "classify")
POOLS = ("avg", "max", "avgmax")
OOF_EPOCHS = ("best", "last")


# The choices of the keys implemented in the training modules (losses, optim, dataset, infer), written
# here once so that validating a config needs neither torch nor those modules (no import cycle); each
# of those registries checks at import that it implements exactly these (check_registry).
CHOICES = {
    "loss": ("bce", "dice", "bce_dice", "lovasz", "focal"),
    "cls_loss": ("bce", "focal"),
    "optimizer": ("adam", "adamw", "radam", "sgd"),
    "scheduler": ("cosine", "onecycle", "plateau", "none"),
    "sampler": ("none", "upsample", "downsample", "weighted"),
    "tta": ("none", "hflip", "vflip", "hflip_vflip"),
}
WARMUP_SCHEDULERS = ("cosine", "none")  # onecycle warms up by itself; plateau steps per epoch


def registry(key: str) -> tuple:
    """The valid choices of a config key whose implementations live in a registry elsewhere."""
    if key not in CHOICES:
        raise KeyError(f"no registry for config key {key!r}")
    return CHOICES[key]


def check_registry(key: str, implemented) -> None:
    """Called by each registry at import: it implements exactly the choices config validates."""
    if tuple(implemented) != CHOICES[key]:
        raise RuntimeError(f"the {key} registry implements {tuple(implemented)}, config.CHOICES lists {CHOICES[key]}: "
                           "change both together")


class ConfigError(ValueError):
    """An invalid trial config; the message names the key, the value and the valid choices."""


def _choice(key, value, choices):
    if value not in choices:
        raise ConfigError(f"{key}={value!r} is not valid; choose one of {list(choices)}")


def _number(key, value, kind, low=None, high=None, low_open=False):
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigError(f"{key}={value!r} must be a number")
    if kind is int and float(value) != int(value):
        raise ConfigError(f"{key}={value!r} must be an integer")
    value = kind(value)
    if low is not None and (value < low or (low_open and value == low)):
        op = ">" if low_open else ">="
        raise ConfigError(f"{key} {op} {low} must hold, but got {key}={value}")
    if high is not None and value > high:
        raise ConfigError(f"{key} <= {high} must hold, but got {key}={value}")
    return value


@dataclass(frozen=True)
class ModelConfig:
    task: str = "segment"  # segment: masks; classify: 4 image-level presence logits (the gate)
    arch: str = "Unet"
    encoder: str = "resnet34"
    encoder_weights: str | None = None
    attention: str = "none"
    aux_weight: float = 0.0  # 0 = no auxiliary classification head
    decoder_width: int | None = None  # decoder channels at the coarsest stage (smp default 256); None = default
    pool: str = "avg"  # classify: pooling of the encoder's last feature map (avg, max, or both concatenated)
    dropout: float = 0.0  # classify: dropout before the linear head


@dataclass(frozen=True)
class LossConfig:
    loss: str = "bce_dice"
    focal_gamma: float = 2.0
    bce_weight: float = 0.75
    cls_loss: str = "bce"  # classify: presence loss (bce or focal with focal_gamma)
    # per-class weight of the positive pixels (presences) in BCE, e.g. (2, 2, 1, 1.5) as the 1st-place
    # team; None = 1 for every class. Losses bce and bce_dice (and cls_loss bce) only
    pos_weight: tuple | None = None


@dataclass(frozen=True)
class OptimConfig:
    optimizer: str = "adamw"
    lr: float = 3e-4
    encoder_lr_mult: float = 1.0
    weight_decay: float = 1e-4
    scheduler: str = "cosine"


@dataclass(frozen=True)
class DataConfig:
    batch_size: int = 8
    crop_height: int | None = None
    crop_width: int | None = None
    resize_height: int | None = None
    resize_width: int | None = None
    sampler: str = "none"
    # albumentations' MaskDropout on the defects (the 1st-place team's "defect blackout": a defect's
    # region set to black and removed from the masks), applied with this probability in training
    mask_dropout: float = 0.0
    num_workers: int | None = None  # DataLoader workers; None: the trial's CPUs on CUDA, 0 on CPU

    @property
    def crop(self):
        return (self.crop_height, self.crop_width) if self.crop_height else None

    @property
    def resize(self):
        return (self.resize_height, self.resize_width) if self.resize_height else None


@dataclass(frozen=True)
class TrainConfig:
    epochs: int = 10
    steps_per_epoch: int | None = None  # optimizer steps per epoch (draws with replacement); None = one pass
    warmup_steps: int = 0  # linear learning-rate warm-up from lr/100 (cosine/onecycle/none schedulers)
    seed: int = 0
    tta: str = "hflip"  # test-time augmentation for the out-of-fold predictions
    amp: bool = True  # mixed precision on CUDA (bf16 where supported); ignored on CPU
    grad_clip: float = 0.0  # max gradient norm, 0 = off
    oof_epoch: str = "last"  # the weights kept for the OOF and predict: last epoch, or best (by val_dice_pp, chosen on the fold it predicts)
    deterministic: bool = False  # CUDA: reproducible kernels instead of cuDNN autotuning (slower)
    compile: bool = False  # torch.compile the model for the training steps
    finetune_epochs: int = 0  # more epochs on whole images (no crop, same resize) after the crop epochs
    finetune_lr_mult: float = 0.1  # learning rate of the fine-tuning epochs, times lr (constant)
    finetune_batch_size: int | None = None  # batch of the fine-tuning epochs (whole images need more memory); None = batch_size
    # the fold model is the average of the weights of K epochs: the K best by val_dice_pp (oof_epoch
    # best) or the last K (oof_epoch last); 12th place reports +0.3-0.5% from averaging its best epochs
    avg_checkpoints: int = 1

    @property
    def total_epochs(self) -> int:
        """Crop epochs plus fine-tuning epochs: the epoch count ASHA and the reports see."""
        return self.epochs + self.finetune_epochs


_SECTIONS = {"model": ModelConfig, "loss": LossConfig, "optim": OptimConfig, "data": DataConfig, "train": TrainConfig}
# keys that change neither the model nor its predictions (not part of the model id)
_RUNTIME_KEYS = {"num_workers", "compile"}
# keys that mean something for one task only: setting one for the other task is an error
SEGMENT_ONLY = ("arch", "attention", "aux_weight", "decoder_width", "loss", "bce_weight")
CLASSIFY_ONLY = ("pool", "dropout", "cls_loss")


@dataclass(frozen=True)
class TrialConfig:
    model: ModelConfig = ModelConfig()
    loss: LossConfig = LossConfig()
    optim: OptimConfig = OptimConfig()
    data: DataConfig = DataConfig()
    train: TrainConfig = TrainConfig()

    @staticmethod
    def keys() -> list[str]:
        return [f.name for cls in _SECTIONS.values() for f in fields(cls)]

    @classmethod
    def from_dict(cls, flat: dict[str, Any] | None = None) -> "TrialConfig":
        """Build and validate from a flat dict; missing keys take their defaults."""
        flat = dict(flat or {})
        if str(flat.get("encoder_weights")).lower() in ("none", "null"):
            flat["encoder_weights"] = None
        if "pos_weight" in flat:
            flat["pos_weight"] = _pos_weight(flat["pos_weight"])
        valid = cls.keys()
        unknown = sorted(set(flat) - set(valid))
        if unknown:
            raise ConfigError(f"unknown config key(s) {unknown}; valid keys are {valid}")
        parts = {}
        for name, sec in _SECTIONS.items():
            kw = {f.name: flat[f.name] for f in fields(sec) if f.name in flat}
            parts[name] = sec(**kw)
        cfg = cls(**parts)
        cfg.validate()
        task = cfg.model.task
        wrong = CLASSIFY_ONLY if task == "segment" else SEGMENT_ONLY
        defaults = TrialConfig().to_dict()
        bad = sorted(k for k in wrong if k in flat and flat[k] != defaults[k])
        if bad:
            other = "classify" if task == "segment" else "segment"
            raise ConfigError(f"key(s) {bad} apply to task {other!r} only, but this config has task={task!r}")
        return cfg

    def to_dict(self) -> dict[str, Any]:
        out = {}
        for name in _SECTIONS:
            out.update(asdict(getattr(self, name)))
        return out

    def replace(self, **changes) -> "TrialConfig":
        return TrialConfig.from_dict({**self.to_dict(), **changes})

    def model_id(self) -> str:
        """Stable, readable id of the model this config trains (same config -> same id)."""
        # keys of the other task do not describe this model (segmentation ids predate the classify task)
        other = set(CLASSIFY_ONLY) | {"task"} if self.model.task == "segment" else set(SEGMENT_ONLY)
        if not self.train.finetune_epochs:  # no fine-tuning: its settings do not describe the model
            other |= {"finetune_epochs", "finetune_lr_mult", "finetune_batch_size"}
        h = identity_hash({k: v for k, v in self.to_dict().items() if k not in other}, _DEFAULTS)
        enc = self.model.encoder.replace("/", "_")
        if self.model.task == "classify":
            return f"cls-{enc}-{self.loss.cls_loss}-{h}"
        return f"{self.model.arch.lower()}-{enc}-{self.loss.loss}-{h}"

    def validate(self) -> None:
        m, lo, op, da, tr = self.model, self.loss, self.optim, self.data, self.train
        _choice("task", m.task, TASKS)
        _choice("pool", m.pool, POOLS)
        _number("dropout", m.dropout, float, 0, 0.95)
        _choice("cls_loss", lo.cls_loss, registry("cls_loss"))
        _choice("arch", m.arch, ARCHS)
        if not isinstance(m.encoder, str) or not m.encoder:
            raise ConfigError(f"encoder={m.encoder!r} must be an encoder name such as 'resnet34' or 'tu-resnet34'")
        _choice("encoder_weights", m.encoder_weights, ENCODER_WEIGHTS)
        _choice("attention", m.attention, ATTENTIONS)
        _number("aux_weight", m.aux_weight, float, 0)
        if m.decoder_width is not None:
            _number("decoder_width", m.decoder_width, int, 16)
        _choice("loss", lo.loss, registry("loss"))
        _number("focal_gamma", lo.focal_gamma, float, 0)
        _number("bce_weight", lo.bce_weight, float, 0, 1)
        if lo.pos_weight is not None:
            if m.task == "segment" and lo.loss not in ("bce", "bce_dice"):
                raise ConfigError(f"pos_weight={list(lo.pos_weight)} weights BCE: it works with loss bce or bce_dice, "
                                  f"not {lo.loss!r}")
            if m.task == "classify" and lo.cls_loss != "bce":
                raise ConfigError(f"pos_weight={list(lo.pos_weight)} weights BCE: it works with cls_loss bce, not {lo.cls_loss!r}")
        _number("mask_dropout", da.mask_dropout, float, 0, 1)
        _choice("optimizer", op.optimizer, registry("optimizer"))
        _number("lr", op.lr, float, 0, low_open=True)
        _number("encoder_lr_mult", op.encoder_lr_mult, float, 0)
        _number("weight_decay", op.weight_decay, float, 0)
        _choice("scheduler", op.scheduler, registry("scheduler"))
        _number("epochs", tr.epochs, int, 1)
        if tr.steps_per_epoch is not None:
            _number("steps_per_epoch", tr.steps_per_epoch, int, 1)
        _number("warmup_steps", tr.warmup_steps, int, 0)
        _number("finetune_epochs", tr.finetune_epochs, int, 0)
        _number("finetune_lr_mult", tr.finetune_lr_mult, float, 0, low_open=True)
        if tr.finetune_batch_size is not None:
            _number("finetune_batch_size", tr.finetune_batch_size, int, 1)
        _number("avg_checkpoints", tr.avg_checkpoints, int, 1)
        if tr.avg_checkpoints > tr.total_epochs:
            raise ConfigError(f"avg_checkpoints={tr.avg_checkpoints} exceeds the {tr.total_epochs} epoch(s) of the config")
        if tr.warmup_steps and op.scheduler not in WARMUP_SCHEDULERS:
            raise ConfigError(f"warmup_steps={tr.warmup_steps} works with scheduler cosine or none, not {op.scheduler!r} "
                              "(onecycle warms up by itself)")
        _number("seed", tr.seed, int, 0)
        _choice("tta", tr.tta, registry("tta"))
        _choice("oof_epoch", tr.oof_epoch, OOF_EPOCHS)
        for key in ("amp", "deterministic", "compile"):
            if not isinstance(getattr(tr, key), bool):
                raise ConfigError(f"{key}={getattr(tr, key)!r} must be true or false")
        _number("grad_clip", tr.grad_clip, float, 0)
        _number("batch_size", da.batch_size, int, 1)
        if da.num_workers is not None:
            _number("num_workers", da.num_workers, int, 0)
        _choice("sampler", da.sampler, registry("sampler"))
        for a, b in (("crop_height", "crop_width"), ("resize_height", "resize_width")):
            va, vb = getattr(da, a), getattr(da, b)
            if (va is None) != (vb is None):
                raise ConfigError(f"{a} and {b} must be set together, but got {a}={va}, {b}={vb}")
            if va is not None:
                for k, v in ((a, va), (b, vb)):
                    v = _number(k, v, int, 32)
                    # crops are cut at the encoder stride; a resized image is padded to it by the model
                    if v % 32 and a.startswith("crop"):
                        raise ConfigError(f"{k}={v} must be a multiple of 32 (encoder stride)")
        if da.crop and da.resize and (da.crop[0] > da.resize[0] or da.crop[1] > da.resize[1]):
            raise ConfigError(
                f"crop {da.crop[0]}x{da.crop[1]} must fit in resize {da.resize[0]}x{da.resize[1]}"
            )


def _pos_weight(v):
    """pos_weight as given (a list of 4 numbers, a string "2,2,1,1.5" as search spaces write it, or
    none) -> a tuple of 4 positive floats or None."""
    if v is None or (isinstance(v, str) and v.strip().lower() in ("", "none", "null")):
        return None
    items = v.split(",") if isinstance(v, str) else v
    try:
        out = tuple(float(x) for x in items)
    except (TypeError, ValueError):
        out = ()
    if len(out) != 4 or min(out) <= 0:
        raise ConfigError(f"pos_weight={v!r} must be 4 positive numbers, one per class (e.g. [2, 2, 1, 1.5] or \"2,2,1,1.5\")")
    return out


def model_ids(configs) -> list[str]:
    """The model id of each flat config (a search state's ``selected``, a round's member configs)."""
    return [TrialConfig.from_dict(c).model_id() for c in configs]


def parse_set(items: list[str] | None) -> dict[str, Any]:
    """``["lr=1e-3", "arch=FPN"]`` -> ``{"lr": 0.001, "arch": "FPN"}`` (values parsed as YAML)."""
    import yaml

    out = {}
    for item in items or []:
        if "=" not in item:
            raise ConfigError(f"--set {item!r} must look like key=value")
        k, v = item.split("=", 1)
        val = yaml.safe_load(v) if v.strip() else None
        if isinstance(val, str):  # YAML 1.1 reads "1e-3" as a string
            try:
                val = float(val)
            except ValueError:
                pass
        out[k.strip()] = val
    return out


# How model ids are made: 1 hashed every key (each key added later had to be special-cased or every
# pool stopped matching); 2 hashes only the keys that differ from their defaults, so a new key with
# a default keeps every id. Changing a default changes what an id means: bump this (pools and runs
# of another scheme are refused, see oof.check_fold_file and the search's --resume).
ID_SCHEME = 2
ID_SCHEME_CHANGE = "only keys that differ from their defaults, oof_epoch last by default"  # what scheme 2 changed, for refusals
_DEFAULTS = TrialConfig().to_dict()


def identity_hash(flat: dict, defaults: dict) -> str:
    """The 8-hex-digit hash of a config's identity: the keys whose value differs from ``defaults``
    (runtime keys, which do not change the model, left out)."""
    d = {k: v for k, v in flat.items() if k not in _RUNTIME_KEYS and (k not in defaults or v != defaults[k])}
    return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:8]
