"""The served LM's own prefill states: hidden states, next-token entropy and end-of-turn probability.

One forward pass of the LM over the formatted prompt (:meth:`ChatLM.encode`; encoder-decoders: the encoder +
the first decoder step) with ``output_hidden_states=True`` gives, per request (:func:`extract_states`, an
:class:`LMStates`):

* ``last[l]``: the hidden state at the last real prompt token of layer ``l`` (causal: the last non-pad token
  under left padding, with position ids counted from the first real token so that a padded row equals the
  same request run alone; encoder-decoders: the decoder state at its last real position);
* ``mean[l]``: the mean over the real prompt tokens of layer ``l`` (encoder-decoders: of the encoder);
* ``entropy``: next-token entropy (nats) of the LM's distribution at that position;
* ``eos_prob``: end-of-turn probability: the probability mass of :attr:`ChatLM.eos_ids` plus, for LMs whose
  turn ends at a stop string (Gemma: ``"\\n"``), of every vocabulary token whose text contains one;
* ``n_tokens``: real prompt tokens (prompt + teacher-forced prefix when one is given).

``layers`` is a list of hidden-state indices (0 = embeddings, negative from the end, ``"mid"`` = the middle
block); they are resolved per stack (:func:`resolve_layers`).

:func:`cached_states` caches them under ``data/cache/lmstate/`` as ``.npz`` keyed by (LM, sha256 of the
profile, layers, teacher-forcing step), written atomically; a cache whose request ids differ is recomputed.
:func:`reply_prefix_ids` gives the reply's first ``k`` tokens to teacher-force (the profile's ``output_ids``, or
a short greedy ``generate``), cached the same way.

This module is the LM side only: the probes and predictors over these states (and the re-exports of the names
above that older code imports from there) are in :mod:`rtlm_lab.regressor.lmstate`; the model-side
uncertainty analysis in :mod:`rtlm_lab.uncertainty.modelside`.
"""

from __future__ import annotations

import hashlib
import json
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
