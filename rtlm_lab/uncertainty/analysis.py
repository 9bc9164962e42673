"""Does input uncertainty lengthen LM answers? Statistics over one profile (RT-LM, RTSS 2023, Sec. 3).

:func:`analyze` joins :func:`rtlm_lab.uncertainty.quantify` scores with a profile
(:data:`rtlm_lab.profiling.profiler.PROFILE_COLUMNS`, one row per request) and computes:

* **Spearman** rho of each uncertainty type, of ``total`` and (as a baseline) of ``n_input_tokens`` with
  ``n_output_tokens``, its asymptotic p-value (scipy) and a **bootstrap 95% percentile CI**
  (``scipy.stats.bootstrap`` via :func:`rtlm_lab.bootstrap.percentile_ci`: rows are resampled with a seeded
  ``numpy.random.default_rng``; the same resamples serve every feature, so the CIs are comparable across types);
* **partial Spearman** controlling for input length: the Pearson correlation of the residuals of
  ``rank(x)`` and ``rank(n_output_tokens)`` after a least-squares fit on ``rank(n_input_tokens)``
  (with its own bootstrap CI). A type that only "works" because uncertain requests are longer drops to
  ~0 here. For the ``n_input_tokens`` row itself it is undefined (NaN);
* the **output-length distribution by ``total`` quartile** (n, mean, median, p90 of output tokens);
* the **latency model** ``e2e_s = TTFT + k x tokens`` per platform, with R^2
  (:func:`rtlm_lab.profiling.summary.latency_fit`);
* a tidy ``spearman_table`` (columns :data:`TABLE_COLUMNS`) for tables, heatmaps and
  ``outputs/reference/uncertainty/summary.csv``.

Choices, documented once:

* Ties get average ranks (the usual Spearman). A bootstrap resample in which a feature is constant has
  no correlation; it is skipped (NaN) and the CI is taken over the remaining resamples. When fewer than
  half of the resamples are usable the CI is NaN.
* Quartiles of ``total`` are cut on its average ranks, so tied scores (many prompts score exactly 0)
  always share a group: groups can be unequal in size, and fewer than four when ties are massive.
* Degenerate input (fewer than :data:`MIN_ROWS` rows, constant columns, missing columns) yields NaN;
  nothing here raises on data. Only a missing ``text``/``n_output_tokens`` column in :func:`analyze` is a
  :class:`~rtlm_lab.errors.UserError` (the file is not a profile).
* :func:`analyze_scores` is the pure-statistics half (no spaCy) and takes any frame that already holds the
  score columns; the tests drive it with synthetic data whose answer is known.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import pandas as pd

from rtlm_lab.bootstrap import percentile_ci
from rtlm_lab.errors import UserError
from rtlm_lab.uncertainty.quantifier import UNCERTAINTY_TYPES

#: Rows of the Spearman table: the six types, their weighted total, and input length as a baseline.
FEATURES: tuple[str, ...] = (*UNCERTAINTY_TYPES, "total", "n_input_tokens")
TABLE_COLUMNS = ["lm", "platform", "type", "spearman", "ci_low", "ci_high", "partial_spearman", "p_value",
                 "partial_ci_low", "partial_ci_high", "n"]
#: Profile columns carried into the per-request scores frame (when present).
CARRIED_COLUMNS = ["request_id", "text", "n_input_tokens", "n_output_tokens", "ttft_s", "e2e_s",
                   "ms_per_token", "stop_reason", "lm", "platform"]
MIN_ROWS = 5
CI_LEVEL = 0.95
TARGET = "n_output_tokens"
CONTROL = "n_input_tokens"


# --------------------------------------------------------------------------------------------- scores
def score_profile(profile_df: pd.DataFrame) -> pd.DataFrame:
    """Per-request uncertainty scores joined with the profile's token counts and latencies.

    Columns: the profile's :data:`CARRIED_COLUMNS` that exist, then the six type scores, ``total`` and
    ``n_tokens`` (spaCy tokens of the text, not the LM's ``n_input_tokens``).
    """
    missing = [c for c in ("text", TARGET) if c not in profile_df.columns]
    if missing:
        raise UserError(f"not a profile: missing column(s) {', '.join(missing)}")
    from rtlm_lab.uncertainty import quantify

    base = profile_df[[c for c in CARRIED_COLUMNS if c in profile_df.columns]].reset_index(drop=True)
    scores = quantify(base["text"].fillna("").astype(str).tolist())
    return pd.concat([base, scores.reset_index(drop=True)], axis=1)


# ------------------------------------------------------------------------------------- rank statistics
def _rank_rows(a: np.ndarray) -> np.ndarray:
    """Average ranks along the last axis (ties share their mean rank)."""
    from scipy.stats import rankdata

    return rankdata(a, axis=-1, method="average")


def _pearson_rows(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Row-wise Pearson correlation of two (B, n) arrays; NaN where a row is constant."""
    xc = x - x.mean(axis=-1, keepdims=True)
    yc = y - y.mean(axis=-1, keepdims=True)
    sxx = (xc * xc).sum(axis=-1)
    syy = (yc * yc).sum(axis=-1)
    den = np.sqrt(sxx * syy)
    with np.errstate(invalid="ignore", divide="ignore"):
        r = (xc * yc).sum(axis=-1) / den
    # relative tolerance: residuals of an exact fit are ~1e-13, not 0
    scale = np.maximum((x * x).sum(axis=-1), 1.0) * np.maximum((y * y).sum(axis=-1), 1.0)
    r = np.where(den * den <= 1e-20 * scale, np.nan, r)
    return np.clip(r, -1.0, 1.0)


def _residualize(r: np.ndarray, z: np.ndarray) -> np.ndarray:
    """Residuals of a row-wise least-squares fit ``r ~ a + b z`` (both (B, n))."""
    zc = z - z.mean(axis=-1, keepdims=True)
    rc = r - r.mean(axis=-1, keepdims=True)
    szz = (zc * zc).sum(axis=-1, keepdims=True)
    with np.errstate(invalid="ignore", divide="ignore"):
        b = np.where(szz > 0, (zc * rc).sum(axis=-1, keepdims=True) / szz, 0.0)
    return rc - b * zc


def _finite(a: np.ndarray) -> bool:
    return bool(np.all(np.isfinite(a)))


def _spearman_rows(x: np.ndarray, y: np.ndarray, axis: int = -1) -> np.ndarray:
    return _pearson_rows(_rank_rows(x), _rank_rows(y))


def _partial_spearman_rows(x: np.ndarray, y: np.ndarray, z: np.ndarray, axis: int = -1) -> np.ndarray:
    rz = _rank_rows(z)
    return _pearson_rows(_residualize(_rank_rows(x), rz), _residualize(_rank_rows(y), rz))


def spearman_stats(x: Sequence[float], y: Sequence[float], z: Sequence[float] | None = None,
                   n_bootstrap: int = 1000, seed: int = 0) -> dict[str, float]:
    """Spearman of ``x`` with ``y`` (+ p-value, bootstrap CI) and, given ``z``, partial Spearman | ``z``.

    The CIs come from :func:`rtlm_lab.bootstrap.percentile_ci` (``scipy.stats.bootstrap``, rows resampled
    with ``default_rng(seed)``: the same resamples for every feature of one analysis). Never raises: NaN
    when undefined.
    """
    x = np.asarray(x, dtype=float)
    y = np.asarray(y, dtype=float)
    n = len(x)
    out = {"spearman": math.nan, "ci_low": math.nan, "ci_high": math.nan, "p_value": math.nan,
           "partial_spearman": math.nan, "partial_ci_low": math.nan, "partial_ci_high": math.nan, "n": int(n)}
    if n < MIN_ROWS or len(y) != n or not (_finite(x) and _finite(y)):
        return out
    if np.ptp(x) == 0 or np.ptp(y) == 0:
        return out
    from scipy.stats import spearmanr

    res = spearmanr(x, y)
    out["spearman"] = float(res.statistic)
    out["p_value"] = float(res.pvalue)
    boot = bool(n_bootstrap and n_bootstrap > 0)
    if boot:
        out["ci_low"], out["ci_high"] = percentile_ci((x, y), _spearman_rows, n_bootstrap, seed, CI_LEVEL)
    if z is not None:
        z = np.asarray(z, dtype=float)
        if len(z) == n and _finite(z) and np.ptp(z) > 0:
            out["partial_spearman"] = float(_partial_spearman_rows(x, y, z))
            if boot:
                out["partial_ci_low"], out["partial_ci_high"] = percentile_ci(
                    (x, y, z), _partial_spearman_rows, n_bootstrap, seed, CI_LEVEL)
    return out


# ---------------------------------------------------------------------------------- other summaries
def output_by_quartile(df: pd.DataFrame, by: str = "total", target: str = TARGET) -> pd.DataFrame:
    """Output tokens per quartile of ``by`` (ties kept together): group, range of ``by``, n, mean, median, p90."""
    cols = ["quartile", f"{by}_min", f"{by}_max", "n", "mean", "median", "p90"]
    if by not in df.columns or target not in df.columns or len(df) == 0:
        return pd.DataFrame(columns=cols)
    g = quartile_groups(df[by])
    rows = []
    for q in sorted(g.dropna().unique()):
        m = (g == q).to_numpy()
        y = df.loc[m, target].astype(float)
        s = df.loc[m, by].astype(float)
        rows.append({"quartile": f"Q{int(q) + 1}", f"{by}_min": float(s.min()), f"{by}_max": float(s.max()),
                     "n": int(m.sum()), "mean": float(y.mean()), "median": float(y.median()),
                     "p90": float(y.quantile(0.9))})
    return pd.DataFrame(rows, columns=cols)


def quartile_groups(values: pd.Series) -> pd.Series:
    """0-based quartile of each value, cut on average ranks (ties share a group; may give < 4 groups)."""
    v = pd.Series(values, dtype=float).reset_index(drop=True)
    if len(v) == 0:
        return pd.Series([], dtype=float)
    ranks = v.rank(method="average")
    if ranks.nunique() < 2:
        return pd.Series(np.zeros(len(v)), dtype=float)
    groups = pd.qcut(ranks, 4, labels=False, duplicates="drop")
    # relabel consecutively (qcut with dropped edges keeps 0..k-1 already; this guards odd cases)
    codes = {c: i for i, c in enumerate(sorted(groups.dropna().unique()))}
    return groups.map(codes).astype(float)


def quartile_labels(df: pd.DataFrame, by: str = "total") -> pd.Series:
    """``"Q1 [0.00-0.05]"``-style label per row (for plots)."""
    g = quartile_groups(df[by])
    vals = df[by].astype(float).reset_index(drop=True)
    labels = {}
    for q in g.dropna().unique():
        s = vals[g == q]
        labels[q] = f"Q{int(q) + 1} [{s.min():.2f}-{s.max():.2f}]"
    return g.map(labels)


def latency_models(df: pd.DataFrame) -> dict[str, dict[str, float]]:
    """``e2e_s = intercept + s_per_token x n_output_tokens`` with R^2, per platform (plus n, mean TTFT)."""
    from rtlm_lab.profiling.summary import latency_fit

    if not {"e2e_s", TARGET} <= set(df.columns) or len(df) == 0:
        return {}
    plat = df["platform"].astype(str) if "platform" in df.columns else pd.Series(["?"] * len(df))
    out = {}
    for name, sub in df.groupby(plat.to_numpy(), sort=True):
        sub = sub[np.isfinite(sub["e2e_s"].astype(float)) & np.isfinite(sub[TARGET].astype(float))]
        fit = latency_fit(sub)
        fit["n"] = int(len(sub))
        fit["mean_ttft_s"] = float(sub["ttft_s"].mean()) if "ttft_s" in sub.columns and len(sub) else math.nan
        out[str(name)] = fit
    return out


def _label(df: pd.DataFrame, col: str, given: str | None) -> str:
    if given:
        return str(given)
    if col in df.columns and len(df):
        vals = sorted(df[col].dropna().astype(str).unique())
        if vals:
            return "+".join(vals)
    return "?"


# ----------------------------------------------------------------------------------------- analysis
def analyze_scores(scores: pd.DataFrame, n_bootstrap: int = 1000, seed: int = 0, lm: str | None = None,
                   platform: str | None = None) -> dict[str, Any]:
    """All statistics of :func:`analyze` from a frame that already has the score columns.

    Needs ``n_output_tokens``; uses whichever of :data:`FEATURES` exist (absent ones give NaN rows), and
    ``n_input_tokens`` as the control of the partial correlation. Returns a dict (see :func:`analyze`).
    """
    df = scores.reset_index(drop=True)
    lm_name, plat_name = _label(df, "lm", lm), _label(df, "platform", platform)
    n = int(len(df))
    y = df[TARGET].to_numpy(float) if TARGET in df.columns else np.full(n, np.nan)
    z = df[CONTROL].to_numpy(float) if CONTROL in df.columns else None
    per_type: dict[str, dict[str, float]] = {}
    for feat in FEATURES:
        if feat not in df.columns:
            per_type[feat] = spearman_stats([], [], n_bootstrap=0)
            per_type[feat]["n"] = n
            continue
        x = df[feat].to_numpy(float)
        per_type[feat] = spearman_stats(x, y, None if feat == CONTROL else z, n_bootstrap=n_bootstrap,
                                        seed=seed)
    table = pd.DataFrame([{"lm": lm_name, "platform": plat_name, "type": feat, **per_type[feat]}
                          for feat in FEATURES], columns=TABLE_COLUMNS)
    out_tokens = df[TARGET].astype(float) if TARGET in df.columns else pd.Series(dtype=float)
    return {
        "lm": lm_name,
        "platform": plat_name,
        "n": n,
        "n_bootstrap": int(n_bootstrap),
        "seed": int(seed),
        "ci_level": CI_LEVEL,
        "output_tokens": {
            "mean": float(out_tokens.mean()) if n else math.nan,
            "median": float(out_tokens.median()) if n else math.nan,
            "p90": float(out_tokens.quantile(0.9)) if n else math.nan,
            "max": float(out_tokens.max()) if n else math.nan,
        },
        "mean_scores": {k: float(df[k].mean()) if k in df.columns and n else math.nan
                        for k in (*UNCERTAINTY_TYPES, "total")},
        "spearman": per_type,
        "output_by_total_quartile": output_by_quartile(df, "total"),
        "latency_model": latency_models(df),
        "spearman_table": table,
    }


def analyze(profile_df: pd.DataFrame, n_bootstrap: int = 1000, seed: int = 0, lm: str | None = None,
            platform: str | None = None, scores: pd.DataFrame | None = None) -> dict[str, Any]:
    """Uncertainty vs output length for one profile (one LM x platform).

    Scores ``profile_df.text`` with :func:`quantify` (or takes precomputed ``scores`` from
    :func:`score_profile`) and returns a dict with ``lm, platform, n, n_bootstrap, seed, ci_level,
    output_tokens, mean_scores``, ``spearman`` (per feature: spearman, ci_low, ci_high, p_value,
    partial_spearman, partial_ci_low, partial_ci_high, n), ``output_by_total_quartile`` (DataFrame),
    ``latency_model`` (per platform) and ``spearman_table`` (DataFrame, :data:`TABLE_COLUMNS`), plus
    ``scores`` (the per-request frame). :func:`to_jsonable` turns it into JSON-safe data.
    """
    if scores is None:
        scores = score_profile(profile_df)
    result = analyze_scores(scores, n_bootstrap=n_bootstrap, seed=seed, lm=lm, platform=platform)
    result["scores"] = scores
    return result


# --------------------------------------------------------------------------------------------- I/O
def _clean(obj: Any) -> Any:
    if isinstance(obj, pd.DataFrame):
        return [_clean(r) for r in obj.to_dict(orient="records")]
    if isinstance(obj, Mapping):
        return {str(k): _clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_clean(v) for v in obj]
    if isinstance(obj, (np.integer,)):
        return int(obj)
    if isinstance(obj, (float, np.floating)):
        return float(obj) if math.isfinite(obj) else None
    if isinstance(obj, np.bool_):
        return bool(obj)
    if isinstance(obj, Path):
        return str(obj)
    return obj


def to_jsonable(result: Mapping[str, Any], drop: Sequence[str] = ("scores",)) -> dict[str, Any]:
    """JSON-safe copy of an :func:`analyze` result: tables become records, NaN becomes ``null``."""
    return _clean({k: v for k, v in result.items() if k not in drop})


def table_from_metrics(metrics: Mapping[str, Any]) -> pd.DataFrame:
    """The ``spearman_table`` of a ``metrics.json`` dict as a DataFrame (``null`` back to NaN)."""
    df = pd.DataFrame(metrics.get("spearman_table") or [], columns=TABLE_COLUMNS)
    for c in TABLE_COLUMNS:
        if c not in ("lm", "platform", "type"):
            df[c] = pd.to_numeric(df[c], errors="coerce").astype(float)
    return df


def find_profile(lm: str, platform: str, output_root: str | Path | None = None) -> Path | None:
    """The largest profile of ``lm`` on ``platform``: among ``<outputs>/profile/<lm>/<platform>/*/profile.parquet``
    and the committed ``outputs/reference/profiles/<lm>__<platform>.parquet``, the one with the most rows
    (ties: the newest); ``None`` when there is none. A quick 5-request run never hides the reference, and
    profiles of your own prompt files (``prompts-*`` run dirs, ``data=prompts``) are never picked: pass
    their path."""
    import pyarrow.parquet as pq

    from rtlm_lab.paths import outputs_dir, reference_dir

    root = Path(output_root) if output_root else outputs_dir()
    candidates = [p for p in (root / "profile" / lm / platform).glob("*/profile.parquet")
                  if not p.parent.name.startswith("prompts-")]
    ref = reference_dir() / "profiles" / f"{lm}__{platform}.parquet"
    if ref.is_file():
        candidates.append(ref)

    def size(p: Path) -> tuple[int, float]:
        try:
            return pq.ParquetFile(p).metadata.num_rows, p.stat().st_mtime
        except Exception:  # noqa: BLE001 - an unreadable file is never chosen
            return -1, 0.0

    ranked = sorted(candidates, key=size)
    return ranked[-1] if ranked and size(ranked[-1])[0] > 0 else None


def format_table(table: pd.DataFrame) -> str:
    """Plain-text Spearman table (for the console)."""
    lines = [f"{'type':16s} {'rho':>6s} {'95% CI':>16s} {'partial':>8s} {'p':>8s}"]
    for r in table.itertuples():
        ci = f"[{r.ci_low:+.2f}, {r.ci_high:+.2f}]" if np.isfinite(r.ci_low) else "n/a"
        lines.append(f"{r.type:16s} {r.spearman:+6.2f} {ci:>16s} {r.partial_spearman:+8.2f} {r.p_value:8.3g}")
    return "\n".join(lines)
