"""Figures of the uncertainty -> output length -> latency analysis (:mod:`rtlm_lab.uncertainty.analysis`),
drawn with the figure kit of :mod:`rtlm_lab.viz.common`.

* :func:`plot_spearman_bars`: Spearman rho of each type with output tokens, bootstrap 95% CI as error
  bars, partial rho (controlling for input length) as a diamond; input length itself is the grey
  baseline bar.
* :func:`plot_output_by_uncertainty`: output-length boxes by ``total`` quartile, and per type for
  prompts at/above vs below the type's decision threshold.
* :func:`plot_latency_fit`: end-to-end latency against output tokens with the fitted
  ``e2e = TTFT + k x tokens`` line per platform.
* :func:`plot_spearman_heatmap`: type x LM (x platform) heatmap of rho from a tidy Spearman table
  (several ``metrics.json`` concatenated; a one-column map for a single run).
* the model-side vs input-side heatmap is :func:`rtlm_lab.uncertainty.modelside.plot_model_vs_input`, next to
  the table it draws.

Each returns the (closed) figure and, given ``out_dir``, writes ``<stem>.png`` and ``<stem>.svg``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import pandas as pd

from rtlm_lab.uncertainty.analysis import FEATURES, latency_models, quartile_labels
from rtlm_lab.uncertainty.quantifier import THRESHOLDS, UNCERTAINTY_TYPES
from rtlm_lab.viz.common import column_label, finish, pyplot, signed_heatmap

BASELINE = "n_input_tokens"


def _type_order(types: Sequence[str]) -> list[str]:
    known = [t for t in FEATURES if t in set(types)]
    return known + sorted(t for t in set(types) if t not in FEATURES)


def plot_spearman_bars(table: pd.DataFrame, out_dir: str | Path | None = None, title: str = "",
                       stem: str = "spearman"):
    """Horizontal bars of rho per type with CI whiskers; grouped by LM when the table holds several."""
    import seaborn as sns

    plt = pyplot()
    t = table.copy()
    t["column"] = column_label(t)
    types = _type_order(t["type"].unique())
    groups = list(dict.fromkeys(t["column"]))
    height = 0.8 / max(len(groups), 1)
    palette = sns.color_palette("deep", max(len(groups), 1))
    fig, ax = plt.subplots(figsize=(7, 0.45 * len(types) * max(1, len(groups) ** 0.5) + 1.2))
    for gi, g in enumerate(groups):
        sub = t[t["column"] == g].set_index("type").reindex(types)
        ys = np.arange(len(types)) + (gi - (len(groups) - 1) / 2) * height
        rho = sub["spearman"].to_numpy(float)
        colors = [("0.6" if ty == BASELINE else palette[gi]) for ty in types]
        ax.barh(ys, np.nan_to_num(rho), height=height * 0.9, color=colors,
                label=g.replace("\n", " / ") if len(groups) > 1 else "Spearman ρ")
        lo, hi = sub["ci_low"].to_numpy(float), sub["ci_high"].to_numpy(float)
        ok = np.isfinite(lo) & np.isfinite(hi) & np.isfinite(rho)
        if ok.any():
            ax.errorbar(rho[ok], ys[ok], xerr=[rho[ok] - lo[ok], hi[ok] - rho[ok]], fmt="none", ecolor="k",
                        elinewidth=1, capsize=3)
        part = sub["partial_spearman"].to_numpy(float)
        okp = np.isfinite(part)
        if okp.any():
            ax.scatter(part[okp], ys[okp], marker="D", s=22, color="k", zorder=3,
                       label="partial ρ | input length" if gi == 0 else None)
        for y, r in zip(ys, rho):
            if not np.isfinite(r):
                ax.text(0.01, y, "n/a", va="center", fontsize=8, color="0.4")
    ax.axvline(0, color="k", lw=0.8)
    ax.set_yticks(np.arange(len(types)))
    ax.set_yticklabels([("input length (baseline)" if ty == BASELINE else ty) for ty in types])
    ax.invert_yaxis()
    ax.set_xlim(-1, 1)
    ax.set_xlabel("Spearman ρ with output tokens (95% bootstrap CI)")
    ax.legend(fontsize=8, loc="lower right")
    ax.set_title(title or "Which uncertainty lengthens answers?")
    return finish(fig, out_dir, stem)


def plot_output_by_uncertainty(scores: pd.DataFrame, out_dir: str | Path | None = None, title: str = "",
                               stem: str = "output_by_uncertainty",
                               thresholds: Mapping[str, float] | None = None):
    """Left: output tokens by quartile of ``total``. Right: per type, score >= threshold vs below."""
    import seaborn as sns

    plt = pyplot()
    thresholds = dict(THRESHOLDS if thresholds is None else thresholds)
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.2), gridspec_kw={"width_ratios": [1, 1.6]})
    df = scores.reset_index(drop=True).copy()
    if len(df) and "total" in df.columns:
        df["quartile"] = quartile_labels(df, "total")
        order = sorted(df["quartile"].dropna().unique())
        sns.boxplot(data=df, x="quartile", y="n_output_tokens", order=order, ax=axes[0], color="#9ecae1",
                    showfliers=False)
        sns.stripplot(data=df, x="quartile", y="n_output_tokens", order=order, ax=axes[0], color="k", size=2.5,
                      alpha=0.5, jitter=0.25)
    axes[0].set_xlabel("quartile of total uncertainty [score range]")
    axes[0].set_ylabel("output tokens")
    axes[0].set_title("output length by total-uncertainty quartile")
    axes[0].tick_params(axis="x", labelsize=8)
    long = []
    for ty in UNCERTAINTY_TYPES:
        if ty in df.columns:
            flag = np.where(df[ty].astype(float) >= thresholds.get(ty, 0.5), "uncertain", "not uncertain")
            long.append(pd.DataFrame({"type": ty, "group": flag, "n_output_tokens": df["n_output_tokens"]}))
    if long and len(df):
        ld = pd.concat(long, ignore_index=True)
        counts = ld[ld["group"] == "uncertain"].groupby("type").size()
        sns.boxplot(data=ld, x="type", y="n_output_tokens", hue="group", order=list(UNCERTAINTY_TYPES),
                    hue_order=["not uncertain", "uncertain"], ax=axes[1], showfliers=False,
                    palette=["#bdbdbd", "#fd8d3c"])
        axes[1].set_xticks(range(len(UNCERTAINTY_TYPES)))
        axes[1].set_xticklabels([f"{t}\n(n={int(counts.get(t, 0))})" for t in UNCERTAINTY_TYPES], fontsize=8)
        axes[1].legend(fontsize=8, title=None)
    axes[1].set_xlabel("type (n = prompts at or above the type's threshold)")
    axes[1].set_ylabel("output tokens")
    axes[1].set_title("output length: uncertain vs not, per type")
    if title:
        fig.suptitle(title)
    return finish(fig, out_dir, stem)


def plot_latency_fit(scores: pd.DataFrame, fits: Mapping[str, Mapping[str, Any]] | None = None,
                     out_dir: str | Path | None = None, title: str = "", stem: str = "latency_fit"):
    """Scatter of ``e2e_s`` against ``n_output_tokens`` (hue = platform) with each platform's fit line."""
    import seaborn as sns

    plt = pyplot()
    df = scores.reset_index(drop=True).copy()
    if "platform" not in df.columns:
        df["platform"] = "?"
    df["platform"] = df["platform"].astype(str)
    fits = latency_models(df) if fits is None else fits
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    platforms = sorted(df["platform"].unique())
    palette = dict(zip(platforms, sns.color_palette("deep", max(len(platforms), 1))))
    if len(df):
        sns.scatterplot(data=df, x="n_output_tokens", y="e2e_s", hue="platform", palette=palette, s=16,
                        alpha=0.7, ax=ax)
    for plat in platforms:
        fit = fits.get(plat) or {}
        a, b, r2 = (fit.get(k) for k in ("intercept_s", "s_per_token", "r2"))
        if a is None or b is None or not (np.isfinite(a) and np.isfinite(b)):
            continue
        xs = np.linspace(0, max(float(df["n_output_tokens"].max()), 1.0), 50)
        r2s = f"{r2:.3f}" if r2 is not None and np.isfinite(r2) else "n/a"
        ax.plot(xs, a + b * xs, "--", color=palette[plat], lw=1.2,
                label=f"{plat}: {1000 * a:.0f} ms + {1000 * b:.1f} ms×tok (R²={r2s})")
    ax.set_xlabel("output tokens")
    ax.set_ylabel("end-to-end latency (s)")
    ax.set_title(title or "latency = TTFT + k × output tokens")
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=8)
    return finish(fig, out_dir, stem)


