"""``rtlm-reference target=distribution`` (rtlm_lab.regressor.distref): the distributional table, refinement
and drift on small samples of the committed profiles (RT-LM's features from a real spaCy pass), and the LM-state
quantile head on the session's tiny GPT-2 profile."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from rtlm_lab.paths import reference_dir

PROFILES = reference_dir() / "profiles"


def _split_profile(df: pd.DataFrame, out_dir, lm: str, n_test_conv: int):
    """A test profile (the first ``n_test_conv`` conversations, no ``output_ids``) and a train profile (the
    rest) of one LM in ``out_dir`` (the layout of outputs/reference/profiles)."""
    from rtlm_lab.metrics import conversation_ids

    conv = conversation_ids(df)
    first = list(dict.fromkeys(conv))[:n_test_conv]
    te = np.isin(conv, first)
    (out_dir / "train").mkdir(parents=True, exist_ok=True)
    df[te].drop(columns=["output_ids"], errors="ignore").to_parquet(out_dir / f"{lm}__cuda.parquet")
    df[~te].to_parquet(out_dir / "train" / f"{lm}__cuda.parquet")


def test_coverage_ci_and_state_design():
    from rtlm_lab.distmetrics import DEFAULT_LEVELS
    from rtlm_lab.lm.states import LMStates
    from rtlm_lab.regressor.distref import coverage_ci, state_design

    rng = np.random.default_rng(0)
    y = rng.integers(1, 50, 400).astype(float)
    Q = np.tile(np.quantile(y, DEFAULT_LEVELS), (400, 1))
    groups = np.repeat(np.arange(100), 4)
    lo, hi = coverage_ci(y, Q, DEFAULT_LEVELS, groups, 500, 0)
    point = np.mean((y >= Q[:, 0]) & (y <= Q[:, -1]))
    assert lo <= point <= hi and hi - lo < 0.15
    assert np.isnan(coverage_ci(y, Q[:, 1:], DEFAULT_LEVELS[1:], groups, 100, 0)[0])  # no 0.05 level

    n, d = 60, 16
    st = LMStates({1: rng.normal(size=(n, d))}, {1: rng.normal(size=(n, d))}, rng.random(n), rng.random(n),
                  rng.integers(3, 30, n).astype(float), (1,))
    tr = np.arange(40)
    X = state_design(st, tr, n_components=5)
    assert X.shape == (n, 5 + 3)
    st2 = LMStates({1: st.last[1].copy()}, {1: st.mean[1].copy()}, st.entropy, st.eos_prob, st.n_tokens, (1,))
    st2.last[1][40:] += 100.0  # test rows change: the training rows' design does not (fitted on tr only)
    assert np.allclose(state_design(st2, tr, n_components=5)[:40], X[:40])


@pytest.mark.skipif(not (PROFILES / "gemma3_270m__cuda.parquet").is_file()
                    or not (PROFILES / "dialogpt_ccc__cuda.parquet").is_file(), reason="no reference profiles")
def test_build_tables_refinement_and_drift(tmp_path):
    from rtlm_lab.regressor.distref import build

    pdir, out = tmp_path / "profiles", tmp_path / "out"
    for lm in ("gemma3_270m", "dialogpt_ccc"):
        _split_profile(pd.read_parquet(PROFILES / f"{lm}__cuda.parquet").head(240), pdir, lm, 30)
    cfg = {"lms": ["gemma3_270m"], "profiles_dir": str(pdir), "out": str(out), "lmstate_lms": [],
           "regressor": {"quantiles": [0.05, 0.1, 0.25, 0.5, 0.75, 0.9, 0.95], "max_iter": 30,
                         "min_samples_leaf": 10},
           "refine_k": [4], "min_test": 5, "drift_pairs": [["dialogpt_ccc", "gemma3_270m"]], "n_bootstrap": 50}
    res = build(cfg, command="test")
    t = res["table"]
    assert set(t["method"]) == {"quantile_hgb", "marginal", "ridge_residuals"}
    assert (t["n"] == t["n"].iloc[0]).all() and t["n"].iloc[0] > 20 and (t["n_train"] > 100).all()
    assert t["cover90"].between(0, 1).all() and (t["cover90_lo"] <= t["cover90"]).all()
    assert (t["cover90"] <= t["cover90_hi"]).all() and (t["crps"] > 0).all()
    r = res["refine"]
    assert set(r["method"]) == {"prefill_minus_k", "marginal_alive", "rtlm_alive"} and (r["k"] == 4).all()
    d = res["drift"]
    assert set(d["arm"]) == {"frozen", "recalibrated"} and set(d["part"]) == {"all", "first_half", "second_half"}
    for f in ("distribution.csv", "refine.csv", "drift.csv", "distribution.md", "provenance.json",
              "calibration_gemma3_270m.png", "calibration_gemma3_270m.svg"):
        assert (out / f).is_file(), f
    assert "| gemma3_270m | quantile_hgb |" in (out / "distribution.md").read_text()
    assert pd.read_csv(out / "distribution.csv")["method"].tolist() == t["method"].tolist()


def test_lmstate_quantile_head_and_refinement_on_the_tiny_lm(tiny_lm, tiny_profile, tmp_path):
    """The LM-state quantile head and the step-k head (states after teacher-forcing k reply tokens; the test
    rows' tokens generated, the train rows' from output_ids) on the tiny GPT-2's real profile."""
    from rtlm_lab.regressor.distref import FeatureCache, lm_table

    df = pd.concat([tiny_profile.assign(request_id=tiny_profile["request_id"] + f"r{i}") for i in range(2)],
                   ignore_index=True)  # 80 rows: enough for HGB heads with leaves of 5
    _split_profile(df, tmp_path, "tiny", 10)
    ls = {"loader": lambda: tiny_lm, "cache": False, "layers": [-1], "batch_size": 8, "n_components": 4,
          "verify_prefix_n": 3}
    params = {"max_iter": 20, "min_samples_leaf": 5}
    res = lm_table("tiny", params, FeatureCache(), "cuda", tmp_path, ls, refine_k=[2], n_bootstrap=20,
                   min_test=3)
    t = pd.DataFrame(res["rows"]).set_index("method")
    assert "lmstate_hgb" in t.index and 0 <= t.loc["lmstate_hgb", "cover90"] <= 1
    q = res["quantiles"]["lmstate_hgb"]
    assert q.shape == (len(res["y_test"]), 7) and (np.diff(q, axis=1) >= 0).all()
    r = pd.DataFrame(res["refine"])
    assert "lmstate_k" in set(r["method"]) and (r["n"] == r["n"].iloc[0]).all()
    chk = res["prefix_checks"][0]  # test rows: reply text re-tokenized, checked against greedy generate
    assert chk["n_output_ids"] > 0 and chk["n_retokenized"] + chk["n_generated"] > 0
