"""Model-side vs input-side uncertainty: which one tracks an LM's reply length once input length is out?

*Input-side*: the six linguistic uncertainty types of :func:`rtlm_lab.uncertainty.quantify` (+ their weighted
``total``), computed from the request text alone. *Model-side*: what the served LM itself says at the end of its
prefill (:func:`rtlm_lab.lm.states.extract_states`): the next-token entropy (nats, ``prefill_entropy``)
and the log probability of ending the turn right away (``log_eos_prob``). ``log_input_tokens`` (the profile's
``n_input_tokens``) is the baseline row.

:func:`model_input_table` gives, per measure, Spearman rho with ``n_output_tokens`` and the **partial** Spearman
controlling for ``log(n_input_tokens)``: every column is rank-transformed (``scipy.stats.rankdata``, average
ties), the ranks of the measure and of output length are each regressed on ``[1, rank(control)]``
(``numpy.linalg.lstsq``) and the residuals correlated (Pearson). A measure that is a pure (monotone) function
of input length has partial ~0. 95% percentile CIs come from a **cluster bootstrap**: conversations
(:func:`rtlm_lab.metrics.conversation_ids`) are resampled with replacement, seeded, the same
resamples for every measure; a resample where a column is constant is skipped for that measure.

:func:`model_vs_input` does one LM's profile (states cached under ``data/cache/lmstate/`` with the same key as
``rtlm-train-regressor regressor.use_prefill=true``: ``<lm>__<platform>``, profile sha256, layers ``mid,-1``,
step 0); :func:`build_reference` writes ``outputs/reference/uncertainty/model_vs_input.{csv,md,json}`` and the
heatmap (:func:`plot_model_vs_input`) for several LMs (``rtlm-reference target=model_vs_input``). Greedy reply
lengths do not depend on the platform, so the reference uses each LM's cpu profile (states computed on the CPU).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import pandas as pd

from rtlm_lab.errors import UserError
from rtlm_lab.uncertainty.quantifier import UNCERTAINTY_TYPES
from rtlm_lab.viz.common import column_label, finish, pyplot, signed_heatmap

MODEL_SIDE: tuple[str, ...] = ("prefill_entropy", "log_eos_prob")
INPUT_SIDE: tuple[str, ...] = (*UNCERTAINTY_TYPES, "total")
BASELINE = "log_input_tokens"
MEASURES: tuple[str, ...] = (*INPUT_SIDE, *MODEL_SIDE, BASELINE)
TARGET = "n_output_tokens"
COLUMNS = ["lm", "platform", "side", "measure", "spearman", "ci_low", "ci_high", "partial_spearman",
           "partial_ci_low", "partial_ci_high", "n", "n_groups", "n_bootstrap"]
REFERENCE_LMS = ("dialogpt_ccc", "blenderbot_ccc", "godel_ccc", "smollm2_135m", "gemma3_270m")
STATE_LAYERS: tuple = ("mid", -1)   # the layers of the shared lmstate cache (only the scalars are used here)
CI_LEVEL = 0.95


def side_of(measure: str) -> str:
    return "model" if measure in MODEL_SIDE else "baseline" if measure == BASELINE else "input"


# ------------------------------------------------------------------------------------------ statistics
def _ranks(a: np.ndarray) -> np.ndarray:
    from scipy.stats import rankdata

    return rankdata(a, axis=0, method="average")


def _corr_cols(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Pearson of each column of ``a`` (n, m) with ``b`` (n,); NaN for a (numerically) constant column."""
    ac = a - a.mean(0)
    bc = b - b.mean()
    den = np.sqrt((ac * ac).sum(0) * (bc * bc).sum())
    scale = np.sqrt(np.maximum((a * a).sum(0), 1.0) * max(float((b * b).sum()), 1.0))
    with np.errstate(invalid="ignore", divide="ignore"):
        r = (ac * bc[:, None]).sum(0) / den
    return np.clip(np.where(den <= 1e-9 * scale, np.nan, r), -1.0, 1.0)


