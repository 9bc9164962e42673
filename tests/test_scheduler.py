"""Scheduler harness: workloads, service model, policies, simulator, real executor (tiny GPT-2 on the CPU),
the static-cache decoder and the ``rtlm-schedule`` CLI.

No timing assertions: the simulator runs on a virtual clock; real runs only check accounting (every request
served exactly once, records consistent), never how fast.
"""

from __future__ import annotations

import json
import math
import multiprocessing

import numpy as np
import pandas as pd
import pytest
import torch

from conftest import ROOT, schedule_cli, task_process, tiny_spec
from rtlm_lab.errors import UserError
from rtlm_lab.scheduler.core import RECORD_COLUMNS, WorkerSpec
from rtlm_lab.scheduler.policies import (POLICIES, RTLM, Assignment, Policy, Request, WorkerView, make_policy)
from rtlm_lab.scheduler.service import ServiceModel
from rtlm_lab.scheduler.sim import simulate
from rtlm_lab.scheduler.workload import arrival_times, build_trace, choose_requests, load_trace

# ------------------------------------------------------------------------------------------------ helpers
SVC = ServiceModel(ttft_a=0.05, ttft_b=0.001, step_1=0.01, step_slope=0.002)


def _req(rid, arrival=0.0, n_in=10, true=20, svc=SVC, **pred) -> Request:
    return Request(request_id=str(rid), text=f"text {rid}", context="", arrival_s=float(arrival),
                   n_input_tokens=int(n_in), true_tokens=int(true), pred=dict(pred),
                   isolated_s=svc.isolated(n_in, true))


def _main(idle=True, free_at=0.0, max_batch=1, svc=SVC, wid="main") -> WorkerView:
    return WorkerView(wid, "main", idle=idle, free_at=free_at, max_batch=max_batch, service=svc)


def _synthetic_trace(n, rho, seed, svc=SVC, kind="poisson", max_tokens=200):
    """Requests with varied lengths (perfect rtlm predictions; point-mass predicted quantiles and true length
    distributions for the distributional policies), arriving at load ``rho``."""
    rng = np.random.default_rng(seed)
    n_in = rng.integers(5, 60, n)
    true = rng.integers(1, max_tokens, n)
    mean_iso = float(np.mean([svc.isolated(a, b) for a, b in zip(n_in, true)]))
    t = arrival_times(kind, rho / mean_iso, n, seed=seed)
    out = [_req(f"r{i:04d}", t[i], n_in[i], true[i], svc=svc, pred_rtlm=float(true[i]), uncertainty=0.1,
                pred_proxy=float(true[i]), ltr_score=float(true[i]), pred_quantiles=(float(true[i]),) * 7)
           for i in range(n)]
    for r in out:  # a point-mass true length distribution (oracle_dist)
        r.true_dist = (int(r.true_tokens),)
    return out


# ================================================================================================ workload
@pytest.mark.parametrize("kind,params,tol", [("poisson", {}, 0.05), ("gamma", {"cv": 3.0}, 0.10),
                                             ("gamma", {"cv": 0.5}, 0.05), ("mmpp", {}, 0.15)])
def test_arrival_rate_is_the_requested_one(kind, params, tol):
    rate, n = 2.0, 20000
    t = arrival_times(kind, rate, n, seed=3, **params)
    assert len(t) == n and (np.diff(t) >= 0).all() and t[0] > 0
    assert abs(n / t[-1] - rate) / rate < tol


@pytest.mark.parametrize("cv", [0.5, 3.0])
def test_gamma_cv(cv):
    gaps = np.diff(np.r_[0.0, arrival_times("gamma", 5.0, 20000, seed=1, cv=cv)])
    assert gaps.std() / gaps.mean() == pytest.approx(cv, rel=0.1)


def test_mmpp_is_burstier_than_poisson():
    cv = {}
    for kind in ("poisson", "mmpp"):
        g = np.diff(np.r_[0.0, arrival_times(kind, 1.0, 20000, seed=0)])
        cv[kind] = g.std() / g.mean()
    assert cv["poisson"] == pytest.approx(1.0, abs=0.05)
    assert cv["mmpp"] > 1.3


@pytest.mark.parametrize("kind", ["poisson", "gamma", "mmpp"])
def test_arrivals_are_seeded(kind):
    a = arrival_times(kind, 1.0, 500, seed=7)
    assert np.array_equal(a, arrival_times(kind, 1.0, 500, seed=7))
    assert not np.array_equal(a, arrival_times(kind, 1.0, 500, seed=8))


def test_burst_is_all_zeros():
    t = arrival_times("burst", float("inf"), 17, seed=0)
    assert t.shape == (17,) and (t == 0).all()


@pytest.mark.parametrize("args,kw", [(("poisson", 0.0, 10), {}), (("poisson", -1.0, 10), {}),
                                     (("poisson", float("nan"), 10), {}), (("poisson", 1.0, 0), {}),
                                     (("nope", 1.0, 10), {}), (("gamma", 1.0, 10), {"cv": 0.0}),
                                     (("mmpp", 1.0, 10), {"burst_factor": 1.0}),
                                     (("mmpp", 1.0, 10), {"burst_share": 1.0})])
def test_bad_arrival_parameters_are_user_errors(args, kw):
    with pytest.raises(UserError):
        arrival_times(*args, **kw)


