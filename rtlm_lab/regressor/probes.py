"""Probes over LM-state features (:mod:`rtlm_lab.regressor.lmstate`): scikit-learn style estimators.

Each has its hyper-parameters in ``__init__``, ``fit(X, y)`` with ``y`` in output tokens, ``predict(X)`` in
output tokens (float >= 0); all standardize ``X`` first (hidden states have a few huge coordinates).

* :class:`RidgeProbe`: ridge on ``log1p(y)``; ``alpha=None`` picks it by leave-one-out (``RidgeCV``) over
  ``alphas``;
* :class:`MLPProbe`: a small MLP (one hidden layer) on ``log1p(y)`` with early stopping, after PCA to at most
  ``n_components`` dimensions (few hundred rows against thousands of state dimensions);
* :class:`OrdinalBinsProbe` (TRAIL-style): ``n_bins`` length buckets at the training quantiles, a multinomial
  logistic classifier; the prediction is the expected length ``sum_b p_b * mean_y_b``;
* :class:`PairwiseRankProbe` (vLLM-LTR style): logistic loss on feature differences of sampled pairs with
  different lengths (``pairs_per_item`` per row, at most ``max_pairs``; no intercept) gives a score ``x . w``; ``decision_function`` is that score and
  ``predict`` maps it to tokens by a 1-d least-squares fit of ``log1p(y)`` on it (monotone increasing, so the
  ranking, hence tau, is the score's own).
"""

from __future__ import annotations

import warnings

import numpy as np
from sklearn.base import BaseEstimator, RegressorMixin

PROBES = ("ridge", "mlp", "ordinal", "rank")


def _log(y):
    return np.log1p(np.clip(np.asarray(y, dtype=float), 0, None))


def _exp(z):
    return np.clip(np.expm1(np.clip(np.asarray(z, dtype=float), -50, 50)), 0, None)


class _Scaled(RegressorMixin, BaseEstimator):
    def _scale_fit(self, X):
        from sklearn.preprocessing import StandardScaler

        self.scaler_ = StandardScaler().fit(np.asarray(X, dtype=float))
        return self._scale(X)

    def _scale(self, X):
        return np.nan_to_num(self.scaler_.transform(np.asarray(X, dtype=float)))


class RidgeProbe(_Scaled):
    def __init__(self, alpha: float | None = None, alphas: tuple = (1.0, 10.0, 100.0, 1e3, 1e4, 1e5)):
        self.alpha, self.alphas = alpha, alphas

    def fit(self, X, y):
        from sklearn.linear_model import Ridge, RidgeCV

        Z = self._scale_fit(X)
        self.model_ = (Ridge(alpha=self.alpha) if self.alpha is not None
                       else RidgeCV(alphas=tuple(self.alphas))).fit(Z, _log(y))
        return self

    def linear(self) -> tuple[np.ndarray, float]:
        """``(w, b)`` with ``predict(X) = expm1(X @ w + b)`` (clipped): the scaler folded into the ridge."""
        if getattr(self, "_wb", None) is None:
            sd, mu = self.scaler_.scale_, self.scaler_.mean_
            w = np.asarray(self.model_.coef_, dtype=float) / sd
            self._wb = (w, float(self.model_.intercept_) - float(mu @ w), mu)
        return self._wb[0], self._wb[1]

    def predict(self, X):
        # our own dot product, not scaler.transform + Ridge.predict: the same numbers, but sklearn's per-call
        # input validation costs ~0.5 ms, which the serving engine would pay inside its steps (the LM-state
        # policy predicts on the clock; measured in rtlm_lab/scheduler/lmprobe.py's docstring)
        w, b = self.linear()
        X = np.asarray(X, dtype=float)
        if np.isnan(X).any():  # as the scaled path: a missing feature sits at the training mean
            X = np.where(np.isnan(X), self._wb[2], X)
        return _exp(X @ w + b)


