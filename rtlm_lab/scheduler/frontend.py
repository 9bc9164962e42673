"""The front end and the engine processes (``scheduler.engine_process=true``): each engine core runs as a busy
loop in a process of its own, as vLLM V1's ``EngineCore``; this process keeps the trace clock, runs the
predictor server (text predictors, on the clock) and places each ready request on an engine.

* An engine process builds its engine from a picklable spec (:func:`engine_spec`: the backend's kind and what
  it needs, the budgets, the policy), warms it up, then steps it whenever it holds work. Requests reach it when
  their prediction is ready; finished jobs come back with their times (every process reads the same
  ``time.perf_counter`` clock, shifted by the run's origin).
* Placement reads :class:`RemoteEngine` views: the requests each engine holds (sent minus finished), its
  measured capacity and step model; the policy's own ``place`` rule picks, as in :func:`~rtlm_lab.scheduler.
  engine.serve`.
* So a prediction's cost delays its own request only: the engine's interpreter never runs a predictor
  (``tests/test_frontend.py``).

The simulator keeps :func:`~rtlm_lab.scheduler.engine.serve` (one process, a virtual clock).
"""

from __future__ import annotations

import logging
import multiprocessing as mp
import queue as queue_mod
import time
from typing import Any, Callable, Mapping, Sequence

import pandas as pd

from rtlm_lab.scheduler.engine import STEP_COLUMNS, Engine, Job, SimBackend, StepModel
from rtlm_lab.scheduler.engine.loop import drain

log = logging.getLogger("rtlm_lab.scheduler")


class OriginClock:
    """``time.perf_counter() - origin``: the run's wall clock in any process of this machine."""

    virtual = False

    def __init__(self, origin: float):
        self.origin = float(origin)

    def start(self) -> None:  # the front end starts the clock; an engine process only reads it
        pass

    def now(self) -> float:
        return time.perf_counter() - self.origin

    def sleep_until(self, t: float) -> None:
        dt = t - self.now()
        if dt > 0:
            time.sleep(min(dt, 0.05))


def engine_spec(engine_id: str, policy, max_seqs: int, max_batch_tokens: int, backend: Mapping[str, Any],
                kind: str = "main", step_model: StepModel | None = None) -> dict[str, Any]:
    """A picklable recipe of one engine. ``backend``: ``{"type": "sim", "step_model": {...}, "kv_slots": n}`` (a
    fake decoder on the wall clock: tests) or ``{"type": "real", "lm_spec": {...}, "platform": {...},
    "ecfg": {...}}`` (the LM is loaded in the engine's process)."""
    return {"engine_id": engine_id, "policy": policy, "max_seqs": int(max_seqs),
            "max_batch_tokens": int(max_batch_tokens), "backend": dict(backend), "kind": kind,
            "step_model": step_model.to_dict() if step_model is not None else None}


def _build(spec: Mapping[str, Any]) -> Engine:
    b = spec["backend"]
    if b["type"] == "sim":
        backend = SimBackend(StepModel.from_dict(b["step_model"]), kv_slots=b.get("kv_slots"))
    elif b["type"] == "real":
        from rtlm_lab.lm.loader import load_lm
        from rtlm_lab.scheduler.engine.build import make_backend

        backend = make_backend(load_lm(b["lm_spec"], b["platform"]), b["ecfg"])
    else:
        raise ValueError(f"unknown engine backend type {b['type']!r}")
    sm = StepModel.from_dict(spec["step_model"]) if spec.get("step_model") else None
    return Engine(spec["engine_id"], backend, spec["policy"], spec["max_seqs"], spec["max_batch_tokens"],
                  kind=spec.get("kind", "main"), step_model=sm)


def _engine_main(spec: Mapping[str, Any], inq, outq) -> None:
    """The engine core's process: build, warm up, then a busy loop until told to stop."""
    try:
        engine = _build(spec)
        engine.backend.warmup()
        outq.put(("ready", spec["engine_id"], None))
        msg = inq.get()
        if msg[0] != "start":
            return
        clock = OriginClock(msg[1])
        running = True
        while running:
            # new work (waiting briefly only when idle: a busy engine never waits on its inbox)
            for it in drain(inq, None if engine.has_work() else 0.002):
                if it[0] == "job":
                    engine.add(Job(req=it[1], ready_s=float(it[2])))
                elif it[0] == "stop":
                    running = False
            if running and engine.has_work():
                fin = engine.step(clock.now(), clock)
                if fin:
                    outq.put(("done", spec["engine_id"], fin))
        facts = engine.backend.facts() if hasattr(engine.backend, "facts") else {}
        outq.put(("facts", spec["engine_id"], {"steps": engine.steps, "busy_s": engine.busy_s, "backend": facts,
                                               "probe_s": float(getattr(engine.backend, "probe_s", 0.0))}))
        if hasattr(engine.backend, "close"):
            engine.backend.close()
    except BaseException as exc:  # noqa: BLE001 - handed to the front end, which ends the run with it
        outq.put(("error", spec.get("engine_id", "?"), f"{type(exc).__name__}: {exc}"))


