"""Service-time model of one worker: what a batch costs on a platform.

``batch_time(B, max_input_tokens, tokens) = prefill(B, max_input_tokens) + step(B) * (max(tokens) - 1)``
with ``prefill(B, T) = ttft_a + ttft_c * (B - 1) + ttft_b * B * T`` and ``step(B) = step_1 + step_slope * (B - 1)``; row ``i`` of the
batch finishes at ``prefill + step(B) * (tokens_i - 1)`` (its last token), the worker when the longest row
does (static batching: one real ``generate`` call per batch).

The parameters come from a *calibration* (:func:`calibrate`: real ``generate`` calls at batch sizes
1..max_batch on the platform, timed) or, for the cpu platform's batch-1 profiles, from a profile
(:meth:`ServiceModel.from_profile`). The simulator and the schedulers' predictions use the same model.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from rtlm_lab.errors import UserError

log = logging.getLogger("rtlm_lab.scheduler")


@dataclass
class ServiceModel:
    """Prefill + per-step decoding cost of one worker, with linear batch scaling."""

    ttft_a: float                 # s, fixed cost of a call (prefill + first step)
    ttft_b: float                 # s per prompt token in the padded batch (B x max input tokens)
    step_1: float                 # s per decoding step at batch 1
    step_slope: float = 0.0       # extra s per step for each additional row in the batch
    ttft_c: float = 0.0           # extra s of prefill for each additional row (beyond its tokens)
    source: str = ""              # where the numbers come from (calibration run, profile)
    meta: dict[str, Any] = field(default_factory=dict)

    def prefill(self, batch: int, max_input_tokens: float) -> float:
        return max(0.0, self.ttft_a + self.ttft_c * (max(1, batch) - 1) + self.ttft_b * batch * max_input_tokens)

    def step(self, batch: int) -> float:
        return max(1e-6, self.step_1 + self.step_slope * (max(1, batch) - 1))

    def row_times(self, input_tokens: Sequence[float], tokens: Sequence[float]) -> np.ndarray:
        """Seconds from the start of the batch until each row's last token."""
        B = len(tokens)
        pre = self.prefill(B, float(max(input_tokens)) if B else 0.0)
        t = np.maximum(np.asarray(tokens, dtype=float), 1.0)
        return pre + self.step(B) * (t - 1.0)

    def batch_time(self, input_tokens: Sequence[float], tokens: Sequence[float]) -> float:
        return float(self.row_times(input_tokens, tokens).max()) if len(tokens) else 0.0

    def isolated(self, input_tokens: float, tokens: float) -> float:
        """Latency of one request served alone (batch 1)."""
        return float(self.row_times([input_tokens], [tokens])[0])

    def throughput_gain(self, batch: int) -> float:
        """Decoding tokens/s at ``batch`` relative to batch 1."""
        return batch * self.step(1) / self.step(batch)

    # ---------------------------------------------------------------------------------- fitting
    @classmethod
    def from_profile(cls, df, step_slope_rel: float = 1.0) -> "ServiceModel":
        """Fit prefill and step time from a batch-1 profile (``ttft_s``, ``ms_per_token`` columns).

        Batch scaling cannot be read from a batch-1 profile: ``step_slope = step_slope_rel * step_1``
        (1.0 = no gain from batching, the conservative choice for a CPU).
        """
        if "batch_size" in df.columns and (df["batch_size"] > 1).any():
            raise UserError("ServiceModel.from_profile needs a batch-1 profile; calibrate instead "
                            "(rtlm-schedule mode=real calibrates on the platform)")
        n_in = df["n_input_tokens"].to_numpy(float)
        ttft = df["ttft_s"].to_numpy(float)
        b, a = np.polyfit(n_in, ttft, 1) if np.ptp(n_in) > 0 else (0.0, float(np.mean(ttft)))
        multi = df[df["n_output_tokens"] > 1]
        step = float(np.median(multi["ms_per_token"])) / 1000.0 if len(multi) else float(np.mean(ttft))
        return cls(ttft_a=float(a), ttft_b=float(max(b, 0.0)), step_1=step, step_slope=step * step_slope_rel,
                   source="profile", meta={"n": int(len(df))})

    @classmethod
    def fit(cls, calls: Sequence[dict[str, float]], source: str = "calibration") -> "ServiceModel":
        """Least-squares fit from timed calls: dicts with ``batch``, ``max_input_tokens``, ``ttft_s`` and
        ``step_s`` (mean decoding step after the first token, NaN when only one token came out)."""
        if not calls:
            raise UserError("no calibration calls to fit a service model from")
        B = np.array([c["batch"] for c in calls], float)
        X = B * np.array([c["max_input_tokens"] for c in calls], float)
        ttft = np.array([c["ttft_s"] for c in calls], float)
        c_ = 0.0
        if len(set(B)) > 1:  # batch-1 intercept, per-row and per-token terms
            (a, c_, b), *_ = np.linalg.lstsq(np.vstack([np.ones_like(X), B - 1, X]).T, ttft, rcond=None)
        else:
            (a, b), *_ = np.linalg.lstsq(np.vstack([np.ones_like(X), X]).T, ttft, rcond=None)
        if b < 0 or c_ < 0 or a < 0:  # an ill-conditioned fit: fall back to the per-token term only
            (a, b), *_ = np.linalg.lstsq(np.vstack([np.ones_like(X), X]).T, ttft, rcond=None)
            c_ = 0.0
            if b < 0 or a < 0:
                a, b = float(np.mean(ttft)), 0.0
        step = np.array([c["step_s"] for c in calls], float)
        ok = np.isfinite(step)
        if not ok.any():
            raise UserError("calibration produced no multi-token replies; raise calibration max tokens")
        if len(set(B[ok])) > 1:
            (s1, slope), *_ = np.linalg.lstsq(np.vstack([np.ones(ok.sum()), B[ok] - 1]).T, step[ok], rcond=None)
        else:
            s1, slope = float(np.mean(step[ok])), 0.0
        s1 = float(s1) if s1 > 0 else float(np.min(step[ok]))
        return cls(ttft_a=float(a), ttft_b=float(b), step_1=s1, step_slope=float(max(slope, 0.0)),
                   ttft_c=float(c_), source=source, meta={"n_calls": len(calls), "calls": list(calls)})

    @classmethod
    def from_records(cls, records, source: str = "records") -> "ServiceModel":
        """Fit to the batches a run actually served (``requests.parquet`` of a real run): per batch, the
        time to its first token and the decoding step of its longest row."""
        calls = []
        for _, g in records.groupby(["worker", "batch_id"]):
            longest = g.loc[g["actual_tokens"].idxmax()]
            n = int(longest["actual_tokens"])
            ttft = float(g["first_token_s"].min() - g["start_s"].min())
            step = (float(longest["finish_s"] - longest["first_token_s"]) / (n - 1)) if n > 1 else float("nan")
            calls.append({"batch": int(len(g)), "max_input_tokens": int(g["n_input_tokens"].max()),
                          "ttft_s": ttft, "step_s": step})
        m = cls.fit(calls, source=source)
        m.meta = {"n_calls": len(calls)}
        return m

    # ---------------------------------------------------------------------------------- files
    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ServiceModel":
        keys = ("ttft_a", "ttft_b", "step_1", "step_slope")
        extra = {"ttft_c": float(d.get("ttft_c", 0.0) or 0.0)}
        try:
            vals = {k: float(d[k]) for k in keys}
        except (KeyError, TypeError, ValueError) as exc:
            raise UserError(f"service model lacks or garbles {exc}; expected keys {', '.join(keys)}") from None
        if not all(math.isfinite(v) for v in vals.values()) or vals["step_1"] <= 0:
            raise UserError(f"service model has non-finite or non-positive values: {vals}")
        return cls(**vals, **extra, source=str(d.get("source", "")), meta=dict(d.get("meta") or {}))

    @classmethod
    def load(cls, path: str | Path) -> "ServiceModel":
        path = Path(path)
        try:
            return cls.from_dict(json.loads(path.read_text()))
        except (OSError, json.JSONDecodeError) as exc:
            raise UserError(f"cannot read service model {path}: {type(exc).__name__}: {exc}".splitlines()[0]) from None


