"""The blend selection report: RUN/blend/report.html (self-contained, plots embedded) and report.md."""
from __future__ import annotations

import base64
import html
import io
from pathlib import Path

import numpy as np
import pandas as pd

from .data import N_CLASSES
from .io import atomic_write_text
from .run import results_path

__all__ = ["write_report"]

SCORE_HELP = {
    "all_empty": "predicting no defect anywhere, on the same pairs: the floor every other score must beat",
    "in_sample": "post-processing tuned and scored on the same OOF (optimistic)",
    "cross_fitted": "post-processing chosen on K-1 folds, scored on the held-out fold",
    "nested": "whole procedure (selection included) rerun without fold k, scored on fold k: the blend's cross-validated "
              "estimate (upstream choices, if any, are listed beside it)",
    "holdout": "the chosen blend on images set aside before the folds (search --holdout): the estimate to trust",
    "cross_fitted_segmentation_only": "as cross_fitted, with every class gated by the segmentation members (no classifier)",
    "nested_segmentation_only": "as nested, with every class gated by the segmentation members: the gain from the "
                                "classifiers is nested minus this",
    "best_single": "best single model, same post-processing search, cross-fitted",
    "baseline": "plain mean of all models, threshold 0.5, min areas 500/500/1000/2000 px (scaled), gate 0.5",
}


def _png(fig) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90, bbox_inches="tight")
    import matplotlib.pyplot as plt

    plt.close(fig)
    return base64.b64encode(buf.getvalue()).decode()


