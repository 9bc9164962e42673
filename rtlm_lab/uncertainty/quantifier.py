"""Batch quantification of linguistic input uncertainty (RT-LM, RTSS 2023, Sec. "uncertainty").

``quantify(texts)`` returns one row per text with the six type scores, their weighted mean ``total``
and the spaCy token count. Scores are ``1 - exp(-K[type] * strength)`` where ``strength`` is the
evidence strength computed in :mod:`rtlm_lab.uncertainty.scorers`.

Robustness contract: never raises on any input. ``None`` becomes ``""``, non-strings go through
``str()``, control characters become spaces, and every text is truncated to :data:`MAX_CHARS`
characters (then at most :data:`MAX_TOKENS` spaCy tokens are scored) before parsing, so a pasted
essay or 100k characters of junk costs the same as a long prompt. Any per-text failure yields zeros.

spaCy ``en_core_web_sm`` is loaded once per process with ``ner`` and ``lemmatizer`` disabled (lemmas
come from our WordNet morphy, :mod:`.wordnet`); WordNet tables are parsed once and cached.
"""

from __future__ import annotations

import functools
import logging
import math
import re
from typing import Any, Sequence

import numpy as np
import pandas as pd

from rtlm_lab.uncertainty import scorers

log = logging.getLogger(__name__)

UNCERTAINTY_TYPES = ("structural", "syntactic", "semantic", "vagueness", "open_endedness", "multi_part")
COLUMNS = (*UNCERTAINTY_TYPES, "total", "n_tokens")

# Texts longer than this are cut before parsing (10k characters ~ 2,000+ tokens; CCC turns are < 600).
MAX_CHARS = 10_000
# At most this many tokens are scored (a cheap bound; MAX_CHARS already implies it in practice).
MAX_TOKENS = 2_000

# Saturation rate per type: score = 1 - exp(-K * strength). Chosen so that one clear cue
# (strength ~1) lands at ~0.5-0.65 and two or more cues approach 1.
K = {"structural": 1.0, "syntactic": 0.9, "semantic": 0.5, "vagueness": 0.9, "open_endedness": 0.8,
     "multi_part": 1.1}

# Weights of the aggregate ``total`` (weighted mean of the six scores). RT-LM argues that the types
# which lengthen answers most are open-ended and multi-part requests (they demand more content), then
# vagueness and semantic ambiguity (the model hedges or covers several readings), then the parse-level
# ambiguities, which LMs mostly resolve silently. Weights sum to 1.
TOTAL_WEIGHTS = {"structural": 0.10, "syntactic": 0.10, "semantic": 0.15, "vagueness": 0.15,
                 "open_endedness": 0.25, "multi_part": 0.25}

# Decision thresholds (score >= threshold -> "uncertain of this type"). Fixed at 0.5 for every type: the
# rates K above put "one clear cue" just past 0.5. Checked (not fitted) against
# tests/data/uncertainty_validation.csv by tests/test_uncertainty.py.
THRESHOLDS = {"structural": 0.5, "syntactic": 0.5, "semantic": 0.5, "vagueness": 0.5,
              "open_endedness": 0.5, "multi_part": 0.5}

_CTRL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f\ufffe\uffff]")


@functools.lru_cache(maxsize=1)
def _nlp():
    from rtlm_lab.data.assets import load_spacy

    nlp = load_spacy(disable=("ner", "lemmatizer"))
    nlp.max_length = max(nlp.max_length, MAX_CHARS * 2)
    return nlp


def _clean(text: Any) -> str:
    if text is None:
        return ""
    if isinstance(text, float) and math.isnan(text):
        return ""
    if not isinstance(text, str):
        try:
            text = str(text)
        except Exception:  # noqa: BLE001 - a hostile __str__ is just empty input
            return ""
    text = text[:MAX_CHARS]
    text = _CTRL.sub(" ", text)
    # lone surrogates cannot be encoded and upset some tokenizer paths
    text = text.encode("utf-8", "replace").decode("utf-8", "replace")
    return text


def _score_doc(doc, text: str) -> tuple[dict[str, float], dict[str, list[str]]]:
    low = text.lower()
    if len(doc) > MAX_TOKENS:
        doc = doc[:MAX_TOKENS].as_doc()
        low = doc.text.lower()
    toks = list(doc)  # spaCy Token objects are costly to create: build them once per doc
    units = scorers._clause_units(doc, toks)
    raw = {
        "structural": scorers.structural(doc, toks),
        "syntactic": scorers.syntactic(doc, toks),
        "semantic": scorers.semantic(doc, toks),
        "vagueness": scorers.vagueness(doc, low),
        "open_endedness": scorers.open_endedness(doc, low, units),
        "multi_part": scorers.multi_part(doc, doc.text, units),
    }
    scores, evidence = {}, {}
    for k, (s, ev) in raw.items():
        s = float(s) if math.isfinite(s) and s > 0 else 0.0
        scores[k] = float(1.0 - math.exp(-K[k] * s))
        evidence[k] = list(ev)
    return scores, evidence


def _total(scores: dict[str, float]) -> float:
    return float(sum(TOTAL_WEIGHTS[k] * scores[k] for k in UNCERTAINTY_TYPES) / sum(TOTAL_WEIGHTS.values()))


def _safe_score(doc, text):
    try:
        return _score_doc(doc, text)
    except Exception:  # noqa: BLE001 - contract: never raise on a text
        log.warning("uncertainty scoring failed on a text of %d chars; scoring it 0", len(text), exc_info=True)
        return {k: 0.0 for k in UNCERTAINTY_TYPES}, {k: [] for k in UNCERTAINTY_TYPES}


def _docs(texts: list[str], batch_size: int, n_process: int):
    nlp = _nlp()
    try:
        return list(nlp.pipe(texts, batch_size=max(1, int(batch_size)), n_process=max(1, int(n_process))))
    except Exception:  # noqa: BLE001 - fall back to one text at a time, blank doc on failure
        out = []
        for t in texts:
            try:
                out.append(nlp(t))
            except Exception:  # noqa: BLE001
                out.append(nlp.make_doc(""))
        return out


def quantify(texts: Sequence[str], batch_size: int = 256, n_process: int = 1) -> pd.DataFrame:
    """Score every text; one row per input (in order) with columns :data:`COLUMNS`."""
    if texts is None:
        texts = []
    elif isinstance(texts, str):
        texts = [texts]
    clean = [_clean(t) for t in list(texts)]
    rows = []
    if clean:
        for doc, text in zip(_docs(clean, batch_size, n_process), clean):
            scores, _ = _safe_score(doc, text)
            scores["total"] = _total(scores)
            scores["n_tokens"] = int(len(doc))
            rows.append(scores)
    df = pd.DataFrame(rows, columns=list(COLUMNS))
    for k in (*UNCERTAINTY_TYPES, "total"):
        df[k] = np.clip(np.nan_to_num(df[k].astype(float), nan=0.0, posinf=1.0, neginf=0.0), 0.0, 1.0)
    df["n_tokens"] = df["n_tokens"].astype(int)
    return df


def explain(text: str) -> dict[str, dict]:
    """Per type: ``{"score": float, "evidence": [spans]}`` plus ``total``'s score."""
    text = _clean(text)
    doc = _docs([text], 1, 1)[0]
    scores, evidence = _safe_score(doc, text)
    out = {k: {"score": scores[k], "evidence": evidence[k]} for k in UNCERTAINTY_TYPES}
    out["total"] = {"score": _total(scores), "evidence": []}
    return out
