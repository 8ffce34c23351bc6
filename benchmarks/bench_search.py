"""Optuna+ASHA vs random search vs the full grid of the same space, at equal compute (trial-epochs).

Run:  .venv/bin/python benchmarks/bench_search.py [--budget-frac 0.4] [--seeds 3] [--n-train 160]

The space is the demo's scale, where configs really differ: arch x encoder x loss x lr (24
configs, Unet/FPN with narrow decoders, 64x400 inputs, epochs of 60 optimizer steps, 3 epochs),
searched on fold 0 of 3 of the demo's synthetic set (128x800). Methods: the full grid (72
trial-epochs, run once: it is deterministic), random search with ``budget / 3`` trials, and
Optuna TPE + ASHA stopped once ``budget`` trial-epochs are used, each over ``--seeds`` seeds.
The metric is the fold's post-processed Dice (``best_val_dice_pp``, what the search ranks by),
printed beside the all-empty score of the same pairs. Printed per method: mean and spread (min..max
over seeds) of the best Dice found, trial-epochs used and wall time, and the gap to the grid's best.
"""
from __future__ import annotations

import argparse
import itertools
import logging
import os
import statistics
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

METRIC = "best_val_dice_pp"
SPACE = {"arch": ["Unet", "FPN"], "encoder": ["tu-test_resnet", "tu-test_efficientnet"], "loss": ["bce", "bce_dice", "focal"],
         "lr": [3e-3, 1e-2]}
FIXED = {"epochs": 3, "steps_per_epoch": 60, "warmup_steps": 10, "batch_size": 8, "resize_height": 64, "resize_width": 400,
         "decoder_width": 64, "sampler": "upsample", "tta": "none"}


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
    with open(os.devnull, "w") as sink:
        import contextlib

        with contextlib.redirect_stdout(sink):
            grid = tune.Tuner(trainable, param_space=param_space or {}, tune_config=tune_config,
                              run_config=tune.RunConfig(name=name, storage_path=storage, stop=stopper, verbose=0)).fit()
    wall = time.time() - t0
    rows = [r.metrics for r in grid if r.metrics]
    best = max(rows, key=lambda m: m.get(METRIC, float("-inf")), default={})
    epochs = sum(int(m.get("epoch", 0)) for m in rows)
    return {"method": name, "trials": len(grid), "trial_epochs": epochs, "best": best.get(METRIC, float("nan")),
            "best_model": best.get("model_id", ""), "all_empty": best.get("val_all_empty", float("nan")), "wall_s": wall}


