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
