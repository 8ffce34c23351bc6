"""End-to-end searches on real Ray (embedded, and a multi-node ray.cluster_utils.Cluster)."""
import argparse
import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pandas as pd
import pytest
from dashboards import dashboard_trials, same_trials

from steel_ray import blend, oof

SPACE = """
fixed: {batch_size: 8, crop_height: 32, epochs: 2, tta: none}
params:
  arch: {type: categorical, choices: [Unet, FPN]}
  encoder: {type: categorical, choices: [tu-test_resnet, tu-test_efficientnet]}
  crop_width: {type: categorical, choices: [128, 512]}
  lr: {type: logfloat, low: 1.0e-3, high: 1.0e-2}
points_to_evaluate:
  - {arch: FPN, encoder: tu-test_resnet, crop_width: 512, lr: 3.0e-3}
  - {arch: Unet, encoder: tu-test_resnet, crop_width: 128, lr: 3.0e-3}
  - {arch: FPN, encoder: tu-test_efficientnet, crop_width: 128, lr: 5.0e-3}
"""


def _search(*args, **kw):
    return subprocess.run([sys.executable, "-m", "steel_ray.search", *map(str, args)], capture_output=True, text=True, **kw)


def _check_pool(run, n_models, n_folds):
    table = pd.read_parquet(run / "results.parquet")
    present = oof.list_pool(run)
    complete = [m for m, f in present.items() if f == list(range(n_folds))]
    assert len(complete) >= n_models
    pool = oof.read_pool(run, complete)  # raises if anything is missing
    assert len(pool.image_ids) == len(oof.read_truth(run).image_ids)
    for m in present:  # one file per (model, fold), no leftovers
        for f in present[m]:
            assert [p.name for p in (run / "oof" / f"model_id={m}" / f"fold={f}").iterdir()] == ["part-0.parquet"]
    return table, complete


def _s3_search(tmp_path, *args):
    """A search whose --storage is a real S3 API (moto's server on 127.0.0.1, the endpoint in the URI
    as a user gives MinIO's); trials keep their temporary folders under tmp_path/scratch. Returns
    the completed process, the storage URI, the scratch folder's leftovers and every key under
    STORAGE/<run id>/pool/oof."""
    from s3_server import list_keys, s3_storage

    scratch = tmp_path / "scratch"
    with s3_storage() as storage:
        r = _search(*args, "--storage", storage, env={**os.environ, "STEEL_RAY_SCRATCH": str(scratch)})
        state = json.loads((Path(args[args.index("--out") + 1]) / "search.json").read_text())
        keys = list_keys(storage, f"{state['run_id']}/pool/oof")
    left = sorted(p.name for p in scratch.iterdir()) if scratch.exists() else []
    return r, storage, left, keys


def _oof_keys_once(keys, table):
    """The pool in S3 holds one OOF file per (model, fold) the table says ended, and nothing else."""
    done = table[table.status == "TERMINATED"]
    expected = sorted({f"model_id={m}/fold={f}/part-0.parquet" for m, f in zip(done.model_id, done.fold)})
    assert keys == expected, (keys, expected)


