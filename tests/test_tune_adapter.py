import optuna
import pytest
from optuna.trial import TrialState

from steel_ray.space import load_space
from steel_ray.tune_adapter import PruneAwareOptunaSearch


@pytest.fixture()
def searcher():
    space = load_space("tests/spaces/tiny.yaml")
    s = PruneAwareOptunaSearch(space.define_by_run, metric="best_val_dice", mode="max",
                               sampler=optuna.samplers.TPESampler(seed=0))
    return s


def test_stopped_trials_are_pruned_finished_complete_errors_fail(searcher):
    for tid in ("a", "b", "c", "d"):
        assert searcher.suggest(tid) is not None
    searcher.on_trial_result("a", {"best_val_dice": 0.5, "training_iteration": 1})
    # ASHA stopped "a" after epoch 2: its last result is not "finished"
    searcher.on_trial_complete("a", {"best_val_dice": 0.6, "training_iteration": 2, "finished": False})
    searcher.on_trial_complete("b", {"best_val_dice": 0.7, "training_iteration": 2, "finished": True})
    searcher.on_trial_complete("c", {"best_val_dice": 0.1, "training_iteration": 1}, error=True)
    searcher.on_trial_complete("d", None)
    trials = searcher._ot_study.get_trials(deepcopy=False)
    states = [t.state for t in trials]
    assert states == [TrialState.PRUNED, TrialState.COMPLETE, TrialState.FAIL, TrialState.PRUNED]
    assert trials[0].intermediate_values == {1: 0.5, 2: 0.6}
    assert trials[1].value == 0.7


def test_a_trial_the_study_already_closed_keeps_its_outcome(searcher):
    """A search killed after Optuna recorded a trial's outcome but before Tune saved it: on resume
    Tune reports the trial again (here as an error, its checkpoint missing); the study keeps the
    outcome it has instead of raising (Optuna refuses to tell a finished trial twice)."""
    assert searcher.suggest("a") is not None
    searcher._ot_study.tell(searcher._ot_trials["a"], 0.7)  # recorded before the kill
    searcher.on_trial_complete("a", {"best_val_dice": 0.1, "training_iteration": 1}, error=True)
    (trial,) = searcher._ot_study.get_trials(deepcopy=False)
    assert trial.state == TrialState.COMPLETE and trial.value == 0.7


def test_crash_between_uploads_leaves_a_fold_the_next_resume_retrains(tiny_set, tmp_path, monkeypatch):
    """A remote pool (s3://...) served by a real pyarrow local filesystem: the weights go up first,
    a crash before the OOF file leaves the fold pending; a finished upload completes it."""
    import pyarrow.fs as pafs
    import pytest

    from steel_ray import results, tune_adapter
    from steel_ray.config import TrialConfig
    from steel_ray.train import fit_fold, prepare_run

    bucket = tmp_path / "bucket"
    bucket.mkdir()
    monkeypatch.setattr(tune_adapter, "_fs", lambda uri: (pafs.LocalFileSystem(), str(bucket / uri.split("://", 1)[1])))
    cfg = {"arch": "FPN", "encoder": "tu-test_resnet", "epochs": 1, "batch_size": 8, "decoder_width": 64, "tta": "none"}
    local = tmp_path / "local"
    res = fit_fold(TrialConfig.from_dict(cfg), 0, prepare_run(tiny_set, local, 2), local, progress=False)
    pool = "s3://runs/r1-0123456789ab/pool"
    real_put = tune_adapter.put_file

    def crash_on_oof(path, pool_, rel):
        if rel.endswith("part-0.parquet"):
            raise RuntimeError("node lost")
        real_put(path, pool_, rel)

    monkeypatch.setattr(tune_adapter, "put_file", crash_on_oof)
    with pytest.raises(RuntimeError, match="node lost"):
        tune_adapter.upload_fold(local, res.weights_path, res.oof_path, pool)
    root = bucket / "runs/r1-0123456789ab/pool"
    assert (root / "checkpoints" / res.model_id / "fold=0" / "best.pt").exists()
    assert not list(root.rglob("*.parquet"))
    assert results.pending_folds([cfg], 2, pool) == [{**cfg, "fold": 0}, {**cfg, "fold": 1}]  # fold 0 is retrained
    monkeypatch.setattr(tune_adapter, "put_file", real_put)
    tune_adapter.upload_fold(local, res.weights_path, res.oof_path, pool)
    assert results.pending_folds([cfg], 2, pool) == [{**cfg, "fold": 1}]


def test_a_worker_with_other_code_or_versions_fails_its_trial_naming_both_sides():
    from steel_ray.tune_adapter import EnvironmentMismatch, check_environment, environment

    env = environment()
    assert set(env) == {"steel_ray", "torch", "segmentation-models-pytorch", "timm"} and len(env["steel_ray"]) == 12
    assert environment() == env  # the same files hash the same
    check_environment(env, "10.0.0.2")  # the driver's own environment passes
    check_environment(None)  # a caller that sends none (library use) is not checked
    with pytest.raises(EnvironmentMismatch) as e:
        check_environment({**env, "torch": "0.0.1", "steel_ray": "0123456789ab"}, "10.0.0.2 (abc)")
    msg = str(e.value)
    assert msg.startswith(f"worker 10.0.0.2 (abc) runs steel_ray {env['steel_ray']}, torch {env['torch']} but the driver runs "
                          "steel_ray 0123456789ab, torch 0.0.1: ") and "\n" not in msg


def test_a_resumed_stage_counts_the_trials_that_ended_before_it():
    """Tune restores ended trials without events; a stage whose trials all ended runs no step."""
    from types import SimpleNamespace

    from steel_ray.tune_adapter import ProgressCallback

    ended = [SimpleNamespace(status=s) for s in ("TERMINATED", "TERMINATED", "ERROR")]
    cb = ProgressCallback("explore", 3)
    cb.on_experiment_end(ended)  # no step ran
    assert cb.close() == "explore: 3 of 3 trial(s) ended (1 failed, 3 ended before this resume); no new result"
    cb = ProgressCallback("explore", 3)
    cb.on_step_begin(0, ended[:1] + [SimpleNamespace(status="PENDING")] * 2)
    cb.on_trial_complete(1, [], None)
    cb.on_experiment_end(ended)  # counted at the first step already
    assert cb.close().startswith("explore: 2 of 3 trial(s) ended (0 failed, 1 ended before this resume)")


def test_sync_pool_only_brings_the_files_asked_for(tmp_path):
    """--complete-by's screening-fold OOF: just those files, not every explored trial's weights."""
    from steel_ray import run as layout
    from steel_ray.tune_adapter import sync_pool

    pool, run = tmp_path / "pool", tmp_path / "run"
    files = [layout.oof_path("", m, 0).as_posix().lstrip("/") for m in ("a", "b")]
    files += [layout.best_weights("", "a", 0).as_posix().lstrip("/")]
    for rel in files:
        (pool / rel).parent.mkdir(parents=True, exist_ok=True)
        (pool / rel).write_bytes(rel.encode())
    sync_pool(str(pool), run, only=[files[0], layout.oof_path("", "gone", 0).as_posix().lstrip("/")])
    assert sorted(p.relative_to(run).as_posix() for p in run.rglob("*") if p.is_file()) == [files[0]]
    assert (run / files[0]).read_bytes() == files[0].encode()
    sync_pool(str(pool), run)  # without only: everything
    assert sorted(p.relative_to(run).as_posix() for p in run.rglob("*") if p.is_file()) == sorted(files)
