"""Iteration-level (continuous-batching) serving: the engine every policy shares.

Requests join and leave the running batch at every decoding step, as in vLLM, SGLang, TGI and transformers'
own ``generate_batch``. One serving loop (:func:`serve`) drives one or more :class:`Engine` s (workers) on a
clock; the *same* loop runs a real run (wall clock, :class:`HFBackend`: transformers' continuous batching with
paged attention, stepped by us) and a simulation (virtual clock, :class:`SimBackend`: a fitted step-time model).

Who owns what (the direction of knowledge DESIGN.md section 4 asks for):

* an **engine** owns its resources: the concurrency budget ``max_seqs`` (requests in one step), the token
  budget ``max_batch_tokens`` (prompt + decode tokens in one step) and the KV cache; both come from the
  platform config, never from the policy, so every policy gets the same engine;
* a **policy** owns order and placement only (:class:`~rtlm_lab.scheduler.policies.Policy`): ``key`` ranks
  jobs (lower runs first), ``preemptive`` says whether a waiting job may displace a running one for a step
  (its KV cache stays put: a pause, not a recompute), ``place`` picks the engine for a request;
* the **predictor** runs on arrival, in its own thread (real) or as a modelled server (sim), and a request is
  *eligible* only once its prediction is done (:class:`PredictorServer`): the cost is on the clock.

Per step, the candidates are the running jobs then the waiting ones in key order (non-preemptive) or all of
them in key order (preemptive); the first ``max_seqs`` that fit the token budget run, a prompt longer than what
is left of the budget is split over steps — the rule of transformers' ``FIFOScheduler._process_candidates``,
which :class:`HFBackend` delegates to (so the simulator mirrors the real engine).
"""

from __future__ import annotations

import logging
import math
import queue as queue_mod
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import numpy as np
import pandas as pd

from rtlm_lab.errors import UserError

log = logging.getLogger("rtlm_lab.scheduler")


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


# ---------------------------------------------------------------------------------------------- jobs
@dataclass
class Job:
    """One request inside the serving loop (its :class:`~rtlm_lab.scheduler.policies.Request` plus its state)."""

    req: Any
    ready_s: float = math.nan          # prediction done: eligible for an engine
    worker: str = ""
    admit_s: float = math.nan          # first step that processed its prompt
    first_token_s: float = math.nan
    finish_s: float = math.nan
    generated: int = 0
    prefill_left: int = 0
    running: bool = False              # holds KV cache on its engine
    steps_paused: int = 0
    stop_reason: str = ""
    token_s: list[float] = field(default_factory=list)   # when each generated token came out
    finish_override_s: float | None = None               # a worker's own reading of the finish (offload)
    output_ids: list[int] = field(default_factory=list)  # real engine: the generated token ids
    rem_pred: float = math.nan         # LM-state policy: predicted tokens still to come after `rem_at` tokens
    rem_at: int = 0
    refines: list[tuple[int, float]] = field(default_factory=list)  # LM-state policy: (tokens so far, predicted rest)

    @property
    def rid(self) -> str:
        return self.req.request_id

    def predicted_remaining(self) -> float:
        """The LM-state prediction of the tokens still to come (nan before the prefill predicted it)."""
        return self.rem_pred - (self.generated - self.rem_at)


# ---------------------------------------------------------------------------------------------- step model
# one row per engine step in ``steps.parquet``: start, seconds, rows, tokens processed, requests admitted
STEP_COLUMNS = ("t_s", "dt_s", "n_seqs", "n_tokens", "n_admit")


