"""Summaries of a profile: output-length distribution and the latency model ``e2e = TTFT + k x tokens``."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from rtlm_lab.io import atomic_path

SUMMARY_COLUMNS = ["lm", "platform", "n", "mean_out_tokens", "p50_out_tokens", "p99_out_tokens", "ttft_ms",
                   "ms_per_token"]


def is_repetition_loop(text: str, window: int = 6, min_words: int = 20) -> bool:
    """True when a reply ends inside a verbatim repetition: its last ``window`` words occurred earlier.

    Greedy decoding of small LMs falls into such loops ("I'm sorry. I'm sorry. ..."), which never end by
    themselves, so they hit ``max_new_tokens`` whatever the cap.
    """
    words = str(text).split()
    if len(words) < min_words:
        return False
    tail = " ".join(words[-window:])
    return tail in " ".join(words[:-window])


def latency_fit(df: pd.DataFrame) -> dict[str, float]:
    """Least-squares ``e2e_s = a + b * n_output_tokens`` with its R^2 (NaN when degenerate)."""
    x = df["n_output_tokens"].to_numpy(float)
    y = df["e2e_s"].to_numpy(float)
    if len(x) < 3 or np.ptp(x) == 0:
        return {"intercept_s": float("nan"), "s_per_token": float("nan"), "r2": float("nan")}
    b, a = np.polyfit(x, y, 1)
    resid = y - (a + b * x)
    ss_tot = float(((y - y.mean()) ** 2).sum())
    return {"intercept_s": float(a), "s_per_token": float(b),
            "r2": float(1 - (resid ** 2).sum() / ss_tot) if ss_tot > 0 else float("nan")}


def summarize(df: pd.DataFrame) -> dict[str, Any]:
    """Headline numbers of a profile (one LM x platform)."""
    if len(df) == 0:
        return {"n": 0}
    out = df["n_output_tokens"].astype(float)
    from scipy.stats import spearmanr

    rho = spearmanr(df["n_output_tokens"], df["e2e_s"]).statistic if out.nunique() > 1 else float("nan")
    rho_in = (spearmanr(df["n_input_tokens"], df["n_output_tokens"]).statistic
              if out.nunique() > 1 and df["n_input_tokens"].nunique() > 1 else float("nan"))
    multi = df[df["n_output_tokens"] > 1]
    return {
        "n": int(len(df)),
        "mean_out_tokens": float(out.mean()),
        "sd_out_tokens": float(out.std(ddof=1)) if len(out) > 1 else 0.0,
        "p50_out_tokens": float(out.quantile(0.5)),
        "p90_out_tokens": float(out.quantile(0.9)),
        "p99_out_tokens": float(out.quantile(0.99)),
        "max_out_tokens": int(out.max()),
        "capped_share": float((df["stop_reason"] == "max_tokens").mean()),
        "capped_loop_share": (float(df.loc[df["stop_reason"] == "max_tokens", "reply"].map(is_repetition_loop).mean())
                              if "reply" in df and (df["stop_reason"] == "max_tokens").any() else 0.0),
        "stop_reasons": {k: int(v) for k, v in df["stop_reason"].value_counts().items()},
        "mean_in_tokens": float(df["n_input_tokens"].mean()),
        "ttft_ms": float(1000 * df["ttft_s"].mean()),
        "ms_per_token": float(multi["ms_per_token"].mean()) if len(multi) else float("nan"),
        "mean_e2e_s": float(df["e2e_s"].mean()),
        "p99_e2e_s": float(df["e2e_s"].quantile(0.99)),
        "tokens_per_s": float(out.sum() / df["e2e_s"].sum()) if df["e2e_s"].sum() > 0 else float("nan"),
        "spearman_latency_tokens": float(rho),
        "spearman_in_out_tokens": float(rho_in),
        "latency_fit": latency_fit(df),
    }


def summary_row(summary: dict[str, Any]) -> dict[str, Any]:
    """The ``summary.csv`` row (columns :data:`SUMMARY_COLUMNS`) of a summary dict."""
    return {k: summary.get(k) for k in SUMMARY_COLUMNS}


def format_summary(df: pd.DataFrame, summary: dict[str, Any] | None = None, width: int = 40) -> str:
    """Plain-text report: output-length histogram and latency against output tokens."""
    s = summary or summarize(df)
    if not s.get("n"):
        return "no requests profiled"
    lines = [
        f"{s.get('lm', '?')} on {s.get('platform', '?')}: {s['n']} requests",
        f"output tokens: mean {s['mean_out_tokens']:.1f} (sd {s['sd_out_tokens']:.1f}), p50 "
        f"{s['p50_out_tokens']:.0f}, p90 {s['p90_out_tokens']:.0f}, p99 {s['p99_out_tokens']:.0f}, max "
        f"{s['max_out_tokens']}; hit the cap: {100 * s['capped_share']:.1f}% "
        f"({100 * s['capped_loop_share']:.0f}% of those in a repetition loop)",
        "",
        "output-length distribution:",
    ]
    out = df["n_output_tokens"].to_numpy()
    edges = np.unique(np.quantile(out, np.linspace(0, 1, 9)).round())
    if len(edges) < 2:
        edges = np.array([out.min(), out.max() + 1])
    counts, edges = np.histogram(out, bins=edges)
    peak = max(counts.max(), 1)
    for c, lo, hi in zip(counts, edges[:-1], edges[1:]):
        lines.append(f"  {int(lo):>4}-{int(hi):<4} {'#' * int(round(width * c / peak)):<{width}} {c}")
    fit = s["latency_fit"]
    lines += [
        "",
        "latency against output tokens:",
        f"  TTFT {s['ttft_ms']:.0f} ms, {s['ms_per_token']:.1f} ms/token, {s['tokens_per_s']:.1f} tok/s",
        f"  e2e = {fit['intercept_s']:.3f} s + {1000 * fit['s_per_token']:.1f} ms x tokens  (R^2 {fit['r2']:.3f}); "
        f"Spearman(latency, tokens) {s['spearman_latency_tokens']:.2f}",
        f"  Spearman(input tokens, output tokens) {s['spearman_in_out_tokens']:.2f}",
    ]
    return "\n".join(lines)


def plot_profile(df: pd.DataFrame, out_dir: str | Path, title: str = "") -> list[Path]:
    """Output-length histogram and latency-vs-tokens scatter, as PNG and SVG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import seaborn as sns

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    sns.histplot(df["n_output_tokens"], bins=30, ax=axes[0])
    axes[0].set_xlabel("output tokens")
    axes[0].set_title("output-length distribution")
    sns.scatterplot(data=df, x="n_output_tokens", y="e2e_s", hue="stop_reason", s=14, ax=axes[1])
    fit = latency_fit(df)
    if np.isfinite(fit["s_per_token"]):
        xs = np.linspace(0, df["n_output_tokens"].max(), 50)
        axes[1].plot(xs, fit["intercept_s"] + fit["s_per_token"] * xs, "k--", lw=1,
                     label=f"fit R²={fit['r2']:.2f}")
        axes[1].legend(fontsize=8)
    axes[1].set_xlabel("output tokens")
    axes[1].set_ylabel("end-to-end latency (s)")
    axes[1].set_title("latency vs output tokens")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    paths = []
    for ext in ("png", "svg"):
        p = out_dir / f"profile.{ext}"
        with atomic_path(p) as tmp:  # temporary file + rename: a killed run never leaves half a figure
            fig.savefig(tmp, dpi=120, format=ext)
        paths.append(p)
    plt.close(fig)
    return paths
