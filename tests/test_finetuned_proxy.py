"""The fine-tuned MiniLM baselines (SSJF-style regression, vLLM-LTR-style ranking) on real CCC texts.

The targets are a controlled function of the text (its word count, with noise) so that a model that really
trains must rank held-out texts by it; an untrained head does not (its predictions are near-constant)."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from scipy.stats import spearmanr

from rtlm_lab.errors import UserError
from rtlm_lab.regressor.baselines import FinetunedMiniLM, make_finetuned
from rtlm_lab.regressor.evaluate import compare, plot_comparison

REF = Path(__file__).resolve().parent.parent / "outputs" / "reference" / "profiles" / "dialogpt_ccc__cpu.parquet"
pytestmark = pytest.mark.skipif(not REF.is_file(), reason="no reference profile dialogpt_ccc__cpu")


@pytest.fixture(scope="module")
def texts_y():
    df = pd.read_parquet(REF).iloc[:160]
    texts = df["text"].fillna("").astype(str).tolist()
    rng = np.random.default_rng(0)
    y = np.array([4.0 * len(t.split()) for t in texts]) * np.exp(rng.normal(0, 0.1, len(texts))) + 1
    return texts, y


# the rank objective (~35 s of fine-tuning) in make test-full; the regression objective keeps fine-tuning in make test
@pytest.mark.parametrize("objective", ["regression", pytest.param("rank", marks=pytest.mark.slow)])
def test_finetuning_learns_a_length_signal(texts_y, objective):
    texts, y = texts_y
    # 2 epochs on 32 word pieces (most CCC turns are shorter) reach Spearman ~0.9 on the held-out 40 (measured);
    # an untrained head stays near-constant and fails the rank check
    m = FinetunedMiniLM(objective=objective, epochs=2, batch_size=16, lr=1e-4, max_length=32, device="cpu",
                        seed=0)
    m.fit(texts[:120], y[:120])
    p = m.predict(texts[120:])
    assert p.shape == (40,) and np.isfinite(p).all()
    assert spearmanr(p, y[120:])[0] > 0.5
    k = len(m.losses_) // 4
    assert np.mean(m.losses_[-k:]) < np.mean(m.losses_[:k])  # it trained
    assert m.rank_only == (objective == "rank")
    if objective == "regression":
        assert (p >= 0).all() and 0.2 < np.median(p) / np.median(y[120:]) < 5  # tokens, not a raw score


def test_compare_reports_finetuned_methods(texts_y):
    texts, y = texts_y
    df = pd.DataFrame({"request_id": [f"c{i // 2:03d}-{i % 2:03d}" for i in range(len(texts))], "text": texts,
                       "n_output_tokens": y.round()})
    res = compare(df, {"kind": "ridge"}, n_bootstrap=20, embedding_baselines=False,
                  finetuned={"enabled": True, "epochs": 1, "batch_size": 32, "max_length": 32, "device": "cpu"})
    t = res["table"].set_index("method")
    assert {"finetuned_minilm", "finetuned_minilm_rank"} <= set(t.index)
    assert math.isnan(t.loc["finetuned_minilm_rank", "mae"]) and not math.isnan(t.loc["finetuned_minilm", "mae"])
    assert t.loc["finetuned_minilm", "us_per_prompt"] > 0
    fig = plot_comparison(res)  # the tokens scatter leaves the rank-only score out
    labels = [x.get_text() for x in fig.axes[0].get_legend().get_texts()]
    assert "finetuned_minilm" in labels and "finetuned_minilm_rank" not in labels and "ltr_minilm" not in labels


def test_config_switches_and_bad_objective():
    assert make_finetuned(None) == {} and make_finetuned({"enabled": False}) == {}
    ms = make_finetuned({"enabled": True, "objectives": ["rank"], "epochs": 2, "device": "auto"})
    assert list(ms) == ["finetuned_minilm_rank"] and ms["finetuned_minilm_rank"].device is None
    with pytest.raises(UserError, match="regression or rank"):
        FinetunedMiniLM(objective="listwise")
