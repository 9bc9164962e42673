"""Fast, read-only WordNet 3.0 look-ups for the uncertainty scorers.

We read the WordNet dict files ourselves instead of going through NLTK's reader: the scorers only need
(a) how many synsets a lemma has per part of speech and (b) how the SemCor sense-tag counts
(``cntlist.rev``) are spread over those synsets. Parsing the four ``index.<pos>`` files and
``cntlist.rev`` once takes well under a second; every look-up afterwards is a dict hit behind
:func:`functools.lru_cache`.

Parts of speech use WordNet's letters: ``n`` noun, ``v`` verb, ``a`` adjective (satellites ``s`` are
folded into ``a``), ``r`` adverb.

Lemmatisation is a small re-implementation of WordNet's *morphy*: the exception lists
(``<pos>.exc``) first, then the classic suffix-detachment rules, keeping the first candidate that the
index knows. This is what lets us drop spaCy's lemmatizer component from the pipeline.
"""

from __future__ import annotations

import functools
import math
from collections import defaultdict

from rtlm_lab.data.assets import wordnet_dir

POS_FILES = {"n": "noun", "v": "verb", "a": "adj", "r": "adv"}
_SS_TYPE = {"1": "n", "2": "v", "3": "a", "4": "r", "5": "a"}

# WordNet's morphy detachment rules (suffix, replacement) per part of speech.
_RULES = {
    "n": [("s", ""), ("ses", "s"), ("xes", "x"), ("zes", "z"), ("ches", "ch"), ("shes", "sh"),
          ("men", "man"), ("ies", "y")],
    "v": [("s", ""), ("ies", "y"), ("es", "e"), ("es", ""), ("ed", "e"), ("ed", ""), ("ing", "e"),
          ("ing", "")],
    "a": [("er", ""), ("est", ""), ("er", "e"), ("est", "e")],
    "r": [],
}

# Additive smoothing for SemCor sense counts: senses never tagged in SemCor still get some mass.
SENSE_SMOOTHING = 0.5


@functools.lru_cache(maxsize=1)
def _tables():
    """Parse index files, exception lists and cntlist.rev (once per process)."""
    d = wordnet_dir()
    index: dict[str, dict[str, int]] = defaultdict(dict)
    for pos, name in POS_FILES.items():
        with open(d / f"index.{name}", encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.startswith(" "):
                    continue  # licence header
                parts = line.split()
                if len(parts) < 4:
                    continue
                try:
                    index[parts[0]][pos] = int(parts[2])
                except ValueError:
                    continue
    exc: dict[str, dict[str, str]] = {p: {} for p in POS_FILES}
    for pos, name in POS_FILES.items():
        path = d / f"{name}.exc"
        if path.exists():
            with open(path, encoding="utf-8", errors="replace") as f:
                for line in f:
                    parts = line.split()
                    if len(parts) >= 2:
                        exc[pos].setdefault(parts[0], parts[1])
    counts: dict[tuple[str, str], dict[int, int]] = defaultdict(dict)
    cnt = d / "cntlist.rev"
    if cnt.exists():
        with open(cnt, encoding="utf-8", errors="replace") as f:
            for line in f:
                parts = line.split()
                if len(parts) != 3 or "%" not in parts[0]:
                    continue
                lemma, rest = parts[0].split("%", 1)
                pos = _SS_TYPE.get(rest[:1])
                if pos is None:
                    continue
                try:
                    counts[(lemma, pos)][int(parts[1])] = int(parts[2])
                except ValueError:
                    continue
    return dict(index), exc, dict(counts)


@functools.lru_cache(maxsize=200_000)
def lemmatize(word: str, pos: str) -> str | None:
    """WordNet lemma of ``word`` (lower-case) for ``pos``, or None when WordNet does not know it."""
    index, exc, _ = _tables()
    w = word.lower().replace(" ", "_")
    if pos in exc and w in exc[pos] and pos in index.get(exc[pos][w], {}):
        return exc[pos][w]
    if pos in index.get(w, {}):
        return w
    for suffix, repl in _RULES.get(pos, ()):
        if w.endswith(suffix) and len(w) > len(suffix):
            cand = w[: len(w) - len(suffix)] + repl
            if pos in index.get(cand, {}):
                return cand
    return None


@functools.lru_cache(maxsize=200_000)
def pos_counts(word: str) -> dict[str, int]:
    """{pos: number of synsets} for every POS under which ``word`` (any inflection) is in WordNet."""
    index, _, _ = _tables()
    out = {}
    for pos in POS_FILES:
        lem = lemmatize(word, pos)
        if lem is not None:
            out[pos] = index[lem][pos]
    return out


@functools.lru_cache(maxsize=200_000)
def n_synsets(word: str, pos: str) -> int:
    lem = lemmatize(word, pos)
    if lem is None:
        return 0
    return _tables()[0][lem][pos]


@functools.lru_cache(maxsize=200_000)
def sense_perplexity(word: str, pos: str) -> float:
    """Effective number of senses, 2**H, of ``word`` as ``pos``.

    H is the entropy of the smoothed SemCor sense distribution p_i = (c_i + a) / (sum c + a*n), with
    n the number of synsets and a = :data:`SENSE_SMOOTHING`. A word with one dominant sense
    ("minute", "man") gets a perplexity near 1-2 even when WordNet lists many senses; a word whose
    senses are balanced ("bank", "bat") stays high. 0 when unknown.
    """
    lem = lemmatize(word, pos)
    if lem is None:
        return 0.0
    index, _, counts = _tables()
    n = index[lem][pos]
    if n <= 1:
        return 1.0
    c = counts.get((lem, pos), {})
    vals = [c.get(i, 0) + SENSE_SMOOTHING for i in range(1, n + 1)]
    tot = sum(vals)
    h = -sum((v / tot) * math.log2(v / tot) for v in vals)
    return float(2.0 ** h)
