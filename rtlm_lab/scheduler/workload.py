"""Workloads: which requests arrive when.

A *trace* is a table with one row per request, in arrival order: ``request_id``, ``text``, ``context``,
``arrival_s`` (seconds from the start of the run), ``n_input_tokens`` and ``true_tokens`` (the LM's greedy
output length from the profile, known to the oracle only), plus the predictions each policy may use
(:mod:`rtlm_lab.scheduler.predictions`). Traces are saved as parquet and replayed as they are
(``workload.trace=<path>``), so a real run and its simulation see the same arrivals.

Arrival processes, all seeded, at rate ``lambda = rho / E[S]`` where ``E[S]`` is the mean *isolated* (batch-1)
service time of the trace's requests under the platform's service model (the static path), or ``rho`` x the
engine's measured capacity (the continuous engine):

* ``poisson``: exponential gaps (coefficient of variation 1);
* ``gamma``: Gamma gaps with coefficient of variation ``cv`` (> 1 is bursty); vLLM's ``burstiness`` is the
  Gamma shape, ``cv = 1 / sqrt(burstiness)``: ``burstiness=1`` (``cv=1``) is Poisson;
* ``mmpp``: a two-state Markov-modulated Poisson process: a ``burst`` state at ``burst_factor`` times the
  calm state's rate, entered ``burst_share`` of the time, mean sojourn ``mean_sojourn_requests`` arrivals;
  the long-run rate is still ``lambda``;
* ``overload``: Poisson arrivals with one **overload burst of fixed length**: ``overload_requests``
  consecutive arrivals (starting after ``overload_start`` x n of them) come at ``overload_rho`` x capacity (2.0:
  twice what the engine serves), the others at a calm load set so that the whole trace's rate is still
  ``lambda`` (``rho`` is the run's average load; :func:`overload_calm_rho`). The burst's length in arrivals is
  fixed, so its duration is ``overload_requests / overload_rho`` capacity service times on any engine: the
  queue it leaves is about ``overload_requests x (1 - 1 / overload_rho)`` requests deep;
* ``burst``: every request at time 0 (a stress test: throughput at saturation).

Each drawn trace is then **rescaled to the exact target rate** (``exact_rate=True``, the default; vLLM's
benchmark rescales its gaps to the target duration the same way): every time is multiplied by one factor so
that the ``n - 1`` gaps after the first arrival span exactly ``(n - 1) / lambda``, i.e. the realized rate
(:func:`realized_arrival_rate`) *is* ``lambda``. The shape of the process (its cv, its bursts) is unchanged; a
short run's load is then the nominal one, not the luck of its draw.
"""

from __future__ import annotations

import math
from typing import Any, Mapping

import numpy as np
import pandas as pd

from rtlm_lab.errors import UserError

KINDS = ("poisson", "gamma", "mmpp", "overload", "burst")
#: workload keys that shape the arrival process (passed to :func:`arrival_times` by :func:`arrival_params`)
ARRIVAL_PARAMS = ("cv", "burst_factor", "burst_share", "mean_sojourn_requests", "overload_rho", "overload_requests",
                  "overload_start")
OVERLOAD_DEFAULTS = {"overload_rho": 2.0, "overload_requests": 200, "overload_start": 0.25}


def arrival_params(workload: Mapping[str, Any]) -> dict[str, Any]:
    """The arrival-process parameters of a workload config (``overload``: its ``rho`` too, which the calm load
    is derived from)."""
    params = {k: workload[k] for k in ARRIVAL_PARAMS if k in workload and workload[k] is not None}
    if str(workload.get("kind", "poisson")) == "overload":
        params["rho"] = float(workload.get("rho", 0.9))
    return params


def overload_calm_rho(rho: float, n: int, overload_rho: float = 2.0, overload_requests: int = 200) -> float:
    """The calm load of an ``overload`` trace of ``n`` arrivals whose average load is ``rho``: the window holds
    ``n - overload_requests`` calm gaps at the calm rate and ``overload_requests - 1`` at ``overload_rho``, so
    ``rho = (n - 1) / ((n - b) / calm + (b - 1) / overload_rho)``. A user error when no calm load gives ``rho``
    (``rho`` too close to the burst's, or a burst as long as the trace)."""
    b = int(overload_requests)
    if not 1 < b < n:
        raise UserError(f"workload.overload_requests must be between 2 and n_requests - 1 (got {b} of {n})")
    if not overload_rho > rho > 0:
        raise UserError(f"workload.overload_rho ({overload_rho}) must exceed the average workload.rho ({rho})")
    left = (n - 1) / rho - (b - 1) / overload_rho
    calm = (n - b) / left if left > 0 else math.inf
    if not 0 < calm < rho:
        raise UserError(f"no calm load gives an average rho {rho} around a burst of {b} arrivals at rho "
                        f"{overload_rho} in {n}: lower workload.rho or workload.overload_requests")
    return calm
