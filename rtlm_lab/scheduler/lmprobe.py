"""The LM-state policy's length predictor, read from the engine's own forward passes (issue 15).

:class:`StateProbe` wraps two :class:`~rtlm_lab.regressor.lmstate.LMStatePredictor` s fitted on a *train-split*
profile of the served LM:

* ``prefill``: output tokens from the state at the end of the prompt (``last`` and ``mean`` of the chosen
  layers, next-token entropy, end-of-turn probability, prompt tokens), as ``rtlm-train-regressor
  regressor.use_prefill=true`` evaluates it;
* ``resid_q``: per probe (the prefill one, ``0``, and each refinement step ``k``), the quantiles at
  :data:`~rtlm_lab.distmetrics.DEFAULT_LEVELS` of its held-out log residuals ``log1p(y) - log1p(prediction)``
  (a group split of the train conversations, the probe refitted on the rest): :meth:`StateProbe.quantiles`
  turns a point prediction into a length *distribution* (a band of constant width in log space, as
  ``ridge_residuals`` in ``rtlm-reference target=distribution``), what ``gittins_lmstate`` ranks by;
* ``refine``: remaining tokens after ``t`` generated tokens, for ``t`` = every ``refine_every``-th step, from the
  decoding step's state (``last`` of the layers and the scalars: a decoding step has no prompt-wide mean) plus
  the repetition features of the tokens so far and the gated loop override (a verbatim repeat of the last
  n-gram means "runs to the cap" where the training loops did).

The slot engine (:class:`~rtlm_lab.scheduler.engine.SlotBackend`) asks the model for its hidden states in the
prefill and in the refinement steps only (``output_hidden_states``: no second pass) and calls
:meth:`StateProbe.prefill_predictions` / :meth:`StateProbe.refine_predictions`; the kv engine gathers the same
features with hooks in its own forward and calls :meth:`StateProbe.prefill_from_features` /
:meth:`StateProbe.refine_from_features`, which both paths end in. Their time is inside the engine step, on the
clock, and reported as the prediction cost.

:func:`fit_state_probe` fits one from a profile with texts (``text``, ``context``, ``n_output_tokens``,
``output_ids``: the reply's first token ids, which the refinement probes teacher-force); :func:`load_state_probe`
is the harness's entry: the committed train profile of the LM, fitted once and cached (joblib) under
``outputs/schedule/probes/``.
"""

from __future__ import annotations

import hashlib
import logging
import math
import time
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import pandas as pd

from rtlm_lab.errors import UserError

log = logging.getLogger("rtlm_lab.scheduler")

PROBE_VERSION = 2  # 2: residual quantiles (StateProbe.resid_q) for the distribution-aware gittins_lmstate


