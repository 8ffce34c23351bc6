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
import dataclasses
import logging
import os
import shutil
import sys
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from . import blend, console, results
from . import run as layout
from .config import ID_SCHEME, ID_SCHEME_CHANGE, ConfigError, model_ids
from .data import DataError
from .space import SpaceError, load_space
from .split import prepare_run
from .tracking import open_tracker, resolve_uri

log = logging.getLogger("steel_ray.search")
METRIC, SCREEN_FOLD = results.METRIC, results.SCREEN_FOLD


class SearchError(RuntimeError):
    """A search that cannot start or continue (existing run, mismatched resume, no finished trial)."""


class SearchInterrupted(RuntimeError):
    """Ctrl-C (SIGINT) ended a stage early; Tune saved it and ``--resume`` continues it."""


@dataclass(frozen=True)
class SearchOptions:
    """What a search is asked to do: the command line's options by their Python names
    (:func:`search` takes them as keywords)."""

    out: str
    space: tuple | None = None  # space files; None with --resume
    data: str | None = None
    folds: int = 5
    holdout: float = 0.0
    num_samples: int | None = None
    top: int | None = None
    complete_by: str = "single"
    max_concurrent: int | None = None
    cpus_per_trial: float = 1.0
    gpus_per_trial: float = 0.0
    max_failures: int = 2
    seed: int = 0
    address: str | None = None
    storage: str | None = None
    resume: bool = False
    no_blend: bool = False
    smoke: bool = False
    mlflow: str | None = None
    verbose: bool = False


@dataclass
class _Stages:
    """What the stages of one driver share: the run folder, Tune's trainable and storage, the pool,
    the log file and the MLflow tracker (None without --mlflow)."""

    run: Path
    trainable: object
    storage_path: str
    pool: str
    logfile: Path
    folds_hash: str
    tracker: object = None


def _args(argv=None) -> SearchOptions:
    ap = argparse.ArgumentParser(prog="python -m steel_ray.search", description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("\n\n", 2)[2])
    ap.add_argument("--space", action="append",
                    help="search space YAML (search_spaces/*.yaml); repeat it to search several spaces (e.g. a "
                         "segmentation and a classifier space) in one run; required, except with --resume")
    ap.add_argument("--data", help="Severstal-layout data folder, readable from every node; required, except with --resume")
    ap.add_argument("--out", required=True, help="run folder on this machine")
    ap.add_argument("--folds", type=int)
    ap.add_argument("--holdout", type=float,
                    help="fraction of the images set aside before the folds (multilabel-stratified): never trained, "
                         "validated, tuned or blended on; the chosen blend is scored on it at the end (default 0: none)")
    ap.add_argument("--num-samples", type=int,
                    help="configs Optuna proposes per space in the explore stage (default: the space's num_samples, else 16)")
    ap.add_argument("--top", type=int,
                    help="configs of each space trained on every fold (default: the space's top, else 3)")
    ap.add_argument("--complete-by", choices=["single", "ensemble"],
                    help="which explored configs of a segmentation space the complete stage trains on every fold: single "
                         "(the --top best by their own screening-fold score) or ensemble (the --top the blend's greedy "
                         "selection picks first on the screening fold's OOF, cross-fitted on an inner split; finished "
                         "trials only). The explore summary shows both")
    ap.add_argument("--max-concurrent", type=int, help="trials at once (default: what resources allow)")
    ap.add_argument("--cpus-per-trial", type=float)
    ap.add_argument("--gpus-per-trial", type=float, help="fractions allowed, e.g. 0.5")
    ap.add_argument("--max-failures", type=int, help="retries of a failed trial from its last checkpoint")
    ap.add_argument("--seed", type=int, help="Optuna sampler seed")
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
    # one set of defaults: SearchOptions' (search() uses them too)
    ap.set_defaults(**{f.name: f.default for f in dataclasses.fields(SearchOptions) if f.default is not dataclasses.MISSING})
    a = ap.parse_args(argv)
    return SearchOptions(**{**vars(a), "space": None if a.space is None else tuple(a.space)})


