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


class FinetunedMiniLM:
    """all-MiniLM-L6-v2 fine-tuned end to end on the training lengths: the strong proxy baseline.

    SSJF (arXiv 2404.08509) fine-tunes BERT-base as a length regressor; vLLM-LTR (arXiv 2408.15792) fine-tunes
    OPT-125M with a ranking loss. Both objectives on the same small encoder (the frozen-embedding
    ``proxy_minilm`` / ``ltr_minilm`` read the same model without training it):

    * ``objective="regression"``: MSE on the standardised ``log1p(length)``; predicts tokens;
    * ``objective="rank"``: pairwise logistic loss over every pair of a batch with different lengths
      (RankNet; vLLM-LTR trains a listwise loss over the same batches); it ranks, it does not predict tokens.

    The model is transformers' ``AutoModelForSequenceClassification`` with one output on the MiniLM encoder
    (BERT's pooler + a linear head, the standard fine-tuning head). The loop is ours (a dozen lines: AdamW with
    warm-up and linear decay, seeded shuffles) because ``Trainer`` would add evaluation, logging and checkpoint
    machinery this baseline does not use. ``device=None`` picks CUDA when available, else the CPU.
    """

    def __init__(self, objective: str = "regression", epochs: int = 3, batch_size: int = 32, lr: float = 5e-5,
                 max_length: int = 64, seed: int = 0, device: str | None = None):
        if objective not in ("regression", "rank"):
            from rtlm_lab.errors import UserError

            raise UserError(f"finetuned MiniLM objective must be regression or rank, not {objective!r}")
        self.objective, self.epochs, self.batch_size, self.lr = objective, epochs, batch_size, lr
        self.max_length, self.seed, self.device = max_length, seed, device

    @property
    def rank_only(self) -> bool:
        return self.objective == "rank"

    def _device(self):
        import torch

        return torch.device(self.device or ("cuda" if torch.cuda.is_available() else "cpu"))

    @staticmethod
    def _texts(texts) -> list[str]:
        return [t[:F.EMBED_MAX_CHARS] for t in F._as_texts(texts)]

    def _batch(self, texts: list[str]):
        enc = self.tokenizer_(texts, padding=True, truncation=True, max_length=self.max_length, return_tensors="pt")
        return {k: v.to(self.device_) for k, v in enc.items()}

    def fit(self, texts, y, E=None):
        import torch
        from transformers import AutoModelForSequenceClassification, AutoTokenizer, get_linear_schedule_with_warmup
        from transformers.utils import logging as hf_logging

        path = F.embedder_path()
        torch.manual_seed(self.seed)
        self.device_ = self._device()
        self.tokenizer_ = AutoTokenizer.from_pretrained(path)
        verbosity = hf_logging.get_verbosity()
        hf_logging.set_verbosity_error()  # the new head's "newly initialized" report is expected here
        try:
            model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=1).to(self.device_)
        finally:
            hf_logging.set_verbosity(verbosity)
        texts = self._texts(texts)
        t = np.log1p(np.asarray(y, float))
        self.mu_, self.sd_ = float(t.mean()), float(t.std() or 1.0)
        target = torch.tensor((t - self.mu_) / self.sd_, dtype=torch.float32, device=self.device_)
        n, bs = len(texts), max(2, int(self.batch_size))
        steps = max(1, self.epochs * -(-n // bs))
        opt = torch.optim.AdamW(model.parameters(), lr=self.lr, weight_decay=0.01)
        sched = get_linear_schedule_with_warmup(opt, int(0.06 * steps), steps)
        rng = np.random.default_rng(self.seed)
        self.losses_ = []
        model.train()
        for _ in range(int(self.epochs)):
            order = rng.permutation(n)
            for s in range(0, n, bs):
                idx = order[s:s + bs]
                out = model(**self._batch([texts[i] for i in idx])).logits.squeeze(-1)
                if self.objective == "regression":
                    loss = torch.nn.functional.mse_loss(out, target[idx])
                else:  # RankNet over the batch's pairs with different lengths
                    d = target[idx][:, None] - target[idx][None, :]
                    mask = d > 0
                    if not bool(mask.any()):
                        continue
                    loss = torch.nn.functional.softplus(-(out[:, None] - out[None, :])[mask]).mean()
                loss.backward()
                torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
                opt.step()
                sched.step()
                opt.zero_grad(set_to_none=True)
                self.losses_.append(float(loss.detach()))
        self.model_ = model.eval()
        return self

    def score_texts(self, texts) -> np.ndarray:
        """The model's raw output (standardised log length for ``regression``, a rank score for ``rank``)."""
        import torch

        texts = self._texts(texts)
        out = []
        with torch.inference_mode():
            for s in range(0, len(texts), 128):
                out.append(self.model_(**self._batch(texts[s:s + 128])).logits.squeeze(-1).float().cpu().numpy())
        return np.concatenate(out) if out else np.zeros(0)

    def predict(self, texts, E=None):
        s = self.score_texts(texts)
        if self.objective == "rank":
            return s
        return np.clip(np.expm1(s * self.sd_ + self.mu_), 0, None)


FINETUNED_METHODS = {"regression": "finetuned_minilm", "rank": "finetuned_minilm_rank"}


def make_finetuned(cfg=None, seed: int = 0) -> dict[str, FinetunedMiniLM]:
    """The fine-tuned MiniLM baselines named by ``cfg`` (``objectives``, ``epochs``, ``batch_size``, ``lr``,
    ``max_length``, ``device``; ``enabled: false`` or ``None`` gives none)."""
    cfg = dict(cfg or {})
    if not cfg or not cfg.get("enabled", True):
        return {}
    kw = {k: cfg[k] for k in ("epochs", "batch_size", "lr", "max_length") if cfg.get(k) is not None}
    dev = cfg.get("device")
    kw["device"] = None if dev in (None, "auto") else str(dev)
    objectives = cfg.get("objectives") or ["regression", "rank"]
    return {FINETUNED_METHODS[o]: FinetunedMiniLM(objective=o, seed=seed, **kw) for o in objectives}
