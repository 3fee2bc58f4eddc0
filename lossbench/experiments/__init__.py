"""Experiments: evaluate a trained run, reports and plots, and the loss x OOD-score benchmark.

Uses both libraries (:mod:`lossbench`, :mod:`ood`) and the training framework
(:mod:`lossbench.framework`); nothing below it imports this package.
"""

from .embedding import embedding_quality, predict_with_features
from .evaluate_run import evaluate_checkpoint, evaluate_model, report_markdown, write_report
from .report import markdown_table, plot_histograms, plot_roc

__all__ = [
    "evaluate_checkpoint", "evaluate_model", "report_markdown", "write_report", "embedding_quality",
    "predict_with_features", "markdown_table", "plot_histograms", "plot_roc",
]
