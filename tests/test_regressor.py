"""Tests of RT-LM's output-length regressor (rtlm_lab.regressor), ``rtlm-train-regressor``, the
recalibration experiment and notebook 02.

Data: real CCC request texts with their **real** output lengths from the committed reference profile
``outputs/reference/profiles/gemma3_270m__cuda.parquet`` (skipped when absent). The distribution-shift test
doubles those real lengths. The CLI / multirun / notebook tests run on a 25-conversation (89-request) slice of that profile;
the whole file takes ~45 s on 2 loaded cores.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import joblib
import numpy as np
import pandas as pd
import pytest

from rtlm_lab.errors import UserError
from rtlm_lab.regressor import FEATURE_NAMES, LengthPredictor
from rtlm_lab.regressor.evaluate import compare, pairwise_accuracy, split_by_conversation
from rtlm_lab.regressor.recalibration import recovery_index, run_recalibration

ROOT = Path(__file__).resolve().parent.parent
REF = ROOT / "outputs" / "reference" / "profiles" / "gemma3_270m__cuda.parquet"
NOTEBOOK = ROOT / "notebooks" / "02_length_regressor.ipynb"
ALL_METHODS = ["rtlm_ridge", "constant", "input_length", "proxy_minilm", "ltr_minilm", "finetuned_minilm",
               "finetuned_minilm_rank", "oracle"]

pytestmark = pytest.mark.skipif(not REF.is_file(), reason="no reference profile gemma3_270m__cuda")


@pytest.fixture(scope="module")
def profile() -> pd.DataFrame:
    return pd.read_parquet(REF)


@pytest.fixture(scope="module")
def data(profile):
    """300 real texts + lengths, and their features (computed once for the module)."""
    df = profile.iloc[:300].reset_index(drop=True)
    texts = df["text"].fillna("").tolist()
    X = LengthPredictor().featurize(texts)
    return texts, df["n_output_tokens"].to_numpy(float), X


@pytest.fixture(scope="module")
def small_profile(tmp_path_factory, profile) -> Path:
    conv = profile["request_id"].str.rsplit("-", n=1).str[0]
    keep = conv.isin(conv.unique()[:25])
    p = tmp_path_factory.mktemp("prof") / "small.parquet"
    profile[keep].to_parquet(p)
    return p


def test_features_shape_and_odd_texts():
    odd = ["", "🙂🙂🙂", "a " * 50_000, None, "   \n\t", "?" * 1000, "Hi!"]
    X = LengthPredictor().featurize(odd)
    assert X.shape == (len(odd), len(FEATURE_NAMES)) and np.isfinite(X).all()


@pytest.mark.parametrize("kind", ["ridge", "hgb", "quantile", "mlp"])
def test_fit_predict_quantile_kinds(kind, data):
    texts, y, X = data
    m = LengthPredictor(kind=kind).fit(texts[:150], y[:150], X=X[:150])
    p = m.predict_from_features(X[150:])
    assert p.shape == (150,) and np.isfinite(p).all() and (p >= 0).all()
    assert np.mean(np.abs(p - y[150:])) < 2 * np.mean(np.abs(y[150:] - y[:150].mean()))  # sane, not exact
    p50 = m.predict_quantile(None, 0.5, X=X[150:])
    p90 = m.predict_quantile(None, 0.9, X=X[150:])
    assert np.mean(p90 >= p50) > 0.9 and np.mean(y[150:] <= p90) > 0.6
    assert m.n_features_in_ == len(FEATURE_NAMES) and hasattr(m, "model_")


def test_public_api_from_texts_and_odd_texts(data):
    texts, y, _ = data
    m = LengthPredictor(kind="ridge").fit(texts[:150], y[:150])
    odd = ["", "🙂", "x" * 100_000, None, "what? why? how??"]
    for out in (m.predict(odd), m.predict_quantile(odd, 0.9)):
        assert out.shape == (5,) and np.isfinite(out).all() and (out >= 0).all()
    assert m.predict([]).shape == (0,)
    m.update("", 10)
    m.update(["🙂", "x" * 100_000], [3, 200])
    assert np.isfinite(m.predict(odd)).all()
    with pytest.raises(UserError):
        m.predict_quantile(odd, 1.5)


def test_sklearn_conventions(data):
    from sklearn.base import clone

    texts, y, X = data
    m = LengthPredictor(kind="hgb", alpha=2.0)
    c = clone(m)
    assert c.get_params()["alpha"] == 2.0 and not hasattr(c, "model_")
    m.fit(None, y[:100], X=X[:100])
    import io

    buf = io.BytesIO()
    joblib.dump(m, buf)
    buf.seek(0)
    assert np.array_equal(joblib.load(buf).predict_from_features(X[100:]), m.predict_from_features(X[100:]))


def test_update_recovers_from_distribution_shift(data):
    """Fit on real lengths; serve requests whose LM answers twice as long; update() must cut the error."""
    texts, y, X = data
    m = LengthPredictor(kind="ridge").fit(None, y[:150], X=X[:150])
    ys = 2 * y[150:]
    frozen = m.predict_from_features(X[150:])
    online = []
    for i in range(150):
        online.append(m.predict_from_features(X[150 + i:151 + i])[0])
        m.update(None, ys[i], X=X[150 + i:151 + i])
    online = np.array(online)
    late = slice(50, 150)
    mae_frozen, mae_online = (float(np.mean(np.abs(p[late] - ys[late]))) for p in (frozen, online))
    assert mae_online < 0.8 * mae_frozen
    assert m.n_updates_ == 150
    m.reset_recalibration()
    assert np.allclose(m.predict_from_features(X[150:]), frozen)


def test_save_load_roundtrip_and_bad_files(tmp_path, data):
    texts, y, X = data
    m = LengthPredictor(kind="quantile").fit(None, y[:150], X=X[:150])
    m.update(None, 40, X=X[:1])
    path = m.save(tmp_path / "p.joblib")
    back = LengthPredictor.load(path)
    assert np.array_equal(back.predict_from_features(X[150:]), m.predict_from_features(X[150:]))
    assert np.array_equal(back.predict_quantile(None, 0.9, X=X[150:]), m.predict_quantile(None, 0.9, X=X[150:]))
    assert back.saved_versions_["scikit-learn"]
    bad = tmp_path / "bad.joblib"
    bad.write_bytes(b"\x80\x04not a pickle at all")
    with pytest.raises(UserError) as e:
        LengthPredictor.load(bad)
    assert "\n" not in str(e.value)
    foreign = tmp_path / "foreign.joblib"
    joblib.dump({"a": 1}, foreign)
    with pytest.raises(UserError, match="not a LengthPredictor"):
        LengthPredictor.load(foreign)
    payload = joblib.load(path)
    payload["versions"]["scikit-learn"] = "0.1.0"
    old = tmp_path / "old.joblib"
    joblib.dump(payload, old)
    with pytest.raises(UserError, match="scikit-learn 0.1.0"):
        LengthPredictor.load(old)
    assert LengthPredictor.load(old, strict_versions=False).n_updates_ == 1
    with pytest.raises(UserError, match="no predictor file"):
        LengthPredictor.load(tmp_path / "missing.joblib")


def test_metric_known_answers():
    y = np.array([1, 2, 3, 4.0])
    assert pairwise_accuracy(y, y) == 1.0
    assert pairwise_accuracy(y, -y) == 0.0
    assert pairwise_accuracy(y, np.zeros(4)) == 0.5
    assert recovery_index(np.array([np.nan, 5, 3, 2, 2]), 2.0, 0.1) == 3
    assert recovery_index(np.array([np.nan, 1, 3, 2, 2]), np.array([2, 2, 2, 2, 2.0]), 0.1) == 3
    assert recovery_index(np.array([1, 1, 5.0]), 2.0) is None


def test_compare_split_by_conversation_and_deterministic(profile):
    df = profile.iloc[:200].reset_index(drop=True)
    tr, te = split_by_conversation(df, 0.3, 0)
    conv = df["request_id"].str.rsplit("-", n=1).str[0].to_numpy()
    assert not set(conv[tr]) & set(conv[te])
    a = compare(df, {"kind": "ridge"}, n_bootstrap=50, embedding_baselines=False)
    b = compare(df, {"kind": "ridge"}, n_bootstrap=50, embedding_baselines=False)
    cols = [c for c in a["table"].columns if c != "us_per_prompt"]
    pd.testing.assert_frame_equal(a["table"][cols], b["table"][cols])
    t = a["table"].set_index("method")
    assert list(t.index) == ["rtlm_ridge", "constant", "input_length", "oracle"]
    assert t.loc["oracle", "kendall_tau"] == 1.0 and t.loc["oracle", "mae"] == 0.0
    assert math.isnan(t.loc["constant", "kendall_tau"]) and t.loc["constant", "pairwise_acc"] == 0.5
    r = t.loc["rtlm_ridge"]
    assert r.tau_ci_low <= r.kendall_tau <= r.tau_ci_high and r.us_per_prompt > 0


def test_recalibration_experiment(profile):
    src = profile.iloc[:120].reset_index(drop=True)
    tgt = profile.iloc[120:300].reset_index(drop=True).assign(n_output_tokens=lambda d: 3 * d["n_output_tokens"])
    res = run_recalibration(src, tgt, {"kind": "ridge"}, window=30)
    assert res["mae_adaptive"] < 0.7 * res["mae_frozen"]
    c = res["curves"]
    assert len(c) == 180 and c["rolling_mae_adaptive"].iloc[29:].notna().all()
    assert res["recovery_index"] is None or 0 <= res["recovery_index"] < 180


def _env(tmp_path):
    return {**os.environ, "RTLM_OUTPUT_DIR": str(tmp_path), "HF_HUB_OFFLINE": "1", "MPLBACKEND": "Agg"}


def test_cli_writes_metrics_with_all_methods(tmp_path, small_profile):
    res = subprocess.run([sys.executable, "-m", "rtlm_lab.tasks.train_regressor", f"profile={small_profile}",
                          "platform=cuda", "n_bootstrap=20", "timing_n=8", "finetuned_proxy.epochs=1",
                          "finetuned_proxy.max_length=32"], env=_env(tmp_path), capture_output=True, text=True,
                         timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    run_dir = tmp_path / "train_regressor" / "gemma3_270m" / "cuda" / "ridge"
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert [m["method"] for m in metrics["methods"]] == ALL_METHODS
    assert metrics["split"]["n_test"] > 0 and metrics["provenance"]["profile_sha256"]
    for f in ("predictor.joblib", "comparison.png", "comparison.svg", "predictions.csv"):
        assert (run_dir / f).is_file()
    LengthPredictor.load(run_dir / "predictor.joblib").predict(["how are you?"])


def test_cli_missing_profile_is_one_line(tmp_path):
    from conftest import run_task

    res = run_task("train_regressor", [f"profile={tmp_path / 'nope.parquet'}"], tmp_path,
                   env={"HF_HUB_OFFLINE": "1", "MPLBACKEND": "Agg"})
    assert res.returncode == 2 and "rtlm-profile" in res.stderr
    assert len([ln for ln in res.stderr.splitlines() if ln.startswith("error:")]) == 1


# make test-full: rtlm-train-regressor stays in the fast suite (test_cli_writes_metrics_with_all_methods),
# and so does a Hydra multirun (test_launchers.py, rtlm-schedule through joblib)
@pytest.mark.slow
def test_cli_multirun(tmp_path, small_profile):
    res = subprocess.run([sys.executable, "-m", "rtlm_lab.tasks.train_regressor", "-m", "regressor=ridge,hgb",
                          "platform=cuda", f"profile={small_profile}", "n_bootstrap=10", "embedding_baselines=false",
                          "finetuned_proxy.enabled=false", "figures=false"], env=_env(tmp_path), capture_output=True,
                         text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-2000:]
    for kind in ("ridge", "hgb"):
        m = json.loads((tmp_path / "train_regressor" / "gemma3_270m" / "cuda" / kind / "metrics.json").read_text())
        assert m["methods"][0]["method"] == f"rtlm_{kind}"


def test_notebook_runs_with_papermill(tmp_path, small_profile):
    import papermill as pm

    out_dir = tmp_path / "nb02"
    pm.execute_notebook(str(NOTEBOOK), str(tmp_path / "out.ipynb"), cwd=str(ROOT), kernel_name="python3",
                        parameters={"profile": str(small_profile), "n_bootstrap": 20, "output_dir": str(out_dir),
                                    "recal_target": "gemma3_270m", "recal_target_profile": str(small_profile)},
                        progress_bar=False)
    metrics = json.loads((out_dir / "metrics.json").read_text())
    # the notebook leaves the fine-tuned MiniLM out (its LM-state section shows the committed rows)
    assert [m["method"] for m in metrics["methods"]] == [m for m in ALL_METHODS if not m.startswith("finetuned_")]
    assert "recalibration" in metrics
    assert (out_dir / "comparison.png").is_file() and (out_dir / "recalibration.svg").is_file()
    assert (out_dir / "lmstate_vs_baselines.png").is_file()  # the committed five-LM LM-state view


def test_notebook_is_clean():
    nb = json.loads(NOTEBOOK.read_text())
    assert nb["metadata"]["kernelspec"]["name"] == "python3"
    code = [c for c in nb["cells"] if c["cell_type"] == "code"]
    assert "parameters" in code[0]["metadata"].get("tags", [])
    assert all(not c.get("outputs") and c.get("execution_count") is None for c in code)


def test_lmstate_rows_take_each_lms_largest_training_set(tmp_path):
    """summary.csv's LM-state rows: one row set per LM, from its metrics file with the most training rows,
    refinement rows named refine@k; a rebuild replaces earlier LM-state rows instead of adding to them."""
    import json

    import pandas as pd

    from rtlm_lab.regressor.reference import with_lmstate_rows

    def write(name, n_train, tau):
        m = {"lm": "lmx", "platform": "cpu", "split": {"n_train": n_train, "n_test": 10},
             "methods": [{"method": "lmstate_ridge", "kendall_tau": tau}],
             "refine": [{"k": 8, "method": "refine+repfeat+gated_loop", "kendall_tau": tau + 0.1},
                        {"k": 8, "method": "refine_probe", "kendall_tau": 0.0}]}
        (tmp_path / name).write_text(json.dumps(m))

    write("lmx__cpu__small.metrics.json", 300, 0.2)
    write("lmx__cpu__big.metrics.json", 5000, 0.5)
    base = pd.DataFrame([{"lm": "lmx", "platform": "cpu", "method": "input_length", "kendall_tau": 0.3}])
    once = with_lmstate_rows(base, tmp_path)
    twice = with_lmstate_rows(once, tmp_path)
    new = twice[twice["platform"] == "cpu+cuda"].set_index("method")["kendall_tau"]
    assert dict(new) == {"lmstate_ridge": 0.5, "refine@8:refine+repfeat+gated_loop": 0.6}
    assert len(twice) == len(once) == 3
    assert "train 5000" in twice.loc[twice["method"] == "lmstate_ridge", "data_set"].iloc[0]