class StateProbe:
    """Prefill and refinement predictors over the served LM's hidden states (see the module doc)."""

    def __init__(self, prefill, refine, refine_every: int, eot_ids: Sequence[int], meta: Mapping[str, Any],
                 resid_q: Mapping[int, Sequence[float]] | None = None, levels: Sequence[float] | None = None):
        from rtlm_lab.distmetrics import DEFAULT_LEVELS

        self.prefill, self.refine = prefill, refine
        self.refine_every = int(refine_every) if refine is not None else 0
        self.layers = tuple(prefill.layers_)
        self.eot_ids = list(eot_ids)
        self.meta = dict(meta)
        self.levels = tuple(float(v) for v in (levels or DEFAULT_LEVELS))
        self.resid_q = {int(k): tuple(float(x) for x in v) for k, v in (resid_q or {}).items()}
        self.cap = int(prefill.max_new_tokens_)

    # ------------------------------------------------------------------ distributions (host, per request)
    def quantiles(self, rem_pred: float, rem_at: int) -> tuple[float, ...]:
        """Quantiles of the request's *total* output length at :attr:`levels`, from the point prediction of the
        tokens still to come after ``rem_at`` generated ones (what :func:`resolve_pending` keeps on the job):
        ``rem_at + expm1(log1p(rem_pred) + r_tau)``, ``r_tau`` the held-out residual quantiles of the probe that
        made the prediction (the prefill one at ``rem_at = 0``, else the refinement probe of the largest step
        <= ``rem_at``; a probe without residuals: a point mass), at least ``rem_at + 1`` and at most the cap."""
        ks = [k for k in self.resid_q if k <= rem_at and (k > 0 or rem_at == 0)]
        r = self.resid_q.get(max(ks)) if ks else self.resid_q.get(0)
        z = math.log1p(max(0.0, float(rem_pred)))
        lo, hi = float(rem_at + 1), float(max(self.cap, rem_at + 1))
        if not r:
            v = min(hi, max(lo, rem_at + float(rem_pred)))
            return tuple(v for _ in self.levels)
        return tuple(min(hi, max(lo, rem_at + math.expm1(z + x))) for x in r)

    # ------------------------------------------------------------------ on the device, without a sync
    # Ridge probes (``probe=ridge``, the lmstate policy's default) are one dot product: computed on the LM's
    # device from the hidden states, the predictions are read at the end of the engine step, where the step
    # synchronises anyway. The numpy path below copies the states to the host mid-step, which stalls the GPU
    # (a large share of engine time with refinement: docs/scheduling.md).
    def on_device(self) -> bool:
        """Whether every probe is a ridge (the device path); decided once (the engine asks every step)."""
        if "_on_device" not in self.__dict__:
            from rtlm_lab.regressor.probes import RidgeProbe

            models = [self.prefill.model_]
            if self.refine is not None:
                models += list(self.refine.refiners_.values()) + list(getattr(self.refine, "refiners_tok_", {}).values())
            self._on_device = all(isinstance(m, RidgeProbe) for m in models)
        return self._on_device

    def prefill_predictions(self, hidden, mask, logits):
        """Predicted output tokens of every row of a (left-padded) prefill batch, from its hidden states: a device
        tensor (ridge) or a numpy array (host path); the engine reads either with ``tolist()`` once the step has
        synchronised."""
        import torch

        ix = torch.arange(mask.shape[0], device=logits.device)
        return self.prefill_from_features(*self._batch_features(hidden, ix, mask, logits,
                                                                "mean" in self.prefill.which))

    def refine_predictions(self, hidden, rows: Sequence[int], mask, logits, tokens: Sequence[Sequence[int]]):
        """Refinement of decoding rows ``rows`` (batch indices) from a batch's hidden states: what
        :meth:`refine_from_features` returns."""
        import torch

        ix = torch.as_tensor(list(rows), device=logits.device)
        last, _, ent, eos, n_tok = self._batch_features(hidden, ix, mask, logits, with_mean=False)
        return self.refine_from_features(last, ent, eos, n_tok, tokens)

    def _w(self, model, dev):
        """``(w, b)`` of a ridge probe, ``w`` a float64 tensor on ``dev`` (cached)."""
        import torch

        cache = self.__dict__.setdefault("_wcache", {})
        key = (id(model), str(dev))
        if key not in cache:
            w, b = model.linear()
            cache[key] = (torch.tensor(w, dtype=torch.float64, device=dev), float(b))  # float64: as numpy
        return cache[key]

    def scalars(self, logits):
        """``(entropy, end-of-turn probability)`` of each row of ``logits`` ``[n, vocab]``, float32 on its device
        (no sync; the kv engine computes them inside its captured decode graph)."""
        import torch

        cache = self.__dict__.setdefault("_eot", {})
        dev = logits.device
        if str(dev) not in cache:
            cache[str(dev)] = torch.tensor(self.eot_ids, dtype=torch.long, device=dev)
        logp = torch.log_softmax(logits.float(), dim=-1)
        ent = (-(logp.exp() * logp).sum(-1)).clamp_min(0)
        eos = logp[:, cache[str(dev)]].exp().sum(-1) if self.eot_ids else torch.zeros_like(ent)
        return ent, eos

    def _zf(self, last, mean, ent, eos, n_tok, which, w):
        """Ridge score from features (per layer ``last`` then ``mean`` ``[n, d]`` tensors, then entropy, log
        end-of-turn probability, log1p tokens), laid out as
        :func:`~rtlm_lab.regressor.lmstate.feature_matrix` does."""
        import torch

        parts = []
        for l in self.layers:
            if "last" in which:
                parts.append(last[l].float())
            if "mean" in which:
                parts.append(mean[l].float())
        parts.append(torch.stack([ent.float(), torch.log(eos.float().clamp(1e-12, 1.0)),
                                  torch.log1p(n_tok.float())], 1))
        X = torch.nan_to_num(torch.cat(parts, 1).double(), nan=0.0, posinf=0.0, neginf=0.0)
        n = X.shape[1]
        return X @ w[0][:n] + w[1], n

    def _batch_features(self, hidden, ix, mask, logits, with_mean: bool):
        """``(last, mean, entropy, end-of-turn probability, tokens)`` of rows ``ix`` of a left-padded batch:
        per layer the state of the token just fed and (``with_mean``) the mean over the mask, as
        :meth:`prefill_from_features` and :meth:`refine_from_features` take them."""
        m = mask.index_select(0, ix)
        last, mean = {}, {}
        for l in self.layers:
            h = hidden[l].index_select(0, ix)
            last[l] = h[:, -1]
            if with_mean:
                mm = m[:, -h.shape[1]:].unsqueeze(-1).to(h.dtype)
                mean[l] = (h * mm).sum(1) / mm.sum(1).clamp_min(1)
        ent, eos = self.scalars(logits.index_select(0, ix))
        return last, mean, ent, eos, m.sum(1)

    def prefill_from_features(self, last, mean, ent, eos, n_tok):
        """Predicted output tokens from features the engine gathered itself (``last``/``mean``: ``{layer: [n,
        d]}`` device tensors, ``ent``/``eos``/``n_tok``: ``[n]``): a device tensor (ridge) or numpy (host)."""
        import torch

        if self.on_device():
            z, _ = self._zf(last, mean, ent, eos, n_tok, self.prefill.which, self._w(self.prefill.model_, ent.device))
            return torch.expm1(z.clamp(-50, 50)).clamp_min(1.0)
        st = self._host_states(last, mean, ent, eos, n_tok)
        return np.maximum(self.prefill.predict_from_states(st), 1.0)

    def refine_from_features(self, last, ent, eos, n_tok, tokens: Sequence[Sequence[int]]):
        """Refinement from features (``last``: ``{layer: [n, d]}``, one row per entry of ``tokens``, the reply
        tokens each row has generated); returns what :meth:`refine_predictions` returns."""
        import torch

        from rtlm_lab.regressor.lmstate import detect_loop, token_features

        if not self.on_device():  # one group: the cap and the loop override are applied by refine_predict
            st = self._host_states(last, {}, ent, eos, n_tok)
            out = np.zeros(len(tokens))
            for ks in _by_step(tokens).values():  # refine_predict takes rows of one step
                out[ks] = self.refine.refine_predict(st.take(np.asarray(ks)), [list(tokens[k]) for k in ks],
                                                     use_loop="gated")
            return [(list(range(len(tokens))), np.maximum(out, 0.0), 0, [False] * len(tokens))]
        R, dev = self.refine, ent.device
        out = []
        for t, ks in _by_step(tokens).items():
            ix = torch.tensor(ks, device=dev)
            sub = {l: last[l].index_select(0, ix) for l in self.layers}
            e, q, n_t = ent.index_select(0, ix), eos.index_select(0, ix), n_tok.index_select(0, ix)
            toks = [list(tokens[k]) for k in ks]
            steps = [s for s in R.refiners_ if s <= t]
            tok_models = getattr(R, "refiners_tok_", {})
            if steps and max(steps) in tok_models:
                kk = max(steps)
                w = self._w(tok_models[kk], dev)
                z, n = self._zf(sub, {}, e, q, n_t, R.which, w)
                tf = torch.tensor(token_features([x[:kk] for x in toks]), dtype=torch.float64).to(dev, non_blocking=True)
                z = z + tf @ w[0][n:]
                pred = torch.expm1(z.clamp(-50, 50)).clamp_min(0)
            elif steps:
                z, _ = self._zf(sub, {}, e, q, n_t, R.which, self._w(R.refiners_[max(steps)], dev))
                pred = torch.expm1(z.clamp(-50, 50)).clamp_min(0)
            else:
                z, _ = self._zf(sub, {}, e, q, n_t, R.which, self._w(R.model_, dev))
                pred = (torch.expm1(z.clamp(-50, 50)).clamp_min(0) - t).clamp_min(0)
            cap_left = max(0, R.max_new_tokens_ - t)
            loop = [detect_loop(x, R.loop_n) for x in toks] if R.loop_trusted(t) else [False] * len(toks)
            out.append((ks, pred.clamp_max(cap_left), cap_left, loop))
        return out

    def _host_states(self, last, mean, ent, eos, n_tok):
        from rtlm_lab.regressor.lmstate import LMStates

        f = lambda t: t.float().cpu().numpy()  # noqa: E731
        return LMStates({l: f(v) for l, v in last.items()}, {l: f(v) for l, v in mean.items()},
                        f(ent).astype(np.float32), f(eos.clamp(0, 1)).astype(np.float32),
                        f(n_tok).astype(np.float32), self.layers)


