"""LM-state features: what the *served* LM itself says about a request's reply length (issue 15).

One forward pass of the served LM over the formatted prompt (:meth:`ChatLM.encode`; encoder-decoders: the
encoder + the first decoder step) with ``output_hidden_states=True`` gives, per request
(:func:`extract_states`, an :class:`LMStates`):

* ``last[l]``: the hidden state at the last real prompt token of layer ``l`` (causal: the last non-pad token
  under left padding, with position ids counted from the first real token so that a padded row equals the
  same request run alone; encoder-decoders: the decoder state at its last real position);
* ``mean[l]``: the mean over the real prompt tokens of layer ``l`` (encoder-decoders: of the encoder);
* ``entropy``: next-token entropy (nats) of the LM's distribution at that position;
* ``eos_prob``: end-of-turn probability: the probability mass of :attr:`ChatLM.eos_ids` plus, for LMs whose
  turn ends at a stop string (Gemma: ``"\\n"``), of every vocabulary token whose text contains one;
* ``n_tokens``: real prompt tokens (prompt + teacher-forced prefix when one is given).

``layers`` is a list of hidden-state indices (0 = embeddings, negative from the end, ``"mid"`` = the middle
block); they are resolved per stack (:func:`resolve_layers`). :func:`feature_matrix` lays the states out as one
row per request (``last`` and ``mean`` of every layer, then ``entropy``, ``eos_prob``, ``log1p(n_tokens)``).

:func:`cached_states` caches them under ``data/cache/lmstate/`` as ``.npz`` keyed by (LM, sha256 of the
profile, layers, teacher-forcing step), written atomically; a cache whose request ids differ is recomputed.

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

Probes are in :mod:`rtlm_lab.regressor.probes`; the comparison table in :mod:`rtlm_lab.regressor.evaluate`
(``rtlm-train-regressor regressor.use_prefill=true``).
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from rtlm_lab.errors import UserError

DEFAULT_LAYERS: tuple = ("mid", -1)
CACHE_VERSION = 1


# ------------------------------------------------------------------------------------------- states
@dataclass
class LMStates:
    """Per-request LM-state features (rows in request order)."""

    last: dict[int, np.ndarray]
    mean: dict[int, np.ndarray]
    entropy: np.ndarray
    eos_prob: np.ndarray
    n_tokens: np.ndarray
    layers: tuple[int, ...] = field(default=())

    def __len__(self) -> int:
        return int(len(self.entropy))

    def take(self, idx) -> "LMStates":
        idx = np.asarray(idx)
        return LMStates({k: v[idx] for k, v in self.last.items()}, {k: v[idx] for k, v in self.mean.items()},
                        self.entropy[idx], self.eos_prob[idx], self.n_tokens[idx], self.layers)

    @staticmethod
    def concat(parts: Sequence["LMStates"]) -> "LMStates":
        parts = [p for p in parts if p is not None]
        first = parts[0]
        return LMStates({k: np.concatenate([p.last[k] for p in parts]) for k in first.last},
                        {k: np.concatenate([p.mean[k] for p in parts]) for k in first.mean},
                        np.concatenate([p.entropy for p in parts]), np.concatenate([p.eos_prob for p in parts]),
                        np.concatenate([p.n_tokens for p in parts]), first.layers)

    def to_arrays(self) -> dict[str, np.ndarray]:
        out = {"entropy": self.entropy, "eos_prob": self.eos_prob, "n_tokens": self.n_tokens,
               "layers": np.asarray(self.layers, dtype=int)}
        for k, v in self.last.items():
            out[f"last_{k}"] = v
        for k, v in self.mean.items():
            out[f"mean_{k}"] = v
        return out

    @staticmethod
    def from_arrays(a: Mapping[str, np.ndarray]) -> "LMStates":
        layers = tuple(int(x) for x in np.asarray(a["layers"]).ravel())
        last = {int(k[5:]): np.asarray(a[k]) for k in a if k.startswith("last_")}
        mean = {int(k[5:]): np.asarray(a[k]) for k in a if k.startswith("mean_")}
        return LMStates(last, mean, np.asarray(a["entropy"]), np.asarray(a["eos_prob"]), np.asarray(a["n_tokens"]),
                        layers)


def resolve_layers(layers: Sequence[Any], n_hidden: int) -> list[int]:
    """Hidden-state indices (``n_hidden`` = embeddings + blocks) from ints / ``"mid"``; sorted, unique."""
    out = []
    for spec in layers or DEFAULT_LAYERS:
        if isinstance(spec, str):
            if spec not in ("mid", "last", "first"):
                raise UserError(f"unknown layer {spec!r}: use an int, 'mid', 'first' or 'last'")
            i = {"mid": n_hidden // 2, "last": n_hidden - 1, "first": 1}[spec]
        else:
            i = int(spec)
            i = i + n_hidden if i < 0 else i
        if not 0 <= i < n_hidden:
            raise UserError(f"layer {spec!r} out of range for a model with {n_hidden - 1} blocks")
        out.append(i)
    return sorted(set(out))


def stop_token_ids(lm) -> list[int]:
    """Vocabulary ids whose decoded text contains one of the LM's stop strings (cached on ``lm``)."""
    stops = [s for s in (lm.spec.get("stop_strings") or []) if s]
    if not stops:
        return []
    cached = getattr(lm, "_lmstate_stop_ids", None)
    if cached is not None:
        return cached
    tok = lm.tokenizer
    n = len(tok)
    texts = tok.batch_decode([[i] for i in range(n)], skip_special_tokens=True)
    ids = [i for i, t in enumerate(texts) if any(s in t for s in stops)]
    lm._lmstate_stop_ids = ids
    return ids


