"""LM-state features, probes, loop detector and refinement targets (tiny random-init models: seconds)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from conftest import tiny_spec
from rtlm_lab.regressor import lmstate as LS
from rtlm_lab.regressor.evaluate import _kendall
from rtlm_lab.regressor.probes import PROBES, make_probe

TEXTS = ["hi", "what do you think about the weather in spring and in autumn?", "ok", "tell me about music"]


@pytest.fixture(scope="module")
def causal(tiny_lm):
    return tiny_lm


@pytest.fixture(scope="module")
def seq2seq(tiny_seq2seq_dir):
    from rtlm_lab.lm import load_lm

    return load_lm(tiny_spec(tiny_seq2seq_dir, "seq2seq"))


@pytest.mark.parametrize("which", ["causal", "seq2seq"])
def test_shapes_ranges_and_padding_invariance(which, request):
    lm = request.getfixturevalue(which)
    st = LS.extract_states(lm, TEXTS, layers=["mid", -1], batch_size=4)
    d = lm.model.config.d_model if lm.is_encoder_decoder else lm.model.config.n_embd
    assert len(st) == len(TEXTS) and len(st.layers) >= 1
    for l in st.layers:
        assert st.last[l].shape == (len(TEXTS), d) and st.mean[l].shape == (len(TEXTS), d)
    V = len(lm.tokenizer)
    assert np.all(st.entropy >= 0) and np.all(st.entropy <= np.log(max(V, lm.model.config.vocab_size)) + 1e-4)
    assert np.all((st.eos_prob >= 0) & (st.eos_prob <= 1))
    assert np.all(st.eos_prob > 0)  # the stop string "e" makes many tokens end the turn
    X = LS.feature_matrix(st)
    assert X.shape == (len(TEXTS), 2 * d * len(st.layers) + 3) and np.isfinite(X).all()
    # batched (left padding for causal models) == each request alone
    for i, t in enumerate(TEXTS):
        one = LS.extract_states(lm, [t], layers=["mid", -1])
        for l in st.layers:
            np.testing.assert_allclose(st.last[l][i], one.last[l][0], rtol=1e-3, atol=1e-4)
            np.testing.assert_allclose(st.mean[l][i], one.mean[l][0], rtol=1e-3, atol=1e-4)
        np.testing.assert_allclose(st.entropy[i], one.entropy[0], rtol=1e-3, atol=1e-4)
        np.testing.assert_allclose(st.eos_prob[i], one.eos_prob[0], rtol=1e-3, atol=1e-5)
        assert st.n_tokens[i] == one.n_tokens[0]


def test_last_token_logits_match_the_full_forward(causal):
    """extract_states asks a causal LM for the last position's logits only (``logits_to_keep=1``): its entropy
    and end-of-turn probability equal those of the full forward's logits at the last token."""
    import torch

    st = LS.extract_states(causal, TEXTS[1:2])
    enc = causal.encode(TEXTS[1:2], None, 8)
    ids = torch.tensor([LS._rows(enc)[0]])
    with torch.inference_mode():
        logits = causal.model(input_ids=ids).logits[:, -1]
    ent, eos = LS._uncertainty(logits, LS.end_of_turn_ids(causal))
    np.testing.assert_allclose(st.entropy, ent, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(st.eos_prob, eos, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("which", ["causal", "seq2seq"])
def test_teacher_forced_prefix(which, request):
    """Teacher-forcing the greedy reply's first k tokens: the step-k state's next-token argmax is the reply's
    token k+1 (greedy decoding is deterministic), and batched prefixes of unequal length match singles."""
    lm = request.getfixturevalue(which)
    k = 3
    gens = lm.generate(TEXTS, max_new_tokens=k + 1)
    full = [g.output_ids for g in gens]
    pre = [ids[:k] for ids in full]
    pre[0] = pre[0][:1]  # unequal prefix lengths in one batch
    st = LS.extract_states(lm, TEXTS, prefix_ids=pre)
    for i, t in enumerate(TEXTS):
        one = LS.extract_states(lm, [t], prefix_ids=[pre[i]])
        for l in st.layers:
            np.testing.assert_allclose(st.last[l][i], one.last[l][0], rtol=1e-3, atol=1e-4)
    base = LS.extract_states(lm, TEXTS)
    assert np.all(st.n_tokens == base.n_tokens + np.array([len(p) for p in pre]))


def test_end_of_turn_ids_include_stop_string_tokens(causal):
    ids = LS.end_of_turn_ids(causal)
    assert set(causal.eos_ids) <= set(ids)
    assert any("e" in causal.tokenizer.decode([i]) for i in ids)
    assert all(i in causal.eos_ids or "e" in causal.tokenizer.decode([i], skip_special_tokens=True) for i in ids)


def test_cache_roundtrip(causal, tmp_path, monkeypatch):
    monkeypatch.setenv("RTLM_DATA_DIR", str(tmp_path))
    df = pd.DataFrame({"request_id": [f"c{i}-000" for i in range(4)], "text": TEXTS, "context": [""] * 4})
    a = LS.cached_states(causal, df, "ab" * 32, "tiny", ["mid", -1])
    calls = []
    b = LS.cached_states(lambda: calls.append(1) or causal, df, "ab" * 32, "tiny", ["mid", -1])
    assert not calls  # served from the cache
    assert list(tmp_path.glob("cache/lmstate/*.npz"))
    np.testing.assert_array_equal(a.last[a.layers[-1]], b.last[b.layers[-1]])
    c = LS.cached_states(lambda: calls.append(1) or causal, df.iloc[::-1].reset_index(drop=True), "ab" * 32,
                         "tiny", ["mid", -1])
    assert calls and np.allclose(c.entropy, a.entropy[::-1], atol=1e-5)  # other rows: recomputed


def _synthetic(n=300, d=40, seed=0):
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(n, d))
    y = np.round(np.expm1(2.5 + 0.8 * X[:, 0] - 0.5 * X[:, 1] + 0.2 * rng.normal(size=n))).clip(1, 200)
    return X, y


@pytest.mark.parametrize("name", PROBES)
def test_probes_beat_a_constant(name):
    X, y = _synthetic()
    p = make_probe(name).fit(X[:200], y[:200])
    pred = p.predict(X[200:])
    assert pred.shape == (100,) and np.all(pred >= 0) and np.isfinite(pred).all()
    assert _kendall(pred, y[200:]) > 0.4
    assert np.mean(np.abs(pred - y[200:])) < np.mean(np.abs(np.mean(y[:200]) - y[200:]))


def test_predictor_auto_and_refine_api():
    X, y = _synthetic(d=6)
    st = LS.LMStates({1: X[:, :3]}, {1: X[:, 3:]}, np.abs(X[:, 0]), np.full(len(y), 0.1), np.full(len(y), 10.0),
                     (1,))
    pred = LS.LMStatePredictor(probe="auto", seed=0).fit(st.take(range(200)), y[:200], max_new_tokens=200)
    assert pred.probe_ in PROBES and set(pred.val_scores_) == set(PROBES)
    out = pred.predict_from_states(st.take(range(200, 300)))
    assert _kendall(out, y[200:]) > 0.4
    k = 4
    pred.fit_refine(k, st.take(range(200)), y[:200])
    toks = [[5, 6, 7, 8]] * 100
    rem = pred.refine_predict(st.take(range(200, 300)), toks)
    assert rem.shape == (100,) and np.all((rem >= 0) & (rem <= 200 - k))
    looped = pred.refine_predict(st.take(range(200, 300)), [[1, 2, 3, 1, 2, 3]] * 100)
    assert np.all(looped == 200 - 6)  # a loop runs to the cap
    pred.fit_refine(k, st.take(range(200)), y[:200], tokens=[[5, 6, 7, 8]] * 100 + [[7, 7, 7, 7]] * 100)
    assert k in pred.refiners_tok_
    rem2 = pred.refine_predict(st.take(range(200, 300)), toks, use_loop=False)
    assert rem2.shape == (100,) and np.all((rem2 >= 0) & (rem2 <= 200 - k))
    # training loops that did not run to the cap: the gated override is off, the plain one still on
    assert pred.loop_precision_[k] < 0.8 and not pred.loop_trusted(k)
    gated = pred.refine_predict(st.take(range(200, 300)), [[7, 7, 7, 7]] * 100, use_loop="gated")
    assert not np.all(gated == 200 - k)  # the probe, not the override
    assert np.all(pred.refine_predict(st.take(range(200, 300)), [[7, 7, 7, 7]] * 100) == 200 - k)
    ycap = y.copy()
    ycap[100:200] = 200  # now every flagged training request ran to the cap
    pred.fit_refine(k, st.take(range(200)), ycap[:200], tokens=[[5, 6, 7, 8]] * 100 + [[7, 7, 7, 7]] * 100)
    assert pred.loop_precision_[k] == 1.0 and pred.loop_trusted(k)


def test_detect_loop():
    assert LS.detect_loop([1, 2, 3, 4, 1, 2, 3], n=3)
    assert not LS.detect_loop([1, 2, 3, 4, 5, 6, 7], n=3)
    assert LS.detect_loop([9, 9, 9, 9], n=3)  # overlapping occurrences count
    assert not LS.detect_loop([9, 9, 9], n=3)  # the tail alone is no repeat
    assert not LS.detect_loop([1, 2], n=3) and not LS.detect_loop([], n=2)
    assert LS.detect_loop([4, 7, 4, 7], n=2) and not LS.detect_loop([4, 7, 4, 8], n=2)


def test_remaining_targets():
    alive, rem = LS.remaining_targets([3, 8, 9, 64], k=8)
    assert alive.tolist() == [False, False, True, True]
    assert rem.tolist() == [0.0, 0.0, 1.0, 56.0]


def test_resolve_layers():
    assert LS.resolve_layers(["mid", -1], 13) == [6, 12]
    assert LS.resolve_layers([0, -1, 12], 13) == [0, 12]
    with pytest.raises(Exception):
        LS.resolve_layers([20], 13)


def test_profile_output_ids_match_greedy_prefix(causal, tiny_profile):
    df = tiny_profile
    assert "output_ids" in df.columns
    assert all(len(v) == min(4, n) for v, n in zip(df["output_ids"], df["n_output_tokens"]))
    regen = LS.reply_prefix_ids(causal, df.drop(columns=["output_ids"]), 4, batch_size=4)
    assert [list(v) for v in df["output_ids"]] == [r[:len(v)] for r, v in zip(regen, df["output_ids"])]


def test_compare_with_prefill(causal, tiny_profile):
    from rtlm_lab.regressor.evaluate import compare

    df = tiny_profile
    prefill = {"states": lambda src, fr, step, pre: LS.extract_states(causal, fr["text"].tolist(),
                                                                       prefix_ids=pre, batch_size=8),
               "prefix": lambda src, fr, k: LS.reply_prefix_ids(causal, fr, k),
               "time": None, "max_new_tokens": 24, "refine_k": [2], "probes": ["ridge", "ordinal"]}
    res = compare(df, {"kind": "ridge", "use_prefill": True}, n_bootstrap=20, embedding_baselines=False,
                  bootstrap_by="conversation", prefill=prefill)
    methods = set(res["table"]["method"])
    assert {"rtlm_ridge", "rtlm_ridge_prefill", "lmstate_ridge", "lmstate_ordinal", "lmstate_auto",
            "input_length", "oracle"} <= methods
    assert res["lmstate"]["picked_probe"] in ("ridge", "ordinal")
    ref = res["refine"]
    assert ref is not None and set(ref["k"]) == {2}
    orc = ref[ref["method"] == "oracle"].iloc[0]
    y = df["n_output_tokens"].to_numpy()
    assert orc["mae"] == 0
    # remaining-length targets are over test rows still running at k
    assert orc["n_test"] <= int((y > 2).sum())


def test_token_features():
    f = LS.token_features([[1, 2, 1, 2, 1, 2], [1, 2, 3, 4, 5, 6], [7]])
    assert f.shape == (3, 5)
    assert f[0, :3].tolist() == [1.0, 1.0, 1.0] and f[1, :3].tolist() == [0.0, 0.0, 0.0]
    assert f[0, 3] == pytest.approx(3 / 5) and f[1, 3] == 0 and f[1, 4] == 1.0 and f[0, 4] == pytest.approx(2 / 6)


def test_predictor_on_texts(causal):
    texts = TEXTS * 5
    st = LS.extract_states(causal, texts)
    y = np.arange(len(texts), dtype=float) % 7 + 3
    pred = LS.LMStatePredictor(probe="ridge").fit(st, y, max_new_tokens=24)
    np.testing.assert_allclose(pred.predict_texts(causal, texts), pred.predict_from_states(st), rtol=1e-4, atol=1e-4)
    pred.fit_refine(2, LS.extract_states(causal, texts, prefix_ids=[[5, 6]] * len(texts)), y + 2)
    rem = pred.refine_texts(causal, texts[:3], [[5, 6]] * 3)
    assert rem.shape == (3,) and np.all((rem >= 0) & (rem <= 22))


def test_notebook02_lmstate_view(tmp_path):
    """Notebook 02's five-LM view: the LM-state rows of a summary, methods renamed in their fixed order, a CI in
    every cell, "not run" where an LM lacks a method, the figure saved; None without LM-state rows."""
    from rtlm_lab.regressor.reference import LMSTATE_VIEW, lmstate_view

    rows = []
    for lm, methods in {"a_lm": ["input_length", "lmstate_auto", "finetuned_minilm"],
                        "b_lm": ["lmstate_auto", "input_length", "refine@8:refine+repfeat+gated_loop"]}.items():
        for i, m in enumerate(methods):
            rows.append({"lm": lm, "platform": "cpu+cuda", "method": m, "kendall_tau": 0.1 * (i + 1),
                         "tau_ci_low": 0.05 * (i + 1), "tau_ci_high": 0.15 * (i + 1)})
    rows.append({"lm": "a_lm", "platform": "cpu", "method": "input_length", "kendall_tau": 0.9,
                 "tau_ci_low": 0.8, "tau_ci_high": 1.0})
    csv = tmp_path / "summary.csv"
    pd.DataFrame(rows).to_csv(csv, index=False)
    v = lmstate_view(csv, out_dir=tmp_path)
    t = v["table"]
    assert list(t.index) == ["input length", "fine-tuned MiniLM", "LM state, prefill", "LM state, refined k=8"]
    assert list(t.columns) == ["a_lm", "b_lm"]
    assert t.loc["input length", "a_lm"] == "0.10 [0.05, 0.15]"  # the cpu+cuda row, not the cpu one
    assert t.loc["LM state, prefill", "b_lm"] == "0.10 [0.05, 0.15]"
    assert t.loc["fine-tuned MiniLM", "b_lm"] == "not run"
    assert (tmp_path / "lmstate_vs_baselines.png").is_file() and set(LMSTATE_VIEW) >= {"lmstate_auto"}
    pd.DataFrame(rows[-1:]).to_csv(csv, index=False)
    assert lmstate_view(csv) is None and lmstate_view(tmp_path / "missing.csv") is None
