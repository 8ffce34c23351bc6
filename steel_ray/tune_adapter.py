"""Ray Tune adapter: the trial function, the prune-aware Optuna searcher and the storage glue.

Ray lives here and in ``search.py`` only; ``train.fit_fold`` knows nothing about it. Ray's API
changes between releases: these calls are written against Ray 2.x's ``ray.tune`` (``Tuner``,
``tune.report(metrics, checkpoint=...)``, ``tune.get_checkpoint()``).
"""
from __future__ import annotations

import contextlib
import logging
import os
import shutil
import tempfile
import warnings
from pathlib import Path

from ray import tune
from ray.tune.search.optuna import OptunaSearch

from . import oof
from . import run as layout
from .config import TrialConfig
from .console import progress
from .train import FoldData, checkpoint_dir, fit_fold
from .weights import WeightsUnavailable

__all__ = ["PruneAwareOptunaSearch", "ProgressCallback", "MlflowTrialCallback", "tensorboard_callback", "run_trial", "is_remote",
           "pool_meta", "put_file", "get_file",
           "upload_fold", "sync_pool", "scratch_dir"]

log = logging.getLogger(__name__)


class PruneAwareOptunaSearch(OptunaSearch):
    """OptunaSearch that tells Optuna the truth about how a trial ended.

    Ray's OptunaSearch reports every trial with a last result as COMPLETE, including those ASHA
    stopped early, which feeds TPE partial-training scores as if they were final. Here a trial
    that did not report ``finished`` is PRUNED (Optuna keeps its intermediate values), and a
    trial that raised is FAIL.
    """

    def on_trial_complete(self, trial_id, result=None, error=False):
        if trial_id in self._completed_trials or trial_id not in self._ot_trials:
            return super().on_trial_complete(trial_id, result, error)
        ot_trial = self._ot_trials[trial_id]
        if self._ot_study._storage.get_trial(ot_trial._trial_id).state.is_finished():
            # a resumed search: the study (sqlite) already has this trial's outcome from before the
            # interruption, while Tune's own state still listed the trial as running (e.g. killed
            # between the two saves); telling Optuna again would raise, so the first outcome stands
            self._completed_trials.add(trial_id)
            return None
        error = error or bool(result and result.get("error"))  # a trial that reported its error (no weights)
        if error or not result or not result.get("finished"):
            import optuna

            step = result.get("training_iteration") if result else None
            if not error and step is not None and result.get(self.metric) is not None:
                # the result ASHA stopped on reaches the searcher only here; Optuna ignores
                # (with a warning) a step it already has
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    ot_trial.report(result[self.metric], step)

            state = optuna.trial.TrialState.FAIL if error else optuna.trial.TrialState.PRUNED
            self._ot_study.tell(ot_trial, None, state=state)
            self._completed_trials.add(trial_id)
            return None
        return super().on_trial_complete(trial_id, result, error)


_LIVE: dict = {}  # stage -> this process's ProgressCallback


def _live_progress(stage: str, total: int, metric: str) -> "ProgressCallback":
    return _LIVE.get(stage) or ProgressCallback(stage, total, metric)


