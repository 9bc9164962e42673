"""Fast greedy decoding for decoder-only LMs: static KV cache + CUDA-graph decoding steps.

Plain ``generate`` on a GPU is bound by kernel-launch latency for small models (~20-60 ms a step on an H100
for Gemma-3-270M at batch 1, whatever the batch). :class:`StaticDecoder` removes most of that:

* one :class:`transformers.StaticCache` per batch bucket (1, 2, 4, ... up to ``max_batch``; smaller batches
  are padded with copies of their first row), ``max_len`` positions, allocated once;
* the prompt is prefilled eagerly (left-padded, same prompt text and truncation as :class:`ChatLM`);
* each decoding step (one token per row, argmax inside) is captured once per bucket as a CUDA graph and
  replayed: fixed input buffers (token, position, 4-D attention mask over the ``max_len`` cache slots), the
  cache advances through its on-device length counter;
* stopping is the same as :meth:`ChatLM.generate` (EOS, the LM's stop strings, ``max_new_tokens``), and the
  token count and stop reason of every row come from :meth:`ChatLM._turn_length`, so the records are
  comparable to plain ``generate``'s. ``make bench`` checks that the tokens are identical.

On the CPU (or when capture fails) the same loop runs eagerly (``graphs=False``): slower, same tokens.
Batches whose prompt plus ``max_new_tokens`` exceed ``max_len`` go to plain ``generate``.
"""

from __future__ import annotations

import logging
import time
from typing import Any, Sequence

import torch

from rtlm_lab.lm.generation import ChatLM, Generation

log = logging.getLogger("rtlm_lab.lm")


def _buckets(max_batch: int) -> list[int]:
    out, b = [], 1
    while b < max_batch:
        out.append(b)
        b *= 2
    out.append(max_batch)
    return out


class _Bucket:
    """Cache, buffers and (optionally) the captured decoding step for one padded batch size."""

    def __init__(self, model, batch: int, max_len: int, device: torch.device):
        from transformers import StaticCache

        self.batch, self.max_len = batch, max_len
        self.cache = StaticCache(config=model.config, max_cache_len=max_len)
        self.tok = torch.zeros((batch, 1), dtype=torch.long, device=device)
        self.pos = torch.zeros((batch, 1), dtype=torch.long, device=device)
        self.mask = torch.zeros((batch, 1, 1, max_len), dtype=torch.bool, device=device)
        self.out = torch.zeros((batch,), dtype=torch.long, device=device)
        self.graph: torch.cuda.CUDAGraph | None = None

    def step(self, model) -> None:
        logits = model(input_ids=self.tok, position_ids=self.pos, attention_mask=self.mask,
                       past_key_values=self.cache, use_cache=True).logits
        self.out.copy_(logits[:, -1, :].argmax(dim=-1))


