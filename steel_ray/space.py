"""Search spaces: a small declarative YAML format that becomes an Optuna define-by-run function.

Format (keys are trial config keys, see ``steel_ray.config``)::

    task: segment               # or classify: image-level presence models (the blend's gate)
    num_samples: 16             # optional: configs to explore, top: configs to complete
    top: 3                      #   (search --num-samples / --top override them)
    fixed:                      # constant for every trial
      epochs: 3
    params:                     # sampled in this order
      arch:    {type: categorical, choices: [Unet, FPN]}
      lr:      {type: logfloat, low: 1.0e-4, high: 3.0e-3}     # or {type: float, log: true, ...}
      epochs:  {type: int, low: 2, high: 4}
      focal_gamma: {type: float, low: 1.0, high: 3.0, when: {loss: focal}}
      attention:   {type: categorical, choices: [none, scse], when: {arch: [Unet, UnetPlusPlus]}}
    points_to_evaluate:         # tried first (known-good configs)
      - {arch: Unet, lr: 1.0e-3}

``when`` makes a parameter conditional on earlier parameters (or fixed values): it is sampled
only when every named key has one of the listed values, and otherwise keeps its default.
A space is validated completely before Ray starts; every error names the key.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import yaml

from .config import TASKS, ConfigError, TrialConfig

__all__ = ["SpaceError", "Param", "SearchSpace", "load_space"]

TYPES = ("categorical", "int", "float", "logfloat")
_PAIRED = {"crop_height", "crop_width", "resize_height", "resize_width"}  # checked in the samples


class SpaceError(ValueError):
    """An invalid search space; the message names the file and the key."""


@dataclass(frozen=True)
class Param:
    name: str
    type: str
    choices: tuple = ()
    low: float | None = None
    high: float | None = None
    log: bool = False
    step: float | None = None
    when: dict = field(default_factory=dict)

    def active(self, values: dict) -> bool:
        return all(values.get(k) in vs for k, vs in self.when.items())

    def contains(self, v) -> bool:
        if self.type == "categorical":
            return v in self.choices
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            return False
        if self.type == "int" and float(v) != int(v):
            return False
        return self.low <= v <= self.high

    def suggest(self, trial):
        if self.type == "categorical":
            return trial.suggest_categorical(self.name, list(self.choices))
        if self.type == "int":
            return trial.suggest_int(self.name, int(self.low), int(self.high), log=self.log, step=int(self.step or 1))
        return trial.suggest_float(self.name, float(self.low), float(self.high), log=self.log, step=self.step)


@dataclass(frozen=True)
class SearchSpace:
    path: str
    params: tuple[Param, ...]
    fixed: dict
    points_to_evaluate: tuple[dict, ...] = ()
    num_samples: int | None = None  # configs to explore (search --num-samples overrides)
    top: int | None = None  # configs completed on every fold (search --top overrides)

    def define_by_run(self, trial) -> dict:
        """Optuna define-by-run: samples the active params; returns the fixed values as constants."""
        values = dict(self.fixed)
        for p in self.params:
            if p.active(values):
                values[p.name] = p.suggest(trial)
        return dict(self.fixed)

    def max_epochs(self) -> int:
        """The most epochs a trial can run (crop epochs plus fine-tuning epochs): ASHA's max_t."""
        defaults = TrialConfig().train
        return self._max("epochs", defaults.epochs) + self._max("finetune_epochs", defaults.finetune_epochs)

    def _max(self, key: str, default: int) -> int:
        for p in self.params:
            if p.name == key:
                return int(p.high if p.type != "categorical" else max(p.choices))
        return int(self.fixed.get(key, default))

    def keys(self) -> list[str]:
        return list(self.fixed) + [p.name for p in self.params]

    @property
    def task(self) -> str:
        return self.fixed.get("task", "segment")

    @property
    def name(self) -> str:
        """The space's file stem: its Tune experiment and Optuna study are named after it."""
        return Path(self.path).stem


def _err(path, key, msg):
    return SpaceError(f"{path}: {key}: {msg}")


def _parse_param(path, name, spec, known: list[str]) -> Param:
    if not isinstance(spec, dict):
        raise _err(path, name, f"expected a mapping with 'type', got {spec!r}")
    unknown = set(spec) - {"type", "choices", "low", "high", "log", "step", "when"}
    if unknown:
        raise _err(path, name, f"unknown field(s) {sorted(unknown)}")
    typ = spec.get("type")
    if typ not in TYPES:
        raise _err(path, name, f"type={typ!r} is not one of {list(TYPES)}")
    when = {}
    for k, v in (spec.get("when") or {}).items():
        if k not in known:
            raise _err(path, name, f"'when' refers to {k!r}, which is not a fixed value or an earlier parameter")
        when[k] = tuple(v) if isinstance(v, (list, tuple)) else (v,)
    if typ == "categorical":
        choices = spec.get("choices")
        if not isinstance(choices, list) or not choices:
            raise _err(path, name, "categorical needs a non-empty list 'choices'")
        return Param(name, typ, choices=tuple(choices), when=when)
    low, high = spec.get("low"), spec.get("high")
    for k, v in (("low", low), ("high", high)):
        if isinstance(v, str):
            try:
                v = float(v)
            except ValueError:
                pass
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            raise _err(path, name, f"{k}={v!r} must be a number")
    low, high = float(low), float(high)
    if not low <= high:
        raise _err(path, name, f"low <= high must hold, but got (low={low:g}, high={high:g})")
    log = bool(spec.get("log", False)) or typ == "logfloat"
    if log and low <= 0:
        raise _err(path, name, f"a log scale needs low > 0, but got low={low:g}")
    if typ == "int" and (low != int(low) or high != int(high)):
        raise _err(path, name, f"int bounds must be integers, got (low={low:g}, high={high:g})")
    step = spec.get("step")
    if step is not None and log:
        raise _err(path, name, "'step' cannot be combined with a log scale")
    return Param(name, "int" if typ == "int" else "float", low=low, high=high, log=log, step=step, when=when)