def _fmt(vals, spec=".4f"):
    if len(vals) == 1:
        return format(vals[0], spec)
    return f"{format(statistics.mean(vals), spec)} ({format(min(vals), spec)}..{format(max(vals), spec)})"


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--budget-frac", type=float, default=0.4, help="trial-epochs of random and Optuna+ASHA, as a share of the grid's")
    ap.add_argument("--n-train", type=int, default=160)
    ap.add_argument("--seeds", type=int, default=3, help="seeds of random search and Optuna+ASHA")
    ap.add_argument("--grid-best", type=float, default=None,
                    help="skip the grid and use this best value from an earlier run with the same settings "
                         "(the grid is deterministic on CPU: 0.9204 in two runs at the defaults)")
    a = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    tmp = Path(tempfile.mkdtemp(prefix="bench_search_"))
    synth.generate(tmp / "data", n_train=a.n_train, n_test=1, height=128, width=800, seed=0)
    data = prepare_run(tmp / "data", tmp / "run", 3)
    ray.init(include_dashboard=False, num_cpus=2, log_to_driver=False, logging_level=logging.WARNING)

    def trainable(name):  # a pool per method: no method reuses another's finished trials
        pool = tmp / "pools" / name
        pool.mkdir(parents=True, exist_ok=True)
        return tune.with_resources(tune.with_parameters(run_trial, data=data, pool=str(pool), cpus=1), {"cpu": 1})

    grid_space = [dict(zip(SPACE, v), **FIXED) for v in itertools.product(*SPACE.values())]
    budget = int(round(a.budget_frac * len(grid_space) * FIXED["epochs"]))
    if a.grid_best is None:
        results = {"grid": [run("grid", trainable("grid"), str(tmp / "ray"), tune.TuneConfig(max_concurrent_trials=2),
                                {"spec": tune.grid_search(grid_space)})]}
    else:
        results = {"grid": [{"method": "grid (earlier run)", "trials": len(grid_space), "trial_epochs": len(grid_space) * FIXED["epochs"],
                             "best": a.grid_best, "best_model": "", "all_empty": float("nan"), "wall_s": float("nan")}]}
    print(f"grid: best {results['grid'][0]['best']:.4f} ({results['grid'][0]['best_model']})", flush=True)
    for seed in range(a.seeds):
        rand = BasicVariantGenerator(random_state=seed, max_concurrent=2)
        space = {**{k: tune.choice(v) for k, v in SPACE.items()}, **FIXED}
        results.setdefault("random", []).append(run(f"random_s{seed}", trainable(f"random_s{seed}"), str(tmp / "ray"),
                                                     tune.TuneConfig(search_alg=rand, num_samples=budget // FIXED["epochs"]), space))
        opt = PruneAwareOptunaSearch(define_by_run, metric=METRIC, mode="max", sampler=optuna.samplers.TPESampler(seed=seed))
        results.setdefault("optuna_asha", []).append(
            run(f"optuna_asha_s{seed}", trainable(f"optuna_asha_s{seed}"), str(tmp / "ray"),
                tune.TuneConfig(metric=METRIC, mode="max", search_alg=ConcurrencyLimiter(opt, 2),
                                scheduler=ASHAScheduler(time_attr="epoch", max_t=FIXED["epochs"], grace_period=1, reduction_factor=2),
                                num_samples=len(grid_space)), stopper=EpochBudget(budget)))
        print(f"seed {seed} done: random {results['random'][-1]['best']:.4f}, optuna_asha {results['optuna_asha'][-1]['best']:.4f}",
              flush=True)
    ray.shutdown()
    grid_best = results["grid"][0]["best"]
    empty = next((r["all_empty"] for rs in results.values() for r in rs if r["all_empty"] == r["all_empty"]), float("nan"))
    print(f"\nspace: {len(grid_space)} configs x {FIXED['epochs']} epochs of {FIXED['steps_per_epoch']} steps; budget {budget} "
          f"trial-epochs ({a.budget_frac:.0%} of the grid's {len(grid_space) * FIXED['epochs']}); 2 trials at once on "
          f"{os.cpu_count()} cores; synthetic {a.n_train} images 128x800 (resized 64x400), fold 0 of 3; "
          f"all-empty on the fold {empty:.4f}")
    print(f"{'method':13}{'seeds':>6}{'trials':>20}{'trial-epochs':>22}{'best ' + METRIC:>30}{'gap to grid':>30}{'wall s':>20}")
    for name, rs in results.items():
        best = [r["best"] for r in rs]
        print(f"{name:13}{len(rs):6d}{_fmt([r['trials'] for r in rs], '.1f'):>20}{_fmt([r['trial_epochs'] for r in rs], '.1f'):>22}"
              f"{_fmt(best):>30}{_fmt([b - grid_best for b in best], '+.4f'):>30}{_fmt([r['wall_s'] for r in rs], '.0f'):>20}")
    grid_arg = f" --grid-best {a.grid_best}" if a.grid_best is not None else ""
    print(f"\nreproduce: .venv/bin/python benchmarks/bench_search.py --budget-frac {a.budget_frac} --seeds {a.seeds} "
          f"--n-train {a.n_train}{grid_arg}")


if __name__ == "__main__":
    main()