@dataclass
class StepModel:
    """Seconds of one engine step: ``a + b x n_seqs + c x n_tokens + d x n_admit + e x [n_admit > 0]``.

    ``n_seqs``: rows in the step (running plus admitted); ``n_tokens``: prompt tokens prefilled plus one per
    decoding row; ``n_admit``: requests admitted (prefilled) in the step. The admission terms are what a step
    does when requests join: on the slot engine a second forward (the admitted prompts' prefill) and a merge of
    their KV into the running cache (``e``, once per admitting step), plus a per-request share (``d``). A
    saturation run, everything queued at t=0, hardly separates them from ``a``; runs under arrivals do
    (:func:`rtlm_lab.scheduler.replay.fit_step_model`). ``d = e = 0`` is the model without admissions.
    Fitted by least squares on the steps a real engine ran (:meth:`fit`)."""

    a: float
    b: float = 0.0
    c: float = 0.0
    d: float = 0.0
    e: float = 0.0
    source: str = ""
    meta: dict[str, Any] = field(default_factory=dict)

    def step_s(self, n_seqs: int, n_tokens: int, n_admit: int = 0) -> float:
        return max(1e-6, self.a + self.b * n_seqs + self.c * n_tokens + self.d * n_admit
                   + (self.e if n_admit > 0 else 0.0))

    @property
    def has_admission(self) -> bool:
        return self.d != 0.0 or self.e != 0.0

    def isolated(self, n_input_tokens: float, tokens: float) -> float:
        """One request alone: its prefill step (an admission), then ``tokens - 1`` decoding steps at batch 1."""
        t = max(1.0, float(tokens))
        return self.step_s(1, int(n_input_tokens), 1) + (t - 1.0) * self.step_s(1, 1)

    @classmethod
    def fit(cls, steps: pd.DataFrame, source: str = "steps", admission: bool | None = None,
            target: str = "dt_s") -> "StepModel":
        """Least squares of ``steps[target]`` on the terms; ``admission`` (default: when ``steps`` has an
        ``n_admit`` column) adds ``d`` and ``e``. Negative terms (an ill-conditioned fit, e.g. one batch size
        only) fall back to a non-negative fit."""
        if len(steps) < 3:
            raise UserError("need at least 3 engine steps to fit a step model")
        if admission is None:
            admission = "n_admit" in steps.columns
        if admission and "n_admit" not in steps.columns:
            raise UserError("an admission term needs the steps' n_admit column (requests admitted per step)")
        if target not in steps.columns:
            raise UserError(f"steps have no {target!r} column to fit a step model to")
        cols = {"a": np.ones(len(steps)), "b": steps["n_seqs"].to_numpy(float), "c": steps["n_tokens"].to_numpy(float)}
        if admission:
            adm = steps["n_admit"].to_numpy(float)
            # a term whose column does not vary (every step admits, or none does) cannot be told from `a`
            if np.ptp(adm) > 0:
                cols["d"] = adm
            if np.ptp((adm > 0).astype(float)) > 0:
                cols["e"] = (adm > 0).astype(float)
        X = np.vstack(list(cols.values())).T
        y = steps[target].to_numpy(float)
        coef, *_ = np.linalg.lstsq(X, y, rcond=None)
        if (coef[1:] < 0).any() or coef[0] <= 0:  # ill-conditioned: non-negative fit
            from scipy.optimize import nnls

            coef, _ = nnls(X, y)
            coef[0] = max(float(coef[0]), 1e-6)
        resid = y - X @ coef
        terms = {k: float(v) for k, v in zip(cols, coef)}
        return cls(**terms, source=source,
                   meta={"n_steps": int(len(steps)), "rmse_s": float(np.sqrt(np.mean(resid**2))), "target": target,
                         "admission": bool(admission)})

    @classmethod
    def from_profile(cls, profile: pd.DataFrame, b_rel: float = 1.0) -> "StepModel":
        """A batch-1 profile's estimate (no engine measured): the decoding step is the median ms/token, the
        prompt cost the fitted TTFT slope per prompt token; batching gain cannot be read from batch 1, so each
        extra row costs ``b_rel`` x a batch-1 step (1.0: none, the conservative choice for a CPU)."""
        multi = profile[profile["n_output_tokens"] > 1]
        if not len(multi) or "ms_per_token" not in profile:
            raise UserError("the profile has no multi-token replies to estimate a step time from")
        s1 = float(np.median(multi["ms_per_token"])) / 1000.0
        n_in, ttft = profile["n_input_tokens"].to_numpy(float), profile["ttft_s"].to_numpy(float)
        c = float(max(np.polyfit(n_in, ttft, 1)[0], 0.0)) if np.ptp(n_in) > 0 else 0.0
        b = s1 * float(b_rel)
        return cls(a=max(s1 - b - c, 1e-6), b=b, c=c, source="batch-1 profile (no engine measured)",
                   meta={"n": int(len(profile)), "b_rel": float(b_rel)})

    def to_dict(self) -> dict[str, Any]:
        return {"a": self.a, "b": self.b, "c": self.c, "d": self.d, "e": self.e, "source": self.source,
                "meta": self.meta}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "StepModel":
        """From :meth:`to_dict`; files without ``d``/``e`` (written before the admission term) read as 0."""
        try:
            return cls(a=float(d["a"]), b=float(d.get("b", 0.0)), c=float(d.get("c", 0.0)),
                       d=float(d.get("d", 0.0) or 0.0), e=float(d.get("e", 0.0) or 0.0),
                       source=str(d.get("source", "")), meta=dict(d.get("meta") or {}))
        except (KeyError, TypeError, ValueError) as exc:
            raise UserError(f"step model lacks or garbles {exc}; expected keys a, b, c (d, e optional)") from None


