"""The blend selection report: RUN/blend/report.html (self-contained, plots embedded) and report.md."""
from __future__ import annotations

import base64
import html
import io
import os
import sys
from pathlib import Path

import numpy as np
import pandas as pd

from ..data import N_CLASSES
from ..io import atomic_write_text
from ..run import read_state, results_path

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


def _plots(doc: dict, corr: np.ndarray | None, labels: list[str], factor: int = 4) -> dict[str, str]:
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
        # models numbered on the axes (ids are long), the numbers listed under the map in the report
        n = len(labels)
        side = max(4.5, 0.55 * n + 2.5)
        fig, ax = plt.subplots(figsize=(side + 1.2, side))
        im = ax.imshow(corr, vmin=min(0.0, float(np.nanmin(corr))), vmax=1.0, cmap="viridis")
        ticks = [f"#{i + 1}" for i in range(n)]
        ax.set_xticks(range(n), ticks, fontsize=10)
        ax.set_yticks(range(n), ticks, fontsize=10)
        if n <= 12:
            for i in range(n):
                for j in range(n):
                    if np.isfinite(corr[i, j]):
                        ax.text(j, i, f"{corr[i, j]:.2f}", ha="center", va="center", fontsize=9,
                                color="black" if corr[i, j] > 0.6 else "white")
        fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04, label="Pearson correlation")
        ax.set_title(f"model correlation\n(OOF probabilities, kept {factor}x pixels)", fontsize=11, pad=10)
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
    t["weights"] = pd.DataFrame([{"model_id": m["model_id"], "weight": _r(m["weight"], 4) if m["weight"] is not None else
                                  ", ".join(f"{k}:{v:.3f}" for k, v in m["class_weights"].items()),
                                  "folds": len(m["checkpoints"]),
                                  "single cross_fitted": _r(doc["single_models_cross_fitted"].get(m["model_id"]), 6)}
                                 for m in doc["members"]])
    t["postprocess"] = pd.DataFrame([{"class": c, **{k: _r(v, 4) for k, v in doc["postprocess"][c].items()},
                                      **{k: _r(v, 4) for k, v in doc["per_class"][c].items() if k not in ("on_grid_edge", "gate")},
                                      "on grid edge": "; ".join(doc["per_class"][c].get("on_grid_edge", [])) or "-"}
                                     for c in doc["postprocess"]])
    if doc.get("classifier_pool"):
        t["gate"] = _gate_table(doc)
        t["classifiers"] = pd.DataFrame([{"model_id": m["model_id"], "weight": _r(m["weight"], 4), "folds": len(m["checkpoints"])}
                                         for m in doc.get("classifiers", [])] or
                                        [{"model_id": f"{m} (weighted but unused: every class chose the segmentation gate)",
                                          "weight": "", "folds": ""} for m in doc.get("classifiers_unused", [])] or
                                        [{"model_id": "(none: no classifier beat the segmentation gate, cross-fitted)",
                                          "weight": "", "folds": ""}])
    t["trajectory"] = pd.DataFrame([{k: _r(v, 6) for k, v in row.items()} for row in doc["selection"]["trajectory"]])
    res = results_path(run)
    if res.exists():
        t.update(_leaderboards(pd.read_parquet(res)))
    singles = doc["single_models_cross_fitted"]
    t["singles"] = pd.DataFrame([(m, _r(v, 6)) for m, v in sorted(singles.items(), key=lambda x: -x[1])],
                                columns=["model_id", "cross_fitted"])
    return t


def _r(v, digits: int):
    """A number for a table: floats rounded, integral floats (member counts, epochs) as integers."""
    if isinstance(v, (bool, np.bool_)) or v is None:
        return v
    if isinstance(v, (float, np.floating)):
        if not np.isfinite(v):
            return "-"
        return int(v) if float(v).is_integer() else round(float(v), digits)
    return v