class ProgressCallback(tune.Callback):
    """Our console line for a Tune stage: trials done/total, best so far, elapsed and ETA (a tqdm bar
    on a terminal, plain lines off one).

    Ray's own trial tables go to the log file (``verbose=0``); this is what a user watches. Trials
    a resumed stage finds already ended count as done. Ctrl-C (SIGINT) makes Tune end the stage
    early and return as if it had finished; :attr:`interrupted` tells the two apart.
    """

    def __init__(self, stage: str, total: int, metric: str = "best_val_dice_pp"):
        self.stage, self.total, self.metric = stage, total, metric
        self.best, self.best_model, self.done, self.errors, self.bar = float("-inf"), "", 0, 0, None
        self.before, self.interrupted, self._counted = 0, False, False
        _LIVE[stage] = self

    def __reduce__(self):
        # Tune pickles its callbacks with the experiment and a restored run (--resume) unpickles
        # them: the copy must be this process's live callback, which the stage reads when it ends
        return (_live_progress, (self.stage, self.total, self.metric))

    def _ensure_bar(self):
        if self.bar is None:
            self.bar = progress(total=self.total, desc=self.stage, unit="trials",
                                bar_format="{desc}: {n_fmt}/{total_fmt} trials |{bar:20}| {elapsed}<{remaining} {postfix}")
        return self.bar

    def setup(self, **info):
        self._ensure_bar()
        self._watch_sigint()

    def _watch_sigint(self):
        """Chain a handler in front of the one Tune installed for this run (it ends the run and
        restores the handler from before): ours only notes that the stage was interrupted."""
        import signal
        import threading

        if threading.current_thread() is not threading.main_thread():
            return
        tune_handler = signal.getsignal(signal.SIGINT)

        def note(signum, frame):
            self.interrupted = True
            if callable(tune_handler):
                tune_handler(signum, frame)
            else:
                raise KeyboardInterrupt

        signal.signal(signal.SIGINT, note)

    def on_step_begin(self, iteration, trials, **info):
        self._count_ended_before(trials)

    def on_experiment_end(self, trials, **info):
        # a resume that finds every trial ended runs no step: count them here
        if not self.interrupted:
            self._count_ended_before(trials)

    def _count_ended_before(self, trials):
        """Once, at the stage's start: the trials a resumed stage finds ended count as done."""
        if not self._counted:
            self._counted = True
            ended = [t for t in trials if t.status in ("TERMINATED", "ERROR")]
            self.before = len(ended)
            self.errors += sum(t.status == "ERROR" for t in ended)
            if self.before:
                bar = self._ensure_bar()
                if hasattr(bar, "n_start"):
                    bar.n_start = self.before  # the ETA counts only this run's trials
                bar.update(self.before)

    def _postfix(self):
        best = f"best {self.best:.4f} ({self.best_model})" if self.best > float("-inf") else "best -"
        return best + (f", {self.errors} failed" if self.errors else "")

    def on_trial_result(self, iteration, trials, trial, result, **info):
        v = result.get(self.metric)
        if v is not None and v > self.best:
            self.best, self.best_model = float(v), result.get("model_id", "")
            self._ensure_bar().set_postfix_str(self._postfix())

    def on_trial_complete(self, iteration, trials, trial, **info):
        if self.interrupted:  # Tune stops the running trials as it ends: they did not finish
            return
        self.done += 1
        bar = self._ensure_bar()
        bar.set_postfix_str(self._postfix())
        bar.update(1)

    def on_trial_error(self, iteration, trials, trial, **info):
        if self.interrupted:
            return
        self.errors += 1
        self.on_trial_complete(iteration, trials, trial, **info)

    def close(self) -> str:
        """Close the bar; returns a one-line summary of the stage."""
        if self.bar is not None:
            self.bar.close()
        ended = self.before + self.done
        failed = f"{self.errors} failed" + (f", {self.before} ended before this resume" if self.before else "")
        if self.interrupted:
            return f"{self.stage}: interrupted after {ended} of {self.total} trial(s) ended ({failed})"
        best = f"best {self.metric} {self.best:.4f} ({self.best_model})" if self.best > float("-inf") else "no new result"
        return f"{self.stage}: {ended} of {self.total} trial(s) ended ({failed}); {best}"


def is_remote(uri: str) -> bool:
    return "://" in str(uri) and not str(uri).startswith("file://")


def _fs(uri: str):
    import pyarrow.fs as pafs

    return pafs.FileSystem.from_uri(uri)


def pool_meta(pool: str, model_id: str, fold: int) -> dict | None:
    """The metadata of a (model, fold) OOF file in the pool, or None when it is not there."""
    import pyarrow.fs as pafs

    rel = oof.oof_path("", model_id, fold).as_posix().lstrip("/")
    if not is_remote(pool):
        path = Path(pool) / rel
        return oof.read_meta(path) if path.exists() else None
    fs, root = _fs(pool)
    if fs.get_file_info(f"{root}/{rel}").type != pafs.FileType.File:
        return None
    return oof.read_meta(f"{root}/{rel}", filesystem=fs)


