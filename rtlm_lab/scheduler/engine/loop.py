"""One engine (a backend, its budgets, its jobs) and the serving loop that drives engines on a clock."""

from __future__ import annotations

import math
import queue as queue_mod
import threading
from typing import Any, Callable, Sequence

import pandas as pd

from rtlm_lab.errors import UserError
from rtlm_lab.scheduler.engine.jobs import STEP_COLUMNS, Job
from rtlm_lab.scheduler.engine.predictor import PredictorServer
from rtlm_lab.scheduler.engine.stepmodel import StepModel


# ---------------------------------------------------------------------------------------------- engine
class Engine:
    """One worker: a backend, its budgets, and the jobs placed on it."""

    def __init__(self, engine_id: str, backend, policy, max_seqs: int, max_batch_tokens: int,
                 kind: str = "main", step_model: StepModel | None = None):
        if int(max_seqs) < 1 or int(max_batch_tokens) < 1:
            raise UserError(f"engine {engine_id}: max_seqs and max_batch_tokens must be >= 1")
        self.id, self.backend, self.policy, self.kind = engine_id, backend, policy, kind
        self.max_seqs, self.max_batch_tokens = int(max_seqs), int(max_batch_tokens)
        self.step_model = step_model           # for placement estimates (predicted completion)
        self.waiting: list[Job] = []
        self.running: list[Job] = []
        self.free_at = 0.0
        self.busy_s = 0.0
        self.n_steps = 0
        self.steps: list[tuple] = []           # (t_start, dt, n_seqs, n_tokens, n_admit)
        # Placed jobs wait in `pending` until the engine's own step hands them to its backend: with an engine
        # thread per device (serve(threaded=True)) only that thread touches the backend and the job lists; the
        # loop's placement reads them under `lock`, which is never held across a backend step.
        self.pending: list[Job] = []
        self.lock = threading.RLock()
        self.wake = threading.Event()          # set by add(): an idle engine thread looks again

    @property
    def outstanding(self) -> int:
        with self.lock:
            return len(self.pending) + len(self.waiting) + len(self.running)

    def has_work(self) -> bool:
        return bool(self.pending or self.waiting or self.running)

    def add(self, job: Job) -> None:
        """Place ``job`` here (any thread); the backend takes it at the engine's next step."""
        with self.lock:
            job.worker = self.id
            self.pending.append(job)
        self.wake.set()

    def _take_pending(self) -> None:
        with self.lock:
            jobs = list(self.pending)
        for j in jobs:  # outside the lock (tokenizing): only this engine's step removes pending jobs
            self.backend.add(j)
        with self.lock:
            del self.pending[:len(jobs)]
            self.waiting.extend(jobs)

    def step(self, now: float, clock) -> list[Job]:
        """One iteration; returns the jobs that finished in it (their times stamped at the step's end)."""
        if self.pending:
            self._take_pending()
        dt, events, n_tok = self.backend.step(self, now, clock)
        if not events:
            return []
        with self.lock:
            return self._account(now, clock, dt, events, n_tok)

    def _account(self, now: float, clock, dt: float, events, n_tok: int) -> list[Job]:
        t_end = now + dt if clock.virtual else clock.now()
        n_admit = sum(1 for j, _, _ in events if math.isnan(j.admit_s))
        self.steps.append((now, dt, len(events), n_tok, n_admit))
        self.n_steps += 1
        self.busy_s += dt
        self.free_at = t_end
        in_step = {id(j) for j, _, _ in events}
        done = []
        for j, new, fin in events:
            if math.isnan(j.admit_s):
                j.admit_s = now
                j.running = True
                self.waiting.remove(j)
                self.running.append(j)
            if new > 0:
                if j.generated == 0 and math.isnan(j.first_token_s):
                    j.first_token_s = t_end
                j.generated += new
                j.token_s.extend([t_end] * new)
            if fin:
                j.finish_s = getattr(j, "finish_override_s", None) or t_end
                j.stop_reason = self.backend.stop_reason(j)
                self.running.remove(j)
                j.running = False
                done.append(j)
        for j in self.running:  # paused for a step (a preemptive policy ran others)
            if id(j) not in in_step:
                j.steps_paused += 1
        return done

    def predicted_completion(self, job: Job, now: float) -> float:
        """When ``job`` would finish here (a policy's placement estimate): the wait for a slot, then its
        predicted tokens at the step time of the current load."""
        sm = self.step_model
        with self.lock:  # a consistent view while the engine's own thread steps
            placed = self.running + self.waiting + self.pending
            free_at = self.free_at
        if sm is None:
            return now + len(placed)
        tokens = self.policy.placement_tokens  # the policy's own length knowledge (prediction, truth or typical)
        pred = tokens(job.req)
        load = min(self.max_seqs, len(placed) + 1)
        own = sm.step_s(load, load + int(job.req.n_input_tokens), 1) + (pred - 1) * sm.step_s(load, load)
        ahead = max(0, len(placed) + 1 - self.max_seqs)
        if ahead:
            rem = [max(1.0, tokens(j.req) - j.generated) for j in placed]
            rem.sort()
            # requests ahead drain at max_seqs per step-time; the first `ahead` to finish free the slots
            own += sum(rem[:ahead]) * sm.step_s(self.max_seqs, self.max_seqs) / self.max_seqs
        return max(now, free_at) + own