def _leaderboards(r: pd.DataFrame) -> dict[str, pd.DataFrame]:
    """The search's trials, segmenters and classifiers apart: their ``best_val_dice_pp`` mean different
    things (a segmenter's post-processed Dice vs the gate's pair accuracy with a perfect segmenter)."""
    keep = [c for c in ["stage", "model_id", "fold", "status", "epochs_run", "best_val_dice_pp", "best_val_dice", "wall_s", "error"]
            if c in r]
    key = "best_val_dice_pp" if "best_val_dice_pp" in r else "best_val_dice"
    is_cls = r["model_id"].fillna("").astype(str).str.startswith("cls-")
    out = {}
    for name, part in (("leaderboard", r[~is_cls]), ("leaderboard_cls", r[is_cls])):
        if len(part):
            part = part.sort_values(key, ascending=False)[keep].head(40).copy()
            for c in ("best_val_dice_pp", "best_val_dice"):
                if c in part:
                    part[c] = part[c].map(lambda v: _r(v, 4))
            if "wall_s" in part:
                part["wall_s"] = part["wall_s"].map(lambda v: "-" if pd.isna(v) else int(round(v)))
            if "error" in part:
                part["error"] = part["error"].fillna("").astype(str).str.slice(0, 120)
            out[name] = part
    return out

def _includes(doc: dict, score: str) -> str:
    """The selections a score's own images took part in (blend.json ``scores_include``)."""
    inc = doc.get("scores_include", {}).get(score)
    if inc is None:
        return "-"
    return "; ".join(inc) if inc else "none"


FEW_POSITIVES = 5  # an AUC from fewer defect images than this is flagged as unreliable


def _gate_table(doc: dict) -> pd.DataFrame:
    """Per class: the gate's source and threshold, its image-level quality, the classifiers' AUC and
    the class's Dice with and without the classifiers (in-sample, same post-processing search).
    A gate at threshold 0 passes every image: it is "gate off", and its F1 / error rates (those of
    calling every image a defect) are not shown as if they were a gate's failures."""
    def r(v):
        return "-" if v is None else _r(v, 4)

    def auc(v, n_pos):
        if v is None:
            return "-"
        if n_pos is not None and n_pos < FEW_POSITIVES:
            return f"{v:.4f} (from {n_pos} defect image(s): unreliable)"
        return _r(v, 4)

    rows = []
    for c, pc in doc["per_class"].items():
        g = pc.get("gate", {})
        off = not g.get("threshold")
        n_pos = g.get("n_pos")
        rows.append({"class": c, "gate": "gate off" if off else f"{g.get('source', 'segmentation')} >= {g.get('threshold'):.2f}",
                     "defect images": "-" if n_pos is None else n_pos,
                     "classifier AUC" + ("" if doc.get("classifiers") else " (pool mean)"): auc(g.get("auc_classifiers"), n_pos),
                     "gate signal AUC": auc(g.get("auc_gate"), n_pos),
                     "F1": "gate off" if off else r(g.get("f1")),
                     "FP rate (empty images)": "gate off" if off else r(g.get("fp_rate")),
                     "FN rate (defect images)": "gate off" if off else r(g.get("fn_rate")),
                     "Dice": r(pc.get("dice")), "Dice, segmentation gate": r(pc.get("dice_segmentation_only"))})
    return pd.DataFrame(rows)


def fmt_score(v) -> str:
    return "n/a" if v is None else f"{v:.6f}"


def no_classifier_reason(doc: dict) -> str:
    """Why a pool with classifiers has none in the gate (the console, the report and the demo say it alike)."""
    unused = doc.get("classifiers_unused") or []
    if unused:
        return (f"{len(unused)} weighted by the classifier selection, but every class chose the segmentation gate "
                "(weighted but unused; predict does not run them)")
    return f"none of {len(doc['classifier_pool'])} beat the segmentation gate (cross-fitted)"


def headline_line(doc: dict) -> str:
    """One line: the blend's score to trust, how far above predicting no defects, and its interval."""
    s = doc["scores"]
    if "holdout" in doc and s.get("holdout") is not None:
        h = doc["holdout"]
        return (f"Blend {s['holdout']:.4f} on the holdout, {s['holdout'] - h['all_empty']:+.4f} over predicting no defects "
                f"({h['all_empty']:.4f}), 95% CI {h['ci95'][0]:.4f}-{h['ci95'][1]:.4f} ({h['n_images']} images nobody tuned on).")
    if s.get("nested") is not None:
        return (f"Blend {s['nested']:.4f} nested (cross-validated), {s['nested'] - s['all_empty']:+.4f} over predicting "
                f"no defects ({s['all_empty']:.4f}); no holdout.")
    return (f"Blend {s['cross_fitted']:.4f} cross-fitted, {s['cross_fitted'] - s['all_empty']:+.4f} over predicting no defects "
            f"({s['all_empty']:.4f}); no nested estimate, no holdout.")