def load_space(path: str | Path) -> SearchSpace:
    """Parse and fully validate a search-space YAML file."""
    path = str(path)
    try:
        doc = yaml.safe_load(Path(path).read_text())
    except FileNotFoundError:
        raise SpaceError(f"{path}: file not found") from None
    except yaml.YAMLError as e:
        raise SpaceError(f"{path}: not valid YAML ({e})") from None
    if not isinstance(doc, dict):
        raise SpaceError(f"{path}: expected a mapping with 'params' (and optionally 'fixed', 'points_to_evaluate')")
    extra = set(doc) - {"task", "num_samples", "top", "fixed", "params", "points_to_evaluate", "description"}
    if extra:
        raise SpaceError(f"{path}: unknown section(s) {sorted(extra)}; expected task, num_samples, top, fixed, params, "
                         "points_to_evaluate")
    for key in ("num_samples", "top"):
        v = doc.get(key)
        if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 1):
            raise _err(path, key, f"must be a positive integer, got {v!r}")
    valid = TrialConfig.keys()
    fixed = dict(doc.get("fixed") or {})
    task = doc.get("task", "segment")
    if task not in TASKS:
        raise _err(path, "task", f"{task!r} is not one of {list(TASKS)}")
    if "task" in fixed or "task" in (doc.get("params") or {}):
        raise _err(path, "task", "is declared at the top level of a space (task: segment or task: classify), not as a key")
    if task != "segment":
        fixed = {"task": task, **fixed}
    raw = doc.get("params") or {}
    if not isinstance(raw, dict):
        raise SpaceError(f"{path}: 'params' must be a mapping of config keys")
    for k in list(fixed) + list(raw):
        if k not in valid:
            raise _err(path, k, f"not a trial config key; valid keys are {valid}")
    both = set(fixed) & set(raw)
    if both:
        raise _err(path, sorted(both)[0], "is both fixed and a parameter")
    partner = {"crop_height": "crop_width", "crop_width": "crop_height",
               "resize_height": "resize_width", "resize_width": "resize_height"}
    alone = {k: v for k, v in fixed.items() if k not in partner or partner[k] in fixed}
    try:
        TrialConfig.from_dict(alone)  # a half-fixed pair is checked in the samples below
    except ConfigError as e:
        raise SpaceError(f"{path}: fixed: {e}") from None
    params, known = [], list(fixed)
    for name, spec in raw.items():
        p = _parse_param(path, name, spec, known)
        if p.type == "categorical" and name not in _PAIRED:  # every choice must be a valid value
            for c in p.choices:
                try:
                    TrialConfig.from_dict({"task": task, name: c})
                except ConfigError as e:
                    raise _err(path, name, f"choice {c!r}: {e}") from None
        params.append(p)
        known.append(name)
    by_name = {p.name: p for p in params}
    points = []
    for i, pt in enumerate(doc.get("points_to_evaluate") or []):
        if not isinstance(pt, dict):
            raise SpaceError(f"{path}: points_to_evaluate[{i}] must be a mapping")
        for k, v in pt.items():
            if k not in by_name:
                raise _err(path, f"points_to_evaluate[{i}].{k}", "is not a parameter of this space")
            if not by_name[k].contains(v):
                raise _err(path, f"points_to_evaluate[{i}].{k}", f"value {v!r} is outside the parameter's range")
        points.append(dict(pt))
    space = SearchSpace(path, tuple(params), fixed, tuple(points), doc.get("num_samples"), doc.get("top"))
    _check_samples(space)
    return space


def _check_samples(space: SearchSpace, n: int = 64) -> None:
    """Draw configs from the space with a throwaway sampler: each must be a valid trial config."""
    import optuna

    from .models import check_model_config, supports_attention  # lazy: smp and torch, only to check a space's architectures

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    for _ in range(n):
        t = study.ask()
        const = space.define_by_run(t)
        flat = {**t.params, **const}
        try:
            cfg = TrialConfig.from_dict(flat)
        except ConfigError as e:
            raise SpaceError(f"{space.path}: a sampled config is invalid ({e}); sample: {flat}") from None
        if flat.get("attention", "none") != "none" and cfg.model.task == "segment" and not supports_attention(flat.get("arch", "Unet")):
            raise SpaceError(
                f"{space.path}: attention: {flat['attention']!r} can be sampled with arch={flat.get('arch')!r}, "
                "which does not support it; add a 'when' on arch"
            )
        try:
            check_model_config(cfg.model)
        except ConfigError as e:
            raise SpaceError(f"{space.path}: a sampled config cannot be built ({e}); sample: {flat}") from None
        study.tell(t, 0.0)