def _load_state(run: Path, a) -> layout.SearchState:
    """The search's saved settings (``--resume``) or new ones; a resumed search keeps its own
    folds, samples, top and seed, and refuses a different space, data or storage."""
    path = layout.state_path(run)
    if a.resume:
        if not path.exists():
            raise SearchError(f"{path} not found: nothing to resume in {run}")
        state = layout.read_state(run)
        if state.id_scheme != ID_SCHEME:
            raise SearchError(f"{path}: a search of model id scheme {state.id_scheme}; this version names models "
                              f"by scheme {ID_SCHEME} ({ID_SCHEME_CHANGE}), "
                              f"so --resume would train every model again under new ids: start a new run folder")
        for k in ("data", "storage"):
            v = layout.where(getattr(a, k))
            if v is not None and v != getattr(state, k):
                raise SearchError(f"--{k} {v} differs from the interrupted search's {getattr(state, k)}")
        uri = resolve_uri(getattr(a, "mlflow", None))
        if uri is not None and uri != state.mlflow:
            # Tune restores a stage with the callbacks it started with: tracking cannot start or move mid-run
            raise SearchError(f"--mlflow {uri} differs from the interrupted search's {state.mlflow or 'none'} "
                              "(a resumed search logs where it started; leave --mlflow out to keep that)")
        spaces = [layout.where(p) for p in a.space or []]
        if spaces and spaces != list(state.spaces):
            raise SearchError(f"--space {spaces} differs from the interrupted search's {list(state.spaces)}")
        return state
    if run.exists() and any(run.iterdir()):
        raise SearchError(f"{run} already exists and is not empty; pass --resume to continue it, or choose a new --out")
    if not a.space or not a.data:
        raise SearchError("--space and --data are required for a new search (only --resume can leave them out)")
    storage = layout.where(a.storage)
    return layout.SearchState(
        spaces=tuple(layout.where(p) for p in a.space), data=layout.where(a.data), folds=a.folds, holdout=a.holdout,
        num_samples=a.num_samples, top=a.top, seed=a.seed, storage=storage, smoke=a.smoke, complete_by=a.complete_by,
        started=time.strftime("%Y-%m-%dT%H:%M:%S"),
        # the run's identity: what it writes under --storage lives under STORAGE/<run_id>/, so two
        # runs with the same --out name never share a pool, an experiment or a checkpoint
        run_id=f"{run.name}-{uuid.uuid4().hex[:12]}", id_scheme=ID_SCHEME, mlflow=resolve_uri(a.mlflow))


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


def _fit_stage(stage, total, tune_config, ctx: _Stages, a: SearchOptions, param_space=None):
    """Run one Tune stage with our progress bar; returns Tune's ResultGrid."""
    from .tune_adapter import (  # lazy: tune_adapter loads Ray and torch; the driver module stays light
        MlflowTrialCallback,
        ProgressCallback,
        tensorboard_callback,
    )

    progress = ProgressCallback(stage, total)
    callbacks = [progress, tensorboard_callback()]
    if ctx.tracker is not None:
        callbacks.append(MlflowTrialCallback(ctx.tracker, stage))
    log.info("%s: %d trial(s)", stage, total)
    tuner = _tuner(stage, ctx.trainable, ctx.storage_path, tune_config, a.max_failures, param_space=param_space, restore=a.resume,
                   callbacks=callbacks, verbose=a.verbose)
    try:
        if a.verbose:
            grid = tuner.fit()
        else:
            # Tune prints its experiment boxes and hints to stdout even at verbose=0: into the log file
            with open(ctx.logfile, "a") as sink, contextlib.redirect_stdout(sink):
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
    return dataclasses.replace(space, params=tuple(p for p in space.params if p.name != "epochs"), fixed={**space.fixed, "epochs": 1},
                               points_to_evaluate=tuple({k: v for k, v in pt.items() if k != "epochs"} for pt in space.points_to_evaluate))


def _explore(space, n_spaces: int, state: layout.SearchState, ctx: _Stages, a: SearchOptions):
    """One space's explore stage: its own Optuna study (TPE, seeded) and ASHA, on the screening fold.

    A run with one space keeps the historical names (experiment and study ``explore``); with
    several, each is ``explore-<space file stem>``.
    """
    import optuna
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler
    from ray.tune.search import ConcurrencyLimiter

    from .tune_adapter import PruneAwareOptunaSearch  # lazy: tune_adapter loads Ray and torch; the driver module stays light

    name = _explore_name(space, n_spaces)
    sampler = optuna.samplers.TPESampler(seed=state.seed)
    storage = f"sqlite:///{layout.optuna_db(ctx.run)}"
    searcher = PruneAwareOptunaSearch(space.define_by_run, metric=METRIC, mode="max", sampler=sampler,
                                      points_to_evaluate=list(space.points_to_evaluate) or None,
                                      study_name=name, storage=optuna.storages.RDBStorage(storage))
    limiter = ConcurrencyLimiter(searcher, max_concurrent=a.max_concurrent or 2)
    scheduler = ASHAScheduler(time_attr="epoch", max_t=space.max_epochs(), grace_period=1, reduction_factor=2)
    n = _per_space(state, space, "num_samples")
    # reuse_actors: a trial's worker process (torch, smp and the data imported) serves the next trial
    tc = tune.TuneConfig(metric=METRIC, mode="max", search_alg=limiter, scheduler=scheduler, num_samples=n, reuse_actors=True)
    log.info("%s: %s (task %s)", name, space.path, space.task)
    return _fit_stage(name, n, tc, ctx, a)


