"""The measurement protocol's per-run facts: is this run the load it claims, and did it hold it?

Each run's ``metrics.json`` carries them (the continuous engine's ``run_metrics``, the static path's harness);
:mod:`rtlm_lab.scheduler.analysis` recomputes them from ``requests.parquet`` for runs made before they were
recorded. All of them read the whole run, warm-up share included: they judge the run, not its metrics.

* **Realized load**: ``realized_rho_rel_error`` = realized rho / nominal rho - 1, and
  ``realized_rho_within_2pct`` (``|error| <= 0.02``; ``None`` where the run has no nominal rate, a replayed trace
  or a burst). Arrivals are rescaled to the exact target rate (:func:`rtlm_lab.scheduler.workload.arrival_times`),
  so a run outside 2% is a bug or a trace made before that.
* **Stability**: over the second half of the arrival window ``[mid, last arrival]``, the requests that finished
  in it over the requests that arrived in it, ``completion_ratio_2nd_half``; ``stable`` = that ratio >= 0.95 at
  a nominal rho < 1 (``None`` at rho >= 1, an overload by design). A queue that grows for the whole run
  completes less than arrives, and its mean response time depends on the run's length.
* **Drift**: ``rt_drift_last_vs_first_third``, the mean response time of the last third of arrivals over the
  first third's (in arrival order). Near 1 in a steady state; a growing queue (or a machine slowing down) makes
  it large.
* **Engine cost at the same rows** (:func:`step_cost_ratio`, per policy against the seed's FCFS run, in the
  results table as ``step_cost_vs_fcfs``): pure decoding steps of the same number of rows, the policy's median
  step time over FCFS's, averaged over the policy's steps. What a policy's predictions and pauses cost the
  engine (the serving-core issue's aim: within 1.05x), apart from how many rows it runs.
* **Length**: ``arrival_window_s`` (first to last arrival) over the mean isolated service time
  ``mean_isolated_s`` (a request alone on the engine): ``window_over_isolated``, which the protocol wants
  >= 100.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pandas as pd

RHO_TOLERANCE = 0.02          # |realized rho / nominal rho - 1| a run may show
STABLE_MIN_COMPLETION = 0.95  # completions / arrivals over the second half of the arrival window, at rho < 1
MIN_WINDOW_OVER_ISOLATED = 100.0
FCFS_DRIFT_TOLERANCE = 0.10   # a seed's closing FCFS run against its first (analysis.summarize)

PROTOCOL_FIELDS = ("realized_rho_rel_error", "realized_rho_within_2pct", "arrival_window_s", "mean_isolated_s",
                   "window_over_isolated", "n_arrivals_2nd_half", "n_completions_2nd_half",
                   "completion_ratio_2nd_half", "stable", "rt_drift_last_vs_first_third")


def completion_ratio(arrival_s, finish_s) -> tuple[float, int, int]:
    """``(completions / arrivals, arrivals, completions)`` over the second half of the arrival window: arrivals
    at or after its midpoint, and finishes between the midpoint and the last arrival (whenever they arrived).
    NaN for fewer than two arrivals or a zero window (a burst)."""
    arr = np.asarray(arrival_s, float)
    fin = np.asarray(finish_s, float)
    if len(arr) < 2 or not arr.max() > arr.min():
        return math.nan, 0, 0
    a0, a1 = float(arr.min()), float(arr.max())
    mid = 0.5 * (a0 + a1)
    n_arr = int(((arr >= mid) & (arr <= a1)).sum())
    n_done = int(((fin >= mid) & (fin <= a1)).sum())  # NaN finishes (never finished) compare False
    return (n_done / n_arr if n_arr else math.nan), n_arr, n_done


def rt_drift(arrival_s, response_s) -> float:
    """Mean response time of the last third of arrivals over the first third's (NaN for fewer than 3)."""
    df = pd.DataFrame({"a": np.asarray(arrival_s, float), "rt": np.asarray(response_s, float)})
    df = df.sort_values("a", kind="stable")
    k = len(df) // 3
    if k < 1:
        return math.nan
    first, last = float(df["rt"].iloc[:k].mean()), float(df["rt"].iloc[-k:].mean())
    return last / first if first > 0 else math.nan


def run_protocol(records: pd.DataFrame, nominal_rho: float | None, realized_rho: float | None) -> dict[str, Any]:
    """The protocol's facts of one run (:data:`PROTOCOL_FIELDS`, see the module doc) from its request records
    (``arrival_s``, ``finish_s``, ``response_s``, and ``isolated_s`` where known) and its nominal and realized
    rho (the engine's own definition of each; ``None``/NaN where the run has none)."""
    arr = records["arrival_s"].to_numpy(float)
    window = float(arr.max() - arr.min()) if len(arr) else 0.0
    iso = float(records["isolated_s"].mean()) if "isolated_s" in records and len(records) else math.nan
    ratio, n_arr, n_done = completion_ratio(arr, records["finish_s"])
    nom = float(nominal_rho) if nominal_rho is not None else math.nan
    real = float(realized_rho) if realized_rho is not None else math.nan
    err = real / nom - 1 if math.isfinite(nom) and nom > 0 and math.isfinite(real) else math.nan
    stable = None
    if math.isfinite(ratio) and not (math.isfinite(nom) and nom >= 1):
        stable = bool(ratio >= STABLE_MIN_COMPLETION)
    return {
        "realized_rho_rel_error": err,
        "realized_rho_within_2pct": bool(abs(err) <= RHO_TOLERANCE) if math.isfinite(err) else None,
        "arrival_window_s": window, "mean_isolated_s": iso,
        "window_over_isolated": window / iso if math.isfinite(iso) and iso > 0 else math.nan,
        "n_arrivals_2nd_half": n_arr, "n_completions_2nd_half": n_done, "completion_ratio_2nd_half": ratio,
        "stable": stable,
        "rt_drift_last_vs_first_third": rt_drift(arr, records["response_s"]),
    }


def step_cost_ratio(policy_steps: pd.DataFrame, fcfs_steps: pd.DataFrame, min_steps: int = 5) -> float:
    """Median step time of pure decoding steps (``n_tokens == n_seqs``) per number of rows, the policy's over
    FCFS's, weighted by the policy's steps at each row count both runs saw at least ``min_steps`` times; NaN
    where they share none. Columns ``dt_s``, ``n_seqs``, ``n_tokens`` (``steps.parquet``)."""
    def med(st):
        d = st[st["n_tokens"] == st["n_seqs"]]
        g = d.groupby("n_seqs")["dt_s"]
        return g.median()[g.size() >= min_steps], g.size()

    pm, pn = med(policy_steps)
    fm, _ = med(fcfs_steps)
    common = pm.index.intersection(fm.index)
    if not len(common):
        return math.nan
    w = pn.loc[common].astype(float)
    return float(((pm.loc[common] / fm.loc[common]) * w).sum() / w.sum())
