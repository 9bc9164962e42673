"""Distributional length predictions: how a set of predicted quantiles becomes a discrete distribution, and how
such predictions are scored (a helper module: it imports numpy and scipy only, no other layer of ``rtlm_lab``).

A prediction is a row of quantiles ``q[0] <= ... <= q[K-1]`` of the output length at increasing ``levels``
(e.g. 0.05, 0.1, 0.25, 0.5, 0.75, 0.9, 0.95). Used by :mod:`rtlm_lab.regressor.distribution` (the predictor)
and :mod:`rtlm_lab.scheduler.gittins` (the Gittins index of the distribution).

* :func:`quantiles_to_discrete`: the **midpoint rule**. Each quantile becomes a support point carrying the
  probability between the midpoints of its level and its neighbours' (the first from 0, the last to 1): for the
  default levels the masses are 0.075, 0.1, 0.2, 0.25, 0.2, 0.1, 0.075. Equal quantiles merge into one point.
  The tails beyond the outer levels are lumped into the outer points (no extrapolation: the distribution's
  support is bounded by the outer quantiles).
* :func:`pinball_loss`: mean pinball (quantile) loss per level, ``mean(max(tau (y - q), (tau - 1)(y - q)))``;
* :func:`crps`: the continuous ranked probability score of the midpoint-rule distribution, exact for that
  discrete distribution: ``E|X - y| - E|X - X'| / 2`` (tokens; lower is better; a point prediction's CRPS is its
  absolute error);
* :func:`interval_coverage`: share of ``y`` inside ``[q_lo, q_hi]`` (endpoints included: lengths are integers
  and many replies sit exactly at the cap, where several quantiles coincide);
* :func:`pit`: probability integral transform values for a calibration plot: the predicted CDF at ``y``,
  linear between quantiles; where ``y`` sits on a jump (tied quantiles) or outside the outer quantiles, a
  seeded uniform draw over the CDF range it could take (randomized PIT), so a calibrated predictor gives
  uniform PIT values;
* :func:`score_quantiles`: one row of the distributional table (pinball per level, mean pinball, CRPS,
  coverage of the 50% and 90% central intervals, Kendall tau of the median, PIT histogram).
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np

#: The quantile levels the distributional predictor and the Gittins policies use by default.
DEFAULT_LEVELS: tuple[float, ...] = (0.05, 0.1, 0.25, 0.5, 0.75, 0.9, 0.95)


def check_levels(levels: Sequence[float]) -> np.ndarray:
    lv = np.asarray(levels, dtype=float).ravel()
    if len(lv) < 1 or not np.all((lv > 0) & (lv < 1)) or np.any(np.diff(lv) <= 0):
        raise ValueError(f"quantile levels must be strictly increasing in (0, 1), got {list(levels)}")
    return lv


def level_masses(levels: Sequence[float]) -> np.ndarray:
    """Probability each level's quantile carries under the midpoint rule (sums to 1)."""
    lv = check_levels(levels)
    edges = np.concatenate([[0.0], (lv[1:] + lv[:-1]) / 2, [1.0]])
    return np.diff(edges)


def quantiles_to_discrete(levels: Sequence[float], values: Sequence[float]) -> tuple[np.ndarray, np.ndarray]:
    """``(support, probs)``: the midpoint-rule discrete distribution of one row of quantiles (see the module
    doc); ``values`` are sorted first (non-crossing), equal values are merged, support strictly increasing."""
    w = level_masses(levels)
    v = np.sort(np.asarray(values, dtype=float).ravel())
    if len(v) != len(w):
        raise ValueError(f"{len(v)} quantile values for {len(w)} levels")
    if not np.all(np.isfinite(v)):
        raise ValueError(f"quantile values must be finite, got {list(values)}")
    support, inv = np.unique(v, return_inverse=True)
    probs = np.bincount(inv.ravel(), weights=w, minlength=len(support))
    return support, probs / probs.sum()


def _as_2d(Q, n: int, k: int) -> np.ndarray:
    Q = np.sort(np.asarray(Q, dtype=float), axis=1)
    if Q.shape != (n, k):
        raise ValueError(f"quantiles must be [n, len(levels)] = [{n}, {k}], got {list(Q.shape)}")
    return Q


def pinball_loss(y, Q, levels) -> np.ndarray:
    """Mean pinball loss per level (tokens), ``Q``: ``[n, len(levels)]``."""
    lv = check_levels(levels)
    y = np.asarray(y, dtype=float).ravel()
    Q = _as_2d(Q, len(y), len(lv))
    d = y[:, None] - Q
    return np.mean(np.maximum(lv * d, (lv - 1) * d), axis=0)


