"""Uncertainty vs the spread of sampled reply lengths (rtlm_lab.uncertainty.spread, issue 34).

Real data: ``tests/data/spread_dialogpt_ccc_cpu_n40_k4.parquet``, 40 CCC test prompts of DialoGPT-ccc replied
K = 4 times under its chat sampling (T 0.7, top-p 0.9) by ``rtlm-spread`` on the CPU (commit 7105674, before
spread rows carried ``n_input_tokens``; that column was joined in from the committed greedy profile
``outputs/reference/profiles/dialogpt_ccc__cpu.parquet`` by ``request_id``: the prompts and tokenizer are the
same). The partial correlation is checked on constructed data whose answer is known.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from rtlm_lab.errors import UserError
from rtlm_lab.uncertainty import modelside
from rtlm_lab.uncertainty import spread as S

ROOT = Path(__file__).resolve().parent.parent
SAMPLE = ROOT / "tests" / "data" / "spread_dialogpt_ccc_cpu_n40_k4.parquet"
pytestmark = pytest.mark.filterwarnings("ignore::PendingDeprecationWarning")  # seaborn heatmap internals
ESTIMATES = [("spearman", "ci_low", "ci_high"), ("partial_spearman", "partial_ci_low", "partial_ci_high")]


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    out = tmp_path_factory.mktemp("spread")
    return S.spread_study(SAMPLE, n_bootstrap=300, seed=0, out_dir=out), out


def test_table_on_the_real_sample(study):
    res, out = study
    t = res["table"]
    assert list(t.columns) == S.COLUMNS
    input_side = [*modelside.INPUT_SIDE, modelside.BASELINE]  # no cached prefill states: no model-side rows
    assert not res["model_side"] and res["n"] == 40 and res["lm"] == "dialogpt_ccc"
    assert len(t) == len(S.TARGETS) * len(input_side)
    for target in S.TARGETS:
        assert list(t.loc[t["target"] == target, "measure"]) == input_side
    assert set(t["n"]) == {40} and set(t["n_groups"]) == {35} and set(t["n_bootstrap"]) == {300}
    for est, lo, hi in ESTIMATES:
        v = t[[est, lo, hi]].to_numpy(float)
        fin = v[np.isfinite(v[:, 0])]
        assert len(fin) and np.all((fin >= -1) & (fin <= 1))
        assert np.all(np.isfinite(fin[:, 1:]))
        assert np.all((fin[:, 1] <= fin[:, 0]) & (fin[:, 0] <= fin[:, 2])), est  # the CI brackets the estimate
    base = t[t["measure"] == modelside.BASELINE]
    assert base["partial_spearman"].isna().all()
    assert (base[base["target"] != "len_cv"]["spearman"] > 0).all()  # longer prompts: longer, wider replies
    sample = pd.read_parquet(SAMPLE)
    np.testing.assert_allclose(res["frame"]["len_cv"], sample["len_sd"] / sample["len_mean"])
    # the frame is the sample's own numbers
    df = pd.read_parquet(SAMPLE)
    np.testing.assert_allclose(res["frame"]["len_sd"], df["len_sd"])
    assert np.isclose(t.set_index(["target", "measure"]).loc[("len_mean", modelside.BASELINE), "spearman"],
                      df[["n_input_tokens", "len_mean"]].corr(method="spearman").iloc[0, 1])
    written = pd.read_csv(out / "spread_table.csv")
    assert list(written.columns) == S.COLUMNS and len(written) == len(t)
    assert (out / "spread_table.png").is_file() and (out / "spread_table.svg").is_file()
    md = S.format_spread(t)
    assert md.splitlines()[0] == "| measure | side | len_sd | len_iqr | len_cv | len_mean |"


def test_partial_is_zero_when_the_spread_depends_on_input_length_only():
    rng = np.random.default_rng(0)
    n = 2000
    n_in = rng.integers(3, 200, n)
    driver = rng.normal(size=n)                         # what the IQR (not the sd) depends on beyond input length
    frame = pd.DataFrame({
        "n_input_tokens": n_in,
        "len_sd": 3 * np.sqrt(n_in) + rng.normal(scale=2, size=n),            # input length (+ noise) only
        "len_iqr": 3 * np.sqrt(n_in) + 10 * driver + rng.normal(scale=2, size=n),
        "len_mean": 2.0 * n_in,
        "structural": n_in + rng.integers(0, 4, n),     # a function of input length up to ties
        "semantic": driver,
    })
    t = S.spread_table(frame, groups=np.arange(n) // 4, n_bootstrap=200, seed=0).set_index(["target", "measure"])
    sd_len = t.loc[("len_sd", "structural")]
    assert sd_len["spearman"] > 0.8 and abs(sd_len["partial_spearman"]) < 0.06   # rho through length, partial ~0
    assert sd_len["partial_ci_low"] < 0 < sd_len["partial_ci_high"]
    assert abs(t.loc[("len_sd", "semantic"), "partial_spearman"]) < 0.06
    iqr = t.loc[("len_iqr", "semantic")]
    assert iqr["partial_spearman"] > 0.5 and iqr["partial_ci_low"] > 0.4           # the real driver survives
    # len_mean is a monotone function of input length: the partial is undefined, not a spurious number
    assert np.isnan(t.loc[("len_mean", "structural"), "partial_spearman"])


def test_files_errors_and_defaults(tmp_path):
    with pytest.raises(UserError, match="no spread profile at"):
        S.read_spread(tmp_path / "nope.parquet")
    bad = tmp_path / "bad.parquet"
    bad.write_text("not parquet")
    with pytest.raises(UserError, match="cannot read spread profile") as e:
        S.read_spread(bad)
    assert "\n" not in str(e.value)
    greedy = tmp_path / "greedy.parquet"
    pd.read_parquet(SAMPLE).drop(columns=["len_sd", "len_iqr"]).to_parquet(greedy)
    with pytest.raises(UserError, match="not a spread profile.*len_sd, len_iqr"):
        S.read_spread(greedy)
    # committed defaults: this platform's splits, else another platform's, else none
    d = S.spread_dir(tmp_path)
    d.mkdir(parents=True)
    assert S.find_spread("dialogpt_ccc", "cpu", tmp_path) == []
    for name in ("dialogpt_ccc__cuda__train", "dialogpt_ccc__cuda__test", "godel_ccc__cpu__test"):
        (d / f"{name}.parquet").write_bytes(SAMPLE.read_bytes())
    assert S.find_spread("dialogpt_ccc", "cpu", tmp_path) == [d / "dialogpt_ccc__cuda__test.parquet",
                                                             d / "dialogpt_ccc__cuda__train.parquet"]
    assert S.find_spread("godel_ccc", "cpu", tmp_path) == [d / "godel_ccc__cpu__test.parquet"]
    assert S.find_spread("gemma3_270m", "cuda", tmp_path) == []
    assert S.spread_view(None) == ()
    assert "skipped" in S.spread_note(None, "gemma3_270m", "cpu")


def test_model_side_rows_where_the_states_are_available(tiny_lm, tmp_path, monkeypatch):
    data = tmp_path / "data"
    data.mkdir()
    for sub in ("raw", "processed"):
        (data / sub).symlink_to(Path(os.environ.get("RTLM_DATA_DIR", ROOT / "data")) / sub)
    monkeypatch.setenv("RTLM_DATA_DIR", str(data))
    profile = tmp_path / "spread.parquet"
    pd.read_parquet(SAMPLE).head(24).assign(lm="tiny").to_parquet(profile)  # a spread profile of the tiny LM
    kw = {"lm": "tiny", "platform": "cpu", "n_bootstrap": 30}
    # not cached and no loader: input side only, no LM loaded
    assert not S.spread_study(profile, loader=None, **kw)["model_side"]
    with_lm = S.spread_study(profile, loader=tiny_lm, **kw)
    assert with_lm["model_side"]
    t = with_lm["table"]
    assert list(t.loc[t["target"] == "len_sd", "measure"]) == list(modelside.MEASURES)
    assert set(t.loc[t["measure"].isin(modelside.MODEL_SIDE), "side"]) == {"model"}
    # now cached: the same rows without an LM
    again = S.spread_study(profile, loader=None, **kw)
    pd.testing.assert_frame_equal(t, again["table"])


def test_cli_bad_spread_file_is_one_line(tmp_path):
    import subprocess
    import sys

    bad = tmp_path / "bad.parquet"
    bad.write_text("not parquet")
    profile = ROOT / "outputs" / "reference" / "profiles" / "dialogpt_ccc__cpu.parquet"
    env = {**os.environ, "RTLM_OUTPUT_DIR": str(tmp_path), "RTLM_ROOT": str(ROOT)}
    res = subprocess.run([sys.executable, "-m", "rtlm_lab.tasks.uncertainty", "lm=dialogpt_ccc", f"profile={profile}",
                          f"spread={bad}"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=180)
    assert res.returncode == 2
    lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: cannot read spread profile"), res.stderr[-2000:]


def test_reference_of_several_lms(tmp_path):
    d = S.spread_dir(tmp_path / "ref")
    d.mkdir(parents=True)
    (d / "dialogpt_ccc__cuda__test.parquet").write_bytes(SAMPLE.read_bytes())
    t = S.build_reference(["dialogpt_ccc", "gemma3_270m"], out_dir=tmp_path / "out", n_bootstrap=30,
                          root=tmp_path / "ref")
    assert set(t["lm"]) == {"dialogpt_ccc"} and list(t.columns) == S.COLUMNS   # gemma: no profile, skipped
    for ext in ("csv", "md", "png", "svg", "provenance.json"):
        assert (tmp_path / "out" / f"spread_table.{ext}").is_file(), ext
    with pytest.raises(UserError, match="no spread profile of gemma3_270m"):
        S.build_reference(["gemma3_270m"], out_dir=tmp_path / "out2", root=tmp_path / "ref")
