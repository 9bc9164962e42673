"""Baselines for output-length prediction, all fit on ``log1p(length)`` like :class:`LengthPredictor`.

* ``constant``: the training mean length (ranks nothing: Kendall tau is NaN);
* ``input_length``: ridge on ``log1p(words)`` and ``log1p(chars)`` of the request;
* ``proxy_minilm``: ridge on the all-MiniLM-L6-v2 embedding, the BERT-class proxy model of SSJF / S3;
* ``ltr_minilm``: pairwise learning-to-rank on the embedding, as vLLM-LTR: a logistic regression on
  embedding differences ``e_i - e_j`` of sampled pairs with different lengths (label: ``y_i > y_j``,
  no intercept, both orientations) gives a linear score ``e . w``; it ranks, it does not predict tokens
  (MAE NaN).

Each baseline exposes ``fit(texts, y, E=None)`` / ``predict(texts, E=None)`` where ``E`` is a precomputed
embedding matrix (the comparison embeds every text once).
"""

from __future__ import annotations


import numpy as np

from rtlm_lab.regressor import features as F


class Constant:
    rank_only = False

    def fit(self, texts, y, E=None):
        self.mean_ = float(np.mean(y))
        return self

    def predict(self, texts, E=None):
        return np.full(len(texts), self.mean_)


class InputLength:
    rank_only = False

    @staticmethod
    def _x(texts):
        texts = F._as_texts(texts)
        return np.column_stack([np.log1p(F.n_words(texts)), np.log1p([float(len(t)) for t in texts])]) \
            if texts else np.zeros((0, 2))

    def fit(self, texts, y, E=None):
        from sklearn.linear_model import Ridge

        self.model_ = Ridge(alpha=1.0).fit(self._x(texts), np.log1p(np.asarray(y, float)))
        return self

    def predict(self, texts, E=None):
        return np.clip(np.expm1(self.model_.predict(self._x(texts))), 0, None)


class ProxyMiniLM:
    rank_only = False

    def __init__(self, alpha: float = 1.0):
        self.alpha = alpha

    def fit(self, texts, y, E=None):
        from sklearn.linear_model import Ridge

        E = F.embed(texts) if E is None else E
        self.model_ = Ridge(alpha=self.alpha).fit(E, np.log1p(np.asarray(y, float)))
        return self

    def predict(self, texts, E=None):
        E = F.embed(texts) if E is None else E
        return np.clip(np.expm1(self.model_.predict(E)), 0, None)


class LtrMiniLM:
    rank_only = True

    def __init__(self, pairs_per_item: int = 20, C: float = 1.0, seed: int = 0):
        self.pairs_per_item, self.C, self.seed = pairs_per_item, C, seed

    def fit(self, texts, y, E=None):
        from sklearn.linear_model import LogisticRegression

        E = F.embed(texts) if E is None else E
        y = np.asarray(y, float)
        rng = np.random.default_rng(self.seed)
        n = len(y)
        m = max(1, self.pairs_per_item * n)
        i, j = rng.integers(0, n, m), rng.integers(0, n, m)
        keep = y[i] != y[j]
        i, j = i[keep], j[keep]
        if len(i) == 0:  # all lengths equal: nothing to rank
            self.w_ = np.zeros(E.shape[1])
            return self
        D = np.vstack([E[i] - E[j], E[j] - E[i]])
        lab = np.concatenate([y[i] > y[j], y[j] > y[i]]).astype(int)
        clf = LogisticRegression(C=self.C, fit_intercept=False, max_iter=1000).fit(D, lab)
        self.w_ = clf.coef_.ravel()
        return self

    def predict(self, texts, E=None):
        E = F.embed(texts) if E is None else E
        return np.asarray(E, float) @ self.w_


def make_baselines(seed: int = 0) -> dict[str, object]:
    return {"constant": Constant(), "input_length": InputLength(), "proxy_minilm": ProxyMiniLM(),
            "ltr_minilm": LtrMiniLM(seed=seed)}


EMBEDDING_METHODS = ("proxy_minilm", "ltr_minilm")
RANK_ONLY = ("ltr_minilm",)
