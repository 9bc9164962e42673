"""A distributional output-length predictor: quantile heads over RT-LM's features, recalibrated at run time.

:class:`QuantileLengthPredictor` follows the scikit-learn conventions (hyper-parameters in ``__init__``, learned
state with a trailing underscore, ``get_params`` / ``clone`` work):

* ``fit(X, y)``: ``X`` a feature matrix (RT-LM's: :func:`rtlm_lab.regressor.features.uncertainty_features`, the
  six uncertainty scores, ``total``, log words, log spaCy tokens; :meth:`featurize` computes it from texts),
  ``y`` output tokens;
* ``predict_quantiles(X) -> [n, len(levels)]`` output tokens at the fixed ``levels`` (default
  :data:`rtlm_lab.distmetrics.DEFAULT_LEVELS`: 0.05, 0.1, 0.25, 0.5, 0.75, 0.9, 0.95), **non-crossing** (each row
  sorted), >= 0; ``predict(X)``: the median (a point prediction, for ``score`` and the point-metric tables);
* ``update(X, y)``: run-time recalibration from finished requests (below); ``reset_recalibration()``.

Choices, documented once:

* **One model per level** (``model``): ``hgb`` (HistGradientBoostingRegressor, ``loss="quantile"``; the same
  hyper-parameters as ``LengthPredictor(kind="quantile")``) or ``linear`` (StandardScaler + QuantileRegressor, L1
  penalty ``alpha``, HiGHS solver). Target ``log1p(tokens)`` by default (``log_target``): quantiles are invariant
  under the monotone transform, so the log changes what the models can fit, not what a quantile means.
* **Non-crossing by sorting**: per-level models can cross; each row's quantiles are sorted (rearrangement,
  Chernozhukov, Fernandez-Val, Galichon 2010: the sorted curve is no farther, in Lp, from a monotone truth).
* **Tokens** (``integer``, ``clip_to_train``): quantiles are mapped back to tokens, kept within the range of
  lengths seen (training, then every update) and rounded: an integer length has integer quantiles, and a reply
  capped at ``max_new_tokens`` has its upper quantiles exactly at the cap (a predicted 63.7 would leave every
  capped reply outside the interval; on DialoGPT-ccc, whose replies hit the 64-token cap a quarter of the time,
  that is the difference between 69% and nominal coverage).
* **Recalibration** (conformal-style, per level): each finished request adds its residual ``y - q_tau(x)``
  (target space, against the fitted, unshifted quantile) to a window of the last ``recal_window`` requests;
  once ``recal_min`` have been seen, level ``tau``'s prediction is shifted by the empirical ``tau``-quantile of
  its residuals, so that, on the recent stream, a share ``tau`` of the truths falls at or below the shifted
  quantile (split-conformal quantile regression, Romano, Patterson, Candes 2019, one-sided per level, on a
  sliding window). In log space the shift is multiplicative: an LM that answers twice as long moves every level
  by ``log 2``. Rows are sorted again after the shift.

:func:`evaluate` is the distributional table of ``rtlm-train-regressor regressor=quantile``: on held-out
*conversations* (the same split as :func:`~rtlm_lab.regressor.evaluate.compare`), this predictor against two
baselines, ``marginal`` (the training lengths' own quantiles, the same for every request: calibrated by
construction on exchangeable data, no ranking) and ``ridge_residuals`` (RT-LM's ridge point prediction plus the
training residuals' quantiles, ``LengthPredictor.predict_quantile``: a constant-width band in log space), scored
by :func:`rtlm_lab.distmetrics.score_quantiles`. :func:`drift` fits on one LM's lengths and serves another LM's
requests in order: coverage and CRPS frozen vs recalibrated (predict each request, then update with its truth).
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import numpy as np
import pandas as pd
from sklearn.base import BaseEstimator, RegressorMixin

from rtlm_lab.distmetrics import DEFAULT_LEVELS, check_levels, score_quantiles
from rtlm_lab.errors import UserError

MODELS = ("hgb", "linear")


class QuantileLengthPredictor(RegressorMixin, BaseEstimator):
    """Predicted output-length quantiles at fixed levels; see the module doc."""

    def __init__(self, levels: Sequence[float] = DEFAULT_LEVELS, model: str = "hgb", log_target: bool = True,
                 max_iter: int = 200, learning_rate: float = 0.05, max_leaf_nodes: int = 15,
                 min_samples_leaf: int = 10, alpha: float = 1e-4, recal_window: int = 200, recal_min: int = 20,
                 integer: bool = True, clip_to_train: bool = True, random_state: int = 0):
        self.levels = levels
        self.model = model
        self.log_target = log_target
        self.max_iter = max_iter
        self.learning_rate = learning_rate
        self.max_leaf_nodes = max_leaf_nodes
        self.min_samples_leaf = min_samples_leaf
        self.alpha = alpha
        self.recal_window = recal_window
        self.recal_min = recal_min
        self.integer = integer
        self.clip_to_train = clip_to_train
        self.random_state = random_state

    # ---------------------------------------------------------------------------------------------- helpers
    @staticmethod
    def featurize(texts: Sequence[str]) -> np.ndarray:
        """RT-LM's feature matrix of ``texts`` (:func:`~rtlm_lab.regressor.features.uncertainty_features`)."""
        from rtlm_lab.regressor import features as F

        return F.uncertainty_features(texts)

    def _target(self, y) -> np.ndarray:
        y = np.clip(np.nan_to_num(np.asarray(y, dtype=float).ravel(), nan=0.0), 0.0, None)
        return np.log1p(y) if self.log_target else y

    def _inverse(self, z: np.ndarray) -> np.ndarray:
        """Target space -> tokens: ``expm1``, then (``clip_to_train``) into the training lengths' range, then
        (``integer``) rounded: the quantiles of an integer length are integers, and a length capped at
        ``max_new_tokens`` has its upper quantiles exactly at the cap (63.7 would leave every capped reply
        outside the interval)."""
        out = np.expm1(np.clip(z, -50, 50)) if self.log_target else np.asarray(z, dtype=float)
        out = np.clip(np.nan_to_num(out, nan=0.0), 0.0, None)
        if self.clip_to_train and hasattr(self, "y_range_"):
            out = np.clip(out, *self.y_range_)
        return np.round(out) if self.integer else out

    def _make(self, tau: float):
        from sklearn.ensemble import HistGradientBoostingRegressor
        from sklearn.linear_model import QuantileRegressor
        from sklearn.pipeline import Pipeline
        from sklearn.preprocessing import StandardScaler

        if self.model == "hgb":
            return HistGradientBoostingRegressor(loss="quantile", quantile=tau, max_iter=self.max_iter,
                                                 learning_rate=self.learning_rate, max_leaf_nodes=self.max_leaf_nodes,
                                                 min_samples_leaf=self.min_samples_leaf,
                                                 random_state=self.random_state)
        if self.model == "linear":
            return Pipeline([("scale", StandardScaler()),
                             ("qr", QuantileRegressor(quantile=tau, alpha=self.alpha, solver="highs"))])
        raise UserError(f"unknown quantile model {self.model!r}; choose one of: {', '.join(MODELS)}")

    def _check(self):
        if not hasattr(self, "models_"):
            from sklearn.exceptions import NotFittedError

            raise NotFittedError("QuantileLengthPredictor is not fitted; call fit(X, y) first")

    # ------------------------------------------------------------------------------------------------- fit
    def fit(self, X, y):
        """Fit one quantile model per level on features ``X`` and output tokens ``y``."""
        try:
            lv = check_levels(self.levels)
        except ValueError as exc:
            raise UserError(str(exc)) from None
        X = np.asarray(X, dtype=float)
        z = self._target(y)
        if X.ndim != 2 or len(X) != len(z) or len(z) < 2:
            raise UserError(f"need a 2-d X with one row per target and at least 2 rows (X {X.shape}, y {len(z)})")
        self.levels_ = lv
        self.n_features_in_ = X.shape[1]
        self.models_ = [self._make(float(t)).fit(X, z) for t in lv]
        yy = np.asarray(y, dtype=float).ravel()
        self.train_quantiles_ = np.quantile(yy, lv)
        self.train_range_ = self.y_range_ = (float(np.nanmin(yy)), float(np.nanmax(yy)))
        self.reset_recalibration()
        return self

    def reset_recalibration(self):
        """Forget every run-time update (the fitted models stay)."""
        K = len(self.levels_)
        self.recal_residuals_ = np.zeros((0, K))
        if hasattr(self, "train_range_"):
            self.y_range_ = self.train_range_
        self.shift_ = np.zeros(K)
        self.n_updates_ = 0
        return self

    # --------------------------------------------------------------------------------------------- predict
    def _base(self, X) -> np.ndarray:
        self._check()
        X = np.asarray(X, dtype=float)
        if X.ndim == 1:
            X = X[None, :]
        if len(X) == 0:
            return np.zeros((0, len(self.levels_)))
        return np.sort(np.column_stack([m.predict(X) for m in self.models_]), axis=1)

    def predict_target_quantiles(self, X, recalibrated: bool = True) -> np.ndarray:
        """Quantiles in target space (log1p tokens by default), ``[n, len(levels)]``, sorted per row."""
        Z = self._base(X)
        if recalibrated and self.n_updates_:
            Z = np.sort(Z + self.shift_, axis=1)
        return Z

    def predict_quantiles(self, X, recalibrated: bool = True) -> np.ndarray:
        """Output-token quantiles ``[n, len(levels)]`` (non-crossing, >= 0)."""
        return self._inverse(self.predict_target_quantiles(X, recalibrated))

    def predict(self, X, recalibrated: bool = True) -> np.ndarray:
        """The predicted median (tokens; linear between the levels around 0.5 when 0.5 is not one of them)."""
        Q = self.predict_quantiles(X, recalibrated)
        return np.array([np.interp(0.5, self.levels_, q) for q in Q])

    # --------------------------------------------------------------------------------------- recalibration
    def update(self, X, y):
        """Run-time recalibration with finished requests' features ``X`` and observed output tokens ``y``."""
        self._check()
        X = np.asarray(X, dtype=float)
        if X.ndim == 1:
            X = X[None, :]
        z = self._target(y)
        if len(z) != len(X):
            raise UserError(f"update: {len(X)} feature rows but {len(z)} lengths")
        ok = np.isfinite(np.asarray(y, dtype=float).ravel())
        if not ok.any():
            return self
        return self._observe(np.asarray(y, dtype=float).ravel()[ok], z[ok, None] - self._base(X[ok]))

    def _observe(self, y_tokens: np.ndarray, R: np.ndarray):
        """Take finished requests' lengths (tokens) and residuals (target space, ``[n, len(levels)]``)."""
        if len(y_tokens):  # lengths seen at run time widen the range predictions are kept in (drift)
            self.y_range_ = (min(self.y_range_[0], float(np.min(y_tokens))),
                             max(self.y_range_[1], float(np.max(y_tokens))))
        W = max(1, int(self.recal_window))
        self.recal_residuals_ = np.vstack([self.recal_residuals_, R])[-W:]
        self.n_updates_ += len(R)
        if len(self.recal_residuals_) >= max(1, int(self.recal_min)):
            self.shift_ = np.array([np.quantile(self.recal_residuals_[:, k], t)
                                    for k, t in enumerate(self.levels_)])
        return self