def _plots(doc: dict, corr: np.ndarray | None, labels: list[str]) -> dict[str, str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = {}
    traj = doc["selection"]["trajectory"]
    if traj:
        fig, ax = plt.subplots(figsize=(6, 3))
        ax.plot([t["members"] for t in traj], [t["cross_fitted"] for t in traj], marker="o")
        ax.set_xlabel("ensemble members (slots, repeats allowed)")
        ax.set_ylabel(f"cross-fitted Dice ({doc['selection']['selection_resolution']} maps)")
        ax.grid(alpha=0.3)
        out["members"] = _png(fig)
    fig, axes = plt.subplots(2, N_CLASSES, figsize=(14, 5))
    for c in range(N_CLASSES):
        cv = doc["curves"][str(c + 1)]
        pp = doc["postprocess"][str(c + 1)]
        ax = axes[0, c]
        ax.plot(cv["pixel_threshold"], cv["dice_vs_threshold"], marker=".")
        ax.axvline(pp["pixel_threshold"], color="r", ls="--")
        ax.set_title(f"class {c + 1}: Dice vs pixel threshold")
        ax = axes[1, c]
        ax.plot(cv["min_area"], cv["dice_vs_min_area"], marker=".")
        ax.axvline(pp["min_area"], color="r", ls="--")
        ax.set_title(f"class {c + 1}: Dice vs min area (px)")
    fig.tight_layout()
    out["curves"] = _png(fig)
    if corr is not None and len(labels) > 1:
        fig, ax = plt.subplots(figsize=(1 + 0.5 * len(labels), 0.8 + 0.5 * len(labels)))
        im = ax.imshow(corr, vmin=min(0.0, float(np.nanmin(corr))), vmax=1.0, cmap="viridis")
        ax.set_xticks(range(len(labels)), labels, rotation=90, fontsize=7)
        ax.set_yticks(range(len(labels)), labels, fontsize=7)
        fig.colorbar(im, ax=ax)
        ax.set_title("model correlation (OOF probabilities, kept pixels)")
        out["corr"] = _png(fig)
    return out


def _correlation(pool) -> np.ndarray | None:
    vals = [d.vals for d in pool.ds if d.vals.shape[1] > 1]
    if not vals:
        return None
    v = np.concatenate(vals, axis=1).astype(np.float32)
    if v.shape[1] > 2_000_000:  # a fixed subsample is plenty for a heat map
        v = v[:, np.random.default_rng(0).choice(v.shape[1], 2_000_000, replace=False)]
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.corrcoef(v)


def _tables(doc: dict, run: Path) -> dict[str, pd.DataFrame]:
    s = doc["scores"]
    t = {}
    t["scores"] = pd.DataFrame([{"score": k, "value": fmt_score(s.get(k)),
                                 "vs all_empty": "" if k == "all_empty" or s.get(k) is None else
                                 f"{s[k] - (doc['holdout']['all_empty'] if k == 'holdout' else s['all_empty']):+.6f}",
                                 "meaning": SCORE_HELP[k],
                                 "choices made on these images' labels": _includes(doc, k)} for k in SCORE_HELP if k in s])
    t["weights"] = pd.DataFrame([{"model_id": m["model_id"], "weight": m["weight"] if m["weight"] is not None else
                                  ", ".join(f"{k}:{v:.3f}" for k, v in m["class_weights"].items()),
                                  "folds": len(m["checkpoints"]),
                                  "single cross_fitted": round(doc["single_models_cross_fitted"].get(m["model_id"], float("nan")), 6)}
                                 for m in doc["members"]])
    t["postprocess"] = pd.DataFrame([{"class": c, **{k: (round(v, 4) if isinstance(v, float) else v) for k, v in doc["postprocess"][c].items()},
                                      **{k: (round(v, 4) if isinstance(v, float) else v) for k, v in doc["per_class"][c].items()
                                         if k not in ("on_grid_edge", "gate")},
                                      "on grid edge": "; ".join(doc["per_class"][c].get("on_grid_edge", [])) or "-"}
                                     for c in doc["postprocess"]])
    if doc.get("classifier_pool"):
        t["gate"] = _gate_table(doc)
        t["classifiers"] = pd.DataFrame([{"model_id": m["model_id"], "weight": round(m["weight"], 4), "folds": len(m["checkpoints"])}
                                         for m in doc.get("classifiers", [])] or
                                        [{"model_id": "(none: no classifier beat the segmentation gate, cross-fitted)",
                                          "weight": "", "folds": ""}])
    t["trajectory"] = pd.DataFrame(doc["selection"]["trajectory"])
    res = results_path(run)
    if res.exists():
        r = pd.read_parquet(res)
        keep = [c for c in ["stage", "model_id", "fold", "status", "epochs_run", "best_val_dice_pp", "best_val_dice", "wall_s", "error"]
                if c in r]
        key = "best_val_dice_pp" if "best_val_dice_pp" in r else "best_val_dice"
        t["leaderboard"] = r.sort_values(key, ascending=False)[keep].head(40)
    singles = doc["single_models_cross_fitted"]
    t["singles"] = pd.DataFrame(sorted(singles.items(), key=lambda x: -x[1]), columns=["model_id", "cross_fitted"])
    return t


def _includes(doc: dict, score: str) -> str:
    """The selections a score's own images took part in (blend.json ``scores_include``)."""
    inc = doc.get("scores_include", {}).get(score)
    if inc is None:
        return "-"
    return "; ".join(inc) if inc else "none"


def _gate_table(doc: dict) -> pd.DataFrame:
    """Per class: the gate's source and threshold, its image-level quality, the classifiers' AUC and
    the class's Dice with and without the classifiers (in-sample, same post-processing search)."""
    def r(v):
        return "-" if v is None else round(v, 4)

    rows = []
    for c, pc in doc["per_class"].items():
        g = pc.get("gate", {})
        rows.append({"class": c, "gate source": g.get("source", "segmentation"), "threshold": g.get("threshold"),
                     "classifier AUC" + ("" if doc.get("classifiers") else " (pool mean)"): r(g.get("auc_classifiers")),
                     "gate AUC": r(g.get("auc_gate")), "F1": r(g.get("f1")),
                     "FP rate (empty images)": r(g.get("fp_rate")), "FN rate (defect images)": r(g.get("fn_rate")),
                     "Dice": r(pc.get("dice")), "Dice, segmentation gate": r(pc.get("dice_segmentation_only"))})
    return pd.DataFrame(rows)


def fmt_score(v) -> str:
    return "n/a" if v is None else f"{v:.6f}"


def headline_text(doc: dict) -> str:
    """The report's first paragraph: every estimate beside the all-empty score, warnings in plain words."""
    s = doc["scores"]
    nested = s.get("nested")
    parts = []
    if "holdout" in doc:
        h = doc["holdout"]
        parts.append(f"Holdout ({h['n_images']} images nobody tuned on; the estimate to trust) {s['holdout']:.6f} "
                     f"(95% CI {h['ci95'][0]:.6f}-{h['ci95'][1]:.6f}) vs its all-empty {h['all_empty']:.6f}.")
    parts += [f"All-empty (predict no defect) {s['all_empty']:.6f}; nested estimate {fmt_score(nested)} "
             f"(in-sample {s['in_sample']:.6f}, cross-fitted {s['cross_fitted']:.6f}); best single model "
             f"{s['best_single']:.6f} ({s['best_single_model']}); baseline recipe {s['baseline']:.6f}."]
    if nested is not None:
        parts.append(f"Optimism of in-sample over nested: {s['in_sample'] - nested:+.6f}.")
    if doc.get("classifier_pool"):
        n_used = len(doc.get("classifiers", []))
        seg = s.get("nested_segmentation_only")
        if n_used:
            parts.append(f"Classifier gate: {n_used} classifier(s); nested {fmt_score(nested)} with them vs "
                         f"{fmt_score(seg)} with the segmentation gate alone"
                         + (f" ({nested - seg:+.6f})." if nested is not None and seg is not None else "."))
        else:
            parts.append(f"No classifier is used: none of the pool's {len(doc['classifier_pool'])} beat the segmentation "
                         "gate on the cross-fitted score.")
    if "pseudo" in doc:
        p = doc["pseudo"]
        ps_ = p["parent_scores"]
        parts.append(f"Pseudo-labelling round {p['round']} of {p['parent']}: {p['n_images']} of {p['n_candidates']} images "
                     f"pseudo-labelled at confidence >= {p['min_confidence']} (images with a defect per class {p['per_class']}) "
                     f"added to every fold's training split; nested {fmt_score(ps_.get('nested'))} in the parent round vs "
                     f"{fmt_score(nested)} here" + (f", holdout {fmt_score(ps_.get('holdout'))} vs {fmt_score(s.get('holdout'))}"
                                                   if "holdout" in s else "") + ".")
    for c, w in warnings(doc):
        parts.append(w)
    return " ".join(parts)


def warnings(doc: dict) -> list[tuple[str, str]]:
    """(kind, sentence) for what a reader must not miss: estimates at or below all-empty, grid edges."""
    s, out = doc["scores"], []
    if s.get("nested") is not None and s["nested"] <= s["all_empty"]:
        out.append(("nested", f"WARNING: the nested estimate is worse than predicting no defects "
                              f"({s['nested']:.6f} <= all-empty {s['all_empty']:.6f})."))
    if s["best_single"] <= s["all_empty"]:
        out.append(("best_single", f"WARNING: the best single model is no better than predicting no defects "
                                   f"({s['best_single']:.6f} <= all-empty {s['all_empty']:.6f})."))
    for c, pc in doc["per_class"].items():
        for e in pc.get("on_grid_edge", []):
            out.append(("edge", f"Class {c}: {e} (the optimum may lie outside the grid)."))
    return out


def _submit_cmd(run: Path) -> str:
    return (f"python -m steel_ray.predict --run {run} --images DATA/test_images --out submission.csv "
            f"--blend {run / 'blend' / 'blend.json'}")


def write_report(doc: dict, pool, run, out_dir) -> Path:
    """Write report.html and report.md into ``out_dir``; returns the HTML path."""
    run, out_dir = Path(run), Path(out_dir)
    labels = list(pool.model_ids)
    plots = _plots(doc, _correlation(pool), labels)
    tables = _tables(doc, run)
    headline = headline_text(doc)
    sections = [
        ("Scores", "scores", None),
        ("Chosen members and weights", "weights", None),
        ("Ensemble score versus number of members", "trajectory", "members"),
        ("Per-class post-processing, Dice and false-positive rate on empty pairs", "postprocess", "curves"),
        ("Classifier ensemble (the gate)", "classifiers", None),
        ("Per-class gate: source, image-level quality, Dice with and without the classifiers", "gate", None),
        ("Single models (cross-fitted, full resolution)", "singles", None),
        ("Model correlation", None, "corr"),
        ("Search leaderboard (results.parquet)", "leaderboard", None),
    ]
    md = [f"# Blend selection report: {run.name}", "", headline, ""]
    h = [f"<html><head><meta charset='utf-8'><title>Blend report {html.escape(run.name)}</title>",
         "<style>body{font-family:sans-serif;max-width:1200px;margin:auto} table{border-collapse:collapse;font-size:13px}"
         "td,th{border:1px solid #ccc;padding:3px 6px} code{background:#eee;padding:2px}</style></head><body>",
         f"<h1>Blend selection report: {html.escape(run.name)}</h1><p>{html.escape(headline)}</p>"]
    for title, tkey, pkey in sections:
        if tkey and tkey not in tables and (not pkey or pkey not in plots):
            continue
        md += [f"## {title}", ""]
        h.append(f"<h2>{html.escape(title)}</h2>")
        if tkey and tkey in tables:
            md += [tables[tkey].to_markdown(index=False, disable_numparse=True) if _has_tabulate() else tables[tkey].to_string(index=False), ""]
            h.append(tables[tkey].to_html(index=False, escape=True))
        if pkey and pkey in plots:
            h.append(f"<img alt='{pkey}' src='data:image/png;base64,{plots[pkey]}'/>")
            md += [f"(plot `{pkey}` in report.html)", ""]
    cmd = _submit_cmd(run)
    md += ["## Make a submission from this blend", "", f"    {cmd}", ""]
    h.append(f"<h2>Make a submission from this blend</h2><p><code>{html.escape(cmd)}</code></p>")
    if doc["left_out_models"]:
        msg = "Left out (missing folds): " + ", ".join(doc["left_out_models"])
        md += [msg, ""]
        h.append(f"<p>{html.escape(msg)}</p>")
    h.append("</body></html>")
    atomic_write_text(out_dir / "report.md", "\n".join(md))
    atomic_write_text(out_dir / "report.html", "\n".join(h))
    return out_dir / "report.html"


def _has_tabulate() -> bool:
    try:
        import tabulate  # noqa: F401

        return True
    except ImportError:
        return False