def crps(y, Q, levels) -> np.ndarray:
    """CRPS of each row's midpoint-rule distribution at its ``y`` (tokens; exact for that distribution)."""
    lv = check_levels(levels)
    w = level_masses(lv)
    y = np.asarray(y, dtype=float).ravel()
    Q = _as_2d(Q, len(y), len(lv))
    e_xy = np.sum(w * np.abs(Q - y[:, None]), axis=1)
    e_xx = np.einsum("i,j,nij->n", w, w, np.abs(Q[:, :, None] - Q[:, None, :]))
    return e_xy - 0.5 * e_xx


def interval_coverage(y, lo, hi) -> float:
    """Share of ``y`` with ``lo <= y <= hi``."""
    y, lo, hi = (np.asarray(a, dtype=float).ravel() for a in (y, lo, hi))
    if len(y) == 0:
        return math.nan
    return float(np.mean((y >= lo) & (y <= hi)))


def central_coverage(y, Q, levels, width: float) -> float:
    """Coverage of the central ``width`` interval, ``[q_(1-width)/2, q_(1+width)/2]``; both levels must be among
    ``levels`` (NaN otherwise)."""
    lv = check_levels(levels)
    y = np.asarray(y, dtype=float).ravel()
    Q = _as_2d(Q, len(y), len(lv))
    lo_l, hi_l = (1 - width) / 2, (1 + width) / 2
    i = np.flatnonzero(np.isclose(lv, lo_l))
    j = np.flatnonzero(np.isclose(lv, hi_l))
    if not len(i) or not len(j):
        return math.nan
    return interval_coverage(y, Q[:, i[0]], Q[:, j[0]])


def pit(y, Q, levels, seed: int = 0) -> np.ndarray:
    """Randomized PIT values in [0, 1] (see the module doc)."""
    lv = check_levels(levels)
    y = np.asarray(y, dtype=float).ravel()
    Q = _as_2d(Q, len(y), len(lv))
    rng = np.random.default_rng(seed)
    u = rng.random(len(y))
    ext_l = np.concatenate([[0.0], lv, [1.0]])
    out = np.empty(len(y))
    for n in range(len(y)):
        q, v = Q[n], y[n]
        below = np.sum(q < v)            # levels strictly below y
        at = np.sum(q == v)              # levels exactly at y (a jump of the CDF)
        if at:                           # F jumps from the level before the tie to the last tied level
            lo, hi = ext_l[below], ext_l[below + at]
            out[n] = lo + u[n] * (hi - lo)
        elif below == 0:                 # below every quantile: somewhere in [0, first level)
            out[n] = u[n] * lv[0]
        elif below == len(q):            # above every quantile: somewhere in (last level, 1]
            out[n] = lv[-1] + u[n] * (1 - lv[-1])
        else:                            # strictly between two distinct quantiles: linear CDF
            a, b = q[below - 1], q[below]
            out[n] = lv[below - 1] + (v - a) / (b - a) * (lv[below] - lv[below - 1])
    return out


def kendall_tau(a, b) -> float:
    from scipy.stats import kendalltau

    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    if len(a) < 3 or np.ptp(a) == 0 or np.ptp(b) == 0:
        return math.nan
    return float(kendalltau(a, b).statistic)


def score_quantiles(y, Q, levels, pit_bins: int = 10, seed: int = 0) -> dict:
    """One row of the distributional table: ``pinball_<level>`` per level, ``pinball_mean``, ``crps``,
    ``cover50`` / ``cover90`` (central intervals; NaN where their levels are missing), ``width50`` / ``width90``
    (mean interval width, tokens), ``kendall_tau_median`` (the median against the truth), ``pit_hist`` (the
    share of PIT values in each of ``pit_bins`` equal bins: 1/pit_bins each when calibrated), ``n``."""
    lv = check_levels(levels)
    y = np.asarray(y, dtype=float).ravel()
    Q = _as_2d(Q, len(y), len(lv))
    row: dict = {}
    for l, v in zip(lv, pinball_loss(y, Q, lv)):
        row[f"pinball_{l:g}"] = float(v)
    row["pinball_mean"] = float(np.mean([row[f"pinball_{l:g}"] for l in lv]))
    row["crps"] = float(np.mean(crps(y, Q, lv)))
    for width, name in ((0.5, "50"), (0.9, "90")):
        row[f"cover{name}"] = central_coverage(y, Q, lv, width)
        i = np.flatnonzero(np.isclose(lv, (1 - width) / 2))
        j = np.flatnonzero(np.isclose(lv, (1 + width) / 2))
        row[f"width{name}"] = float(np.mean(Q[:, j[0]] - Q[:, i[0]])) if len(i) and len(j) else math.nan
    med = np.array([np.interp(0.5, lv, q) for q in Q])
    row["kendall_tau_median"] = kendall_tau(y, med)
    hist, _ = np.histogram(pit(y, Q, lv, seed), bins=pit_bins, range=(0.0, 1.0))
    row["pit_hist"] = [float(h) / max(1, len(y)) for h in hist]
    row["n"] = int(len(y))
    return row
