"""The run folder: every path a run has, its identity and its saved search state, in one place.

Layout (RUN is the ``--out`` folder)::

    RUN/search.json                                   the search's state: stage, spaces, selection, run id
    RUN/results.parquet                               every trial
    RUN/folds.csv, RUN/truth.parquet, RUN/holdout.json   the split, the labels, the set-aside images
    RUN/oof/model_id=<id>/fold=<k>/part-0.parquet     the OOF pool
    RUN/checkpoints/<id>/fold=<k>/{best.pt,last.pt,config.json}
    RUN/blend/{blend.json,report.html,report.md,holdout_submission.csv}
    RUN/pseudo/{labels.csv,images.csv}                a pseudo-labelling round's labels
    RUN/logs/<name>.log, RUN/logs/trials/<id>-fold<k>.log
    RUN/optuna.db, RUN/ray/                           Optuna studies, Ray experiments (without --storage)

With ``--storage``, what trials write lives under ``STORAGE/<run id>/{pool,ray}`` (:func:`storage_root`).
Every module asks here for a path instead of spelling it.
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path

from .data import DataError
from .io import write_json

__all__ = [
    "STATE", "RESULTS", "FOLDS", "TRUTH", "HOLDOUT", "state_path", "results_path", "folds_path", "truth_path", "holdout_path",
    "oof_root", "oof_path", "checkpoint_dir", "best_weights", "blend_dir", "blend_json", "pseudo_dir", "logs_dir",
    "trial_log", "optuna_db", "SearchState", "STAGES", "read_state", "write_state", "run_id", "join_uri", "storage_root", "pool_uri", "ray_storage",
]

STATE = "search.json"
RESULTS = "results.parquet"
FOLDS = "folds.csv"
TRUTH = "truth.parquet"
HOLDOUT = "holdout.json"


def state_path(run) -> Path:
    return Path(run) / STATE


def results_path(run) -> Path:
    return Path(run) / RESULTS


def folds_path(run) -> Path:
    return Path(run) / FOLDS


def truth_path(run) -> Path:
    return Path(run) / TRUTH


def holdout_path(run) -> Path:
    return Path(run) / HOLDOUT


def oof_root(run) -> Path:
    return Path(run) / "oof"


def oof_path(run, model_id: str, fold: int) -> Path:
    return oof_root(run) / f"model_id={model_id}" / f"fold={int(fold)}" / "part-0.parquet"


def checkpoint_dir(run, model_id: str, fold: int) -> Path:
    return Path(run) / "checkpoints" / model_id / f"fold={int(fold)}"


def best_weights(run, model_id: str, fold: int) -> Path:
    return checkpoint_dir(run, model_id, fold) / "best.pt"


def blend_dir(run) -> Path:
    return Path(run) / "blend"


def blend_json(run) -> Path:
    return blend_dir(run) / "blend.json"


def pseudo_dir(run) -> Path:
    return Path(run) / "pseudo"


def logs_dir(run) -> Path:
    return Path(run) / "logs"


def trial_log(run, model_id: str, fold: int) -> Path:
    return logs_dir(run) / "trials" / f"{model_id}-fold{int(fold)}.log"


def optuna_db(run) -> Path:
    return Path(run) / "optuna.db"


def where(uri: str | None) -> str | None:
    """A local path made absolute; a URI (s3://...) as given (how a run records its data and storage)."""
    return uri if uri is None or "://" in uri else str(Path(uri).resolve())


STAGES = ("explore", "complete", "blend", "done")


@dataclass(frozen=True)
class SearchState:
    """RUN/search.json: a search's settings (fixed when it starts) and its progress. Frozen: a
    change is a new state (:meth:`replace`) that :func:`write_state` saves; :func:`read_state` is
    the one reader. A pseudo-labelling round's state has ``pseudo`` (its parent and labels)."""

    data: str
    folds: int
    spaces: tuple = ()  # the space files (absolute paths)
    holdout: float = 0.0
    num_samples: int | None = None  # per space (None: the space's own)
    top: int | None = None
    seed: int = 0
    storage: str | None = None  # shared storage root, or None: the run folder
    smoke: bool = False
    complete_by: str = "single"
    stage: str = "explore"  # one of STAGES
    explored: tuple = ()  # spaces whose explore stage ended
    selected: tuple = ()  # the configs (dicts) the complete stage trains on every fold
    selected_models: tuple = ()  # their model ids: the blend's models
    completion: dict = field(default_factory=dict)  # space -> {rule, single, ensemble}: both rules' picks
    started: str = ""
    run_id: str = ""
    id_scheme: int = 1
    mlflow: str | None = None
    pseudo: dict | None = None

    def replace(self, **changes) -> "SearchState":
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d.update(spaces=list(self.spaces), explored=list(self.explored), selected=list(self.selected),
                 selected_models=list(self.selected_models), space=self.spaces[0] if self.spaces else None)
        return {k: v for k, v in d.items() if not (k == "pseudo" and v is None)}

    @classmethod
    def from_dict(cls, d: dict, path="search.json") -> "SearchState":
        d = dict(d)
        if "spaces" not in d and d.get("space"):
            d["spaces"] = [d["space"]]  # states from before several spaces
        d.pop("space", None)
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise DataError(f"{path}: unknown key(s) {unknown} in a search state; expected some of {sorted(names)}")
        missing = [k for k in ("data", "folds") if k not in d]
        if missing:
            raise DataError(f"{path}: a search state needs {missing}")
        if d.get("stage", "explore") not in STAGES:
            raise DataError(f"{path}: stage {d['stage']!r} is not one of {list(STAGES)}")
        for k in ("spaces", "explored", "selected", "selected_models"):
            d[k] = tuple(d.get(k) or ())
        return cls(**d)


def read_state(run) -> SearchState | None:
    """The saved search state (RUN/search.json), or None for a run without one."""
    p = state_path(run)
    if not p.exists():
        return None
    try:
        return SearchState.from_dict(json.loads(p.read_text()), p)
    except json.JSONDecodeError as e:
        raise DataError(f"{p}: not a JSON document ({e})") from None


def write_state(run, state: SearchState) -> None:
    """Save ``state`` as RUN/search.json (atomically)."""
    write_json(state_path(run), state.to_dict())


def run_id(state: SearchState | None, run) -> str:
    """The run's id (made when the search starts, kept in its state); runs from before ids
    existed (or without a state) use their folder name, as their storage did."""
    return (state.run_id if state is not None else "") or Path(run).name


def join_uri(base: str, *parts: str) -> str:
    """``base/part/...`` for a path or a URI; a URI's query stays at its end, where pyarrow reads it
    (``s3://bucket/runs?endpoint_override=127.0.0.1:9000&scheme=http`` + ``pool`` is
    ``s3://bucket/runs/pool?endpoint_override=127.0.0.1:9000&scheme=http``)."""
    head, sep, query = str(base).partition("?")
    return "/".join([head.rstrip("/"), *(p.strip("/") for p in parts)]) + sep + query


def storage_root(state: SearchState, run) -> str | None:
    """``STORAGE/<run id>`` when the run writes to ``--storage``, else None (everything in RUN)."""
    return join_uri(state.storage, run_id(state, run)) if state.storage else None


def pool_uri(state: SearchState, run) -> str:
    """Where trials write their OOF and weights: ``STORAGE/<run id>/pool``, else the run folder itself."""
    root = storage_root(state, run)
    return join_uri(root, "pool") if root else str(run)


def ray_storage(state: SearchState, run) -> str:
    """Where Ray keeps the experiments and trial checkpoints: ``STORAGE/<run id>/ray``, else ``RUN/ray``."""
    root = storage_root(state, run)
    return join_uri(root, "ray") if root else str(Path(run) / "ray")