class RemoteEngine:
    """The front end's view of an engine process, for placement: ``id``, ``kind``, ``outstanding`` (requests
    sent and not finished), ``capacity_rps``; :meth:`predicted_completion` from its step model."""

    def __init__(self, spec: Mapping[str, Any], capacity_rps: float = 1.0):
        self.id, self.kind = spec["engine_id"], spec.get("kind", "main")
        self.max_seqs = int(spec["max_seqs"])
        self.policy = spec["policy"]
        self.step_model = StepModel.from_dict(spec["step_model"]) if spec.get("step_model") else None
        self.capacity_rps = float(capacity_rps)
        self.held: dict[str, Job] = {}

    @property
    def outstanding(self) -> int:
        return len(self.held)

    def predicted_completion(self, job: Job, now: float) -> float:
        """The wait for a row, then the job's predicted tokens at the current load (the engine's own estimate
        without its step-by-step state, which lives in the other process)."""
        sm = self.step_model
        if sm is None:
            return now + len(self.held)
        tokens = self.policy.placement_tokens
        load = min(self.max_seqs, len(self.held) + 1)
        own = sm.step_s(load, load + int(job.req.n_input_tokens), 1) + (tokens(job.req) - 1) * sm.step_s(load, load)
        ahead = max(0, len(self.held) + 1 - self.max_seqs)
        if ahead:
            rem = sorted(max(1.0, tokens(j.req)) for j in self.held.values())
            own += sum(rem[:ahead]) * sm.step_s(self.max_seqs, self.max_seqs) / self.max_seqs
        return now + own


def serve_processes(requests: Sequence[Any], policy, specs: Sequence[Mapping[str, Any]], predictor,
                    capacity_rps: Sequence[float] | None = None, progress: bool = False, desc: str = "",
                    on_finish: Callable[[list], None] | None = None, ready_timeout_s: float = 900.0,
                    clock=None) -> tuple[list[Job], dict[str, Any]]:
    """Serve every request once with each engine in a process of its own (see the module doc); returns the
    finished jobs and the run facts, as :func:`~rtlm_lab.scheduler.engine.serve` does."""
    from tqdm.auto import tqdm

    from rtlm_lab.scheduler.engine import WallClock

    ctx = mp.get_context("spawn")  # CUDA in the children: never fork a process that holds a CUDA context
    outq = ctx.Queue()
    procs, inqs, views = {}, {}, {}
    caps = list(capacity_rps or [1.0] * len(specs))
    for spec, cap in zip(specs, caps):
        eid = spec["engine_id"]
        inqs[eid] = ctx.Queue()
        procs[eid] = ctx.Process(target=_engine_main, args=(spec, inqs[eid], outq), name=f"engine-{eid}", daemon=True)
        views[eid] = RemoteEngine(spec, cap)
    n = len(requests)
    done: list[Job] = []
    facts: dict[str, Any] = {}
    bar = tqdm(total=n, desc=desc or f"{policy.name}", unit="req", disable=not progress, mininterval=1.0)
    clock = clock or WallClock()
    try:
        for p in procs.values():
            p.start()
        waiting = set(procs)
        deadline = time.perf_counter() + ready_timeout_s
        while waiting:  # every engine loaded and warmed up before the clock starts
            try:
                kind, eid, payload = outq.get(timeout=1.0)
            except queue_mod.Empty:
                if time.perf_counter() > deadline or any(not p.is_alive() for p in procs.values()):
                    raise RuntimeError("an engine process did not start (see its log)") from None
                continue
            if kind == "error":
                raise RuntimeError(f"engine {eid}: {payload}")
            waiting.discard(eid)
        clock.start()
        for q in inqs.values():
            q.put(("start", clock.origin))
        predictor.start()
        engines = list(views.values())
        while len(done) < n:
            now = clock.now()
            for t_ready, r in predictor.take_ready(now):
                job = Job(req=r, ready_s=float(t_ready))
                eid = policy.place(job, engines, now)
                if eid not in views:
                    raise RuntimeError(f"policy {policy.name} placed {r.request_id} on unknown engine {eid}")
                views[eid].held[r.request_id] = job
                inqs[eid].put(("job", r, float(t_ready)))
            try:
                kind, eid, payload = outq.get(timeout=0.001)
            except queue_mod.Empty:
                continue
            if kind == "error":
                raise RuntimeError(f"engine {eid}: {payload}")
            if kind == "done":
                for j in payload:
                    views[eid].held.pop(j.rid, None)
                    j.worker = eid
                done.extend(payload)
                bar.update(len(payload))
                if on_finish is not None:
                    on_finish(payload)
        for q in inqs.values():
            q.put(("stop",))
        want = set(procs)
        while want:
            kind, eid, payload = outq.get(timeout=120)
            if kind == "facts":
                facts[eid] = payload
                want.discard(eid)
            elif kind == "error":
                raise RuntimeError(f"engine {eid}: {payload}")
    finally:
        predictor.stop()
        bar.close()
        for q in inqs.values():
            try:
                q.put_nowait(("stop",))
            except Exception:  # noqa: BLE001
                pass
        for p in procs.values():
            p.join(timeout=30)
            if p.is_alive():
                p.terminate()
    steps = {e: pd.DataFrame(f["steps"], columns=list(STEP_COLUMNS)) for e, f in facts.items()}
    return done, {"steps": steps, "predictor_batches": pd.DataFrame(predictor.batches, columns=["t_s", "dt_s", "n"]),
                  "busy_s": {e: f["busy_s"] for e, f in facts.items()},
                  "probe_s": {e: f["probe_s"] for e, f in facts.items()}, "threaded": False,
                  "backend": {e: f["backend"] for e, f in facts.items() if f["backend"]}, "engine_process": True}