def calibrate(chat_lm, texts: Sequence[str], batch_sizes: Sequence[int], max_new_tokens: int = 32,
              repeats: int = 2, generate=None) -> ServiceModel:
    """Time real ``generate`` calls at each batch size and fit a :class:`ServiceModel`.

    ``generate(texts, max_new_tokens)`` defaults to ``chat_lm.generate`` (the worker's own decoding path, e.g.
    the static-cache decoder on cuda). One warm-up call first; ``repeats`` calls per batch size, on
    distinct texts where there are enough.
    """
    gen = generate or (lambda t, m: chat_lm.generate(t, max_new_tokens=m))
    texts = [t for t in texts if str(t).strip()] or ["Hello, how are you?"]
    gen(texts[:1], max_new_tokens)  # warm-up (allocations, kernels, compilation)
    calls = []
    k = 0
    for B in batch_sizes:
        for _ in range(repeats):
            batch = [texts[(k + i) % len(texts)] for i in range(B)]
            k += B
            outs = gen(batch, max_new_tokens)
            n_max = max(o.n_output_tokens for o in outs)
            longest = max(outs, key=lambda o: o.n_output_tokens)
            step = (longest.e2e_s - longest.ttft_s) / (n_max - 1) if n_max > 1 else float("nan")
            calls.append({"batch": B, "max_input_tokens": max(o.n_input_tokens for o in outs),
                          "ttft_s": min(o.ttft_s for o in outs), "step_s": step, "max_tokens": n_max})
    model = ServiceModel.fit(calls)
    log.info("service model: prefill %.1f ms (+%.2f ms per extra row) + %.3f ms/prompt token, step %.2f ms "
             "(+%.3f ms per extra row)", 1e3 * model.ttft_a, 1e3 * model.ttft_c, 1e3 * model.ttft_b,
             1e3 * model.step_1, 1e3 * model.step_slope)
    return model