def _explore_name(space, n_spaces: int) -> str:
    return "explore" if n_spaces == 1 else f"explore-{space.name}"


def _per_space(state: layout.SearchState, space, key: str) -> int:
    """--num-samples / --top when given, else the space's own value, else the default (16 / 3);
    --smoke caps them at 2 / 1."""
    v = getattr(state, key) or getattr(space, key) or {"num_samples": 16, "top": 3}[key]
    return min(v, {"num_samples": 2, "top": 1}[key]) if state.smoke else v


def _start_ray(a: SearchOptions, run: Path, state: layout.SearchState) -> bool:
    """Join --address (checking that every node sees the run folder when there is no --storage) or
    start an embedded Ray; returns whether it started one (the driver shuts it down on exit)."""
    import ray

    console.route_ray_logs()  # Ray's import-time handlers off before init: its start-up lines go to our log
    started = False
    if a.address:
        ray.init(address=a.address, ignore_reinit_error=True, log_to_driver=a.verbose)
    elif not ray.is_initialized():
        ray.init(include_dashboard=False, ignore_reinit_error=True, log_to_driver=a.verbose)
        started = True
    console.route_ray_logs()
    if a.address and not state.storage:
        require_shared(run, unshared_nodes(run))
    return started


def _explore_stage(spaces, state: layout.SearchState, rows: list, ctx: _Stages, a: SearchOptions) -> tuple[list, layout.SearchState]:
    """Each space not yet explored: its explore trials, then its ``top`` configs join the state's
    ``selected`` (for a segmentation space by the rule ``complete_by``; both rules' picks are logged
    and kept); the state is saved after each space."""
    for sp in spaces:
        if sp.name in state.explored:
            continue
        run = ctx.run
        grid = _explore(sp, len(spaces), state, ctx, a)
        new = results.results_rows(grid, "explore", sp.name)
        if ctx.tracker is not None:
            ctx.tracker.finish_stage(_explore_name(sp, len(spaces)), new)
        rows += new
        results.write_results(run, rows)
        top = _per_space(state, sp, "top")
        chosen, completion = results.select_top(new, top, sp.name), dict(state.completion)
        if chosen and sp.task == "segment":
            by_ensemble = results.select_ensemble(run, ctx.pool, new, top, chosen, state.seed)
            picks = {"single": model_ids(chosen), "ensemble": model_ids(by_ensemble)}
            completion[sp.name] = {"rule": state.complete_by, **picks}
            for rule, ids in picks.items():
                log.info("%s: complete by %s%s: %s", _explore_name(sp, len(spaces)), rule,
                         " (this run)" if rule == state.complete_by else "", ids)
            chosen = by_ensemble if state.complete_by == "ensemble" else chosen
        if not chosen:
            errors = sorted({r["error"] for r in new if r["error"]})
            first = f"; {'first ' if len(errors) > 1 else ''}error: {errors[0]}" if errors else ""
            raise SearchError(f"every explore trial of {sp.path} failed{first} (all of them: {run / 'results.parquet'})")
        selected = (*state.selected, *chosen)
        # the run's models: what the blend uses (screening-only configs have fold 0 alone)
        state = state.replace(selected=selected, selected_models=tuple(model_ids(selected)), completion=completion,
                              explored=(*state.explored, sp.name))
        layout.write_state(run, state)
    return rows, state


def _complete_stage(state: layout.SearchState, rows: list, ctx: _Stages, a: SearchOptions) -> list:
    """Every selected config on every fold; (config, fold) pairs whose OOF is already in the pool (the
    screening fold of a trial that ran to the end) are reused, not retrained. The pool is then
    copied into the run folder."""
    from ray import tune

    from .tune_adapter import sync_pool  # lazy: tune_adapter loads Ray and torch; the driver module stays light

    specs = results.pending_folds(state.selected, state.folds, ctx.pool, ctx.folds_hash)
    rows = [r for r in rows if r["stage"] != "complete"]
    if specs:
        tc = tune.TuneConfig(max_concurrent_trials=a.max_concurrent, num_samples=1, reuse_actors=True)
        grid = _fit_stage("complete", len(specs), tc, ctx, a, {"spec": tune.grid_search(specs)})
        new = results.results_rows(grid, "complete")
        if ctx.tracker is not None:
            ctx.tracker.finish_stage("complete", new)
        rows += new
    results.write_results(ctx.run, rows)
    sync_pool(ctx.pool, ctx.run)
    return rows


