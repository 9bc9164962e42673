"""The serving core: a per-slot KV cache, mixed prefill+decode steps, CUDA-graph decode (``backend=kv``).

Built the way vLLM V1's model runner, SGLang and gpt-fast build theirs (DESIGN.md 1c), on the served LM's own
transformers modules (no second copy of the model code):

* **Per-slot KV.** Per layer, K and V are preallocated as ``[slots, kv_heads, max_len + 1, head_dim]`` (the last
  position is a scratch column that idle rows of a padded batch write to). A request holds one slot from its
  first prefill chunk to its finish; its row decodes at its own position (rotary/learned positions from
  ``position_ids``, masks from lengths: no left padding). A join writes only its own slot, a leave frees the
  slot, a pause leaves the KV where it is. When a request needs a slot and none is free, the planner evicts a
  paused request (its KV is dropped and recomputed on resume, as vLLM's recompute preemption): the rule is the
  engine's (:class:`~rtlm_lab.scheduler.engine.planner.SlotTable`), the same for every policy and the simulator.
  Before each step the table moves the decoding rows into the lowest slots (:meth:`SlotTable.compact
  <rtlm_lab.scheduler.engine.planner.SlotTable.compact>`: two rows' KV swapped, :meth:`KVBackend._swap`), so a
  row paused in a low slot does not make the steps after it compute idle rows.
* **Mixed steps.** One forward per step over a flat token layout: the decoding rows (slots ``0..B-1``, ``B`` a
  power-of-two bucket) then the prompt chunks the planner admitted under ``max_batch_tokens`` (chunked prefill).
  The layer stack runs on all tokens at once; attention is ours (:func:`slot_attention`, registered with
  transformers' ``AttentionInterface`` and switched on only inside this engine's forward): it writes each
  token's K/V into its slot and attends each row over its own slot.
* **CUDA graphs.** On cuda a step with no prompt chunk (pure decode) replays a graph captured per
  ``(batch bucket, KV-length bucket)`` in the warm-up; argmax and the stop test run on the device and one
  device-to-host copy per step brings back the tokens and the finished flags. The CPU runs the same code eagerly.
* **The LM-state probe** (:meth:`KVBackend.attach_probe`): forward hooks on the probe's layers copy the
  states it reads out of the same forward (inside the captured graph on cuda), never ``output_hidden_states``
  of every layer: the last token's state of each decoding row, and per slot the running sum and the last
  state of its prompt (chunked prefill adds chunk by chunk). A prompt's prediction is made the step its last
  chunk runs; refinement every ``refine_every`` decoding steps for the rows that have generated that many.
* **Sampled decoding** (the LM's ``sampling``): each row draws its token with its request's seed at its own step
  (:mod:`rtlm_lab.lm.sampling`), on the device and inside the graphs: the same sample in any batch.
* **Pinned lengths** (``pin_lengths``): each request decodes exactly ``true_tokens`` tokens, end-of-turn
  ignored (vLLM's serving-benchmark convention), so no policy changes the work it serves.

Greedy tokens equal batch-1 ``generate`` on the CPU in fp32 (tests/test_kvengine.py), through joins, leaves,
pauses, evictions and a sliding-window model (Gemma-3).
"""

from __future__ import annotations

import math
import time
from typing import TYPE_CHECKING, Any

from rtlm_lab.errors import UserError
from rtlm_lab.scheduler.engine.jobs import Job
from rtlm_lab.scheduler.engine.planner import SlotTable, plan_engine_step
from rtlm_lab.scheduler.engine.stops import stop_string_ids

if TYPE_CHECKING:
    from rtlm_lab.scheduler.engine.loop import Engine

ATTN_NAME = "rtlm_slots"


def _register_attention() -> None:
    from transformers import AttentionInterface

    if ATTN_NAME not in AttentionInterface._global_mapping:
        AttentionInterface.register(ATTN_NAME, slot_attention)


def _pow2(n: int, lo: int = 1) -> int:
    return max(lo, 1 << max(0, math.ceil(math.log2(max(1, n)))))


class _Step:
    """What the attention of one forward needs (set by the runner, read by :func:`slot_attention`)."""

    __slots__ = ("B", "Lb", "mask_full", "mask_slide", "w_slot", "w_pos", "chunks", "fresh")

    def __init__(self, B, Lb, mask_full, mask_slide, w_slot, w_pos, chunks, fresh=None):
        self.B, self.Lb = B, Lb
        self.mask_full, self.mask_slide = mask_full, mask_slide   # [B, Lb] bool (decoding rows)
        self.w_slot, self.w_pos = w_slot, w_pos                   # [N] where each token's K/V goes
        self.chunks = chunks                                      # [(slot, start, length, offset in the flat tokens)]
        self.fresh = fresh                                        # chunks that start a prompt, batched (see _fresh)


