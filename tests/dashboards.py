"""Reading a run back through the users' own tools: optuna-dashboard's WSGI app on a local port,
TensorBoard's event reader, Tune's progress.csv (the record both are compared with)."""
from __future__ import annotations

import contextlib
import json
import threading
import urllib.request
from pathlib import Path
from wsgiref.simple_server import WSGIRequestHandler, make_server

import pandas as pd

# Optuna's state as optuna-dashboard's API spells it, for each results.parquet status
DASHBOARD_STATE = {"TERMINATED": "Complete", "STOPPED": "Pruned", "ERROR": "Fail"}


class _Quiet(WSGIRequestHandler):
    def log_message(self, *args):
        pass


@contextlib.contextmanager
def optuna_dashboard_server(db: Path):
    """optuna-dashboard's own app (``optuna_dashboard.wsgi``) served on 127.0.0.1; yields its base URL."""
    import optuna_dashboard

    server = make_server("127.0.0.1", 0, optuna_dashboard.wsgi(f"sqlite:///{db}"), handler_class=_Quiet)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_port}"
    finally:
        server.shutdown()
        server.server_close()


def _get(url: str):
    with urllib.request.urlopen(url, timeout=60) as r:
        return json.load(r)


def dashboard_trials(db: Path) -> dict[str, list[tuple[str, dict]]]:
    """Per study: (state, {param: value as the dashboard shows it}) of every trial, as the dashboard
    serves them (its study list, then each study's page data)."""
    out = {}
    with optuna_dashboard_server(db) as base:
        html = urllib.request.urlopen(f"{base}/dashboard", timeout=60).read().decode()
        assert "Optuna Dashboard" in html
        for s in _get(f"{base}/api/studies")["study_summaries"]:
            data = _get(f"{base}/api/studies/{s['study_id']}?after=0")
            out[s["study_name"]] = [(t["state"], {p["name"]: p["param_external_value"] for p in t["params"]})
                                    for t in data["trials"]]
    return out


def same_trials(shown: list[tuple[str, dict]], rows: pd.DataFrame) -> None:
    """Every explore row is one dashboard trial with the state results.parquet gives it (matched by
    its searched params, which the dashboard shows as strings), and nothing else."""
    expected = []
    for _, r in rows.iterrows():
        cfg = json.loads(r.config)
        expected.append((DASHBOARD_STATE[r.status], cfg))
    assert len(shown) == len(expected), (shown, expected)
    left = list(expected)
    for state, params in shown:
        hit = [e for e in left if e[0] == state and all(str(e[1].get(k)) == v for k, v in params.items())]
        assert hit, f"dashboard trial {state} {params} is not in results.parquet: {expected}"
        left.remove(hit[0])


def trial_dirs(run: Path) -> list[Path]:
    """Tune's trial folders of a run without --storage (RUN/ray/<stage>/run_trial_*)."""
    return sorted(p for p in (Path(run) / "ray").glob("*/run_trial_*") if p.is_dir())


def progress(trial_dir: Path) -> pd.DataFrame:
    """Tune's own per-report record of a trial (progress.csv)."""
    # a Tune trial id can be all digits ("20859068"): read as text, as results.parquet holds it
    return pd.read_csv(trial_dir / "progress.csv", dtype={"trial_id": str})


def tensorboard_scalars(trial_dir: Path, tag: str) -> list[tuple[int, float]]:
    """(step, value) of one scalar in a trial's TensorBoard event files, read by TensorBoard's reader."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(trial_dir), size_guidance={"scalars": 0})
    acc.Reload()
    if tag not in acc.Tags()["scalars"]:
        return []
    return [(e.step, e.value) for e in acc.Scalars(tag)]
