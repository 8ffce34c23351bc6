"""Optuna+ASHA vs random search vs the full grid of the same space, at equal compute (trial-epochs).

Run:  .venv/bin/python benchmarks/bench_search.py [--budget 36] [--n-train 80] [--seeds 1]

A 24-config categorical space (arch x encoder x lr x loss, 3 epochs each) is searched on one
fold of a synthetic 64x400 set by: the full grid (72 trial-epochs), random search with
`budget / 3` trials, and Optuna TPE + ASHA stopped once `budget` trial-epochs are used. Printed:
best val_dice, best val_loss (continuous, so it still ranks configs when tiny CPU models all
predict "empty"), trial-epochs used, wall time, and the scheduling overhead per trial (wall time
minus the time the trials report, divided by the number of trials, with 2 trials at once).
"""
from __future__ import annotations

import argparse
import itertools
import os
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")

import optuna  # noqa: E402
import ray  # noqa: E402
from ray import tune  # noqa: E402
from ray.tune.schedulers import ASHAScheduler  # noqa: E402
from ray.tune.search import BasicVariantGenerator, ConcurrencyLimiter  # noqa: E402

from steel_ray import synth  # noqa: E402
from steel_ray.train import prepare_run  # noqa: E402
from steel_ray.tune_adapter import PruneAwareOptunaSearch, run_trial  # noqa: E402

SPACE = {"arch": ["Unet", "FPN"], "encoder": ["tu-test_resnet", "tu-test_efficientnet"], "lr": [1e-3, 3e-3, 1e-2],
         "loss": ["bce", "bce_dice"]}
FIXED = {"epochs": 3, "batch_size": 8, "crop_height": 64, "crop_width": 128, "tta": "none"}


class EpochBudget(tune.Stopper):
    """Stops everything once the trials together have run ``budget`` epochs."""

    def __init__(self, budget):
        self.budget, self.used = budget, 0

    def __call__(self, trial_id, result):
        self.used += 1
        return False

    def stop_all(self):
        return self.used >= self.budget


def define_by_run(trial):
    for k, v in SPACE.items():
        trial.suggest_categorical(k, v)
    return dict(FIXED)


def run(name, trainable, storage, tune_config, param_space=None, stopper=None):
    t0 = time.time()
    grid = tune.Tuner(trainable, param_space=param_space or {}, tune_config=tune_config,
                      run_config=tune.RunConfig(name=name, storage_path=storage, stop=stopper, verbose=0)).fit()
    wall = time.time() - t0
    rows = [r.metrics for r in grid if r.metrics]
    best = max((m.get("best_val_dice", float("nan")) for m in rows), default=float("nan"))
    # val_loss is continuous: it still ranks configs when tiny CPU models all predict "empty"
    losses = [r.metrics_dataframe["val_loss"].min() for r in grid if r.metrics_dataframe is not None
              and "val_loss" in r.metrics_dataframe]
    best_loss = min(losses, default=float("nan"))
    epochs = sum(int(m.get("epoch", 0)) for m in rows)
    busy = sum(float(m.get("time_total_s", 0)) for m in rows)
    return {"method": name, "trials": len(grid), "trial_epochs": epochs, "best_val_dice": best, "best_val_loss": best_loss, "wall_s": wall,
            "overhead_s_per_trial": max(0.0, wall - busy / 2) / max(1, len(grid))}


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--budget", type=int, default=36, help="trial-epochs for random and Optuna+ASHA")
    ap.add_argument("--n-train", type=int, default=80)
    ap.add_argument("--seeds", type=int, default=1, help="repeat random/Optuna with several seeds")
    a = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="bench_search_"))
    synth.generate(tmp / "data", n_train=a.n_train, n_test=1, height=64, width=400, seed=0)
    data = prepare_run(tmp / "data", tmp / "run", 3)
    ray.init(include_dashboard=False, num_cpus=2, log_to_driver=False)
    def trainable(name):  # a pool per method: no method reuses another's finished trials
        pool = tmp / "pools" / name
        pool.mkdir(parents=True, exist_ok=True)
        return tune.with_resources(tune.with_parameters(run_trial, data=data, pool=str(pool), cpus=1), {"cpu": 1})

    results = []
    grid_space = [dict(zip(SPACE, v), **FIXED) for v in itertools.product(*SPACE.values())]
    results.append(run("grid", trainable("grid"), str(tmp / "ray"), tune.TuneConfig(max_concurrent_trials=2),
                       {"spec": tune.grid_search(grid_space)}))
    for seed in range(a.seeds):
        rand = BasicVariantGenerator(random_state=seed, max_concurrent=2)
        space = {**{k: tune.choice(v) for k, v in SPACE.items()}, **FIXED}
        results.append(run(f"random_s{seed}", trainable(f"random_s{seed}"), str(tmp / "ray"),
                           tune.TuneConfig(search_alg=rand, num_samples=a.budget // FIXED["epochs"]), space))
        opt = PruneAwareOptunaSearch(define_by_run, metric="best_val_dice", mode="max",
                                     sampler=optuna.samplers.TPESampler(seed=seed))
        results.append(run(f"optuna_asha_s{seed}", trainable(f"optuna_asha_s{seed}"), str(tmp / "ray"),
                           tune.TuneConfig(metric="best_val_dice", mode="max", search_alg=ConcurrencyLimiter(opt, 2),
                                           scheduler=ASHAScheduler(time_attr="epoch", max_t=3, grace_period=1, reduction_factor=2),
                                           num_samples=24), stopper=EpochBudget(a.budget)))
    ray.shutdown()
    print(f"\nspace: {len(grid_space)} configs x {FIXED['epochs']} epochs; budget {a.budget} trial-epochs; 2 trials at once on "
          f"{os.cpu_count()} cores; synthetic {a.n_train} images 64x400, fold 0 of 3")
    print(f"{'method':18}{'trials':>7}{'trial-epochs':>14}{'best val_dice':>15}{'best val_loss':>15}{'wall s':>9}{'overhead s/trial':>18}")
    for r in results:
        print(f"{r['method']:18}{r['trials']:7d}{r['trial_epochs']:14d}{r['best_val_dice']:15.4f}{r['best_val_loss']:15.4f}"
              f"{r['wall_s']:9.0f}{r['overhead_s_per_trial']:18.2f}")
    print(f"\nreproduce: .venv/bin/python benchmarks/bench_search.py --budget {a.budget} --n-train {a.n_train} --seeds {a.seeds}")


if __name__ == "__main__":
    main()