class _ProbeStep:
    """What the probe's hooks copy in one forward: the ``B`` decoding rows' states, the prompt tokens ``acc``
    (flat indices) added to their slots' sums, and the prompts' last tokens ``last`` stored per slot."""

    __slots__ = ("B", "acc", "acc_slot", "last", "last_slot")

    def __init__(self, B, acc=None, acc_slot=None, last=None, last_slot=None):
        self.B, self.acc, self.acc_slot, self.last, self.last_slot = B, acc, acc_slot, last, last_slot


def slot_attention(module, query, key, value, attention_mask=None, scaling=None, dropout=0.0,
                   sliding_window=None, softcap=None, **kwargs):
    """Attention over per-slot KV for a flat token layout (see the module doc).

    ``query`` ``[1, H, N, D]``, ``key``/``value`` ``[1, Hkv, N, D]`` (this step's tokens, positions applied).
    Returns ``([1, N, H, D], None)`` as transformers' attention functions do."""
    import torch
    import torch.nn.functional as F

    kv, layer = module._rtlm_kv
    st: _Step = kv.step
    K, V = kv.k[layer], kv.v[layer]
    # write this step's keys/values into their slots (a join writes only its own row)
    K[st.w_slot, :, st.w_pos] = key[0].transpose(0, 1).to(K.dtype)
    V[st.w_slot, :, st.w_pos] = value[0].transpose(0, 1).to(V.dtype)
    H, N, D = query.shape[1], query.shape[2], query.shape[3]
    Hkv = K.shape[1]
    G = H // Hkv
    scale = scaling if scaling is not None else D ** -0.5
    out = query.new_empty((N, H, D))
    B = st.B
    if B:
        mask = st.mask_slide if sliding_window else st.mask_full
        # grouped-query attention without repeating K/V: [B, Hkv, G, D] x [B, Hkv, D, Lb]
        q = query[0, :, :B].transpose(0, 1).reshape(B, Hkv, G, D)
        k = K[:B, :, :st.Lb]
        s = torch.matmul(q, k.transpose(-1, -2)).float() * scale
        if softcap:
            s = torch.tanh(s / softcap) * softcap
        s = s.masked_fill(~mask[:, None, None, :], float("-inf"))
        p = torch.softmax(s, dim=-1).to(V.dtype)
        out[:B] = torch.matmul(p, V[:B, :, :st.Lb]).reshape(B, H, D).to(out.dtype)
    if softcap and (st.chunks or st.fresh):  # SDPA has no soft-capping (no LM of ours uses it)
        raise UserError("soft-capped attention in a prompt chunk is not supported by the kv engine")
    if st.fresh is not None:
        # chunks that start a prompt attend only to themselves: one batched call over [n chunks, longest chunk]
        # with this step's own keys (a loop of one call per chunk and layer made a 256-prompt step take seconds)
        idx, valid, attn = st.fresh[0], st.fresh[1], (st.fresh[3] if sliding_window else st.fresh[2])
        q = query[0][:, idx].transpose(0, 1)              # [n, H, c, D]
        k = key[0][:, idx].transpose(0, 1).to(query.dtype)
        v = value[0][:, idx].transpose(0, 1).to(query.dtype)
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=attn[:, None], scale=scale, enable_gqa=G > 1)
        out[idx[valid]] = o.transpose(1, 2)[valid]
    for slot, start, c, off in st.chunks:
        q = query[:, :, off:off + c]
        k, v = K[slot:slot + 1, :, :start + c], V[slot:slot + 1, :, :start + c]
        windowed = bool(sliding_window) and start + c > sliding_window
        if start == 0 and not windowed and not softcap:
            o = F.scaled_dot_product_attention(q, k.to(q.dtype), v.to(q.dtype), is_causal=True, scale=scale,
                                               enable_gqa=G > 1)
        else:
            i = torch.arange(start, start + c, device=q.device)[:, None]
            j = torch.arange(start + c, device=q.device)[None, :]
            m = j <= i
            if sliding_window:
                m &= j > i - sliding_window
            o = F.scaled_dot_product_attention(q, k.to(q.dtype), v.to(q.dtype), attn_mask=m, scale=scale,
                                               enable_gqa=G > 1)
        out[off:off + c] = o[0].transpose(0, 1)
    return out[None], None


