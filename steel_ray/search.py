"""Distributed search: explore configs with Optuna + ASHA, complete the best on every fold, blend.

Usage::

    python -m steel_ray.search --space search_spaces/demo.yaml [--space search_spaces/demo_classifier.yaml] \
        --data data/demo --out runs/demo [--folds 3] [--num-samples 8] [--top 2] [--max-concurrent 2] [--cpus-per-trial 1] \
        [--gpus-per-trial 0] [--address auto] [--storage s3://bucket/runs] [--resume] [--no-blend] [--smoke]

Stages:
  explore   per space (--space may repeat: segmentation and classifier spaces, each explored
            on its own with its own Optuna study, --num-samples and --top): Optuna (TPE,
            seeded) proposes --num-samples configs; each trains on the screening fold (fold 0);
            ASHA (time attribute: epoch) stops the weak ones, and those reach Optuna as PRUNED.
  complete  each space's --top best configs are trained on every fold (one trial per config x fold, no
            early stopping), reusing the screening-fold OOF of trials that ran to the end.
            Each then has OOF for every training image: a "model" of the pool.
  blend     the blend optimizer and its report (unless --no-blend).

Without --address Ray runs embedded on this machine. The results table (every trial: stage,
config, fold, status, epochs, best val_dice, error, node, GPU ids, seconds) is saved as
RUN/results.parquet. An interrupted search continues with --resume; an existing RUN without
--resume is refused.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import shutil
import sys
import time
import uuid
from pathlib import Path

import numpy as np
import pandas as pd

from . import blend, console
from . import run as layout
from .config import ID_SCHEME, ID_SCHEME_CHANGE, ConfigError, TrialConfig, model_ids
from .data import DataError
from .io import atomic_path, write_json
from .space import SpaceError, load_space
from .split import prepare_run
from .tracking import open_tracker, resolve_uri

log = logging.getLogger("steel_ray.search")
METRIC = "best_val_dice_pp"  # post-processed Dice of the fold: what the blend will make of the model
SCREEN_FOLD = 0
RESULT_COLS = ["stage", "space", "trial_id", "model_id", "fold", "status", "epochs_run", "best_val_dice_pp", "best_val_dice", "error",
               "node_id", "node_ip", "gpu_ids", "wall_s", "resumed_after", "config"]


class SearchError(RuntimeError):
    """A search that cannot start or continue (existing run, mismatched resume, no finished trial)."""


class SearchInterrupted(RuntimeError):
    """Ctrl-C (SIGINT) ended a stage early; Tune saved it and ``--resume`` continues it."""


def _args(argv=None):
    ap = argparse.ArgumentParser(prog="python -m steel_ray.search", description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("\n\n", 2)[2])
    ap.add_argument("--space", action="append",
                    help="search space YAML (search_spaces/*.yaml); repeat it to search several spaces (e.g. a "
                         "segmentation and a classifier space) in one run; required, except with --resume")
    ap.add_argument("--data", help="Severstal-layout data folder, readable from every node; required, except with --resume")
    ap.add_argument("--out", required=True, help="run folder on this machine")
    ap.add_argument("--folds", type=int, default=5)
    ap.add_argument("--holdout", type=float, default=0.0,
                    help="fraction of the images set aside before the folds (multilabel-stratified): never trained, "
                         "validated, tuned or blended on; the chosen blend is scored on it at the end (default 0: none)")
    ap.add_argument("--num-samples", type=int, default=None,
                    help="configs Optuna proposes per space in the explore stage (default: the space's num_samples, else 16)")
    ap.add_argument("--top", type=int, default=None,
                    help="configs of each space trained on every fold (default: the space's top, else 3)")
    ap.add_argument("--complete-by", choices=["single", "ensemble"], default="single",
                    help="which explored configs of a segmentation space the complete stage trains on every fold: single "
                         "(the --top best by their own screening-fold score) or ensemble (the --top the blend's greedy "
                         "selection picks first on the screening fold's OOF, cross-fitted on an inner split; finished "
                         "trials only). The explore summary shows both")
    ap.add_argument("--max-concurrent", type=int, default=None, help="trials at once (default: what resources allow)")
    ap.add_argument("--cpus-per-trial", type=float, default=1.0)
    ap.add_argument("--gpus-per-trial", type=float, default=0.0, help="fractions allowed, e.g. 0.5")
    ap.add_argument("--max-failures", type=int, default=2, help="retries of a failed trial from its last checkpoint")
    ap.add_argument("--seed", type=int, default=0, help="Optuna sampler seed")
    ap.add_argument("--address", help="join a running Ray cluster ('auto', 'ray://host:10001'); default: embedded Ray")
    ap.add_argument("--storage", help="shared storage every node writes to (path on shared FS, or s3://...); default: RUN")
    ap.add_argument("--resume", action="store_true", help="continue an interrupted search in RUN")
    ap.add_argument("--no-blend", action="store_true", help="stop after the complete stage")
    ap.add_argument("--smoke", action="store_true", help="tiny run for checking a setup: 1 epoch, 2 samples, top 1")
    ap.add_argument("--mlflow", metavar="URI",
                    help="log the run to MLflow: sqlite:///runs/mlflow.db (a local store), a folder, or a tracking server "
                         "(http://host:5000); one experiment per run, a child run per trial and per blend. The driver logs "
                         "(a cluster's workers need no access); --resume continues the same MLflow runs")
    ap.add_argument("--verbose", action="store_true",
                    help="show Ray's trial tables, worker output and third-party logs on the console "
                         "(otherwise they go to RUN/logs/search.log)")
    return ap.parse_args(argv)


def _load_state(run: Path, a) -> dict:
    """The search's saved settings (``--resume``) or new ones; a resumed search keeps its own
    folds, samples, top and seed, and refuses a different space, data or storage."""
    path = layout.state_path(run)
    if a.resume:
        if not path.exists():
            raise SearchError(f"{path} not found: nothing to resume in {run}")
        state = json.loads(path.read_text())
        if state.get("id_scheme", 1) != ID_SCHEME:
            raise SearchError(f"{path}: a search of model id scheme {state.get('id_scheme', 1)}; this version names models "
                              f"by scheme {ID_SCHEME} ({ID_SCHEME_CHANGE}), "
                              f"so --resume would train every model again under new ids: start a new run folder")
        state.setdefault("spaces", [state["space"]])
        for k in ("data", "storage"):
            v = layout.where(getattr(a, k))
            if v is not None and v != state[k]:
                raise SearchError(f"--{k} {v} differs from the interrupted search's {state[k]}")
        uri = resolve_uri(getattr(a, "mlflow", None))
        if uri is not None and uri != state.get("mlflow"):
            # Tune restores a stage with the callbacks it started with: tracking cannot start or move mid-run
            raise SearchError(f"--mlflow {uri} differs from the interrupted search's {state.get('mlflow') or 'none'} "
                              "(a resumed search logs where it started; leave --mlflow out to keep that)")
        spaces = [layout.where(p) for p in a.space or []]
        if spaces and spaces != state["spaces"]:
            raise SearchError(f"--space {spaces} differs from the interrupted search's {state['spaces']}")
        return state
    if run.exists() and any(run.iterdir()):
        raise SearchError(f"{run} already exists and is not empty; pass --resume to continue it, or choose a new --out")
    if not a.space or not a.data:
        raise SearchError("--space and --data are required for a new search (only --resume can leave them out)")
    storage = layout.where(a.storage)
    state = {
        "space": layout.where(a.space[0]), "spaces": [layout.where(p) for p in a.space], "data": layout.where(a.data),
        "folds": a.folds, "holdout": a.holdout,
        "num_samples": a.num_samples, "top": a.top, "seed": a.seed, "storage": storage, "smoke": a.smoke,
        "complete_by": getattr(a, "complete_by", "single"),
        "stage": "explore", "explored": [], "selected": [], "started": time.strftime("%Y-%m-%dT%H:%M:%S"),
        # the run's identity: what it writes under --storage lives under STORAGE/<run_id>/, so two
        # runs with the same --out name never share a pool, an experiment or a checkpoint
        "run_id": f"{run.name}-{uuid.uuid4().hex[:12]}",
        "id_scheme": ID_SCHEME,
        "mlflow": resolve_uri(a.mlflow),
    }
    return state


def _save_state(run: Path, state: dict) -> None:
    write_json(layout.state_path(run), state)


def _results_rows(grid, stage: str, space: str = "") -> list[dict]:
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


def _write_results(run: Path, rows: list[dict]) -> pd.DataFrame:
    df = pd.DataFrame(rows, columns=RESULT_COLS)
    with atomic_path(layout.results_path(run)) as tmp:
        df.to_parquet(tmp, index=False)
    return df


def _select_top(rows: list[dict], top: int, space: str = "") -> list[dict]:
    """The ``top`` distinct configs of one space's explore trials (that did not fail) by best val_dice_pp.

    Trials ASHA stopped early compete with their best epoch; if one is selected, its screening
    fold is retrained to the end in the complete stage (it has no OOF yet).
    """
    ok = [r for r in rows if r["status"] != "ERROR" and r[METRIC] == r[METRIC]]
    ok.sort(key=lambda r: (-r[METRIC], r["status"] != "TERMINATED"))
    seen, out = set(), []
    for r in ok:
        if r["model_id"] not in seen:
            seen.add(r["model_id"])
            out.append(json.loads(r["config"]))
        if len(out) == top:
            break
    if len(out) < top:
        log.warning("%s: only %d explore trial(s) succeeded; completing %d model(s) instead of %d", space or "explore",
                    len(out), len(out), top)
    return out


def _tuner(name, trainable, storage_path, tune_config, max_failures, param_space=None, restore=False, callbacks=None,
           verbose=False):
    from ray import tune

    path = layout.join_uri(storage_path, name)
    if restore and tune.Tuner.can_restore(path):
        log.info("restoring %s from %s", name, path)
        return tune.Tuner.restore(path, trainable, resume_unfinished=True, resume_errored=True, param_space=param_space)
    run_config = tune.RunConfig(
        name=name,
        storage_path=storage_path,
        failure_config=tune.FailureConfig(max_failures=max_failures),
        # 2, not 1: Tune's saved experiment state can lag one report behind, and with one kept it can
        # name a checkpoint already deleted, which fails that trial's resume after a kill
        checkpoint_config=tune.CheckpointConfig(num_to_keep=2),
        callbacks=callbacks,
        verbose=1 if verbose else 0,
    )
    return tune.Tuner(trainable, param_space=param_space or {}, tune_config=tune_config, run_config=run_config)


def _fit_stage(stage, total, trainable, storage_path, tune_config, a, logfile, param_space=None):
    """Run one Tune stage with our progress bar; returns Tune's ResultGrid."""
    from .tune_adapter import MlflowTrialCallback, ProgressCallback, tensorboard_callback

    progress = ProgressCallback(stage, total)
    callbacks = [progress, tensorboard_callback()]
    if getattr(a, "tracker", None) is not None:
        callbacks.append(MlflowTrialCallback(a.tracker, stage))
    log.info("%s: %d trial(s)", stage, total)
    tuner = _tuner(stage, trainable, storage_path, tune_config, a.max_failures, param_space=param_space, restore=a.resume,
                   callbacks=callbacks, verbose=a.verbose)
    try:
        if a.verbose:
            grid = tuner.fit()
        else:
            # Tune prints its experiment boxes and hints to stdout even at verbose=0: into the log file
            with open(logfile, "a") as sink, contextlib.redirect_stdout(sink):
                grid = tuner.fit()
    finally:
        line = progress.close()
        log.info(line)
    if progress.interrupted:  # Tune ended the stage early and saved it: nothing of it counts as done
        raise SearchInterrupted(line)
    return grid