# ------------------------------------------------------------------------------------------------ tables
TABLE_COLUMNS = ["method", "pinball_mean", "crps", "cover50", "cover90", "width50", "width90",
                 "kendall_tau_median", "n"]


def predictor_params(regressor: Mapping[str, Any] | None, distribution: Mapping[str, Any] | None = None
                     ) -> dict[str, Any]:
    """:class:`QuantileLengthPredictor` keyword arguments from ``conf/regressor/quantile.yaml`` (``quantiles`` are
    the levels; the HGB hyper-parameters are shared) and the ``distribution`` block of ``train_regressor.yaml``
    (``model``, ``alpha``, ``recal_window``, ``recal_min``)."""
    reg = dict(regressor or {})
    out: dict[str, Any] = {}
    if reg.get("quantiles") is not None:
        out["levels"] = tuple(float(v) for v in reg["quantiles"])
    for k in ("log_target", "max_iter", "learning_rate", "max_leaf_nodes", "min_samples_leaf", "random_state"):
        if k in reg:
            out[k] = reg[k]
    for k in ("levels", "model", "alpha", "recal_window", "recal_min"):
        if distribution and distribution.get(k) is not None:
            out[k] = tuple(distribution[k]) if k == "levels" else distribution[k]
    return out


def _baselines(Xtr, ytr, Xte, levels, seed: int) -> dict[str, np.ndarray]:
    from rtlm_lab.regressor.predictor import LengthPredictor

    lv = np.asarray(levels, float)
    out = {"marginal": np.tile(np.quantile(ytr, lv), (len(Xte), 1))}
    ridge = LengthPredictor(kind="ridge", random_state=seed).fit(None, ytr, X=Xtr)
    out["ridge_residuals"] = np.sort(np.column_stack([ridge.predict_quantile(None, float(t), X=Xte) for t in lv]),
                                     axis=1)
    return out