def test_smoke_search_failing_trial_and_pruning(tiny_set, tmp_path):
    """Explore (one point cannot fit the images and fails), complete, on an S3 pool: every trial's
    temporary folder is gone, finished or failed."""
    space = tmp_path / "space.yaml"
    space.write_text(SPACE)
    run = tmp_path / "run"
    r, storage, left, keys = _s3_search(tmp_path, "--space", space, "--data", tiny_set, "--out", run, "--folds", 2,
                                        "--num-samples", 4, "--top", 2, "--max-concurrent", 2, "--max-failures", 0, "--no-blend")
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert left == []  # no steel_ray_trial_* folder left behind
    # the console shows our progress and summary; Ray's tables, hints and tracebacks go to the log files
    out = r.stdout + r.stderr
    for chatter in ("Configuration for experiment", "Trial status", "View detailed results", "Traceback", "ray::",
                    "Token authentication", "Started a local Ray instance"):
        assert chatter not in out, chatter
    assert "explore: 4 of 4 trial(s) ended" in out and "complete:" in out
    assert len(r.stdout.splitlines()) <= 20, r.stdout
    log_text = (run / "logs" / "search.log").read_text()
    assert "Configuration for experiment" in log_text and "Traceback" in log_text  # the failing trial's error is kept
    # the trials' own logs came back from the pool, the failed one's too
    assert len(list((run / "logs" / "trials").glob("*-fold0.log"))) >= 4
    state = json.loads((run / "search.json").read_text())
    table, complete = _check_pool(run, len(state["selected"]), 2)
    _oof_keys_once(keys, table.drop_duplicates(["model_id", "fold", "status"]))
    explore = table[table.stage == "explore"]
    assert len(explore) == 4 and len(state["selected"]) == min(2, int((explore.status != "ERROR").sum()))
    # the point with a 512-wide crop cannot fit 256-wide images: it fails alone, with its error
    err = explore[explore.status == "ERROR"]
    too_wide = explore.config.map(lambda c: json.loads(c)["crop_width"] == 512)
    assert len(err) >= 1 and (too_wide == (explore.status == "ERROR")).all()
    assert err.error.str.contains("does not fit the 64x256 training images").all()
    assert (explore[explore.status != "ERROR"].best_val_dice.between(0, 1)).all()
    assert set(table.columns) >= {"stage", "config", "fold", "status", "epochs_run", "best_val_dice", "error", "node_id", "gpu_ids", "wall_s"}
    # every selected model was completed on every fold; fold 0 is reused when it ran to the end
    comp = table[table.stage == "complete"]
    assert (comp.status == "TERMINATED").all()
    finished = set(explore[explore.status == "TERMINATED"].model_id)
    for cfg in state["selected"]:
        from steel_ray.config import TrialConfig
        mid = TrialConfig.from_dict(cfg).model_id()
        folds = sorted(comp[comp.model_id == mid].fold)
        assert folds == ([1] if mid in finished else [0, 1])
    # Optuna saw ASHA-stopped trials as PRUNED, finished ones as COMPLETE, the failure as FAIL
    study = optuna.load_study(study_name="explore", storage=f"sqlite:///{run / 'optuna.db'}")
    states = sorted(t.state.name for t in study.trials)
    expected = sorted({"TERMINATED": "COMPLETE", "STOPPED": "PRUNED", "ERROR": "FAIL"}[s] for s in explore.status)
    assert states == expected
    same_trials(dashboard_trials(run / "optuna.db")["explore"], explore)  # optuna-dashboard shows the same
    # an existing run without --resume is refused and nothing is touched
    before = (run / "results.parquet").stat().st_mtime_ns
    r = _search("--space", space, "--data", tiny_set, "--out", run)
    assert r.returncode == 2 and "already exists" in r.stderr and "--resume" in r.stderr
    assert (run / "results.parquet").stat().st_mtime_ns == before


def _wait_for_oofs(run, n, p, timeout=300):
    deadline = time.time() + timeout
    while time.time() < deadline and len(list(run.glob("oof/*/*/part-0.parquet"))) < n:
        time.sleep(0.2)
    assert p.poll() is None, "search finished before it could be stopped"