class StaticDecoder:
    """Greedy, end-of-turn decoding with a static cache (and CUDA graphs on CUDA) for a :class:`ChatLM`."""

    def __init__(self, lm: ChatLM, max_batch: int = 16, max_len: int = 512, graphs: bool | None = None):
        if lm.is_encoder_decoder:
            raise ValueError("StaticDecoder serves decoder-only LMs; use ChatLM.generate for encoder-decoders")
        self.lm = lm
        self.model = lm.model
        self.device = lm.device
        window = getattr(self.model.config, "sliding_window", None)
        if window and any(t == "sliding_attention" for t in (getattr(self.model.config, "layer_types", None) or [])):
            max_len = min(max_len, int(window))  # sliding layers never roll over: one mask serves every layer
        self.max_len = int(max_len)
        self.graphs = (self.device.type == "cuda") if graphs is None else bool(graphs)
        self.bucket_sizes = _buckets(int(max_batch))
        self.buckets: dict[int, _Bucket] = {}
        self.n_fallback = 0
        self.capture_errors: list[str] = []

    # ------------------------------------------------------------------------------------------------
    def _sync(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def _bucket(self, batch: int) -> _Bucket:
        size = next((b for b in self.bucket_sizes if b >= batch), None)
        if size is None:
            raise ValueError(f"batch {batch} exceeds max_batch {self.bucket_sizes[-1]}")
        if size not in self.buckets:
            b = _Bucket(self.model, size, self.max_len, self.device)
            self.buckets[size] = b
            if self.graphs:
                self._capture(b)
        return self.buckets[size]

    @torch.inference_mode()
    def _capture(self, b: _Bucket) -> None:
        """Warm up and capture ``b``'s decoding step (the cache is allocated by a dummy prefill first)."""
        try:
            ids = torch.full((b.batch, 4), int(self.lm.tokenizer.pad_token_id or 0), dtype=torch.long,
                             device=self.device)
            self.model(input_ids=ids, attention_mask=torch.ones_like(ids), past_key_values=b.cache, use_cache=True)
            b.pos.fill_(4)
            b.mask[..., :5] = True
            s = torch.cuda.Stream(self.device)
            s.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(s):
                for _ in range(2):
                    b.step(self.model)
            torch.cuda.current_stream(self.device).wait_stream(s)
            g = torch.cuda.CUDAGraph()
            with torch.cuda.graph(g):
                b.step(self.model)
            b.graph = g
            log.info("captured the decoding step at batch %d (max_len %d)", b.batch, b.max_len)
        except Exception as exc:  # noqa: BLE001 - eager fallback, reported by the bench
            self.capture_errors.append(f"batch {b.batch}: {type(exc).__name__}: {exc}".splitlines()[0])
            log.warning("CUDA-graph capture failed at batch %d (%s); decoding eagerly", b.batch,
                        self.capture_errors[-1])
            b.graph = None
        finally:
            b.cache.reset()
            self._reset_int_lengths(b)

    @staticmethod
    def _reset_int_lengths(b: _Bucket) -> None:
        for layer in getattr(b.cache, "layers", []):
            if hasattr(layer, "cumulative_length_int"):
                layer.cumulative_length_int = 0

    # ------------------------------------------------------------------------------------------------
    @torch.inference_mode()
    def generate(self, texts: Sequence[Any], contexts: Sequence[Any] | None = None,
                 max_new_tokens: int | None = None) -> list[Generation]:
        """Same contract as :meth:`ChatLM.generate` (one :class:`Generation` per text)."""
        lm = self.lm
        max_new = int(max_new_tokens or lm.spec.get("max_new_tokens", 64))
        n = len(texts)
        if n == 0:
            return []
        enc = lm.encode(texts, contexts, max_new)
        T = enc["input_ids"].shape[1]
        if T + max_new > self.max_len or n > self.bucket_sizes[-1]:
            self.n_fallback += 1
            return lm.generate(texts, contexts, max_new_tokens=max_new)
        b = self._bucket(n)
        B = b.batch
        ids = enc["input_ids"].to(self.device)
        am = enc["attention_mask"].to(self.device)
        if B > n:  # pad the batch with copies of row 0
            ids = torch.cat([ids, ids[:1].expand(B - n, -1)], 0)
            am = torch.cat([am, am[:1].expand(B - n, -1)], 0)
        b.cache.reset()
        self._reset_int_lengths(b)
        pos = (am.long().cumsum(-1) - 1).clamp(min=0)
        stops = [s for s in (lm.spec.get("stop_strings", []) or []) if s]
        eos = set(lm.eos_ids)
        tok = lm.tokenizer
        self._sync()
        t0 = time.perf_counter()
        logits = self.model(input_ids=ids, attention_mask=am, position_ids=pos, past_key_values=b.cache,
                            use_cache=True).logits
        nxt = logits[:, -1, :].argmax(dim=-1)
        out_ids: list[list[int]] = [[] for _ in range(n)]
        t_done: list[float | None] = [None] * n
        b.mask.zero_()
        b.mask[:, 0, 0, :T] = am.bool()
        last_pos = pos[:, -1:].clone()
        t_first = None
        for step in range(max_new):
            host = nxt.tolist()  # the one host sync a step
            now = time.perf_counter()
            if t_first is None:
                t_first = now
            for i in range(n):
                if t_done[i] is not None:
                    continue
                out_ids[i].append(host[i])
                if host[i] in eos:
                    t_done[i] = now
                elif stops and any(s in tok.decode(out_ids[i][-8:], skip_special_tokens=True) for s in stops):
                    t_done[i] = now
            if all(t is not None for t in t_done) or step == max_new - 1:
                break
            # feed the new tokens: they sit at cache slot T + step
            b.tok.copy_(nxt.view(B, 1))
            last_pos += 1
            b.pos.copy_(last_pos)
            b.mask[:, 0, 0, T + step] = True
            if b.graph is not None:
                b.graph.replay()
            else:
                b.step(self.model)
            nxt = b.out
        self._sync()
        t_end = time.perf_counter()
        n_in = enc["attention_mask"].sum(dim=1).tolist()
        results = []
        for i in range(n):
            ids_i = out_ids[i]
            k, reason = lm._turn_length(ids_i, stops)
            reply_ids = ids_i[:k]
            text = tok.decode(reply_ids, skip_special_tokens=True)
            for s in stops:
                if s in text:
                    text = text[: text.index(s)]
            done = t_done[i] if (t_done[i] is not None and reason != "max_tokens") else t_end
            results.append(Generation(text=text.strip(), n_input_tokens=int(n_in[i]), n_output_tokens=k,
                                      stop_reason=reason, ttft_s=(t_first or t_end) - t0,
                                      e2e_s=max(done, t_first or done) - t0, batch_size=n, output_ids=reply_ids))
        return results


def make_decoder(lm: ChatLM, fast: bool, max_batch: int, max_len: int = 512):
    """``lm.generate``, or a :class:`StaticDecoder`'s when ``fast`` and the LM is decoder-only."""
    if not fast or lm.is_encoder_decoder:
        return lm.generate
    try:
        return StaticDecoder(lm, max_batch=max_batch, max_len=max_len).generate
    except Exception as exc:  # noqa: BLE001
        log.warning("static-cache decoding unavailable for %s (%s); using plain generate", lm.name, exc)
        return lm.generate
