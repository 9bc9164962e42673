"""transformers' own continuous batching (paged attention) as an engine backend, ordered by our policy."""

from __future__ import annotations

from typing import TYPE_CHECKING

import logging
import queue as queue_mod
import time
from typing import Any

from rtlm_lab.errors import UserError
from rtlm_lab.scheduler.engine.jobs import Job
from rtlm_lab.scheduler.engine.planner import candidates
from rtlm_lab.scheduler.engine.stops import stop_string_ids

if TYPE_CHECKING:
    from rtlm_lab.scheduler.engine.loop import Engine

_SCHED_NAME = "rtlm_policy"


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


