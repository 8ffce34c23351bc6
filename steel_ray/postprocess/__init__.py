"""Exact, vectorised post-processing search over (pixel threshold x min area x classifier gate).

For a blend (uint8 probability maps), per-image counts of the blended values by threshold bin,
over all pixels and over true pixels (one compiled pass, :mod:`steel_ray.kernels`), give, by
suffix sums, the predicted area and the intersection for every pixel threshold at once. Whole-mask min area and the classifier gate are then plain
comparisons, so the Dice of every (image, grid point) follows without re-thresholding a mask.
The metric is a mean over (image, class) pairs, so classes are tuned independently.

Pixels are pruned exactly: the blend (a weighted mean) can reach level ``t`` only where some
member reaches ``t``, so only pixels where a member reaches the lowest grid level are kept
(:class:`ClassData`). Tables are kept per fold, so choosing on K-1 folds and scoring on the
held-out one (cross-fitting) costs nothing extra.

The package is the one room of a post-processing rule: :mod:`.rule` (the rule blend.json states
and predict applies), :mod:`.counts` (the grid and the per-image counts at every level),
:mod:`.tables` (Dice tables, in-sample and cross-fitted choices, gate sources) and :mod:`.kernels`
(the compiled counting pass). Adding a rule touches this package, blend.json's document and the
report, nothing else.
"""
from .counts import (
                     CHOICE_RULES,
                     SEVERSTAL_AREA,
                     ClassData,
                     Grid,
                     RunIndex,
                     all_levels,
                     area_inter,
                     area_inter_dense,
                     area_inter_filled,
                     counts_from_bins,
                     counts_from_histograms,
                     default_grid,
                     image_histograms,
                     level_bins,
                     product_counts,
)
from .rule import (
                     GATE_SOURCES,
                     Choice,
                     PostProcess,
                     apply_blend,
                     blend_cls,
                     blend_u8,
                     fill_holes,
                     gate,
                     gate_signal,
                     member_weights,
                     product_levels,
                     product_on,
                     remove_small,
                     threshold,
)
from .tables import (
                     GATE_MARGIN,
                     GateEvidence,
    GatePolicy,
                     choose,
                     choose_source,
                     cross_fitted,
                     cross_fitted_source,
                     fold_tables,
                     in_sample,
                     in_sample_source,
                     score_counts,
                     score_point,
                     smoothed,
                     tables_from_counts,
)

__all__ = ["Grid", "CHOICE_RULES", "default_grid", "smoothed", "ClassData", "blend_u8", "blend_cls", "fold_tables",
           "tables_from_counts", "area_inter", "RunIndex", "level_bins", "counts_from_bins", "image_histograms",
           "area_inter_dense", "area_inter_filled", "counts_from_histograms", "Choice", "choose", "cross_fitted", "in_sample",
           "score_point", "score_counts", "GATE_SOURCES", "GATE_MARGIN", "GateEvidence", "GatePolicy", "gate_signal", "choose_source",
           "cross_fitted_source", "in_sample_source", "SEVERSTAL_AREA", "member_weights", "apply_blend", "PostProcess",
           "threshold", "remove_small", "gate", "fill_holes", "all_levels", "product_counts", "product_levels",
           "product_on"]