def _wait_for_ended_trials(run, n, p, timeout=300):
    """Until the driver's Tune has registered n ended explore trials: the searcher tells the Optuna
    study in the same controller step as the stage's callback (an OOF file on disk comes earlier)."""
    import sqlite3

    deadline = time.time() + timeout
    query = ("SELECT COUNT(*) FROM trials t JOIN studies s ON t.study_id = s.study_id "
             "WHERE s.study_name = 'explore' AND t.state IN ('COMPLETE', 'PRUNED', 'FAIL')")
    while time.time() < deadline and p.poll() is None:
        if (run / "optuna.db").exists():  # never open it first: sqlite would create it
            try:
                # read-only: optuna.load_study may write (schema, version table) while the search
                # is still creating the study, which could fail the search
                with contextlib.closing(sqlite3.connect(f"file:{run / 'optuna.db'}?mode=ro", uri=True, timeout=1)) as db:
                    if db.execute(query).fetchone()[0] >= n:
                        break
            except sqlite3.Error:  # the tables are not there yet, or the file is locked for a moment
                pass
        time.sleep(0.3)
    time.sleep(1.0)  # the rest of that controller step
    assert p.poll() is None, "search finished before it could be stopped: " + (p.stderr.read()[-3000:] if p.stderr else "")


def test_ctrl_c_then_kill_then_resume(tiny_set, tmp_path):
    """Ctrl-C (SIGINT) while explore runs: one line saying "interrupted" with the trials that
    ended, exit 130, no "failed", the stage not marked explored. The resumed search counts the
    trials that ended before it; killed hard (SIGKILL of the driver and its Ray) it resumes again
    without redoing a finished fold, and the pool holds each (model, fold) once."""
    import re

    run = tmp_path / "run"
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    args = ["--space", "tests/spaces/tiny.yaml", "--data", tiny_set, "--out", run, "--folds", 2,
            "--num-samples", 3, "--top", 2, "--max-concurrent", 1, "--no-blend", "--mlflow", uri]
    p = subprocess.Popen([sys.executable, "-m", "steel_ray.search", *map(str, args)], stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True)
    _wait_for_ended_trials(run, 1, p)
    p.send_signal(signal.SIGINT)
    out, err = p.communicate(timeout=300)
    assert p.returncode == 130, out[-2000:] + err[-3000:]
    m = re.search(r"explore: interrupted after (\d) of 3 trial\(s\) ended \(0 failed\); continue it with: .* --resume", err)
    assert m and 1 <= int(m.group(1)) < 3, err[-3000:]
    assert "error" not in err.lower() and "failed;" not in err.replace("0 failed", ""), err[-3000:]
    state = json.loads((run / "search.json").read_text())
    assert state["stage"] == "explore" and state["explored"] == []
    # resumed, then killed hard once one more fold is in the pool
    n_before = len(list(run.glob("oof/*/*/part-0.parquet")))
    p = subprocess.Popen([sys.executable, "-m", "steel_ray.search", *map(str, args), "--resume"], stdout=subprocess.DEVNULL,
                         stderr=subprocess.PIPE, text=True, start_new_session=True)
    _wait_for_oofs(run, n_before + 1, p)
    os.killpg(p.pid, signal.SIGKILL)  # the driver and the Ray it embedded
    err_killed = p.communicate()[1]
    time.sleep(2)
    # after SIGKILL a trial can fail its resume (Tune's last snapshot may name a checkpoint that
    # num_to_keep already deleted: a known gap, see the issue note), so failures are allowed here
    m2 = re.search(r"explore: (\d) of 3 trial\(s\) ended \((\d) failed, (\d) ended before this resume\)", err_killed)
    before = {f: f.stat().st_mtime_ns for f in run.glob("oof/*/*/part-0.parquet")}
    r = _search(*args, "--resume")
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    if m2 is None:  # killed during explore: the last resume reports the trials that ended before it
        m2 = re.search(r"explore: 3 of 3 trial\(s\) ended \((\d) failed, (\d) ended before this resume\)", r.stderr)
        assert m2 and int(m2.group(2)) >= 1, r.stderr[-3000:]
    else:  # explore had ended in the killed run: it counted the interrupted run's trials
        assert int(m2.group(3)) >= 1, err_killed[-3000:]
    state = json.loads((run / "search.json").read_text())
    table, complete = _check_pool(run, len(state["selected"]), 2)
    explore = table[table.stage == "explore"]
    assert len(explore) == 3 and explore.trial_id.is_unique
    for f, t in before.items():  # finished folds were not redone
        assert f.stat().st_mtime_ns == t
    assert state["stage"] == "blend"
    # MLflow after an interruption, a resume, a kill and a resume: one run per trial, each epoch once
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    exp = client.get_experiment_by_name(state["run_id"])
    runs = client.search_runs([exp.experiment_id], max_results=1000)
    keys = [(x.data.tags["stage"], x.data.tags["ray_trial_id"]) for x in runs
            if "ray_trial_id" in x.data.tags and x.data.tags["status"] != "LOST"]
    assert sorted(keys) == sorted(zip(table.stage, table.trial_id)), (keys, table[["stage", "trial_id"]])
    # a trial started just before the SIGKILL that Tune's saved state did not hold is never run again:
    # its run is kept, marked LOST and ended
    lost = [x for x in runs if x.data.tags.get("status") == "LOST"]
    assert all(x.info.status == "KILLED" and x.data.tags["ray_trial_id"] not in set(table.trial_id) for x in lost)
    assert len([x for x in runs if x.data.tags.get("role") == "search"]) == 1
    by_key = {(x.data.tags["stage"], x.data.tags["ray_trial_id"]): x for x in runs if "ray_trial_id" in x.data.tags}
    for _, row in table.iterrows():
        steps = [m.step for m in client.get_metric_history(by_key[(row.stage, row.trial_id)].info.run_id, "epoch")]
        assert sorted(steps) == sorted(set(steps)), (row.trial_id, steps)  # no epoch logged twice
        if row.status == "TERMINATED":
            assert sorted(steps) == list(range(1, row.epochs_run + 1)) or steps == [row.epochs_run]  # trained, or reused