def resolve_pending(pending: list[tuple]) -> None:
    """Give an engine step's probe results to their jobs, once the step has synchronised (reading a device tensor
    then does not stall): ``("prefill", jobs, predicted tokens)`` sets ``pred_lmstate`` and the remaining
    estimate; ``("refine", jobs, predicted remaining, tokens so far, cap left, loop flags)`` updates the remaining
    estimate (a detected loop: the cap) and records the refinement. Empties ``pending``."""
    for item in pending:
        if item[0] == "prefill":
            for j, p in zip(item[1], item[2].tolist()):
                j.req.pred["pred_lmstate"] = float(p)
                j.rem_pred, j.rem_at = float(p), 0
        else:
            _, jobs, pred, ts, cap_left, loop = item
            for j, p, t, lp in zip(jobs, pred.tolist(), ts, loop):
                r = float(cap_left) if lp else float(p)
                j.rem_pred, j.rem_at = r, t
                j.refines.append((t, r))
    pending.clear()


def _by_step(tokens: Sequence[Sequence[int]]) -> dict[int, list[int]]:
    """Positions of ``tokens`` grouped by how many tokens each has (one refinement probe per step)."""
    out: dict[int, list[int]] = {}
    for k, t in enumerate(tokens):
        out.setdefault(len(t), []).append(k)
    return out


