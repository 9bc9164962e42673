"""The two clocks the serving loop runs on: the wall clock (real runs) and a virtual one (the simulator)."""

from __future__ import annotations

import time


# ---------------------------------------------------------------------------------------------- clocks
class WallClock:
    """Seconds since :meth:`start` on ``time.perf_counter`` (the clock transformers stamps tokens with)."""

    virtual = False

    def __init__(self):
        self.origin = time.perf_counter()

    def start(self) -> None:
        self.origin = time.perf_counter()

    def now(self) -> float:
        return time.perf_counter() - self.origin

    def to_run_time(self, perf_counter_s: float) -> float:
        return perf_counter_s - self.origin

    def sleep_until(self, t: float) -> None:
        dt = t - self.now()
        if dt > 0:
            time.sleep(min(dt, 0.05))


class VirtualClock:
    """A clock that only moves when told to (the simulator, and tests of the timing logic)."""

    virtual = True

    def __init__(self, t: float = 0.0):
        self.t = float(t)

    def start(self) -> None:
        self.t = 0.0

    def now(self) -> float:
        return self.t

    def sleep_until(self, t: float) -> None:
        self.t = max(self.t, float(t))