# ---------------------------------------------------------------------------------------------- the loop
class EngineThread(threading.Thread):
    """Steps one engine on a thread of its own (a real run with several engines: one GPU's step must not wait
    for another's, as it does when one loop steps them in turn). Finished jobs go to the serving loop through
    ``out``; an error is kept in ``error`` and ends the run."""

    def __init__(self, engine: Engine, clock, out: queue_mod.Queue):
        super().__init__(name=f"engine-{engine.id}", daemon=True)
        self.engine, self.clock, self.out = engine, clock, out
        self.halt = threading.Event()
        self.error: BaseException | None = None

    def run(self) -> None:
        e = self.engine
        try:
            dev = getattr(getattr(e.backend, "lm", None), "device", None)
            if getattr(dev, "type", "") == "cuda":  # kernels, streams and graphs on this engine's GPU
                import torch

                torch.cuda.set_device(dev)
                # a stream of its own (the current stream is per thread): the sync that ends a step waits for
                # this engine's kernels only, not for another replica's on the same GPU. The warm-up ran on the
                # default stream before the clock: it is finished first.
                torch.cuda.synchronize(dev)
                torch.cuda.set_stream(torch.cuda.Stream(dev))
            while not self.halt.is_set():
                if not e.has_work():
                    e.wake.wait(0.05)
                    e.wake.clear()  # has_work() is looked at again after the clear: no placement is missed
                    continue
                n0 = e.n_steps
                fin = e.step(self.clock.now(), self.clock)
                if fin:
                    self.out.put(fin)
                if e.n_steps == n0:  # nothing ran (a CPU offload worker busy with its request): do not spin
                    self.halt.wait(0.001)
        except BaseException as exc:  # noqa: BLE001 - handed to the serving loop, which stops the run
            self.error = exc
            self.out.put(None)

    def stop(self) -> None:
        self.halt.set()
        self.engine.wake.set()
        self.join(timeout=30)


def drain(q, timeout: float | None = None) -> list:
    """Everything in queue ``q`` now; with ``timeout``, first wait that long for one item (an idle loop)."""
    items = []
    try:
        items.append(q.get(timeout=timeout) if timeout else q.get_nowait())
    except queue_mod.Empty:
        return items
    while True:
        try:
            items.append(q.get_nowait())
        except queue_mod.Empty:
            return items


