"""Percentile bootstrap CIs over paired rows, with :func:`scipy.stats.bootstrap`.

Both users (:mod:`rtlm_lab.uncertainty.analysis`: Spearman and partial Spearman per uncertainty type;
:mod:`rtlm_lab.regressor.evaluate`: Kendall tau per method) resample *rows* (requests), not conversations, so
scipy's ``paired=True`` resampling is exactly what they need. A fresh ``numpy.random.default_rng(seed)`` per
call draws the same ``(n_resamples, n)`` row indices every time (scipy draws them in one batch), so every
feature / method of one analysis sees the same resamples and their CIs stay comparable.

One rule scipy has no option for: a resample whose statistic is undefined (a column constant in that resample:
rank correlations are NaN) makes scipy's percentile CI NaN. Here such resamples are dropped and the CI is taken
over the usable ones, as long as at least half of them (and two) are usable; otherwise it is NaN.
"""

from __future__ import annotations

import math
import warnings
from typing import Callable, Sequence

import numpy as np


def percentile_ci(data: Sequence[np.ndarray], statistic: Callable[..., np.ndarray | float], n_resamples: int,
                  seed: int = 0, level: float = 0.95, vectorized: bool = True) -> tuple[float, float]:
    """``(low, high)`` percentile CI of ``statistic(*data)`` over ``n_resamples`` paired row resamples.

    ``vectorized``: ``statistic(*samples, axis=-1)`` takes ``(B, n)`` arrays and returns ``B`` values;
    otherwise it takes 1-D arrays (scipy loops)."""
    from scipy.stats import DegenerateDataWarning, bootstrap

    with warnings.catch_warnings():  # NaN resamples: handled below
        warnings.simplefilter("ignore", DegenerateDataWarning)
        res = bootstrap(tuple(np.asarray(d, dtype=float) for d in data), statistic, n_resamples=int(n_resamples),
                        paired=True, vectorized=vectorized, method="percentile", confidence_level=level,
                        rng=np.random.default_rng(seed))
    dist = np.asarray(res.bootstrap_distribution, dtype=float)
    ok = dist[np.isfinite(dist)]
    if len(ok) == len(dist):
        return float(res.confidence_interval.low), float(res.confidence_interval.high)
    if len(ok) < max(2, 0.5 * len(dist)):
        return math.nan, math.nan
    alpha = (1 - level) / 2
    lo, hi = np.quantile(ok, [alpha, 1 - alpha])
    return float(lo), float(hi)
