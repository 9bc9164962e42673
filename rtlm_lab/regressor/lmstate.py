"""LM-state features: what the *served* LM itself says about a request's reply length (issue 15).

The states are the LM's own prefill (:mod:`rtlm_lab.lm.states`: :func:`~rtlm_lab.lm.states.extract_states` gives
an :class:`~rtlm_lab.lm.states.LMStates` per batch of requests, :func:`~rtlm_lab.lm.states.cached_states` caches
them per profile); this module is what the length predictors make of them. :func:`feature_matrix` lays the
states out as one row per request (``last`` and ``mean`` of every layer, then ``entropy``, ``eos_prob``,
``log1p(n_tokens)``).

**Refinement** (TRAIL-style): every ``k`` decoding steps, the state after teacher-forcing the reply's first
``k`` tokens (prompt + those tokens, re-encoded; greedy decoding makes them a function of the input: the
profile's ``output_ids``, or a short greedy ``generate`` when the profile has none, :func:`reply_prefix_ids`)
predicts the *remaining* length, and :func:`detect_loop` (the last ``n``-gram already occurred verbatim in the
tokens so far) overrides it with "runs to the cap" (``refine+loop``); ``refine+repfeat`` instead gives the
step-k probe :func:`token_features` (loop flags for n = 2, 3, 4, repeated-bigram share, distinct-token share),
and ``refine+repfeat+gated_loop`` applies the override only where the training loops flagged at step k ran to
the cap (share >= ``loop_min_precision``; an LM may repeat itself and still stop).

API for the scheduler (no import of the scheduler here)::

    pred = LMStatePredictor(probe="auto").fit(states, lengths, groups=conv_ids, max_new_tokens=64)
    pred.fit_refine(k, states_k, lengths)                 # optional: per-step remaining-length probes
    pred.predict_from_states(extract_states(lm, texts))   # -> predicted output tokens (float array)
    pred.refine_predict(state_k, tokens_so_far)           # -> predicted remaining tokens (float array)
    pred.predict_texts(lm, texts); pred.refine_texts(lm, texts, tokens_so_far)   # the same, LM pass included

The LM-side names that code imports from this module (``LMStates``, ``extract_states``, ``cached_states``,
``reply_prefix_ids``, ``resolve_layers``, ``end_of_turn_ids``, ``DEFAULT_LAYERS``...) are re-exported here.
Probes are in :mod:`rtlm_lab.regressor.probes`; the comparison table in :mod:`rtlm_lab.regressor.evaluate`
(``rtlm-train-regressor regressor.use_prefill=true``).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from rtlm_lab.errors import UserError
# LM side (rtlm_lab.lm.states), re-exported: the scheduler's LM probe and tests/test_lmstate.py import these from here
from rtlm_lab.lm.states import (  # noqa: F401
    DEFAULT_LAYERS, LMStates, _rows, _uncertainty, cached_states, end_of_turn_ids, extract_states, reply_prefix_ids,
    resolve_layers,
)
from rtlm_lab.metrics import kendall, score


def feature_matrix(states: LMStates, which: Sequence[str] = ("last", "mean", "scalar")) -> np.ndarray:
    """One row per request: ``last`` and ``mean`` of every layer, then entropy, eos_prob, log1p(n_tokens)."""
    cols = []
    for l in states.layers:
        if "last" in which:
            cols.append(states.last[l])
        if "mean" in which:
            cols.append(states.mean[l])
    if "scalar" in which:
        cols.append(scalar_features(states))
    X = np.hstack([np.asarray(c, dtype=np.float64) for c in cols])
    return np.nan_to_num(X, nan=0.0, posinf=0.0, neginf=0.0)


def scalar_features(states: LMStates) -> np.ndarray:
    """``(n, 3)``: next-token entropy, end-of-turn probability (as log), log1p(real tokens)."""
    return np.column_stack([states.entropy, np.log(np.clip(states.eos_prob, 1e-12, 1.0)),
                            np.log1p(states.n_tokens)]).astype(np.float64)


# ------------------------------------------------------------------------------------------ refinement
def detect_loop(tokens: Sequence[int], n: int = 3) -> bool:
    """True when the last ``n`` tokens already occurred verbatim (as a contiguous n-gram) earlier in ``tokens``
    (occurrences may overlap the tail's start, so ``a a a a`` is a loop for n=2)."""
    t = list(tokens)
    n = int(n)
    if n < 1 or len(t) < n + 1:
        return False
    tail = t[-n:]
    return any(t[i:i + n] == tail for i in range(len(t) - n))


def token_features(tokens: Sequence[Sequence[int]], ns: Sequence[int] = (2, 3, 4)) -> np.ndarray:
    """Repetition features of the tokens so far, one row per request: the loop flag for each ``n`` in ``ns``,
    the share of bigrams that already occurred earlier, and the share of distinct tokens."""
    rows = []
    for t in tokens:
        t = list(t)
        flags = [float(detect_loop(t, n)) for n in ns]
        big = list(zip(t, t[1:]))
        seen, rep = set(), 0
        for b in big:
            rep += b in seen
            seen.add(b)
        rows.append(flags + [rep / max(1, len(big)), len(set(t)) / max(1, len(t))])
    return np.asarray(rows, dtype=np.float64).reshape(len(rows), len(ns) + 2)


def remaining_targets(lengths: Sequence[float], k: int) -> tuple[np.ndarray, np.ndarray]:
    """(mask of requests still decoding after ``k`` steps, their remaining tokens ``n - k``)."""
    y = np.asarray(lengths, dtype=float)
    alive = y > k
    return alive, np.where(alive, y - k, 0.0)


class LMStatePredictor:
    """Output length from LM states with one probe (``probe="auto"``: chosen on a validation split of
    conversations by Kendall tau), plus optional per-step refinement probes and the loop override."""

    def __init__(self, probe: str = "auto", which: Sequence[str] = ("last", "mean", "scalar"),
                 candidates: Sequence[str] = ("ridge", "mlp", "ordinal", "rank"), val_size: float = 0.25,
                 loop_n: int = 3, loop_min_precision: float = 0.8, seed: int = 0,
                 probe_params: Mapping[str, Mapping] | None = None):
        self.loop_min_precision = loop_min_precision
        self.probe, self.which, self.candidates = probe, tuple(which), tuple(candidates)
        self.val_size, self.loop_n, self.seed = val_size, loop_n, seed
        self.probe_params = dict(probe_params or {})

    def _new(self, name: str):
        from rtlm_lab.regressor.probes import make_probe

        return make_probe(name, seed=self.seed, **dict(self.probe_params.get(name, {})))

    def val_split(self, groups, n: int) -> tuple[np.ndarray, np.ndarray]:
        """Train and validation row indices of ``n`` rows, split by conversation (``groups``; None: each row its
        own): where :meth:`_select` picks the probe, and where the serving probe scores its residuals
        (:func:`rtlm_lab.scheduler.lmprobe.fit_state_probe`)."""
        from sklearn.model_selection import GroupShuffleSplit

        groups = np.arange(n) if groups is None else np.asarray(groups)
        return next(GroupShuffleSplit(1, test_size=self.val_size, random_state=self.seed)
                    .split(np.zeros(n), groups=groups))

    def _select(self, X, y, groups):
        tr, va = self.val_split(groups, len(y))
        scores = {}
        for name in self.candidates:
            p = self._new(name).fit(X[tr], y[tr])
            scores[name] = kendall(p.predict(X[va]), y[va])
        best = max(scores, key=lambda m: -1 if not math.isfinite(scores[m]) else scores[m])
        return best, scores

    def fit(self, states: LMStates, lengths, groups=None, max_new_tokens: int | None = None):
        X = feature_matrix(states, self.which)
        y = np.asarray(lengths, dtype=float)
        self.val_scores_ = {}
        name = self.probe
        if name == "auto":
            name, self.val_scores_ = self._select(X, y, groups)
        self.probe_ = name
        self.layers_ = tuple(states.layers)
        self.model_ = self._new(name).fit(X, y)
        self.max_new_tokens_ = int(max_new_tokens or np.max(y))
        self.refiners_: dict[int, Any] = {}
        return self

    def predict_from_states(self, states: LMStates) -> np.ndarray:
        """Predicted output tokens (float >= 0) per request."""
        return np.clip(self.model_.predict(feature_matrix(states, self.which)), 0, None)

    def predict_texts(self, lm, texts: Sequence[Any], contexts: Sequence[Any] | None = None,
                      batch_size: int = 16) -> np.ndarray:
        """:meth:`predict_from_states` after one prefill pass of ``lm`` (the LM the probe was fitted on)."""
        return self.predict_from_states(extract_states(lm, texts, contexts, layers=self.layers_,
                                                       batch_size=batch_size))

    def refine_texts(self, lm, texts: Sequence[Any], tokens_so_far: Sequence[Sequence[int]],
                     contexts: Sequence[Any] | None = None, use_loop: bool | str = "gated") -> np.ndarray:
        """:meth:`refine_predict` after teacher-forcing ``tokens_so_far`` (one list per request, same length)."""
        st = extract_states(lm, texts, contexts, layers=self.layers_, prefix_ids=tokens_so_far)
        return self.refine_predict(st, tokens_so_far, use_loop=use_loop)

    def fit_refine(self, k: int, states_k: LMStates, lengths, probe: str | None = None,
                   tokens: Sequence[Sequence[int]] | None = None):
        """Remaining-length probe for step ``k`` (rows that were still decoding after ``k`` tokens); with
        ``tokens`` (each row's first ``k`` reply tokens) a second probe also sees :func:`token_features`."""
        alive, rem = remaining_targets(lengths, k)
        if alive.sum() < 5:
            return self
        X = feature_matrix(states_k, self.which)
        self.refiners_[int(k)] = self._new(probe or self.probe_).fit(X[alive], rem[alive])
        if tokens is not None:
            if not hasattr(self, "refiners_tok_"):
                self.refiners_tok_, self.loop_precision_ = {}, {}
            toks = [list(t)[:k] for t in tokens]
            Xt = np.hstack([X, token_features(toks)])
            self.refiners_tok_[int(k)] = self._new(probe or self.probe_).fit(Xt[alive], rem[alive])
            loop = np.array([detect_loop(t, self.loop_n) for t in toks], dtype=bool) & alive
            y = np.asarray(lengths, dtype=float)
            self.loop_precision_[int(k)] = float(np.mean(y[loop] >= self.max_new_tokens_)) if loop.any() \
                else math.nan  # share of training loops (at step k) that did run to the cap
        return self

    def loop_trusted(self, k: int) -> bool:
        """Whether the loop override is trusted at step ``k``: at least ``loop_min_precision`` of the training
        requests flagged at ``k`` ran to the cap (an LM may repeat itself and still stop: BlenderBot-ccc)."""
        ks = [s for s in getattr(self, "loop_precision_", {}) if s <= k]
        if not ks:
            return True
        p = self.loop_precision_[max(ks)]
        return bool(math.isfinite(p) and p >= self.loop_min_precision)

    def refine_predict(self, states_k: LMStates, tokens_so_far: Sequence[Sequence[int]] | Sequence[int],
                       use_loop: bool | str = True, use_token_features: bool = True) -> np.ndarray:
        """Predicted *remaining* tokens after ``len(tokens_so_far)`` decoding steps, from the state after
        teacher-forcing those tokens (+ their repetition features, when that probe was fitted); a detected
        repetition loop predicts the cap (``use_loop=True``; ``"gated"``: only where :meth:`loop_trusted`). One list of tokens or one per request (all of the
        same step)."""
        toks = list(tokens_so_far)
        if toks and not isinstance(toks[0], (list, tuple, np.ndarray)):
            toks = [toks]
        k = len(toks[0]) if toks else 0
        ks = [s for s in self.refiners_ if s <= k]
        tok_models = getattr(self, "refiners_tok_", {})
        if ks and use_token_features and max(ks) in tok_models:
            kk = max(ks)
            Xt = np.hstack([feature_matrix(states_k, self.which), token_features([list(t)[:kk] for t in toks])])
            pred = np.clip(tok_models[kk].predict(Xt), 0, None)
        elif ks:
            pred = np.clip(self.refiners_[max(ks)].predict(feature_matrix(states_k, self.which)), 0, None)
        else:
            pred = np.clip(self.predict_from_states(states_k) - k, 0, None)
        cap_left = max(0, self.max_new_tokens_ - k)
        pred = np.minimum(pred, cap_left)
        if use_loop == "gated":
            use_loop = self.loop_trusted(k)
        if use_loop:
            loop = np.array([detect_loop(t, self.loop_n) for t in toks], dtype=bool)
            pred = np.where(loop, cap_left, pred)
        return pred


# ------------------------------------------------------------------------------------------ evaluation
PROBE_METHODS = tuple(f"lmstate_{p}" for p in ("ridge", "mlp", "ordinal", "rank"))


def evaluate_methods(states: LMStates, y: np.ndarray, tr: np.ndarray, te: np.ndarray, groups: np.ndarray,
                     seed: int = 0, candidates: Sequence[str] = ("ridge", "mlp", "ordinal", "rank"),
                     which: Sequence[str] = ("last", "mean", "scalar"), max_new_tokens: int | None = None,
                     loop_n: int = 3):
    """Fit every probe and the validation-picked one on ``tr``; predictions on ``te`` and ``tr``.

    Returns ``(preds, train_preds, models)`` keyed ``lmstate_<probe>`` and ``lmstate_auto``."""
    preds, train_preds, models = {}, {}, {}
    Str, Ste = states.take(tr), states.take(te)
    for p in candidates:
        m = LMStatePredictor(probe=p, which=which, seed=seed).fit(Str, y[tr], max_new_tokens=max_new_tokens)
        preds[f"lmstate_{p}"], train_preds[f"lmstate_{p}"] = m.predict_from_states(Ste), m.predict_from_states(Str)
        models[f"lmstate_{p}"] = m
    auto = LMStatePredictor(probe="auto", which=which, candidates=candidates, seed=seed, loop_n=loop_n)
    auto.fit(Str, y[tr], groups=groups[tr], max_new_tokens=max_new_tokens)
    preds["lmstate_auto"], train_preds["lmstate_auto"] = auto.predict_from_states(Ste), auto.predict_from_states(Str)
    models["lmstate_auto"] = auto
    return preds, train_preds, models


def evaluate_refine(auto: LMStatePredictor, states_k: LMStates, prefix: Sequence[Sequence[int]], y: np.ndarray,
                    tr: np.ndarray, te: np.ndarray, k: int, prefill_pred_te: np.ndarray, idx_fn=None):
    """Remaining-length prediction at step ``k`` on the test rows still decoding after ``k`` tokens:
    ``prefill_minus_k`` (the prefill prediction minus k), ``prefill+loop``, ``refine_probe`` (a probe on
    the step-k states, trained on the training rows alive at k), ``refine+loop`` (loop => the cap),
    ``refine+repfeat`` (the probe also sees :func:`token_features`), ``refine+repfeat+gated_loop`` (+ the
    override where training loops at k ran to the cap, :meth:`LMStatePredictor.loop_trusted`), ``oracle``. Returns a
    DataFrame of :func:`rtlm_lab.metrics.score` rows with ``method`` and ``k``."""
    import pandas as pd

    alive_tr, rem = remaining_targets(y, k)
    auto.fit_refine(k, states_k.take(tr), y[tr], tokens=[list(prefix[i])[:k] for i in tr])
    te_alive = te[alive_tr[te]]
    if len(te_alive) < 3:
        return pd.DataFrame()
    pos = np.searchsorted(te, te_alive)
    ytrue = rem[te_alive]
    ytrain = rem[tr][alive_tr[tr]]
    cap = auto.max_new_tokens_ - k
    toks = [list(prefix[i])[:k] for i in te_alive]
    loop = np.array([detect_loop(t, auto.loop_n) for t in toks], dtype=bool)
    base = np.clip(np.minimum(prefill_pred_te[pos] - k, cap), 0, None)
    Sk = states_k.take(te_alive)
    methods = {"prefill_minus_k": base, "prefill+loop": np.where(loop, cap, base)}
    if k in auto.refiners_:
        methods["refine_probe"] = auto.refine_predict(Sk, toks, use_loop=False, use_token_features=False)
        methods["refine+loop"] = auto.refine_predict(Sk, toks, use_loop=True, use_token_features=False)
        methods["refine+repfeat"] = auto.refine_predict(Sk, toks, use_loop=False, use_token_features=True)
        methods["refine+repfeat+gated_loop"] = auto.refine_predict(Sk, toks, use_loop="gated",
                                                                   use_token_features=True)
    methods["oracle"] = ytrue
    idx = idx_fn(te_alive) if idx_fn is not None else None
    rows = []
    for m, p in methods.items():
        rows.append({"k": int(k), "method": m, **score(ytrue, p, ytrain, idx=idx),
                     "loop_flagged": int(loop.sum()), "loop_precision":
                     float(np.mean(y[te_alive][loop] >= auto.max_new_tokens_)) if loop.any() else math.nan})
    return pd.DataFrame(rows)


# ------------------------------------------------------------------------------------- slim profiles
#: What a committed training profile keeps: lengths and ids (texts are re-joined from the corpus).
SLIM_COLUMNS = ["request_id", "n_input_tokens", "n_output_tokens", "stop_reason", "output_ids", "lm", "platform",
                "decoding"]


def read_run(path: str | Path):
    """A profile parquet, or a profile run dir (its ``profile.parquet``, else its finished ``parts/``)."""
    import pandas as pd

    path = Path(path)
    if path.is_file():
        return pd.read_parquet(path)
    if (path / "profile.parquet").is_file():
        return pd.read_parquet(path / "profile.parquet")
    parts = sorted((path / "parts").glob("part-*.parquet"))
    if not parts:
        raise UserError(f"no profile.parquet nor parts/ under {path}")
    df = pd.concat([pd.read_parquet(p) for p in parts], ignore_index=True)
    return df.drop_duplicates("request_id", keep="first").reset_index(drop=True)


def slim_profile(df):
    """Only :data:`SLIM_COLUMNS` (those present)."""
    return df[[c for c in SLIM_COLUMNS if c in df.columns]].reset_index(drop=True)


def with_texts(df, split: str = "train"):
    """Re-join ``text`` (and ``context`` when the profile was made with context) from the CCC corpus by
    ``request_id`` (the default split spec of ``conf/data/ccc.yaml``)."""
    from rtlm_lab.data.ccc import load_requests

    if "text" in df.columns:
        return df
    with_ctx = False
    if "decoding" in df.columns and len(df):
        try:
            with_ctx = bool(json.loads(str(df["decoding"].iloc[0])).get("with_context", False))
        except ValueError:
            pass
    req = load_requests(split=split, n=None, with_context=with_ctx, max_chars=None)
    req = req.drop_duplicates("request_id").set_index("request_id")
    missing = ~df["request_id"].isin(req.index)
    if missing.any():
        raise UserError(f"{int(missing.sum())} request ids of the slim profile are not in the CCC {split} split")
    out = df.copy()
    out["text"] = req.loc[out["request_id"], "text"].to_numpy()
    out["context"] = req.loc[out["request_id"], "context"].to_numpy()
    return out


def slim(src: str | Path, dst: str | Path) -> pd.DataFrame:
    """Keep lengths + ids of a profile (parquet or run dir) in ``dst``: the file to commit
    (``rtlm-reference target=train_profile target.src=<run dir> target.dst=<parquet>``)."""
    from rtlm_lab.io import write_parquet_atomic

    df = slim_profile(read_run(src))
    Path(dst).parent.mkdir(parents=True, exist_ok=True)
    write_parquet_atomic(df, dst)
    print(f"{dst}: {len(df)} rows, columns {list(df.columns)}, {Path(dst).stat().st_size} bytes")
    return df