# ---------------------------------------------------------------------------------------------- planning
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


# ---------------------------------------------------------------------------------------------- backends
class SimBackend:
    """A fake decoder: each request emits exactly ``true_tokens`` tokens; a step costs what the step model says
    (the simulator, and the fake decoder of the timing tests)."""

    def __init__(self, step_model: StepModel):
        self.model = step_model

    def warmup(self) -> None:
        pass

    def add(self, job: Job) -> None:
        job.prefill_left = max(1, int(job.req.n_input_tokens))

    def step(self, engine: "Engine", now: float, clock) -> tuple[float, list[tuple[Job, int, bool]], int]:
        """Runs one step; returns (seconds it took, [(job, new tokens, finished)], tokens processed)."""
        plan = plan_step(candidates(engine.running, engine.waiting, engine.policy, now), engine.max_seqs,
                         engine.max_batch_tokens)
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
        if not clock.virtual:  # a fake decoder on the wall clock: take the time for real
            time.sleep(dt)
        return dt, events, n_tok

    def stop_reason(self, job: Job) -> str:
        return "eos"


class HFBackend:
    """transformers' continuous batching (paged attention), stepped by the serving loop.

    The manager's own background thread is not used: the loop calls ``prepare_next_batch`` / the generation
    step / ``update_batch`` itself, so each step is timed on our clock and our policy orders the candidates
    through :class:`PolicyScheduler` (registered in transformers' ``SCHEDULER_MAPPING``). Greedy tokens equal
    plain ``generate`` (tests/test_engine.py). Stop strings of one character (Gemma's end-of-line turn end)
    become end-of-sequence ids: every vocabulary token whose text contains one.
    """

    def __init__(self, chat_lm, max_seqs: int, max_batch_tokens: int, num_blocks: int | None = None,
                 page_size: int = 64, cuda_graphs: bool | None = None):
        from transformers import GenerationConfig
        from transformers.generation.configuration_utils import ContinuousBatchingConfig

        if chat_lm.is_encoder_decoder:
            raise UserError(f"{chat_lm.name} is an encoder-decoder: transformers' continuous batching serves "
                            "decoder-only models; use scheduler.engine=static for it")
        _register_scheduler()
        self.lm = chat_lm
        self.max_new = int(chat_lm.spec.get("max_new_tokens", 64))
        self.eos = sorted(set(chat_lm.eos_ids) | stop_string_ids(chat_lm))
        tok = chat_lm.tokenizer
        gen = GenerationConfig(do_sample=False, max_new_tokens=self.max_new, eos_token_id=self.eos or -1,
                               pad_token_id=tok.pad_token_id)
        kw: dict[str, Any] = {"scheduler_type": _SCHED_NAME, "max_requests_per_batch": int(max_seqs),
                              "max_batch_tokens": int(max_batch_tokens), "page_size": int(page_size),
                              "allow_block_sharing": False, "use_async_batching": False}
        if num_blocks:
            kw["num_blocks"] = int(num_blocks)
        else:  # sized from free memory: leave room for the rest of the process (the other backend, plain generate)
            kw["max_memory_percent"] = 0.4
        if cuda_graphs is not None:
            kw["use_cuda_graph"] = bool(cuda_graphs)
        if chat_lm.device.type == "cpu":
            kw["use_cuda_graph"] = False
        self.cb = ContinuousBatchingConfig(**kw)
        self.mgr = chat_lm.model.init_continuous_batching(generation_config=gen, continuous_batching_config=self.cb)
        self.bp = self.mgr._create_batch_processor()
        self.mgr.batch_processor = self.bp
        self.sched: PolicyScheduler = self.bp.scheduler
        self.jobs: dict[str, Job] = {}
        self.finished: dict[str, Any] = {}

    def warmup(self) -> None:
        """CUDA graphs for every padded size (transformers' warm-up), then a few real requests at full
        concurrency: nothing is compiled or captured inside the clock."""
        self.mgr.warmup()
        ids = self.lm.encode(["Hello there, how are you?"], None, self.max_new)["input_ids"][0].tolist()
        n = min(self.cb.max_requests_per_batch, 64)
        for i in range(n):
            self.mgr.add_request(ids, request_id=f"__warm{i}", max_new_tokens=8, eos_token_id=[-1])
        self.sched.order = None
        while self.bp.prepare_next_batch():
            self.mgr._generation_step()
            self.bp.update_batch()
        self._drain()
        self.finished.clear()

    def encode(self, req) -> list[int]:
        enc = self.lm.encode([req.text], [req.context], self.max_new)
        return enc["input_ids"][0].tolist()

    def add(self, job: Job) -> None:
        ids = self.encode(job.req)
        job.prefill_left = len(ids)
        self.jobs[job.rid] = job
        self.mgr.add_request(ids, request_id=job.rid, max_new_tokens=self.max_new, eos_token_id=self.eos or [-1])

    def _drain(self) -> None:
        q = self.mgr.output_router.output_queue
        while True:
            try:
                o = q.get_nowait()
            except queue_mod.Empty:
                return
            self.finished[o.request_id] = o

    def step(self, engine: "Engine", now: float, clock) -> tuple[float, list[tuple[Job, int, bool]], int]:
        import torch

        with torch.inference_mode():
            return self._step(engine, now, clock)

    def _step(self, engine: "Engine", now: float, clock) -> tuple[float, list[tuple[Job, int, bool]], int]:
        # the policy's order, over the jobs the engine tracks (running first unless preemptive)
        order = candidates(engine.running, engine.waiting, engine.policy, now)
        self.sched.order = {j.rid: k for k, j in enumerate(order)}
        before = {j.rid: len(self.sched.get_active_request_static_outputs(j.rid)) for j in engine.running}
        t0 = time.perf_counter()
        if not self.bp.prepare_next_batch():
            return 0.0, [], 0
        in_batch = self.bp.inputs_and_outputs.requests_in_batch
        scheduled = [fs.state.request_id for fs in in_batch]
        n_q = sum(int(fs.query_length) for fs in in_batch)
        self.mgr._generation_step()
        self.bp.update_batch()
        dt = time.perf_counter() - t0
        self._drain()
        events = []
        for rid in scheduled:
            j = self.jobs.get(rid)
            if j is None:
                continue
            out = self.finished.get(rid)
            n_now = len(out.generated_tokens) if out is not None else len(
                self.sched.get_active_request_static_outputs(rid))
            new = n_now - before.get(rid, 0)
            if j.prefill_left > 0:
                st = self.sched.active_requests.get(rid)
                j.prefill_left = len(st.remaining_prefill_tokens) if (st is not None and out is None) else 0
            events.append((j, max(0, new), out is not None))
        return dt, events, n_q

    def stop_reason(self, job: Job) -> str:
        out = self.finished.pop(job.rid, None)
        self.jobs.pop(job.rid, None)
        if out is None:
            return ""
        toks = list(out.generated_tokens)
        job.output_ids = toks
        if toks and toks[-1] in set(self.eos):
            return "stop_string" if toks[-1] not in set(self.lm.eos_ids) else "eos"
        return "max_tokens"

    def close(self) -> None:
        """Free the paged KV cache (transformers sizes it from free GPU memory)."""
        import gc

        import torch

        try:
            self.bp.inputs_and_outputs = None
            self.mgr.batch_processor = None
            if self.mgr._original_attn_impl is not None:
                self.lm.model.set_attn_implementation(self.mgr._original_attn_impl)
        except Exception:  # noqa: BLE001
            pass
        self.bp = self.mgr = self.sched = None
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


