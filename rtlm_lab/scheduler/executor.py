"""Real executor: requests arrive on the wall clock and real ``generate`` calls serve them.

* the dispatcher (this process's main thread) admits arrivals at their trace times, computes the policy's
  predictions for each arriving request (timed: run-time overhead), asks the policy and hands batches to
  workers;
* the *main* worker (a thread) owns the platform's model (the GPU, or the CPU on the cpu platform) and runs
  one real ``generate`` per batch; a CUDA out-of-memory error splits the batch in two and retries;
* *offload* workers (cuda platform) are separate processes, each with its own CPU copy of the model; one
  that dies mid-request has its batch put back in the queue (served elsewhere, counted once, ``retries``
  recorded).

Every request completes exactly once or the run fails loudly; one record per request (see
:data:`~rtlm_lab.scheduler.core.RECORD_COLUMNS`).
"""

from __future__ import annotations

import logging
import multiprocessing as mp
import queue as queue_mod
import threading
import time
from typing import Any, Callable, Mapping, Sequence

import pandas as pd

from rtlm_lab.scheduler.core import Dispatcher, WorkerSpec, metrics, record
from rtlm_lab.scheduler.policies import Policy, Request

log = logging.getLogger("rtlm_lab.scheduler")

DecodeFn = Callable[[Sequence[str], Sequence[str]], list]  # (texts, contexts) -> list[Generation]


def _is_oom(exc: BaseException) -> bool:
    import torch

    return isinstance(exc, getattr(torch, "OutOfMemoryError", ())) or "out of memory" in str(exc).lower()


def generate_splitting(decode: DecodeFn, texts: Sequence[str], contexts: Sequence[str], on_split=None) -> list:
    """``decode`` the batch; on an out-of-memory error, free the cache, split it in halves and retry each."""
    try:
        return decode(texts, contexts)
    except Exception as exc:  # noqa: BLE001
        if not _is_oom(exc) or len(texts) == 1:
            raise
        import torch

        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        half = len(texts) // 2
        if on_split:
            on_split(len(texts))
        log.warning("out of memory at batch %d: split into %d + %d", len(texts), half, len(texts) - half)
        return (generate_splitting(decode, texts[:half], contexts[:half], on_split)
                + generate_splitting(decode, texts[half:], contexts[half:], on_split))


class MainWorker(threading.Thread):
    """The platform's device: runs batches in a thread, reports to ``events``."""

    def __init__(self, worker_id: str, decode: DecodeFn, events: queue_mod.Queue, clock: Callable[[], float]):
        super().__init__(name=f"worker-{worker_id}", daemon=True)
        self.worker_id, self.decode, self.events, self.clock = worker_id, decode, events, clock
        self.inbox: queue_mod.Queue = queue_mod.Queue()
        self.n_splits = 0

    def submit(self, batch_id: int, reqs: Sequence[Request]) -> None:
        self.inbox.put((batch_id, [r.text for r in reqs], [r.context for r in reqs]))

    def _split(self, n):
        self.n_splits += 1

    def run(self) -> None:
        while True:
            item = self.inbox.get()
            if item is None:
                return
            batch_id, texts, contexts = item
            t_start = self.clock()
            try:
                gens = generate_splitting(self.decode, texts, contexts, self._split)
                self.events.put(("done", self.worker_id, batch_id, t_start, self.clock(), gens))
            except BaseException as exc:  # noqa: BLE001 - reported to the dispatcher, which stops the run
                self.events.put(("error", self.worker_id, batch_id, t_start, self.clock(), exc))

    def stop(self) -> None:
        self.inbox.put(None)


def _offload_main(spec: Mapping[str, Any], threads: int, inbox, outbox) -> None:  # pragma: no cover - subprocess
    import torch

    from rtlm_lab.lm.loader import load_lm

    torch.set_num_threads(max(1, int(threads)))
    lm = load_lm(dict(spec), {"name": "cpu", "device": "cpu", "dtype": "float32", "threads": int(threads)})
    outbox.put(("ready", None))
    while True:
        item = inbox.get()
        if item is None:
            return
        batch_id, texts, contexts = item
        gens = lm.generate(texts, contexts)
        outbox.put(("done", (batch_id, [g.as_row() | {"output_ids": []} for g in gens])))


class _Gen:
    """A Generation rebuilt from a row sent back by an offload process."""

    def __init__(self, row: Mapping[str, Any]):
        self.__dict__.update(row)


class OffloadWorker:
    """A CPU worker process with its own model copy (spawned: no CUDA state inherited)."""

    def __init__(self, worker_id: str, spec: Mapping[str, Any], threads: int, events: queue_mod.Queue,
                 clock: Callable[[], float]):
        ctx = mp.get_context("spawn")
        self.worker_id, self.events, self.clock = worker_id, events, clock
        self.inbox, self.outbox = ctx.Queue(), ctx.Queue()
        self.proc = ctx.Process(target=_offload_main, args=(dict(spec), threads, self.inbox, self.outbox),
                                name=f"offload-{worker_id}", daemon=True)
        self.proc.start()
        self._starts: dict[int, float] = {}
        self._pump = threading.Thread(target=self._forward, daemon=True)
        self.ready = threading.Event()
        self._pump.start()

    def _forward(self) -> None:
        while True:
            try:
                kind, payload = self.outbox.get(timeout=0.5)
            except queue_mod.Empty:
                if not self.proc.is_alive():
                    return
                continue
            except (EOFError, OSError):
                return
            if kind == "ready":
                self.ready.set()
            else:
                batch_id, rows = payload
                self.events.put(("done", self.worker_id, batch_id, self._starts.pop(batch_id, self.clock()),
                                 self.clock(), [_Gen(r) for r in rows]))

    def submit(self, batch_id: int, reqs: Sequence[Request]) -> None:
        self._starts[batch_id] = self.clock()
        self.inbox.put((batch_id, [r.text for r in reqs], [r.context for r in reqs]))

    def alive(self) -> bool:
        return self.proc.is_alive()

    def stop(self) -> None:
        try:
            self.inbox.put(None)
            self.proc.join(timeout=5)
        finally:
            if self.proc.is_alive():
                self.proc.kill()


