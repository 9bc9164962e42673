"""The real engine's backend from the platform's engine config (``platform.engine``)."""

from __future__ import annotations

import math
from typing import Any, Mapping

from rtlm_lab.scheduler.engine.paged import HFBackend


def make_backend(lm, ecfg: Mapping[str, Any], max_seqs: int | None = None):
    """The real engine's backend: ``kv`` (the serving core: per-slot KV, mixed steps, CUDA-graph decode;
    :mod:`rtlm_lab.scheduler.engine.kv`), or for comparison ``slots`` (the previous engine on DynamicCache) and
    ``paged`` (transformers' own continuous batching)."""
    from rtlm_lab.scheduler.engine.kv import KVBackend
    from rtlm_lab.scheduler.engine.slots import SlotBackend

    n = int(max_seqs or ecfg["max_seqs"])
    if ecfg["backend"] == "kv":
        return KVBackend(lm, n, ecfg["max_batch_tokens"], kv_slots=ecfg.get("kv_slots"), max_len=ecfg.get("max_len"),
                         pin_lengths=bool(ecfg.get("pin_lengths")), cuda_graphs=ecfg.get("cuda_graphs"))
    if ecfg["backend"] == "paged":
        blocks = ecfg.get("num_blocks")
        if not blocks:  # room for every slot's longest request: a footprint fixed by the budgets, not free memory
            per = int(lm.spec.get("max_input_tokens", 1024)) + int(lm.spec.get("max_new_tokens", 64))
            blocks = n * math.ceil(per / ecfg["page_size"]) + 8
        return HFBackend(lm, n, ecfg["max_batch_tokens"], num_blocks=blocks, page_size=ecfg["page_size"],
                         cuda_graphs=ecfg.get("cuda_graphs"))
    return SlotBackend(lm, n, ecfg["max_batch_tokens"])