def headline_details(doc: dict) -> list[str]:
    """The points under the headline: every estimate beside all-empty, the gate, the round, warnings."""
    s = doc["scores"]
    nested = s.get("nested")
    out = [f"Nested estimate {fmt_score(nested)}, cross-fitted {s['cross_fitted']:.6f}, in-sample {s['in_sample']:.6f} "
           f"(all-empty {s['all_empty']:.6f} on the same pairs)"
           + (f"; optimism of in-sample over nested {s['in_sample'] - nested:+.6f}." if nested is not None else "."),
           f"Best single model {s['best_single']:.6f} ({s['best_single_model']}); baseline recipe {s['baseline']:.6f}; "
           f"{len(doc['members'])} member(s)."]
    if doc.get("classifier_pool"):
        n_used = len(doc.get("classifiers", []))
        seg = s.get("nested_segmentation_only")
        if n_used:
            out.append(f"Classifier gate: {n_used} classifier(s); nested {fmt_score(nested)} with them vs "
                       f"{fmt_score(seg)} with the segmentation gate alone"
                       + (f" ({nested - seg:+.6f})." if nested is not None and seg is not None else "."))
        else:
            out.append(f"No classifier is used: {no_classifier_reason(doc)}.")
    if "pseudo" in doc:
        p = doc["pseudo"]
        ps_ = p["parent_scores"]
        out.append(f"Pseudo-labelling round {p['round']} of {p['parent']}: {p['n_images']} of {p['n_candidates']} images "
                   f"pseudo-labelled at confidence >= {p['min_confidence']} by the whole blend (images with a defect per class "
                   f"{p['per_class']}); "
                   + (f"each fold trained on the images its fold's parent models labelled ({p.get('n_images_by_fold')} per fold)"
                      if "labels_by_fold" in p else "added to every fold's training split")
                   + f"; nested {fmt_score(ps_.get('nested'))} in the parent round vs "
                   f"{fmt_score(nested)} here" + (f", holdout {fmt_score(ps_.get('holdout'))} vs {fmt_score(s.get('holdout'))}"
                                                 if "holdout" in s else "") + ".")
    out += [w for _, w in warnings(doc)]
    return out


def headline_text(doc: dict) -> str:
    """The headline line and its points as one text (the report's top)."""
    return "\n".join([headline_line(doc), *("- " + d for d in headline_details(doc))])


def warnings(doc: dict) -> list[tuple[str, str]]:
    """(kind, sentence) for what a reader must not miss: estimates at or below all-empty, grid edges."""
    s, out = doc["scores"], []
    if s.get("nested") is not None and s["nested"] <= s["all_empty"]:
        out.append(("nested", f"WARNING: the nested estimate is worse than predicting no defects "
                              f"({s['nested']:.6f} <= all-empty {s['all_empty']:.6f})."))
    if s["best_single"] <= s["all_empty"]:
        out.append(("best_single", f"WARNING: the best single model is no better than predicting no defects "
                                   f"({s['best_single']:.6f} <= all-empty {s['all_empty']:.6f})."))
    looks = doc.get("holdout", {}).get("looks", 1)
    if looks > 1:
        out.append(("holdout", f"WARNING: the holdout has been looked at {looks} times (RUN/holdout.json looks): choices "
                               "made after seeing its score tune on it, so it is no longer an untouched estimate."))
    for c, pc in doc["per_class"].items():
        for e in pc.get("on_grid_edge", []):
            out.append(("edge", f"Class {c}: {e} (the optimum may lie outside the grid)."))
    return out


def _submit_cmd(run: Path, out_dir: Path) -> str:
    """The predict command for this blend, with the run's own test images (beside its training data)
    and the Python this report was made with."""
    state = read_state(run)
    data = state.data if state is not None else None
    images = Path(data) / "test_images" if data and (Path(data) / "test_images").is_dir() else "DATA/test_images"
    py = Path(sys.executable)
    rel = os.path.relpath(py)
    if not rel.startswith(".."):
        py = Path(rel)
    return f"{py} -m steel_ray.predict --run {run} --images {images} --out {run / 'submission.csv'} --blend {out_dir / 'blend.json'}"


