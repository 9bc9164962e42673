"""Sampled decoding, seeded per request: the same request gets the same sample in any batch, engine or policy.

An LM samples when its config sets ``sampling.temperature > 0`` (``sampling.top_p`` < 1 adds nucleus
filtering; ``lm.sampling.temperature=0``, the default, is greedy). Each request has its own seed
(:func:`request_seed`: from the request id, the sample index ``k`` and ``sampling.seed``), and the ``t``-th
generated token is drawn by inverse-CDF sampling with one uniform number ``u = uniform(seed, t)``
(:func:`uniform`: an integer hash computed with tensor ops, so it runs on the device, inside a captured CUDA
graph, without a generator object and without depending on which other rows share the batch). Hence:

* :class:`SeededSampler` plugs the rule into transformers' ``generate`` as a logits processor (it leaves one
  finite logit per row; greedy search then picks it), so ``ChatLM.generate(..., seeds=...)`` and the kv engine
  draw the same tokens from the same logits (tests/test_sampling.py);
* every policy of a group serves each request the same sample (as with greedy decoding, up to the GPU's
  batch-dependent rounding);
* ``workload.pin_lengths=true`` pins the sampled length as it pins the greedy one.

Why not ``torch.multinomial`` with a ``torch.Generator`` per request: a generator is host state, one per row,
and a batched draw consumes it in an order that depends on the batch; a counter-based hash does not.
"""

from __future__ import annotations

import zlib
from typing import Any, Mapping, Sequence

import torch
from transformers import LogitsProcessor

from rtlm_lab.errors import UserError

_M32 = 0xFFFFFFFF


def sampling_params(spec: Mapping[str, Any]) -> tuple[float, float, int]:
    """``(temperature, top_p, seed)`` from an LM config's ``sampling`` block (temperature 0: greedy)."""
    s = spec.get("sampling") or {}
    try:
        t = float(0.0 if s.get("temperature") is None else s["temperature"])
        p = float(1.0 if s.get("top_p") is None else s["top_p"])
        seed = int(s.get("seed") or 0)
    except (TypeError, ValueError) as exc:
        raise UserError(f"lm.sampling: temperature, top_p and seed must be numbers ({exc})") from None
    if t < 0 or not 0 < p <= 1:
        raise UserError(f"lm.sampling: temperature must be >= 0 and top_p in (0, 1], got {t} and {p}")
    return t, p, seed


def request_seed(request_id: str, k: int = 0, base: int = 0) -> int:
    """A request's seed for its ``k``-th sample (31 bits, stable across processes and platforms)."""
    return zlib.crc32(f"{int(base)}|{request_id}|{int(k)}".encode()) & 0x7FFFFFFF


def _mix(x):
    # a 32-bit integer finaliser (three xor-shift-multiply rounds); every product stays below 2**63 in int64
    x = (((x >> 16) ^ x) * 0x45D9F3B) & _M32
    x = (((x >> 16) ^ x) * 0x45D9F3B) & _M32
    return ((x >> 16) ^ x) & _M32


def uniform(seed, step):
    """A uniform number in (0, 1) per row from its seed and step (int64 tensors of one shape), float64."""
    x = _mix(_mix(seed.long() & _M32) ^ ((step.long() * 0x9E3779B1) & _M32))
    return (x.double() + 0.5) / 4294967296.0


def sample(logits, seed, step, temperature: float, top_p: float = 1.0):
    """The sampled token of each row of ``logits`` ``[n, vocab]`` (``seed``, ``step``: ``[n]`` int64 on the same
    device): softmax at ``temperature``, the nucleus of mass ``top_p`` (the most probable tokens whose
    cumulative probability before them is below ``top_p``), inverse CDF at :func:`uniform`."""
    p = torch.softmax(logits.float() / float(temperature), dim=-1)
    u = uniform(seed, step).to(p.dtype)
    if top_p < 1.0:
        ps, order = _sorted_head(p, top_p)
        cum = ps.cumsum(-1)
        ps = torch.where(cum - ps < top_p, ps, torch.zeros_like(ps))
        cum = ps.cumsum(-1)
        k = torch.searchsorted(cum, (u * cum[:, -1])[:, None]).clamp_max(ps.shape[-1] - 1)
        return order.gather(1, k)[:, 0]
    cum = p.cumsum(-1)
    k = torch.searchsorted(cum, (u * cum[:, -1])[:, None]).clamp_max(p.shape[-1] - 1)
    return k[:, 0]


def _sorted_head(p, top_p: float, k: int = 128):
    """The probabilities sorted in descending order (and their token ids), enough of them to hold the nucleus.
    On the CPU a full sort of every row costs more than the LM step (38 ms a step for 64 rows of an 8,000-word
    vocabulary): the top ``k`` are enough wherever they hold ``top_p`` of the mass, and rows where they do not
    get the full sort. On the GPU (and inside a captured graph, where a data-dependent branch is impossible)
    every row is sorted."""
    if p.device.type != "cpu" or p.shape[-1] <= k:
        return torch.sort(p, dim=-1, descending=True)
    ps, order = torch.topk(p, k, dim=-1, sorted=True)
    short = ps.sum(-1) < top_p
    if not bool(short.any()):
        return ps, order
    full_p, full_o = torch.sort(p[short], dim=-1, descending=True)
    ps = torch.cat([ps, ps.new_zeros((ps.shape[0], p.shape[-1] - k))], 1)
    order = torch.cat([order, order.new_zeros((order.shape[0], p.shape[-1] - k))], 1)
    ps[short], order[short] = full_p, full_o
    return ps, order


class SeededSampler(LogitsProcessor):
    """:func:`sample` inside ``generate``: row ``i`` draws with ``seeds[i]`` at step ``t`` = tokens it has
    generated so far (``input_ids`` length minus ``prefix_len``: the left-padded prompt, or the decoder start
    token); the scores keep only the drawn token, so greedy search emits it."""

    def __init__(self, seeds: Sequence[int], prefix_len: int, temperature: float, top_p: float = 1.0):
        self.seeds = torch.tensor([int(s) for s in seeds], dtype=torch.long)
        self.prefix_len, self.temperature, self.top_p = int(prefix_len), float(temperature), float(top_p)

    def __call__(self, input_ids, scores):
        n = scores.shape[0]
        if n != len(self.seeds):
            raise UserError(f"SeededSampler: {len(self.seeds)} seeds for a batch of {n} rows")
        seed = self.seeds.to(scores.device)
        step = torch.full((n,), input_ids.shape[1] - self.prefix_len, dtype=torch.long, device=scores.device)
        tok = sample(scores, seed, step, self.temperature, self.top_p)
        out = torch.full_like(scores, float("-inf"))
        out.scatter_(1, tok[:, None], 0.0)
        return out
