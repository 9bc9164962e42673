"""The previous engine (``platform.engine.backend=slots``): one left-padded ``DynamicCache``, kept for comparison in
the engine benchmark. Superseded by :mod:`rtlm_lab.scheduler.engine.kv`."""

from __future__ import annotations

from typing import TYPE_CHECKING

import time

from rtlm_lab.errors import UserError
from rtlm_lab.scheduler.engine.jobs import Job
from rtlm_lab.scheduler.engine.planner import candidates
from rtlm_lab.scheduler.engine.stops import stop_string_ids

if TYPE_CHECKING:
    from rtlm_lab.scheduler.engine.loop import Engine


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
        # would run the probe in almost every step, and its host-side launches cost engine time.
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
        """This step's probe results to their jobs (the step has synchronised)."""
        from rtlm_lab.scheduler.lmprobe import resolve_pending

        t0 = time.perf_counter()
        resolve_pending(self._pending)
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

