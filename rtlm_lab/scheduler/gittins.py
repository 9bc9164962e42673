"""The Gittins index of a job with a known (predicted) size distribution: pure functions.

For a job of size ``S`` (output tokens) that has received ``a`` tokens of service, the remaining size is
``R = S - a | S > a`` and the Gittins index is

    G(a) = sup over D > 0 of  P(R <= D) / E[min(R, D)]

(the best ratio of "chance to finish within a further quantum D" to "expected service spent on that quantum").
Serving the job with the largest index minimises the mean response time of an M/G/1 queue whose job sizes are
drawn from known distributions, preemptively (Gittins 1989; Aalto, Ayesta, Righter 2009; Scully, Harchol-Balter
2021 for the modern treatment). It interpolates between the two classic orders:

* a **point mass** at ``s`` gives ``G(a) = 1 / (s - a)``: the largest index is the smallest remaining size,
  i.e. SRPT;
* a **decreasing hazard** (the longer a job has run, the longer it is likely to run) gives an index that
  falls with age: the least-attained-service job first (LAS / foreground-background).

**Exact on a discrete distribution.** With support ``s_1 < ... < s_K`` and probabilities ``p_k``, between two
support points ``P(R <= D)`` is constant while ``E[min(R, D)]`` grows, so the supremum is attained at a support
point ``D = s_k - a`` with ``s_k > a``. Both terms are conditioned on ``S > a``; the conditioning cancels:

    G(a) = max over k with s_k > a of  sum_{a < s_i <= s_k} p_i  /  sum_{s_i > a} p_i (min(s_i, s_k) - a)

computed here in one pass over the support (O(K)).

**A job that outlives its distribution** (``a >= s_K``: every predicted length has been passed) has no
conditional distribution left. We then model its remaining size as memoryless with mean ``overrun_mean``
(tokens; default: the distribution's own mean ``E[S]``, "as much again as the whole reply was expected to
take"), whose index is its rate ``1 / overrun_mean`` and whose expected remaining size is ``overrun_mean``.
The same rule serves :func:`expected_remaining`.

Predicted quantiles become a discrete distribution by :func:`rtlm_lab.distmetrics.quantiles_to_discrete`
(the midpoint rule); :func:`gittins_from_quantiles` and :func:`expected_remaining_from_quantiles` do both steps.
"""

from __future__ import annotations

import math
from functools import lru_cache
from typing import Sequence

import numpy as np

from rtlm_lab.distmetrics import level_masses, quantiles_to_discrete  # noqa: F401 (the doc's reference)


@lru_cache(maxsize=64)
def _masses(levels: tuple[float, ...]) -> tuple[float, ...]:
    return tuple(float(m) for m in level_masses(levels))