def test_multi_node_gpu_cluster(tiny_set, tmp_path):
    import ray
    from ray.cluster_utils import Cluster

    from steel_ray import search

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "num_gpus": 0})
    workers = [cluster.add_node(num_cpus=1, num_gpus=1) for _ in range(2)]
    cluster.wait_for_nodes()
    storage = tmp_path / "shared"
    run = tmp_path / "run"
    try:
        rc = search.main(["--space", "tests/spaces/tiny.yaml", "--data", str(tiny_set), "--out", str(run),
                          "--folds", "2", "--num-samples", "2", "--top", "2", "--gpus-per-trial", "1",
                          "--cpus-per-trial", "1", "--address", cluster.address, "--storage", str(storage),
                          "--no-blend", "--max-concurrent", "2"])
        assert rc == 0
    finally:
        ray.shutdown()
        cluster.shutdown()
    table, complete = _check_pool(run, 1, 2)
    worker_ids = {w.node_id for w in workers}
    ran = table[(table.status != "ERROR") & (table.node_id != "")]
    assert set(ran.node_id) == worker_ids  # trials ran on both GPU workers, none on the head
    assert set(ran.gpu_ids) == {"0"}  # each worker has one (declared) GPU, id 0
    # the pool in shared storage is complete too (trials wrote there, the driver synced it)
    rid = json.loads((run / "search.json").read_text())["run_id"]
    assert rid.startswith("run-") and [p.name for p in storage.iterdir()] == [rid]  # everything under STORAGE/<run id>/
    pool_dir = storage / rid / "pool"
    assert {m: f for m, f in oof.list_pool(pool_dir).items() if m in complete} == {m: [0, 1] for m in complete}
    assert (storage / rid / "ray" / "explore").is_dir() and (storage / rid / "ray" / "complete").is_dir()


