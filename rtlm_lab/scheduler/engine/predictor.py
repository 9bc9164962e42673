"""Predictions on the clock: the predictor server the serving loop takes ready requests from."""

from __future__ import annotations

import math
import queue as queue_mod
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable, Sequence


# ---------------------------------------------------------------------------------------------- predictor
@dataclass
class PredCost:
    """Seconds one prediction batch of ``n`` requests takes: ``a + b x n`` (measured; the sim models it)."""

    a: float = 0.0
    b: float = 0.0

    def batch_s(self, n: int) -> float:
        return self.a + self.b * n if n else 0.0

    def to_dict(self):
        return {"a": self.a, "b": self.b}


class PredictorServer:
    """Predictions on the clock: arrivals queue for a single predictor that serves everything that has
    arrived in one batch (up to ``max_batch``), as a deployment would run it beside the engine.

    Real mode (``predict`` given, wall clock): a thread takes arrivals at their trace times, predicts them
    (``predict(requests) -> list[dict]``, timed), and marks them ready; sim mode: the same queue with the
    measured :class:`PredCost` (with ``predict`` given, it is called on each modelled batch at the batch's start,
    e.g. a predictor recalibrated at run time; the cost stays the modelled one). Policies that need no
    prediction make every request ready at arrival.
    """

    def __init__(self, requests: Sequence[Any], needs: Sequence[str], clock, predict: Callable | None = None,
                 cost: PredCost | None = None, max_batch: int = 64):
        self.reqs = sorted(requests, key=lambda r: r.arrival_s)
        self.needs = tuple(needs)
        self.clock = clock
        self.predict = predict
        self.cost = cost or PredCost()
        self.max_batch = int(max_batch)
        self.i = 0                      # next arrival not yet taken by the predictor
        self.free_at = 0.0              # sim: when the predictor is free
        self.inflight: list[tuple[float, list[Any]]] = []   # sim: (ready time, requests)
        self.batches: list[tuple[float, float, int]] = []   # (start, seconds, n)
        self.ready_q: queue_mod.Queue = queue_mod.Queue()
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self.error: BaseException | None = None

    # --- real mode: a thread
    def start(self) -> None:
        if self.needs and self.predict is not None and not self.clock.virtual:
            self._thread = threading.Thread(target=self._run, name="predictor", daemon=True)
            self._thread.start()

    def _run(self) -> None:
        try:
            while self.i < len(self.reqs) and not self._stop.is_set():
                now = self.clock.now()
                nxt = self.reqs[self.i].arrival_s
                if nxt > now:
                    time.sleep(min(nxt - now, 0.01))
                    continue
                batch = []
                while self.i < len(self.reqs) and self.reqs[self.i].arrival_s <= now and len(batch) < self.max_batch:
                    batch.append(self.reqs[self.i])
                    self.i += 1
                t0 = self.clock.now()
                preds = self.predict(batch)
                t1 = self.clock.now()
                self.batches.append((t0, t1 - t0, len(batch)))
                for r, p in zip(batch, preds):
                    r.pred.update(p)
                    self.ready_q.put((t1, r))
        except BaseException as exc:  # noqa: BLE001 - reported to the loop, which stops the run
            self.error = exc

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)

    # --- both modes
    def take_ready(self, now: float) -> list[tuple[float, Any]]:
        """Requests whose prediction is done by ``now``: ``[(ready time, request)]``."""
        out = []
        if not self.needs or (self.predict is None and not self.clock.virtual):
            # no prediction needed, or predictions precomputed (tests): ready at arrival
            while self.i < len(self.reqs) and self.reqs[self.i].arrival_s <= now:
                out.append((self.reqs[self.i].arrival_s, self.reqs[self.i]))
                self.i += 1
            return out
        if self._thread is not None:
            if self.error is not None:
                raise self.error
            while True:
                try:
                    out.append(self.ready_q.get_nowait())
                except queue_mod.Empty:
                    return out
        # sim: a single batch server with the measured cost
        while True:
            progressed = False
            while self.inflight and self.inflight[0][0] <= now:
                t, batch = self.inflight.pop(0)
                out.extend((t, r) for r in batch)
                progressed = True
            if not self.inflight and self.i < len(self.reqs):
                start = max(self.free_at, self.reqs[self.i].arrival_s)
                if start <= now:
                    batch = []
                    while (self.i < len(self.reqs) and self.reqs[self.i].arrival_s <= start
                           and len(batch) < self.max_batch):
                        batch.append(self.reqs[self.i])
                        self.i += 1
                    if self.predict is not None:  # sim with a live predictor: it predicts at the batch's start
                        for r, p in zip(batch, self.predict(batch)):
                            r.pred.update(p)
                    dt = self.cost.batch_s(len(batch))
                    self.free_at = start + dt
                    self.batches.append((start, dt, len(batch)))
                    self.inflight.append((start + dt, batch))
                    progressed = True
            if not progressed:
                return out

    def next_event(self) -> float:
        """Sim: the next time something becomes ready or arrives (inf when nothing is left)."""
        t = math.inf
        if self.inflight:
            t = self.inflight[0][0]
        elif self.i < len(self.reqs):
            t = max(self.reqs[self.i].arrival_s, self.free_at if self.needs else 0.0)
        return t

    @property
    def busy_s(self) -> float:
        return float(sum(b[1] for b in self.batches))


