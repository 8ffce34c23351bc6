"""The run folder's layout: one module spells every path; the others ask it."""
from pathlib import Path

from steel_ray import oof, train
from steel_ray import run as layout


def test_paths_are_the_documented_layout():
    r = Path("/r")
    assert layout.state_path(r) == r / "search.json" and layout.results_path(r) == r / "results.parquet"
    assert layout.folds_path(r) == r / "folds.csv" and layout.truth_path(r) == r / "truth.parquet"
    assert layout.holdout_path(r) == r / "holdout.json" and layout.optuna_db(r) == r / "optuna.db"
    assert layout.oof_path(r, "m", 2) == r / "oof" / "model_id=m" / "fold=2" / "part-0.parquet"
    assert layout.best_weights(r, "m", 1) == r / "checkpoints" / "m" / "fold=1" / "best.pt"
    assert layout.blend_json(r) == r / "blend" / "blend.json" and layout.pseudo_dir(r) == r / "pseudo"
    assert layout.trial_log(r, "m", 0) == r / "logs" / "trials" / "m-fold0.log"
    # the modules that write these use the same functions, not their own spelling
    assert oof.oof_path is layout.oof_path and train.checkpoint_dir is layout.checkpoint_dir


def test_identity_and_storage_root(tmp_path):
    assert layout.read_state(tmp_path) is None
    state = layout.SearchState(data="/d", folds=3, run_id="s1-0123456789ab", storage="s3://bucket/runs/")
    assert layout.run_id(state, tmp_path) == "s1-0123456789ab"
    assert layout.storage_root(state, tmp_path) == "s3://bucket/runs/s1-0123456789ab"
    assert layout.storage_root(state.replace(storage=None), tmp_path) is None
    assert layout.run_id(state.replace(run_id=""), tmp_path / "old") == "old"  # runs from before ids existed
    assert layout.run_id(None, tmp_path / "old") == "old"


def test_search_state_has_one_reader_and_writer_and_refuses_what_it_does_not_know(tmp_path):
    import dataclasses
    import json

    import pytest

    from steel_ray.data import DataError

    state = layout.SearchState(data="/d", folds=3, spaces=("/s.yaml",), selected=({"lr": 0.01},), selected_models=("m",),
                               pseudo={"round": 1})
    with pytest.raises(dataclasses.FrozenInstanceError):
        state.stage = "done"
    layout.write_state(tmp_path, state.replace(stage="blend"))
    back = layout.read_state(tmp_path)
    assert back == state.replace(stage="blend") and back.stage == "blend" and state.stage == "explore"
    saved = json.loads(layout.state_path(tmp_path).read_text())
    assert saved["space"] == "/s.yaml" and saved["selected_models"] == ["m"]  # JSON lists; the first space for older readers
    # a state from before several spaces (one "space") still reads
    layout.state_path(tmp_path).write_text(json.dumps({"space": "/a.yaml", "data": "/d", "folds": 5}))
    assert layout.read_state(tmp_path).spaces == ("/a.yaml",)
    for bad, says in (({"data": "/d", "folds": 3, "stages": "x"}, "unknown key(s) ['stages']"),
                      ({"data": "/d"}, "a search state needs ['folds']"),
                      ({"data": "/d", "folds": 3, "stage": "half"}, "stage 'half' is not one of"),
                      ("{not json", "not a JSON document")):
        layout.state_path(tmp_path).write_text(bad if isinstance(bad, str) else json.dumps(bad))
        with pytest.raises(DataError, match="search.json: .*" + says.replace("[", r"\[").replace("]", r"\]").replace("(", r"\(")
                           .replace(")", r"\)")):
            layout.read_state(tmp_path)


def test_pool_and_ray_storage_follow_the_storage_root(tmp_path):
    local = layout.SearchState(data="/d", folds=3)
    assert layout.pool_uri(local, tmp_path) == str(tmp_path) and layout.ray_storage(local, tmp_path) == str(tmp_path / "ray")
    shared = local.replace(run_id="s1-0123456789ab", storage="s3://b/runs")
    assert layout.pool_uri(shared, tmp_path) == "s3://b/runs/s1-0123456789ab/pool"
    assert layout.ray_storage(shared, tmp_path) == "s3://b/runs/s1-0123456789ab/ray"