def end_of_turn_ids(lm) -> list[int]:
    return sorted(set(int(i) for i in lm.eos_ids) | set(stop_token_ids(lm)))


def _rows(enc) -> list[list[int]]:
    ids, mask = enc["input_ids"].tolist(), enc["attention_mask"].tolist()
    return [[t for t, m in zip(r, mr) if m] for r, mr in zip(ids, mask)]


def _uncertainty(logits, eot_ids: Sequence[int]):
    import torch

    logp = torch.log_softmax(logits.float(), dim=-1)
    p = logp.exp()
    ent = -(p * logp).sum(-1)
    eot = p[:, list(eot_ids)].sum(-1) if len(eot_ids) else torch.zeros_like(ent)
    return ent.clamp_min(0).cpu().numpy(), eot.clamp(0, 1).cpu().numpy()


def extract_states(lm, texts: Sequence[Any], contexts: Sequence[Any] | None = None,
                   layers: Sequence[Any] = DEFAULT_LAYERS, batch_size: int = 16,
                   prefix_ids: Sequence[Sequence[int]] | None = None, max_new_tokens: int | None = None) -> LMStates:
    """One forward pass per batch over the formatted prompts (+ ``prefix_ids``: reply tokens to teacher-force);
    see the module doc. Works on the LM's device (cpu or cuda); features come back as float32 numpy."""
    import inspect

    import torch
    from tqdm.auto import tqdm

    texts = list(texts)
    n = len(texts)
    contexts = list(contexts) if contexts is not None else [""] * n
    prefix_ids = [list(p) for p in prefix_ids] if prefix_ids is not None else [[] for _ in range(n)]
    max_new = int(max_new_tokens or lm.spec.get("max_new_tokens", 64))
    model, dev = lm.model, lm.device
    eot = end_of_turn_ids(lm)
    pad = lm.tokenizer.pad_token_id if lm.tokenizer.pad_token_id is not None else 0
    cfg = model.config
    parts: list[LMStates] = []
    resolved: list[int] | None = None
    keep_last = not lm.is_encoder_decoder and "logits_to_keep" in inspect.signature(model.forward).parameters

    step = max(1, int(batch_size))
    desc = f"{getattr(lm, 'name', 'LM')} states" + (f" (+{max(map(len, prefix_ids))} reply tokens)" if any(prefix_ids) else "")
    # a bar only where it is long work (5,000 train turns take minutes on the CPU); short calls stay quiet
    bar = tqdm(total=n, desc=desc, unit="req", disable=n < 20 * step, mininterval=5.0)
    with torch.inference_mode(), bar:
        for s in range(0, n, step):
            enc = lm.encode(texts[s:s + batch_size], contexts[s:s + batch_size], max_new)
            rows = _rows(enc)
            pre = prefix_ids[s:s + batch_size]
            b = len(rows)
            if lm.is_encoder_decoder:
                ids = enc["input_ids"].to(dev)
                am = enc["attention_mask"].to(dev)
                start = int(cfg.decoder_start_token_id if cfg.decoder_start_token_id is not None else pad)
                dec = [[start] + p for p in pre]
                L = max(len(d) for d in dec)
                dids = torch.full((b, L), pad, dtype=torch.long)
                dam = torch.zeros((b, L), dtype=torch.long)
                for i, d in enumerate(dec):  # right padding: causal attention never lets a real step see a pad
                    dids[i, :len(d)] = torch.tensor(d)
                    dam[i, :len(d)] = 1
                out = model(input_ids=ids, attention_mask=am, decoder_input_ids=dids.to(dev),
                            decoder_attention_mask=dam.to(dev), output_hidden_states=True, use_cache=False)
                last_pos = logit_pos = dam.sum(1).to(dev) - 1
                dec_h, enc_h = out.decoder_hidden_states, out.encoder_hidden_states
                mean_mask = am
                n_tok = (am.sum(1).cpu() + dam.sum(1) - 1).numpy()  # am is on the LM's device, dam on the host
            else:
                seqs = [r + p for r, p in zip(rows, pre)]
                L = max(len(q) for q in seqs)
                ids = torch.full((b, L), pad, dtype=torch.long)
                am = torch.zeros((b, L), dtype=torch.long)
                for i, q in enumerate(seqs):  # left padding, as generate sees it
                    ids[i, L - len(q):] = torch.tensor(q, dtype=torch.long)
                    am[i, L - len(q):] = 1
                pos = (am.cumsum(1) - 1).clamp_min(0)
                ids, am, pos = ids.to(dev), am.to(dev), pos.to(dev)
                # left padding puts every row's last token at L - 1: only that position's logits are read, so
                # the LM head runs for it alone (Gemma-3's 262k-word head costs more than the rest of the model)
                kw = {"logits_to_keep": 1} if keep_last else {}
                out = model(input_ids=ids, attention_mask=am, position_ids=pos, output_hidden_states=True,
                            use_cache=False, **kw)
                last_pos = torch.full((b,), L - 1, dtype=torch.long, device=dev)
                logit_pos = torch.full((b,), out.logits.shape[1] - 1, dtype=torch.long, device=dev)
                dec_h = enc_h = out.hidden_states
                mean_mask = am
                n_tok = am.sum(1).cpu().numpy()
            if resolved is None:
                resolved = resolve_layers(layers, len(dec_h))
                enc_layers = resolve_layers(layers, len(enc_h))
            ar = torch.arange(b, device=dev)
            logits = out.logits[ar, logit_pos]
            ent, eos = _uncertainty(logits, eot)
            mm = mean_mask.unsqueeze(-1).to(enc_h[0].dtype)
            last = {l: dec_h[l][ar, last_pos].float().cpu().numpy() for l in resolved}
            mean = {l: ((enc_h[el] * mm).sum(1) / mm.sum(1).clamp_min(1)).float().cpu().numpy()
                    for l, el in zip(resolved, enc_layers)}
            parts.append(LMStates(last, mean, ent.astype(np.float32), eos.astype(np.float32),
                                  np.asarray(n_tok, dtype=np.float32), tuple(resolved)))
            bar.update(b)
    if not parts:
        raise UserError("extract_states needs at least one request")
    return LMStates.concat(parts)


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


