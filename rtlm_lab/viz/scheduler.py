"""Scheduler figures: response-time CDFs per policy, mean response time against load, and the results table's
headroom figure (:func:`plot_headroom`)."""

from __future__ import annotations

from pathlib import Path
from typing import Mapping

import numpy as np
import pandas as pd

from rtlm_lab.viz.common import pyplot as _plt
from rtlm_lab.viz.common import save_figure

# fixed colours so a policy looks the same in every figure
COLORS = {"fcfs": "#7f7f7f", "sjf_input": "#bcbd22", "sjf_proxy": "#1f77b4", "ltr": "#17becf",
          "oracle_sjf": "#2ca02c", "oracle_srpt": "#006d2c", "rtlm": "#d62728", "rtlm_no_uncertainty": "#ff9896",
          "rtlm_no_aging": "#e377c2",
          "rtlm_no_consolidation": "#9467bd", "rtlm_no_offload": "#8c564b", "rtlm_batch1": "#ff7f0e",
          "rtlm_wc": "#000000", "lmstate": "#ff7f0e", "lmstate_no_refine": "#ffbb78", "gittins": "#9edae5",
          "gittins_lmstate": "#8c564b", "srpt_expected": "#c49c94", "oracle_dist": "#98df8a"}


def plot_cdf(rts: Mapping[str, np.ndarray], out_dir: str | Path | None = None, title: str = "",
             stem: str = "response_cdf"):
    """Empirical CDF of response times (s, log x) for each policy."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for name, v in rts.items():
        v = np.sort(np.asarray(v, float))
        if len(v):
            ax.step(v, np.arange(1, len(v) + 1) / len(v), where="post", label=f"{name} (mean {v.mean():.2f} s)",
                    color=COLORS.get(name))
    ax.set_xscale("log")
    ax.set_xlabel("response time (s)")
    ax.set_ylabel("share of requests")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    if out_dir is not None:
        save_figure(fig, out_dir, stem)
        plt.close(fig)
    return fig


def plot_rt_vs_rho(df: pd.DataFrame, out_dir: str | Path | None = None, title: str = "", stem: str = "rt_vs_rho",
                   value: str = "mean_rt_s"):
    """Mean response time (mean over seeds, bars: min-max) against rho, one line per policy."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for name, g in df.groupby("policy"):
        s = g.groupby("rho")[value].agg(["mean", "min", "max"]).sort_index()
        ax.errorbar(s.index, s["mean"], yerr=[s["mean"] - s["min"], s["max"] - s["mean"]], marker="o", ms=3,
                    capsize=2, label=name, color=COLORS.get(name))
    ax.set_yscale("log")
    ax.set_xlabel("offered load rho (batch-1 utilization)")
    ax.set_ylabel(value.replace("_", " "))
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    if out_dir is not None:
        save_figure(fig, out_dir, stem)
        plt.close(fig)
    return fig


def plot_headroom(df: pd.DataFrame, out_dir: str | Path | None = None, title: str = "", stem: str = "headroom"):
    """The results table (``rtlm-reference target=scheduler``) as one figure: a panel per group, each policy's
    mean response time over FCFS's (paired per seed, 95% CI; log x), the oracle's ratio as a green band, and
    beside each policy the share of the FCFS-to-oracle headroom it captured with its CI (where the oracle's
    headroom is significant). A group whose runs break the protocol says so in its panel title."""
    plt = _plt()
    groups = list(dict.fromkeys(df["group"]))
    if not groups:
        raise ValueError("no rows to plot")
    heights = [max(1, int((df["group"] == g).sum())) for g in groups]
    fig, axes = plt.subplots(len(groups), 1, figsize=(7.6, 0.9 + 0.32 * sum(heights) + 0.5 * len(groups)),
                             gridspec_kw={"height_ratios": heights}, squeeze=False)
    lo_all = df["mean_rt_vs_fcfs_lo"].astype(float).clip(lower=1e-3)
    hi_all = df["mean_rt_vs_fcfs_hi"].astype(float)
    xmin = float(np.nanmin(np.r_[lo_all, 0.9])) * 0.8
    xmax = float(np.nanmax(np.r_[hi_all, 1.1])) * 1.25
    for ax, g in zip(axes[:, 0], groups):
        d = df[(df["group"] == g) & (df["policy"] != "fcfs")].sort_values("mean_rt_vs_fcfs", ascending=False)
        y = np.arange(len(d))
        orc = d[d["policy"] == d["oracle"]]
        if len(orc) and np.isfinite(float(orc["mean_rt_vs_fcfs"].iloc[0])):
            o = orc.iloc[0]
            ax.axvspan(float(o["mean_rt_vs_fcfs_lo"]), float(o["mean_rt_vs_fcfs_hi"]), color="#2ca02c", alpha=0.15,
                       lw=0)
        ax.axvline(1.0, color="#7f7f7f", lw=1, ls="--")
        for k, (_, r) in enumerate(d.iterrows()):
            m, lo, hi = (float(r[c]) for c in ("mean_rt_vs_fcfs", "mean_rt_vs_fcfs_lo", "mean_rt_vs_fcfs_hi"))
            ax.errorbar([m], [k], xerr=[[max(m - lo, 0)], [max(hi - m, 0)]], fmt="o", ms=4, capsize=2,
                        color=COLORS.get(r["policy"], "#333333"))
            hc = float(r.get("headroom_captured", np.nan))
            if np.isfinite(hc) and r["policy"] != r["oracle"]:
                txt = (f"{100 * hc:.0f}% [{100 * float(r['headroom_captured_lo']):.0f}, "
                       f"{100 * float(r['headroom_captured_hi']):.0f}]")
                ax.text(xmax / 1.02, k, txt, va="center", ha="right", fontsize=7)
        ax.set_yticks(y)
        ax.set_yticklabels(list(d["policy"]), fontsize=7)
        ax.set_xscale("log")
        ax.set_xlim(xmin, xmax)
        ax.set_ylim(-0.6, len(d) - 0.4)
        ax.grid(alpha=0.3, axis="x")
        flags = "; ".join(sorted({str(f) for f in d.get("flags", pd.Series(dtype=str)).fillna("") if str(f)}))
        first = d.iloc[0] if len(d) else df[df["group"] == g].iloc[0]
        head = f"{g}  (rho {first['nominal_rho']}, {int(first['n_seeds'])} seeds)"
        ax.set_title(head + (f"\nprotocol: {flags}" if flags else ""), fontsize=8, loc="left",
                     color="#b22222" if flags else "black")
    axes[-1, 0].set_xlabel("mean response time / FCFS (paired per seed, 95% CI); green: the oracle's; "
                           "right: headroom captured", fontsize=8)
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    if out_dir is not None:
        save_figure(fig, out_dir, stem)
        plt.close(fig)
    return fig