def put_file(local: Path, pool: str, rel: str) -> None:
    """Copy a finished file into a remote pool (one PUT: readers never see half a file)."""
    import pyarrow.fs as pafs

    fs, root = _fs(pool)
    fs.create_dir(os.path.dirname(f"{root}/{rel}"), recursive=True)
    pafs.copy_files(str(local), f"{root}/{rel}", destination_filesystem=fs)


def scratch_dir() -> Path:
    """A new temporary folder for a remote pool's trial, under ``$STEEL_RAY_SCRATCH`` when set (a
    worker's local NVMe, say), else the system's temporary folder."""
    root = os.environ.get("STEEL_RAY_SCRATCH") or None
    if root:
        os.makedirs(root, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix="steel_ray_trial_", dir=root))


def get_file(pool: str, rel: str, local: Path) -> bool:
    """Copy ``rel`` from a remote pool to ``local`` when it is there; False when it is not."""
    import pyarrow.fs as pafs

    fs, root = _fs(pool)
    if fs.get_file_info(f"{root}/{rel}").type != pafs.FileType.File:
        return False
    local.parent.mkdir(parents=True, exist_ok=True)
    pafs.copy_files(f"{root}/{rel}", str(local), source_filesystem=fs)
    return True


def sync_pool(pool: str, run: Path, only: list[str] | None = None) -> None:
    """Bring a remote pool's OOF files, best weights and trial logs into the local run folder (a log
    is copied again when it changed: a retried trial appends to it); with ``only``, just those
    files (paths relative to the pool, e.g. some OOF files)."""
    if not is_remote(pool) and Path(pool).resolve() == Path(run).resolve():
        return
    import pyarrow.fs as pafs

    fs, root = _fs(pool) if is_remote(pool) else (pafs.LocalFileSystem(), str(Path(pool).resolve()))
    logs = layout.trial_log("", "m", 0).parent.as_posix()
    for sub in ("oof", "checkpoints", logs):
        sel = pafs.FileSelector(f"{root}/{sub}", recursive=True, allow_not_found=True)
        infos = fs.get_file_info(sel) if only is None else fs.get_file_info([f"{root}/{r}" for r in only if r.startswith(sub + "/")])
        for info in infos:
            if info.type != pafs.FileType.File or Path(info.path).name.startswith("."):
                continue
            rel = os.path.relpath(info.path, root)
            dst = Path(run) / rel
            if not dst.exists() or (sub == logs and dst.stat().st_size != info.size):
                dst.parent.mkdir(parents=True, exist_ok=True)
                tmp = dst.with_name(f".{dst.name}.sync")
                pafs.copy_files(info.path, str(tmp), source_filesystem=fs)
                os.replace(tmp, dst)


def _node_info() -> dict:
    import ray

    ctx = ray.get_runtime_context()
    try:
        gpus = ",".join(str(g) for g in ray.get_gpu_ids())
    except Exception:  # noqa: BLE001 - outside a Ray worker
        gpus = ""
    return {"node_id": ctx.get_node_id(), "node_ip": ray.util.get_node_ip_address(), "gpu_ids": gpus}


@contextlib.contextmanager
def _trial_log(run: Path, model_id: str, fold: int):
    """The trial's own log lines (epochs, resume, OOF) in RUN/logs/trials/<model>-fold<k>.log."""
    path = layout.trial_log(run, model_id, fold)
    path.parent.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(path)
    handler.setFormatter(logging.Formatter("%(asctime)s %(name)s %(levelname)s %(message)s"))
    lg = logging.getLogger("steel_ray")
    lg.addHandler(handler)
    old_level = lg.level
    lg.setLevel(logging.INFO)
    try:
        yield path
    finally:
        lg.removeHandler(handler)
        lg.setLevel(old_level)
        handler.close()