# -------------------------------------------------------------------------------------------- cache
def _hash_ids(ids: Sequence[str]) -> str:
    return hashlib.sha256("\n".join(map(str, ids)).encode()).hexdigest()[:16]


def cache_path(lm_name: str, profile_sha: str, layers: Sequence[Any], step: int = 0) -> Path:
    from rtlm_lab.paths import data_dir

    tag = "-".join(str(x) for x in layers)
    return data_dir() / "cache" / "lmstate" / f"{lm_name}__{profile_sha[:16]}__L{tag}__k{int(step)}.npz"


def cached_states(lm_or_loader, df, profile_sha: str, lm_name: str, layers: Sequence[Any] = DEFAULT_LAYERS,
                  step: int = 0, prefix_ids: Sequence[Sequence[int]] | None = None, batch_size: int = 16) -> LMStates:
    """:func:`extract_states` for the rows of a profile, cached (npz, atomic) per (LM, profile sha, layers, step).

    ``lm_or_loader``: a :class:`ChatLM` or a zero-argument callable returning one (only called on a miss).
    """
    from rtlm_lab.io import atomic_path

    path = cache_path(lm_name, profile_sha, layers, step)
    ids = df["request_id"].astype(str).tolist() if "request_id" in df else [str(i) for i in range(len(df))]
    key = _hash_ids(ids)
    if path.is_file():
        try:
            with np.load(path, allow_pickle=False) as z:
                if str(z["ids_hash"]) == key and int(z["version"]) == CACHE_VERSION:
                    return LMStates.from_arrays({k: z[k] for k in z.files if k not in ("ids_hash", "version")})
        except Exception:  # noqa: BLE001 - a torn/foreign cache is recomputed
            pass
    lm = lm_or_loader if hasattr(lm_or_loader, "encode") else lm_or_loader()
    ctx = df["context"].fillna("").astype(str).tolist() if "context" in df else None
    st = extract_states(lm, df["text"].fillna("").astype(str).tolist(), ctx, layers=layers, batch_size=batch_size,
                        prefix_ids=prefix_ids)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as fh:
            np.savez(fh, ids_hash=np.array(key), version=np.array(CACHE_VERSION), **st.to_arrays())
    return st