class SlotBackend:
    """Our own iteration-level engine on transformers' ``DynamicCache``: one left-padded batch of running rows
    (the state plain batched ``generate`` keeps), that rows join (their prompts prefilled together, their KV
    merged in) and leave (finished, or paused by a preemptive policy: their KV kept aside and merged back on
    resume) at every step. Kept beside :class:`HFBackend` because the engine benchmark
    (``outputs/bench/engine.json``) measured transformers' paged continuous batching far slower at high
    concurrency on our GPU (paged attention through SDPA gathers the whole KV every step: SmolLM2 179 ms a
    step at 256 rows, where plain batched ``generate`` takes 28 ms), while this path runs the decode step
    plain ``generate`` runs. A step = evictions, resumptions, one decode forward for the running rows, one
    prefill forward for the admitted prompts (their first token); a prompt is never split.
    """

    def __init__(self, chat_lm, max_seqs: int, max_batch_tokens: int):
        if chat_lm.is_encoder_decoder:
            raise UserError(f"{chat_lm.name} is an encoder-decoder: the slot engine serves decoder-only models; "
                            "use scheduler.engine=static for it")
        import torch

        self.torch = torch
        self.lm, self.model, self.dev = chat_lm, chat_lm.model, chat_lm.device
        self.max_new = int(chat_lm.spec.get("max_new_tokens", 64))
        self.eos = sorted(set(chat_lm.eos_ids) | stop_string_ids(chat_lm))
        self.eos_t = torch.tensor(self.eos or [-1], device=self.dev)
        self.window = getattr(self.model.config.get_text_config(), "sliding_window", None) or None
        self.pad = chat_lm.tokenizer.pad_token_id or 0
        self.ids: dict[str, list[int]] = {}
        self.rows: list[Job] = []
        self.cache = None
        self.mask = None                      # [B, T] 1 = a real token in the cache
        self.last = None                      # [B] the token each row feeds next
        self.parked: dict[str, tuple] = {}    # paused rows: (per-layer (k, v) of its real tokens, last token)
        self.gen: dict[str, list[int]] = {}
        self.finished_ids: dict[str, list[int]] = {}
        # the LM-state policy's probe (rtlm_lab.scheduler.lmprobe.StateProbe), attached by the harness: it reads
        # the hidden states of the prefill (and, every `refine_every` tokens, of the decoding step) this
        # engine runs anyway; its time is inside the step (on the clock) and summed in `probe_s`
        self.probe = None
        self.probe_s = 0.0
        self._pending: list[tuple] = []       # probe results of this step, read when the step synchronises
        self._n_decode = 0                    # decoding steps run (refinement every `refine_every` of them)

    # -------------------------------------------------------------- cache helpers
    def _new_cache(self):
        from transformers import DynamicCache

        return DynamicCache(config=self.model.config)

    def _layers(self, cache):
        return cache.layers

    def _set(self, cache, kvs, T):
        for layer, (k, v) in zip(self._layers(cache), kvs):
            if not getattr(layer, "is_initialized", True):
                layer.lazy_initialization(k, v)
            layer.keys, layer.values = k, v
            if hasattr(layer, "cumulative_length"):
                layer.cumulative_length = T

    def _kv(self, cache):
        return [(layer.keys, layer.values) for layer in self._layers(cache)]

    def _pad_left(self, x, n, dim):
        if n <= 0:
            return x
        shape = list(x.shape)
        shape[dim] = n
        return self.torch.cat([x.new_zeros(shape), x], dim=dim)

    def _merge(self, kvs, mask, last, rows):
        """Append rows (their KV ``[b, H, t, D]`` per layer, mask ``[b, t]``) to the running batch."""
        torch = self.torch
        if self.cache is None or not self.rows:
            self.cache = self._new_cache()
            T = mask.shape[1]
            self._set(self.cache, kvs, T)
            self.mask, self.last, self.rows = mask, last, list(rows)
            return
        T0, T1 = self.mask.shape[1], mask.shape[1]
        T = max(T0, T1)
        old = self._kv(self.cache)
        merged = [(torch.cat([self._pad_left(k0, T - T0, 2), self._pad_left(k1, T - T1, 2)]),
                   torch.cat([self._pad_left(v0, T - T0, 2), self._pad_left(v1, T - T1, 2)]))
                  for (k0, v0), (k1, v1) in zip(old, kvs)]
        self._set(self.cache, merged, T)
        self.mask = torch.cat([self._pad_left(self.mask, T - T0, 1), self._pad_left(mask, T - T1, 1)])
        self.last = torch.cat([self.last, last])
        self.rows += list(rows)

    def _keep(self, keep: list[int]) -> None:
        """Keep only rows ``keep`` (indices), then drop the leading columns no kept row uses."""
        torch = self.torch
        if not keep:
            self.cache, self.mask, self.last, self.rows = None, None, None, []
            return
        idx = torch.tensor(keep, device=self.dev)
        mask = self.mask.index_select(0, idx)
        used = mask.any(0).nonzero()
        start = int(used[0]) if len(used) else 0
        kvs = [(k.index_select(0, idx)[:, :, start:], v.index_select(0, idx)[:, :, start:])
               for k, v in self._kv(self.cache)]
        self._set(self.cache, kvs, mask.shape[1] - start)
        self.mask = mask[:, start:]
        self.last = self.last.index_select(0, idx)
        self.rows = [self.rows[i] for i in keep]

    # -------------------------------------------------------------- engine interface
    def warmup(self) -> None:
        """Kernels for prefill and decode at a few batch sizes, before the clock (no state left behind)."""
        with self.torch.inference_mode():
            self._warmup()
        self.probe_s = 0.0

    def _warmup(self) -> None:
        ids = self.lm.encode(["Hello there, how are you?"], None, self.max_new)["input_ids"][0].tolist()
        for b in (1, 4):
            jobs = [Job(req=type("R", (), {"request_id": f"__w{b}_{i}"})()) for i in range(b)]
            for j in jobs:
                self.ids[j.rid] = ids
            self._prefill(jobs)
            for _ in range(3):
                self._decode()
            self._keep([])
            for j in jobs:
                self.ids.pop(j.rid, None)
                self.gen.pop(j.rid, None)
        self.lm._sync()

    def encode(self, req) -> list[int]:
        return self.lm.encode([req.text], [req.context], self.max_new)["input_ids"][0].tolist()

    def add(self, job: Job) -> None:
        ids = self.encode(job.req)
        self.ids[job.rid] = ids
        job.prefill_left = len(ids)

    def _prefill(self, jobs: list[Job]):
        torch = self.torch
        seqs = [self.ids[j.rid] for j in jobs]
        L = max(len(x) for x in seqs)
        if self.window and (L >= self.window - 1 or (self.mask is not None and self.mask.shape[1] >= self.window - 1)):
            raise UserError(f"{self.lm.name}: context beyond the sliding window ({self.window}) in the slot engine; "
                            "use platform.engine.backend=paged")
        inp = torch.full((len(seqs), L), self.pad, dtype=torch.long, device=self.dev)
        mask = torch.zeros((len(seqs), L), dtype=torch.long, device=self.dev)
        for i, x in enumerate(seqs):
            inp[i, L - len(x):] = torch.tensor(x, device=self.dev)
            mask[i, L - len(x):] = 1
        pos = (mask.cumsum(-1) - 1).clamp(min=0)
        cache = self._new_cache()
        probe = self.probe is not None and not jobs[0].rid.startswith("__w")
        out = self.model(input_ids=inp, attention_mask=mask, position_ids=pos, past_key_values=cache,
                         use_cache=True, logits_to_keep=1, output_hidden_states=probe)
        nxt = out.logits[:, -1].argmax(-1)
        if probe:
            t0 = time.perf_counter()
            self._pending.append(("prefill", list(jobs),
                                  self.probe.prefill_predictions(out.hidden_states, mask, out.logits[:, -1])))
            self.probe_s += time.perf_counter() - t0
        self._merge(self._kv(cache), mask, nxt, jobs)
        return nxt, jobs

    def _decode(self):
        torch = self.torch
        T = self.mask.shape[1]
        pos = self.mask.sum(-1, keepdim=True)
        self.mask = torch.cat([self.mask, self.mask.new_ones((self.mask.shape[0], 1))], dim=1)
        # LM-state refinement every `refine_every` decoding steps of the engine, for all running rows that
        # have generated at least that many tokens, in one go (the token fed now is a row's t-th: its state is
        # the state after teacher-forcing t reply tokens). Per-row refinement at each row's own multiples of k
        # ran the probe in almost every step: its host-side launches cost 27% of engine time on the H200.
        refine = []
        self._n_decode += 1
        if self.probe is not None and self.probe.refine_every > 0 and self._n_decode % self.probe.refine_every == 0:
            every = self.probe.refine_every
            refine = [i for i, j in enumerate(self.rows) if len(self.gen.get(j.rid, ())) >= every]
        out = self.model(input_ids=self.last[:, None], attention_mask=self.mask, position_ids=pos,
                         past_key_values=self.cache, use_cache=True,
                         cache_position=torch.tensor([T], device=self.dev), output_hidden_states=bool(refine))
        self.last = out.logits[:, -1].argmax(-1)
        if refine:
            t0 = time.perf_counter()
            rows = [self.rows[i] for i in refine]
            toks = [list(self.gen[j.rid]) for j in rows]
            for ks, pred, cap_left, loop in self.probe.refine_predictions(
                    out.hidden_states, refine, self.mask, out.logits[:, -1], toks):
                self._pending.append(("refine", [rows[k] for k in ks], pred, [len(toks[k]) for k in ks],
                                      cap_left, loop))
            self.probe_s += time.perf_counter() - t0
        return self.last

    def step(self, engine: "Engine", now: float, clock) -> tuple[float, list[tuple[Job, int, bool]], int]:
        with self.torch.inference_mode():  # no autograd graph: the cache would otherwise hold every step's
            return self._step(engine, now, clock)

    def _step(self, engine: "Engine", now: float, clock) -> tuple[float, list[tuple[Job, int, bool]], int]:
        torch = self.torch
        order = candidates(engine.running, engine.waiting, engine.policy, now)
        chosen, budget = [], int(engine.max_batch_tokens)
        for j in order:  # whole prompts only; the first admission always fits (a long prompt is not starved)
            if len(chosen) >= engine.max_seqs:
                break
            need = 1 if j.running else len(self.ids[j.rid])
            if need > budget and chosen:
                continue
            chosen.append(j)
            budget -= need
        ids = {id(j) for j in chosen}
        t0 = time.perf_counter()
        # pause running rows the policy did not pick (preemption): park their KV
        drop = [i for i, r in enumerate(self.rows) if id(r) not in ids]
        for i in drop:
            r = self.rows[i]
            n = int(self.mask[i].sum())
            # clone: a slice is a view that would keep the whole running cache of this step alive for as long
            # as the row stays parked (SmolLM2 at 128 rows under lmstate's preemptions: 130 GiB, out of memory)
            self.parked[r.rid] = ([(k[i:i + 1, :, -n:].clone(), v[i:i + 1, :, -n:].clone())
                                   for k, v in self._kv(self.cache)], self.last[i:i + 1].clone())
        if drop:
            self._keep([i for i in range(len(self.rows)) if i not in set(drop)])
        # resume parked rows the policy picked
        back = [j for j in chosen if j.running and j.rid in self.parked]
        if back:  # all resumed rows in one merge (one copy of the running cache, not one per row)
            parts = [self.parked.pop(j.rid) for j in back]
            lens = [p[0][0][0].shape[2] for p in parts]
            L = max(lens)
            kvs = [(torch.cat([self._pad_left(p[0][li][0], L - n, 2) for p, n in zip(parts, lens)]),
                    torch.cat([self._pad_left(p[0][li][1], L - n, 2) for p, n in zip(parts, lens)]))
                   for li in range(len(parts[0][0]))]
            mask = torch.stack([self._pad_left(torch.ones(n, dtype=torch.long, device=self.dev), L - n, 0)
                                for n in lens])
            self._merge(kvs, mask, torch.cat([p[1] for p in parts]), back)
        events: list[tuple[Job, int, bool]] = []
        n_tok = 0
        fin_rows: list[int] = []
        if self.rows:
            toks = self._decode().tolist()
            n_tok += len(toks)
            for i, (j, t) in enumerate(zip(self.rows, toks)):
                g = self.gen.setdefault(j.rid, [])
                g.append(int(t))
                done = int(t) in self.eos or len(g) >= self.max_new
                events.append((j, 1, done))
                if done:
                    fin_rows.append(i)
        new = [j for j in chosen if not j.running and j.rid not in self.gen]
        if new:
            n0 = len(self.rows)
            nxt, _ = self._prefill(new)
            n_tok += sum(len(self.ids[j.rid]) for j in new)
            for k, (j, t) in enumerate(zip(new, nxt.tolist())):
                g = self.gen.setdefault(j.rid, [])
                g.append(int(t))
                j.prefill_left = 0
                done = int(t) in self.eos or len(g) >= self.max_new
                events.append((j, 1, done))
                if done:
                    fin_rows.append(n0 + k)
        if fin_rows:
            self._keep([i for i in range(len(self.rows)) if i not in set(fin_rows)])
        self.lm._sync()
        if self._pending:
            self._resolve_probe()
        return time.perf_counter() - t0, events, n_tok

    def _resolve_probe(self) -> None:
        """Give this step's probe results to their jobs (the step has synchronised: reading a device tensor
        does not stall)."""
        t0 = time.perf_counter()
        for item in self._pending:
            if item[0] == "prefill":
                for j, p in zip(item[1], item[2].tolist()):
                    j.req.pred["pred_lmstate"] = float(p)
                    j.rem_pred, j.rem_at = float(p), 0
            else:
                _, jobs, pred, ts, cap_left, loop = item
                for j, p, t, lp in zip(jobs, pred.tolist(), ts, loop):
                    r = float(cap_left) if lp else float(p)
                    j.rem_pred, j.rem_at = r, t
                    j.refines.append((t, r))
        self._pending.clear()
        self.probe_s += time.perf_counter() - t0

    def stop_reason(self, job: Job) -> str:
        toks = self.gen.pop(job.rid, [])
        self.ids.pop(job.rid, None)
        job.output_ids = toks
        if toks and toks[-1] in set(self.eos):
            return "stop_string" if toks[-1] not in set(self.lm.eos_ids) else "eos"
        return "max_tokens"

    def close(self) -> None:
        import gc

        self.cache = self.mask = self.last = None
        self.parked.clear()
        gc.collect()
        if self.torch.cuda.is_available():
            self.torch.cuda.empty_cache()


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