TRACE_COLUMNS = ("request_id", "text", "context", "arrival_s", "n_input_tokens", "true_tokens")


def arrival_times(kind: str, rate: float, n: int, seed: int = 0, exact_rate: bool = True,
                  **params: Any) -> np.ndarray:
    """``n`` increasing arrival times (s), starting at the first gap after 0 (``burst``: all zeros); with
    ``exact_rate`` rescaled so that the realized rate over the trace is ``rate`` (see the module doc)."""
    if kind not in KINDS:
        raise UserError(f"unknown workload kind {kind!r}; choose one of: {', '.join(KINDS)}")
    if n < 1:
        raise UserError(f"workload.n_requests must be >= 1 (got {n})")
    if kind == "burst":
        return np.zeros(n)
    if not np.isfinite(rate) or rate <= 0:
        raise UserError(f"arrival rate must be > 0 (got {rate}); check workload.rho and the service model")
    rng = np.random.default_rng(seed)
    if kind == "poisson":
        gaps = rng.exponential(1.0 / rate, n)
    elif kind == "gamma":
        cv = float(params.get("cv", 3.0))
        if cv <= 0:
            raise UserError(f"workload.cv must be > 0 (got {cv})")
        shape = 1.0 / cv**2
        gaps = rng.gamma(shape, 1.0 / (rate * shape), n)
    elif kind == "overload":
        o = {**OVERLOAD_DEFAULTS, **params}
        b, start = int(o["overload_requests"]), float(o["overload_start"])
        rho = float(o.get("rho", 0.9))
        calm = overload_calm_rho(rho, n, float(o["overload_rho"]), b)
        if not 0 <= start <= 1:
            raise UserError(f"workload.overload_start must be in [0, 1] (got {start})")
        i0 = min(int(round(start * n)), n - b)  # the burst's first arrival
        # unit-rate gaps, each segment rescaled to its exact rate: gap i precedes arrival i; the burst's
        # b - 1 inner gaps (arrivals i0+1 .. i0+b-1) at overload_rho, every other gap at the calm load
        unit = rng.exponential(1.0, n)
        inner = np.zeros(n, bool)
        inner[i0 + 1:i0 + b] = True
        calm_gaps = ~inner
        calm_gaps[0] = False  # the lead-in before the first arrival is not in the window
        gaps = np.empty(n)
        for mask, r in ((inner, float(o["overload_rho"]) / rho * rate), (calm_gaps, calm / rho * rate)):
            gaps[mask] = unit[mask] * (mask.sum() / r / unit[mask].sum())
        gaps[0] = unit[0] / (calm / rho * rate)
    else:  # mmpp
        factor = float(params.get("burst_factor", 8.0))
        share = float(params.get("burst_share", 0.2))
        sojourn = float(params.get("mean_sojourn_requests", 20.0))
        if factor <= 1 or not 0 < share < 1 or sojourn < 1:
            raise UserError("mmpp needs burst_factor > 1, 0 < burst_share < 1, mean_sojourn_requests >= 1")
        # time shares: calm (1-share) at rate r0, burst (share) at factor*r0; mean rate = rate
        r0 = rate / ((1 - share) + share * factor)
        # per-arrival switching probabilities giving the time shares above
        p_burst_arrivals = share * factor / ((1 - share) + share * factor)
        leave_burst = 1.0 / sojourn
        enter_burst = leave_burst * p_burst_arrivals / (1 - p_burst_arrivals)
        state = rng.random() < p_burst_arrivals
        gaps = np.empty(n)
        for i in range(n):
            gaps[i] = rng.exponential(1.0 / (r0 * factor if state else r0))
            state = (rng.random() >= leave_burst) if state else (rng.random() < enter_burst)
    t = np.cumsum(gaps)
    if exact_rate and n > 1 and t[-1] > t[0]:
        t = t * ((n - 1) / rate / (t[-1] - t[0]))
    return t


