"""Discrete-event simulation of a policy on a trace, with the measured service model.

Same :class:`~rtlm_lab.scheduler.core.Dispatcher` and policies as the real executor; batches take the
service model's time for their *true* output lengths (each row finishes at its own last token, the worker
when the longest row does). Events at the same instant: completions, then arrivals, then decisions.
"""

from __future__ import annotations

import heapq
import math
from typing import Sequence

import pandas as pd

from rtlm_lab.scheduler.core import Dispatcher, WorkerSpec, metrics, record
from rtlm_lab.scheduler.policies import Policy, Request

_DONE, _ARRIVE, _WAKE = 0, 1, 2


def simulate(requests: Sequence[Request], policy: Policy, workers: Sequence[WorkerSpec], slo_k: float = 5.0,
             prediction_s_per_request: float = 0.0) -> tuple[pd.DataFrame, dict]:
    """Run ``policy`` over ``requests`` (arrival-ordered) and return (records, metrics).

    ``prediction_s_per_request``: the policy's measured per-request prediction cost, on the clock: one
    predictor serves the arrivals in order (the real executor predicts each arrival before the policy sees
    it), so a request reaches the queue ``cost`` after the predictor is free of the ones before it; its
    response time still counts from its arrival. Also reported as overhead.
    """
    disp = Dispatcher(policy, workers)
    specs = {w.worker_id: w for w in workers}
    ev: list[tuple[float, int, int, object]] = []
    seq = 0
    cost = max(0.0, float(prediction_s_per_request))
    free = -math.inf  # when the predictor is free
    for r in requests:
        t = float(r.arrival_s)
        if cost > 0:
            free = max(t, free) + cost
            t = free
        heapq.heappush(ev, (t, _ARRIVE, seq, r))
        seq += 1
    rows: list[dict] = []
    running: dict[str, tuple[int, list[Request], list[float], float]] = {}
    wake_pending: set[float] = set()
    while ev:
        now, kind, _, payload = heapq.heappop(ev)
        if kind == _DONE:
            wid = payload
            batch_id, batch, row_t, start = running.pop(wid)
            disp.finish(wid, now)
            pre = specs[wid].service.prefill(len(batch), max(r.n_input_tokens for r in batch))
            for r, t in zip(batch, row_t):
                rows.append(record(r, policy, wid, batch_id, len(batch), start, start + pre, start + t,
                                   r.true_tokens, slo_k))
        elif kind == _ARRIVE:
            disp.arrive(payload)
        else:
            wake_pending.discard(now)
        # decide once all events of this instant are in
        if ev and ev[0][0] <= now:
            continue
        assignments, wake = disp.decide(now)
        for a, batch_id in assignments:
            svc = specs[a.worker_id].service
            row_t = list(svc.row_times([r.n_input_tokens for r in a.requests], [r.true_tokens for r in a.requests]))
            running[a.worker_id] = (batch_id, a.requests, row_t, now)
            heapq.heappush(ev, (now + max(row_t), _DONE, seq, a.worker_id))
            seq += 1
        if wake is not None and math.isfinite(wake) and wake > now and wake not in wake_pending:
            wake_pending.add(wake)
            heapq.heappush(ev, (wake, _WAKE, seq, None))
            seq += 1
    if disp.queue or running:
        raise RuntimeError(f"simulation ended with {len(disp.queue)} request(s) never served (policy "
                           f"{policy.name} waited without a wake-up)")
    df = pd.DataFrame(rows)
    m = metrics(df, len(requests), disp, prediction_s_per_request * len(requests), {"mode": "sim"})
    return df, m
