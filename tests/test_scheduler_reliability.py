"""Scheduler reliability: a 10x burst through the real executor, and determinism end to end (the predictors,
the seeded workload + simulated schedule built from a real profile, and real tiny-model generation).

``tests/test_scheduler.py`` already covers the simulator alone on a synthetic trace
(``test_simulation_is_deterministic``), OOM splitting and a killed offload worker."""

from __future__ import annotations

import time
import tracemalloc
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from conftest import ROOT, tiny_spec
from rtlm_lab.scheduler.core import RECORD_COLUMNS, WorkerSpec
from rtlm_lab.scheduler.policies import Request, make_policy
from rtlm_lab.scheduler.service import ServiceModel

PROFILE = ROOT / "outputs" / "reference" / "profiles" / "gemma3_270m__cpu.parquet"
SVC = ServiceModel(ttft_a=0.05, ttft_b=0.001, step_1=0.01, step_slope=0.002)


def _rss_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def _reset_peak_rss() -> bool:
    """Reset the kernel's RSS high-water mark (VmHWM) of this process (Linux >= 4.0)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


# ================================================================================================ 10x burst
N_BURST, MAX_NEW, MAX_BATCH = 1000, 4, 16


def test_burst_1000_requests_in_one_second_real_executor(tiny_causal_dir, ccc_sample, record_property):
    """1,000 requests arrive within one second (the executor serves ~150 req/s here, so the queue holds
    hundreds); real ``generate`` calls serve them through the RT-LM policy. Every request completes exactly
    once, in batches of at most 16, and memory stays bounded."""
    from rtlm_lab.lm import load_lm
    from rtlm_lab.scheduler.executor import execute

    lm = load_lm(tiny_spec(tiny_causal_dir, max_new_tokens=MAX_NEW))
    texts = [t for t in ccc_sample if 0 < len(t) < 200]
    rng = np.random.default_rng(0)
    arrivals = np.sort(rng.random(N_BURST))  # all within [0, 1) s
    reqs = []
    for i, a in enumerate(arrivals):
        true = int(rng.integers(1, MAX_NEW + 1))
        reqs.append(Request(request_id=f"burst{i:04d}", text=texts[i % len(texts)], context="", arrival_s=float(a),
                            n_input_tokens=10, true_tokens=true, isolated_s=SVC.isolated(10, true),
                            pred={"pred_rtlm": float(rng.integers(1, MAX_NEW + 1)), "uncertainty": float(rng.random())}))
    calls: list[int] = []

    def decode(ts, cs):
        calls.append(len(ts))
        return lm.generate(ts, cs)

    decode(texts[:2], ["", ""])  # warm-up outside the measured window
    calls.clear()
    reset = _reset_peak_rss()
    rss0 = _rss_kib("VmRSS")
    tracemalloc.start()
    t0 = time.perf_counter()
    df, m = execute(reqs, make_policy("rtlm", {"max_batch": MAX_BATCH}), decode,
                    [WorkerSpec("main", "main", MAX_BATCH, SVC)], progress=False)
    wall = time.perf_counter() - t0
    _, py_peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    peak_rss = _rss_kib("VmHWM")
    growth_mib = (peak_rss - rss0) / 1024 if reset else float("nan")
    record_property("burst_wall_s", round(wall, 2))
    record_property("burst_peak_rss_mib", round(peak_rss / 1024, 1))
    record_property("burst_rss_growth_mib", round(growth_mib, 1))
    record_property("burst_python_peak_mib", round(py_peak / 2**20, 1))
    print(f"\n10x burst: {N_BURST} requests in {wall:.1f} s, {len(calls)} generate calls (mean batch "
          f"{np.mean(calls):.1f}), peak RSS {peak_rss / 1024:.0f} MiB (+{growth_mib:.0f} MiB over the run's start), "
          f"Python heap peak {py_peak / 2**20:.1f} MiB (tracemalloc)")

    # every request exactly once
    assert list(df.columns) == list(RECORD_COLUMNS) and len(df) == N_BURST
    assert sorted(df["request_id"]) == sorted(r.request_id for r in reqs)
    assert m["n_requests"] == m["n_completed"] == m["n_unique_completed"] == N_BURST
    assert sum(calls) == N_BURST and (df["retries"] == 0).all() and m["oom_splits"] == 0
    # batches of at most max_batch, and the burst did make the policy batch
    assert max(calls) <= MAX_BATCH and (df["batch_size"] <= MAX_BATCH).all() and np.mean(calls) >= 4
    assert df.groupby("batch_id")["request_id"].count().max() <= MAX_BATCH
    # sane times and tokens
    assert (df["start_s"] >= df["arrival_s"] - 1e-9).all() and (df["finish_s"] >= df["start_s"]).all()
    assert df["actual_tokens"].between(0, MAX_NEW).all() and np.isfinite(df["response_s"]).all()
    # memory: a 1,000-request queue costs little (loose bounds: the model is ~100 kB; RSS noise is allocator)
    assert py_peak < 200 * 2**20
    if reset:
        assert growth_mib < 1024, growth_mib


# ================================================================================================ determinism
@pytest.fixture(scope="module")
def profile_pool():
    if not PROFILE.is_file():
        pytest.skip("no committed gemma3_270m/cpu profile")
    from rtlm_lab.scheduler.predictions import split_pool

    profile = pd.read_parquet(PROFILE)
    train, held = split_pool(profile, 0.4, seed=0)
    return profile, train, held


def _fit_predict(train, held, seed=0):
    from rtlm_lab.scheduler.predictions import Predictors

    pred = Predictors(seed=seed).fit(train["text"].fillna("").tolist(), train["n_output_tokens"])
    return pred, pred.predict_many(held["text"].fillna("").tolist())


def test_predictors_and_sim_schedule_are_deterministic(profile_pool):
    """Same seed and config, fitted and built twice from scratch (no predictor cache) -> identical
    predictions (all four columns: ridge on uncertainty, MiniLM proxy, LTR), identical workload trace,
    identical simulated schedule and metrics. A different seed gives a different workload."""
    from rtlm_lab.scheduler.harness import make_trace, to_requests, workers_for
    from rtlm_lab.scheduler.sim import simulate

    profile, train, held = profile_pool
    pred_a, p_a = _fit_predict(train, held)
    pred_b, p_b = _fit_predict(train, held)
    pd.testing.assert_frame_equal(p_a, p_b, check_exact=True)
    assert set(p_a.columns) == {"pred_rtlm", "uncertainty", "pred_proxy", "ltr_score"} and len(p_a) == len(held)
    # one request at a time (the real executor's path) gives the batch values
    for i in (0, 7, 42):
        one, _ = pred_a.predict_one(str(held["text"].iloc[i]), ("pred_rtlm", "uncertainty", "pred_proxy", "ltr_score"))
        row = p_a.iloc[i].to_dict()
        assert {k: one[k] for k in ("pred_rtlm", "uncertainty")} == \
               pytest.approx({k: row[k] for k in ("pred_rtlm", "uncertainty")}, rel=1e-9, abs=1e-12)
        # MiniLM embeds one text vs a padded batch: float rounding differs (~3e-6 relative measured)
        assert {k: one[k] for k in ("pred_proxy", "ltr_score")} == \
               pytest.approx({k: row[k] for k in ("pred_proxy", "ltr_score")}, rel=1e-4)

    service = ServiceModel.from_profile(profile)
    workload = {"name": "poisson", "kind": "poisson", "rho": 1.2, "n_requests": 150}
    platform = {"name": "cpu", "max_batch": 8}

    def run(p, seed):
        h = held.copy()
        h["request_id"] = h["request_id"].astype(str)
        for c in p.columns:
            h[c] = p[c].to_numpy()
        trace, _ = make_trace(h, service, workload, seed)
        out = {}
        for name in ("fcfs", "rtlm", "sjf_proxy", "ltr"):
            pol = make_policy(name, {"max_batch": 8})
            reqs = to_requests(trace, service, keep_predictions=True)
            out[name] = simulate(reqs, pol, workers_for(pol, platform, service, None, 0), slo_k=5.0,
                                 prediction_s_per_request=0.001)
        return trace, out

    trace_a, runs_a = run(p_a, seed=3)
    trace_b, runs_b = run(p_b, seed=3)
    pd.testing.assert_frame_equal(trace_a, trace_b, check_exact=True)
    drop = ("decision_s", "overhead_s", "overhead_share")  # wall-clock time of the policy's decisions
    for name in runs_a:
        (ra, ma), (rb, mb) = runs_a[name], runs_b[name]
        pd.testing.assert_frame_equal(ra, rb, check_exact=True)
        assert {k: v for k, v in ma.items() if k not in drop} == {k: v for k, v in mb.items() if k not in drop}
        assert ma["n_unique_completed"] == 150
    assert not runs_a["rtlm"][0]["start_s"].equals(runs_a["fcfs"][0]["start_s"])  # the policies do differ
    trace_c, _ = make_trace(held.assign(request_id=held["request_id"].astype(str), **{c: p_a[c].to_numpy()
                            for c in p_a.columns}), service, workload, seed=4)
    assert not trace_c["arrival_s"].equals(trace_a["arrival_s"])


def test_generate_token_counts_are_deterministic(tiny_causal_dir, ccc_sample):
    """Two runs of ``ChatLM.generate`` with separately loaded copies of the same tiny model (and a different
    global RNG state) give the same tokens, alone and in batches."""
    import torch

    from rtlm_lab.lm import load_lm

    texts = [t for t in ccc_sample if 0 < len(t) < 200][:24]
    results = []
    for rng_seed in (1, 12345):
        torch.manual_seed(rng_seed)
        np.random.seed(rng_seed)
        lm = load_lm(tiny_spec(tiny_causal_dir))
        batched = [g for i in range(0, len(texts), 8) for g in lm.generate(texts[i:i + 8], [""] * 8)]
        single = [lm.generate([t], [""])[0] for t in texts[:8]]
        results.append((batched, single))
        del lm
    (b1, s1), (b2, s2) = results
    assert [g.output_ids for g in b1] == [g.output_ids for g in b2]
    assert [(g.n_output_tokens, g.stop_reason, g.text) for g in b1] == [(g.n_output_tokens, g.stop_reason, g.text)
                                                                         for g in b2]
    assert [g.output_ids for g in s1] == [g.output_ids for g in s2]
    assert [g.n_output_tokens for g in s1] == [g.n_output_tokens for g in b1[:8]]  # batch == batch 1
    assert len({g.n_output_tokens for g in b1}) > 1  # varied lengths: the check is not vacuous
