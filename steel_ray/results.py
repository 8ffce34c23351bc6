"""The search's results and what it completes: RUN/results.parquet (a row per trial, whatever
stage and status), the configs each rule would complete from an explore stage (``single``: by
their own screening-fold score; ``ensemble``: the blend's greedy order), the folds still to train,
and the summary printed at the end."""
from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import pandas as pd

from . import blend, oof
from . import run as layout
from .config import ConfigError, TrialConfig, model_ids
from .io import atomic_path

log = logging.getLogger("steel_ray.search")
METRIC = "best_val_dice_pp"  # post-processed Dice of the fold: what the blend will make of the model
SCREEN_FOLD = 0


RESULT_COLS = ["stage", "space", "trial_id", "model_id", "fold", "status", "epochs_run", "best_val_dice_pp", "best_val_dice", "error",
               "node_id", "node_ip", "gpu_ids", "wall_s", "resumed_after", "config"]


def results_rows(grid, stage: str, space: str = "") -> list[dict]:
    rows = []
    for r in grid:
        m = r.metrics or {}
        cfg = dict(r.config.get("spec", r.config)) if r.config else {}
        fold = cfg.pop("fold", SCREEN_FOLD)
        if r.error is not None or m.get("error"):  # m["error"]: reported, not raised (not retried)
            status = "ERROR"
        elif m.get("finished"):
            status = "TERMINATED"
        else:
            status = "STOPPED"  # ASHA stopped it early
        err = (f"{type(r.error).__name__}: {str(r.error).strip().splitlines()[-1][:500]}" if r.error is not None
               else str(m.get("error") or "")[:500])
        rows.append({
            "stage": stage, "space": space, "trial_id": m.get("trial_id", os.path.basename(str(r.path))),
            "model_id": m.get("model_id") or _model_id(cfg),
            "fold": int(fold), "status": status, "epochs_run": int(m.get("epoch", 0) or 0),
            "best_val_dice_pp": float(m.get(METRIC, float("nan"))),
            "best_val_dice": float(m.get("best_val_dice", float("nan"))), "error": err,
            "node_id": m.get("node_id", ""), "node_ip": m.get("node_ip", ""), "gpu_ids": m.get("gpu_ids", ""),
            "wall_s": float(m.get("time_total_s", float("nan"))),
            # the epoch whose checkpoint the trial's last attempt resumed from (a retry after a lost
            # node, a --resume); 0 when it trained from the start
            "resumed_after": int(m.get("resumed_after", 0) or 0), "config": json.dumps(cfg, sort_keys=True),
        })
    return rows


def _model_id(cfg: dict) -> str:
    """The model id of a trial that failed before reporting ("" for a config that does not even validate)."""
    try:
        return TrialConfig.from_dict(cfg).model_id()
    except ConfigError:
        return ""


def write_results(run: Path, rows: list[dict]) -> pd.DataFrame:
    df = pd.DataFrame(rows, columns=RESULT_COLS)
    with atomic_path(layout.results_path(run)) as tmp:
        df.to_parquet(tmp, index=False)
    return df


def _ranked(rows: list[dict]) -> list[dict]:
    """The trials that did not fail, best val_dice_pp first (on a tie, one that ran to the end first)."""
    ok = [r for r in rows if r["status"] != "ERROR" and r[METRIC] == r[METRIC]]
    return sorted(ok, key=lambda r: (-r[METRIC], r["status"] != "TERMINATED"))


def select_top(rows: list[dict], top: int, space: str = "") -> list[dict]:
    """The ``top`` distinct configs of one space's explore trials (that did not fail) by best val_dice_pp.

    Trials ASHA stopped early compete with their best epoch; if one is selected, its screening
    fold is retrained to the end in the complete stage (it has no OOF yet).
    """
    seen, out = set(), []
    for r in _ranked(rows):
        if r["model_id"] not in seen:
            seen.add(r["model_id"])
            out.append(json.loads(r["config"]))
        if len(out) == top:
            break
    if len(out) < top:
        log.warning("%s: only %d explore trial(s) succeeded; completing %d model(s) instead of %d", space or "explore",
                    len(out), len(out), top)
    return out


