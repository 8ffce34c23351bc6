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

import json
from pathlib import Path

__all__ = [
    "STATE", "RESULTS", "FOLDS", "TRUTH", "HOLDOUT", "state_path", "results_path", "folds_path", "truth_path", "holdout_path",
    "oof_root", "oof_path", "checkpoint_dir", "best_weights", "blend_dir", "blend_json", "pseudo_dir", "logs_dir",
    "trial_log", "optuna_db", "read_state", "run_id", "join_uri", "storage_root", "pool_uri", "ray_storage",
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


def read_state(run) -> dict | None:
    """The saved search state (RUN/search.json), or None for a run without one."""
    p = state_path(run)
    return json.loads(p.read_text()) if p.exists() else None


def run_id(state: dict, run) -> str:
    """The run's id (made when the search starts, kept in its state); runs from before ids
    existed use their folder name, as their storage did."""
    return state.get("run_id") or Path(run).name


def join_uri(base: str, *parts: str) -> str:
    """``base/part/...`` for a path or a URI; a URI's query stays at its end, where pyarrow reads it
    (``s3://bucket/runs?endpoint_override=127.0.0.1:9000&scheme=http`` + ``pool`` is
    ``s3://bucket/runs/pool?endpoint_override=127.0.0.1:9000&scheme=http``)."""
    head, sep, query = str(base).partition("?")
    return "/".join([head.rstrip("/"), *(p.strip("/") for p in parts)]) + sep + query


def storage_root(state: dict, run) -> str | None:
    """``STORAGE/<run id>`` when the run writes to ``--storage``, else None (everything in RUN)."""
    return join_uri(state["storage"], run_id(state, run)) if state.get("storage") else None


def pool_uri(state: dict, run) -> str:
    """Where trials write their OOF and weights: ``STORAGE/<run id>/pool``, else the run folder itself."""
    root = storage_root(state, run)
    return join_uri(root, "pool") if root else str(run)


def ray_storage(state: dict, run) -> str:
    """Where Ray keeps the experiments and trial checkpoints: ``STORAGE/<run id>/ray``, else ``RUN/ray``."""
    root = storage_root(state, run)
    return join_uri(root, "ray") if root else str(Path(run) / "ray")
