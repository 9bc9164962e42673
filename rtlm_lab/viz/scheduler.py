"""Scheduler figures: response-time CDFs per policy, mean response time against load."""

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
          "rtlm_wc": "#000000"}


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