def _reply_prefix(df: pd.DataFrame, k: int) -> list[list[int]]:
    if "output_ids" not in df.columns:
        raise UserError("the LM-state probe's refinement needs the train profile's output_ids "
                        "(rtlm-profile ... profile.output_ids=32)")
    return [[int(t) for t in list(v)[:k]] for v in df["output_ids"]]


def fit_state_probe(lm, train: pd.DataFrame, refine_ks: Sequence[int] = (8, 16), refine_every: int = 8,
                    layers: Sequence[Any] | None = None, probe: str = "auto", seed: int = 0,
                    batch_size: int = 32, cache_sha: str | None = None) -> StateProbe:
    """Fit the prefill and refinement predictors on ``train`` (rows with ``text``, ``n_output_tokens`` and,
    for refinement, ``output_ids``), reading the states with the LM itself (cached by ``cache_sha``)."""
    from rtlm_lab.regressor import lmstate as LS

    layers = tuple(layers or LS.DEFAULT_LAYERS)
    y = train["n_output_tokens"].to_numpy(float)
    from rtlm_lab.regressor.evaluate import conversation_ids

    groups = np.asarray(conversation_ids(train))
    name = lm.name

    def states(step: int, prefix=None):
        if cache_sha:
            return LS.cached_states(lm, train, cache_sha, name, layers, step=step, prefix_ids=prefix,
                                    batch_size=batch_size)
        ctx = train["context"].fillna("").astype(str).tolist() if "context" in train else None
        return LS.extract_states(lm, train["text"].fillna("").astype(str).tolist(), ctx, layers=layers,
                                 batch_size=batch_size, prefix_ids=prefix)

    t0 = time.perf_counter()
    cap = int(lm.spec.get("max_new_tokens", int(y.max())))
    S0 = states(0)
    pre = LS.LMStatePredictor(probe=probe, seed=seed).fit(S0, y, groups=groups, max_new_tokens=cap)
    val = _val_mask(pre, groups)
    resid_q = {0: _resid_quantiles(pre, LS.feature_matrix(S0, pre.which), y, val)}
    ref = None
    ks = sorted({int(k) for k in refine_ks or []})
    if ks and int(refine_every) > 0:
        ref = LS.LMStatePredictor(probe=pre.probe_, which=("last", "scalar"), seed=seed).fit(
            S0, y, groups=groups, max_new_tokens=cap)
        longest = _reply_prefix(train, ks[-1])
        for k in ks:
            prefix = [p[:k] for p in longest]
            Sk = states(k, prefix)
            ref.fit_refine(k, Sk, y, tokens=prefix)
            alive, rem = LS.remaining_targets(y, k)
            if k in getattr(ref, "refiners_tok_", {}):  # the probe the engine uses at step k (with token features)
                Xk = np.hstack([LS.feature_matrix(Sk, ref.which), LS.token_features(prefix)])
                resid_q[k] = _resid_quantiles(ref, Xk, rem, val, alive)
    meta = {"n_train": int(len(train)), "probe": pre.probe_, "val_kendall_tau": pre.val_scores_,
            "refine_ks": ks, "refine_every": int(refine_every), "layers": list(pre.layers_),
            "fit_s": round(time.perf_counter() - t0, 2), "lm": name, "version": PROBE_VERSION}
    log.info("LM-state probe for %s: %s on %d train requests (val tau %s), refinement at %s", name, pre.probe_,
             len(train), {k: round(v, 3) for k, v in pre.val_scores_.items()}, ks)
    from rtlm_lab.regressor.lmstate import end_of_turn_ids

    resid_q = {k: v for k, v in resid_q.items() if v}  # a probe without enough held-out rows: a point mass
    meta["resid_q"] = {int(k): [round(x, 4) for x in v] for k, v in resid_q.items()}
    return StateProbe(pre, ref, refine_every, end_of_turn_ids(lm), meta, resid_q=resid_q)