def rank_stats(X: np.ndarray, y: np.ndarray, z: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(spearman, partial)`` of each column of ``X`` (n, m) with ``y``; partial controls for ``z``.

    Spearman = Pearson of average ranks. Partial = Pearson of the residuals of ``rank(x)`` and ``rank(y)``
    after a least-squares fit on ``[1, rank(z)]``."""
    X = np.asarray(X, dtype=float).reshape(len(y), -1)
    rx, ry, rz = _ranks(X), _ranks(np.asarray(y, float)), _ranks(np.asarray(z, float))
    rho = _corr_cols(rx, ry)
    A = np.column_stack([np.ones(len(rz)), rz])
    coef, *_ = np.linalg.lstsq(A, np.column_stack([rx, ry]), rcond=None)
    res = np.column_stack([rx, ry]) - A @ coef
    partial = _corr_cols(res[:, :-1], res[:, -1]) if np.ptp(rz) > 0 else np.full(X.shape[1], np.nan)
    return rho, partial


def partial_spearman(x: Sequence[float], y: Sequence[float], z: Sequence[float]) -> float:
    """Partial Spearman of ``x`` and ``y`` given ``z`` (see :func:`rank_stats`)."""
    return float(rank_stats(np.asarray(x, float)[:, None], np.asarray(y, float), np.asarray(z, float))[1][0])


def cluster_bootstrap(stat: Callable[[np.ndarray], np.ndarray], n: int, groups: Sequence[Any] | None,
                      n_resamples: int, seed: int = 0) -> np.ndarray:
    """``(n_resamples, m)`` values of ``stat(row_index)`` over resamples of the groups (conversations) with
    replacement (each drawn group brings all its rows); ``groups=None``: rows. Seeded ``default_rng``."""
    rng = np.random.default_rng(seed)
    g = np.arange(n) if groups is None else pd.factorize(np.asarray(groups))[0]
    members = [np.flatnonzero(g == k) for k in range(int(g.max()) + 1)] if n else []
    out = []
    for _ in range(int(n_resamples)):
        pick = rng.integers(0, len(members), len(members))
        out.append(stat(np.concatenate([members[k] for k in pick])))
    return np.asarray(out, dtype=float)


def _percentile(dist: np.ndarray, level: float = CI_LEVEL) -> tuple[np.ndarray, np.ndarray]:
    """Per column; NaN where fewer than half (or two) resamples are usable."""
    a = (1 - level) / 2
    lo, hi = [], []
    for col in dist.T:
        ok = col[np.isfinite(col)]
        if len(ok) < max(2, 0.5 * len(col)):
            lo.append(math.nan), hi.append(math.nan)
        else:
            q = np.quantile(ok, [a, 1 - a])
            lo.append(float(q[0])), hi.append(float(q[1]))
    return np.asarray(lo), np.asarray(hi)


def model_input_table(frame: pd.DataFrame, n_bootstrap: int = 1000, seed: int = 0, lm: str = "?",
                      platform: str = "?", groups: Sequence[Any] | None = None,
                      measures: Sequence[str] = MEASURES, target: str = TARGET) -> pd.DataFrame:
    """The :data:`COLUMNS` table for the measures of ``frame`` against ``target`` (default :data:`TARGET`;
    needs it and ``n_input_tokens``)."""
    for c in (target, "n_input_tokens"):
        if c not in frame.columns:
            raise UserError(f"model_input_table needs a {c!r} column")
    f = frame.reset_index(drop=True)
    if BASELINE not in f.columns:
        f = f.assign(**{BASELINE: np.log(f["n_input_tokens"].astype(float).clip(lower=1))})
    measures = [m for m in measures if m in f.columns]
    X = f[measures].to_numpy(float)
    y = f[target].to_numpy(float)
    z = f[BASELINE].to_numpy(float)
    n = len(f)
    rho, par = rank_stats(X, y, z)
    base = [i for i, m in enumerate(measures) if m == BASELINE]
    par[base] = np.nan  # partial of the control itself is undefined
    nb = int(n_bootstrap or 0)
    nan = np.full(len(measures), np.nan)
    lo, hi, plo, phi = nan, nan, nan, nan
    if nb > 0 and n >= 5:
        dist = cluster_bootstrap(lambda idx: np.concatenate(rank_stats(X[idx], y[idx], z[idx])), n, groups, nb, seed)
        m = len(measures)
        lo, hi = _percentile(dist[:, :m])
        plo, phi = _percentile(dist[:, m:])
        plo[base], phi[base] = np.nan, np.nan
    n_groups = int(len(set(groups))) if groups is not None else n
    rows = [{"lm": lm, "platform": platform, "side": side_of(mname), "measure": mname, "spearman": rho[i],
             "ci_low": lo[i], "ci_high": hi[i], "partial_spearman": par[i], "partial_ci_low": plo[i],
             "partial_ci_high": phi[i], "n": n, "n_groups": n_groups, "n_bootstrap": nb}
            for i, mname in enumerate(measures)]
    return pd.DataFrame(rows, columns=COLUMNS)


# ------------------------------------------------------------------------------------ per-request frame
def measure_frame(profile_df: pd.DataFrame, states, scores: pd.DataFrame | None = None) -> pd.DataFrame:
    """One row per request: ``request_id``, ``n_input_tokens``, ``n_output_tokens``, the input-side scores
    (``quantify``, or the given ``scores`` frame in the same row order), ``prefill_entropy``, ``log_eos_prob``
    (absent when ``states`` is ``None``), ``log_input_tokens``."""
    df = profile_df.reset_index(drop=True)
    if states is not None and len(states) != len(df):
        raise UserError(f"{len(states)} LM states for {len(df)} profile rows")
    if scores is None:
        from rtlm_lab.uncertainty import quantify

        scores = quantify(df["text"].fillna("").astype(str).tolist())
    keep = [c for c in ("request_id", "conv_id", "n_input_tokens", TARGET) if c in df.columns]
    out = pd.concat([df[keep], scores[list(INPUT_SIDE)].reset_index(drop=True)], axis=1)
    if states is not None:
        out["prefill_entropy"] = np.asarray(states.entropy, dtype=float)
        out["log_eos_prob"] = np.log(np.clip(np.asarray(states.eos_prob, dtype=float), 1e-12, 1.0))
    out[BASELINE] = np.log(out["n_input_tokens"].astype(float).clip(lower=1))
    return out


def profile_states(profile_df: pd.DataFrame, profile_path: str | Path, lm_name: str, platform_name: str,
                   loader: Callable[[], Any] | Any, batch_size: int = 16):
    """The prefill states of a profile's rows, from the shared ``data/cache/lmstate`` cache (``loader``: a
    ``ChatLM`` or a zero-argument callable giving one, only called on a cache miss)."""
    from rtlm_lab.io import sha256_file
    from rtlm_lab.lm.states import cached_states

    return cached_states(loader, profile_df, sha256_file(profile_path), f"{lm_name}__{platform_name}",
                         STATE_LAYERS, 0, None, int(batch_size))


def _default_loader(lm_name: str, platform_name: str):
    def load():
        from omegaconf import OmegaConf

        from rtlm_lab.lm import load_lm
        from rtlm_lab.lm.loader import lm_config
        from rtlm_lab.paths import ROOT

        conf = ROOT / "conf" / "platform" / f"{platform_name}.yaml"
        plat = (OmegaConf.to_container(OmegaConf.load(conf), resolve=True) if conf.is_file()
                else {"name": platform_name, "device": platform_name, "dtype": "float32"})
        return load_lm(lm_config(lm_name), plat)

    return load


def model_vs_input(profile_path: str | Path, lm: str | None = None, platform: str | None = None,
                   loader: Callable[[], Any] | Any = None, n_bootstrap: int = 1000, seed: int = 0,
                   batch_size: int = 16, scores: pd.DataFrame | None = None) -> dict[str, Any]:
    """One LM's table: ``{"table", "frame", "lm", "platform", "profile", "n"}``. ``lm`` / ``platform``
    default to the profile's columns; ``loader`` to ``load_lm(lm, platform)`` (a ``conf/lm`` name)."""
    from rtlm_lab.metrics import conversation_ids

    profile_path = Path(profile_path)
    if not profile_path.is_file():
        raise UserError(f"no profile at {profile_path}")
    df = pd.read_parquet(profile_path)
    if len(df) == 0 or "text" not in df.columns or TARGET not in df.columns:
        raise UserError(f"{profile_path} is not a profile with text and {TARGET}")
    lm = lm or (str(df["lm"].iloc[0]) if "lm" in df.columns else "?")
    platform = platform or (str(df["platform"].iloc[0]) if "platform" in df.columns else "cpu")
    states = profile_states(df, profile_path, lm, platform, loader or _default_loader(lm, platform), batch_size)
    frame = measure_frame(df, states, scores)
    groups = conversation_ids(df)
    table = model_input_table(frame, n_bootstrap=n_bootstrap, seed=seed, lm=lm, platform=platform, groups=groups)
    return {"table": table, "frame": frame, "lm": lm, "platform": platform, "profile": profile_path, "n": len(df)}