def evaluate(profile_df: pd.DataFrame, params: Mapping[str, Any] | None = None, test_size: float = 0.3,
             seed: int = 0, extra_train: pd.DataFrame | None = None, X: np.ndarray | None = None) -> dict[str, Any]:
    """The distributional table on held-out conversations of one profile (see the module doc).

    ``params``: :class:`QuantileLengthPredictor` keyword arguments; ``extra_train``: a train-split profile (every
    method trains on it, the whole profile is the test set, as in ``compare``); ``X``: precomputed features of
    the profile's usable rows (then of ``extra_train``'s appended). Returns ``table`` (DataFrame,
    :data:`TABLE_COLUMNS` + ``pinball_<level>``), ``rows`` (full rows, PIT histograms included), ``pit`` (test
    PIT values per method), ``quantiles`` (test quantiles per method), ``y_test``, ``levels``, ``predictor``,
    ``split``."""
    from rtlm_lab.regressor.evaluate import conversation_ids, split_by_conversation, usable_rows
    from rtlm_lab.distmetrics import pit

    df = usable_rows(profile_df)
    n_main = len(df)
    if n_main < 10:
        raise UserError(f"profile has {n_main} usable rows; need at least 10")
    if extra_train is not None:
        ex = usable_rows(extra_train)
        ex = ex[~np.isin(conversation_ids(ex), conversation_ids(df))].reset_index(drop=True)
        df = pd.concat([df, ex], ignore_index=True)
        tr, te = np.arange(n_main, len(df)), np.arange(n_main)
    else:
        tr, te = split_by_conversation(df, test_size, seed)
    y = df["n_output_tokens"].to_numpy(float)
    if X is None:
        X = QuantileLengthPredictor.featurize(df["text"].fillna("").astype(str).tolist())
    X = np.asarray(X, float)
    if len(X) != len(df):
        raise UserError(f"X has {len(X)} rows for {len(df)} usable rows (profile, then extra_train's rows from "
                        "conversations not in the profile)")
    params = {"random_state": seed, **dict(params or {})}
    ours = QuantileLengthPredictor(**params).fit(X[tr], y[tr])
    lv = ours.levels_
    quant = {f"quantile_{ours.model}": ours.predict_quantiles(X[te])}
    quant.update(_baselines(X[tr], y[tr], X[te], lv, seed))
    rows, pits = [], {}
    for m, Q in quant.items():
        rows.append({"method": m, **score_quantiles(y[te], Q, lv, seed=seed)})
        pits[m] = pit(y[te], Q, lv, seed=seed)
    table = pd.DataFrame(rows)
    cols = TABLE_COLUMNS + [c for c in table.columns if c.startswith("pinball_") and c != "pinball_mean"]
    groups = conversation_ids(df)
    split = {"n_train": int(len(tr)), "n_test": int(len(te)), "n_train_conversations": int(len(set(groups[tr]))),
             "n_test_conversations": int(len(set(groups[te]))), "test_size": float(test_size), "seed": int(seed)}
    return {"table": table[cols], "rows": rows, "pit": pits, "quantiles": quant, "y_test": y[te],
            "levels": [float(v) for v in lv], "predictor": ours, "split": split}