def stop_string_ids(chat_lm) -> set[int]:
    """Token ids whose text contains one of the LM's one-character stop strings (cached on the LM)."""
    cached = getattr(chat_lm, "_stop_ids", None)
    if cached is not None:
        return cached
    stops = [s for s in (chat_lm.spec.get("stop_strings") or []) if s]
    if any(len(s) != 1 for s in stops):
        raise UserError(f"{chat_lm.name}: the continuous engine supports one-character stop strings only "
                        f"(got {stops}); use scheduler.engine=static")
    ids: set[int] = set()
    if stops:
        tok = chat_lm.tokenizer
        vocab = tok.get_vocab()
        for tid in vocab.values():
            text = tok.decode([tid], skip_special_tokens=True)
            if any(s in text for s in stops):
                ids.add(int(tid))
    chat_lm._stop_ids = ids
    return ids


_SCHED_NAME = "rtlm_policy"


def _register_scheduler() -> None:
    from transformers.generation.continuous_batching import scheduler as S

    logging.getLogger("ContinuousBatchingLogger").setLevel(logging.WARNING)  # its per-manager INFO lines
    if _SCHED_NAME not in S.SCHEDULER_MAPPING:
        S.SCHEDULER_MAPPING[_SCHED_NAME] = PolicyScheduler


