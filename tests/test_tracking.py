"""A run opened in the users' own tools: MLflow (a real local SQLite store, read with MlflowClient),
TensorBoard (Tune's TensorBoardX event files, read with TensorBoard's reader) and optuna-dashboard
(its own WSGI app on a local port), each checked against Tune's record and results.parquet."""
import json
import subprocess
import sys

import pandas as pd
import pytest
from dashboards import dashboard_trials, progress, same_trials, tensorboard_scalars, trial_dirs
from test_search import SPACE

from steel_ray.run import SearchState

MLFLOW_END = {"TERMINATED": "FINISHED", "STOPPED": "KILLED", "ERROR": "FAILED"}


def _cli(module, *args):
    return subprocess.run([sys.executable, "-m", module, *map(str, args)], capture_output=True, text=True)


@pytest.fixture(scope="module")
def tracked(tiny_set, tmp_path_factory):
    """One search with a holdout, a failing explore point and its blend, logged to a local MLflow store."""
    tmp = tmp_path_factory.mktemp("tracked")
    space, run = tmp / "space.yaml", tmp / "run"
    space.write_text(SPACE)
    uri = f"sqlite:///{tmp / 'mlflow.db'}"
    r = _cli("steel_ray.search", "--space", space, "--data", tiny_set, "--out", run, "--folds", 2, "--num-samples", 3,
             "--top", 1, "--holdout", 0.2, "--max-concurrent", 2, "--mlflow", uri)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    # the holdout is predicted on Ray's workers (Predictor actors): Ray's core worker said on the
    # console that their constructor arguments sat in the object store (ray-project/ray#53727)
    assert "core_worker" not in r.stdout + r.stderr and "predicted" in r.stdout + r.stderr, r.stderr[-3000:]
    return run, uri


def _same_series(got, expected) -> None:
    """The same steps, and values equal to float32 precision (TensorBoard keeps float32)."""
    expected = list(expected)
    assert [int(s) for s, _ in got] == [int(s) for s, _ in expected]
    assert [v for _, v in got] == pytest.approx([v for _, v in expected], rel=1e-6)


def _client(uri):
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=uri)


def _runs(client, exp_id):
    return client.search_runs([exp_id], max_results=1000)


