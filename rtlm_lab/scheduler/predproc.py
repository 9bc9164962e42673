"""The fitted length predictors served from their own process (``scheduler.predictor_process=true``).

Why: by default the predictors run in the serving process, beside the engine (the static path's dispatcher
calls them per arrival while the GPU worker thread decodes; the continuous engine's predictor thread runs
beside its step loop). There they contend with the engine twice. The first is the GIL: a MiniLM embedding is a
few hundred small torch calls, each releasing and re-taking it, and beside a Python-bound thread every re-take
can wait a switch interval; a separate process has its own interpreter. The second is cores: torch's intra-op
threads (one per core by default) wait for the cores the engine's host thread and the CPU offload workers keep
busy, since a parallel region waits for its slowest thread. On the H200 host a MiniLM prediction beside a real
GPU decode thread took 10x its time alone in the serving process and 34x in a process of its own with 16
threads (``outputs/reference/bench/predictor_cuda.json``, ``rtlm-bench bench=predictor``): there the cores
matter, and ``scheduler.predictor_threads`` gives the predictor process fewer of them.

The proxy has the methods the engines call (``predict_one``, ``predict_batch``, ``predict_many``, ``update``),
so it is a drop-in for :class:`~rtlm_lab.scheduler.predictions.Predictors`; ``predict_one`` times the round
trip (pipe included): every cost stays on the clock. The process is spawned (no CUDA state inherited) with the
predictors pickled, and started before the clock starts.
"""

from __future__ import annotations

import multiprocessing as mp
import threading
import time
from contextlib import contextmanager
from typing import Any, Iterator, Mapping, Sequence

def _serve(conn, predictors, threads: int | None) -> None:  # pragma: no cover - runs in the child process
    import torch

    if threads:
        torch.set_num_threads(int(threads))
    conn.send((True, "ready"))
    while True:
        try:
            msg = conn.recv()
        except EOFError:
            return
        if msg is None:
            return
        name, args = msg
        try:
            conn.send((True, getattr(predictors, name)(*args)))
        except Exception as exc:  # noqa: BLE001 - re-raised in the serving process
            conn.send((False, f"{type(exc).__name__}: {exc}"))


class PredictorProcess:
    """Fitted predictors in a spawned process. ``threads``: the child's torch threads (None: torch's default)."""

    def __init__(self, predictors, threads: int | None = None, timeout_s: float = 600.0):
        ctx = mp.get_context("spawn")
        self._conn, child = ctx.Pipe()
        self._lock = threading.Lock()  # the predictor thread and the online-update callback share one pipe
        self.timeout_s = float(timeout_s)
        self.threads = threads
        self.proc = ctx.Process(target=_serve, args=(child, predictors, threads), name="predictor", daemon=True)
        self.proc.start()
        child.close()
        self._recv()  # "ready": the predictors are unpickled (their models load on the first call)

    def _recv(self) -> Any:
        if not self._conn.poll(self.timeout_s):
            raise RuntimeError(f"predictor process gave no answer in {self.timeout_s:.0f} s")
        try:
            ok, val = self._conn.recv()
        except EOFError:
            raise RuntimeError(f"predictor process died (exit code {self.proc.exitcode})") from None
        if not ok:
            raise RuntimeError(f"predictor process: {val}")
        return val

    def _call(self, name: str, *args) -> Any:
        with self._lock:
            self._conn.send((name, args))
            return self._recv()

    def predict_one(self, text: str, columns: Sequence[str]) -> tuple[dict[str, float], float]:
        """As :meth:`Predictors.predict_one`; the seconds are the round trip seen by the caller."""
        t0 = time.perf_counter()
        out, _child_s = self._call("predict_one", str(text), tuple(columns))
        return out, time.perf_counter() - t0

    def predict_batch(self, texts: Sequence[str], columns: Sequence[str]) -> list[dict[str, float]]:
        return self._call("predict_batch", [str(t) for t in texts], tuple(columns))

    def predict_many(self, texts: Sequence[str]):
        return self._call("predict_many", [str(t) for t in texts])

    def update(self, texts: Sequence[str], lengths: Sequence[float]) -> int:
        return self._call("update", [str(t) for t in texts], [float(v) for v in lengths])

    def close(self) -> None:
        if self.proc.is_alive():
            try:
                with self._lock:
                    self._conn.send(None)
            except (BrokenPipeError, OSError):
                pass
            self.proc.join(timeout=10)
            if self.proc.is_alive():
                self.proc.kill()
        self._conn.close()

    def __enter__(self) -> "PredictorProcess":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def check_settings(sched: Mapping[str, Any]) -> None:
    """``scheduler.predictor_process`` / ``predictor_threads`` as given, else one-line :class:`UserError`."""
    from rtlm_lab.errors import UserError

    if not isinstance(sched.get("predictor_process", False), bool):
        raise UserError(f"scheduler.predictor_process must be true or false (got {sched.get('predictor_process')!r})")
    pt = sched.get("predictor_threads")
    if pt is not None and (isinstance(pt, bool) or not isinstance(pt, int) or pt < 1):
        raise UserError(f"scheduler.predictor_threads must be a positive integer or null (got {pt!r})")
    if pt is not None and not sched.get("predictor_process", False):
        raise UserError("scheduler.predictor_threads sets the predictor process's threads: it needs "
                        "scheduler.predictor_process=true")


def predictor_threads(sched: Mapping[str, Any]) -> int:
    """The predictor process's torch threads: ``scheduler.predictor_threads``, else the serving process's."""
    import torch

    return int(sched.get("predictor_threads") or torch.get_num_threads())


@contextmanager
def serving_predictors(predictors, sched: Mapping[str, Any], needs: Sequence[str]) -> Iterator[Any]:
    """The predictors as the run serves them: themselves (``scheduler.predictor_process=false``, the default and
    every committed run before it existed; or nothing to predict: ``needs`` empty) or a
    :class:`PredictorProcess` with :func:`predictor_threads` torch threads, closed when the run ends."""
    if predictors is None or not needs or not bool(sched.get("predictor_process", False)):
        yield predictors
        return
    proc = PredictorProcess(predictors, threads=predictor_threads(sched))
    try:
        yield proc
    finally:
        proc.close()
