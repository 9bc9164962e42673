"""Tests of the uncertainty -> output length analysis (rtlm_lab.uncertainty.analysis), its figures, the
``rtlm-uncertainty`` entry point, the 01 notebook (papermill) and the reference builder.

The statistics are pure functions, so they are checked on synthetic data whose answer is known (a column
that drives output length, a shuffled column, a pure input-length effect). The entry point, notebook and
reference builder run on the first 40 rows of the committed real Gemma cpu profile.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from rtlm_lab.uncertainty import UNCERTAINTY_TYPES
from rtlm_lab.uncertainty.analysis import (
    FEATURES, TABLE_COLUMNS, analyze, analyze_scores, output_by_quartile, quartile_groups, spearman_stats,
    table_from_metrics, to_jsonable,
)

ROOT = Path(__file__).resolve().parent.parent
# a committed real profile (outputs/reference/profiles): its first 40 rows keep the tests quick
REAL_PROFILE = ROOT / "outputs" / "reference" / "profiles" / "gemma3_270m__cpu.parquet"
NOTEBOOK = ROOT / "notebooks" / "01_uncertainty_latency.ipynb"
SPREAD = ROOT / "tests" / "data" / "spread_dialogpt_ccc_cpu_n40_k4.parquet"  # see tests/test_uncertainty_spread.py


def synthetic(n: int = 300, seed: int = 0) -> pd.DataFrame:
    """Scores + tokens where output = 10 + 40 x vagueness + noise; structural tracks input length only."""
    rng = np.random.default_rng(seed)
    df = pd.DataFrame({t: rng.random(n) * (rng.random(n) < 0.5) for t in UNCERTAINTY_TYPES})
    n_in = rng.integers(3, 60, n)
    df["n_input_tokens"] = n_in
    df["vagueness"] = rng.random(n)
    df["n_output_tokens"] = np.round(10 + 40 * df["vagueness"] + rng.normal(0, 4, n)).astype(int)
    df["semantic"] = rng.permutation(df["vagueness"].to_numpy())          # shuffled: no relation
    df["total"] = df[list(UNCERTAINTY_TYPES)].mean(axis=1)
    df["e2e_s"] = 0.2 + 0.03 * df["n_output_tokens"] + rng.normal(0, 0.01, n)
    df["ttft_s"] = 0.2
    df["lm"], df["platform"] = "synthetic", "cpu"
    return df


def row(result, feature):
    t = result["spearman_table"]
    return t[t["type"] == feature].iloc[0]


def test_known_answer_and_shuffled():
    res = analyze_scores(synthetic(), n_bootstrap=400, seed=0)
    assert list(res["spearman_table"].columns) == TABLE_COLUMNS
    assert list(res["spearman_table"]["type"]) == list(FEATURES)
    v = row(res, "vagueness")
    assert v.spearman > 0.8 and v.ci_low > 0.5 and v.ci_low <= v.spearman <= v.ci_high and v.p_value < 1e-10
    assert v.partial_spearman > 0.8
    s = row(res, "semantic")
    assert s.ci_low < 0 < s.ci_high and s.p_value > 0.01
    assert math.isnan(row(res, "n_input_tokens").partial_spearman)      # partial on itself: undefined
    fit = res["latency_model"]["cpu"]
    assert fit["r2"] > 0.99 and fit["s_per_token"] == pytest.approx(0.03, rel=0.05)
    q = res["output_by_total_quartile"]
    assert q["n"].sum() == 300 and list(q.columns[:1]) == ["quartile"]
    json.dumps(to_jsonable(res), allow_nan=False)


def test_partial_removes_pure_input_length_effect():
    rng = np.random.default_rng(1)
    n = 400
    n_in = rng.integers(3, 80, n)
    x = n_in / 80 + rng.normal(0, 0.05, n)                # a score that only tracks request length
    y = 5 + 2 * n_in + rng.normal(0, 10, n)                # output length driven by input length alone
    st = spearman_stats(x, y, n_in, n_bootstrap=400, seed=0)
    assert st["spearman"] > 0.6 and st["ci_low"] > 0.4
    assert abs(st["partial_spearman"]) < 0.15
    assert st["partial_ci_low"] < 0 < st["partial_ci_high"]


def test_bootstrap_is_seeded_and_fast():
    df = synthetic(500, seed=3)
    t0 = time.perf_counter()
    a = analyze_scores(df, n_bootstrap=1000, seed=7)
    elapsed = time.perf_counter() - t0
    b = analyze_scores(df, n_bootstrap=1000, seed=7)
    pd.testing.assert_frame_equal(a["spearman_table"], b["spearman_table"])
    c = analyze_scores(df, n_bootstrap=1000, seed=8)
    assert not np.allclose(a["spearman_table"]["ci_low"].fillna(0), c["spearman_table"]["ci_low"].fillna(0))
    assert elapsed < 10, elapsed


def test_degenerate_inputs_give_nan():
    df = synthetic(40)
    small = analyze_scores(df.head(4), n_bootstrap=50)
    assert small["spearman_table"][["spearman", "ci_low", "partial_spearman", "p_value"]].isna().all().all()
    const = df.copy()
    const["multi_part"] = 0.0
    r = row(analyze_scores(const, n_bootstrap=50), "multi_part")
    assert math.isnan(r.spearman) and math.isnan(r.ci_low) and math.isnan(r.partial_spearman)
    flat = df.copy()
    flat["n_output_tokens"] = 7
    assert analyze_scores(flat, n_bootstrap=50)["spearman_table"]["spearman"].isna().all()
    empty = analyze_scores(df.head(0), n_bootstrap=50)
    assert empty["n"] == 0 and empty["spearman_table"]["spearman"].isna().all()
    missing = analyze_scores(df.drop(columns=["structural", "e2e_s"]), n_bootstrap=0)
    assert math.isnan(row(missing, "structural").spearman) and missing["latency_model"] == {}
    assert np.isfinite(row(missing, "vagueness").spearman) and math.isnan(row(missing, "vagueness").ci_low)
    json.dumps(to_jsonable(small), allow_nan=False)


def test_quartiles_keep_ties_together():
    v = pd.Series([0.0] * 10 + list(np.linspace(0.1, 1, 10)))
    g = quartile_groups(v)
    assert g[:10].nunique() == 1                              # all zeros share one group
    q = output_by_quartile(pd.DataFrame({"total": v, "n_output_tokens": np.arange(20)}))
    assert q["n"].sum() == 20 and q["total_max"].is_monotonic_increasing
    assert quartile_groups(pd.Series([0.3] * 8)).nunique() == 1


def test_metrics_roundtrip():
    res = analyze_scores(synthetic(60), n_bootstrap=50)
    back = table_from_metrics(json.loads(json.dumps(to_jsonable(res))))
    pd.testing.assert_frame_equal(back, res["spearman_table"], check_dtype=False)


def test_figures_png_and_svg(tmp_path):
    import matplotlib

    matplotlib.use("Agg")
    from rtlm_lab.uncertainty.figures import (
        plot_latency_fit, plot_output_by_uncertainty, plot_spearman_bars, plot_spearman_heatmap,
    )

    df = synthetic(80)
    res = analyze_scores(df, n_bootstrap=50)
    other = res["spearman_table"].assign(lm="other")
    plot_spearman_bars(pd.concat([res["spearman_table"], other]), tmp_path, stem="bars2")
    plot_spearman_bars(res["spearman_table"], tmp_path)
    plot_output_by_uncertainty(df, tmp_path)
    plot_latency_fit(df, res["latency_model"], tmp_path)
    plot_spearman_heatmap(pd.concat([res["spearman_table"], other.assign(platform="cuda")]), tmp_path)
    for stem in ("bars2", "spearman", "output_by_uncertainty", "latency_fit", "spearman_heatmap"):
        for ext in ("png", "svg"):
            assert (tmp_path / f"{stem}.{ext}").stat().st_size > 1000, (stem, ext)


# ------------------------------------------------------------------ real profile: task, notebook, reference
pytestmark = pytest.mark.filterwarnings("ignore::PendingDeprecationWarning")  # seaborn heatmap internals


@pytest.fixture(scope="module")
def six_rows(tmp_path_factory) -> Path:
    import pandas as pd

    assert REAL_PROFILE.is_file(), "the committed reference profile is missing"
    p = tmp_path_factory.mktemp("profile") / "profile.parquet"
    pd.read_parquet(REAL_PROFILE).head(40).to_parquet(p, index=False)
    return p


def _cli(args, out_dir):
    env = {**os.environ, "RTLM_OUTPUT_DIR": str(out_dir), "RTLM_ROOT": str(ROOT)}
    return subprocess.run([sys.executable, "-m", "rtlm_lab.tasks.uncertainty", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=180)


@pytest.fixture(scope="module")
def task_run(six_rows, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("outputs")
    res = _cli([f"profile={six_rows}", "n_bootstrap=50", f"spread={SPREAD}"], out)
    assert res.returncode == 0, res.stderr[-3000:]
    return out / "uncertainty" / "gemma3_270m" / "cpu"


def test_analyze_real_profile(six_rows):
    res = analyze(pd.read_parquet(six_rows), n_bootstrap=50)
    assert res["n"] == 40 and res["lm"] == "gemma3_270m" and res["platform"] == "cpu"
    assert len(res["scores"]) == 40 and {"total", "n_output_tokens", "e2e_s"} <= set(res["scores"].columns)
    json.dumps(to_jsonable(res), allow_nan=False)


def test_task_writes_metrics_scores_figures(task_run, six_rows):
    metrics = json.loads((task_run / "metrics.json").read_text())
    assert metrics["n"] == 40 and metrics["n_bootstrap"] == 50
    assert metrics["provenance"]["profile"] == str(six_rows) and metrics["provenance"]["profile_sha256"]
    assert len(metrics["spearman_table"]) == len(FEATURES)
    assert len(pd.read_parquet(task_run / "scores.parquet")) == 40
    for stem in ("spearman", "output_by_uncertainty", "latency_fit", "spearman_heatmap", "spread_table"):
        for ext in ("png", "svg"):
            assert (task_run / f"{stem}.{ext}").is_file(), stem
    from rtlm_lab.uncertainty.spread import COLUMNS, TARGETS

    spread = pd.read_csv(task_run / "spread_table.csv")
    assert list(spread.columns) == COLUMNS and set(spread["target"]) == set(TARGETS)
    assert set(spread["lm"]) == {"dialogpt_ccc"}  # labelled by the spread profile, not the config
    assert metrics["spread"]["profiles"] == [str(SPREAD)] and len(metrics["spread"]["table"]) == len(spread)


def test_task_missing_profile_is_one_line(tmp_path):
    from conftest import run_task

    def _cli(args, out_dir):  # in this process (the task_run fixture runs the real command line)
        return run_task("uncertainty", args, out_dir, env={"RTLM_ROOT": str(ROOT)})

    res = _cli(["lm=smollm2_135m", f"profile={tmp_path}/nope.parquet"], tmp_path)
    assert res.returncode == 2
    lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:") and "rtlm-profile lm=smollm2_135m" in lines[0]
    res = _cli(["lm=smollm2_135m"], tmp_path)                 # default path under RTLM_OUTPUT_DIR
    assert res.returncode == 2 and res.stderr.strip().startswith("error: no profile at")


def test_reference_from_runs(task_run, tmp_path):
    from rtlm_lab.uncertainty.reference import SUMMARY_COLUMNS, build_reference

    other = json.loads((task_run / "metrics.json").read_text())
    other["lm"] = "smollm2_135m"
    for r in other["spearman_table"]:
        r["lm"] = "smollm2_135m"
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "metrics.json").write_text(json.dumps(other))
    summary = build_reference([task_run, tmp_path / "other" / "metrics.json"], tmp_path / "ref")
    csv = pd.read_csv(tmp_path / "ref" / "summary.csv")
    assert list(csv.columns) == SUMMARY_COLUMNS and len(csv) == 2 * len(FEATURES) == len(summary)
    assert set(csv["lm"]) == {"gemma3_270m", "smollm2_135m"}
    assert (tmp_path / "ref" / "spearman_heatmap.png").is_file()
    prov = json.loads((tmp_path / "ref" / "provenance.json").read_text())
    assert len(prov["sources"]) == 2
    from rtlm_lab.errors import UserError

    with pytest.raises(UserError):
        build_reference([tmp_path / "missing"], tmp_path / "ref2")


def test_notebook_runs_with_papermill(six_rows, tmp_path):
    import nbformat
    import papermill

    nb = nbformat.read(NOTEBOOK, as_version=4)
    assert nb.metadata["kernelspec"]["name"] == "python3"
    assert "parameters" in nb.cells[1].metadata.get("tags", [])
    assert all(not c.get("outputs") and c.get("execution_count") is None for c in nb.cells if c.cell_type == "code")
    out_dir = tmp_path / "nb"
    papermill.execute_notebook(str(NOTEBOOK), str(tmp_path / "out.ipynb"), kernel_name="python3",
                               parameters={"lm": "gemma3_270m", "platform": "cpu", "profile": str(six_rows),
                                           "output_dir": str(out_dir), "n_bootstrap": 50, "spread": str(SPREAD)},
                               progress_bar=False, cwd=str(ROOT / "notebooks"))
    metrics = json.loads((out_dir / "metrics.json").read_text())
    assert metrics["n"] == 40 and metrics["provenance"]["config"]["n_bootstrap"] == 50
    assert (out_dir / "spearman.png").is_file() and (out_dir / "latency_fit.svg").is_file()
    assert (out_dir / "spread_table.csv").is_file() and (out_dir / "spread_table.png").is_file()


def test_find_profile_prefers_the_largest(tmp_path):
    from rtlm_lab.uncertainty.analysis import find_profile

    small = tmp_path / "profile" / "gemma3_270m" / "cpu" / "test-n5-s0" / "profile.parquet"
    small.parent.mkdir(parents=True)
    pd.read_parquet(REAL_PROFILE).head(5).to_parquet(small, index=False)
    assert find_profile("gemma3_270m", "cpu", tmp_path) == REAL_PROFILE  # a quick run never hides it
    assert find_profile("nope", "cpu", tmp_path) is None
