"""Notebook 03 (scheduler) under papermill: sim mode on the committed Gemma CPU reference profile, real mode
on a tiny random-initialised GPT-2 served as the LM (true lengths from a 40-row slice of that profile, actual
lengths from real ``generate``); plus the RT-LM batching-wait regression the notebook's sweep uncovered."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pandas as pd
import pytest

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOK = ROOT / "notebooks" / "03_scheduler.ipynb"
REF_PROFILE = ROOT / "outputs" / "reference" / "profiles" / "gemma3_270m__cpu.parquet"
needs_profile = pytest.mark.skipif(not REF_PROFILE.is_file(), reason="no committed gemma3_270m cpu profile")


def _run(tmp_path, **params) -> dict:
    import papermill as pm

    out_dir = tmp_path / "nb03"
    pm.execute_notebook(str(NOTEBOOK), str(tmp_path / "out.ipynb"), cwd=str(ROOT), kernel_name="python3",
                        parameters={"out_dir": str(out_dir), **params}, progress_bar=False)
    return json.loads((out_dir / "metrics.json").read_text())


def test_notebook_is_clean():
    nb = json.loads(NOTEBOOK.read_text())
    assert nb["metadata"]["kernelspec"]["name"] == "python3"
    assert nb["cells"][0]["cell_type"] == "markdown"
    code = [c for c in nb["cells"] if c["cell_type"] == "code"]
    assert "parameters" in code[0]["metadata"].get("tags", [])
    assert all(not c.get("outputs") and c.get("execution_count") is None for c in code)


def test_rtlm_batch_wait_ends_at_its_wake_time():
    """At ``now = arrival + batch_wait_s`` (float sum) RT-LM must serve the head, not ask to be woken at ``now``
    again: the simulator drops wake-ups that are not in the future, so the last request was lost."""
    from rtlm_lab.scheduler.policies import Request, WorkerView, make_policy
    from rtlm_lab.scheduler.service import ServiceModel

    pol = make_policy("rtlm", {"max_batch": 4, "batch_wait_s": 0.05, "offload": False})
    arrival = 63.43155332744413  # 63.43155332744413 + 0.05 - 63.43155332744413 < 0.05 in floating point
    req = Request("r", "hi", "", arrival, 5, 10, pred={"pred_rtlm": 10.0, "uncertainty": 0.2})
    svc = ServiceModel(0.1, 0.0, 0.01)
    now = arrival + 0.05
    out, wake = pol.select([req], [WorkerView("main", "main", True, now, 4, svc)], now)
    assert [a.requests for a in out] == [[req]] and wake is None
    out, wake = pol.select([req], [WorkerView("main", "main", True, arrival, 4, svc)], arrival)  # still waits
    assert out == [] and wake == pytest.approx(arrival + 0.05) and wake > arrival


@needs_profile
def test_notebook_sim(tmp_path, monkeypatch):
    monkeypatch.setenv("RTLM_OUTPUT_DIR", str(tmp_path / "outputs"))
    policies = ["fcfs", "sjf_input", "sjf_proxy", "ltr", "oracle_sjf", "rtlm"]
    m = _run(tmp_path, n_requests=16, rho=0.9, rhos=[0.5, 0.9], policies=policies,
             overrides=["scheduler.overhead_samples=2"])
    out_dir = tmp_path / "nb03"
    assert m["mode"] == "sim" and m["lm"] == "gemma3_270m" and m["policies"] == policies
    assert [r["policy"] for r in m["table"]] == policies
    assert all(r["n_completed"] == 16 for r in m["table"])
    fcfs = next(r for r in m["normalized"]["fcfs"] if r["policy"] == "fcfs")
    assert fcfs["mean_rt_s_vs_fcfs"] == pytest.approx(1.0)
    oracle = next(r for r in m["normalized"]["oracle"] if r["policy"] == "oracle_sjf")
    assert oracle["mean_rt_s_vs_oracle"] == pytest.approx(1.0)
    assert len(m["sweep"]) == 2 * len(policies) and {r["rho"] for r in m["sweep"]} == {0.5, 0.9}
    assert set(m["predictions"]) == {"sjf_proxy", "rtlm"} and m["predictions"]["rtlm"]["n"] == 16
    assert sum(m["batch_size_hist"]["fcfs"].values()) == 16  # one request per batch
    for stem in ("response_cdf", "rt_vs_rho", "p99_vs_rho", "batches_predictions"):
        assert (out_dir / f"{stem}.png").is_file() and (out_dir / f"{stem}.svg").is_file()
    assert m["provenance"]["profile_sha256"] and m["provenance"]["config"]["mode"] == "sim"
    # every run is a plain run_experiment run dir, one per (policy, rho)
    assert len(m["runs"]) == 2 * len(policies)
    assert all((Path(d) / "requests.parquet").is_file() for d in m["runs"].values())


@needs_profile
def test_notebook_real_tiny_model(tmp_path, monkeypatch, tiny_causal_dir):
    monkeypatch.setenv("RTLM_OUTPUT_DIR", str(tmp_path / "outputs"))
    profile = tmp_path / "profile.parquet"
    pd.read_parquet(REF_PROFILE).head(40).to_parquet(profile, index=False)
    m = _run(tmp_path, mode="real", lm="dialogpt_ccc", lm_dir=str(tiny_causal_dir), profile=str(profile),
             lm_overrides={"max_input_tokens": 128, "max_new_tokens": 24, "stop_strings": ["e"]},
             policies=["fcfs", "rtlm"], n_requests=6, rho=0.9,
             overrides=["scheduler.calibration_repeats=1", "scheduler.calibration_tokens=8"])
    assert m["mode"] == "real" and m["sweep"] is None
    assert m["lm"] == f"dialogpt_ccc-{tiny_causal_dir.name}"  # its own name: its calibration stays apart
    assert m["service_model"]["source"].startswith("calibration")
    assert [r["n_completed"] for r in m["table"]] == [6, 6]
    assert m["predictions"]["rtlm"]["n"] == 6
    rec = pd.read_parquet(Path(m["runs"]["rtlm@rho0.9"]) / "requests.parquet")
    assert len(rec) == 6 and (rec["actual_tokens"] <= 24).all() and rec["pred_tokens"].notna().all()
    assert not math.isnan(m["table"][0]["mean_rt_s"])
    cache = tmp_path / "outputs" / "schedule" / "service" / f"dialogpt_ccc-{tiny_causal_dir.name}__cpu.json"
    assert cache.is_file()