def unshared_nodes(run: Path, timeout_s: float = 60.0) -> list[str]:
    """Ids of the cluster's other nodes that cannot write a file into ``run`` that this driver then
    sees (a probe task pinned to each node): trials write their OOF and weights to the pool, which
    without --storage is the run folder, so it must be one folder for every node."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    me = ray.get_runtime_context().get_node_id()
    nodes = [n["NodeID"] for n in ray.nodes() if n.get("Alive") and n["NodeID"] != me]
    if not nodes:
        return []
    probe_dir = run / ".shared-probe"
    probe_dir.mkdir(parents=True, exist_ok=True)
    token = uuid.uuid4().hex

    @ray.remote(num_cpus=0)
    def write_probe(path: str, text: str) -> bool:
        try:
            Path(path).parent.mkdir(parents=True, exist_ok=True)
            Path(path).write_text(text)
            return True
        except OSError:
            return False

    refs = {n: write_probe.options(scheduling_strategy=NodeAffinitySchedulingStrategy(n, soft=False)).remote(
        str(probe_dir / n), token) for n in nodes}
    ray.wait(list(refs.values()), num_returns=len(refs), timeout=timeout_s)
    missing = [n for n in nodes if not ((probe_dir / n).exists() and (probe_dir / n).read_text() == token)]
    shutil.rmtree(probe_dir, ignore_errors=True)
    return missing


def require_shared(run: Path, missing: list[str]) -> None:
    """Refuse a multi-node search whose run folder (the pool without --storage) some node cannot reach."""
    if missing:
        raise SearchError(f"--address without --storage: node(s) {', '.join(m[:12] for m in missing)} cannot write the run "
                          f"folder {run} that this driver reads (it is not a shared path), so their trials' OOF files "
                          "and weights would be lost; pass --storage (a path every node shares, or s3://...)")


def _smoke(space):
    """The space with one epoch per trial (``--smoke``)."""
    import dataclasses

    return dataclasses.replace(space, params=tuple(p for p in space.params if p.name != "epochs"), fixed={**space.fixed, "epochs": 1},
                               points_to_evaluate=tuple({k: v for k, v in pt.items() if k != "epochs"} for pt in space.points_to_evaluate))


def _explore(space, n_spaces: int, state: dict, run: Path, trainable, storage_path, a, logfile):
    """One space's explore stage: its own Optuna study (TPE, seeded) and ASHA, on the screening fold.

    A run with one space keeps the historical names (experiment and study ``explore``); with
    several, each is ``explore-<space file stem>``.
    """
    import optuna
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler
    from ray.tune.search import ConcurrencyLimiter

    from .tune_adapter import PruneAwareOptunaSearch

    name = _explore_name(space, n_spaces)
    sampler = optuna.samplers.TPESampler(seed=state["seed"])
    storage = f"sqlite:///{layout.optuna_db(run)}"
    searcher = PruneAwareOptunaSearch(space.define_by_run, metric=METRIC, mode="max", sampler=sampler,
                                      points_to_evaluate=list(space.points_to_evaluate) or None,
                                      study_name=name, storage=optuna.storages.RDBStorage(storage))
    limiter = ConcurrencyLimiter(searcher, max_concurrent=a.max_concurrent or 2)
    scheduler = ASHAScheduler(time_attr="epoch", max_t=space.max_epochs(), grace_period=1, reduction_factor=2)
    n = _per_space(state, space, "num_samples")
    # reuse_actors: a trial's worker process (torch, smp and the data imported) serves the next trial
    tc = tune.TuneConfig(metric=METRIC, mode="max", search_alg=limiter, scheduler=scheduler, num_samples=n, reuse_actors=True)
    log.info("%s: %s (task %s)", name, space.path, space.task)
    return _fit_stage(name, n, trainable, storage_path, tc, a, logfile)


def _explore_name(space, n_spaces: int) -> str:
    return "explore" if n_spaces == 1 else f"explore-{space.name}"


def _per_space(state: dict, space, key: str) -> int:
    """--num-samples / --top when given, else the space's own value, else the default (16 / 3);
    --smoke caps them at 2 / 1."""
    v = state.get(key) or getattr(space, key) or {"num_samples": 16, "top": 3}[key]
    return min(v, {"num_samples": 2, "top": 1}[key]) if state["smoke"] else v


def _start_ray(a, run: Path, state: dict) -> None:
    """Join --address (checking that every node sees the run folder when there is no --storage) or
    start an embedded Ray (shut down on exit)."""
    import ray

    console.route_ray_logs()  # Ray's import-time handlers off before init: its start-up lines go to our log
    if a.address:
        ray.init(address=a.address, ignore_reinit_error=True, log_to_driver=a.verbose)
    elif not ray.is_initialized():
        ray.init(include_dashboard=False, ignore_reinit_error=True, log_to_driver=a.verbose)
        a.started_ray = True
    console.route_ray_logs()
    if a.address and not state["storage"]:
        require_shared(run, unshared_nodes(run))


def _select_ensemble(run: Path, pool: str, rows: list[dict], top: int, by_single: list[dict], seed: int) -> list[dict]:
    """``top`` configs of one segmentation space in the order the blend's greedy selection picks them
    on the screening fold's OOF (:func:`blend.ensemble_order`), filled up by single score. Only
    finished trials have OOF (ASHA's stopped ones do not): with fewer than two, the single ranking."""
    from .tune_adapter import sync_pool

    done: dict[str, dict] = {}
    for r in sorted(rows, key=lambda r: -r[METRIC] if r[METRIC] == r[METRIC] else np.inf):
        if r["status"] == "TERMINATED" and r["model_id"] and r["model_id"] not in done:
            done[r["model_id"]] = json.loads(r["config"])
    sync_pool(pool, run)
    done = {m: c for m, c in done.items() if layout.oof_path(run, m, SCREEN_FOLD).exists()}
    if len(done) < 2:
        return by_single
    chosen = [done[m] for m in blend.ensemble_order(run, list(done), SCREEN_FOLD, seed=seed)][:top]
    ids = set(model_ids(chosen))
    chosen += [c for c in by_single if TrialConfig.from_dict(c).model_id() not in ids][:top - len(chosen)]
    return chosen


def _explore_stage(spaces, state: dict, run: Path, rows: list, trainable, storage_path, a, logfile, pool: str) -> list:
    """Each space not yet explored: its explore trials, then its ``top`` configs join ``state["selected"]``
    (for a segmentation space by the rule ``state["complete_by"]``; both rules' picks are logged and kept)."""
    for sp in spaces:
        if sp.name in state.setdefault("explored", []):
            continue
        grid = _explore(sp, len(spaces), state, run, trainable, storage_path, a, logfile)
        new = _results_rows(grid, "explore", sp.name)
        if getattr(a, "tracker", None) is not None:
            a.tracker.finish_stage(_explore_name(sp, len(spaces)), new)
        rows += new
        _write_results(run, rows)
        top = _per_space(state, sp, "top")
        chosen = _select_top(new, top, sp.name)
        if chosen and sp.task == "segment":
            rule = state.get("complete_by", "single")
            by_ensemble = _select_ensemble(run, pool, new, top, chosen, state["seed"])
            picks = {"single": model_ids(chosen), "ensemble": model_ids(by_ensemble)}
            state.setdefault("completion", {})[sp.name] = {"rule": rule, **picks}
            for r_, ids in picks.items():
                log.info("%s: complete by %s%s: %s", _explore_name(sp, len(spaces)), r_, " (this run)" if r_ == rule else "", ids)
            chosen = by_ensemble if rule == "ensemble" else chosen
        if not chosen:
            errors = sorted({r["error"] for r in new if r["error"]})
            first = f"; {'first ' if len(errors) > 1 else ''}error: {errors[0]}" if errors else ""
            raise SearchError(f"every explore trial of {sp.path} failed{first} (all of them: {run / 'results.parquet'})")
        state["selected"] += chosen
        # the run's models: what the blend uses (screening-only configs have fold 0 alone)
        state["selected_models"] = model_ids(state["selected"])
        state["explored"].append(sp.name)
        _save_state(run, state)
    return rows


def _complete_stage(state: dict, run: Path, rows: list, pool: str, trainable, storage_path, a, logfile) -> list:
    """Every selected config on every fold; (config, fold) pairs whose OOF is already in the pool (the
    screening fold of a trial that ran to the end) are reused, not retrained. The pool is then
    copied into the run folder."""
    from ray import tune

    from .tune_adapter import sync_pool

    specs = pending_folds(state["selected"], state["folds"], pool)
    rows = [r for r in rows if r["stage"] != "complete"]
    if specs:
        tc = tune.TuneConfig(max_concurrent_trials=a.max_concurrent, num_samples=1, reuse_actors=True)
        grid = _fit_stage("complete", len(specs), trainable, storage_path, tc, a, logfile, {"spec": tune.grid_search(specs)})
        new = _results_rows(grid, "complete")
        if getattr(a, "tracker", None) is not None:
            a.tracker.finish_stage("complete", new)
        rows += new
    _write_results(run, rows)
    sync_pool(pool, run)
    return rows


def pending_folds(selected: list[dict], n_folds: int, pool: str) -> list[dict]:
    """The (config, fold) trial specs the complete stage still has to run: those without an OOF
    file in the pool (the file is the "fold done" marker; weights alone do not count)."""
    from .tune_adapter import pool_meta

    return [{**cfg, "fold": k} for cfg in selected for k in range(n_folds)
            if pool_meta(pool, TrialConfig.from_dict(cfg).model_id(), k) is None]


def run_search(a) -> int:
    """The search's stages (explore, complete, blend) from wherever ``RUN/search.json`` says it stopped."""
    # Tune warns on every checkpoint-heavy snapshot; per-epoch checkpoints are by design here
    os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")
    run = Path(a.out).resolve()
    state = _load_state(run, a)
    # every space is validated before Ray starts or anything is written
    spaces = [_smoke(load_space(p)) if state["smoke"] else load_space(p) for p in state["spaces"]]
    names = [sp.name for sp in spaces]
    if len(set(names)) != len(names):
        raise SearchError(f"two --space files share a name {names}: their experiments would collide; rename one")
    # the data are read and checked before anything is written: a bad image or label leaves no run folder
    data = prepare_run(state["data"], run, state["folds"], holdout=state.get("holdout", 0.0), pseudo=state.get("pseudo"))
    logfile = console.setup(run, a.verbose, "search")
    log.info("search %s: stage %s; Ray and trial logs: %s", run, state["stage"], logfile)
    _save_state(run, state)
    a.tracker = _open_tracker(state, run)
    try:
        return _stages(a, run, state, spaces, data, logfile)
    except BaseException:
        if a.tracker is not None:
            a.tracker.end_search("KILLED")
        raise


def _open_tracker(state: dict, run: Path):
    """The run's MLflow tracker (``--mlflow``), its search run started; a store that cannot be
    opened is a one-line error before Ray starts."""
    if not state.get("mlflow"):
        return None
    try:
        tracker = open_tracker(state["mlflow"], run, state)
        tracker.start_search(state)
    except Exception as e:  # noqa: BLE001 -- MLflow raises its own and SQLAlchemy's errors
        raise SearchError(f"--mlflow {state['mlflow']}: cannot open the tracking store ({type(e).__name__}: "
                          f"{str(e).splitlines()[0][:300]})") from e
    log.info("MLflow: experiment %s in %s", tracker.run_id, state["mlflow"])
    return tracker


def _stages(a, run: Path, state: dict, spaces, data, logfile) -> int:
    from ray import tune

    from .tune_adapter import environment, run_trial

    pool, storage_path = layout.pool_uri(state, run), layout.ray_storage(state, run)
    _start_ray(a, run, state)
    trainable = tune.with_resources(
        tune.with_parameters(run_trial, data=data, pool=pool, default_fold=SCREEN_FOLD, cpus=a.cpus_per_trial,
                             driver_env=environment()),
        {"cpu": a.cpus_per_trial, "gpu": a.gpus_per_trial},
    )
    rows: list[dict] = []
    if layout.results_path(run).exists() and a.resume:
        explored = set(state.get("explored", []))
        rows = [r for r in pd.read_parquet(layout.results_path(run)).to_dict("records")
                if r["stage"] != state["stage"] or (r["stage"] == "explore" and r.get("space") in explored)]
    if state["stage"] == "explore":
        rows = _explore_stage(spaces, state, run, rows, trainable, storage_path, a, logfile, pool)
        state["stage"] = "complete"
        _save_state(run, state)
    if state["stage"] == "complete":
        rows = _complete_stage(state, run, rows, pool, trainable, storage_path, a, logfile)
        state["stage"] = "blend"
        _save_state(run, state)
    df = _write_results(run, rows)
    _print_summary(df, run, state.get("selected_models", []))
    if state["stage"] == "blend" and not a.no_blend:
        log.info("blend: selecting the ensemble and post-processing of %d model(s)", len(state.get("selected_models", [])))
        doc = blend.blend_run(run)
        if a.tracker is not None:
            a.tracker.log_blend(doc, layout.blend_dir(run), "search (the run's own blend)", key="blend/search")
        state["stage"] = "done"
        _save_state(run, state)
    if a.tracker is not None:
        a.tracker.end_search("FINISHED")
    return 0


def _print_summary(df: pd.DataFrame, run: Path, selected: list[str]) -> None:
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


def search(out, space=None, data=None, **options) -> int:
    """Library entry (the demo and the pseudo-labelling rounds use it): run or resume a search.

    ``space`` is a path or a list of paths; ``options`` are the CLI's options by their Python names
    (``num_samples``, ``top``, ``folds``, ``holdout``, ``max_concurrent``, ``resume``, ``verbose``,
    ...). Returns the exit code the CLI would (2 for a refused or invalid search).
    """
    a = _args(["--out", str(out)])
    a.space = None if space is None else [str(p) for p in ([space] if isinstance(space, (str, Path)) else space)]
    a.data = None if data is None else str(data)
    for k, v in options.items():
        if not hasattr(a, k):
            raise TypeError(f"search() got an unknown option {k!r}")
        setattr(a, k, v)
    return _run(a)


def main(argv=None) -> int:
    return _run(_args(argv))


def _run(a) -> int:
    console.setup(None, a.verbose)
    try:
        with console.sigterm_as_exit():
            return run_search(a)
    except (SearchInterrupted, KeyboardInterrupt) as e:  # KeyboardInterrupt: a second Ctrl-C, or one in the blend
        what = str(e) if isinstance(e, SearchInterrupted) else "interrupted"
        print(f"{what}; continue it with: python -m steel_ray.search --out {a.out} --resume", file=sys.stderr)
        return 130
    except (SearchError, SpaceError, ConfigError, DataError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    finally:
        _shutdown_embedded_ray(a)


def _shutdown_embedded_ray(a) -> None:
    """Stop the Ray this driver started (also after Ctrl-C or SIGTERM): no agents left behind."""
    if not getattr(a, "started_ray", False):
        return
    import ray

    if ray.is_initialized():
        ray.shutdown()


if __name__ == "__main__":
    sys.exit(main())
