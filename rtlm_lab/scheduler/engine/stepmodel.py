"""The fitted step-time model the simulator replays."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd

from rtlm_lab.errors import UserError



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