def stream(pred: QuantileLengthPredictor, X, y, recalibrate: bool) -> np.ndarray:
    """Quantiles each request of a stream got, in order: predicted *before* its own truth is known; with
    ``recalibrate`` the predictor is then updated with it (on a copy: ``pred`` is left as it is)."""
    import copy

    p = copy.deepcopy(pred).reset_recalibration()
    X, y = np.asarray(X, float), np.asarray(y, float)
    if not recalibrate:
        return p.predict_quantiles(X, recalibrated=False)
    base = p._base(X)  # the fitted models do not change; only the shift does
    out = np.empty_like(base)
    for i in range(len(y)):
        Z = np.sort(base[i] + p.shift_, axis=0) if p.n_updates_ else base[i]
        out[i] = p._inverse(Z)
        if np.isfinite(y[i]):
            p._observe(y[i:i + 1], p._target(y[i:i + 1])[:, None] - base[i:i + 1])  # = p.update(X[i:i+1], ...)
    return out


def drift(source_df: pd.DataFrame, target_df: pd.DataFrame, params: Mapping[str, Any] | None = None,
          test_size: float = 0.3, seed: int = 0, source_train: pd.DataFrame | None = None,
          X_source: np.ndarray | None = None, X_target: np.ndarray | None = None) -> dict[str, Any]:
    """Fit on one LM's lengths, serve another LM's requests in a seeded random order: frozen vs recalibrated
    (:func:`stream`). Without ``source_train``: fit on the training conversations of ``source_df`` and stream
    the held-out conversations of ``target_df`` (the same split as :func:`evaluate`; the reference profiles of
    the lab's LMs hold the same prompts); with it (a train-split profile of the source LM): fit on all of it
    and stream every row of ``target_df`` whose conversation it does not hold. ``X_source`` / ``X_target``:
    precomputed features of the fitting rows / of ``target_df``'s usable rows. Returns ``table`` (one row per
    arm x part: ``all``, ``first_half``, ``second_half``), ``n_stream``, ``n_train``, ``levels``."""
    from rtlm_lab.regressor.evaluate import conversation_ids, split_by_conversation, usable_rows

    tgt = usable_rows(target_df)
    if source_train is not None:
        fit_df = usable_rows(source_train)
        fit_df = fit_df[~np.isin(conversation_ids(fit_df), conversation_ids(tgt))].reset_index(drop=True)
        te = np.arange(len(tgt))
        keep = None
    else:
        src = usable_rows(source_df)
        tr, _ = split_by_conversation(src, test_size, seed)
        _, te = split_by_conversation(tgt, test_size, seed)
        fit_df, keep = src, tr
    if X_source is None:
        X_source = QuantileLengthPredictor.featurize(fit_df["text"].fillna("").astype(str).tolist())
    X_source = np.asarray(X_source, float)
    if keep is not None and len(X_source) == len(fit_df):
        X_source = X_source[keep]
    y_fit = fit_df["n_output_tokens"].to_numpy(float)[keep] if keep is not None else fit_df["n_output_tokens"].to_numpy(float)
    if len(X_source) != len(y_fit):
        raise UserError(f"X_source has {len(X_source)} rows for {len(y_fit)} fitting rows")
    if X_target is None:
        X_target = QuantileLengthPredictor.featurize(tgt["text"].fillna("").astype(str).tolist())
    params = {"random_state": seed, **dict(params or {})}
    pred = QuantileLengthPredictor(**params).fit(X_source, y_fit)
    order = np.random.default_rng(seed).permutation(te)
    Xs, ys = np.asarray(X_target, float)[order], tgt["n_output_tokens"].to_numpy(float)[order]
    half = len(ys) // 2
    rows = []
    lv = pred.levels_
    for arm, rec in (("frozen", False), ("recalibrated", True)):
        Q = stream(pred, Xs, ys, rec)
        for part, sl in (("all", slice(None)), ("first_half", slice(0, half)), ("second_half", slice(half, None))):
            r = score_quantiles(ys[sl], Q[sl], lv, seed=seed)
            med = np.array([np.interp(0.5, lv, q) for q in Q[sl]])
            rows.append({"arm": arm, "part": part, **{k: r[k] for k in TABLE_COLUMNS[1:]},
                         "mean_median_tokens": float(np.mean(med)), "mean_true_tokens": float(np.mean(ys[sl]))})
    return {"table": pd.DataFrame(rows), "n_stream": int(len(ys)), "n_train": int(len(y_fit)),
            "levels": [float(v) for v in lv]}