def run_search(a: SearchOptions) -> int:
    """The search's stages (explore, complete, blend) from wherever ``RUN/search.json`` says it stopped."""
    # Tune warns on every checkpoint-heavy snapshot; per-epoch checkpoints are by design here
    os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")
    run = Path(a.out).resolve()
    state = _load_state(run, a)
    # every space is validated before Ray starts or anything is written
    spaces = [_smoke(load_space(p)) if state.smoke else load_space(p) for p in state.spaces]
    names = [sp.name for sp in spaces]
    if len(set(names)) != len(names):
        raise SearchError(f"two --space files share a name {names}: their experiments would collide; rename one")
    # the data are read and checked before anything is written: a bad image or label leaves no run folder
    data = prepare_run(state.data, run, state.folds, holdout=state.holdout, pseudo=state.pseudo)
    logfile = console.setup(run, a.verbose, "search")
    log.info("search %s: stage %s; Ray and trial logs: %s", run, state.stage, logfile)
    layout.write_state(run, state)
    tracker, started_ray = _open_tracker(state, run), False
    try:
        started_ray = _start_ray(a, run, state)
        return _stages(a, state, spaces, data, logfile, tracker)
    except BaseException:
        if tracker is not None:
            tracker.end_search("KILLED")
        raise
    finally:
        if started_ray:  # stop the Ray this driver started (also after Ctrl-C or SIGTERM): no agents left behind
            import ray

            ray.shutdown()


def _open_tracker(state: layout.SearchState, run: Path):
    """The run's MLflow tracker (``--mlflow``), its search run started; a store that cannot be
    opened is a one-line error before Ray starts."""
    if not state.mlflow:
        return None
    try:
        tracker = open_tracker(state.mlflow, run, state)
        tracker.start_search(state)
    except Exception as e:  # noqa: BLE001 -- MLflow raises its own and SQLAlchemy's errors
        raise SearchError(f"--mlflow {state.mlflow}: cannot open the tracking store ({type(e).__name__}: "
                          f"{str(e).splitlines()[0][:300]})") from e
    log.info("MLflow: experiment %s in %s", tracker.run_id, state.mlflow)
    return tracker


def _stages(a: SearchOptions, state: layout.SearchState, spaces, data, logfile, tracker) -> int:
    from ray import tune

    from .tune_adapter import environment, run_trial  # lazy: tune_adapter loads Ray and torch; the driver module stays light

    run = Path(a.out).resolve()
    pool = layout.pool_uri(state, run)
    trainable = tune.with_resources(
        tune.with_parameters(run_trial, data=data, pool=pool, default_fold=SCREEN_FOLD, cpus=a.cpus_per_trial,
                             driver_env=environment()),
        {"cpu": a.cpus_per_trial, "gpu": a.gpus_per_trial},
    )
    ctx = _Stages(run, trainable, layout.ray_storage(state, run), pool, logfile, data.folds_hash, tracker)
    rows: list[dict] = []
    if layout.results_path(run).exists() and a.resume:
        explored = set(state.explored)
        rows = [r for r in pd.read_parquet(layout.results_path(run)).to_dict("records")
                if r["stage"] != state.stage or (r["stage"] == "explore" and r.get("space") in explored)]
    if state.stage == "explore":
        rows, state = _explore_stage(spaces, state, rows, ctx, a)
        state = state.replace(stage="complete")
        layout.write_state(run, state)
    if state.stage == "complete":
        rows = _complete_stage(state, rows, ctx, a)
        state = state.replace(stage="blend")
        layout.write_state(run, state)
    df = results.write_results(run, rows)
    results.print_summary(df, run, list(state.selected_models))
    if state.stage == "blend" and not a.no_blend:
        log.info("blend: selecting the ensemble and post-processing of %d model(s)", len(state.selected_models))
        doc = blend.blend_run(run)
        if tracker is not None:
            tracker.log_blend(doc, layout.blend_dir(run), "search (the run's own blend)", key="blend/search")
        state = state.replace(stage="done")
        layout.write_state(run, state)
    if tracker is not None:
        tracker.end_search("FINISHED")
    return 0


def search(out, space=None, data=None, **options) -> int:
    """Library entry (the demo and the pseudo-labelling rounds use it): run or resume a search.

    ``space`` is a path or a list of paths; ``options`` are :class:`SearchOptions` fields (the CLI's
    options by their Python names: ``num_samples``, ``top``, ``folds``, ``holdout``, ``max_concurrent``,
    ``resume``, ``verbose``, ...). Returns the exit code the CLI would (2 for a refused or invalid search).
    """
    fields = {f.name for f in dataclasses.fields(SearchOptions)}
    unknown = sorted(set(options) - fields)
    if unknown:
        raise TypeError(f"search() got unknown option(s) {unknown}; options are {sorted(fields - {'out', 'space', 'data'})}")
    spaces = None if space is None else tuple(str(p) for p in ([space] if isinstance(space, (str, Path)) else space))
    return _run(SearchOptions(out=str(out), space=spaces, data=None if data is None else str(data), **options))


def main(argv=None) -> int:
    return _run(_args(argv))


def _run(a: SearchOptions) -> int:
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


if __name__ == "__main__":
    sys.exit(main())