class SlotKV:
    """The preallocated per-layer K/V of every slot, and the step context the attention reads."""

    def __init__(self, model, n_slots: int, max_len: int, dtype, device):
        import torch

        cfg = model.config.get_text_config()
        attn = [m for m in model.modules() if hasattr(m, "layer_idx") and
                any(hasattr(m, a) for a in ("k_proj", "c_attn", "qkv_proj"))]
        if not attn:
            raise UserError(f"{type(model).__name__}: no attention modules with a layer_idx for the kv engine")
        hkv = int(getattr(cfg, "num_key_value_heads", None) or getattr(cfg, "num_attention_heads", None)
                  or cfg.n_head)
        n_heads = int(getattr(cfg, "num_attention_heads", None) or cfg.n_head)
        hd = int(getattr(cfg, "head_dim", None) or cfg.hidden_size // n_heads)
        self.n_slots, self.max_len = int(n_slots), int(max_len)
        shape = (self.n_slots, hkv, self.max_len + 1, hd)  # + 1: the scratch column idle rows write to
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in attn]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in attn]
        for i, m in enumerate(sorted(attn, key=lambda m: m.layer_idx)):
            m._rtlm_kv = (self, i)
        self.step: _Step | None = None
        self.window = getattr(cfg, "sliding_window", None) if "sliding_attention" in (
            getattr(cfg, "layer_types", None) or ()) else None

    def bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.k + self.v)


