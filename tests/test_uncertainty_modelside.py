"""Model-side vs input-side uncertainty (rtlm_lab.uncertainty.modelside): partial Spearman arithmetic on
constructed data, the conversation bootstrap, a tiny random-initialised LM's prefill states through the table,
and ``rtlm-uncertainty model_side=true``."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from rtlm_lab.uncertainty import modelside as M

ROOT = Path(__file__).resolve().parent.parent
PROFILE = ROOT / "outputs" / "reference" / "profiles" / "dialogpt_ccc__cpu.parquet"
pytestmark = pytest.mark.filterwarnings("ignore::PendingDeprecationWarning")  # seaborn heatmap internals


def _constructed(n=2000, seed=0):
    rng = np.random.default_rng(seed)
    n_in = rng.integers(3, 200, n)
    z = np.log(n_in)
    w = rng.normal(size=n)                          # what output length depends on beyond input length
    y = np.round(20 * z + 15 * w + rng.normal(scale=5, size=n)).clip(1, None)
    return n_in, z, w, y


def test_pure_function_of_input_length_has_no_partial():
    n_in, z, w, y = _constructed()
    from scipy.stats import spearmanr

    # characters ~ 4 x tokens (+ 0-3): a function of input length up to its ties; correlated with y, partial ~0
    x = 4 * n_in + np.random.default_rng(9).integers(0, 4, len(n_in))
    rho, par = M.rank_stats(np.column_stack([x, w]), y, z)
    assert rho[0] > 0.5 and abs(par[0]) < 0.06
    # the extra driver keeps (and sharpens) its correlation once input length is controlled for
    assert par[1] > 0.5 and par[1] > rho[1]
    assert rho[0] == pytest.approx(spearmanr(x, y).statistic, abs=1e-12)
    # a monotone function of z has rank residuals exactly 0: undefined, NaN (not a spurious number)
    assert np.isnan(M.partial_spearman(3 * z + 1, y, z))


def test_partial_equals_the_closed_form_and_the_analysis_module():
    _, z, w, y = _constructed(n=500, seed=1)
    x = w + 0.5 * z + np.random.default_rng(2).normal(size=500)
    r = pd.DataFrame({"x": x, "y": y, "z": z}).corr(method="spearman")
    rxy, rxz, ryz = r.loc["x", "y"], r.loc["x", "z"], r.loc["y", "z"]
    closed = (rxy - rxz * ryz) / np.sqrt((1 - rxz ** 2) * (1 - ryz ** 2))
    assert M.partial_spearman(x, y, z) == pytest.approx(closed, abs=1e-10)
    from rtlm_lab.uncertainty.analysis import _partial_spearman_rows

    assert M.partial_spearman(x, y, z) == pytest.approx(float(_partial_spearman_rows(x, y, z)), abs=1e-10)


def test_table_and_conversation_bootstrap():
    n_in, z, w, y = _constructed(n=400, seed=3)
    groups = np.repeat(np.arange(100), 4)
    frame = pd.DataFrame({"n_input_tokens": n_in, "n_output_tokens": y, "prefill_entropy": w,
                          "structural": np.sin(3 * z)})
    t = M.model_input_table(frame, n_bootstrap=200, seed=0, lm="x", platform="cpu", groups=groups)
    assert list(t.columns) == M.COLUMNS
    assert list(t["measure"]) == ["structural", "prefill_entropy", "log_input_tokens"]
    assert list(t["side"]) == ["input", "model", "baseline"] and set(t["n_groups"]) == {100}
    ent = t.set_index("measure").loc["prefill_entropy"]
    assert ent["partial_ci_low"] < ent["partial_spearman"] < ent["partial_ci_high"] and ent["partial_ci_low"] > 0.4
    base = t.set_index("measure").loc["log_input_tokens"]
    assert np.isnan(base["partial_spearman"]) and base["ci_low"] < base["spearman"] < base["ci_high"]
    again = M.model_input_table(frame, n_bootstrap=200, seed=0, lm="x", platform="cpu", groups=groups)
    pd.testing.assert_frame_equal(t, again)
    # each resample draws whole conversations
    seen = []
    M.cluster_bootstrap(lambda idx: seen.append(idx) or np.zeros(1), 400, groups, 5, seed=0)
    assert all(np.all(np.bincount(groups[i], minlength=100) % 4 == 0) for i in seen)


@pytest.fixture(scope="module")
def small_profile(tmp_path_factory) -> Path:
    p = tmp_path_factory.mktemp("mvi") / "profile.parquet"
    pd.read_parquet(PROFILE).head(48).to_parquet(p, index=False)
    return p


def test_tiny_lm_states_through_the_table(tiny_lm, small_profile, tmp_path, monkeypatch):
    data = tmp_path / "data"
    data.mkdir()
    for sub in ("raw", "processed"):
        (data / sub).symlink_to(Path(os.environ.get("RTLM_DATA_DIR", ROOT / "data")) / sub)
    monkeypatch.setenv("RTLM_DATA_DIR", str(data))
    res = M.model_vs_input(small_profile, lm="tiny", platform="cpu", loader=tiny_lm, n_bootstrap=30)
    t, f = res["table"], res["frame"]
    assert list(t["measure"]) == list(M.MEASURES) and len(f) == 48
    assert np.all(np.isfinite(f["prefill_entropy"])) and np.all(f["log_eos_prob"] <= 0)
    assert np.isfinite(t.set_index("measure").loc["prefill_entropy", "partial_spearman"])
    assert list(data.glob("cache/lmstate/tiny__cpu__*.npz"))  # cached: a second call needs no LM
    again = M.model_vs_input(small_profile, lm="tiny", platform="cpu", loader=lambda: 1 / 0, n_bootstrap=30)
    pd.testing.assert_frame_equal(t, again["table"])


# ~25 s: make test-full. The fast suite runs the same table in-process (test_tiny_lm_states_through_the_table).
@pytest.mark.slow
def test_cli_model_side_flag(tiny_causal_dir, small_profile, tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    for sub in ("raw", "processed"):
        (data / sub).symlink_to(Path(os.environ.get("RTLM_DATA_DIR", ROOT / "data")) / sub)
    env = {**os.environ, "RTLM_OUTPUT_DIR": str(tmp_path / "out"), "RTLM_DATA_DIR": str(data),
           "RTLM_ROOT": str(ROOT)}
    args = ["lm=custom", f"lm.local_dir={tiny_causal_dir}", "lm.name=tiny", "lm.chat_format=lab_causal",
            "lm.max_new_tokens=24", f"profile={small_profile}", "model_side=true", "n_bootstrap=20"]
    res = subprocess.run([sys.executable, "-m", "rtlm_lab.tasks.uncertainty", *args], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    run = tmp_path / "out" / "uncertainty" / "tiny" / "cpu"
    csv = pd.read_csv(run / "model_vs_input.csv")
    assert list(csv.columns) == M.COLUMNS and list(csv["measure"]) == list(M.MEASURES)
    assert (run / "model_vs_input.png").is_file() and (run / "model_vs_input.svg").is_file()
    assert len(json.loads((run / "metrics.json").read_text())["model_vs_input"]) == len(M.MEASURES)
    assert "prefill_entropy" in res.stdout
    files = json.loads((run / "manifest.json").read_text())["files"]
    assert {"model_vs_input.csv", "model_vs_input.png", "model_vs_input.svg"} <= set(files)
    helped = subprocess.run([sys.executable, "-m", "rtlm_lab.tasks.uncertainty", "--help"], cwd=ROOT, env=env,
                            capture_output=True, text=True, timeout=120)
    assert "model_side" in helped.stdout


def test_committed_reference_table():
    t = M.reference_table()
    assert list(t.columns) == M.COLUMNS
    assert set(t["lm"]) == set(M.REFERENCE_LMS) and len(t) == len(M.REFERENCE_LMS) * len(M.MEASURES)
    prov = json.loads((M.reference_path().parent / "model_vs_input.provenance.json").read_text())
    assert prov["git_commit"] and prov["command"].startswith("rtlm-reference") and len(prov["sources"]) == 5
    mixed = M.with_reference(t[t["lm"] == "gemma3_270m"].assign(spearman=0.0))
    assert len(mixed) == len(t) and (mixed.loc[mixed["lm"] == "gemma3_270m", "spearman"] == 0).all()


def test_run_study_model_side_reproduces_the_reference(tmp_path, monkeypatch):
    """The real dialogpt_ccc (committed, small): fresh prefill states on this CPU (empty cache) give the
    committed reference rows."""
    from rtlm_lab.uncertainty.study import run_study

    data = tmp_path / "data"
    data.mkdir()
    for sub in ("raw", "processed"):
        (data / sub).symlink_to(Path(os.environ.get("RTLM_DATA_DIR", ROOT / "data")) / sub)
    monkeypatch.setenv("RTLM_DATA_DIR", str(data))
    res = run_study("dialogpt_ccc", "cpu", PROFILE, n_bootstrap=1000, output_dir=tmp_path / "nb", model_side=True)
    mvi = res["model_vs_input"]
    assert set(mvi["lm"]) == set(M.REFERENCE_LMS)
    ref = M.reference_table()
    num = ["spearman", "ci_low", "ci_high", "partial_spearman", "partial_ci_low", "partial_ci_high"]
    got = mvi[mvi["lm"] == "dialogpt_ccc"][num].to_numpy(float)
    want = ref[ref["lm"] == "dialogpt_ccc"][num].to_numpy(float)
    np.testing.assert_allclose(got, want, atol=1e-3)  # the csv keeps 4 decimals
    assert (tmp_path / "nb" / "model_vs_input.csv").is_file()
    assert json.loads((tmp_path / "nb" / "metrics.json").read_text())["provenance"]["config"]["model_side"]


def test_notebook_01_is_a_view():
    import nbformat

    nb = nbformat.read(ROOT / "notebooks" / "01_uncertainty_latency.ipynb", as_version=4)
    code = [c for c in nb.cells if c.cell_type == "code"]
    lines = [ln for c in code[1:] for ln in c.source.splitlines() if ln.strip() and not ln.lstrip().startswith("#")]
    assert len(lines) <= 40, len(lines)
    assert not any(ln.lstrip().startswith(("def ", "class ", "for ")) for ln in lines)
    assert "model_side" in code[0].source and any("plot_model_vs_input" in c.source for c in code)