def test_resume_checks_saved_settings(tmp_path):
    from steel_ray import search

    run = tmp_path / "run"
    with pytest.raises(search.SearchError, match="nothing to resume"):
        search._load_state(run, search._args(["--out", str(run), "--resume"]))
    run.mkdir()
    (run / "search.json").write_text(json.dumps({"space": "/s.yaml", "data": "/d", "storage": None, "folds": 3}))
    with pytest.raises(search.SearchError, match="model id scheme 1; .*start a new run folder"):  # made before scheme 2
        search._load_state(run, search._args(["--out", str(run), "--resume"]))
    (run / "search.json").write_text(json.dumps({"space": "/s.yaml", "data": "/d", "storage": None, "folds": 3, "id_scheme": 2}))
    with pytest.raises(search.SearchError, match="--data /other differs from the interrupted search's /d"):
        search._load_state(run, search._args(["--out", str(run), "--resume", "--data", "/other"]))
    state = search._load_state(run, search._args(["--out", str(run), "--resume", "--folds", "7"]))
    assert state.data == "/d" and state.folds == 3  # the saved split wins
    with pytest.raises(TypeError, match=r"unknown option\(s\) \['fold'\]"):
        search.search(run, fold=3)  # a typo is refused before anything runs
    with pytest.raises(search.SearchError, match="already exists"):
        search._load_state(run, search._args(["--out", str(run), "--space", "x", "--data", "y"]))


@pytest.mark.parametrize("holdout,folds,msg", [
    (1.5, 3, "error: --holdout 1.5: the fraction of the training images set aside must be 0 <= F < 1"),
    (-0.1, 3, "error: --holdout -0.1: the fraction"),
    (0.99, 3, "error: --holdout 0.99 leaves 0 of 48 training images of"),
    (0.9, 6, "error: --holdout 0.9 leaves 4 of 48 training images of"),
    (0.0, 1, "error: --folds 1: at least 2 folds are needed")])
def test_bad_holdout_or_folds_is_one_line_before_anything_is_written(tiny_set, tmp_path, holdout, folds, msg, capsys):
    from steel_ray import search

    run = tmp_path / "run"
    rc = search.main(["--space", "tests/spaces/tiny.yaml", "--data", str(tiny_set), "--out", str(run), "--holdout", str(holdout),
                      "--folds", str(folds)])
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert rc == 2 and lines[-1].startswith(msg), err[-2000:]
    assert sum(line.startswith("error") for line in lines) == 1 and "Traceback" not in err
    assert not run.exists()


def test_two_spaces_one_run_segmentation_and_classifier(tiny_set, tmp_path):
    """--space repeats: each space has its own study, samples and top; both kinds reach the pool and the blend."""
    seg, clf = tmp_path / "seg.yaml", tmp_path / "gate.yaml"
    seg.write_text("fixed: {batch_size: 8, epochs: 1, tta: none, arch: FPN, encoder: tu-test_resnet}\n"
                   "params:\n  lr: {type: logfloat, low: 1.0e-3, high: 1.0e-2}\n")
    clf.write_text("task: classify\nfixed: {batch_size: 8, epochs: 1, tta: hflip, encoder: tu-test_resnet}\n"
                   "params:\n  pool: {type: categorical, choices: [max, avg]}\n")
    run = tmp_path / "run"
    r = _search("--space", seg, "--space", clf, "--data", tiny_set, "--out", run, "--folds", 2, "--num-samples", 2,
                "--top", 1, "--max-concurrent", 2, "--complete-by", "ensemble")
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    out = r.stdout + r.stderr
    # --complete-by ensemble: the segmentation space completes the blend's first pick on the screening
    # fold; both rules' picks are logged and kept (the classifier space: by single score)
    picks = json.loads((run / "search.json").read_text())["completion"]
    explore_seg = pd.read_parquet(run / "results.parquet").query("stage == 'explore' and space == 'seg'")
    assert set(picks) == {"seg"} and picks["seg"]["rule"] == "ensemble"
    assert picks["seg"]["single"] == [explore_seg.sort_values("best_val_dice_pp", ascending=False).model_id.iloc[0]]
    assert picks["seg"]["ensemble"] == blend.ensemble_order(run, list(explore_seg.model_id), 0)[:1]
    assert "explore-seg: complete by ensemble (this run): " in out and "explore-seg: complete by single: " in out
    assert "explore-seg: 2 of 2 trial(s) ended" in out and "explore-gate: 2 of 2 trial(s) ended" in out
    table = pd.read_parquet(run / "results.parquet")
    explore = table[table.stage == "explore"]
    assert sorted(explore.space.unique()) == ["gate", "seg"] and (explore.groupby("space").size() == 2).all()
    assert explore[explore.space == "gate"].model_id.str.startswith("cls-").all()
    studies = {s.study_name: s.n_trials for s in optuna.get_all_study_summaries(f"sqlite:///{run / 'optuna.db'}")}
    assert studies == {"explore-seg": 2, "explore-gate": 2}
    state = json.loads((run / "search.json").read_text())
    assert len(state["selected_models"]) == 2 and sum(m.startswith("cls-") for m in state["selected_models"]) == 1
    assert picks["seg"]["ensemble"][0] in state["selected_models"]
    clf_id = next(m for m in state["selected_models"] if m.startswith("cls-"))
    assert oof.list_pool(run)[clf_id] == [0, 1] and oof.task_of(run, clf_id, [0, 1]) == "classify"
    doc = json.loads((run / "blend" / "blend.json").read_text())
    assert doc["classifier_pool"] == [clf_id] and "nested_segmentation_only" in doc["scores"]
    assert all("gate_source" in pp for pp in doc["postprocess"].values())
    assert "Classifier ensemble" in (run / "blend" / "report.md").read_text()