def select_ensemble(run: Path, pool: str, rows: list[dict], top: int, by_single: list[dict], seed: int) -> list[dict]:
    """``top`` configs of one segmentation space in the order the blend's greedy selection picks them
    on the screening fold's OOF (:func:`blend.ensemble_order`), filled up by single score. Only
    finished trials have OOF (ASHA's stopped ones do not): with fewer than two, the single ranking."""
    from .tune_adapter import sync_pool  # lazy: tune_adapter loads Ray and torch; the driver module stays light

    done: dict[str, dict] = {}
    for r in _ranked(rows):
        if r["status"] == "TERMINATED" and r["model_id"] and r["model_id"] not in done:
            done[r["model_id"]] = json.loads(r["config"])
    # only these models' screening-fold OOF: a cluster's pool also holds every explored trial's weights
    sync_pool(pool, run, only=[layout.oof_path("", m, SCREEN_FOLD).as_posix().lstrip("/") for m in done])
    done = {m: c for m, c in done.items() if layout.oof_path(run, m, SCREEN_FOLD).exists()}
    if len(done) < 2:
        return by_single
    chosen = [done[m] for m in blend.ensemble_order(run, list(done), SCREEN_FOLD, seed=seed)][:top]
    ids = set(model_ids(chosen))
    chosen += [c for c in by_single if TrialConfig.from_dict(c).model_id() not in ids][:top - len(chosen)]
    return chosen


def pending_folds(selected: list[dict], n_folds: int, pool: str, folds_hash: str | None = None) -> list[dict]:
    """The (config, fold) trial specs the complete stage still has to run: those not finished in the
    pool (:func:`oof.finished`; one of another split is refused before any trial starts)."""
    from .tune_adapter import pool_meta  # lazy: tune_adapter loads Ray and torch; the driver module stays light

    return [{**cfg, "fold": k} for cfg in selected for k in range(n_folds)
            if oof.finished(pool_meta(pool, mid := TrialConfig.from_dict(cfg).model_id(), k), folds_hash,
                            f"{pool}: {mid} fold {k}") is None]


def print_summary(df: pd.DataFrame, run: Path, selected: list[str]) -> None:
    """A few lines: trials per stage and status, the explore leaderboard's top, each completed model."""
    counts = {f"{st}/{status}": n for (st, status), n in df.groupby(["stage", "status"]).size().items()}
    print(f"\ntrials: {counts}; every trial: {run / 'results.parquet'}")
    explore = df[(df.stage == "explore") & (df.status != "ERROR")]
    for space, g in explore.groupby(explore["space"].fillna("")):
        ex = g.sort_values(METRIC, ascending=False).head(5)
        cls = ex.model_id.str.startswith("cls-").all()
        what = ("gate Dice with a perfect segmenter, threshold chosen on the fold / at 0.5" if cls
                else "val Dice post-processed / at threshold 0.5")
        print(f"explore{' ' + space if space else ''}, top configs on the screening fold ({what}):")
        for _, r in ex.iterrows():
            mark = "*" if r.model_id in selected else " "
            print(f"  {mark} {r.model_id:40} {r[METRIC]:.4f} / {r.best_val_dice:.4f}  {r.status.lower()} after {r.epochs_run} epoch(s)")
    comp = df[df.model_id.isin(selected)].drop_duplicates(["model_id", "fold"], keep="last")
    if len(comp):
        print("completed models (* above), mean over folds (post-processed / at threshold 0.5):")
        for mid, g in comp.groupby("model_id"):
            print(f"    {mid:40} {g[METRIC].mean():.4f} / {g.best_val_dice.mean():.4f}  ({len(g)} fold(s))")
    for _, r in df[df.status == "ERROR"].iterrows():
        print(f"ERROR {r.stage} {r.model_id or r.config} fold {r.fold}: {r.error}")
    sizes = {p.name: sum(f.stat().st_size for f in p.rglob("*") if f.is_file()) for p in run.iterdir() if p.is_dir()}
    total = sum(sizes.values()) + sum(f.stat().st_size for f in run.iterdir() if f.is_file())
    big = ", ".join(f"{k} {v / 2**20:.0f} MiB" for k, v in sorted(sizes.items(), key=lambda kv: -kv[1])[:3])
    print(f"run folder {run}: {total / 2**20:.0f} MiB ({big})")
