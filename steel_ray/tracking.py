"""Experiment tracking in the tools users already have: MLflow (``--mlflow URI``) and TensorBoard.

MLflow: one experiment per run (named by the run's id, ``<out name>-<12 hex>``), a parent MLflow
run for the search (tag ``role=search``), a child run per Tune trial (the trial's full config as
params, its per-epoch metrics with the epoch as step, tags stage / fold / model_id / task / status
/ node) and a child run per blend (blend.json, the report and the holdout submission as
artifacts, every score as a metric). The runs are found again by their tags (``trial_key``), so
``--resume`` continues them: a trial's metrics are logged only above the last epoch already
logged (a retried or resumed trial reports its epochs again from its checkpoint), and no trial gets
a second run. Everything is logged by the driver (Tune calls its callbacks there): with several
nodes, only the driver needs to reach the tracking URI.

The URI is MLflow's: ``sqlite:///runs/mlflow.db`` (a local SQLite store, MLflow's default backend),
a folder (``runs/mlruns``), or a tracking server (``http://host:5000``). With a local store the
artifacts go to ``RUN/mlartifacts``; a server keeps its own.

The Tune callbacks that feed it live in ``tune_adapter`` (Ray stays there and in ``search``).

TensorBoard: Ray Tune's TensorBoardX logger writes each trial's reported metrics as scalars
(``ray/tune/<metric>``, step = the trial's report count = its epoch) into the trial's folder under
``RUN/ray/<stage>/`` (or the run's ``--storage``): ``tensorboard --logdir RUN/ray``.
"""
from __future__ import annotations

import json
import logging
import math
import os
import time
from pathlib import Path

from . import run as layout
from .config import ConfigError, TrialConfig

log = logging.getLogger(__name__)

__all__ = ["Tracker", "open_tracker", "resolve_uri"]

# reported keys that are bookkeeping, not metrics (Ray's and ours)
_NOT_METRICS = {"done", "should_checkpoint", "timestamp", "pid", "training_iteration", "iterations_since_restore",
                "finished", "reused", "fold", "time_since_restore", "resumed_after", "time_this_iter_s"}
_STATUS_END = {"TERMINATED": "FINISHED", "STOPPED": "KILLED", "ERROR": "FAILED"}


def resolve_uri(uri: str | None) -> str | None:
    """A tracking URI as every later call (``--resume``, the blend CLI) sees it: a relative SQLite
    path or folder made absolute, so the store is the same whatever the working directory."""
    if not uri:
        return None
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        return "sqlite:///" + str(Path(uri[len("sqlite:///"):]).resolve())
    if "://" not in uri and not uri.startswith("file:"):
        return str(Path(uri).resolve())
    return uri


def _local_store(uri: str) -> bool:
    return uri.startswith(("sqlite:", "file:")) or "://" not in uri


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v if isinstance(v, str) else json.dumps(v)
    return out


def _numbers(d: dict, prefix: str = "") -> dict:
    """The numeric leaves of a nested dict, keys joined by dots."""
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_numbers(v, f"{prefix}{k}."))
        elif isinstance(v, (int, float)) and not isinstance(v, bool):
            out[f"{prefix}{k}"] = v
    return out