def reply_prefix_ids(lm, df, k: int, batch_size: int = 16, profile_sha: str | None = None,
                     lm_name: str | None = None) -> list[list[int]]:
    """The reply's first ``k`` token ids per row: the profile's ``output_ids`` column when present, else a
    greedy ``generate`` of ``k`` tokens (the same tokens under greedy decoding), cached like the states."""
    if "output_ids" in df.columns and df["output_ids"].notna().all() and \
            all(len(v) >= min(k, int(n)) for v, n in zip(df["output_ids"], df["n_output_tokens"])):
        return [[int(t) for t in list(v)[:k]] for v in df["output_ids"]]
    path = None
    if profile_sha and lm_name:
        path = cache_path(lm_name, profile_sha, ["ids"], k).with_suffix(".json")
        ids_key = _hash_ids(df["request_id"].astype(str).tolist())
        if path.is_file():
            try:
                obj = json.loads(path.read_text())
                if obj.get("ids_hash") == ids_key:
                    return obj["prefix"]
            except (OSError, ValueError):
                pass
    lm = lm if hasattr(lm, "encode") else lm()
    texts = df["text"].fillna("").astype(str).tolist()
    ctx = df["context"].fillna("").astype(str).tolist() if "context" in df else None
    out: list[list[int]] = []
    for s in range(0, len(texts), batch_size):
        gens = lm.generate(texts[s:s + batch_size], None if ctx is None else ctx[s:s + batch_size], max_new_tokens=k)
        out += [[int(t) for t in g.output_ids[:k]] for g in gens]
    if path is not None:
        from rtlm_lab.io import write_json_atomic

        path.parent.mkdir(parents=True, exist_ok=True)
        write_json_atomic(path, {"ids_hash": ids_key, "prefix": out})
    return out


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

    def _select(self, X, y, groups):
        from rtlm_lab.regressor.evaluate import _kendall

        from sklearn.model_selection import GroupShuffleSplit

        groups = np.arange(len(y)) if groups is None else np.asarray(groups)
        tr, va = next(GroupShuffleSplit(1, test_size=self.val_size, random_state=self.seed)
                      .split(X, y, groups=groups))
        scores = {}
        for name in self.candidates:
            p = self._new(name).fit(X[tr], y[tr])
            scores[name] = _kendall(p.predict(X[va]), y[va])
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
    DataFrame of :func:`rtlm_lab.regressor.evaluate.score` rows with ``method`` and ``k``."""
    import pandas as pd

    from rtlm_lab.regressor.evaluate import score

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