def test_asha_stops_a_planted_weak_trial(tiny_set, tmp_path):
    """Sequential trials: a config that learns, then one that cannot (lr 1e-7 and no aux head: its
    maps and presence stay high everywhere, so no post-processing can empty them and its Dice falls
    far below all-empty). ASHA must stop the second at its first rung; Optuna must see it PRUNED."""
    import learning_cases as lc
    import yaml

    space = tmp_path / "space.yaml"  # the trials benchmarks/bench_test_margins.py measures (--cases asha)
    space.write_text(yaml.safe_dump({"fixed": lc.ASHA_FIXED, "params": {"lr": {"type": "categorical", "choices": [3.0e-3, 1.0e-7]}},
                                     "points_to_evaluate": [{"lr": 3.0e-3}, {"lr": 1.0e-7}]}))
    run = tmp_path / "run"
    r, _, left, keys = _s3_search(tmp_path, "--space", space, "--data", tiny_set, "--out", run, "--folds", 2,
                                  "--num-samples", 2, "--top", 1, "--max-concurrent", 1, "--no-blend")
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert left == []  # the stopped trial's temporary folder is gone too
    table = pd.read_parquet(run / "results.parquet")
    explore = table.query("stage == 'explore'")
    lrs = explore.config.map(lambda c: json.loads(c)["lr"])
    weak, good = explore[lrs == 1e-7].iloc[0], explore[lrs == 3e-3].iloc[0]
    assert weak.status == "STOPPED" and weak.epochs_run == 1 and good.status == "TERMINATED" and good.epochs_run == 2
    # 15 runs over float paths and seeds: good - weak at epoch 1 is 0.423-0.457
    assert weak.best_val_dice_pp < good.best_val_dice_pp - lc.THRESHOLDS["asha"]["good_minus_weak_epoch1"]
    study = optuna.load_study(study_name="explore", storage=f"sqlite:///{run / 'optuna.db'}")
    states = {t.params["lr"]: t.state.name for t in study.trials}
    assert states == {3e-3: "COMPLETE", 1e-7: "PRUNED"}
    same_trials(dashboard_trials(run / "optuna.db")["explore"], explore)  # optuna-dashboard shows the same
    assert json.loads((run / "search.json").read_text())["selected_models"] == [good.model_id]
    _oof_keys_once(keys, table)  # the stopped trial wrote no OOF; the good one's fold 0 once, fold 1 once


