"""Analyses of runs: overlap, deactivation, continual metrics, similarity, NeFT utilization.

Each analysis is a pure function returning JSON-ready data; `ncft.analysis.plots`
draws each one to PNG; `write_report(run_dir)` runs all whose inputs exist.
"""

from ncft.analysis.neft_stats import rank_shift, selected_from_set, weight_movement_rank_shift
from ncft.analysis.neft_utilization import utilization_shift
from ncft.analysis.overlap import iou_matrix
from ncft.analysis.report import write_report
from ncft.analysis.results import continual_metrics, deactivation_matrix, finetune_matrix
from ncft.analysis.similarity import correlation, layer_similarity

__all__ = [
    "continual_metrics",
    "correlation",
    "deactivation_matrix",
    "finetune_matrix",
    "iou_matrix",
    "layer_similarity",
    "rank_shift",
    "selected_from_set",
    "utilization_shift",
    "weight_movement_rank_shift",
    "write_report",
]