# --------------------------------------------------------------------------------------------- figure
def plot_model_vs_input(table: pd.DataFrame, out_dir: str | Path | None = None, title: str = "",
                        stem: str = "model_vs_input", by: str | None = None,
                        label: str = "partial ρ with output tokens | log input tokens"):
    """Measure x LM heatmap of the partial Spearman (| log input tokens) of input-side scores and model-side
    prefill measures with output tokens (:func:`model_input_table`); the ``log_input_tokens`` row shows its
    plain rho. ``*`` = the cluster-bootstrap 95% CI excludes 0. ``by``: the table column whose values are the
    heatmap's columns (default: lm, or lm / platform); ``label``: the colour bar's."""
    plt = pyplot()
    t = table.copy()
    t["column"] = column_label(t) if by is None else t[by].astype(str)
    base = t["measure"] == BASELINE
    t["value"] = np.where(base, t["spearman"], t["partial_spearman"])
    t["lo"] = np.where(base, t["ci_low"], t["partial_ci_low"])
    t["hi"] = np.where(base, t["ci_high"], t["partial_ci_high"])
    rows = [m for m in MEASURES if m in set(t["measure"])]
    cols = list(dict.fromkeys(t["column"]))

    def grid(v):
        g = t.pivot_table(index="measure", columns="column", values=v, aggfunc="first", dropna=False)
        return g.reindex(index=rows, columns=cols).astype(float)

    val, lo, hi = grid("value"), grid("lo"), grid("hi")
    fig, ax = signed_heatmap(plt, val, lo, hi, label, 2.8, 1.8)
    labels = {"prefill_entropy": "LM: prefill entropy", "log_eos_prob": "LM: log P(end of turn)",
              BASELINE: "log input tokens (ρ)"}
    ax.set_yticklabels([labels.get(m, m) for m in rows], rotation=0)
    n_input = sum(1 for m in rows if m not in labels)
    if 0 < n_input < len(rows):
        ax.axhline(n_input, color="k", lw=1.5)
    ax.set_xlabel("")
    ax.set_ylabel("")
    ax.set_title(title or "Input-side vs model-side uncertainty: partial ρ with output tokens\n"
                          "controlling for input length (* = conversation-bootstrap 95% CI excludes 0)", fontsize=10)
    return finish(fig, out_dir, stem)