def test_build_trace_rate_and_bad_rho():
    reqs = pd.DataFrame({"request_id": [f"q{i}" for i in range(400)], "text": ["t"] * 400, "context": [""] * 400,
                         "n_input_tokens": np.arange(400) % 50 + 1, "true_tokens": np.arange(400) % 90 + 1})
    trace, info = build_trace(reqs, SVC, {"kind": "poisson", "rho": 0.8}, seed=0)
    iso = np.array([SVC.isolated(a, b) for a, b in zip(reqs["n_input_tokens"], reqs["true_tokens"])])
    assert info["mean_isolated_s"] == pytest.approx(iso.mean())
    assert info["rate_rps"] == pytest.approx(0.8 / iso.mean())
    assert list(trace.columns[:4]) == ["request_id", "text", "context", "arrival_s"]
    assert np.allclose(trace["isolated_s"], iso) and trace["arrival_s"].is_monotonic_increasing
    for rho in (0.0, -0.5):
        with pytest.raises(UserError):
            build_trace(reqs, SVC, {"kind": "poisson", "rho": rho})
    burst, info = build_trace(reqs, SVC, {"kind": "burst", "rho": 0.0})
    assert (burst["arrival_s"] == 0).all() and info["rate_rps"] is None


def test_choose_requests_repeats_with_suffix():
    pool = pd.DataFrame({"request_id": [f"p{i}" for i in range(5)], "text": list("abcde")})
    out = choose_requests(pool, 12, seed=0)
    assert len(out) == 12 and out["request_id"].is_unique
    ids = out["request_id"].tolist()
    assert sorted(ids[:5]) == sorted(pool["request_id"])
    assert sorted(ids[5:10]) == sorted(f"{r}#1" for r in pool["request_id"])
    assert all(r.endswith("#2") for r in ids[10:])
    assert out.equals(choose_requests(pool, 12, seed=0))
    assert ids != choose_requests(pool, 12, seed=1)["request_id"].tolist()
    small = choose_requests(pool, 3, seed=0)
    assert len(small) == 3 and not any("#" in r for r in small["request_id"])
    with pytest.raises(UserError):
        choose_requests(pool.iloc[:0], 3, seed=0)


def test_load_trace_checks(tmp_path):
    good = pd.DataFrame({"request_id": ["a", "b"], "text": ["x", "y"], "context": ["", ""],
                         "arrival_s": [0.0, 1.0], "n_input_tokens": [3, 4], "true_tokens": [5, 6]})
    good.to_parquet(tmp_path / "trace.parquet")
    assert load_trace(tmp_path / "trace.parquet").equals(good)
    pd.DataFrame({"a": [1], "b": [2]}).to_parquet(tmp_path / "other.parquet")
    (tmp_path / "junk.parquet").write_bytes(b"not a parquet file")
    good.iloc[::-1].to_parquet(tmp_path / "unsorted.parquet")
    for name, needle in (("other.parquet", "not a trace"), ("junk.parquet", "cannot read"),
                         ("unsorted.parquet", "non-decreasing"), ("missing.parquet", "no trace")):
        with pytest.raises(UserError, match=needle):
            load_trace(tmp_path / name)


# ================================================================================================ service model
def test_row_times_and_batch_time_are_consistent():
    s = ServiceModel(ttft_a=0.1, ttft_b=0.002, step_1=0.02, step_slope=0.005)
    rt = s.row_times([10, 30, 20], [5, 1, 12])
    pre = 0.1 + 0.002 * 3 * 30
    assert np.allclose(rt, pre + (0.02 + 0.005 * 2) * np.array([4, 0, 11]))
    assert s.batch_time([10, 30, 20], [5, 1, 12]) == pytest.approx(rt.max())
    assert s.isolated(10, 5) == pytest.approx(s.row_times([10], [5])[0]) == pytest.approx(0.1 + 0.02 + 0.02 * 4)
    assert s.row_times([10], [0])[0] == pytest.approx(s.row_times([10], [1])[0])  # < 1 token counts as 1
    assert s.batch_time([], []) == 0.0
    assert s.throughput_gain(1) == pytest.approx(1.0)
    assert s.throughput_gain(4) == pytest.approx(4 * 0.02 / (0.02 + 3 * 0.005))


def test_fit_recovers_known_parameters():
    a, b, s1, slope = 0.03, 0.0007, 0.012, 0.0015
    calls = []
    for B in (1, 2, 4, 8):
        for n_in in (8, 40, 120):
            calls.append({"batch": B, "max_input_tokens": n_in, "ttft_s": a + b * B * n_in,
                          "step_s": s1 + slope * (B - 1)})
    calls.append({"batch": 1, "max_input_tokens": 50, "ttft_s": a + b * 50, "step_s": float("nan")})
    m = ServiceModel.fit(calls)
    assert (m.ttft_a, m.ttft_b, m.step_1, m.step_slope) == pytest.approx((a, b, s1, slope), rel=1e-6)
    with pytest.raises(UserError):
        ServiceModel.fit([])
    with pytest.raises(UserError):
        ServiceModel.fit([{"batch": 1, "max_input_tokens": 5, "ttft_s": 0.1, "step_s": float("nan")}])