class DiscreteSize:
    """A discrete size distribution ready for repeated index queries: sorted support (> 0), probabilities
    (normalised), its mean; plain Python floats, so one query over a handful of points costs microseconds
    (a policy asks once per job and step)."""

    __slots__ = ("s", "p", "mean", "overrun")

    def __init__(self, support: Sequence[float], probs: Sequence[float], overrun_mean: float | None = None):
        s = [float(v) for v in np.asarray(support, dtype=float).ravel()] if not isinstance(support, list) \
            else [float(v) for v in support]
        p = [float(v) for v in np.asarray(probs, dtype=float).ravel()] if not isinstance(probs, list) \
            else [float(v) for v in probs]
        if len(s) == 0 or len(s) != len(p):
            raise ValueError(f"support and probs must be non-empty and of equal length ({len(s)} vs {len(p)})")
        tot = sum(p)
        if not all(math.isfinite(v) for v in s + p) or min(p) < 0 or not tot > 0:
            raise ValueError("support must be finite and probs finite, >= 0, not all 0")
        if min(s) <= 0:
            raise ValueError("sizes must be > 0")
        pairs = sorted((a, b / tot) for a, b in zip(s, p) if b > 0)
        self.s = [a for a, _ in pairs]
        self.p = [b for _, b in pairs]
        self.mean = sum(a * b for a, b in zip(self.s, self.p))
        self.overrun = self.mean if overrun_mean is None else float(overrun_mean)
        if not self.overrun > 0:
            raise ValueError(f"overrun_mean must be > 0, got {overrun_mean}")

    def index(self, age: float = 0.0) -> float:
        """``G(age)``, 1 / tokens (see the module doc)."""
        a = float(age)
        s, p = self.s, self.p
        j = 0
        while j < len(s) and s[j] <= a:
            j += 1
        if j == len(s):
            return 1.0 / self.overrun
        live = sum(p[j:])
        best, cum_p, cum_ps = 0.0, 0.0, 0.0
        for k in range(j, len(s)):
            cum_p += p[k]
            cum_ps += p[k] * (s[k] - a)
            # D = s_k - a: P(a < S <= s_k) / E[min(S - a, s_k - a); S > a]
            g = cum_p / (cum_ps + (s[k] - a) * (live - cum_p))
            if g > best:
                best = g
        return best

    def expected_remaining(self, age: float = 0.0) -> float:
        """``E[S - a | S > a]`` (tokens)."""
        a = float(age)
        num = den = 0.0
        for sk, pk in zip(self.s, self.p):
            if sk > a:
                num += pk * (sk - a)
                den += pk
        return num / den if den > 0 else self.overrun

    @classmethod
    def from_quantiles(cls, levels: Sequence[float], values: Sequence[float], overrun_mean: float | None = None,
                       min_size: float = 1.0) -> "DiscreteSize":
        """The midpoint-rule distribution of predicted quantiles (sizes below ``min_size`` tokens are raised to
        it: every reply takes at least one decoding step)."""
        masses = _masses(tuple(float(v) for v in levels))
        vals = sorted(max(float(v), float(min_size)) for v in values)
        if len(vals) != len(masses):
            raise ValueError(f"{len(vals)} quantile values for {len(masses)} levels")
        s: list[float] = []
        p: list[float] = []
        for v, w in zip(vals, masses):  # the midpoint rule, equal values merged (quantiles_to_discrete)
            if s and v == s[-1]:
                p[-1] += w
            else:
                s.append(v)
                p.append(w)
        return cls(s, p, overrun_mean)


def gittins_index(support: Sequence[float], probs: Sequence[float], age: float = 0.0,
                  overrun_mean: float | None = None) -> float:
    """``G(age)`` of the discrete size distribution ``(support, probs)`` (see the module doc); ``probs`` need
    not be normalised. Units: 1 / tokens."""
    return DiscreteSize(support, probs, overrun_mean).index(age)


def expected_remaining(support: Sequence[float], probs: Sequence[float], age: float = 0.0,
                       overrun_mean: float | None = None) -> float:
    """``E[S - a | S > a]`` (tokens); ``overrun_mean`` once ``a`` has passed every support point."""
    return DiscreteSize(support, probs, overrun_mean).expected_remaining(age)


def gittins_from_quantiles(levels: Sequence[float], values: Sequence[float], age: float = 0.0,
                           overrun_mean: float | None = None, min_size: float = 1.0) -> float:
    """:func:`gittins_index` of the midpoint-rule distribution of predicted quantiles (sizes below
    ``min_size`` tokens are raised to it: every reply takes at least one decoding step)."""
    return DiscreteSize.from_quantiles(levels, values, overrun_mean, min_size).index(age)


def expected_remaining_from_quantiles(levels: Sequence[float], values: Sequence[float], age: float = 0.0,
                                      overrun_mean: float | None = None, min_size: float = 1.0) -> float:
    return DiscreteSize.from_quantiles(levels, values, overrun_mean, min_size).expected_remaining(age)


def index_curve(support: Sequence[float], probs: Sequence[float], ages: Sequence[float],
                overrun_mean: float | None = None) -> np.ndarray:
    """``G(a)`` for each age in ``ages`` (for plots and tests)."""
    return np.array([gittins_index(support, probs, a, overrun_mean) for a in ages])


def hazard(support: Sequence[float], probs: Sequence[float]) -> np.ndarray:
    """Discrete hazard ``P(S = s_k | S >= s_k)`` at each support point (sorted), for reading a distribution's
    shape: decreasing hazard -> LAS-like index, increasing -> SRPT/FCFS-like."""
    d = DiscreteSize(support, probs)
    p = np.asarray(d.p)
    surv = p[::-1].cumsum()[::-1]
    return p / surv
