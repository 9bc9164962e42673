"""The length predictions each policy ranks by, fitted on requests *outside* the workload.

A profile's requests are split by conversation (seeded): the ``train`` share fits the predictors, the
held-out share is the pool workloads draw from, so no policy has seen the requests it schedules.

=============  ==========================================================  ===========================
column         what                                                        used by
=============  ==========================================================  ===========================
pred_rtlm      :class:`~rtlm_lab.regressor.LengthPredictor` (uncertainty     ``rtlm*``
               features, ridge) -> predicted output tokens
uncertainty    the quantifier's total uncertainty in [0, 1]                 ``rtlm*``
pred_proxy     ridge on the MiniLM embedding (the SSJF/S3 BERT-class        ``sjf_proxy``
               proxy) -> predicted tokens
ltr_score      pairwise logistic ranking on MiniLM (vLLM-LTR style)         ``ltr``
pred_quantiles :class:`~rtlm_lab.regressor.distribution.QuantileLengthPre-  ``gittins``, ``srpt_expected``
               dictor` (the same uncertainty features, one HGB quantile
               model per level): a tuple of output-token quantiles at
               :data:`QUANTILE_LEVELS`, sorted (a list per row in parquet)
=============  ==========================================================  ===========================

``pred_quantiles`` is fitted only when asked for (``columns``; the harness asks when the policy needs it), so
the default column set, its cache keys and every committed run are unchanged.

:class:`Predictors` can be recalibrated at run time (``update(texts, lengths)``: the scheduler's
``scheduler.online_update``) and serves one request at a time (``predict_one``, timed: that time is the policy's run-time
overhead) or a batch (``predict_many``: the simulator; the same values for the RT-LM columns, the MiniLM columns
differ by ~3e-6 relative between one text and a padded batch).
"""

from __future__ import annotations

import hashlib
import logging
import threading
import time
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import pandas as pd

from rtlm_lab.errors import UserError

log = logging.getLogger("rtlm_lab.scheduler")

ALL_COLUMNS = ("pred_rtlm", "uncertainty", "pred_proxy", "ltr_score")
#: the distributional column (not in the default set: fitted when a policy needs it) and its levels
DIST_COLUMNS = ("pred_quantiles",)
KNOWN_COLUMNS = ALL_COLUMNS + DIST_COLUMNS
QUANTILE_LEVELS = (0.05, 0.1, 0.25, 0.5, 0.75, 0.9, 0.95)   # = rtlm_lab.distmetrics.DEFAULT_LEVELS
# the real engine's predictor thread predicts while the serving loop updates (scheduler.online_update)
_LOCK = threading.RLock()


def columns_for(needs: Sequence[str]) -> tuple[str, ...]:
    """The columns to fit for a policy that needs ``needs``: the default set, plus the distributional column
    when the policy reads it (the default set's cache keys stay as they were)."""
    return ALL_COLUMNS + tuple(c for c in DIST_COLUMNS if c in tuple(needs))


