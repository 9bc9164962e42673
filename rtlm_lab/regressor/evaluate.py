"""The method comparison behind ``rtlm-train-regressor``: RT-LM's regressor vs baselines, on held-out
conversations of one real profile.

:func:`compare` splits the profile by conversation (``GroupShuffleSplit`` on the conversation prefix of
``request_id``, i.e. everything before its last ``-``; seeded), computes the features once, fits
``rtlm_<kind>`` (:class:`~rtlm_lab.regressor.LengthPredictor`) and the baselines of
:mod:`rtlm_lab.regressor.baselines` on the training conversations and scores every method on the test
conversations with :func:`~rtlm_lab.metrics.score` (table columns :data:`METRIC_COLUMNS`; the
metrics and the split are in :mod:`rtlm_lab.metrics`, shared with the uncertainty and scheduler code):

* ``mae``: mean absolute error in output tokens (NaN for a rank-only method, whose model says ``rank_only``:
  ``ltr_minilm``, ``finetuned_minilm_rank``);
* ``spearman``, ``kendall_tau`` (tau-b) with a **bootstrap 95% percentile CI** (``tau_ci_low/high``:
  ``scipy.stats.bootstrap`` over test rows resampled with replacement, seeded, same resamples for every method);
* ``pairwise_acc``: share of test pairs with different true lengths whose order the method gets right
  (a tie in the prediction counts one half; so ``constant`` scores 0.5);
* ``bucket_acc``: short / medium / long accuracy, buckets cut at the tertiles of the *training* lengths
  (``y < t1``, ``t1 <= y < t2``, ``y >= t2``; with heavily tied lengths a bucket can be empty). A rank-only
  score is cut at its own training quantiles matching the buckets' training shares;
* ``us_per_prompt``: wall-clock microseconds per prompt on this machine's CPU for features + predict,
  over one batch of ``timing_n`` test prompts (embedding included for MiniLM methods; NaN for ``oracle``).

With ``finetuned=`` (``rtlm-train-regressor``'s ``finetuned_proxy``), two stronger proxies join the table:
``finetuned_minilm`` (MiniLM fine-tuned as a length regressor, as SSJF fine-tunes BERT) and
``finetuned_minilm_rank`` (fine-tuned with a pairwise ranking loss, as vLLM-LTR fine-tunes OPT-125M; rank only);
their ``us_per_prompt`` is timed on the device they were trained on.

``oracle`` predicts the true length: the ceiling of every metric.
"""

from __future__ import annotations

import math
import time
from typing import Any, Mapping

import numpy as np
import pandas as pd

from rtlm_lab.errors import UserError
# the shared metrics and splits (rtlm_lab.metrics), re-exported here under their old names
from rtlm_lab.metrics import (  # noqa: F401
    bootstrap_index, bucket_edges, buckets, conversation_ids, pairwise_accuracy, score, split_by_conversation,
)
from rtlm_lab.metrics import kendall as _kendall  # noqa: F401
from rtlm_lab.metrics import spearman as _spearman  # noqa: F401
from rtlm_lab.regressor import features as F
from rtlm_lab.regressor.baselines import EMBEDDING_METHODS, make_baselines, make_finetuned
from rtlm_lab.regressor.predictor import LengthPredictor

METRIC_COLUMNS = ["method", "mae", "spearman", "kendall_tau", "tau_ci_low", "tau_ci_high", "pairwise_acc",
                  "bucket_acc", "us_per_prompt", "n_test"]
TARGET = "n_output_tokens"
MIN_ROWS = 10


def _timed(fn, *args) -> float:
    t0 = time.perf_counter()
    fn(*args)
    return time.perf_counter() - t0


# -------------------------------------------------------------------------------------------- compare
def usable_rows(df: pd.DataFrame) -> pd.DataFrame:
    """The rows :func:`compare` uses: those with a measured output length."""
    return df[df[TARGET].notna()].reset_index(drop=True)


