"""A CPU offload worker as an engine: a process of its own, batch 1."""

from __future__ import annotations

from typing import TYPE_CHECKING

import queue as queue_mod
import time

from rtlm_lab.scheduler.engine.jobs import Job
from rtlm_lab.scheduler.engine.planner import candidates

if TYPE_CHECKING:
    from rtlm_lab.scheduler.engine.loop import Engine


class ProcessBackend:
    """A CPU offload worker: a separate process with its own CPU copy of the LM, serving one request at a time
    with the LM's own ``generate`` (batch 1; on a few CPU cores batching gains little). Its "step" never
    blocks the loop: it hands the next request (the policy's order) to an idle worker and collects a finished
    one; times come from the worker's clock reading (TTFT and end-to-end of the real call), so a completion the
    loop sees one GPU step late still has its true finish time. Every policy gets these workers; where a
    request goes is the policy's placement.
    """

    def __init__(self, lm_spec, threads: int, ready_timeout_s: float = 600.0):
        from rtlm_lab.scheduler.executor import OffloadWorker

        self.events: queue_mod.Queue = queue_mod.Queue()
        self._origin = time.perf_counter()
        self.worker = OffloadWorker("offload", lm_spec, threads, self.events, self._clock)
        deadline = time.perf_counter() + ready_timeout_s
        while not self.worker.ready.wait(0.5):
            if not self.worker.alive() or time.perf_counter() > deadline:
                raise RuntimeError("the CPU offload worker did not start")
        self.current: Job | None = None
        self.clock = None
        self._batch = 0

    def _clock(self) -> float:
        return self.clock.now() if self.clock is not None else time.perf_counter() - self._origin

    def warmup(self) -> None:
        pass  # the worker loaded its model and is ready before the clock starts

    def add(self, job: Job) -> None:
        job.prefill_left = 1

    def step(self, engine: "Engine", now: float, clock) -> tuple[float, list[tuple[Job, int, bool]], int]:
        self.clock = clock
        events: list[tuple[Job, int, bool]] = []
        if self.current is not None:
            try:
                kind, _wid, _bid, t_start, t_end, payload = self.events.get_nowait()
            except queue_mod.Empty:
                return 0.0, [], 0
            if kind == "error":
                raise payload
            g = payload[0]
            j, self.current = self.current, None
            j.first_token_s = t_start + float(g.ttft_s)
            j.finish_override_s = t_start + float(g.e2e_s)
            j.stop_reason = str(g.stop_reason)
            engine.busy_s += float(g.e2e_s)
            events.append((j, int(g.n_output_tokens), True))
        if self.current is None and engine.waiting:
            j = candidates([], engine.waiting, engine.policy, now)[0]
            self.current = j
            self.worker.submit(self._batch, [j.req])
            self._batch += 1
            events.append((j, 0, False))
        return 0.0, events, 0

    def stop_reason(self, job: Job) -> str:
        return job.stop_reason

    def close(self) -> None:
        self.worker.stop()