def format_table(table: pd.DataFrame) -> str:
    return table.to_string(index=False, float_format=lambda v: f"{v:.3f}")


def plot_calibration(result: Mapping[str, Any], out_dir=None, title: str = "", stem: str = "calibration"):
    """Left: observed share of held-out truths at or below each predicted quantile against its level (the
    diagonal is calibration); right: PIT histogram per method (flat at 1 when calibrated). PNG and SVG in
    ``out_dir``."""
    import matplotlib.pyplot as plt

    lv = np.asarray(result["levels"])
    y = np.asarray(result["y_test"])
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(10, 4))
    a1.plot([0, 1], [0, 1], color="grey", lw=1, ls="--")
    bins = np.linspace(0, 1, 11)
    for m, Q in result["quantiles"].items():
        a1.plot(lv, [(y <= Q[:, k]).mean() for k in range(len(lv))], marker="o", label=m)
        a2.hist(result["pit"][m], bins=bins, density=True, histtype="step", lw=1.5, label=m)
    a1.set_xlabel("quantile level")
    a1.set_ylabel("share of truths <= predicted quantile")
    a1.set_title("reliability (held-out conversations)")
    a1.legend(fontsize=8)
    a2.axhline(1.0, color="grey", lw=1, ls="--")
    a2.set_xlabel("PIT value")
    a2.set_ylabel("density")
    a2.set_title("PIT histogram")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    if out_dir is not None:  # atomic, png + svg, as every figure of the lab
        from rtlm_lab.viz.common import save_figure

        save_figure(fig, out_dir, stem)
    plt.close(fig)
    return fig