def compare(profile_df: pd.DataFrame, regressor: Mapping[str, Any] | None = None, test_size: float = 0.3,
            seed: int = 0, n_bootstrap: int = 1000, timing_n: int = 64, embedding_baselines: bool = True,
            E: np.ndarray | None = None, extra_train: pd.DataFrame | None = None, bootstrap_by: str = "row",
            prefill: Mapping[str, Any] | None = None, finetuned: Mapping[str, Any] | None = None
            ) -> dict[str, Any]:
    """Fit and score every method on one profile; see the module doc.

    ``finetuned``: the fine-tuned MiniLM baselines' settings (:func:`~rtlm_lab.regressor.baselines.make_finetuned`;
    ``None`` = not run: they train a 22M-parameter encoder).

    ``regressor``: keyword arguments of :class:`LengthPredictor` (``kind``...; a ``name`` key is ignored).
    ``E``: precomputed embeddings of ``profile_df["text"]`` (shared across calls by the reference builder).
    Returns ``table`` (DataFrame, :data:`METRIC_COLUMNS`), ``predictions`` (test rows: request_id, true and
    per-method predicted lengths), ``predictor`` (the fitted ours), ``split``, ``lm``, ``platform``.
    """
    if "text" not in profile_df.columns or TARGET not in profile_df.columns:
        raise UserError(f"not a profile: needs columns text and {TARGET}")
    df = usable_rows(profile_df)
    if len(df) < MIN_ROWS:
        raise UserError(f"profile has {len(df)} usable rows; need at least {MIN_ROWS}")
    n_main = len(df)
    if extra_train is not None:  # a train-split profile: every method trains on it, the whole profile is the test
        ex = usable_rows(extra_train)
        ex = ex[~np.isin(conversation_ids(ex), conversation_ids(df))].reset_index(drop=True)
        if len(ex) < MIN_ROWS:
            raise UserError(f"extra training profile has {len(ex)} usable rows (conversations disjoint from the "
                            f"test profile); need at least {MIN_ROWS}")
        df = pd.concat([df, ex], ignore_index=True)
    params = {k: v for k, v in dict(regressor or {}).items() if k != "name"}
    use_prefill = bool(params.pop("use_prefill", False))
    if use_prefill and prefill is None:
        raise UserError("regressor.use_prefill=true needs the served LM's states (prefill=...; "
                        "rtlm-train-regressor provides them)")
    params.setdefault("random_state", seed)
    if isinstance(params.get("hidden_layer_sizes"), list):
        params["hidden_layer_sizes"] = tuple(params["hidden_layer_sizes"])
    if isinstance(params.get("quantiles"), list):
        params["quantiles"] = tuple(params["quantiles"])
    ours = LengthPredictor(**params)
    kind = ours.kind
    texts = df["text"].fillna("").astype(str).tolist()
    y = df[TARGET].to_numpy(dtype=float)
    if extra_train is not None:
        tr, te = np.arange(n_main, len(df)), np.arange(n_main)
    else:
        tr, te = split_by_conversation(df, test_size, seed)
    groups = conversation_ids(df)

    U = F.uncertainty_features(texts)
    need_e = ours.use_embedding or embedding_baselines
    if need_e and E is None:
        E = F.embed(texts).astype(float)
    X = np.hstack([U, E]) if ours.use_embedding else U

    t_tr = [texts[i] for i in tr]
    t_te = [texts[i] for i in te]
    preds: dict[str, np.ndarray] = {}
    train_preds: dict[str, np.ndarray] = {}
    models: dict[str, Any] = {}
    ours.fit(t_tr, y[tr], X=X[tr])
    name = f"rtlm_{kind}"
    preds[name] = ours.predict_from_features(X[te])
    train_preds[name] = ours.predict_from_features(X[tr])
    models[name] = ours
    for bname, model in make_baselines(seed).items():
        if bname in EMBEDDING_METHODS and not embedding_baselines:
            continue
        Etr = E[tr] if E is not None else None
        Ete = E[te] if E is not None else None
        model.fit(t_tr, y[tr], E=Etr)
        preds[bname] = model.predict(t_te, E=Ete)
        train_preds[bname] = model.predict(t_tr, E=Etr)
        models[bname] = model
    for bname, model in make_finetuned(finetuned, seed).items():
        model.fit(t_tr, y[tr])
        preds[bname], train_preds[bname] = model.predict(t_te), model.predict(t_tr)
        models[bname] = model
    refine = None
    if use_prefill:
        from rtlm_lab.regressor import lmstate as LS

        states_for = prefill["states"]  # (source "main" | "extra", frame, step, prefix ids) -> LMStates
        frames = [("main", df.iloc[:n_main])] + ([("extra", df.iloc[n_main:])] if extra_train is not None else [])
        S = LS.LMStates.concat([states_for(src, fr.reset_index(drop=True), 0, None) for src, fr in frames])
        cap = int(prefill.get("max_new_tokens") or np.max(y))
        # RT-LM's regressor with the prefill scalars (entropy, end-of-turn prob, prompt tokens) appended
        Xp = np.hstack([X, LS.scalar_features(S)])
        ours_p = LengthPredictor(**params).fit([texts[i] for i in tr], y[tr], X=Xp[tr])
        pname = f"{name}_prefill"
        preds[pname], train_preds[pname] = ours_p.predict_from_features(Xp[te]), ours_p.predict_from_features(Xp[tr])
        models[pname] = ours_p
        p2, t2, m2 = LS.evaluate_methods(S, y, tr, te, groups, seed=seed,
                                         candidates=tuple(prefill.get("probes", ("ridge", "mlp", "ordinal", "rank"))),
                                         which=tuple(prefill.get("which", ("last", "mean", "scalar"))),
                                         max_new_tokens=cap, loop_n=int(prefill.get("loop_n", 3)))
        preds.update(p2)
        train_preds.update(t2)
        models.update(m2)
        refine_tables = []
        ks = sorted({int(k) for k in prefill.get("refine_k", []) or []})
        longest = []  # the reply's first max(k) tokens, once (greedy: each shorter prefix is a prefix of it)
        for src, fr in frames:
            longest += prefill["prefix"](src, fr.reset_index(drop=True), ks[-1]) if ks else []
        for k in ks:
            prefix = [list(p)[:k] for p in longest]
            Sk = LS.LMStates.concat([states_for(src, fr.reset_index(drop=True), k,
                                                prefix[:n_main] if src == "main" else prefix[n_main:])
                                     for src, fr in frames])
            idx_fn = (lambda rows: bootstrap_index(groups[rows], n_bootstrap, seed, bootstrap_by))
            refine_tables.append(LS.evaluate_refine(m2["lmstate_auto"], Sk, prefix, y, tr, te, k,
                                                    preds["lmstate_auto"], idx_fn=idx_fn))
        refine = pd.concat(refine_tables, ignore_index=True) if refine_tables else None
    preds["oracle"] = y[te]
    train_preds["oracle"] = y[tr]

    n_boot = int(n_bootstrap) if n_bootstrap and len(te) > 2 else 0  # same resamples (seed) for every method
    # rows: scipy's paired bootstrap; conversations: our cluster resamples (the same for every method)
    idx = bootstrap_index(groups[te], n_bootstrap, seed, bootstrap_by) if bootstrap_by == "conversation" else None
    rows = []
    timing = [t for t in t_te[:max(1, int(timing_n))]]
    for m, p in preds.items():
        r = {"method": m, **score(y[te], p, y[tr], rank_only=bool(getattr(models.get(m), "rank_only", False)),
                                 train_pred=train_preds[m],
                                 n_bootstrap=n_boot, seed=seed, idx=idx)}
        if m == name:
            sec = _timed(lambda t: ours.predict_from_features(ours.featurize(t)), timing)
        elif m == "oracle":
            sec = math.nan
        elif use_prefill and (m.startswith("lmstate_") or m == f"{name}_prefill"):
            timer = prefill.get("time")  # seconds to extract the states of these texts (the LM's forward pass)
            sec = timer(timing) if timer is not None else math.nan
            sec += _timed(lambda t: ours.featurize(t), timing) if m == f"{name}_prefill" else 0.0
        elif m in EMBEDDING_METHODS:
            sec = _timed(lambda t, mm=models[m]: mm.predict(t, E=F.embed(t)), timing)
        else:
            sec = _timed(models[m].predict, timing)
        r["us_per_prompt"] = sec / len(timing) * 1e6
        rows.append(r)
    table = pd.DataFrame(rows)[METRIC_COLUMNS]
    pred_df = pd.DataFrame({"request_id": df["request_id"].to_numpy()[te] if "request_id" in df else te,
                            "true": y[te], **{m: p for m, p in preds.items()}})
    lm = str(df["lm"].iloc[0]) if "lm" in df.columns else "unknown"
    platform = str(df["platform"].iloc[0]) if "platform" in df.columns else "unknown"
    split = {"n_train": int(len(tr)), "n_test": int(len(te)), "n_train_conversations": int(len(set(groups[tr]))),
             "n_test_conversations": int(len(set(groups[te]))), "test_size": float(test_size), "seed": int(seed),
             "bucket_edges_tokens": [float(v) for v in bucket_edges(y[tr])]}
    split["bootstrap_by"] = bootstrap_by
    if extra_train is not None:
        split["extra_train_rows"] = int(len(tr))
        split["test"] = "whole profile (training rows from the extra train-split profile)"
    out = {"table": table, "predictions": pred_df, "predictor": ours, "split": split, "lm": lm,
           "platform": platform, "n_bootstrap": n_boot}
    if use_prefill:
        auto = models["lmstate_auto"]
        out["lmstate"] = {"picked_probe": auto.probe_, "val_kendall_tau": auto.val_scores_,
                          "layers": list(S.layers), "n_features": int(LS.feature_matrix(S.take([0]), auto.which).shape[1])}
        out["lmstate_predictor"] = auto
        out["refine"] = refine
    return out