# ------------------------------------------------------------------------------------------- reference
def reference_path() -> Path:
    from rtlm_lab.paths import reference_dir

    return reference_dir() / "uncertainty" / "model_vs_input.csv"


def reference_table(path: str | Path | None = None) -> pd.DataFrame:
    """The committed table (empty :data:`COLUMNS` frame when absent)."""
    p = Path(path) if path else reference_path()
    return pd.read_csv(p) if p.is_file() else pd.DataFrame(columns=COLUMNS)


def with_reference(table: pd.DataFrame, path: str | Path | None = None) -> pd.DataFrame:
    """``table`` plus the committed rows of the other LMs (this run's rows win)."""
    ref = reference_table(path)
    if len(table):
        ref = ref[~ref["lm"].isin(set(table["lm"]))]
    parts = [t for t in (ref, table) if len(t)]
    return pd.concat(parts, ignore_index=True) if parts else pd.DataFrame(columns=COLUMNS)


def text_grid(table: pd.DataFrame, by: str = "lm") -> pd.DataFrame:
    """Measures (rows, with their ``side``) x LMs (or x the values of column ``by``): ``partial [CI] (rho)`` per
    cell as text; a measure without a partial (the baseline) shows ``(rho ..)``."""
    cols = list(dict.fromkeys(table[by]))
    rows = []
    for m in dict.fromkeys(table["measure"]):
        row = {"measure": m, "side": side_of(m)}
        for c in cols:
            r = table[(table[by] == c) & (table["measure"] == m)]
            if r.empty:
                row[str(c)] = ""
                continue
            r = r.iloc[0]
            if np.isfinite(r["partial_spearman"]):
                ci = (f" [{r['partial_ci_low']:+.2f}, {r['partial_ci_high']:+.2f}]"
                      if np.isfinite(r["partial_ci_low"]) else "")
                row[str(c)] = f"{r['partial_spearman']:+.2f}{ci} (rho {r['spearman']:+.2f})"
            else:
                row[str(c)] = f"(rho {r['spearman']:+.2f})"
        rows.append(row)
    return pd.DataFrame(rows, columns=["measure", "side", *map(str, cols)]).set_index("measure")


def to_markdown(table: pd.DataFrame, by: str = "lm") -> str:
    """:func:`text_grid` as a Markdown table."""
    g = text_grid(table, by)
    lines = ["| measure | " + " | ".join(g.columns) + " |", "|---|" + "---|" * len(g.columns)]
    lines += [f"| {m} | " + " | ".join(r) + " |" for m, r in zip(g.index, g.to_numpy().tolist())]
    return "\n".join(lines)


