"""RT-LM's output-length predictor: a light regressor over uncertainty features, recalibrated at run time.

:class:`LengthPredictor` follows the scikit-learn conventions (hyper-parameters in ``__init__``, learned
state with a trailing underscore, ``get_params``/``clone``/joblib all work):

* ``fit(texts, lengths)`` / ``predict(texts)`` / ``predict_quantile(texts, q)``;
* ``update(text, observed_length)``: run-time recalibration (see below);
* ``save(path)`` / ``LengthPredictor.load(path)``: joblib with library versions recorded; a corrupt, foreign
  or version-mismatched file is a one-line :class:`~rtlm_lab.errors.UserError`.

Choices, documented once:

* **Target**: ``log1p(n_output_tokens)`` (``log_target=True``, the default). Output lengths are
  right-skewed and capped at ``max_new_tokens``; a log target keeps the long tail from dominating a squared
  loss and makes the residual correction multiplicative (an LM that answers twice as long shifts every
  log-prediction by ``log 2``). Predictions are ``expm1`` of it, clipped at 0. ``log_target=False`` fits raw
  lengths.
* **Features**: :data:`rtlm_lab.regressor.features.FEATURE_NAMES` (six scores, ``total``, log words, log
  spaCy tokens); ``use_embedding=True`` appends the 384-d MiniLM sentence embedding. The served LM's own
  prefill states (``use_prefill`` in ``conf/regressor``) are not features of this class: they need the LM in
  the process; :mod:`rtlm_lab.regressor.lmstate` (``LMStatePredictor``, probes) provides them, and
  ``compare(..., prefill=...)`` adds ``rtlm_<kind>_prefill`` (these features + entropy, end-of-turn
  probability and prompt tokens of the prefill pass) and the ``lmstate_*`` probes to the comparison.
* **Kinds** (each a scikit-learn ``Pipeline``): ``ridge`` (StandardScaler + Ridge), ``hgb``
  (HistGradientBoostingRegressor, squared error), ``quantile`` (HGB with ``loss="quantile"``: the point
  prediction is the p50 model, and one model per entry of ``quantiles``), ``mlp`` (StandardScaler +
  MLPRegressor).
* **Quantiles**: ``quantile`` uses its fitted quantile models for the q's it was fitted for; every other
  q (and every other kind) adds the empirical q-quantile of the *training* residuals (target space) to the
  point prediction: a simple, optimistic (in-sample) band.
* **Recalibration** (``update``): the training predictions are cut into ``recal_buckets`` buckets (their
  quantiles). Each observation updates an exponentially-forgetting mean of the residual (target space) of
  its bucket and a global one, with forgetting ``recal_decay`` (weight of the newest observation, once a
  bucket has seen ``1/recal_decay`` of them; before that a plain running mean). The correction added to a
  prediction is the bucket's mean shrunk toward the global one by ``n_b / (n_b + recal_prior)`` (``n_b``:
  the bucket's effective count), so a global shift (e.g. a longer-winded LM) is learnt from the first few
  requests while bucket-specific errors are learnt as they come. ``reset_recalibration()`` forgets it.
"""

from __future__ import annotations

import copy
import math
from pathlib import Path
from typing import Sequence

import numpy as np
from sklearn.base import BaseEstimator, RegressorMixin

from rtlm_lab.errors import UserError
from rtlm_lab.regressor import features as F

KINDS = ("ridge", "hgb", "quantile", "mlp")
FILE_FORMAT = "rtlm_lab.regressor.LengthPredictor"
FILE_VERSION = 1
VERSIONED = ("scikit-learn", "numpy", "joblib", "rtlm_lab")


def _versions() -> dict[str, str]:
    from rtlm_lab.io import package_versions

    return package_versions(VERSIONED)


def _minor(v: str) -> str:
    return ".".join(str(v).split(".")[:2])