def test_mlflow_has_the_search_its_trials_and_its_blend(tracked, tmp_path):
    run, uri = tracked
    client = _client(uri)
    state = json.loads((run / "search.json").read_text())
    table = pd.read_parquet(run / "results.parquet")
    assert set(table.status) >= {"ERROR", "TERMINATED"}  # the 512-wide crop fails, the others train
    exps = [e for e in client.search_experiments() if e.name != "Default"]
    assert [e.name for e in exps] == [state["run_id"]]  # one experiment per run, named by its id
    assert exps[0].artifact_location == (run / "mlartifacts").resolve().as_uri()
    runs = _runs(client, exps[0].experiment_id)
    parent = [x for x in runs if x.data.tags.get("role") == "search"]
    assert len(parent) == 1 and parent[0].info.status == "FINISHED"
    assert parent[0].data.params["folds"] == "2" and parent[0].data.params["run_id"] == state["run_id"]
    pid = parent[0].info.run_id
    trials = {(x.data.tags["stage"], x.data.tags["ray_trial_id"]): x for x in runs if x.data.tags.get("ray_trial_id")}
    # one child run per trial of results.parquet, no more
    assert sorted(trials) == sorted(zip(table.stage, table.trial_id))
    histories = {}
    for _, row in table.iterrows():
        x = trials[(row.stage, row.trial_id)]
        tags = x.data.tags
        assert tags["mlflow.parentRunId"] == pid
        assert (tags["status"], tags["fold"], tags["model_id"], tags["task"]) == (row.status, str(row.fold), row.model_id, "segment")
        assert x.info.status == MLFLOW_END[row.status]
        for k, v in json.loads(row.config).items():  # the trial's config as params (every key, defaults too)
            assert x.data.params[k] == (v if isinstance(v, str) else json.dumps(v)), k
        assert "loss" in x.data.params and "oof_epoch" in x.data.params
        if row.status != "ERROR":
            assert tags["node"].startswith(row.node_ip)
        hist = client.get_metric_history(x.info.run_id, "val_dice_pp")
        histories[row.trial_id] = sorted((m.step, m.value) for m in hist)
        assert [s for s, _ in histories[row.trial_id]] == list(range(1, row.epochs_run + 1))
    # the values are Tune's own record of each epoch (progress.csv)
    checked = 0
    for d in trial_dirs(run):
        p = progress(d) if (d / "progress.csv").exists() else None
        if p is None or p.empty:
            continue
        _same_series(histories[p.trial_id.iloc[0]], zip(p.epoch, p.val_dice_pp))
        checked += 1
    assert checked == int((table.status != "ERROR").sum())
    # the blend: a child run with every score, blend.json, the report and the holdout submission
    doc = json.loads((run / "blend" / "blend.json").read_text())
    blend = [x for x in runs if x.data.tags.get("role") == "blend"]
    assert len(blend) == 1 and blend[0].data.tags["mlflow.parentRunId"] == pid
    m = blend[0].data.metrics
    for k in ("nested", "cross_fitted", "best_single", "all_empty", "holdout"):
        assert m[f"score.{k}"] == pytest.approx(doc["scores"][k])
    assert m["holdout.ci95_low"] == pytest.approx(doc["holdout"]["ci95"][0])
    assert blend[0].data.params["members"] == " ".join(x["model_id"] for x in doc["members"])
    arts = {a.path for a in client.list_artifacts(blend[0].info.run_id)}
    assert arts >= {"blend.json", "report.html", "report.md", "holdout_submission.csv"}
    got = client.download_artifacts(blend[0].info.run_id, "blend.json", str(tmp_path))
    assert json.loads(open(got).read()) == doc

    # a re-blend from the CLI is one more blend run under the same search
    r = _cli("steel_ray.blend", "--run", run, "--out", tmp_path / "reblend", "--no-nested", "--mlflow", uri)
    assert r.returncode == 0, r.stderr[-3000:]
    after = _runs(client, exps[0].experiment_id)
    blends = [x for x in after if x.data.tags.get("role") == "blend"]
    assert len(after) == len(runs) + 1 and len(blends) == 2
    assert all(x.data.tags["mlflow.parentRunId"] == pid for x in blends)
    # --resume of the finished search logs to the same runs: nothing is duplicated
    r = _cli("steel_ray.search", "--out", run, "--resume", "--mlflow", uri)
    assert r.returncode == 0, r.stderr[-3000:]
    again = _runs(client, exps[0].experiment_id)
    assert sorted(x.info.run_id for x in again) == sorted(x.info.run_id for x in after)
    assert sorted(client.get_metric_history(trials[(row.stage, row.trial_id)].info.run_id, "val_dice_pp")[i].step
                  for i in range(row.epochs_run)) == list(range(1, row.epochs_run + 1))
    # a resume cannot move the run to another store
    r = _cli("steel_ray.search", "--out", run, "--resume", "--mlflow", f"sqlite:///{tmp_path / 'other.db'}")
    assert r.returncode == 2 and "differs from the interrupted search's" in r.stderr, r.stderr[-2000:]


def test_tensorboard_event_files_hold_every_epoch(tracked):
    """Each trial's folder has TensorBoard events with val_dice_pp at every epoch it reported."""
    run, _ = tracked
    table = pd.read_parquet(run / "results.parquet")
    seen = set()
    for d in trial_dirs(run):
        p = progress(d) if (d / "progress.csv").exists() else pd.DataFrame()
        scalars = tensorboard_scalars(d, "ray/tune/val_dice_pp")
        if p.empty:  # the failing trial reported nothing
            assert scalars == []
            continue
        _same_series(scalars, zip(p.training_iteration, p.val_dice_pp))
        seen.add(p.trial_id.iloc[0])
    assert seen == set(table[table.status != "ERROR"].trial_id)


def test_optuna_dashboard_shows_every_explore_trial_with_its_state(tracked):
    run, _ = tracked
    table = pd.read_parquet(run / "results.parquet")
    shown = dashboard_trials(run / "optuna.db")
    assert list(shown) == ["explore"]
    same_trials(shown["explore"], table[table.stage == "explore"])


