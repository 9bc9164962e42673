"""Length-prediction metrics and by-conversation splits, shared by :mod:`rtlm_lab.regressor`,
:mod:`rtlm_lab.uncertainty` and :mod:`rtlm_lab.scheduler` (a helper module: it imports no other layer).

* conversations: :func:`conversation_ids` (the conversation of each row), :func:`split_by_conversation`
  (train/test with every conversation on one side), :func:`bootstrap_index` (row or whole-conversation
  resamples);
* metrics of predicted against true output lengths: :func:`kendall`, :func:`spearman` (NaN for fewer than 3
  rows or a constant side), :func:`pairwise_accuracy`, tertile buckets (:func:`bucket_edges`,
  :func:`buckets`) and :func:`score`, one method's row of the comparison table of
  :mod:`rtlm_lab.regressor.evaluate` (which re-exports all of them under their old names).
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd

from rtlm_lab.bootstrap import percentile_ci
from rtlm_lab.errors import UserError


# ---------------------------------------------------------------------------------------- conversations
def conversation_ids(df: pd.DataFrame) -> np.ndarray:
    """Conversation of each row: its ``conv_id`` (profiles since ``data=prompts``), else ``request_id`` up
    to its last ``-`` (the CCC convention; older profiles), else the row index."""
    if "request_id" not in df.columns and "conv_id" not in df.columns:
        return np.arange(len(df)).astype(str)
    rids = df["request_id"] if "request_id" in df.columns else pd.Series(np.arange(len(df)).astype(str))
    convs = df["conv_id"] if "conv_id" in df.columns else pd.Series([None] * len(df))
    return np.array([str(c) if c is not None and c == c and str(c) else str(r).rsplit("-", 1)[0]
                     for c, r in zip(convs, rids)])


def split_by_conversation(df: pd.DataFrame, test_size: float = 0.3, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    from sklearn.model_selection import GroupShuffleSplit

    groups = conversation_ids(df)
    if len(set(groups)) < 2:
        raise UserError("need requests from at least 2 conversations to split train/test")
    gss = GroupShuffleSplit(n_splits=1, test_size=test_size, random_state=seed)
    tr, te = next(gss.split(np.zeros(len(df)), groups=groups))
    return np.sort(tr), np.sort(te)


def bootstrap_index(groups: np.ndarray, n_bootstrap: int, seed: int, by: str = "row") -> list[np.ndarray] | None:
    """Bootstrap resamples of positions ``0..len(groups)-1``: rows with replacement (``by="row"``) or whole
    conversations with replacement, all rows of a drawn conversation kept (``by="conversation"``; resamples
    then vary in size). ``None`` when there are too few rows."""
    n = len(groups)
    if not n_bootstrap or n <= 2:
        return None
    rng = np.random.default_rng(seed)
    if by == "row":
        return list(rng.integers(0, n, size=(int(n_bootstrap), n)))
    if by != "conversation":
        raise UserError(f"bootstrap_by must be 'row' or 'conversation', got {by!r}")
    uniq, inv = np.unique(np.asarray(groups), return_inverse=True)
    members = [np.flatnonzero(inv == g) for g in range(len(uniq))]
    return [np.concatenate([members[c] for c in rng.integers(0, len(uniq), len(uniq))]) for _ in range(int(n_bootstrap))]


# ---------------------------------------------------------------------------------------------- metrics
def kendall(a: np.ndarray, b: np.ndarray) -> float:
    from scipy.stats import kendalltau

    if len(a) < 3 or np.ptp(a) == 0 or np.ptp(b) == 0:
        return math.nan
    return float(kendalltau(a, b).statistic)


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    from scipy.stats import spearmanr

    if len(a) < 3 or np.ptp(a) == 0 or np.ptp(b) == 0:
        return math.nan
    return float(spearmanr(a, b).statistic)


def pairwise_accuracy(y: np.ndarray, p: np.ndarray) -> float:
    y, p = np.asarray(y, float), np.asarray(p, float)
    dy = np.sign(y[:, None] - y[None, :])
    dp = np.sign(p[:, None] - p[None, :])
    iu = np.triu_indices(len(y), 1)
    dy, dp = dy[iu], dp[iu]
    m = dy != 0
    if not m.any():
        return math.nan
    return float(np.mean(np.where(dp[m] == 0, 0.5, (dp[m] == dy[m]).astype(float))))


def bucket_edges(train_y: np.ndarray) -> np.ndarray:
    return np.quantile(np.asarray(train_y, float), [1 / 3, 2 / 3])


def buckets(values: np.ndarray, edges: np.ndarray) -> np.ndarray:
    return np.searchsorted(edges, np.asarray(values, float), side="right")


def score(y: np.ndarray, pred: np.ndarray, train_y: np.ndarray, rank_only: bool = False,
          train_pred: np.ndarray | None = None, n_bootstrap: int = 0, seed: int = 0,
          idx: list[np.ndarray] | None = None) -> dict[str, float]:
    """Metrics of one method on the test rows. The tau CI: over ``idx`` (resampled positions, e.g. whole
    conversations from :func:`bootstrap_index`: scipy's bootstrap cannot resample clusters) where given,
    else :func:`rtlm_lab.bootstrap.percentile_ci` over ``n_bootstrap`` row resamples drawn from ``seed`` (the
    same resamples for every method given that seed)."""
    y, pred = np.asarray(y, float), np.asarray(pred, float)
    edges = bucket_edges(train_y)
    if rank_only:
        tp = np.asarray(train_pred, float)
        shares = [np.mean(np.asarray(train_y) < e) for e in edges]
        pedges = np.quantile(tp, np.clip(shares, 0, 1)) if len(tp) else edges
        bacc = float(np.mean(buckets(pred, pedges) == buckets(y, edges)))
    else:
        bacc = float(np.mean(buckets(pred, edges) == buckets(y, edges)))
    out = {"mae": math.nan if rank_only else float(np.mean(np.abs(pred - y))),
           "spearman": spearman(pred, y), "kendall_tau": kendall(pred, y),
           "tau_ci_low": math.nan, "tau_ci_high": math.nan, "pairwise_acc": pairwise_accuracy(y, pred),
           "bucket_acc": bacc, "n_test": int(len(y))}
    if idx is not None and len(idx) and math.isfinite(out["kendall_tau"]):
        taus = np.array([kendall(pred[r], y[r]) for r in idx])
        ok = taus[np.isfinite(taus)]
        if len(ok) >= max(2, 0.5 * len(taus)):
            out["tau_ci_low"], out["tau_ci_high"] = (float(v) for v in np.quantile(ok, [0.025, 0.975]))
    elif n_bootstrap and len(y) > 2 and math.isfinite(out["kendall_tau"]):
        out["tau_ci_low"], out["tau_ci_high"] = percentile_ci((pred, y), kendall, n_bootstrap, seed,
                                                              vectorized=False)
    return out