class MLPProbe(_Scaled):
    def __init__(self, hidden: tuple = (64,), alpha: float = 1.0, n_components: int = 128, max_iter: int = 300,
                 seed: int = 0):
        self.hidden, self.alpha, self.n_components, self.max_iter, self.seed = hidden, alpha, n_components, \
            max_iter, seed

    def fit(self, X, y):
        from sklearn.decomposition import PCA
        from sklearn.exceptions import ConvergenceWarning
        from sklearn.neural_network import MLPRegressor

        Z = self._scale_fit(X)
        nc = int(min(self.n_components, Z.shape[1], max(1, Z.shape[0] - 1)))
        self.pca_ = PCA(n_components=nc, random_state=self.seed).fit(Z)
        P = self.pca_.transform(Z)
        self.pscale_ = float(np.std(P)) or 1.0
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ConvergenceWarning)
            self.model_ = MLPRegressor(hidden_layer_sizes=tuple(self.hidden), alpha=self.alpha,
                                       early_stopping=len(Z) >= 50, validation_fraction=0.15,
                                       n_iter_no_change=20, max_iter=self.max_iter, learning_rate_init=1e-3,
                                       random_state=self.seed).fit(P / self.pscale_, _log(y))
        return self

    def predict(self, X):
        return _exp(self.model_.predict(self.pca_.transform(self._scale(X)) / self.pscale_))


class OrdinalBinsProbe(_Scaled):
    def __init__(self, n_bins: int = 6, C: float = 0.01, seed: int = 0):
        self.n_bins, self.C, self.seed = n_bins, C, seed

    def fit(self, X, y):
        from sklearn.linear_model import LogisticRegression

        y = np.asarray(y, dtype=float)
        Z = self._scale_fit(X)
        self.edges_ = np.unique(np.quantile(y, np.linspace(0, 1, int(self.n_bins) + 1)[1:-1]))
        b = np.searchsorted(self.edges_, y, side="right")
        self.classes_ = np.unique(b)
        self.bin_mean_ = np.array([y[b == c].mean() for c in self.classes_])
        if len(self.classes_) < 2:
            self.model_ = None
            return self
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            self.model_ = LogisticRegression(C=self.C, max_iter=2000).fit(Z, b)
        return self

    def predict_proba(self, X):
        if self.model_ is None:
            return np.ones((len(X), 1))
        return self.model_.predict_proba(self._scale(X))

    def predict(self, X):
        return self.predict_proba(X) @ self.bin_mean_


class PairwiseRankProbe(_Scaled):
    def __init__(self, pairs_per_item: int = 20, C: float = 0.01, max_pairs: int = 10000, seed: int = 0):
        self.pairs_per_item, self.C, self.max_pairs, self.seed = pairs_per_item, C, max_pairs, seed

    def fit(self, X, y):
        from sklearn.linear_model import LogisticRegression

        y = np.asarray(y, dtype=float)
        Z = self._scale_fit(X)
        rng = np.random.default_rng(self.seed)
        n = len(y)
        m = max(1, min(int(self.pairs_per_item) * n, int(self.max_pairs)))  # 5k rows x 2.5k dims: bound memory
        i, j = rng.integers(0, n, m), rng.integers(0, n, m)
        keep = y[i] != y[j]
        i, j = i[keep], j[keep]
        if len(i) == 0:
            self.w_ = np.zeros(Z.shape[1])
        else:
            D = np.vstack([Z[i] - Z[j], Z[j] - Z[i]])
            lab = np.concatenate([y[i] > y[j], y[j] > y[i]]).astype(int)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                self.w_ = LogisticRegression(C=self.C, fit_intercept=False, max_iter=2000).fit(D, lab).coef_.ravel()
        s = Z @ self.w_
        if np.ptp(s) > 0:
            a, b = np.polyfit(s, _log(y), 1)
            a = max(float(a), 1e-9)  # keep the map increasing
        else:
            a, b = 1e-9, float(np.mean(_log(y)))
        self.a_, self.b_ = a, float(b)
        return self

    def decision_function(self, X):
        return self._scale(X) @ self.w_

    def predict(self, X):
        return _exp(self.a_ * self.decision_function(X) + self.b_)


def make_probe(name: str, seed: int = 0, **params):
    from rtlm_lab.errors import UserError

    if name == "ridge":
        return RidgeProbe(**params)
    if name == "mlp":
        return MLPProbe(seed=seed, **params)
    if name == "ordinal":
        return OrdinalBinsProbe(seed=seed, **params)
    if name == "rank":
        return PairwiseRankProbe(seed=seed, **params)
    raise UserError(f"unknown probe {name!r}; choose one of: {', '.join(PROBES)}")