class Tracker:
    """The MLflow side of one run folder: its experiment, its search (parent) run, the trials' and
    blends' child runs. Every call is from the driver."""

    def __init__(self, uri: str, run: Path, run_id: str):
        # MLflow's own console handler off: its messages go through our logging (the run's log file)
        os.environ.setdefault("MLFLOW_CONFIGURE_LOGGING", "false")
        from mlflow.tracking import MlflowClient

        self.uri, self.run, self.run_id = uri, Path(run), run_id
        if uri.startswith("sqlite:///"):
            Path(uri[len("sqlite:///"):]).parent.mkdir(parents=True, exist_ok=True)
        self.client = MlflowClient(tracking_uri=uri)
        exp = self.client.get_experiment_by_name(run_id)
        if exp is None:
            where = (self.run / "mlartifacts").resolve().as_uri() if _local_store(uri) else None
            self.experiment_id = self.client.create_experiment(run_id, artifact_location=where,
                                                               tags={"run_folder": str(self.run.resolve())})
        else:
            self.experiment_id = exp.experiment_id
        self._runs: dict[str, str] = {}  # trial_key -> MLflow run id
        self._last_step: dict[str, int] = {}
        self._ended: set[str] = set()  # trial keys whose run this process ended
        self.parent_id: str | None = None

    # -- runs found again by their key (resume) ------------------------------------------------
    def _find(self, key: str):
        if key in self._runs:
            return self._runs[key]
        found = self.client.search_runs([self.experiment_id], filter_string=f"tags.trial_key = '{key}'", max_results=1)
        if found:
            self._runs[key] = found[0].info.run_id
            return self._runs[key]
        return None

    def _run(self, key: str, name: str, tags: dict, params: dict | None = None, parent: bool = True) -> str:
        if key in self._runs:  # made or found by this process (every epoch of a trial lands here): no query
            if key in self._ended:  # a trial Tune retries after an error in this process: running again
                self._ended.discard(key)
                self.client.update_run(self._runs[key], status="RUNNING")
            return self._runs[key]
        rid = self._find(key)
        if rid is not None:  # a run of an earlier process (--resume): running again
            if self.client.get_run(rid).info.status != "RUNNING":
                self.client.update_run(rid, status="RUNNING")
            return rid
        tags = {"trial_key": key, **{k: str(v) for k, v in tags.items()}}
        if parent and self.parent_id:
            tags["mlflow.parentRunId"] = self.parent_id
        rid = self.client.create_run(self.experiment_id, run_name=name, tags=tags).info.run_id
        self._runs[key] = rid
        if params:
            self.log_params(rid, params)
        return rid

    def log_params(self, rid: str, params: dict) -> None:
        from mlflow.entities import Param

        items = [Param(k, str(v)[:6000]) for k, v in sorted(params.items())]
        for i in range(0, len(items), 100):  # MLflow takes at most 100 params per batch
            self.client.log_batch(rid, params=items[i:i + 100])

    def log_metrics(self, rid: str, metrics: dict, step: int = 0) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        items = [Metric(k, float(v), now, int(step)) for k, v in sorted(metrics.items())
                 if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(float(v))]
        for i in range(0, len(items), 1000):
            self.client.log_batch(rid, metrics=items[i:i + 1000])

    # -- the search --------------------------------------------------------------------------
    def start_search(self, state) -> str:
        """The search's parent run, with the settings of ``state`` (a :class:`run.SearchState`) as params."""
        keep = ("data", "spaces", "folds", "holdout", "num_samples", "top", "seed", "storage", "smoke", "run_id", "id_scheme",
                "complete_by")
        d = state.to_dict()
        params = {k: json.dumps(d.get(k)) if not isinstance(d.get(k), str) else d[k] for k in keep}
        if state.pseudo:
            ps = state.pseudo
            params.update({f"pseudo.{k}": ps.get(k) for k in ("parent", "round", "min_confidence", "max_images", "members",
                                                               "n_images")})
        self.parent_id = self._run("search", self.run.name, {"role": "search", "run_folder": str(self.run.resolve())},
                                   params, parent=False)
        return self.parent_id

    def end_search(self, status: str = "FINISHED") -> None:
        if self.parent_id:
            self.client.set_terminated(self.parent_id, status=status)

    def trial_started(self, stage: str, trial_id: str, config: dict) -> str:
        spec = dict(config.get("spec", config))
        fold = int(spec.pop("fold", 0))
        try:
            cfg = TrialConfig.from_dict(spec)
            full, model_id, task = cfg.to_dict(), cfg.model_id(), cfg.model.task
        except (ConfigError, TypeError, ValueError):  # a config that does not validate: its trial fails
            full, model_id, task = spec, "", spec.get("task", "")
        key = f"{stage}/{trial_id}"
        rid = self._run(key, f"{model_id or trial_id}-fold{fold}",
                        {"stage": stage, "fold": fold, "model_id": model_id, "task": task, "status": "RUNNING",
                         "ray_trial_id": trial_id}, _flat(full))
        if key not in self._last_step:
            hist = self.client.get_metric_history(rid, "epoch")
            self._last_step[key] = max((m.step for m in hist), default=0)
        return rid

    def trial_result(self, stage: str, trial_id: str, config: dict, result: dict) -> None:
        key = f"{stage}/{trial_id}"
        rid = self.trial_started(stage, trial_id, config)
        step = int(result.get("epoch") or result.get("training_iteration") or 0)
        if step <= self._last_step.get(key, 0):
            # an epoch logged before: a retried trial reports again from its checkpoint, and a trial a
            # kill left running whose fold is already in the pool reports it again as reused
            if result.get("reused"):
                self.client.set_tag(rid, "reused", "true")
            return
        metrics = {k: v for k, v in result.items() if k not in _NOT_METRICS}
        self.log_metrics(rid, metrics, step)
        self._last_step[key] = step
        node = result.get("node_ip")
        if node:
            self.client.set_tag(rid, "node", f"{node} ({str(result.get('node_id', ''))[:12]})")
        if result.get("reused"):
            self.client.set_tag(rid, "reused", "true")

    def trial_ended(self, stage: str, trial_id: str, config: dict, error: bool) -> None:
        rid = self.trial_started(stage, trial_id, config)
        if error:
            self.client.set_tag(rid, "status", "ERROR")
        self.client.set_terminated(rid, status="FAILED" if error else "FINISHED")
        self._ended.add(f"{stage}/{trial_id}")

    def finish_stage(self, stage: str, rows: list[dict]) -> None:
        """The final status of each trial as ``results.parquet`` gives it (TERMINATED: ran to the end,
        STOPPED: ASHA stopped it, ERROR), the MLflow run ended as FINISHED / KILLED / FAILED; a run
        of the stage whose trial is not among ``rows`` is LOST (see below)."""
        for r in rows:
            rid = self._find(f"{stage}/{r['trial_id']}")
            if rid is None:
                continue
            self.client.set_tag(rid, "status", r["status"])
            if r.get("error"):
                self.client.set_tag(rid, "error", str(r["error"])[:5000])
            self.client.set_terminated(rid, status=_STATUS_END.get(r["status"], "FINISHED"))
        # a trial the driver started just before it was killed, which Tune's saved state did not yet
        # hold: the resumed stage never ran it again (the searcher proposed another); its run stays
        # as a record, marked LOST
        keys = {f"{stage}/{r['trial_id']}" for r in rows}
        for x in self.client.search_runs([self.experiment_id], filter_string=f"tags.stage = '{stage}'", max_results=5000):
            if x.data.tags.get("trial_key") not in keys and x.data.tags.get("status") != "LOST":
                self.client.set_tag(x.info.run_id, "status", "LOST")
                self.client.set_terminated(x.info.run_id, status="KILLED")

    # -- the blend ---------------------------------------------------------------------------
    def log_blend(self, doc: dict, out_dir: Path, command: str, key: str | None = None) -> str:
        """A child run for one blend: its settings and choices as params, every score as a metric,
        blend.json, report.html / .md and the holdout submission as artifacts. ``key`` finds the
        search's own blend again on a resume; the CLI's re-blends get a run each."""
        out_dir = Path(out_dir)
        key = key or f"blend/{out_dir.name}/{time.strftime('%Y%m%dT%H%M%S')}"
        sel = {k: v for k, v in doc.get("selection", {}).items() if not isinstance(v, (dict, list))}
        params = {**{f"selection.{k}": v for k, v in sel.items()}, "members": " ".join(m["model_id"] for m in doc["members"]),
                  "classifiers": " ".join(c["model_id"] for c in doc.get("classifiers", [])),
                  **_flat({f"class{c}": pp for c, pp in doc.get("postprocess", {}).items()}, "postprocess.")}
        if self.parent_id is None:
            self.parent_id = self._find("search")
        rid = self._run(key, f"blend {out_dir.name}", {"role": "blend", "stage": "blend", "blend_dir": str(out_dir.resolve()),
                                                       "command": command[:5000]}, params)
        scores = {f"score.{k}": v for k, v in doc.get("scores", {}).items()}
        scores.update(_numbers({f"class{c}": v for c, v in (doc.get("per_class") or {}).items()}))
        h = doc.get("holdout") or {}
        if h:
            scores.update({"holdout.ci95_low": h["ci95"][0], "holdout.ci95_high": h["ci95"][1],
                           "holdout.all_empty": h["all_empty"], "holdout.looks": h.get("looks", 0),
                           **{f"holdout.class{c}": v for c, v in h.get("per_class", {}).items()}})
        scores.update({"n_members": len(doc["members"]), "n_classifiers": len(doc.get("classifiers", []))})
        self.log_metrics(rid, scores)
        if key == "blend/search" and self.parent_id:  # the run's own blend: its scores on the search run too
            self.log_metrics(self.parent_id, scores)
        for name in ("blend.json", "report.html", "report.md", "holdout_submission.csv"):
            if (out_dir / name).exists():
                self.client.log_artifact(rid, str(out_dir / name))
        self.client.set_terminated(rid, status="FINISHED")
        log.info("MLflow: blend logged to %s (experiment %s, run %s)", self.uri, self.run_id, rid)
        return rid


def open_tracker(uri: str | None, run: Path, state) -> Tracker | None:
    """The run's tracker (None without a URI); its experiment is named by the run's id."""
    if not uri:
        return None
    return Tracker(uri, Path(run), layout.run_id(state, run))