def test_from_profile_fits_batch1_and_rejects_batched():
    n_in = np.arange(10, 110, 5)
    prof = pd.DataFrame({"n_input_tokens": n_in, "ttft_s": 0.02 + 0.0004 * n_in, "n_output_tokens": 10,
                         "ms_per_token": 15.0, "batch_size": 1})
    m = ServiceModel.from_profile(prof, step_slope_rel=0.5)
    assert (m.ttft_a, m.ttft_b, m.step_1, m.step_slope) == pytest.approx((0.02, 0.0004, 0.015, 0.0075), rel=1e-6)
    with pytest.raises(UserError, match="batch-1"):
        ServiceModel.from_profile(prof.assign(batch_size=[1, 2] * (len(prof) // 2)))


def test_service_model_files(tmp_path):
    p = tmp_path / "svc.json"
    p.write_text(json.dumps(SVC.to_dict()))
    assert ServiceModel.load(p) == SVC
    for name, text in (("corrupt.json", "{not json"), ("missing.json", json.dumps({"ttft_a": 0.1, "ttft_b": 0})),
                       ("garbled.json", json.dumps({**SVC.to_dict(), "step_1": "fast"})),
                       ("zero.json", json.dumps({**SVC.to_dict(), "step_1": 0.0}))):
        (tmp_path / name).write_text(text)
        with pytest.raises(UserError):
            ServiceModel.load(tmp_path / name)
    with pytest.raises(UserError):
        ServiceModel.load(tmp_path / "absent.json")


# ================================================================================================ policies
def _order(name, reqs, now=100.0):
    pol = make_policy(name, {"max_batch": len(reqs)})
    (a,), _ = pol.select(reqs, [_main(max_batch=len(reqs))], now)
    return [r.request_id for r in a.requests]


def test_baseline_orderings():
    reqs = [_req("a", 0.0, n_in=50, true=30, pred_proxy=5.0, ltr_score=0.9),
            _req("b", 1.0, n_in=10, true=90, pred_proxy=40.0, ltr_score=0.1),
            _req("c", 2.0, n_in=30, true=2, pred_proxy=20.0, ltr_score=0.5)]
    assert _order("fcfs", reqs[::-1]) == ["a", "b", "c"]
    assert _order("sjf_input", reqs) == ["b", "c", "a"]
    assert _order("sjf_proxy", reqs) == ["a", "c", "b"]
    assert _order("ltr", reqs) == ["b", "c", "a"]
    assert _order("oracle_sjf", reqs) == ["c", "a", "b"]


def test_base_policy_serves_main_up_to_max_batch_then_offload_by_expected_delay():
    """Every policy gets the same workers on the static path: after the main worker's batch, an idle offload
    worker takes the first request expected to finish sooner there (the baselines without a length prediction
    assume the typical reply), never one the main worker would finish first."""
    reqs = [_req(i, i) for i in range(5)]
    pol = make_policy("fcfs", {"max_batch": 3})
    off = WorkerView("cpu0", "offload", idle=True, free_at=0.0, max_batch=1, service=SVC)
    out, wake = pol.select(reqs, [_main(max_batch=2), off], 10.0)
    # main busy with 0 and 1: request 2 would wait for them there, so the equally fast CPU worker takes it
    assert wake is None and [(a.worker_id, [r.request_id for r in a.requests]) for a in out] == [
        ("main", ["0", "1"]), ("cpu0", ["2"])]
    slow = WorkerView("cpu0", "offload", idle=True, free_at=0.0, max_batch=1,
                      service=ServiceModel(ttft_a=50.0, ttft_b=0.0, step_1=5.0))
    assert [a.worker_id for a in pol.select(reqs, [_main(max_batch=2), slow], 10.0)[0]] == ["main"]
    assert pol.select(reqs, [_main(idle=False, free_at=11.0), slow], 10.0) == ([], None)
    assert pol.select([], [_main()], 10.0) == ([], None)
    # the typical reply decides for a policy without a prediction: a long one makes the CPU's 5x slower
    # steps lose to waiting 0.5 s for the main worker, a short one makes them win
    cpu5 = WorkerView("cpu0", "offload", idle=True, free_at=0.0, max_batch=1,
                      service=ServiceModel(ttft_a=0.05, ttft_b=0.001, step_1=0.05))
    main_busy = _main(idle=False, free_at=10.5)
    pol.typical_tokens = 100.0
    assert pol.select(reqs[:1], [main_busy, cpu5], 10.0)[0] == []
    pol.typical_tokens = 2.0
    assert [a.worker_id for a in pol.select(reqs[:1], [main_busy, cpu5], 10.0)[0]] == ["cpu0"]
    # a CPU worker faster per request than the idle main worker takes the head first; main the next batch
    fast = WorkerView("cpu0", "offload", idle=True, free_at=0.0, max_batch=1,
                      service=ServiceModel(ttft_a=0.01, ttft_b=0.0, step_1=0.002))
    out, _ = pol.select(reqs, [_main(max_batch=2), fast], 10.0)
    assert [(a.worker_id, [r.request_id for r in a.requests]) for a in out] == [("cpu0", ["0"]), ("main", ["1", "2"])]
    # the oracle places with the true length (20 tokens here: ~1.05 s on the CPU against 0.5 + 0.26 s)
    oracle = make_policy("oracle_sjf")
    oracle.typical_tokens = 2.0
    assert oracle.select(reqs[:1], [main_busy, cpu5], 10.0)[0] == []


def test_every_policy_constructs_and_unknown_is_user_error():
    for name in POLICIES:
        pol = make_policy(name, {"name": name, "max_batch": 4, "aging": 0.01, "offload": True})
        assert pol.name == name and isinstance(pol, Policy)
        assert pol.describe()["name"] == name
    assert make_policy("rtlm_batch1", {"max_batch": 8}).max_batch == 1
    assert make_policy("rtlm_no_offload").offload is False
    assert make_policy("rtlm_no_aging", {"aging": 0.5}).aging == 0.0
    assert make_policy("rtlm_no_consolidation").consolidation is False
    assert make_policy("rtlm_no_uncertainty").uncertainty_weight == 0.0
    with pytest.raises(UserError, match="unknown policy"):
        make_policy("nope")
    for bad in ({"max_batch": 0}, {"length_window": 0.5}, {"aging": -1}):
        with pytest.raises(UserError):
            make_policy("rtlm", bad)


def _rtlm(**kw) -> RTLM:
    kw = {"max_batch": 4, "aging": 0.0, "uncertainty_weight": 0.0, "length_window": 2.0, "batch_wait_s": 0.05,
          "offload": False, **kw}
    return RTLM(**kw)


def test_rtlm_consolidates_close_lengths_only():
    pol = _rtlm()
    reqs = [_req("s1", 0.0, pred_rtlm=10.0), _req("s2", 0.0, pred_rtlm=15.0), _req("l", 0.0, pred_rtlm=100.0),
            _req("s3", 0.0, pred_rtlm=19.0)]
    out, wake = pol.select(reqs, [_main(max_batch=4)], now=1.0)  # head waited past batch_wait_s: go
    assert wake is None and len(out) == 1
    assert sorted(r.request_id for r in out[0].requests) == ["s1", "s2", "s3"]
    # a full batch of close requests goes at once, even for a young head
    pol2 = _rtlm(max_batch=2)
    out, wake = pol2.select(reqs, [_main(max_batch=2)], now=0.0)
    assert wake is None and [r.request_id for r in out[0].requests] == ["s1", "s2"]


def test_rtlm_waits_for_a_fuller_batch_when_the_head_is_young():
    pol = _rtlm(batch_wait_s=0.05)
    reqs = [_req("a", 1.00, pred_rtlm=10.0), _req("b", 1.01, pred_rtlm=12.0)]
    out, wake = pol.select(reqs, [_main(max_batch=4)], now=1.02)
    assert out == [] and wake == pytest.approx(1.05)
    out, wake = pol.select(reqs, [_main(max_batch=4)], now=1.05)
    assert wake is None and len(out[0].requests) == 2
    # without consolidation (or at batch 1) nothing waits
    for pol in (_rtlm(consolidation=False), _rtlm(max_batch=1)):
        out, wake = pol.select(reqs, [_main(max_batch=4)], now=1.02)
        assert wake is None and out and out[0].requests[0].request_id == "a"


def test_rtlm_wc_does_not_idle_the_worker_while_other_work_is_queued():
    """rtlm_wc (work-conserving consolidation): the close group goes at once when other requests wait (rtlm
    holds the worker for batch_wait_s); with the whole queue in the group it waits at most wait_fraction x the
    head's predicted service time."""
    reqs = [_req("a", 1.00, pred_rtlm=10.0), _req("b", 1.01, pred_rtlm=12.0), _req("l", 1.00, pred_rtlm=100.0)]
    out, wake = _rtlm().select(reqs, [_main(max_batch=4)], now=1.02)
    assert out == [] and wake == pytest.approx(1.05)  # rtlm as specified: the worker idles
    wc = _rtlm(work_conserving=True, wait_fraction=0.25)
    out, wake = wc.select(reqs, [_main(max_batch=4)], now=1.02)
    assert wake is None and sorted(r.request_id for r in out[0].requests) == ["a", "b"]
    head_s = SVC.isolated(10, 10.0)  # 0.15 s: a quarter of it (0.0375 s) is below batch_wait_s
    out, wake = wc.select(reqs[:2], [_main(max_batch=4)], now=1.02)
    assert out == [] and wake == pytest.approx(1.00 + 0.25 * head_s)
    out, wake = wc.select(reqs[:2], [_main(max_batch=4)], now=1.00 + 0.25 * head_s + 1e-9)
    assert wake is None and len(out[0].requests) == 2
    assert make_policy("rtlm_wc").work_conserving is True and make_policy("rtlm").work_conserving is False
    with pytest.raises(UserError):
        make_policy("rtlm", {"wait_fraction": -0.1})


def test_rtlm_aging_puts_an_old_long_request_first():
    long_ = _req("long", 0.0, pred_rtlm=100.0)  # predicted service ~1.0 s
    for now, first in ((10.0, "short"), (100.0, "long")):
        short = _req("short", now, pred_rtlm=5.0)  # ~0.1 s, just arrived
        pol = _rtlm(max_batch=1, aging=0.02)
        (a,), _ = pol.select([long_, short], [_main()], now)
        assert a.requests[0].request_id == first, now
    pol = _rtlm(max_batch=1, aging=0.0)
    (a,), _ = pol.select([long_, _req("short", 1e4, pred_rtlm=5.0)], [_main()], 1e4)
    assert a.requests[0].request_id == "short"  # no aging: the long one waits forever


def test_rtlm_uncertainty_pushes_uncertain_requests_back():
    sure = _req("sure", 0.0, pred_rtlm=20.0, uncertainty=0.0)
    unsure = _req("unsure", 0.0, pred_rtlm=18.0, uncertainty=1.0)
    (a,), _ = _rtlm(max_batch=1, uncertainty_weight=0.5).select([sure, unsure], [_main()], 1.0)
    assert a.requests[0].request_id == "sure"
    (a,), _ = _rtlm(max_batch=1, uncertainty_weight=0.0).select([sure, unsure], [_main()], 1.0)
    assert a.requests[0].request_id == "unsure"


def test_rtlm_offloads_only_when_the_cpu_finishes_sooner():
    cpu_svc = ServiceModel(ttft_a=0.1, ttft_b=0.0, step_1=0.05)  # 20 tokens: ~1.05 s on the CPU
    cpu = WorkerView("cpu0", "offload", idle=True, free_at=5.0, max_batch=1, service=cpu_svc)
    reqs = [_req("a", 0.0, pred_rtlm=20.0), _req("b", 0.0, pred_rtlm=20.0)]
    pol = _rtlm(max_batch=1, offload=True)
    # main busy for another 100 s: the CPU wins
    out, _ = pol.select(reqs, [_main(idle=False, free_at=105.0), cpu], 5.0)
    assert [(x.worker_id, [r.request_id for r in x.requests]) for x in out] == [("cpu0", ["a"])]
    # main about to be free and fast: nothing goes to the CPU
    out, _ = pol.select(reqs, [_main(idle=False, free_at=5.01), cpu], 5.0)
    assert out == []
    # main idle takes the head; the CPU takes the next only if it beats waiting for the main worker
    out, _ = pol.select(reqs, [_main(), cpu], 5.0)
    assert [x.worker_id for x in out] == ["main"]
    slow_main = ServiceModel(ttft_a=1.0, ttft_b=0.0, step_1=0.5)
    out, _ = pol.select(reqs, [_main(svc=slow_main), cpu], 5.0)
    # the CPU would finish the head sooner than the idle (slow) main worker: it takes the head, main the next
    assert [(x.worker_id, x.requests[0].request_id) for x in out] == [("cpu0", "a"), ("main", "b")]
    # a busy offload worker, or offloading disabled: never
    busy_cpu = WorkerView("cpu0", "offload", idle=False, free_at=9.0, max_batch=1, service=cpu_svc)
    assert pol.select(reqs, [_main(idle=False, free_at=105.0), busy_cpu], 5.0)[0] == []
    assert _rtlm(max_batch=1, offload=False).select(reqs, [_main(idle=False, free_at=105.0), cpu], 5.0)[0] == []


# ================================================================================================ simulator
def _check_records(df, reqs, svc_by_worker):
    assert list(df.columns) == list(RECORD_COLUMNS)
    assert sorted(df["request_id"]) == sorted(r.request_id for r in reqs)  # every request exactly once
    assert (df["start_s"] >= df["arrival_s"] - 1e-12).all()
    assert (df["finish_s"] >= df["first_token_s"]).all() and (df["first_token_s"] >= df["start_s"]).all()
    assert np.allclose(df["response_s"], df["finish_s"] - df["arrival_s"])
    for row in df.itertuples():  # batching and queueing never make a request faster than alone
        assert row.response_s >= svc_by_worker[row.worker].isolated(row.n_input_tokens, row.true_tokens) - 1e-9
        assert row.response_s >= row.isolated_s - 1e-9 or row.worker != "main"


@pytest.mark.parametrize("name", POLICIES)
def test_simulation_serves_every_request_once(name):
    reqs = _synthetic_trace(150, rho=1.2, seed=1)
    pol = make_policy(name, {"max_batch": 4})
    cpu = ServiceModel(ttft_a=0.1, ttft_b=0.002, step_1=0.04)
    workers = [WorkerSpec("main", "main", 4, SVC), WorkerSpec("cpu0", "offload", 1, cpu)]
    df, m = simulate(reqs, pol, workers, slo_k=5.0, prediction_s_per_request=0.001)
    _check_records(df, reqs, {"main": SVC, "cpu0": cpu})
    assert m["n_completed"] == m["n_unique_completed"] == m["n_requests"] == 150
    assert m["retries"] == 0 and m["overhead_s"] >= 0.15
    assert (df["batch_size"] <= 4).all()
    assert sum(m["batch_size_hist"].values()) == df.drop_duplicates(["worker", "batch_id"]).shape[0]
    if name == "rtlm_no_offload":
        assert set(df["worker"]) == {"main"}
    elif name.startswith(("fcfs", "sjf", "ltr", "oracle")):  # the same offload worker, for every policy
        assert m["requests_per_worker"].get("cpu0", 0) > 0, name


def test_simulated_prediction_cost_is_on_the_clock():
    """One predictor serves arrivals in order: with 0.5 s a prediction, three requests arriving together reach
    the queue at 0.5, 1.0 and 1.5 s, and each response time counts from the arrival (hand-computed)."""
    svc = ServiceModel(ttft_a=0.1, ttft_b=0.0, step_1=0.0)  # every request takes 0.1 s
    reqs = [_req(i, 0.0, svc=svc, pred_rtlm=5.0) for i in range(3)]
    df, m = simulate(reqs, make_policy("fcfs"), [WorkerSpec("main", "main", 1, svc)], prediction_s_per_request=0.5)
    got = df.set_index("request_id").sort_index()
    assert list(got["start_s"]) == pytest.approx([0.5, 1.0, 1.5], abs=1e-3)
    assert list(got["response_s"]) == pytest.approx([0.6, 1.1, 1.6], abs=1e-3)
    free, _ = simulate(reqs, make_policy("fcfs"), [WorkerSpec("main", "main", 1, svc)])
    assert list(free.sort_values("request_id")["start_s"]) == pytest.approx([0.0, 0.1, 0.2], abs=1e-3)


def test_simulation_fcfs_batch1_starts_in_arrival_order():
    reqs = _synthetic_trace(200, rho=1.5, seed=2)
    df, _ = simulate(reqs, make_policy("fcfs"), [WorkerSpec("main", "main", 1, SVC)])
    df = df.sort_values("start_s", kind="stable")
    assert df["arrival_s"].is_monotonic_increasing
    assert (df["batch_size"] == 1).all()
    # one worker, batch 1: no overlap, each starts when the previous finished or at its own arrival
    starts, finishes, arrivals = df["start_s"].to_numpy(), df["finish_s"].to_numpy(), df["arrival_s"].to_numpy()
    assert np.allclose(starts[1:], np.maximum(finishes[:-1], arrivals[1:]))
    assert np.allclose(df["response_s"] - df["queue_s"], df["isolated_s"])


@pytest.mark.parametrize("kind", ["poisson", "burst"])
def test_oracle_sjf_beats_fcfs_under_load(kind):
    svc = ServiceModel(ttft_a=0.05, ttft_b=0.0, step_1=0.01)  # service grows with true tokens only
    reqs = _synthetic_trace(300, rho=1.3, seed=4, svc=svc, kind=kind)
    w = [WorkerSpec("main", "main", 1, svc)]
    _, m_fcfs = simulate(reqs, make_policy("fcfs"), w)
    _, m_sjf = simulate(reqs, make_policy("oracle_sjf"), w)
    assert m_sjf["mean_rt_s"] < m_fcfs["mean_rt_s"]


def test_batching_wait_always_wakes_up():
    """Regression: the wait test ``now - arrival < batch_wait_s`` stays true at the wake instant
    ``fl(arrival + batch_wait_s)`` for most arrival times (float rounding); the policy then asked to be woken
    at ``now`` again, the simulator dropped that wake-up and a lone last request was never served."""
    pol = make_policy("rtlm", {"max_batch": 4, "batch_wait_s": 0.05})
    for a in np.random.default_rng(0).random(200) * 100:
        df, m = simulate([_req("x", a, pred_rtlm=20.0)], pol, [WorkerSpec("main", "main", 4, SVC)])
        assert m["n_completed"] == 1, a
        assert df["start_s"].iloc[0] == a + 0.05


def test_simulation_is_deterministic():
    pol_kw = {"max_batch": 4}
    workers = [WorkerSpec("main", "main", 4, SVC), WorkerSpec("cpu0", "offload", 1, SVC)]
    a, ma = simulate(_synthetic_trace(120, 1.1, 5), make_policy("rtlm", pol_kw), workers)
    b, mb = simulate(_synthetic_trace(120, 1.1, 5), make_policy("rtlm", pol_kw), workers)
    pd.testing.assert_frame_equal(a, b)
    drop = ("decision_s", "overhead_s", "overhead_share")  # wall-clock time of the policy's decisions
    assert {k: v for k, v in ma.items() if k not in drop} == {k: v for k, v in mb.items() if k not in drop}


def test_rtlm_offloads_in_simulation_when_the_main_worker_is_slow():
    slow = ServiceModel(ttft_a=0.2, ttft_b=0.001, step_1=0.05, step_slope=0.05)
    cpu = ServiceModel(ttft_a=0.1, ttft_b=0.001, step_1=0.04)
    reqs = _synthetic_trace(100, rho=1.5, seed=6, svc=slow, max_tokens=60)
    workers = [WorkerSpec("main", "main", 4, slow), WorkerSpec("cpu0", "offload", 1, cpu)]
    df, m = simulate(reqs, make_policy("rtlm", {"max_batch": 4}), workers)
    assert m["requests_per_worker"].get("cpu0", 0) > 0 and m["requests_per_worker"]["main"] > 0
    assert (df.loc[df["worker"] == "cpu0", "batch_size"] == 1).all()
    _check_records(df, reqs, {"main": slow, "cpu0": cpu})
    df2, m2 = simulate(reqs, make_policy("rtlm_no_offload", {"max_batch": 4}), workers)
    assert set(df2["worker"]) == {"main"}


def test_dispatcher_rejects_a_misbehaving_policy():
    class Greedy(Policy):
        name = "greedy"

        def select(self, queue, workers, now):
            return [Assignment("main", list(queue))], None

    with pytest.raises(RuntimeError, match="max_batch"):
        simulate([_req(i, 0.0) for i in range(3)], Greedy(), [WorkerSpec("main", "main", 2, SVC)])
    with pytest.raises(ValueError):
        simulate([_req(0)], make_policy("fcfs"), [WorkerSpec("cpu0", "offload", 1, SVC)])


# ================================================================================================ real executor
@pytest.fixture(scope="module")
def texts(ccc_sample):
    return [t for t in ccc_sample if 10 < len(t) < 200][:8]


def _oom_above_1(lm, calls):
    def decode(ts, cs):
        calls.append(len(ts))
        if len(ts) > 1:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return lm.generate(ts, cs)

    return decode


def test_generate_splitting_on_oom(tiny_lm, texts):
    from rtlm_lab.scheduler.executor import generate_splitting

    ts, cs = texts[:4], [""] * 4
    calls, splits = [], []
    out = generate_splitting(_oom_above_1(tiny_lm, calls), ts, cs, on_split=splits.append)
    assert splits == [4, 2, 2] and calls == [4, 2, 1, 1, 2, 1, 1]
    single = [tiny_lm.generate([t], [""])[0] for t in ts]
    assert [g.output_ids for g in out] == [g.output_ids for g in single]
    assert [(g.text, g.n_output_tokens, g.stop_reason) for g in out] == \
           [(g.text, g.n_output_tokens, g.stop_reason) for g in single]

    def other_error(ts, cs):
        raise ValueError("not memory")

    with pytest.raises(ValueError):
        generate_splitting(other_error, ts, cs)
    with pytest.raises(RuntimeError, match="out of memory"):  # nothing left to split
        generate_splitting(lambda t, c: (_ for _ in ()).throw(RuntimeError("CUDA out of memory")), ts[:1], cs[:1])


def test_execute_serves_every_request_once(tiny_lm, texts):
    from rtlm_lab.scheduler.executor import execute

    reqs = [_req(f"e{i}", 0.02 * i, n_in=10, true=10, pred_rtlm=10.0, uncertainty=0.2) for i in range(len(texts))]
    for r, t in zip(reqs, texts):
        r.text = t
    calls: list[int] = []
    df, m = execute(reqs, make_policy("fcfs", {"max_batch": 4}), _oom_above_1(tiny_lm, calls),
                    [WorkerSpec("main", "main", 4, SVC)], progress=False)
    assert list(df.columns) == list(RECORD_COLUMNS)
    assert sorted(df["request_id"]) == sorted(r.request_id for r in reqs)
    assert m["n_completed"] == m["n_unique_completed"] == len(texts) and m["mode"] == "real"
    assert (df["start_s"] >= df["arrival_s"] - 1e-9).all() and (df["finish_s"] >= df["start_s"]).all()
    assert (df["retries"] == 0).all() and (df["worker"] == "main").all()
    # a batch of more than one (burst of arrivals while the first batch ran) hit the OOM and was split
    if (df["batch_size"] > 1).any():
        assert m["oom_splits"] >= 1 and max(calls) > 1
    single = {r.request_id: tiny_lm.generate([r.text], [""])[0] for r in reqs}
    for row in df.itertuples():
        assert row.actual_tokens == single[row.request_id].n_output_tokens
        assert row.stop_reason == single[row.request_id].stop_reason


def test_execute_burst_batches_and_splits(tiny_lm, texts):
    from rtlm_lab.scheduler.executor import execute

    reqs = [_req(f"b{i}", 0.0) for i in range(4)]
    for r, t in zip(reqs, texts):
        r.text = t
    calls: list[int] = []
    df, m = execute(reqs, make_policy("fcfs", {"max_batch": 4}), _oom_above_1(tiny_lm, calls),
                    [WorkerSpec("main", "main", 4, SVC)], progress=False)
    assert calls[0] == 4 and m["oom_splits"] == 3
    assert (df["batch_size"] == 4).all() and df["batch_id"].nunique() == 1
    assert sorted(df["request_id"]) == [r.request_id for r in reqs]


class _OffloadThenKill(Policy):
    """Fault injection through the policy interface: the first request goes to the offload worker, whose
    process is killed right as it is handed the request; everything else goes to the main worker."""

    name = "offload_then_kill"

    def __init__(self):
        super().__init__(max_batch=1)
        self.killed: list[str] = []

    def select(self, queue, workers, now):
        ordered = self.order(queue, now)
        out = []
        for w in workers:
            if not w.idle or not ordered:
                continue
            if w.kind == "offload" and not self.killed:
                req = ordered.pop(0)
                proc = next(p for p in multiprocessing.active_children() if p.name == f"offload-{w.worker_id}")
                proc.kill()
                proc.join(10)
                self.killed.append(req.request_id)
                out.append(Assignment(w.worker_id, [req]))
            elif w.kind == "main":
                out.append(Assignment(w.worker_id, [ordered.pop(0)]))
        return out, None


def test_execute_retries_when_an_offload_worker_dies(tiny_lm, tiny_causal_dir, texts):
    from rtlm_lab.scheduler.executor import execute

    reqs = [_req(f"k{i}", 0.0) for i in range(3)]
    for r, t in zip(reqs, texts):
        r.text = t
    pol = _OffloadThenKill()
    workers = [WorkerSpec("main", "main", 1, SVC), WorkerSpec("cpu0", "offload", 1, SVC)]
    df, m = execute(reqs, pol, lambda t, c: tiny_lm.generate(t, c), workers,
                    offload_spec=tiny_spec(tiny_causal_dir), offload_threads=1, ready_timeout_s=300,
                    progress=False)
    assert len(pol.killed) == 1
    victim = df.set_index("request_id").loc[pol.killed[0]]
    assert victim["worker"] == "main" and victim["retries"] >= 1
    assert sorted(df["request_id"]) == sorted(r.request_id for r in reqs)  # each counted once
    assert m["offload_deaths"] == 1 and m["retries"] >= 1 and m["n_unique_completed"] == 3


# ================================================================================================ fast decoder
def test_static_decoder_matches_generate(tiny_lm, texts):
    from rtlm_lab.lm.fastdecode import StaticDecoder

    dec = StaticDecoder(tiny_lm, max_batch=4, max_len=200, graphs=False)
    for batch in (texts[:1], texts[1:4]):  # batch 1, and batch 3 padded to the 4-bucket
        fast, ref = dec.generate(batch, None), tiny_lm.generate(batch, None)
        assert [g.output_ids for g in fast] == [g.output_ids for g in ref]
        assert [(g.n_output_tokens, g.stop_reason, g.text, g.n_input_tokens) for g in fast] == \
               [(g.n_output_tokens, g.stop_reason, g.text, g.n_input_tokens) for g in ref]
        assert all(g.batch_size == len(batch) for g in fast)
    assert dec.n_fallback == 0 and set(dec.buckets) == {1, 4}


def test_static_decoder_falls_back_for_long_prompts(tiny_lm, texts):
    from rtlm_lab.lm.fastdecode import StaticDecoder

    dec = StaticDecoder(tiny_lm, max_batch=2, max_len=40, graphs=False)
    long_text = " ".join(texts)
    fast, ref = dec.generate([long_text], None), tiny_lm.generate([long_text], None)
    assert dec.n_fallback == 1 and not dec.buckets
    assert [g.output_ids for g in fast] == [g.output_ids for g in ref]
    dec.generate(texts[:3], None)  # more rows than the largest bucket: plain generate too
    assert dec.n_fallback == 2


# ================================================================================================ CLI
def test_cli_unknown_policy_is_one_line(tmp_path):
    res = schedule_cli(["policy=nope"], tmp_path, timeout=120)
    assert res.returncode == 2, res.stderr
    lines = [ln for ln in res.stderr.strip().splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:") and "unknown policy 'nope'" in lines[0], res.stderr
    assert not (tmp_path / "schedule").exists()


def test_cli_sim_writes_results_and_skips_reruns(tmp_path):
    profile = ROOT / "outputs" / "reference" / "profiles" / "gemma3_270m__cpu.parquet"
    if not profile.is_file():
        pytest.skip("no committed gemma3_270m/cpu profile")
    args = ["mode=sim", "lm=gemma3_270m", "platform=cpu", "policy=rtlm", "workload.n_requests=20",
            "scheduler.overhead_samples=2", "scheduler.figures=false"]
    res = task_process("schedule", args, tmp_path)  # the real command line, in its own process (this CLI's one)
    assert res.returncode == 0, res.stderr[-3000:]
    (metrics_path,) = (tmp_path / "schedule").rglob("metrics.json")
    run_dir = metrics_path.parent
    assert "gemma3_270m/cpu/sim" in str(run_dir.relative_to(tmp_path))
    m = json.loads(metrics_path.read_text())
    assert m["n_requests"] == m["n_completed"] == m["n_unique_completed"] == 20 and m["mode"] == "sim"
    trace, records = pd.read_parquet(run_dir / "trace.parquet"), pd.read_parquet(run_dir / "requests.parquet")
    assert len(trace) == 20 and len(records) == 20
    assert sorted(records["request_id"]) == sorted(trace["request_id"])
    from rtlm_lab.scheduler.continuous import RECORDS

    assert m["engine"] == "continuous" and list(records.columns) == list(RECORDS)  # auto: Gemma is decoder-only
    assert trace["arrival_s"].is_monotonic_increasing and trace["pred_rtlm"].notna().all()
    assert math.isfinite(m["mean_rt_s"]) and m["policy"]["name"] == "rtlm"
    again = schedule_cli(args, tmp_path)
    assert again.returncode == 0 and "already done" in again.stdout, again.stderr[-3000:]
    assert json.loads(metrics_path.read_text()) == m


@pytest.mark.parametrize("override,needle", [("workload.rho=0", "workload.rho must be > 0"),
                                             ("workload.rho=-1", "workload.rho must be > 0"),
                                             ("workload.n_requests=0", "n_requests must be >= 1"),
                                             ("mode=fast", "unknown mode 'fast'"),
                                             ("platform=tpu", "unknown platform 'tpu'"),
                                             ("scheduler.slo_k=0", "slo_k must be > 0")])
def test_cli_bad_values_are_one_line(tmp_path, override, needle):
    args = ["mode=sim", "lm=gemma3_270m", "platform=cpu", "policy=fcfs", "workload.n_requests=20",
            "scheduler.overhead_samples=2", "scheduler.figures=false", override]
    res = schedule_cli(args, tmp_path, timeout=300)
    assert res.returncode == 2, res.stderr[-2000:]
    lines = [ln for ln in res.stderr.strip().splitlines() if ln.strip() and not ln.startswith("[")]
    assert len(lines) == 1 and lines[0].startswith("error:") and needle in lines[0], res.stderr[-2000:]
    assert not list((tmp_path / "schedule").rglob("metrics.json")) if (tmp_path / "schedule").exists() else True


def test_cli_overload_rho_above_one_is_served_and_accounted(tmp_path):
    """rho > 1 is an overload, not an error: every request is still served and recorded once."""
    args = ["mode=sim", "lm=gemma3_270m", "platform=cpu", "policy=fcfs", "workload.n_requests=40",
            "workload.rho=1.5", "scheduler.overhead_samples=2", "scheduler.figures=false"]
    res = schedule_cli(args, tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    (metrics_path,) = (tmp_path / "schedule").rglob("metrics.json")
    m = json.loads(metrics_path.read_text())
    assert m["n_requests"] == m["n_completed"] == m["n_unique_completed"] == 40 and m["rho"] == 1.5
    manifest = json.loads((metrics_path.parent / "manifest.json").read_text())
    assert set(manifest["files"]) == {"trace.parquet", "requests.parquet", "steps.parquet", "metrics.json"}
    from rtlm_lab.io import verify_run_manifest

    assert verify_run_manifest(metrics_path.parent) == []


def test_cli_cuda_without_gpu_fails_before_any_fitting(tmp_path):
    """`rtlm-schedule platform=cuda mode=real` on a machine without a GPU: one line, and nothing fitted or
    written first (the GPU check comes before the predictors)."""
    import torch

    if torch.cuda.is_available():
        pytest.skip("a GPU is visible here")
    res = schedule_cli(["mode=real", "lm=dialogpt_ccc", "platform=cuda", "policy=fcfs"], tmp_path, timeout=300)
    assert res.returncode == 2, res.stderr[-2000:]
    lines = [ln for ln in res.stderr.strip().splitlines() if ln.strip() and not ln.startswith("[")]
    assert len(lines) == 1 and "needs a CUDA GPU" in lines[0], res.stderr[-2000:]
    assert "predictors fitted" not in res.stdout + res.stderr
    assert not list((tmp_path / "schedule").rglob("metrics.json")) if (tmp_path / "schedule").exists() else True