def _clean(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {str(k): _clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_clean(v) for v in obj]
    if isinstance(obj, (np.floating, float)):
        return None if not math.isfinite(float(obj)) else float(obj)
    if isinstance(obj, np.integer):
        return int(obj)
    return obj


def to_jsonable(result: Mapping[str, Any]) -> dict[str, Any]:
    """``compare``'s result as JSON (NaN -> null); ``methods`` is the table as a list of records."""
    out = {"lm": result["lm"], "platform": result["platform"], "split": result["split"],
           "n_bootstrap": result["n_bootstrap"], "regressor": result["predictor"].get_params(),
           "methods": result["table"].to_dict(orient="records")}
    if "lmstate" in result:
        out["lmstate"] = result["lmstate"]
        ref = result.get("refine")
        out["refine"] = ref.to_dict(orient="records") if ref is not None else []
    return _clean(out)


def format_table(table: pd.DataFrame) -> str:
    return table.to_string(index=False, float_format=lambda v: f"{v:.3f}")


# -------------------------------------------------------------------------------------------- figures
def plot_comparison(result: Mapping[str, Any], out_dir=None, title: str = "", stem: str = "comparison"):
    """Left: predicted vs true output tokens (test rows) for the methods that predict tokens; right:
    Kendall tau per method with its bootstrap 95% CI. PNG + SVG in ``out_dir``."""
    import matplotlib.pyplot as plt

    from rtlm_lab.viz.common import save_figure

    table, pred = result["table"], result["predictions"]
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(11, 4.2))
    y = pred["true"].to_numpy()
    # rank-only methods (score, not tokens) are those whose MAE the table leaves NaN
    show = [m for m in table.loc[table["mae"].notna(), "method"] if m not in ("oracle", "constant") and m in pred]
    for m in show:
        a1.scatter(y, pred[m], s=10, alpha=0.55, label=m)
    hi = float(max(y.max(), max(pred[m].max() for m in show) if show else 1)) * 1.05
    a1.plot([0, hi], [0, hi], color="grey", lw=1, ls="--")
    a1.set_xlabel("true output tokens")
    a1.set_ylabel("predicted output tokens")
    a1.set_title("held-out conversations")
    a1.legend(fontsize=8)
    t = table.set_index("method")
    taus = t["kendall_tau"].astype(float)
    lo = (taus - t["tau_ci_low"]).clip(lower=0).fillna(0)
    up = (t["tau_ci_high"] - taus).clip(lower=0).fillna(0)
    colors = ["tab:red" if m.startswith("rtlm_") else ("lightgrey" if m == "oracle" else "tab:blue")
              for m in t.index]
    a2.bar(range(len(t)), taus.fillna(0), yerr=[lo, up], color=colors, capsize=3)
    for i, v in enumerate(taus):
        if not math.isfinite(v):
            a2.text(i, 0.01, "n/a", ha="center", fontsize=8)
    a2.set_xticks(range(len(t)))
    a2.set_xticklabels(t.index, rotation=30, ha="right", fontsize=8)
    a2.axhline(0, color="black", lw=0.8)
    a2.set_ylabel("Kendall tau (95% CI)")
    a2.set_title("rank quality vs true length")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    if out_dir is not None:
        save_figure(fig, out_dir, stem)
    plt.close(fig)
    return fig
