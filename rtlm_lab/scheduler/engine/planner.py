"""The step planner the real engine and the simulator share: which jobs run in a step, and how many tokens each."""

from __future__ import annotations

import heapq
from typing import Sequence

from rtlm_lab.scheduler.engine.jobs import Job


def candidates(running: Sequence[Job], waiting: Sequence[Job], policy, now: float) -> list[Job]:
    """Jobs in the order the engine considers them this step (see the module doc)."""
    def k(j: Job):
        return (policy.key(j, now), j.req.arrival_s, j.rid)

    if getattr(policy, "preemptive", False):
        return sorted([*running, *waiting], key=k)
    return sorted(running, key=lambda j: (j.admit_s, j.req.arrival_s, j.rid)) + sorted(waiting, key=k)


def plan_step(cands: Sequence[Job], max_seqs: int, max_batch_tokens: int) -> list[tuple[Job, int]]:
    """``[(job, tokens it processes)]`` for one step: candidates in order while the request and token budgets
    last; a prompt longer than the token budget left is split (as transformers' scheduler does)."""
    out: list[tuple[Job, int]] = []
    budget = int(max_batch_tokens)
    for j in cands:
        if len(out) >= max_seqs or budget <= 0:
            break
        need = j.prefill_left if j.prefill_left > 0 else 1
        take = min(need, budget)
        out.append((j, take))
        budget -= take
    return out



class SlotTable:
    """The KV slots of one engine (the kv engine's per-slot cache, and the simulator's model of it).

    A request takes the lowest free slot at its first prompt chunk and holds it until it finishes; a paused
    request keeps its slot (its KV stays in place: resuming costs nothing). When a planned request needs a slot
    and none is free, the paused request the policy ranks last is evicted: its KV is dropped and it must
    prefill its prompt plus what it generated again when it resumes (recompute preemption, as vLLM). The rule
    is the engine's, the same for every policy."""

    def __init__(self, n_slots: int):
        self.n = int(n_slots)
        self.free = list(range(self.n))
        heapq.heapify(self.free)
        self.n_evicted = 0

    def take(self, job: Job) -> None:
        job.slot = heapq.heappop(self.free)

    def release(self, job: Job) -> None:
        if job.slot is not None:
            heapq.heappush(self.free, job.slot)
            job.slot = None

    def evict(self, job: Job) -> None:
        self.release(job)
        job.prefill_left = int(job.n_prompt) + int(job.generated)
        job.evictions += 1
        self.n_evicted += 1


def plan_engine_step(engine, now: float, slots: SlotTable) -> tuple[list[tuple[Job, int]], list[Job]]:
    """One step of an engine with KV slots: :func:`plan_step` over the policy's candidates, then a slot for
    every planned request that lacks one (evicting paused requests, last-ranked first, when none is free).
    Returns ``(plan, evicted)``. The kv engine and the simulator both plan with this function."""
    cands = candidates(engine.running, engine.waiting, engine.policy, now)
    plan = plan_step(cands, engine.max_seqs, engine.max_batch_tokens)
    planned = {id(j) for j, _ in plan}
    need = [j for j, _ in plan if j.slot is None]
    evicted: list[Job] = []
    short = len(need) - len(slots.free)
    if short > 0:
        victims = [j for j in reversed(cands) if j.slot is not None and id(j) not in planned]
        for v in victims[:short]:
            slots.evict(v)
            evicted.append(v)
    if len(need) > len(slots.free):
        raise RuntimeError(f"{len(need)} requests need a KV slot and only {len(slots.free)} are free "
                           f"(kv_slots={slots.n} must be >= max_seqs={engine.max_seqs})")
    for j in need:
        slots.take(j)
    return plan, evicted