def write_report(doc: dict, pool, run, out_dir, overlays: bool = True) -> Path:
    """Write report.html and report.md into ``out_dir``; returns the HTML path. ``overlays``: the
    "Masks" section (the blend's OOF masks drawn on the training images, :mod:`steel_ray.overlay`)."""
    run, out_dir = Path(run), Path(out_dir)
    labels = list(pool.model_ids)
    plots = _plots(doc, _correlation(pool), labels, getattr(pool, "ds_factor", 4))
    tables = _tables(doc, run)
    if "corr" in plots:
        tables["corr_legend"] = pd.DataFrame({"#": range(1, len(labels) + 1), "model_id": labels})
    res = doc["selection"].get("selection_resolution", "full")
    on_maps = "full-resolution maps" if res == "full" else f"{res} maps ({res[2:]}x downsampled), not the full-resolution scores above"
    maps = doc["selection"].get("selection_maps") or {}
    if res != "full" and maps.get("chosen_by") == "selection_memory" and res != "ds4":
        on_maps += (f"; {res[2:]}x because the 4x maps would hold ~{maps['estimate_gib']['ds4']:.3g} GiB, over the "
                    f"--selection-memory of {maps['budget_gib']:g} GiB")
    sections = [
        ("Scores", "scores", None),
        ("Chosen members and weights", "weights", None),
        (f"Ensemble score versus number of members (cross-fitted during the selection, on the {on_maps})", "trajectory", "members"),
        ("Per-class post-processing, Dice and false-positive rate on empty pairs", "postprocess", "curves"),
        ("Classifier ensemble (the gate)", "classifiers", None),
        ("Per-class gate: source, image-level quality, Dice with and without the classifiers", "gate", None),
        ("Single models (cross-fitted, full resolution)", "singles", None),
        ("Model correlation", "corr_legend", "corr"),
        ("Search leaderboard, segmentation trials (best_val_dice_pp: post-processed Dice on the fold)", "leaderboard", None),
        ("Search leaderboard, classifier trials (best_val_dice_pp: the gate's pair accuracy with a perfect segmenter; "
         "not comparable with the segmenters')", "leaderboard_cls", None),
    ]
    line, details = headline_line(doc), headline_details(doc)
    md = [f"# Blend selection report: {run.name}", "", f"**{line}**", "", *(f"- {d}" for d in details), ""]
    h = [f"<html><head><meta charset='utf-8'><meta name='viewport' content='width=device-width'>"
         f"<title>Blend report {html.escape(run.name)}</title>",
         "<style>body{font-family:sans-serif;max-width:1200px;margin:auto;padding:0 8px} table{border-collapse:collapse;font-size:13px}"
         "td,th{border:1px solid #ccc;padding:3px 6px} code{background:#eee;padding:2px;word-break:break-all}"
         "img{max-width:100%;height:auto} .headline{font-size:1.25em;font-weight:bold} .wide{overflow-x:auto}"
         "figure{margin:6px 0 14px} figcaption{font-size:12px;color:#333}</style></head><body>",
         f"<h1>Blend selection report: {html.escape(run.name)}</h1><p class='headline'>{html.escape(line)}</p>",
         "<ul>" + "".join(f"<li>{html.escape(d)}</li>" for d in details) + "</ul>"]
    for title, tkey, pkey in sections:
        if tkey and tkey not in tables and (not pkey or pkey not in plots):
            continue
        md += [f"## {title}", ""]
        h.append(f"<h2>{html.escape(title)}</h2>")
        if tkey and tkey in tables:
            # object dtype: tabulate reads a mixed int/float frame as one float array (members 1 -> "1.0")
            tab = tables[tkey].astype(object)
            md += [tab.to_markdown(index=False, disable_numparse=True) if _has_tabulate() else tab.to_string(index=False), ""]
            h.append(tables[tkey].to_html(index=False, escape=True))
        if pkey and pkey in plots:
            h.append(f"<img alt='{pkey}' src='data:image/png;base64,{plots[pkey]}'/>")
            md += [f"(plot `{pkey}` in report.html)", ""]
    if overlays:
        from ..overlay import report_section  # lazy on purpose: overlay reads images through dataset (torch)

        h.append(report_section(run, doc, out_dir / "blend.json"))
        md += ["## Masks", "", "(out-of-fold examples and the holdout's worst pairs drawn with outlines: in report.html, or "
               "`python -m steel_ray.overlay` for any image set)", ""]
    cmd = _submit_cmd(run, out_dir)
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