class KVBackend:
    """The per-slot engine (see the module doc). Budgets: ``max_seqs`` rows and ``max_batch_tokens`` tokens a
    step, ``kv_slots`` slots of ``max_len`` tokens (the KV budget; default ``2 x max_seqs`` slots of the LM's
    prompt budget plus ``max_new_tokens``); all from the platform config."""

    name = "kv"

    def __init__(self, chat_lm, max_seqs: int, max_batch_tokens: int, kv_slots: int | None = None,
                 max_len: int | None = None, pin_lengths: bool = False, cuda_graphs: bool | None = None):
        import torch

        if chat_lm.is_encoder_decoder:
            raise UserError(f"{chat_lm.name} is an encoder-decoder: the kv engine serves decoder-only models; "
                            "use scheduler.engine=static for it")
        _register_attention()
        self.torch = torch
        self.lm, self.model, self.dev = chat_lm, chat_lm.model, chat_lm.device
        self.max_seqs, self.max_batch_tokens = int(max_seqs), int(max_batch_tokens)
        self.max_new = int(chat_lm.spec.get("max_new_tokens", 64))
        cfg = self.model.config.get_text_config()
        n_pos = getattr(cfg, "max_position_embeddings", None) or getattr(cfg, "n_positions", None) or 1 << 20
        want = int(max_len or (chat_lm.max_input_tokens(self.max_new) + self.max_new))
        self.L = int(min(want, n_pos))
        self.S = int(kv_slots or 2 * self.max_seqs)  # default: room to pause as many rows as run
        if self.S < self.max_seqs:
            raise UserError(f"platform.engine.kv_slots ({self.S}) must be >= max_seqs ({self.max_seqs})")
        self.pin = bool(pin_lengths)
        from rtlm_lab.lm.sampling import sampling_params

        self.temperature, self.top_p, self.seed_base = sampling_params(chat_lm.spec)
        self.graphs = bool(cuda_graphs if cuda_graphs is not None else self.dev.type == "cuda")
        if self.graphs and self.dev.type != "cuda":
            self.graphs = False
        dtype = next(self.model.parameters()).dtype
        self.kv = SlotKV(self.model, self.S, self.L, dtype, self.dev)
        self.slots = SlotTable(self.S)
        self.eos = sorted(set(chat_lm.eos_ids) | stop_string_ids(chat_lm))
        vocab = int(self.model.get_output_embeddings().weight.shape[0])
        self.is_stop = torch.zeros(max(vocab, max(self.eos or [0]) + 1), dtype=torch.bool, device=self.dev)
        if self.eos:
            self.is_stop[torch.tensor(self.eos, device=self.dev)] = True
        # per-slot state on the device (read by the captured graphs: these tensors never move)
        z = dict(dtype=torch.long, device=self.dev)
        self.last = torch.zeros(self.S, **z)       # the token each slot feeds next
        self.pos = torch.zeros(self.S, **z)        # its position (= tokens in its KV)
        self.count = torch.zeros(self.S, **z)      # tokens it generated
        self.limit = torch.full((self.S,), 1, **z)  # tokens it may generate
        self.active = torch.zeros(self.S, dtype=torch.bool, device=self.dev)  # decodes in this step
        self.seed = torch.zeros(self.S, **z)       # its request's sampling seed (sampled decoding)
        self.ar = torch.arange(self.L + 1, device=self.dev)
        self.slot_ids = torch.arange(self.S, device=self.dev)
        self._act_host = torch.zeros(self.S, dtype=torch.bool, pin_memory=self.dev.type == "cuda")
        self.ids: dict[str, list[int]] = {}          # prompt token ids
        self.gen: dict[str, list[int]] = {}          # generated token ids
        self.done_prefill: dict[str, int] = {}       # tokens of the current (re)prefill already in the KV
        self.graphs_: dict[tuple[int, int], tuple[Any, Any]] = {}
        self.pool = None
        self.n_graph_steps = self.n_eager_steps = 0
        self.probe = None
        self.probe_s = 0.0
        self._pstep: _ProbeStep | None = None
        self._hooks: list = []
        self._pending: list[tuple] = []
        self._n_dec = 0
        self.cfgs = {id(m.config): m.config for m in self.model.modules() if hasattr(m, "config")}

    # ------------------------------------------------------------------ the LM-state probe
    def _probe_modules(self, layers) -> dict[int, Any]:
        """Hidden-state index -> the module whose output it is (as ``output_hidden_states`` counts: ``i`` is
        block ``i - 1``'s output, the last one the base model's normed ``last_hidden_state``)."""
        import torch

        cfg = self.model.config.get_text_config()
        n = int(cfg.num_hidden_layers)
        base = self.model.base_model
        blocks = next((m for m in base.modules() if isinstance(m, torch.nn.ModuleList) and len(m) == n), None)
        out = {}
        for l in layers:
            if l == n:
                out[l] = base
            elif 1 <= l < n and blocks is not None:
                out[l] = blocks[l - 1]
            else:
                raise UserError(f"the kv engine's LM-state probe cannot read hidden state {l} of {self.lm.name}")
        return out

    def attach_probe(self, probe) -> None:
        """Serve with the LM-state policy's :class:`~rtlm_lab.scheduler.lmprobe.StateProbe`: hooks on its layers
        fill per-slot state buffers inside this engine's forward (before the graphs are captured: a graph
        captured earlier would not carry the hooks, so those are dropped)."""
        torch = self.torch
        for h in self._hooks:
            h.remove()
        self._hooks.clear()
        self.graphs_.clear()
        self.probe = probe
        if probe is None:
            return
        d = int(self.model.config.get_text_config().hidden_size)
        f = dict(dtype=torch.float32, device=self.dev)
        self.h_dec = {l: torch.zeros((self.S, d), **f) for l in probe.layers}   # decoding rows' last states
        self.p_sum = {l: torch.zeros((self.S, d), **f) for l in probe.layers}   # prompt sums per slot
        self.p_last = {l: torch.zeros((self.S, d), **f) for l in probe.layers}  # prompt last states per slot
        self.p_ent = torch.zeros(self.S, **f)
        self.p_eos = torch.zeros(self.S, **f)
        for l, m in self._probe_modules(probe.layers).items():
            self._hooks.append(m.register_forward_hook(lambda mod, a, o, l=l: self._probe_hook(l, o)))

    def _probe_hook(self, l: int, out) -> None:
        ps = self._pstep
        if ps is None:  # another forward of the same model (not this engine's)
            return
        h = out.last_hidden_state if hasattr(out, "last_hidden_state") else (
            out[0] if isinstance(out, (tuple, list)) else out)
        h = h[0]
        if ps.B:
            self.h_dec[l][:ps.B].copy_(h[:ps.B])
        if ps.acc is not None:
            self.p_sum[l].index_add_(0, ps.acc_slot, h.index_select(0, ps.acc).float())
        if ps.last is not None:
            self.p_last[l][ps.last_slot] = h.index_select(0, ps.last).float()

    def _refine_due(self) -> bool:
        """Whether this step's decoding rows are refined after its forward (:meth:`_refine` counts it): only then
        are their entropy and end-of-turn probability needed. Eager steps (the CPU) skip the two reductions over
        the vocabulary otherwise: every step, they had cost a 4-row DialoGPT-ccc step on the 2-core CPU 0.68 ms
        of its ~11 (50,257 tokens a row). A captured graph computes them always."""
        every = self.probe.refine_every if self.probe is not None else 0
        return every > 0 and (self._n_dec + 1) % every == 0

    def _refine(self, decode) -> None:
        """Every ``refine_every`` decoding steps: the refinement of the rows that have generated at least that
        many tokens, from the states this step's forward left in ``h_dec`` (the token fed now is a row's t-th)."""
        due = self._refine_due()
        self._n_dec += 1
        if not due:
            return
        every = self.probe.refine_every
        rows = [j for j in decode if len(self.gen[j.rid]) >= every]
        if not rows:
            return
        torch = self.torch
        t0 = time.perf_counter()
        ix = torch.tensor([j.slot for j in rows], device=self.dev)
        toks = [list(self.gen[j.rid]) for j in rows]
        n_tok = torch.tensor([len(self.ids[j.rid]) + len(t) for j, t in zip(rows, toks)]).to(self.dev)
        last = {l: v.index_select(0, ix) for l, v in self.h_dec.items()}
        for ks, pred, cap_left, loop in self.probe.refine_from_features(
                last, self.p_ent.index_select(0, ix), self.p_eos.index_select(0, ix), n_tok, toks):
            self._pending.append(("refine", [rows[k] for k in ks], pred, [len(toks[k]) for k in ks], cap_left, loop))
        self.probe_s += time.perf_counter() - t0

    def _resolve_probe(self) -> None:
        """This step's probe results to their jobs (the step has synchronised)."""
        from rtlm_lab.scheduler.lmprobe import resolve_pending

        t0 = time.perf_counter()
        resolve_pending(self._pending)
        self.probe_s += time.perf_counter() - t0

    # ------------------------------------------------------------------ forward
    def _attn(self, on: bool) -> None:
        for c in self.cfgs.values():
            if on:
                c._rtlm_prev_attn = c._attn_implementation_internal
                c._attn_implementation_internal = ATTN_NAME
            else:
                c._attn_implementation_internal = c._rtlm_prev_attn

    def _masks(self, B: int, Lb: int):
        torch = self.torch
        act, pos = self.active[:B, None], self.pos[:B, None]
        j = self.ar[None, :Lb]
        # a real row sees its own positions 0..pos (pos: the one written now); an idle row sees position 0 only
        full = ((j <= pos) & act) | ((j == 0) & ~act)
        slide = full
        if self.kv.window:
            slide = full & ((j > pos - self.kv.window) | ~act)
        return full, slide

    def _fresh(self, chunks, window):
        """The chunks that start a prompt (``start == 0``), as gather indices ``[n, c]`` into the flat tokens,
        their validity and causal masks (full and sliding); ``None`` when there are none."""
        torch = self.torch
        fresh = [(c, off) for _, start, c, off in chunks if start == 0]
        if not fresh:
            return None
        cmax = max(c for c, _ in fresh)
        ar = torch.arange(cmax)
        lens = torch.tensor([c for c, _ in fresh])
        offs = torch.tensor([off for _, off in fresh])
        valid = ar[None, :] < lens[:, None]
        idx = torch.where(valid, offs[:, None] + ar[None, :], offs[:, None])
        i, j = ar[:, None], ar[None, :]
        full = (j <= i)[None] & valid[:, None, :]
        slide = full & (j > i - window)[None] if window else full
        dev = self.dev
        return (idx.to(dev, non_blocking=True), valid.to(dev, non_blocking=True), full.to(dev, non_blocking=True),
                slide.to(dev, non_blocking=True))

    def _forward(self, B: int, Lb: int, chunk_ids, chunk_pos, chunk_slot, chunks, keep):
        """One forward over ``B`` decoding rows then the prompt chunks; returns the logits of ``keep``."""
        torch = self.torch
        act = self.active[:B]
        ids = self.last[:B]
        rope = torch.where(act, self.pos[:B], 0)
        w_slot = self.slot_ids[:B]
        w_pos = torch.where(act, self.pos[:B], self.L)
        if chunk_ids is not None:
            ids = torch.cat([ids, chunk_ids])
            rope = torch.cat([rope, chunk_pos])
            w_slot = torch.cat([w_slot, chunk_slot])
            w_pos = torch.cat([w_pos, chunk_pos])
        full, slide = self._masks(B, Lb) if B else (None, None)
        fresh = self._fresh(chunks, self.kv.window) if chunks else None
        rest = [ch for ch in chunks if ch[1] > 0]
        self.kv.step = _Step(B, Lb, full, slide, w_slot, w_pos, rest, fresh)
        self._attn(True)
        try:
            # embeddings given, not ids: GPT-2 otherwise looks for padding in the ids (a host sync every step)
            emb = self.model.get_input_embeddings()(ids[None])
            out = self.model(inputs_embeds=emb, position_ids=rope[None], use_cache=False,
                             logits_to_keep=keep if keep is not None else 0)
        finally:
            self._attn(False)
            self.kv.step = None
        return out.logits[0]

    def _decode_body(self, B: int, Lb: int, out):
        """Pure decode of slots ``0..B-1``: forward, argmax and stop test on the device, state updated in place
        (captured as one graph on cuda)."""
        torch = self.torch
        if self.probe is not None:
            self._pstep = _ProbeStep(B)
        try:
            logits = self._forward(B, Lb, None, None, None, (), None)
        finally:
            self._pstep = None
        if self.probe is not None and (self.graphs or self._refine_due()):
            ent, eos = self.probe.scalars(logits)
            self.p_ent[:B], self.p_eos[:B] = ent, eos
        nxt = self._pick(logits, self.seed[:B], self.count[:B])
        act = self.active[:B]
        self.last[:B] = torch.where(act, nxt, self.last[:B])
        self.pos[:B] += act
        self.count[:B] += act
        stop = self.count[:B] >= self.limit[:B]
        if not self.pin:
            stop |= self.is_stop[nxt]
        out[0, :B] = nxt
        out[1, :B] = (stop & act).long()

    def _pick(self, logits, seed, step):
        """The next token of each row: argmax, or the seeded sample (:func:`rtlm_lab.lm.sampling.sample`)."""
        if self.temperature <= 0:
            return logits.argmax(-1)
        from rtlm_lab.lm.sampling import sample

        return sample(logits, seed, step, self.temperature, self.top_p)

    def _len_bucket(self, n: int) -> int:
        return min(self.L + 1, _pow2(n, 64))

    def _graph(self, B: int, Lb: int):
        torch = self.torch
        key = (B, Lb)
        if key not in self.graphs_:
            out = torch.zeros((2, B), dtype=torch.long, device=self.dev)
            s = torch.cuda.Stream(self.dev)
            s.wait_stream(torch.cuda.current_stream(self.dev))
            saved = [t.clone() for t in (self.last, self.pos, self.count)]
            with torch.cuda.stream(s):  # warm the kernels once outside the graph
                self._decode_body(B, Lb, out)
            torch.cuda.current_stream(self.dev).wait_stream(s)
            g = torch.cuda.CUDAGraph()
            if self.pool is None:
                self.pool = torch.cuda.graph_pool_handle()
            with torch.cuda.graph(g, pool=self.pool):
                self._decode_body(B, Lb, out)
            for t, v in zip((self.last, self.pos, self.count), saved):
                t.copy_(v)
            self.graphs_[key] = (g, out)
        return self.graphs_[key]

    # ------------------------------------------------------------------ engine interface
    def warmup(self) -> None:
        """Every CUDA graph (batch bucket x KV-length bucket) captured, and eager prefill kernels run, before
        the clock; no state is left behind."""
        torch = self.torch
        with torch.inference_mode():
            if self.graphs:
                b = 1
                buckets = []
                while True:
                    buckets.append(min(b, self.S))
                    if b >= self.S:
                        break
                    b *= 2
                lens, n = [], 64
                while True:
                    lens.append(self._len_bucket(n))
                    if lens[-1] >= self.L + 1:
                        break
                    n *= 2
                for B in buckets:
                    for Lb in lens:
                        self._graph(B, Lb)
            # one eager mixed step (a chunk beside a decoding row), then reset
            ids = torch.tensor([1, 2, 3], device=self.dev)
            self.active.zero_()
            self.active[0] = True
            self._forward(1, self._len_bucket(4), ids, torch.arange(3, device=self.dev),
                          torch.full((3,), 1, dtype=torch.long, device=self.dev), [(1, 0, 3, 1)],
                          torch.tensor([0, 3], device=self.dev))
            self.active.zero_()
            self.last.zero_(), self.pos.zero_(), self.count.zero_()
            self.lm._sync()

    def encode(self, req) -> list[int]:
        return self.lm.encode([req.text], [req.context], self.max_new)["input_ids"][0].tolist()

    def add(self, job: Job) -> None:
        ids = self.encode(job.req)
        room = self.L - len(ids)
        if room < 1:
            raise UserError(f"{job.rid}: prompt of {len(ids)} tokens leaves no room in max_len={self.L}")
        self.ids[job.rid] = ids
        self.gen[job.rid] = []
        job.prefill_left = job.n_prompt = len(ids)
        want = max(1, int(job.req.true_tokens)) if self.pin else self.max_new
        job.limit = int(min(want, room))

    def step(self, engine: "Engine", now: float, clock) -> tuple[float, list[tuple[Job, int, bool]], int]:
        with self.torch.inference_mode():
            return self._step(engine, now, clock)

    def _step(self, engine: "Engine", now: float, clock) -> tuple[float, list[tuple[Job, int, bool]], int]:
        torch = self.torch
        t0 = time.perf_counter()
        plan, evicted = plan_engine_step(engine, now, self.slots)
        if not plan:
            return 0.0, [], 0
        for j in evicted:  # recompute later: the prompt and what it generated so far become its prefill
            self.done_prefill.pop(j.rid, None)
        decode = [j for j, _ in plan if j.prefill_left <= 0]
        for a, b in self.slots.compact(decode):  # decoding rows into the lowest slots: B counts only them
            self._swap(a, b)
        pre = [(j, t) for j, t in plan if j.prefill_left > 0]
        act = self._act_host
        act.zero_()
        for j in decode:
            act[j.slot] = True
        B = _pow2(max(j.slot for j in decode) + 1) if decode else 0
        B = min(B, self.S)
        maxpos = max((len(self.ids[j.rid]) + len(self.gen[j.rid]) for j in decode), default=1)
        Lb = self._len_bucket(maxpos + 1)
        n_tok = len(decode) + sum(t for _, t in pre)
        self.active.copy_(act, non_blocking=True)
        if not pre:
            if self.graphs:
                g, out = self._graph(B, Lb)
                g.replay()
                self.n_graph_steps += 1
            else:
                out = torch.zeros((2, B), dtype=torch.long, device=self.dev)
                self._decode_body(B, Lb, out)
                self.n_eager_steps += 1
            res = out.cpu()  # the step's one device-to-host copy
            nxt, fin = res[0].tolist(), res[1].tolist()
            d_tok = {j.rid: (nxt[j.slot], bool(fin[j.slot])) for j in decode}
            c_tok = {}
        else:
            d_tok, c_tok = self._mixed(B, Lb, decode, pre)
            self.n_eager_steps += 1
        if self.probe is not None and decode:
            self._refine(decode)
        events: list[tuple[Job, int, bool]] = []
        for j in decode:
            t, done = d_tok[j.rid]
            self.gen[j.rid].append(int(t))
            events.append((j, 1, done))
        for j, t in pre:
            j.prefill_left -= t
            if j.prefill_left <= 0:
                tok, done = c_tok[j.rid]
                self.gen[j.rid].append(int(tok))
                events.append((j, 1, done))
            else:
                events.append((j, 0, False))
        for j, _, done in events:
            if done:
                self.slots.release(j)
        if self._pending:
            self._resolve_probe()
        return time.perf_counter() - t0, events, n_tok

    def _swap(self, a: int, b: int) -> None:
        """Trade the contents of slots ``a`` and ``b``: both rows' KV in every layer and their per-slot state (the
        probe's too), in place (the captured graphs read these tensors)."""
        ix, xi = [a, b], [b, a]
        per_slot = [*self.kv.k, *self.kv.v, self.last, self.pos, self.count, self.limit, self.seed]
        if self.probe is not None:
            per_slot += [*self.h_dec.values(), *self.p_sum.values(), *self.p_last.values(), self.p_ent, self.p_eos]
        for t in per_slot:
            t[ix] = t[xi]

    def _mixed(self, B, Lb, decode, pre):
        """A step with prompt chunks: one eager forward (decode rows first), argmax/stop on the device."""
        torch = self.torch
        flat, pos, slot, chunks, keep_c, fin_jobs = [], [], [], [], [], []
        acc, acc_slot, reset, p_fin = [], [], [], []  # the probe's prompt tokens, slots to zero, predicted jobs
        off = B
        for j, t in pre:
            seq = self.ids[j.rid] + self.gen[j.rid]          # a recompute re-feeds what it generated
            start = self.done_prefill.get(j.rid, 0)
            part = seq[start:start + t]
            if self.probe is not None and "pred_lmstate" not in j.req.pred:  # a first prefill (no recompute)
                if start == 0:
                    reset.append(j.slot)
                acc += range(off, off + t)
                acc_slot += [j.slot] * t
                if start + t >= len(seq):
                    p_fin.append((j, off + t - 1, len(keep_c)))
            flat += part
            pos += range(start, start + t)
            slot += [j.slot] * t
            chunks.append((j.slot, start, t, off))
            self.done_prefill[j.rid] = start + t
            if start + t >= len(seq):
                keep_c.append(off + t - 1)
                fin_jobs.append((j, start + t, len(self.gen[j.rid])))
            off += t
        host = torch.tensor([flat, pos, slot], dtype=torch.long)
        dev = host.to(self.dev, non_blocking=True)
        keep = torch.tensor(list(range(B)) + keep_c, dtype=torch.long).to(self.dev, non_blocking=True)
        need_logits = B > 0 or bool(keep_c)
        if not need_logits:  # only mid-prompt chunks: no token comes out (one logit row kept, unused)
            keep = torch.tensor([B + len(flat) - 1], device=self.dev)
        if self.probe is not None:
            ps = _ProbeStep(B)
            if acc:
                if reset:
                    r = torch.tensor(reset).to(self.dev, non_blocking=True)
                    for v in self.p_sum.values():
                        v.index_fill_(0, r, 0.0)
                a = torch.tensor([acc, acc_slot], dtype=torch.long).to(self.dev, non_blocking=True)
                ps.acc, ps.acc_slot = a[0], a[1]
            if p_fin:
                a = torch.tensor([[x for _, x, _ in p_fin], [j.slot for j, _, _ in p_fin]],
                                 dtype=torch.long).to(self.dev, non_blocking=True)
                ps.last, ps.last_slot = a[0], a[1]
            self._pstep = ps
        try:
            logits = self._forward(B, Lb, dev[0], dev[1], dev[2], chunks, keep)
        finally:
            self._pstep = None
        if self.probe is not None:
            t1 = time.perf_counter()
            if B and self._refine_due():
                ent, eos = self.probe.scalars(logits[:B])
                self.p_ent[:B], self.p_eos[:B] = ent, eos
            if p_fin:
                ix = torch.tensor([j.slot for j, _, _ in p_fin]).to(self.dev, non_blocking=True)
                rows = torch.tensor([B + k for _, _, k in p_fin]).to(self.dev, non_blocking=True)
                n = torch.tensor([float(len(self.ids[j.rid])) for j, _, _ in p_fin]).to(self.dev, non_blocking=True)
                ent, eos = self.probe.scalars(logits.index_select(0, rows))
                last = {l: v.index_select(0, ix) for l, v in self.p_last.items()}
                mean = {l: v.index_select(0, ix) / n[:, None] for l, v in self.p_sum.items()}
                self._pending.append(("prefill", [j for j, _, _ in p_fin],
                                      self.probe.prefill_from_features(last, mean, ent, eos, n)))
            self.probe_s += time.perf_counter() - t1
        fin_seeds = [self._seed(j) for j, _, _ in fin_jobs]
        if self.temperature <= 0:
            nxt = logits.argmax(-1)
        else:  # decoding rows at their own steps, then each finished prompt's first (or next) token
            sd = torch.tensor([fin_seeds, [g for _, _, g in fin_jobs]], dtype=torch.long).to(self.dev, non_blocking=True)
            parts = [self._pick(logits[:B], self.seed[:B], self.count[:B])] if B else []
            if fin_jobs:
                parts.append(self._pick(logits[B:B + len(fin_jobs)], sd[0], sd[1]))
            nxt = torch.cat(parts) if parts else logits.argmax(-1)
        nd = B
        act = self.active[:B]
        if B:
            nd_tok = nxt[:B]
            self.last[:B] = torch.where(act, nd_tok, self.last[:B])
            self.pos[:B] += act
            self.count[:B] += act
        stop = torch.zeros(nd + len(fin_jobs), dtype=torch.bool, device=self.dev)
        if B:
            s = self.count[:B] >= self.limit[:B]
            if not self.pin:
                s |= self.is_stop[nxt[:B]]
            stop[:B] = s & act
        if fin_jobs:
            fs = torch.tensor([j.slot for j, _, _ in fin_jobs], dtype=torch.long)
            meta = torch.tensor([[p for _, p, _ in fin_jobs], [g + 1 for _, _, g in fin_jobs],
                                 [j.limit for j, _, _ in fin_jobs], fin_seeds],
                                dtype=torch.long).to(self.dev, non_blocking=True)
            fs = fs.to(self.dev, non_blocking=True)
            ct = nxt[B:B + len(fin_jobs)]
            self.last[fs] = ct
            self.pos[fs] = meta[0]
            self.count[fs] = meta[1]
            self.limit[fs] = meta[2]
            self.seed[fs] = meta[3]
            s = meta[1] >= meta[2]
            if not self.pin:
                s |= self.is_stop[ct]
            stop[B:] = s
        res = torch.stack([nxt[:nd + len(fin_jobs)], stop.long()]).cpu() if need_logits else None
        d_tok, c_tok = {}, {}
        if res is not None:
            toks, fl = res[0].tolist(), res[1].tolist()
            for j in decode:
                d_tok[j.rid] = (toks[j.slot], bool(fl[j.slot]))
            for k, (j, _, _) in enumerate(fin_jobs):
                c_tok[j.rid] = (toks[B + k], bool(fl[B + k]))
        return d_tok, c_tok

    def _seed(self, job: Job) -> int:
        from rtlm_lab.lm.sampling import request_seed

        return request_seed(job.rid, int(getattr(job.req, "sample", 0)), self.seed_base)

    def stop_reason(self, job: Job) -> str:
        toks = self.gen.pop(job.rid, [])
        self.ids.pop(job.rid, None)
        self.done_prefill.pop(job.rid, None)
        job.output_ids = toks
        if self.pin:
            return "pinned"
        if toks and toks[-1] in set(self.eos):
            return "stop_string" if toks[-1] not in set(self.lm.eos_ids) else "eos"
        return "max_tokens"

    def facts(self) -> dict[str, Any]:
        return {"backend": "kv", "kv_slots": self.S, "max_len": self.L, "kv_bytes": self.kv.bytes(),
                "cuda_graphs": self.graphs, "n_graphs": len(self.graphs_), "graph_steps": self.n_graph_steps,
                "sampling": None if self.temperature <= 0 else {"temperature": self.temperature, "top_p": self.top_p,
                                                                "seed": self.seed_base},
                "eager_steps": self.n_eager_steps, "pin_lengths": self.pin, "evictions": self.slots.n_evicted,
                "slot_moves": self.slots.n_moves,
                "lm_state_probe": None if self.probe is None else {"layers": list(self.probe.layers),
                                                                   "refine_every": self.probe.refine_every,
                                                                   "hooks": "forward hooks, in the step's forward"}}

    def close(self) -> None:
        import gc

        self.graphs_.clear()
        for h in self._hooks:
            h.remove()
        self._hooks.clear()
        self.kv.k.clear(), self.kv.v.clear()
        gc.collect()
        if self.torch.cuda.is_available():
            self.torch.cuda.empty_cache()