def serve(requests: Sequence[Any], policy, engines: Sequence[Engine], clock, predictor: PredictorServer,
          progress: bool = False, desc: str = "", on_finish: Callable[[list], None] | None = None,
          threaded: bool | None = None) -> tuple[list[Job], dict[str, Any]]:
    """Serve every request once; returns the finished jobs and run facts (steps per engine, predictor batches).

    Same code for real and simulated runs: only the clock, the backends and the predictor differ. Every
    engine is warmed up (graphs captured, kernels loaded) *before* the clock starts.

    ``threaded``: step each engine on its own :class:`EngineThread` while this loop places arrivals and
    collects finished jobs. Default: on a wall clock with several main engines (GPU replicas), whose steps
    would otherwise run one after another; never on a virtual clock (the simulator orders events itself).

    ``on_finish(jobs)``: called with the jobs finished by the engine steps, each job once, before the next
    predictions are taken (run-time recalibration). On a virtual clock a step's jobs finish at the step's end,
    so they are handed over once the clock has reached their ``finish_s`` (no prediction sees the future).
    """
    from tqdm.auto import tqdm

    if threaded is None:
        threaded = not clock.virtual and sum(e.kind == "main" for e in engines) > 1
    if threaded and clock.virtual:
        raise ValueError("engine threads need a wall clock (the simulator steps engines in event order)")
    for e in engines:
        e.backend.warmup()
    n = len(requests)
    by_id = {e.id: e for e in engines}
    done: list[Job] = []
    bar = tqdm(total=n, desc=desc or f"{policy.name}", unit="req", disable=not progress, mininterval=1.0)
    clock.start()
    predictor.start()
    finished: list[Job] = []  # on_finish: finished, not yet handed over

    def hand_over(now: float, final: bool = False) -> None:
        nonlocal finished
        if on_finish is None or not finished:
            return
        due = [j for j in finished if final or not clock.virtual or j.finish_s <= now]
        if due:
            gone = {id(j) for j in due}
            finished = [j for j in finished if id(j) not in gone]
            on_finish(due)

    out: queue_mod.Queue = queue_mod.Queue()
    runners = [EngineThread(e, clock, out) for e in engines] if threaded else []

    def place_ready(now: float) -> None:
        for t_ready, r in predictor.take_ready(now):
            job = Job(req=r, ready_s=float(t_ready))
            eid = policy.place(job, engines, now)
            if eid not in by_id:
                raise RuntimeError(f"policy {policy.name} placed {r.request_id} on unknown engine {eid}")
            by_id[eid].add(job)

    try:
        for t in runners:
            t.start()
        while runners and len(done) < n:  # threaded: this loop only places and collects
            hand_over(clock.now())
            place_ready(clock.now())
            for fin in drain(out, 0.001):
                if fin is None:
                    bad = next(t for t in runners if t.error is not None)
                    raise bad.error
                done.extend(fin)
                finished.extend(fin)
                bar.update(len(fin))
        while not runners and len(done) < n:
            now = clock.now()
            hand_over(now)
            place_ready(now)
            stepped = False
            for e in engines:
                now = clock.now()
                if e.has_work() and (not clock.virtual or e.free_at <= now):
                    fin = e.step(now, clock)
                    stepped = True
                    done.extend(fin)
                    finished.extend(fin)
                    bar.update(len(fin))
            if clock.virtual:
                t_next = min([predictor.next_event()] + [e.free_at for e in engines if e.has_work()])
                if not math.isfinite(t_next):
                    if len(done) < n:
                        raise RuntimeError(f"simulation stalled with {n - len(done)} request(s) unserved")
                    break
                clock.sleep_until(t_next)
            elif not stepped:
                clock.sleep_until(clock.now() + 0.001)
        hand_over(clock.now(), final=True)
    finally:
        for t in runners:
            t.stop()
        predictor.stop()
        bar.close()
    steps = {e.id: pd.DataFrame(e.steps, columns=list(STEP_COLUMNS)) for e in engines}
    return done, {"steps": steps, "predictor_batches": pd.DataFrame(
        predictor.batches, columns=["t_s", "dt_s", "n"]), "busy_s": {e.id: e.busy_s for e in engines},
        "probe_s": {e.id: float(getattr(e.backend, "probe_s", 0.0)) for e in engines}, "threaded": bool(threaded),
        "backend": {e.id: e.backend.facts() for e in engines if hasattr(e.backend, "facts")}}