ENV_PACKAGES = ("torch", "segmentation-models-pytorch", "timm")


def environment() -> dict:
    """What a trial's results depend on besides its config: a hash of the steel_ray package's own
    files (model ids, training and OOF code) and the versions of torch, smp and timm (the weights
    a worker saves are loaded by the driver's)."""
    import hashlib
    import importlib.metadata as md

    h = hashlib.sha256()
    pkg = Path(__file__).resolve().parent
    for f in sorted(pkg.rglob("*.py")):
        h.update(f.relative_to(pkg).as_posix().encode() + b"\0" + f.read_bytes())
    return {"steel_ray": h.hexdigest()[:12], **{p: md.version(p) for p in ENV_PACKAGES}}


class EnvironmentMismatch(RuntimeError):
    """A worker runs other steel_ray code or other torch/smp/timm versions than the driver."""


def check_environment(expected: dict | None, node: str = "") -> None:
    """Fail the trial, in one line naming both sides, when this worker differs from the driver."""
    if not expected:
        return
    here = environment()
    diff = [k for k in expected if here.get(k) != expected[k]]
    if diff:
        def side(env):
            return ", ".join(f"{k} {env.get(k)}" for k in diff)
        raise EnvironmentMismatch(f"worker {node or 'node'} runs {side(here)} but the driver runs {side(expected)}: install the "
                                  "same code and versions on every node (pip install -c constraints.txt -e .)")


def tensorboard_callback():
    """Ray Tune's TensorBoardX logger (tensorboardX is a declared dependency): named here so that the
    event files do not depend on Tune's automatic loggers (``TUNE_DISABLE_AUTO_CALLBACK_LOGGERS``)."""
    from ray.tune.logger import TBXLoggerCallback

    return TBXLoggerCallback()


_LIVE_MLFLOW: dict = {}  # stage -> this process's MlflowTrialCallback


def _live_mlflow(stage: str):
    return _LIVE_MLFLOW.get(stage) or tune.Callback()


class MlflowTrialCallback(tune.Callback):
    """Tune callback (runs on the driver): each trial of a stage as a child run of the search
    (:class:`steel_ray.tracking.Tracker`)."""

    def __init__(self, tracker, stage: str):
        self.tracker, self.stage = tracker, stage
        _LIVE_MLFLOW[stage] = self

    def __reduce__(self):
        # Tune pickles its callbacks with the experiment and --resume unpickles them: the copy is this
        # process's live callback (a resume without a tracker gets a callback that does nothing)
        return (_live_mlflow, (self.stage,))

    def _safe(self, fn, *args):
        try:
            fn(*args)
        except Exception as e:  # noqa: BLE001 -- a tracking store that fails must not fail the search
            log.warning("MLflow logging failed (%s: %s); the search goes on", type(e).__name__, e)

    def on_trial_start(self, iteration, trials, trial, **info):
        self._safe(self.tracker.trial_started, self.stage, trial.trial_id, trial.config)

    def on_trial_result(self, iteration, trials, trial, result, **info):
        self._safe(self.tracker.trial_result, self.stage, trial.trial_id, trial.config, result)

    def on_trial_complete(self, iteration, trials, trial, **info):
        self._safe(self.tracker.trial_ended, self.stage, trial.trial_id, trial.config, False)

    def on_trial_error(self, iteration, trials, trial, **info):
        self._safe(self.tracker.trial_ended, self.stage, trial.trial_id, trial.config, True)


