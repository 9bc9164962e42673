"""The simulator's backend: a fake decoder on a fitted step model, planned by the same planner as the real engine."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

from rtlm_lab.scheduler.engine.jobs import Job
from rtlm_lab.scheduler.engine.planner import SlotTable, plan_engine_step
from rtlm_lab.scheduler.engine.stepmodel import StepModel

if TYPE_CHECKING:
    from rtlm_lab.scheduler.engine.loop import Engine


# ---------------------------------------------------------------------------------------------- backends
class SimBackend:
    """A fake decoder: each request emits exactly ``true_tokens`` tokens; a step costs what the step model says
    (the simulator, and the fake decoder of the timing tests). Steps are planned by the kv engine's own
    :func:`~rtlm_lab.scheduler.engine.planner.plan_engine_step`, with the same KV slot rule (``kv_slots``;
    ``None``: as many slots as requests, so a pause never evicts)."""

    def __init__(self, step_model: StepModel, kv_slots: int | None = None):
        self.model = step_model
        self.slots = SlotTable(int(kv_slots) if kv_slots else 1 << 16)

    def warmup(self) -> None:
        pass

    def add(self, job: Job) -> None:
        job.prefill_left = job.n_prompt = max(1, int(job.req.n_input_tokens))

    def step(self, engine: "Engine", now: float, clock) -> tuple[float, list[tuple[Job, int, bool]], int]:
        """Runs one step; returns (seconds it took, [(job, new tokens, finished)], tokens processed)."""
        plan, _evicted = plan_engine_step(engine, now, self.slots)
        n_tok = sum(t for _, t in plan)
        n_admit = sum(1 for j, _ in plan if not j.running)  # joining in this step (a split prompt: its first)
        dt = self.model.step_s(len(plan), n_tok, n_admit)
        events = []
        for j, t in plan:
            new = 0
            if j.prefill_left > 0:
                j.prefill_left -= t
                if j.prefill_left <= 0:
                    new = 1  # the step that ends the prompt emits the first token
            else:
                new = 1
            done = new > 0 and j.generated + new >= max(1, int(j.req.true_tokens))
            events.append((j, new, done))
            if done:
                self.slots.release(j)
        if not clock.virtual:  # a fake decoder on the wall clock: take the time for real
            time.sleep(dt)
        return dt, events, n_tok

    def stop_reason(self, job: Job) -> str:
        return "eos"