def test_address_without_storage_probes_that_every_node_sees_the_run_folder(tmp_path):
    """One machine's Cluster: every node writes the same folder, so the probe finds all of them."""
    import ray
    from ray.cluster_utils import Cluster

    from steel_ray import search

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1})
    for _ in range(2):
        cluster.add_node(num_cpus=1)
    cluster.wait_for_nodes()
    try:
        ray.init(address=cluster.address)
        assert search.unshared_nodes(tmp_path / "run") == []
        assert not (tmp_path / "run" / ".shared-probe").exists()
    finally:
        ray.shutdown()
        cluster.shutdown()


@pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("unshare"), reason="a node with its own disk needs root (unshare --mount)")
def test_a_node_with_its_own_disk_makes_address_without_storage_refuse_naming_it(tiny_set, tmp_path):
    """make rehearsal's first steps: ray start --head, a second ray start in its own mount namespace
    with a private tmpfs over the run folder (another host's disk), then search --address without
    --storage: the real probe finds that node and the search refuses before any trial starts."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    import rehearsal

    r = rehearsal.Rehearsal(argparse.Namespace(run=tmp_path / "rehearsal", data=tiny_set))
    r.run.mkdir()
    (r.run / "space.yaml").write_text(rehearsal.SPACE)
    assert not rehearsal._pgrep("raylet/raylet"), "a Ray cluster is already running on this machine"
    try:
        r.head_step()
        r.node_step()
        assert r.own_disk, r.skip_reason
        r.refusal_step()  # raises unless the search exits non-zero naming the node, with no trial started
    finally:
        r.stop()


def test_a_node_that_could_not_fetch_the_weights_fails_the_trial_at_once_without_retry(tiny_set, tmp_path):
    """The node's setup (python -m steel_ray.weights) recorded that it could not fetch the encoder's
    ImageNet weights: the trial fails at once with that reason in one line, and Tune does not retry
    it although --max-failures allows 3 retries."""
    space = tmp_path / "space.yaml"
    space.write_text("fixed: {batch_size: 8, crop_height: 32, crop_width: 128, epochs: 1, tta: none, encoder: tu-test_resnet,\n"
                     "        encoder_weights: imagenet}\nparams:\n  lr: {type: categorical, choices: [3.0e-3]}\n")
    status = tmp_path / "weights.json"
    status.write_text(json.dumps({"tu-test_resnet/imagenet": {"ok": False, "error": "ConnectionError: no route to huggingface.co"}}))
    run = tmp_path / "run"
    r = _search("--space", space, "--data", tiny_set, "--out", run, "--folds", 2, "--num-samples", 1, "--top", 1,
                "--max-failures", 3, "--no-blend", env={**os.environ, "STEEL_RAY_WEIGHTS_STATUS": str(status)})
    table = pd.read_parquet(run / "results.parquet")
    assert len(table) == 1 and table.status.iloc[0] == "ERROR", (r.stdout[-2000:], r.stderr[-2000:])
    err = table.error.iloc[0]
    assert "cannot get encoder_weights='imagenet' for encoder 'tu-test_resnet': ConnectionError: no route" in err
    assert "\n" not in err and "python -m steel_ray.weights" in err
    log_lines = [ln for ln in (run / "logs" / "trials" / f"{table.model_id.iloc[0]}-fold0.log").read_text().splitlines()
                 if "cannot get encoder_weights" in ln]
    assert len(log_lines) == 1  # one attempt: not retried
    # the search ends there, with the error in its one-line message
    assert r.returncode != 0 and "every explore trial" in r.stderr and "cannot get encoder_weights" in r.stderr
    study = optuna.load_study(study_name="explore", storage=f"sqlite:///{run / 'optuna.db'}")
    assert [t.state.name for t in study.trials] == ["FAIL"]