def run_trial(config: dict, data: FoldData = None, pool: str = "", default_fold: int = 0, cpus: float = 1.0,
              driver_env: dict | None = None):
    """One trial = one (config, fold): train with checkpoints through Tune, then write the OOF.

    The fold's OOF goes straight into ``pool`` (a local/NFS path shared by every node, or a
    URI such as ``s3://bucket/run``). A retried or resumed trial continues from its last Tune
    checkpoint; a (model, fold) whose OOF is already in the pool is not trained again.
    """
    import torch

    torch.set_num_threads(max(1, int(cpus)))
    config = dict(config.get("spec", config))
    fold = int(config.pop("fold", default_fold))
    cfg = TrialConfig.from_dict(config)
    model_id = cfg.model_id()
    info = {"model_id": model_id, "fold": fold, **_node_info()}
    check_environment(driver_env, f"{info['node_ip']} ({info['node_id'][:12]})")

    done = oof.finished(pool_meta(pool, model_id, fold), data.folds_hash, f"{pool}: {model_id} fold {fold}")
    if done is not None:
        log.info("%s fold %d: OOF already in the pool, reusing it", model_id, fold)
        best = float(done.get("best_val_dice", float("nan")))
        best_pp = float(done.get("best_val_dice_pp", float("nan")))
        tune.report({**info, "epoch": int(done.get("epochs_run", cfg.train.total_epochs)), "val_dice": best, "val_dice_pp": best_pp,
                     "best_val_dice": best, "best_val_dice_pp": best_pp, "best_epoch": done.get("best_epoch"),
                     "finished": True, "reused": True})
        return

    remote = is_remote(pool)
    local_run = scratch_dir() if remote else Path(pool)
    log_rel = layout.trial_log("", model_id, fold).as_posix()
    if remote:  # a retried trial's log continues the one its earlier attempts left in the pool
        get_file(pool, log_rel, local_run / log_rel)
    ckdir = checkpoint_dir(local_run, model_id, fold)
    ckpt = tune.get_checkpoint()
    if ckpt is not None:
        ckdir.mkdir(parents=True, exist_ok=True)
        with ckpt.as_directory() as d:
            for name in ("last.pt", "best.pt"):
                src = Path(d) / name
                if src.exists() and src.resolve() != (ckdir / name).resolve():
                    shutil.copy2(src, ckdir / f".{name}.restore")
                    os.replace(ckdir / f".{name}.restore", ckdir / name)

    oof_file = oof.oof_path(local_run, model_id, fold)

    def report(metrics: dict) -> None:
        metrics = {**metrics, **info, "finished": metrics["epoch"] >= cfg.train.total_epochs}
        if remote and oof_file.exists():
            # fit_fold reports its last epoch once the OOF is written; a scheduler may stop the trial
            # at that report (ASHA at max_t), so the fold goes into the pool before it, not after
            upload_fold(local_run, layout.best_weights(local_run, model_id, fold), oof_file, pool)
        tune.report(metrics, checkpoint=tune.Checkpoint.from_directory(str(ckdir)))

    try:
        with _trial_log(local_run, model_id, fold):
            try:
                fit_fold(cfg, fold, data, local_run, report=report, progress=False, cpus=cpus)
            except WeightsUnavailable as e:
                # a retry on this node fails the same way: the trial ends with its error, and Tune
                # (which retries only what raises) does not run it again
                log.error("%s", e)
                nan = float("nan")
                tune.report({**info, "epoch": 0, "finished": False, "error": str(e), "val_dice": nan, "val_dice_pp": nan,
                             "best_val_dice": nan, "best_val_dice_pp": nan})
    finally:
        # a remote pool's trial works in a temporary folder: gone whatever the ending (finished,
        # stopped by ASHA, failed); Tune's checkpoints hold what a retry needs
        if remote:
            with contextlib.suppress(OSError):  # the log is for people: a failed upload must not hide the trial's error
                put_file(local_run / log_rel, pool, log_rel)
            shutil.rmtree(local_run, ignore_errors=True)


def upload_fold(local_run: Path, weights_path, oof_path, pool: str) -> None:
    """Copy a finished fold into a remote pool, weights and the config beside them first (a pseudo
    round reads it), the OOF file last: it marks the fold done, so a crash in between leaves a fold
    without OOF, which the next --resume retrains."""
    config = Path(weights_path).parent / "config.json"
    for path in (Path(weights_path), *([config] if config.exists() else []), Path(oof_path)):
        put_file(path, pool, path.relative_to(local_run).as_posix())