def _val_mask(pred, groups: np.ndarray) -> np.ndarray:
    """The held-out rows of the train set as a mask: ``pred``'s own validation split by conversation
    (:meth:`~rtlm_lab.regressor.lmstate.LMStatePredictor.val_split`); none with fewer than 4 conversations."""
    m = np.zeros(len(groups), bool)
    if len(set(groups.tolist())) >= 4:
        m[pred.val_split(groups, len(groups))[1]] = True
    return m


def _resid_quantiles(pred, X: np.ndarray, y: np.ndarray, val: np.ndarray, rows: np.ndarray | None = None
                     ) -> tuple[float, ...]:
    """Quantiles at the levels of held-out log residuals ``log1p(y) - log1p(prediction)``: ``pred``'s probe
    kind refitted on the train rows outside ``val`` (of ``rows``), scored on those in it; ``()`` with fewer than
    10 held-out rows (the probe then gives a point mass)."""
    from rtlm_lab.distmetrics import DEFAULT_LEVELS

    rows = np.ones(len(y), bool) if rows is None else np.asarray(rows, bool)
    tr, va = rows & ~val, rows & val
    if va.sum() < 10 or tr.sum() < 10:
        return ()
    m = pred._new(pred.probe_).fit(X[tr], y[tr])
    r = np.log1p(np.clip(y[va], 0, None)) - np.log1p(np.clip(m.predict(X[va]), 0, None))
    return tuple(float(v) for v in np.quantile(r, DEFAULT_LEVELS))


def train_profile_path(lm_name: str, platform: str, given: str | None = None) -> Path:
    """``given``, else the LM's largest committed train profile (either platform's: greedy lengths do not
    depend on the platform, profiles/agreement.csv)."""
    from rtlm_lab.paths import reference_dir

    if given:
        p = Path(str(given)).expanduser()
        if not p.is_file():
            raise UserError(f"policy.train_profile {p} does not exist")
        return p
    import pyarrow.parquet as pq

    base = reference_dir() / "profiles" / "train"
    found = [base / f"{lm_name}__{plat}.parquet" for plat in dict.fromkeys((platform, "cuda", "cpu"))]
    found = [p for p in found if p.is_file()]
    if found:  # the largest (greedy lengths are the same on both platforms); ties: this platform's
        return max(found, key=lambda p: (pq.ParquetFile(p).metadata.num_rows, -found.index(p)))
    raise UserError(f"no train profile for {lm_name} under {base}: make one with `rtlm-profile "
                    f"experiment=lmstate_train lm={lm_name}` or pass policy.train_profile=<parquet>")


def load_state_probe(lm, platform: str, params: Mapping[str, Any]) -> StateProbe:
    """The harness's probe: fitted on the train profile once, cached under ``outputs/schedule/probes/``."""
    import joblib

    from rtlm_lab.io import atomic_path, sha256_file
    from rtlm_lab.paths import outputs_dir
    from rtlm_lab.regressor.lmstate import with_texts

    path = train_profile_path(lm.name, platform, params.get("train_profile"))
    sha = sha256_file(path)
    kw = {"refine_ks": tuple(int(k) for k in (params.get("refine_ks") or (8, 16))),
          "refine_every": int(params.get("refine_every", 8)), "probe": str(params.get("probe", "auto")),
          "seed": int(params.get("probe_seed", 0))}
    n_max = params.get("train_n")
    key = hashlib.sha256(f"{lm.name}|{sha}|{sorted(kw.items())}|{n_max}|{PROBE_VERSION}".encode()).hexdigest()[:12]
    cache = outputs_dir() / "schedule" / "probes" / f"{lm.name}__{key}.joblib"
    if cache.is_file():
        try:
            probe = joblib.load(cache)
            if isinstance(probe, StateProbe):
                log.info("LM-state probe: %s", cache)
                return probe
        except Exception as exc:  # noqa: BLE001 - a torn/foreign cache is refitted
            log.warning("probe cache %s unreadable (%s); fitting again", cache, type(exc).__name__)
    train = pd.read_parquet(path)
    if n_max:
        train = train.iloc[: int(n_max)]
    train = with_texts(train, split="train")
    probe = fit_state_probe(lm, train, cache_sha=sha, **kw)
    probe.meta.update({"train_profile": str(path), "train_profile_sha256": sha})
    cache.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(cache) as tmp:
        joblib.dump(probe, tmp)
    return probe