def test_a_resumed_or_retried_trial_logs_each_epoch_once_into_its_one_run(tmp_path):
    """A new process (a --resume) finds the trial's run by its key; epochs a retried trial reports
    again from its checkpoint are not logged twice (the first value stays), later ones are."""
    from steel_ray.tracking import Tracker

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    cfg = {"arch": "FPN", "encoder": "tu-test_resnet", "lr": 3e-3, "fold": 1}
    first = Tracker(uri, tmp_path / "run", "run-0123456789ab")
    first.start_search(SearchState(data="/d", folds=2, run_id="run-0123456789ab"))
    for epoch, v in ((1, 0.5), (2, 0.6)):
        first.trial_result("explore", "t1", cfg, {"epoch": epoch, "val_dice_pp": v, "node_ip": "10.0.0.1", "node_id": "ab" * 20})
    again = Tracker(uri, tmp_path / "run", "run-0123456789ab")  # the resumed driver
    again.start_search(SearchState(data="/d", folds=2, run_id="run-0123456789ab"))
    for epoch, v in ((2, 0.65), (3, 0.7)):  # restored from the epoch-1 checkpoint: epoch 2 again, then 3
        again.trial_result("explore", "t1", cfg, {"epoch": epoch, "val_dice_pp": v})
    # killed after its OOF was written, restored as running: it reports its fold again as reused
    again.trial_result("explore", "t1", cfg, {"epoch": 3, "val_dice_pp": 0.7, "reused": True})
    again.trial_result("explore", "t2", cfg, {"epoch": 1, "val_dice_pp": 0.4})  # started, then forgotten by Tune
    again.finish_stage("explore", [{"trial_id": "t1", "status": "STOPPED", "error": ""}])
    client = again.client
    runs = client.search_runs([again.experiment_id])
    assert sorted(x.data.tags.get("role", x.data.tags.get("stage")) for x in runs) == ["explore", "explore", "search"]
    lost = [x for x in runs if x.data.tags.get("ray_trial_id") == "t2"][0]
    assert lost.data.tags["status"] == "LOST" and lost.info.status == "KILLED"
    trial = [x for x in runs if x.data.tags.get("ray_trial_id") == "t1"][0]
    hist = sorted((m.step, m.value) for m in client.get_metric_history(trial.info.run_id, "val_dice_pp"))
    assert hist == [(1, 0.5), (2, 0.6), (3, 0.7)]
    assert trial.data.tags["status"] == "STOPPED" and trial.info.status == "KILLED"
    assert (trial.data.tags["fold"], trial.data.tags["model_id"], trial.data.params["lr"]) == ("1", cfg_id(cfg), "0.003")
    assert trial.data.tags["node"].startswith("10.0.0.1 (abab")


def cfg_id(cfg):
    from steel_ray.config import TrialConfig

    return TrialConfig.from_dict({k: v for k, v in cfg.items() if k != "fold"}).model_id()


def test_report_shows_the_blends_masks_on_oof_and_holdout_images(tracked):
    """The search's report embeds overlays (decodable JPEGs) of OOF pairs and the holdout's worst
    pairs, captioned with image, fold, Dice and gate, under a colour legend; it stays small."""
    import base64
    import re

    import cv2
    import numpy as np

    run, _ = tracked
    page = (run / "blend" / "report.html").read_text()
    assert len(page) < 10 * 2**20
    found = re.findall(r"<img class='overlay' alt='([^']*)' src='data:image/jpeg;base64,([^']+)'", page)
    assert found and "&#9632; truth" in page and "&#9632; blend mask" in page
    held = json.loads((run / "holdout.json").read_text())["image_ids"]
    truth = pd.read_parquet(run / "truth.parquet")
    for alt, data in found:
        img = cv2.imdecode(np.frombuffer(base64.b64decode(data), np.uint8), cv2.IMREAD_COLOR)
        assert img is not None and img.shape[1] == 256  # the 64x256 image at full width, a caption band above
        m = re.match(r"(\S+) class (\d) (fold (\d)|holdout): .*Dice (\d\.\d{3}), gate (\d\.\d{3})", alt)
        assert m, alt
        if m.group(4) is not None:
            assert int(truth.set_index("image_id").fold[m.group(1)]) == int(m.group(4))  # the image's own fold
        else:
            assert m.group(1) in held
    assert any(" holdout: " in alt for alt, _ in found)