def split_pool(profile: pd.DataFrame, heldout_frac: float, seed: int) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(train, held-out) requests of a profile, split by conversation."""
    from rtlm_lab.regressor.evaluate import split_by_conversation

    need = {"request_id", "text", "n_input_tokens", "n_output_tokens"}
    missing = need - set(profile.columns)
    if missing:
        raise UserError(f"not a profile: missing columns {', '.join(sorted(missing))}")
    if not 0 < heldout_frac < 1:
        raise UserError(f"scheduler.heldout_frac must be in (0, 1) (got {heldout_frac})")
    df = profile[profile["n_output_tokens"].notna()].reset_index(drop=True)
    tr, te = split_by_conversation(df, test_size=heldout_frac, seed=seed)
    return df.iloc[tr].reset_index(drop=True), df.iloc[te].reset_index(drop=True)


class Predictors:
    """Fitted length predictors for one LM/platform (see the module doc)."""

    def __init__(self, columns: Sequence[str] = ALL_COLUMNS, seed: int = 0):
        unknown = set(columns) - set(KNOWN_COLUMNS)
        if unknown:
            raise UserError(f"unknown prediction columns {sorted(unknown)}")
        self.columns = tuple(columns)
        self.seed = seed

    def fit(self, texts: Sequence[str], lengths: Sequence[float]) -> "Predictors":
        from rtlm_lab.regressor import LengthPredictor
        from rtlm_lab.regressor import features as F
        from rtlm_lab.regressor.baselines import LtrMiniLM, ProxyMiniLM

        texts = [str(t) for t in texts]
        y = np.asarray(lengths, float)
        if len(texts) < 5:
            raise UserError(f"need at least 5 training requests for the predictors (got {len(texts)})")
        self.rtlm_ = LengthPredictor(kind="ridge", random_state=self.seed).fit(texts, y) \
            if {"pred_rtlm", "uncertainty"} & set(self.columns) else None
        E = F.embed(texts).astype(float) if {"pred_proxy", "ltr_score"} & set(self.columns) else None
        self.proxy_ = ProxyMiniLM().fit(texts, y, E=E) if "pred_proxy" in self.columns else None
        self.ltr_ = LtrMiniLM(seed=self.seed).fit(texts, y, E=E) if "ltr_score" in self.columns else None
        self.quantiles_ = None
        if "pred_quantiles" in self.columns:
            from rtlm_lab.regressor.distribution import QuantileLengthPredictor

            Xq = self.rtlm_.featurize(texts) if self.rtlm_ is not None else QuantileLengthPredictor.featurize(texts)
            self.quantiles_ = QuantileLengthPredictor(levels=QUANTILE_LEVELS, random_state=self.seed).fit(Xq, y)
        self.n_train_ = len(texts)
        return self

    def predict_many(self, texts: Sequence[str]) -> pd.DataFrame:
        from rtlm_lab.regressor import features as F
        from rtlm_lab.uncertainty import quantify

        texts = [str(t) for t in texts]
        out: dict[str, Any] = {}
        X = None
        if self.rtlm_ is not None:
            X = self.rtlm_.featurize(texts)
            out["pred_rtlm"] = self.rtlm_.predict_from_features(X)
            out["uncertainty"] = quantify(texts)["total"].to_numpy(float) if "uncertainty" in self.columns else None
        if getattr(self, "quantiles_", None) is not None:
            X = self.quantiles_.featurize(texts) if X is None else X
            out["pred_quantiles"] = [list(map(float, q)) for q in self.quantiles_.predict_quantiles(X)]
        if self.proxy_ is not None or self.ltr_ is not None:
            E = F.embed(texts).astype(float)
            if self.proxy_ is not None:
                out["pred_proxy"] = self.proxy_.predict(texts, E=E)
            if self.ltr_ is not None:
                out["ltr_score"] = self.ltr_.predict(texts, E=E)
        return pd.DataFrame({k: v for k, v in out.items() if v is not None}, index=range(len(texts)))

    def predict_batch(self, texts: Sequence[str], columns: Sequence[str]) -> list[dict[str, Any]]:
        """Predictions (only ``columns``) for a batch of arriving requests: what the engine's predictor thread
        runs on everything that arrived while it was busy (one spaCy pipe / one MiniLM batch)."""
        from rtlm_lab.regressor import FEATURE_NAMES
        from rtlm_lab.regressor import features as F

        texts = [str(t) for t in texts]
        cols = set(columns)
        out: dict[str, np.ndarray] = {}
        X = None
        if cols & {"pred_rtlm", "uncertainty"}:
            X = self.rtlm_.featurize(texts)
            with _LOCK:
                out["pred_rtlm"] = self.rtlm_.predict_from_features(X)
            out["uncertainty"] = X[:, FEATURE_NAMES.index("total")]
        Q = None
        if "pred_quantiles" in cols:  # the same features (one spaCy pass)
            X = self._quantile_model().featurize(texts) if X is None else X
            with _LOCK:
                Q = self.quantiles_.predict_quantiles(X)
        if cols & {"pred_proxy", "ltr_score"}:
            E = F.embed(texts).astype(float)
            if "pred_proxy" in cols:
                out["pred_proxy"] = self.proxy_.predict(texts, E=E)
            if "ltr_score" in cols:
                out["ltr_score"] = self.ltr_.predict(texts, E=E)
        rows: list[dict[str, Any]] = [{k: float(v[i]) for k, v in out.items()} for i in range(len(texts))]
        if Q is not None:
            for r, q in zip(rows, Q):
                r["pred_quantiles"] = tuple(float(v) for v in q)
        return rows

    def update(self, texts: Sequence[str], lengths: Sequence[float]) -> int:
        """Run-time recalibration with served requests' true generated lengths: forwarded to every fitted
        regressor that has ``update`` (RT-LM's :class:`~rtlm_lab.regressor.LengthPredictor`; the MiniLM
        baselines have none and stay as fitted). Returns the number of (text, length) pairs taken."""
        texts = [str(t) for t in texts]
        ys = [float(v) for v in lengths]
        if len(texts) != len(ys):
            raise UserError(f"update: {len(texts)} texts but {len(ys)} lengths")
        if not texts:
            return 0
        took = False
        Xq = None
        if getattr(self, "quantiles_", None) is not None:  # conformal-style shift of each level (run time)
            Xq = self.quantiles_.featurize(texts)
            with _LOCK:
                self.quantiles_.update(Xq, ys)
            took = True
        for reg in (getattr(self, "rtlm_", None), getattr(self, "proxy_", None), getattr(self, "ltr_", None)):
            if reg is not None and callable(getattr(reg, "update", None)):
                same = Xq is not None and reg is self.rtlm_ and not reg.use_embedding  # the same features
                X = Xq if same else (reg.featurize(texts) if hasattr(reg, "featurize") else None)
                with _LOCK:
                    reg.update(texts, ys, X=X) if X is not None else reg.update(texts, ys)
                took = True
        return len(texts) if took else 0

    def _quantile_model(self):
        if getattr(self, "quantiles_", None) is None:
            raise UserError("pred_quantiles was not fitted: build Predictors with columns including "
                            "'pred_quantiles' (load_or_fit(..., columns=...))")
        return self.quantiles_

    def predict_one(self, text: str, columns: Sequence[str]) -> tuple[dict[str, Any], float]:
        """Predictions for one arriving request (only ``columns``) and the seconds they took."""
        from rtlm_lab.regressor import FEATURE_NAMES
        from rtlm_lab.regressor import features as F

        t0 = time.perf_counter()
        out: dict[str, Any] = {}
        cols = set(columns)
        X = None
        if cols & {"pred_rtlm", "uncertainty"}:
            X = self.rtlm_.featurize([text])
            out["pred_rtlm"] = float(self.rtlm_.predict_from_features(X)[0])
            # the total uncertainty is one of the predictor's features: no second spaCy pass
            out["uncertainty"] = float(X[0, FEATURE_NAMES.index("total")])
        if "pred_quantiles" in cols:
            X = self._quantile_model().featurize([text]) if X is None else X
            out["pred_quantiles"] = tuple(float(v) for v in self.quantiles_.predict_quantiles(X)[0])
        if cols & {"pred_proxy", "ltr_score"}:
            E = F.embed([text]).astype(float)
            if "pred_proxy" in cols:
                out["pred_proxy"] = float(self.proxy_.predict([text], E=E)[0])
            if "ltr_score" in cols:
                out["ltr_score"] = float(self.ltr_.predict([text], E=E)[0])
        return out, time.perf_counter() - t0


def profile_key(profile_path: Path, heldout_frac: float, seed: int, columns: Sequence[str]) -> str:
    from rtlm_lab.io import sha256_file

    h = hashlib.sha256(f"{sha256_file(profile_path)}|{heldout_frac}|{seed}|{','.join(columns)}".encode())
    return h.hexdigest()[:16]


def load_or_fit(profile_path: Path, profile: pd.DataFrame, heldout_frac: float, seed: int,
                columns: Sequence[str] = ALL_COLUMNS, cache_dir: Path | None = None,
                need_model: bool = True) -> tuple[Predictors | None, pd.DataFrame, pd.DataFrame]:
    """Fitted predictors, the train pool and the held-out pool (with predictions for every held-out request).

    Cached per (profile sha256, split, columns) under ``cache_dir`` (joblib + parquet); a cache that does not
    load is refitted (and overwritten), never trusted. ``need_model=False`` (offline predictions, e.g. on a
    GPU box without spaCy) only reads the cached held-out predictions and returns ``None`` as predictors.
    """
    import joblib

    from rtlm_lab.io import atomic_path, write_parquet_atomic

    train, held = split_pool(profile, heldout_frac, seed)
    key = profile_key(profile_path, heldout_frac, seed, columns)
    if cache_dir is not None:
        jpath, ppath = Path(cache_dir) / f"predictors-{key}.joblib", Path(cache_dir) / f"heldout-{key}.parquet"
        if not need_model:
            try:
                held_pred = pd.read_parquet(ppath)
            except Exception as exc:  # noqa: BLE001
                raise UserError(f"no usable cached predictions {ppath.name} for {profile_path} "
                                f"({type(exc).__name__}); run once with scheduler.online_predictions=true where "
                                "the quantifier (spaCy, WordNet) is installed") from None
            if list(held_pred["request_id"]) != list(held["request_id"].astype(str)):
                raise UserError(f"cached predictions {ppath.name} do not match {profile_path}")
            return None, train, held_pred
        if jpath.is_file() and ppath.is_file():
            try:
                pred = joblib.load(jpath)
                held_pred = pd.read_parquet(ppath)
                if list(held_pred["request_id"]) == list(held["request_id"].astype(str)):
                    return pred, train, held_pred
                log.warning("predictor cache %s does not match the profile; refitting", key)
            except Exception as exc:  # noqa: BLE001 - corrupt cache: refit
                log.warning("predictor cache %s unreadable (%s); refitting", key, type(exc).__name__)
    t0 = time.perf_counter()
    pred = Predictors(columns, seed=seed).fit(train["text"].fillna("").tolist(), train["n_output_tokens"])
    p = pred.predict_many(held["text"].fillna("").tolist())
    held = held.copy()
    held["request_id"] = held["request_id"].astype(str)
    for c in p.columns:
        held[c] = p[c].to_numpy()
    log.info("predictors fitted on %d requests, %d held out (%.1f s)", len(train), len(held), time.perf_counter() - t0)
    if cache_dir is not None:
        Path(cache_dir).mkdir(parents=True, exist_ok=True)
        with atomic_path(jpath) as tmp:
            joblib.dump(pred, tmp)
        write_parquet_atomic(held, ppath)
    return pred, train, held


def given_prediction_cost(sched: Mapping[str, Any], needs) -> tuple[float, str] | None:
    """Sim mode: the per-request prediction cost ``scheduler.prediction_cost_s`` gives for these prediction
    columns (seconds; ``uncertainty`` comes with ``pred_rtlm``), e.g. measured on the platform the simulation
    stands for, and where it was measured (its ``source``, else "given"); ``None`` where no cost is given
    (then it is timed on this machine)."""
    cost = sched.get("prediction_cost_s")
    if not cost:
        return None
    source = str(cost.get("source", "given"))
    cols = [c for c in needs if c != "uncertainty"]
    missing = [c for c in cols if c not in cost]
    if missing:
        raise UserError(f"scheduler.prediction_cost_s gives no cost for {missing} (it has {sorted(cost)})")
    try:
        return sum(float(cost[c]) for c in cols), source
    except (TypeError, ValueError):
        raise UserError(f"scheduler.prediction_cost_s values must be seconds (got {dict(cost)})") from None