def _policy_scheduler_base():
    from transformers.generation.continuous_batching.scheduler import FIFOScheduler

    return FIFOScheduler


class PolicyScheduler(_policy_scheduler_base()):
    """transformers' scheduler with our policy's order: the serving loop sets ``order`` (request id -> rank)
    before each step; budgets, prefill splitting and cache accounting stay transformers' own
    (``_process_candidates``). Requests the loop does not rank (warm-up) keep FIFO order, after ranked ones."""

    order: dict[str, int] | None = None

    def schedule_batch(self, token_budget: int, cache_budget: int):
        states = list(self.active_requests.values())
        if not self.block_new_requests:
            states += [self.waiting_requests[r] for r in self.waiting_requests_order]
        if self.order is not None:
            big = len(self.order) + 1
            pos = {id(s): k for k, s in enumerate(states)}
            states.sort(key=lambda s: (self.order.get(s.request_id, big), pos[id(s)]))
        remove: set[str] = set()
        sched, failed, fast, n_q, kv = self._process_candidates(states, token_budget, cache_budget, remove)
        self._cleanup_waiting_queue(remove)
        if not sched and failed:
            return None, fast, 0, 0
        return sched, fast, n_q, kv


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
            try:
                got = [out.get(timeout=0.001)]
            except queue_mod.Empty:
                got = []
            while True:
                try:
                    got.append(out.get_nowait())
                except queue_mod.Empty:
                    break
            for fin in got:
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
        "probe_s": {e.id: float(getattr(e.backend, "probe_s", 0.0)) for e in engines}, "threaded": bool(threaded)}
