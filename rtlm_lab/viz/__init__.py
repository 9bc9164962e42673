"""Figures of the lab (seaborn/matplotlib), each saved as PNG and SVG.

Plot functions return the :class:`matplotlib.figure.Figure` (closed, so notebooks show it once via
``display(fig)``) and, given ``out_dir``, also write ``<stem>.png`` and ``<stem>.svg``. They never pick a
backend: entry points that run headless call ``matplotlib.use("Agg")`` themselves.
"""

from rtlm_lab.viz.uncertainty import (
    plot_latency_fit, plot_output_by_uncertainty, plot_spearman_bars, plot_spearman_heatmap, save_figure,
)

__all__ = ["save_figure", "plot_spearman_bars", "plot_output_by_uncertainty", "plot_latency_fit",
           "plot_spearman_heatmap"]
