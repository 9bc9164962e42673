"""Run-time recalibration across LMs: fit RT-LM's regressor on LM A's profile, serve LM B's requests.

:func:`run_recalibration` fits a :class:`~rtlm_lab.regressor.LengthPredictor` on every request of the
*source* profile, then serves the *target* profile's requests **in profile order**. For each request the
adaptive copy predicts first and then calls ``update`` with the observed length; the frozen copy never
updates. Reference: a predictor of the same kind fitted on the target LM itself, scored out-of-fold
(5-fold ``GroupKFold`` by conversation), i.e. what one would get with B's own profile.

Curves (rolling window of ``window`` requests, predictions made before the update): MAE and Kendall tau of
the frozen, adaptive and B-fitted predictors. ``recovery_index``: the first request index after which the
adaptive rolling MAE stays within ``tolerance`` (10%) of the B-fitted predictor's rolling MAE *over the
same window* for the rest of the stream (same requests, so windows of hard requests do not count against
it); ``recovery_index_global`` compares with B-fitted's overall MAE instead (stricter on noisy streams).
Both are ``0``-based request counts, ``null`` when the stream ends before recovery.

CLI (:func:`recalibrate`, ``conf/recalibration.yaml``)::

    rtlm-recalibration source_lm=gemma3_270m target_lm=smollm2_135m platform=cuda

writes ``outputs/recalibration/<source>__to__<target>__<platform>/recalibration.json`` + ``.png/.svg``.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import pandas as pd

from rtlm_lab.errors import UserError
from rtlm_lab.metrics import conversation_ids, kendall
from rtlm_lab.regressor.predictor import LengthPredictor

TARGET = "n_output_tokens"


def _rolling(values: np.ndarray, window: int) -> np.ndarray:
    s = pd.Series(values, dtype=float)
    return s.rolling(window, min_periods=window).mean().to_numpy()


def _rolling_tau(pred: np.ndarray, y: np.ndarray, window: int) -> np.ndarray:
    out = np.full(len(y), np.nan)
    for i in range(window - 1, len(y)):
        out[i] = kendall(pred[i - window + 1:i + 1], y[i - window + 1:i + 1])
    return out


def recovery_index(rolling_mae: np.ndarray, reference_mae, tolerance: float = 0.10) -> int | None:
    """First index from which ``rolling_mae`` stays <= (1 + tolerance) x reference (a number or a curve of
    the same length; NaN = not yet known)."""
    ok = np.asarray(rolling_mae) <= (1 + tolerance) * np.asarray(reference_mae, dtype=float)
    ok &= np.isfinite(rolling_mae)
    if not ok.any() or not ok[-1]:
        return None
    bad = np.flatnonzero(~ok)
    return int(bad[-1] + 1) if len(bad) else 0


def _clean_df(df: pd.DataFrame) -> pd.DataFrame:
    if "text" not in df.columns or TARGET not in df.columns:
        raise UserError(f"not a profile: needs columns text and {TARGET}")
    return df[df[TARGET].notna()].reset_index(drop=True)


def run_recalibration(source_df: pd.DataFrame, target_df: pd.DataFrame, regressor: Mapping[str, Any] | None = None,
                      window: int = 50, tolerance: float = 0.10, seed: int = 0) -> dict[str, Any]:
    """See the module doc. Returns summary numbers and a ``curves`` DataFrame (one row per request)."""
    from sklearn.model_selection import GroupKFold

    src, tgt = _clean_df(source_df), _clean_df(target_df)
    window = int(max(2, min(window, len(tgt))))
    params = {k: v for k, v in dict(regressor or {}).items() if k not in ("name", "use_prefill")}
    params.setdefault("random_state", seed)
    base = LengthPredictor(**params)
    Xs = base.featurize(src["text"].fillna("").astype(str).tolist())
    Xt = base.featurize(tgt["text"].fillna("").astype(str).tolist())
    ys, yt = src[TARGET].to_numpy(float), tgt[TARGET].to_numpy(float)
    base.fit(None, ys, X=Xs)

    frozen = base.predict_from_features(Xt)
    adaptive = base.copy()
    online = np.empty(len(yt))
    for i in range(len(yt)):
        online[i] = adaptive.predict_from_features(Xt[i:i + 1])[0]
        adaptive.update(None, yt[i], X=Xt[i:i + 1])

    groups = conversation_ids(tgt)
    n_splits = int(min(5, len(set(groups))))
    own = np.empty(len(yt))
    if n_splits >= 2:
        for tr, te in GroupKFold(n_splits=n_splits).split(Xt, yt, groups):
            own[te] = LengthPredictor(**params).fit(None, yt[tr], X=Xt[tr]).predict_from_features(Xt[te])
    else:
        own[:] = np.mean(yt)
    ref_mae = float(np.mean(np.abs(own - yt)))
    curves = pd.DataFrame({
        "request": np.arange(len(yt)), "true": yt, "frozen": frozen, "adaptive": online, "target_fitted": own,
        "rolling_mae_frozen": _rolling(np.abs(frozen - yt), window),
        "rolling_mae_adaptive": _rolling(np.abs(online - yt), window),
        "rolling_mae_target_fitted": _rolling(np.abs(own - yt), window),
        "rolling_tau_frozen": _rolling_tau(frozen, yt, window),
        "rolling_tau_adaptive": _rolling_tau(online, yt, window),
    })
    rec = recovery_index(curves["rolling_mae_adaptive"].to_numpy(), curves["rolling_mae_target_fitted"].to_numpy(),
                         tolerance)
    rec_global = recovery_index(curves["rolling_mae_adaptive"].to_numpy(), ref_mae, tolerance)
    return {
        "source": str(src["lm"].iloc[0]) if "lm" in src else "source",
        "target": str(tgt["lm"].iloc[0]) if "lm" in tgt else "target",
        "platform": str(tgt["platform"].iloc[0]) if "platform" in tgt else "unknown",
        "regressor": base.get_params(), "window": window, "tolerance": tolerance,
        "n_source": int(len(ys)), "n_target": int(len(yt)),
        "mean_len_source": float(ys.mean()), "mean_len_target": float(yt.mean()),
        "mae_frozen": float(np.mean(np.abs(frozen - yt))), "mae_adaptive": float(np.mean(np.abs(online - yt))),
        "mae_target_fitted": ref_mae,
        "kendall_tau_frozen": kendall(frozen, yt), "kendall_tau_adaptive": kendall(online, yt),
        "kendall_tau_target_fitted": kendall(own, yt),
        "recovery_index": rec, "recovery_index_global": rec_global, "curves": curves,
    }


def plot_recalibration(result: Mapping[str, Any], out_dir=None, stem: str = "recalibration"):
    import matplotlib.pyplot as plt

    from rtlm_lab.viz.common import save_figure

    c = result["curves"]
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(11, 4))
    a1.plot(c["request"], c["rolling_mae_frozen"], label="frozen (fit on source)", color="tab:grey")
    a1.plot(c["request"], c["rolling_mae_adaptive"], label="adaptive (update per request)", color="tab:red")
    ref = result["mae_target_fitted"]
    a1.plot(c["request"], c["rolling_mae_target_fitted"], color="tab:blue", label="fitted on target (out-of-fold)")
    a1.axhline(ref, color="tab:blue", ls=":", lw=0.8)
    if result["recovery_index"] is not None:
        a1.axvline(result["recovery_index"], color="tab:red", ls=":", lw=1)
    a1.set_xlabel("requests served")
    a1.set_ylabel(f"rolling MAE (tokens, window {result['window']})")
    a1.legend(fontsize=8)
    a2.plot(c["request"], c["rolling_tau_frozen"], color="tab:grey", label="frozen")
    a2.plot(c["request"], c["rolling_tau_adaptive"], color="tab:red", label="adaptive")
    a2.axhline(result["kendall_tau_target_fitted"] if math.isfinite(result["kendall_tau_target_fitted"]) else 0,
               color="tab:blue", ls="--", label="fitted on target")
    a2.set_xlabel("requests served")
    a2.set_ylabel("rolling Kendall tau")
    a2.legend(fontsize=8)
    fig.suptitle(f"{result['source']} -> {result['target']} on {result['platform']}: recovery after "
                 f"{result['recovery_index']} requests")
    fig.tight_layout()
    if out_dir is not None:
        save_figure(fig, out_dir, stem)
    plt.close(fig)
    return fig


def to_jsonable(result: Mapping[str, Any]) -> dict[str, Any]:
    from rtlm_lab.regressor.evaluate import _clean

    out = {k: v for k, v in result.items() if k != "curves"}
    out["curves"] = result["curves"].to_dict(orient="list")
    return _clean(out)


def _profile_path(lm: str, platform: str) -> Path:
    from rtlm_lab.paths import reference_dir

    p = reference_dir() / "profiles" / f"{lm}__{platform}.parquet"
    if not p.is_file():
        raise UserError(f"no profile at {p}; run `rtlm-profile lm={lm} platform={platform}` first")
    return p


KINDS = ("ridge", "hgb", "quantile", "mlp")


def recalibrate(source: str, target: str, platform: str = "cuda", kind: str = "ridge", window: int = 50,
                tolerance: float = 0.10, source_profile: str | Path | None = None,
                target_profile: str | Path | None = None, out: str | Path | None = None,
                config: Any = None) -> dict[str, Any]:
    """:func:`run_recalibration` on two profiles (default: the reference profiles of ``source`` / ``target`` on
    ``platform``), written to ``out`` (``recalibration.json`` + figure); ``config`` goes into the provenance."""
    import matplotlib

    matplotlib.use("Agg")
    from rtlm_lab.io import provenance, sha256_file, write_json_atomic
    from rtlm_lab.paths import outputs_dir

    if kind not in KINDS:
        raise UserError(f"unknown kind {kind!r}; choose one of: {', '.join(KINDS)}")
    sp = Path(source_profile) if source_profile else _profile_path(source, platform)
    tp = Path(target_profile) if target_profile else _profile_path(target, platform)
    for p in (sp, tp):
        if not p.is_file():
            raise UserError(f"no profile at {p}")
    res = run_recalibration(pd.read_parquet(sp), pd.read_parquet(tp), {"kind": kind},
                            window=window, tolerance=tolerance)
    out = Path(out) if out else outputs_dir() / "recalibration" / f"{source}__to__{target}__{platform}"
    js = to_jsonable(res)
    js["provenance"] = provenance(config, source_profile=str(sp), source_sha256=sha256_file(sp),
                                  target_profile=str(tp), target_sha256=sha256_file(tp))
    write_json_atomic(out / "recalibration.json", js)
    plot_recalibration(res, out)
    print(f"{res['source']} -> {res['target']} ({res['platform']}, {kind}): MAE frozen "
          f"{res['mae_frozen']:.2f}, adaptive {res['mae_adaptive']:.2f}, target-fitted "
          f"{res['mae_target_fitted']:.2f}; tau frozen {res['kendall_tau_frozen']:.3f}, adaptive "
          f"{res['kendall_tau_adaptive']:.3f}; recovery after {res['recovery_index']} requests (vs overall "
          f"target-fitted MAE: {res['recovery_index_global']})")
    print(f"wrote {out / 'recalibration.json'}")
    return js