def realized_arrival_rate(arrival_s) -> float:
    """Arrivals per second a run actually saw: (n - 1) over the span from first to last arrival (NaN for fewer
    than two arrivals or a zero span)."""
    arr = np.asarray(arrival_s, float)
    span = float(arr.max() - arr.min()) if len(arr) > 1 else 0.0
    return (len(arr) - 1) / span if span > 0 else float("nan")


def check_workload(workload: Mapping[str, Any]) -> None:
    """One clear error for a bad workload config, before anything expensive runs."""
    if workload.get("trace"):
        return
    kind = str(workload.get("kind", "poisson"))
    if kind not in KINDS:
        raise UserError(f"unknown workload kind {kind!r}; choose one of: {', '.join(KINDS)}")
    try:
        n = int(workload.get("n_requests", 100))
        rho = float(workload.get("rho", 0.9))
    except (TypeError, ValueError) as exc:
        raise UserError(f"workload.n_requests / workload.rho must be numbers ({exc})") from None
    if n < 1:
        raise UserError(f"workload.n_requests must be >= 1 (got {n})")
    if kind != "burst" and (not np.isfinite(rho) or rho <= 0):
        raise UserError(f"workload.rho must be > 0 (got {rho}); rho > 1 is an overload and allowed")
    if workload.get("exact_rate", True) is not True:
        raise UserError(f"workload.exact_rate={workload.get('exact_rate')!r}: arrivals are always rescaled to the "
                        "exact target rate; to serve a trace drawn before that, replay it "
                        "(workload.trace=<trace.parquet>)")


def choose_requests(pool: pd.DataFrame, n: int, seed: int) -> pd.DataFrame:
    """``n`` requests from ``pool`` in a seeded order; when ``n`` exceeds the pool, whole seeded passes over it
    repeat (each repeat gets a ``#k`` suffix on its ``request_id``)."""
    if pool.empty:
        raise UserError("no requests to build a workload from")
    rng = np.random.default_rng(seed)
    parts, k = [], 0
    while sum(len(p) for p in parts) < n:
        part = pool.iloc[rng.permutation(len(pool))].copy()
        if k:
            part["request_id"] = part["request_id"].astype(str) + f"#{k}"
        parts.append(part)
        k += 1
    return pd.concat(parts, ignore_index=True).head(n).reset_index(drop=True)


def build_trace(requests: pd.DataFrame, service, workload: Mapping[str, Any], seed: int = 0) -> tuple[pd.DataFrame, dict]:
    """Attach arrival times to ``requests`` (already chosen, with ``n_input_tokens`` and ``true_tokens``).

    Returns the trace and a dict with the rate and the mean isolated service time it was derived from.
    """
    rho = float(workload.get("rho", 0.9))
    kind = str(workload.get("kind", "poisson"))
    if kind != "burst" and (not np.isfinite(rho) or rho <= 0):
        raise UserError(f"workload.rho must be > 0 (got {rho}); rho > 1 is an overload and allowed")
    iso = np.array([service.isolated(a, b) for a, b in zip(requests["n_input_tokens"], requests["true_tokens"])])
    mean_s = float(iso.mean())
    rate = rho / mean_s if kind != "burst" else float("inf")
    t = arrival_times(kind, rate, len(requests), seed=seed, **arrival_params(workload))
    trace = requests.copy()
    trace.insert(3, "arrival_s", t)
    trace["isolated_s"] = iso
    info = {"kind": kind, "rho": rho, "rate_rps": rate if np.isfinite(rate) else None,
            "mean_isolated_s": mean_s, "duration_s": float(t[-1]) if len(t) else 0.0, "n_requests": len(trace)}
    return trace, info


def load_trace(path) -> pd.DataFrame:
    """Read a saved trace (parquet) and check its columns; one clear error when it is not one."""
    from pathlib import Path

    path = Path(path)
    if not path.is_file():
        raise UserError(f"no trace at {path}")
    try:
        df = pd.read_parquet(path)
    except Exception as exc:  # noqa: BLE001
        raise UserError(f"cannot read trace {path}: {type(exc).__name__}: {exc}".splitlines()[0]) from None
    missing = [c for c in TRACE_COLUMNS if c not in df.columns]
    if missing:
        raise UserError(f"{path} is not a trace: missing columns {', '.join(missing)}")
    if not df["arrival_s"].is_monotonic_increasing:
        raise UserError(f"{path}: arrival_s must be non-decreasing")
    return df.reset_index(drop=True)