def plot_spearman_heatmap(table: pd.DataFrame, out_dir: str | Path | None = None, title: str = "",
                          stem: str = "spearman_heatmap", value: str = "spearman"):
    """Type x LM heatmap of ``value`` (rho by default); ``*`` marks a CI that excludes 0."""
    plt = pyplot()
    t = table.copy()
    t["column"] = column_label(t)
    types = _type_order(t["type"].unique())
    cols = list(dict.fromkeys(t["column"]))
    grid = t.pivot_table(index="type", columns="column", values=value, aggfunc="first", dropna=False)
    grid = grid.reindex(index=types, columns=cols).astype(float)
    lo = hi = None
    if value == "spearman" and {"ci_low", "ci_high"} <= set(t.columns):
        lo = t.pivot_table(index="type", columns="column", values="ci_low", aggfunc="first", dropna=False)
        hi = t.pivot_table(index="type", columns="column", values="ci_high", aggfunc="first", dropna=False)
        lo, hi = lo.reindex(index=types, columns=cols), hi.reindex(index=types, columns=cols)
    fig, ax = signed_heatmap(plt, grid, lo, hi, f"{value.replace('_', ' ')} with output tokens", 2.6, 1.6)
    ax.set_yticklabels([("input length" if ty == BASELINE else ty) for ty in types], rotation=0)
    ax.set_xlabel("")
    ax.set_ylabel("")
    ax.set_title(title or "Spearman ρ of uncertainty with output tokens\n(* = 95% CI excludes 0)", fontsize=10)
    return finish(fig, out_dir, stem)
