"""What the simulator and the real executor share: the dispatcher (queue + worker state + policy calls),
per-request records and the metrics computed from them."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np
import pandas as pd

from rtlm_lab.scheduler.policies import Assignment, Policy, Request, WorkerView

RECORD_COLUMNS = ("request_id", "arrival_s", "start_s", "first_token_s", "finish_s", "response_s", "queue_s",
                  "worker", "batch_id", "batch_size", "pred_tokens", "true_tokens", "actual_tokens",
                  "uncertainty", "n_input_tokens", "isolated_s", "slo_s", "slo_miss", "retries", "stop_reason")


@dataclass
class WorkerSpec:
    worker_id: str
    kind: str            # "main" | "offload"
    max_batch: int
    service: Any         # ServiceModel


@dataclass
class _WorkerState:
    spec: WorkerSpec
    alive: bool = True
    batch: list[Request] = field(default_factory=list)
    batch_id: int = -1
    started: float = 0.0
    free_at: float = 0.0
    busy_s: float = 0.0


class Dispatcher:
    """Queue, worker state and the policy's decisions (timed: the scheduler's share of the overhead)."""

    def __init__(self, policy: Policy, workers: Sequence[WorkerSpec]):
        if not any(w.kind == "main" for w in workers):
            raise ValueError("need a main worker")
        self.policy = policy
        self.workers = {w.worker_id: _WorkerState(w) for w in workers}
        self.queue: list[Request] = []
        self.decision_s = 0.0
        self.n_decisions = 0
        self._next_batch = 0

    def arrive(self, req: Request) -> None:
        self.queue.append(req)

    def views(self, now: float) -> list[WorkerView]:
        return [WorkerView(s.spec.worker_id, s.spec.kind, idle=not s.batch, free_at=s.free_at if s.batch else now,
                           max_batch=s.spec.max_batch, service=s.spec.service)
                for s in self.workers.values() if s.alive]

    def decide(self, now: float) -> tuple[list[tuple[Assignment, int]], float | None]:
        """Ask the policy; mark the chosen workers busy. Returns ``[(assignment, batch_id)]`` and a wake time."""
        if not self.queue or not any(s.alive and not s.batch for s in self.workers.values()):
            return [], None
        t0 = time.perf_counter()
        assignments, wake = self.policy.select(list(self.queue), self.views(now), now)
        self.decision_s += time.perf_counter() - t0
        self.n_decisions += 1
        out = []
        for a in assignments:
            s = self.workers.get(a.worker_id)
            if s is None or not s.alive or s.batch or not a.requests:
                raise RuntimeError(f"policy {self.policy.name} assigned to a busy or unknown worker {a.worker_id}")
            if len(a.requests) > s.spec.max_batch:
                raise RuntimeError(f"policy {self.policy.name} exceeded max_batch on {a.worker_id}")
            ids = {id(r) for r in a.requests}
            if len(ids) != len(a.requests) or any(id(r) not in {id(q) for q in self.queue} for r in a.requests):
                raise RuntimeError(f"policy {self.policy.name} picked a request twice or one not queued")
            self.queue = [r for r in self.queue if id(r) not in ids]
            s.batch, s.batch_id, s.started = list(a.requests), self._next_batch, now
            # the worker's busy-until estimate from the policy's own length knowledge (its prediction, the
            # typical reply, or the truth for an oracle); never the true length for a policy that has none
            preds = [self.policy.placement_tokens(r) for r in a.requests]
            s.free_at = now + s.spec.service.batch_time([r.n_input_tokens for r in a.requests], preds)
            out.append((a, self._next_batch))
            self._next_batch += 1
        return out, wake

    def finish(self, worker_id: str, now: float) -> list[Request]:
        s = self.workers[worker_id]
        done, s.batch = s.batch, []
        s.busy_s += max(0.0, now - s.started)
        return done

    def fail_worker(self, worker_id: str, now: float) -> list[Request]:
        """A worker died: its batch goes back to the queue (retried elsewhere), the worker is dropped."""
        s = self.workers[worker_id]
        s.alive = False
        back = self.finish(worker_id, now)
        for r in back:
            r.retries += 1
        self.queue.extend(back)
        return back

    @property
    def alive_workers(self) -> list[str]:
        return [w for w, s in self.workers.items() if s.alive]


def policy_prediction(policy: Policy, req: Request) -> float:
    """The length the policy itself believes in (NaN for policies without one)."""
    if policy.name.startswith("rtlm"):
        return float(req.pred.get("pred_rtlm", math.nan))
    if policy.name == "sjf_proxy":
        return float(req.pred.get("pred_proxy", math.nan))
    if policy.name == "oracle_sjf":
        return float(req.true_tokens)
    return math.nan


def record(req: Request, policy: Policy, worker: str, batch_id: int, batch_size: int, start: float,
           first_token: float, finish: float, actual_tokens: int, slo_k: float, stop_reason: str = "") -> dict:
    slo = slo_k * req.isolated_s if math.isfinite(req.isolated_s) else math.nan
    resp = finish - req.arrival_s
    return {"request_id": req.request_id, "arrival_s": req.arrival_s, "start_s": start, "first_token_s": first_token,
            "finish_s": finish, "response_s": resp, "queue_s": start - req.arrival_s, "worker": worker,
            "batch_id": batch_id, "batch_size": batch_size, "pred_tokens": policy_prediction(policy, req),
            "true_tokens": req.true_tokens, "actual_tokens": int(actual_tokens), "uncertainty": req.uncertainty,
            "n_input_tokens": req.n_input_tokens, "isolated_s": req.isolated_s, "slo_s": slo,
            "slo_miss": bool(resp > slo) if math.isfinite(slo) else False, "retries": req.retries,
            "stop_reason": stop_reason}


def metrics(records: pd.DataFrame, n_requests: int, dispatcher: Dispatcher, prediction_s: float,
            extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """Headline numbers of one run (see the scheduler README section for definitions)."""
    r = records
    n = len(r)
    rt = r["response_s"].to_numpy(float) if n else np.zeros(0)
    t_first = float(r["arrival_s"].min()) if n else 0.0
    t_last = float(r["finish_s"].max()) if n else 0.0
    makespan = max(t_last - t_first, 1e-9)
    busy = {w: s.busy_s for w, s in dispatcher.workers.items()}
    busy_total = sum(busy.values())
    overhead = prediction_s + dispatcher.decision_s
    sizes = r.drop_duplicates(["worker", "batch_id"])["batch_size"] if n else pd.Series(dtype=int)
    hist = {int(k): int(v) for k, v in sizes.value_counts().sort_index().items()}

    def q(p):
        return float(np.percentile(rt, p)) if n else math.nan

    out = {
        "n_requests": int(n_requests),
        "n_completed": int(n),
        "n_unique_completed": int(r["request_id"].nunique()) if n else 0,
        "mean_rt_s": float(rt.mean()) if n else math.nan,
        "p50_rt_s": q(50), "p95_rt_s": q(95), "p99_rt_s": q(99),
        "max_rt_s": float(rt.max()) if n else math.nan,
        "mean_queue_s": float(r["queue_s"].mean()) if n else math.nan,
        "throughput_rps": n / makespan,
        "throughput_tok_s": float(r["actual_tokens"].sum()) / makespan if n else 0.0,
        "slo_miss_rate": float(r["slo_miss"].mean()) if n else math.nan,
        "makespan_s": makespan,
        "overhead_s": overhead,
        "prediction_s": prediction_s,
        "decision_s": dispatcher.decision_s,
        "n_decisions": dispatcher.n_decisions,
        "overhead_share": overhead / busy_total if busy_total > 0 else math.nan,
        "batch_size_hist": hist,
        "mean_batch_size": float(sizes.mean()) if len(sizes) else math.nan,
        "worker_utilization": {w: b / makespan for w, b in busy.items()},
        "requests_per_worker": {str(k): int(v) for k, v in r["worker"].value_counts().items()} if n else {},
        "retries": int(r["retries"].sum()) if n else 0,
    }
    if n and r["pred_tokens"].notna().any():
        ok = r["pred_tokens"].notna()
        out["pred_mae_tokens"] = float((r.loc[ok, "pred_tokens"] - r.loc[ok, "actual_tokens"]).abs().mean())
    out.update(extra or {})
    return out
