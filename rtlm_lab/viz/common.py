"""The lab's figure kit, shared by every figure module (the lowest of the analysis layers: it imports no
other part of the lab but :mod:`rtlm_lab.io`).

* :func:`pyplot`: ``matplotlib.pyplot``, imported on first use (never picks a backend: entry points that
  run headless call ``matplotlib.use("Agg")`` themselves);
* :func:`save_figure`: ``<out_dir>/<stem>.png`` and ``.svg``, each written atomically;
* :func:`finish`: tight layout, save when given ``out_dir``, close (notebooks show the returned figure once);
* :func:`column_label`, :func:`signed_heatmap`: the (lm, platform) column labels and the correlation heatmap
  centred on 0 of the uncertainty figures.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from rtlm_lab.io import atomic_path


def pyplot():
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig, out_dir: str | Path, stem: str, dpi: int = 120) -> list[Path]:
    """Write ``<out_dir>/<stem>.png`` and ``.svg``; returns both paths."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for ext in ("png", "svg"):
        p = out_dir / f"{stem}.{ext}"
        with atomic_path(p) as tmp:  # temporary file + rename: a killed run never leaves half a figure
            fig.savefig(tmp, dpi=dpi, bbox_inches="tight", format=ext)
        paths.append(p)
    return paths


def finish(fig, out_dir, stem):
    """Tight layout, ``save_figure`` when ``out_dir`` is given, close; returns the figure."""
    fig.tight_layout()
    if out_dir is not None:
        save_figure(fig, out_dir, stem)
    pyplot().close(fig)
    return fig


def column_label(table: pd.DataFrame) -> pd.Series:
    """One label per (lm, platform): the LM alone when a single platform is present."""
    if table["platform"].nunique() > 1:
        return table["lm"].astype(str) + "\n" + table["platform"].astype(str)
    return table["lm"].astype(str)


def signed_heatmap(plt, val: pd.DataFrame, lo: pd.DataFrame | None, hi: pd.DataFrame | None, label: str,
                   base_w: float, base_h: float):
    """A correlation heatmap centred on 0: values to two decimals, ``*`` where the CI (``lo``, ``hi``)
    excludes 0, ``n/a`` cells masked; the colour range is symmetric and at least +-0.3."""
    import seaborn as sns

    annot = val.map(lambda v: "n/a" if not np.isfinite(v) else f"{v:+.2f}")
    if lo is not None and hi is not None:
        sig = ((lo > 0) | (hi < 0)).fillna(False)
        annot = annot.where(~sig, annot + "*")
    finite = val.to_numpy()[np.isfinite(val.to_numpy())]
    lim = max(0.3, float(np.ceil(np.abs(finite).max() * 10) / 10)) if finite.size else 1.0
    fig, ax = plt.subplots(figsize=(max(4.8, base_w + 1.3 * val.shape[1]), 0.5 * val.shape[0] + base_h))
    sns.heatmap(val.fillna(0.0), mask=~np.isfinite(val.to_numpy()), annot=annot.to_numpy(), fmt="",
                cmap="RdBu_r", vmin=-lim, vmax=lim, center=0, linewidths=0.5, ax=ax, cbar_kws={"label": label})
    return fig, ax
