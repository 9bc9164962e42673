"""Notebook 03 (scheduler) under papermill: sim mode on the committed Gemma CPU reference profile, real mode
on a tiny random-initialised GPT-2 served as the LM (true lengths from a 40-row slice of that profile, actual
lengths from real ``generate``); plus the RT-LM batching-wait regression the notebook's sweep uncovered."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pandas as pd
import pytest

from conftest import CPU_THREADS

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


def _figures_ok(out_dir: Path, stems) -> None:
    for stem in stems:
        for ext in ("png", "svg"):
            f = out_dir / f"{stem}.{ext}"
            assert f.is_file() and f.stat().st_size > 1000, f


def _ratio(m: dict, policy: str, tag: str, stat: str = "mean") -> tuple[float, float, float]:
    r = next(r for r in m["normalized"][tag] if r["policy"] == policy)
    return tuple(r[f"{stat}_rt_s_vs_{tag}{suf}"] for suf in ("", "_lo", "_hi"))


def test_notebook_is_a_view():
    """Notebooks hold parameters, a call and displays: no logic (issue 17)."""
    nb = json.loads(NOTEBOOK.read_text())
    code = [c for c in nb["cells"] if c["cell_type"] == "code"]
    lines = [ln for c in code[1:] for ln in "".join(c["source"]).splitlines()
             if ln.strip() and not ln.lstrip().startswith("#")]
    assert len(lines) <= 40, len(lines)
    assert not any(ln.lstrip().startswith(("def ", "class ", "for ")) for ln in lines)
    params = "".join(code[0]["source"])
    assert 'engine = "auto"' in params and '"oracle_srpt"' in params


@needs_profile
def test_notebook_sim(tmp_path, monkeypatch):
    """Sim mode on the continuous engine, replaying the committed Gemma cpu engine capacity."""
    monkeypatch.setenv("RTLM_OUTPUT_DIR", str(tmp_path / "outputs"))
    policies = ["fcfs", "sjf_input", "sjf_proxy", "ltr", "oracle_srpt", "rtlm"]
    n = 16
    # no per-run response-time CDF (scheduler.figures=false: the study's own figures are checked below)
    m = _run(tmp_path, n_requests=n, rho=0.9, rhos=[0.5, 0.9], policies=policies, n_boot=200,
             overrides=["scheduler.figures=false", CPU_THREADS])
    out_dir = tmp_path / "nb03"
    assert m["mode"] == "sim" and m["lm"] == "gemma3_270m" and m["policies"] == policies
    assert m["engine"] == "continuous" and m["oracle"] == "oracle_srpt"
    # the committed measurement (the slots engine's, as no kv one of these budgets is committed: said so)
    src = m["capacity"]["source_file"]
    assert ".json" in src and "reference" in src and src.endswith("(the slots engine's: no kv measurement of these "
                                                                  "budgets yet)")
    assert [r["policy"] for r in m["table"]] == policies
    # every request accounted for: all completed, the warm-up share excluded from the measured ones only
    for r in m["table"]:
        assert r["n_completed"] == n and 0 < r["n_measured"] <= n
    for d in m["runs"].values():
        rec = pd.read_parquet(Path(d) / "requests.parquet")
        assert len(rec) == n and rec["request_id"].is_unique and rec["finish_s"].notna().all()
        assert (rec["response_s"] > 0).all() and (rec["actual_tokens"] >= 1).all()
    # the same trace for every policy (paired ratios)
    traces = {p: pd.read_parquet(Path(m["runs"][f"{p}@rho0.9"]) / "trace.parquet") for p in policies}
    for p in policies[1:]:
        assert traces[p][["request_id", "arrival_s"]].equals(traces["fcfs"][["request_id", "arrival_s"]])
    # the oracle row exists; its ratio to FCFS is finite, with a CI around it; nobody beats it by much
    ratio, lo, hi = _ratio(m, "oracle_srpt", "fcfs")
    assert math.isfinite(ratio) and lo <= ratio <= hi and ratio <= 1.0 + 1e-9
    rows = {r["policy"]: r for r in m["ratios"]}
    assert set(rows) == set(policies) and all(math.isfinite(r["mean_rt_vs_oracle"]) for r in rows.values())
    assert all(r["mean_rt_vs_oracle"] >= 0.9 for r in rows.values())
    assert len(m["sweep"]) == 2 * len(policies) and {r["rho"] for r in m["sweep"]} == {0.5, 0.9}
    assert set(m["predictions"]) == {"sjf_proxy", "rtlm"} and m["predictions"]["rtlm"]["n"] == n
    assert sum(m["running_seqs_hist"]["fcfs"].values()) > 0  # engine steps by running rows
    _figures_ok(out_dir, ("response_cdf", "rt_vs_rho", "p99_vs_rho", "batches_predictions"))
    assert m["provenance"]["profile_sha256"] and m["provenance"]["config"]["mode"] == "sim"
    # every run is a plain run_experiment run dir, one per (policy, rho)
    assert len(m["runs"]) == 2 * len(policies)
    assert all((Path(d) / "metrics.json").is_file() for d in m["runs"].values())
    # what rtlm-report reads of it: the oracle column is oracle_srpt's on the continuous engine
    from rtlm_lab.report import cell_headline

    head = cell_headline(tmp_path, {"03_scheduler": m})
    assert head["scheduler_mode"] == "sim" and head["oracle_mean_rt_vs_fcfs"] == pytest.approx(ratio)
    assert all(math.isfinite(head[k])
               for k in ("rtlm_mean_rt_vs_fcfs", "rtlm_p99_rt_vs_fcfs", "sjf_proxy_mean_rt_vs_fcfs"))


@needs_profile
def test_study_static_engine_and_missing_capacity(tmp_path, monkeypatch):
    """engine=static takes the static-batch path (no capacity file needed); sim on the continuous engine
    without a measured engine for the LM x platform stops with one UserError line, before any fitting."""
    from rtlm_lab.errors import UserError
    from rtlm_lab.scheduler.study import run_study

    monkeypatch.setenv("RTLM_OUTPUT_DIR", str(tmp_path / "outputs"))
    s = run_study(lm="gemma3_270m", platform="cpu", policies=["fcfs", "oracle_sjf"], n_requests=8, rho=0.9,
                  engine="static", out_dir=tmp_path / "static", overrides=["scheduler.overhead_samples=0"],
                  n_boot=50, figures=False)
    assert s.engine == "static" and s.oracle == "oracle_sjf" and s.summary["engine"] == "static"
    assert all(sum(h.values()) >= 1 for h in s.summary["batch_size_hist"].values())
    assert math.isfinite(s.normalized["fcfs"].loc["oracle_sjf", "mean_rt_s_vs_fcfs"])
    with pytest.raises(UserError, match="no measured engine for gemma3_270m on cuda"):
        run_study(lm="gemma3_270m", platform="cuda", policies=["fcfs"], n_requests=8, mode="sim",
                  out_dir=tmp_path / "cuda", profile=str(REF_PROFILE))


@needs_profile
def test_notebook_real_tiny_model(tmp_path, monkeypatch, tiny_causal_dir):
    monkeypatch.setenv("RTLM_OUTPUT_DIR", str(tmp_path / "outputs"))
    profile = tmp_path / "profile.parquet"
    pd.read_parquet(REF_PROFILE).head(40).to_parquet(profile, index=False)
    m = _run(tmp_path, mode="real", lm="dialogpt_ccc", lm_dir=str(tiny_causal_dir), profile=str(profile),
             lm_overrides={"max_input_tokens": 128, "max_new_tokens": 24, "stop_strings": ["e"]},
             policies=["fcfs", "oracle_srpt", "rtlm"], n_requests=6, rho=0.9, n_boot=50,
             overrides=["scheduler.capacity_requests=8", "scheduler.figures=false", CPU_THREADS])
    name = f"dialogpt_ccc-{tiny_causal_dir.name}"
    assert m["mode"] == "real" and m["sweep"] is None and m["engine"] == "continuous"
    assert m["lm"] == name  # its own name: its measured capacity stays apart
    assert [r["n_completed"] for r in m["table"]] == [6, 6, 6]
    assert m["predictions"]["rtlm"]["n"] == 6
    rec = pd.read_parquet(Path(m["runs"]["rtlm@rho0.9"]) / "requests.parquet")
    assert len(rec) == 6 and (rec["actual_tokens"] <= 24).all() and rec["pred_tokens"].notna().all()
    assert all(math.isfinite(r["mean_rt_s"]) and r["mean_rt_s"] > 0 for r in m["table"])
    ratio, lo, hi = _ratio(m, "oracle_srpt", "fcfs")
    assert math.isfinite(ratio) and lo <= ratio <= hi
    _figures_ok(tmp_path / "nb03", ("response_cdf", "batches_predictions"))
    caps = list((tmp_path / "outputs" / "schedule" / "capacity").glob(f"{name}__cpu__*.json"))
    assert len(caps) == 1  # measured once, replayed by every later policy
