"""A request inside the serving loop, and the per-step record an engine keeps."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any


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
    slot: int | None = None            # the KV slot it holds (kv engine and simulator: SlotTable)
    n_prompt: int = 0                  # prompt tokens (a recompute prefills these plus what it generated)
    limit: int = 0                     # tokens it may generate (pinned: exactly its profiled length)
    evictions: int = 0                 # times its KV was dropped for a slot (recomputed on resume)

    @property
    def rid(self) -> str:
        return self.req.request_id

    def predicted_remaining(self) -> float:
        """The LM-state prediction of the tokens still to come (nan before the prefill predicted it)."""
        return self.rem_pred - (self.generated - self.rem_at)


# ---------------------------------------------------------------------------------------------- step model

# one row per engine step in ``steps.parquet``: start, seconds, rows, tokens processed, requests admitted
STEP_COLUMNS = ("t_s", "dt_s", "n_seqs", "n_tokens", "n_admit")