def execute(requests: Sequence[Request], policy: Policy, main_decode: DecodeFn, workers: Sequence[WorkerSpec],
            predictors=None, slo_k: float = 5.0, offload_spec: Mapping[str, Any] | None = None,
            offload_threads: int = 4, ready_timeout_s: float = 600.0, progress: bool = True,
            on_start: Callable[[dict[str, Any]], None] | None = None) -> tuple[pd.DataFrame, dict]:
    """Serve ``requests`` (arrival-ordered, ``arrival_s`` from the start) for real; return (records, metrics).

    ``workers``: one ``main`` spec (served by ``main_decode``) and any number of ``offload`` specs (each a
    process loading ``offload_spec`` on the CPU with ``offload_threads`` threads). ``predictors``: a
    :class:`~rtlm_lab.scheduler.predictions.Predictors` for the policy's ``needs`` (computed per arrival);
    ``None`` keeps the predictions already in ``Request.pred``.
    """
    from tqdm.auto import tqdm

    events: queue_mod.Queue = queue_mod.Queue()
    disp = Dispatcher(policy, workers)
    mains = [w for w in workers if w.kind == "main"]
    offs = [w for w in workers if w.kind == "offload"]
    offload: dict[str, OffloadWorker] = {}
    t_origin = [time.perf_counter()]
    clock = lambda: time.perf_counter() - t_origin[0]  # noqa: E731
    main = MainWorker(mains[0].worker_id, main_decode, events, clock)
    main.start()
    try:
        for w in offs:
            offload[w.worker_id] = OffloadWorker(w.worker_id, offload_spec or {}, offload_threads, events, clock)
        deadline = time.perf_counter() + ready_timeout_s
        for w in offload.values():
            while not w.ready.wait(0.5):
                if not w.alive() or time.perf_counter() > deadline:
                    raise RuntimeError(f"offload worker {w.worker_id} did not start")
        pending = sorted(requests, key=lambda r: r.arrival_s)
        n = len(pending)
        needs = tuple(policy.needs)
        rows: list[dict] = []
        running: dict[str, tuple[int, list[Request], float]] = {}
        prediction_s = 0.0
        deaths = 0
        served: set[str] = set()
        if predictors is not None and needs and pending:  # load the predictors' models before the clock starts
            predictors.predict_one(pending[0].text, needs)
        bar = tqdm(total=n, desc=f"{policy.name} (real)", unit="req", disable=not progress, mininterval=1.0)
        t_origin[0] = time.perf_counter()  # arrivals are relative to now
        if on_start:
            on_start({"t_origin": t_origin[0]})
        i = 0
        wake: float | None = None
        while len(served) < n:
            now = clock()
            while i < n and pending[i].arrival_s <= now:  # admit arrivals (their clock starts at arrival_s)
                r = pending[i]
                if predictors is not None and needs:
                    pred, sec = predictors.predict_one(r.text, needs)
                    r.pred.update(pred)
                    prediction_s += sec
                disp.arrive(r)
                i += 1
            while True:  # completions
                try:
                    ev = events.get_nowait()
                except queue_mod.Empty:
                    break
                kind, wid, batch_id, t_start, t_end, payload = ev
                if kind == "error":
                    raise payload
                if wid not in running or running[wid][0] != batch_id:
                    continue  # a late result from a worker already declared dead: its batch was requeued
                batch_id0, batch, t_disp = running.pop(wid)
                disp.finish(wid, t_end)
                e2e_max = max(g.e2e_s for g in payload)
                for r, g in zip(batch, payload):
                    finish = t_end - (e2e_max - g.e2e_s)  # rows finish at their own last token
                    if r.request_id in served:
                        raise RuntimeError(f"request {r.request_id} completed twice")
                    served.add(r.request_id)
                    rows.append(record(r, policy, wid, batch_id0, len(batch), t_disp,
                                       finish - (g.e2e_s - g.ttft_s), finish, g.n_output_tokens, slo_k,
                                       g.stop_reason))
                bar.update(len(batch))
            for wid, w in offload.items():  # a dead offload worker: its batch is retried elsewhere
                if wid in disp.alive_workers and not w.alive():
                    back = disp.fail_worker(wid, clock())
                    running.pop(wid, None)
                    deaths += 1
                    log.warning("offload worker %s died; %d request(s) back in the queue", wid, len(back))
            now = clock()
            assignments, wake = disp.decide(now)
            for a, batch_id in assignments:
                running[a.worker_id] = (batch_id, a.requests, now)
                (main if a.worker_id == main.worker_id else offload[a.worker_id]).submit(batch_id, a.requests)
            # sleep until the next arrival, the policy's wake-up or a completion
            nxt = [t for t in (pending[i].arrival_s if i < n else None, wake) if t is not None]
            timeout = max(0.0, min(nxt) - clock()) if nxt else 0.5
            try:
                ev = events.get(timeout=min(timeout, 0.5))
                events.put(ev)  # handled at the top of the loop
            except queue_mod.Empty:
                pass
        bar.close()
    finally:
        main.stop()
        for w in offload.values():
            w.stop()
    df = pd.DataFrame(rows)
    m = metrics(df, len(requests), disp, prediction_s,
                {"mode": "real", "oom_splits": main.n_splits,
                 "offload_deaths": deaths})
    return df, m
