"""Figures of the lab (seaborn/matplotlib), each saved as PNG and SVG.

Plot functions return the :class:`matplotlib.figure.Figure` (closed, so notebooks show it once via
``display(fig)``) and, given ``out_dir``, also write ``<stem>.png`` and ``<stem>.svg``. They never pick a
backend: entry points that run headless call ``matplotlib.use("Agg")`` themselves.

``viz`` is the lowest of the analysis layers (below ``regressor``, ``uncertainty`` and ``profiling``): it holds
the figure kit (:mod:`.common`: ``save_figure``, ``pyplot``, the signed heatmap) and the scheduler's figures
(:mod:`.scheduler`), and imports no analysis package. Figures that need an analysis package's definitions live
in that package (:mod:`rtlm_lab.uncertainty.figures`, :func:`rtlm_lab.regressor.evaluate.plot_comparison`).
"""

from rtlm_lab.viz.common import save_figure

__all__ = ["save_figure"]