def build_reference(lms: Sequence[str] = REFERENCE_LMS, platform: str = "cpu", out_dir: str | Path | None = None,
                    n_bootstrap: int = 1000, seed: int = 0, batch_size: int = 16,
                    command: str | None = None, verify_states: bool = False) -> pd.DataFrame:
    """Write ``model_vs_input.csv`` / ``.md`` / ``.provenance.json`` and the heatmap into ``out_dir``
    (default ``outputs/reference/uncertainty``) for each LM's committed ``<lm>__<platform>`` profile.
    ``verify_states``: where the states came from the cache, load the LM, recompute them
    (:func:`~rtlm_lab.lm.states.extract_states`) and record the largest differences in the provenance."""
    import time

    from rtlm_lab.io import provenance, sha256_file, write_json_atomic, write_text_atomic
    from rtlm_lab.paths import reference_dir

    out_dir = Path(out_dir) if out_dir else reference_dir() / "uncertainty"
    tables, sources = [], []
    for lm in lms:
        prof = reference_dir() / "profiles" / f"{lm}__{platform}.parquet"
        from rtlm_lab.lm.states import cache_path

        cached = cache_path(f"{lm}__{platform}", sha256_file(prof), STATE_LAYERS, 0)
        was_cached = cached.is_file()
        t0 = time.perf_counter()
        res = model_vs_input(prof, lm=lm, platform=platform, n_bootstrap=n_bootstrap, seed=seed,
                             batch_size=batch_size)
        tables.append(res["table"])
        sources.append({"lm": lm, "platform": platform, "profile": str(prof.relative_to(reference_dir().parent.parent)),
                        "profile_sha256": sha256_file(prof), "n": res["n"],
                        "n_conversations": int(res["table"]["n_groups"].iloc[0]),
                        "seconds": round(time.perf_counter() - t0, 1), "states_cache": cached.name,
                        "states_from": "cache (data/cache/lmstate, written by an earlier prefill pass)"
                        if was_cached else "computed now (extract_states)"})
        if verify_states and was_cached:
            from rtlm_lab.lm.states import extract_states

            df = pd.read_parquet(prof)
            t1 = time.perf_counter()
            st = extract_states(_default_loader(lm, platform)(), df["text"].fillna("").astype(str).tolist(),
                                df["context"].fillna("").astype(str).tolist() if "context" in df else None,
                                layers=STATE_LAYERS, batch_size=batch_size)
            fr = res["frame"]
            sources[-1]["recomputed"] = {
                "seconds": round(time.perf_counter() - t1, 1),
                "max_abs_diff_prefill_entropy": float(np.max(np.abs(st.entropy - fr["prefill_entropy"]))),
                "max_abs_diff_log_eos_prob": float(np.max(np.abs(
                    np.log(np.clip(st.eos_prob.astype(float), 1e-12, 1.0)) - fr["log_eos_prob"])))}
        print(f"{lm}: {res['n']} requests in {sources[-1]['seconds']} s", flush=True)
    table = pd.concat(tables, ignore_index=True)
    out_dir.mkdir(parents=True, exist_ok=True)
    write_text_atomic(out_dir / "model_vs_input.csv", table.to_csv(index=False, float_format="%.4f"))
    md = ("# Model-side vs input-side uncertainty vs output length\n\n"
          "Partial Spearman with output tokens controlling for log input tokens, cluster-bootstrap 95% CI over "
          f"conversations ({n_bootstrap} resamples, seed {seed}); Spearman rho in parentheses. "
          "Made by `rtlm_lab.uncertainty.modelside.build_reference`; see docs/uncertainty.md.\n\n"
          + to_markdown(table) + "\n")
    write_text_atomic(out_dir / "model_vs_input.md", md)

    import matplotlib

    matplotlib.use("Agg")
    plot_model_vs_input(table, out_dir)
    write_json_atomic(out_dir / "model_vs_input.provenance.json",
                      provenance({"lms": list(lms), "platform": platform, "n_bootstrap": int(n_bootstrap),
                                  "seed": int(seed), "batch_size": int(batch_size), "layers": list(STATE_LAYERS),
                                  "verify_states": bool(verify_states)},
                                 command=command or "rtlm-reference target=model_vs_input", sources=sources,
                                 files=["model_vs_input.csv", "model_vs_input.md", "model_vs_input.png",
                                        "model_vs_input.svg"]))
    return table
