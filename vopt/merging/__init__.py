"""Visual-token merging (HoliTom outer- and inner-LLM stages) as pure tensor functions.

Spec: ``shared/specs/tokens.md`` §1-§2. The model pass that installs them is ``vopt.passes.holitom``.

* :mod:`.config`: :class:`HoliTomConfig` (registered), :class:`ClusterMergeMode`, :class:`BudgetRounding`.
* :mod:`.density`: deterministic DPC-KNN centres and beta/mean cluster merging.
* :mod:`.inner`: :func:`last_token_importance`, :func:`inner_merge` (the inner-LLM stage).
* :mod:`.flops`: the HoliTom/FastV paper FLOPs formula (:func:`paper_prefill_flops`).
* :mod:`.holitom`: :func:`temporal_segments`, :func:`temporal_merge`, :func:`spatial_merge`, :func:`holitom_merge`
  -> :class:`MergeResult` (tokens, positions, a sparse source map that reconstructs them, kept per frame).
"""
from .config import BudgetRounding, ClusterMergeMode, HoliTomConfig
from .density import ClusterMerge, cluster_merge, dpc_knn_centers, pairwise_distance
from .holitom import (
    MergeResult,
    Segmentation,
    SpatialMerge,
    TemporalMerge,
    consecutive_similarity,
    group_budgets,
    holitom_merge,
    proxy_scores,
    spatial_merge,
    static_counts,
    temporal_merge,
    temporal_segments,
)

__all__ = [
    "BudgetRounding", "ClusterMerge", "ClusterMergeMode", "HoliTomConfig", "MergeResult", "Segmentation",
    "SpatialMerge", "TemporalMerge", "cluster_merge", "consecutive_similarity", "dpc_knn_centers", "group_budgets",
    "holitom_merge", "pairwise_distance", "proxy_scores", "spatial_merge", "static_counts", "temporal_merge",
    "temporal_segments",
]