class LengthPredictor(RegressorMixin, BaseEstimator):
    """Predict an LM's output length (tokens) from a request's text; see the module doc."""

    def __init__(self, kind: str = "ridge", use_embedding: bool = False, log_target: bool = True,
                 alpha: float = 1.0, max_iter: int = 200, learning_rate: float = 0.05, max_leaf_nodes: int = 15,
                 min_samples_leaf: int = 10, hidden_layer_sizes: tuple = (64, 32), mlp_alpha: float = 1e-3,
                 quantiles: tuple = (0.5, 0.9), recal_buckets: int = 5, recal_decay: float = 0.05,
                 recal_prior: float = 5.0, random_state: int = 0):
        self.kind = kind
        self.use_embedding = use_embedding
        self.log_target = log_target
        self.alpha = alpha
        self.max_iter = max_iter
        self.learning_rate = learning_rate
        self.max_leaf_nodes = max_leaf_nodes
        self.min_samples_leaf = min_samples_leaf
        self.hidden_layer_sizes = hidden_layer_sizes
        self.mlp_alpha = mlp_alpha
        self.quantiles = quantiles
        self.recal_buckets = recal_buckets
        self.recal_decay = recal_decay
        self.recal_prior = recal_prior
        self.random_state = random_state

    # ------------------------------------------------------------------------------------- features
    def featurize(self, texts: Sequence[str]) -> np.ndarray:
        """The model's input matrix for ``texts`` (uncertainty features [+ embedding])."""
        X = F.uncertainty_features(texts)
        if self.use_embedding:
            X = np.hstack([X, F.embed(texts).astype(float)])
        return X

    def _target(self, lengths) -> np.ndarray:
        y = np.asarray(lengths, dtype=float)
        y = np.clip(np.nan_to_num(y, nan=0.0), 0.0, None)
        return np.log1p(y) if self.log_target else y

    def _inverse(self, z: np.ndarray) -> np.ndarray:
        z = np.asarray(z, dtype=float)
        out = np.expm1(np.clip(z, -50, 50)) if self.log_target else z
        return np.clip(np.nan_to_num(out, nan=0.0), 0.0, None)

    def _make(self, quantile: float | None = None):
        from sklearn.ensemble import HistGradientBoostingRegressor
        from sklearn.linear_model import Ridge
        from sklearn.neural_network import MLPRegressor
        from sklearn.pipeline import Pipeline
        from sklearn.preprocessing import StandardScaler

        hgb = dict(max_iter=self.max_iter, learning_rate=self.learning_rate, max_leaf_nodes=self.max_leaf_nodes,
                   min_samples_leaf=self.min_samples_leaf, random_state=self.random_state)
        if self.kind == "ridge":
            return Pipeline([("scale", StandardScaler()), ("ridge", Ridge(alpha=self.alpha))])
        if self.kind == "hgb":
            return Pipeline([("hgb", HistGradientBoostingRegressor(**hgb))])
        if self.kind == "quantile":
            return Pipeline([("hgb", HistGradientBoostingRegressor(loss="quantile", quantile=quantile or 0.5,
                                                                   **hgb))])
        if self.kind == "mlp":
            return Pipeline([("scale", StandardScaler()),
                             ("mlp", MLPRegressor(hidden_layer_sizes=tuple(self.hidden_layer_sizes),
                                                  alpha=self.mlp_alpha, max_iter=max(self.max_iter, 500),
                                                  learning_rate_init=1e-3, random_state=self.random_state))])
        raise UserError(f"unknown regressor kind {self.kind!r}; choose one of: {', '.join(KINDS)}")

    # ------------------------------------------------------------------------------------------ fit
    def fit(self, texts: Sequence[str], lengths: Sequence[float], X: np.ndarray | None = None):
        """Fit on request texts and their observed output lengths (``X``: precomputed :meth:`featurize`)."""
        import warnings

        from sklearn.exceptions import ConvergenceWarning

        X = self.featurize(texts) if X is None else np.asarray(X, dtype=float)
        y = self._target(lengths)
        if len(y) != len(X) or len(y) < 2:
            raise UserError(f"need at least 2 (text, length) pairs of equal count, got {len(X)} and {len(y)}")
        self.n_features_in_ = X.shape[1]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ConvergenceWarning)
            self.model_ = self._make(0.5).fit(X, y)
            self.quantile_models_ = {}
            if self.kind == "quantile":
                for q in self.quantiles:
                    q = float(q)
                    self.quantile_models_[q] = self.model_ if q == 0.5 else self._make(q).fit(X, y)
        fitted = self.model_.predict(X)
        self.residuals_ = np.sort(y - fitted)
        self.train_mean_ = float(np.mean(lengths))
        nb = max(1, int(self.recal_buckets))
        self.bucket_edges_ = np.unique(np.quantile(fitted, np.linspace(0, 1, nb + 1)[1:-1])) if nb > 1 \
            else np.array([])
        self.reset_recalibration()
        return self

    def reset_recalibration(self):
        nb = len(self.bucket_edges_) + 1
        self.bucket_bias_ = np.zeros(nb)
        self.bucket_n_ = np.zeros(nb)
        self.global_bias_ = 0.0
        self.global_n_ = 0.0
        self.n_updates_ = 0
        return self

    # -------------------------------------------------------------------------------------- predict
    def _check(self):
        if not hasattr(self, "model_"):
            from sklearn.exceptions import NotFittedError

            raise NotFittedError("LengthPredictor is not fitted; call fit(texts, lengths) first")

    def _bucket(self, z: np.ndarray) -> np.ndarray:
        return np.searchsorted(self.bucket_edges_, z, side="right")

    def _correction(self, z_base: np.ndarray) -> np.ndarray:
        b = self._bucket(z_base)
        n = self.bucket_n_[b]
        w = n / (n + float(self.recal_prior))
        return w * self.bucket_bias_[b] + (1 - w) * self.global_bias_

    def predict_target(self, X: np.ndarray, recalibrated: bool = True) -> np.ndarray:
        """Predictions in target space (log1p tokens by default) from a feature matrix."""
        self._check()
        X = np.asarray(X, dtype=float)
        if len(X) == 0:
            return np.zeros(0)
        z = self.model_.predict(X)
        if recalibrated and self.n_updates_:
            z = z + self._correction(z)
        return z

    def predict_from_features(self, X: np.ndarray, recalibrated: bool = True) -> np.ndarray:
        return self._inverse(self.predict_target(X, recalibrated))

    def predict(self, texts: Sequence[str], recalibrated: bool = True) -> np.ndarray:
        """Predicted output tokens (float, >= 0), one per text."""
        self._check()
        return self.predict_from_features(self.featurize(texts), recalibrated)

    def predict_quantile(self, texts: Sequence[str], q: float = 0.9, X: np.ndarray | None = None) -> np.ndarray:
        """The q-quantile of the output length (see the module doc for how it is obtained)."""
        self._check()
        q = float(q)
        if not 0.0 < q < 1.0:
            raise UserError(f"quantile must be in (0, 1), got {q}")
        X = self.featurize(texts) if X is None else np.asarray(X, dtype=float)
        if len(X) == 0:
            return np.zeros(0)
        if q in self.quantile_models_:
            z = self.quantile_models_[q].predict(X)
            if self.n_updates_:
                z = z + self._correction(self.model_.predict(X))
        else:
            z = self.predict_target(X) + float(np.quantile(self.residuals_, q)) - float(np.median(self.residuals_))
        return self._inverse(z)

    # ------------------------------------------------------------------------------- recalibration
    def update(self, text: str | Sequence[str], observed_length: float | Sequence[float],
               X: np.ndarray | None = None):
        """Run-time recalibration with the observed output length of a served request (or of a list)."""
        self._check()
        if isinstance(text, str) or text is None:
            texts, ys = [text], [observed_length]
        else:
            texts, ys = list(text), list(np.atleast_1d(observed_length))
        X = self.featurize(texts) if X is None else np.atleast_2d(np.asarray(X, dtype=float))
        z = self.model_.predict(X)
        for zi, yi in zip(z, self._target(ys)):
            if not math.isfinite(yi):
                continue
            r = float(yi - zi)
            b = int(self._bucket(np.array([zi]))[0])
            lam = float(self.recal_decay)
            self.bucket_n_[b] = (1 - lam) * self.bucket_n_[b] + 1
            self.bucket_bias_[b] += (r - self.bucket_bias_[b]) / self.bucket_n_[b]
            self.global_n_ = (1 - lam) * self.global_n_ + 1
            self.global_bias_ += (r - self.global_bias_) / self.global_n_
            self.n_updates_ += 1
        return self

    # ---------------------------------------------------------------------------------- persistence
    def save(self, path: str | Path) -> Path:
        """joblib file holding the predictor and the library versions it was fitted with (atomic write)."""
        import joblib

        from rtlm_lab.io import atomic_path

        self._check()
        path = Path(path)
        payload = {"format": FILE_FORMAT, "file_version": FILE_VERSION, "versions": _versions(),
                   "params": self.get_params(), "predictor": self}
        with atomic_path(path) as tmp:
            joblib.dump(payload, tmp)
        return path

    @classmethod
    def load(cls, path: str | Path, strict_versions: bool = True) -> "LengthPredictor":
        """Load :meth:`save`'s file; one-line :class:`UserError` if missing, corrupt, foreign or (with
        ``strict_versions``) saved by another scikit-learn minor version (pickles may not carry over)."""
        import joblib

        path = Path(path)
        if not path.is_file():
            raise UserError(f"no predictor file at {path}; train one with `rtlm-train-regressor`")
        try:
            payload = joblib.load(path)
        except Exception as exc:  # noqa: BLE001 - any unpickling failure is a bad file
            raise UserError(f"cannot read predictor {path}: {type(exc).__name__}: {exc}".splitlines()[0]) from exc
        if not isinstance(payload, dict) or payload.get("format") != FILE_FORMAT \
                or not isinstance(payload.get("predictor"), cls):
            raise UserError(f"{path} is not a LengthPredictor file (written by LengthPredictor.save)")
        if payload.get("file_version") != FILE_VERSION:
            raise UserError(f"{path}: predictor file version {payload.get('file_version')} != {FILE_VERSION}")
        saved = payload.get("versions", {}).get("scikit-learn", "?")
        now = _versions()["scikit-learn"]
        if strict_versions and _minor(saved) != _minor(now):
            raise UserError(f"{path} was saved with scikit-learn {saved}, this is {now}; retrain it "
                            f"(or load with strict_versions=False)")
        pred = payload["predictor"]
        pred.saved_versions_ = payload.get("versions", {})
        return pred

    def copy(self) -> "LengthPredictor":
        return copy.deepcopy(self)
