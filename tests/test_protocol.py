"""The measurement protocol (docs/scheduling.md#the-protocol): per-run facts (realized rho, stability, drift,
window), arrivals at the exact rate, and the results table's headroom captured, engine-config check and flags.

Runs are made on a controlled clock: a single FCFS server with a fixed service time, arrivals at fixed or seeded
times, so every fact has a value worked out by hand."""

from __future__ import annotations

import json
import math

import numpy as np
import pandas as pd
import pytest

from rtlm_lab.errors import UserError
from rtlm_lab.scheduler.analysis import format_summary, headroom_ci, summarize
from rtlm_lab.scheduler.protocol import completion_ratio, rt_drift, run_protocol
from rtlm_lab.scheduler.workload import arrival_times, build_trace, check_workload, realized_arrival_rate


def fifo_server(arrival_s, service_s) -> pd.DataFrame:
    """One server, FCFS, each request ``service_s`` (a scalar or one per request): the records a run writes."""
    arr = np.asarray(arrival_s, float)
    svc = np.broadcast_to(np.asarray(service_s, float), arr.shape)
    fin = np.empty_like(arr)
    free = 0.0
    for i, (a, s) in enumerate(zip(arr, svc)):
        free = max(free, a) + s
        fin[i] = free
    return pd.DataFrame({"request_id": [f"r{i:04d}" for i in range(len(arr))], "arrival_s": arr, "finish_s": fin,
                         "response_s": fin - arr, "isolated_s": svc, "warmup": False})


# ================================================================================================ per-run facts
def test_completion_ratio_counts_the_second_half_of_the_arrival_window_by_hand():
    # window [0, 10], midpoint 5: arrivals at 5..10 (6 of them); finishes in [5, 10]: 4.5 no, 5.5, 7, 9.9 yes,
    # 10.5 (after the last arrival) no, NaN (never finished) no
    arr = [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10]
    fin = [0.5, 1.5, 2.5, 3.5, 4.5, 5.5, 7.0, 9.9, 10.5, np.nan, 11.0]
    ratio, n_arr, n_done = completion_ratio(arr, fin)
    assert (n_arr, n_done) == (6, 3) and ratio == pytest.approx(0.5)
    assert np.isnan(completion_ratio([0.0, 0.0], [1.0, 2.0])[0])  # a burst has no window


def test_a_server_that_keeps_up_is_stable_and_an_overloaded_one_is_not():
    arr = np.arange(400, dtype=float)  # one arrival a second for 400 s
    ok = run_protocol(fifo_server(arr, 0.5), nominal_rho=0.5, realized_rho=0.5)
    assert ok["completion_ratio_2nd_half"] == pytest.approx(1.0, abs=0.01) and ok["stable"] is True
    assert ok["rt_drift_last_vs_first_third"] == pytest.approx(1.0)  # every response is 0.5 s
    # service 2 s: the server finishes one request every 2 s while one arrives every second
    bad = run_protocol(fifo_server(arr, 2.0), nominal_rho=0.9, realized_rho=0.9)
    assert bad["completion_ratio_2nd_half"] == pytest.approx(0.5, abs=0.02) and bad["stable"] is False
    # its queue grows for the whole run: response time of request k is k + 2, so the thirds' means are far apart
    k = len(arr) // 3
    want = np.mean(np.arange(len(arr) - k, len(arr)) + 2.0) / np.mean(np.arange(k) + 2.0)
    assert bad["rt_drift_last_vs_first_third"] == pytest.approx(want) and want > 4
    # at a nominal rho >= 1 the run is an overload by design: no stability verdict, the ratio still reported
    over = run_protocol(fifo_server(arr, 2.0), nominal_rho=1.2, realized_rho=1.2)
    assert over["stable"] is None and over["completion_ratio_2nd_half"] == pytest.approx(0.5, abs=0.02)


def test_stability_threshold_is_095():
    arr = np.arange(200, dtype=float)
    rec = fifo_server(arr, 0.5)
    mid_half = rec["arrival_s"] >= 99.5
    # the last 4 of the 100 second-half arrivals never finish in the window (0.96): stable; the last 6: not (0.94)
    for n_late, stable in ((4, True), (6, False)):
        r = rec.copy()
        late = r.index[mid_half][-n_late - 1:]  # the very last one finishes after the window anyway
        r.loc[late, "finish_s"] = 1e6
        r["response_s"] = r["finish_s"] - r["arrival_s"]
        facts = run_protocol(r, 0.9, 0.9)
        assert facts["stable"] is stable, (n_late, facts["completion_ratio_2nd_half"])


def test_drift_and_window_by_hand():
    arr = np.arange(9, dtype=float)
    rt = np.array([1, 1, 1, 2, 2, 2, 3, 3, 3], float)
    assert rt_drift(arr, rt) == pytest.approx(3.0)
    assert rt_drift(arr[::-1], rt[::-1]) == pytest.approx(3.0)  # thirds by arrival order, not row order
    rec = pd.DataFrame({"arrival_s": np.linspace(10, 210, 9), "finish_s": np.linspace(10, 210, 9) + 1,
                        "response_s": 1.0, "isolated_s": 0.5})
    f = run_protocol(rec, 0.8, 0.816)
    assert f["arrival_window_s"] == pytest.approx(200.0) and f["mean_isolated_s"] == pytest.approx(0.5)
    assert f["window_over_isolated"] == pytest.approx(400.0)
    assert f["realized_rho_rel_error"] == pytest.approx(0.02) and f["realized_rho_within_2pct"] is True
    assert run_protocol(rec, 0.8, 0.8168)["realized_rho_within_2pct"] is False
    assert run_protocol(rec, None, 0.8)["realized_rho_within_2pct"] is None  # a replayed trace: no nominal


def test_the_continuous_engines_metrics_carry_the_protocol_facts():
    from rtlm_lab.scheduler.continuous import run_metrics

    rec = fifo_server(np.arange(300, dtype=float) * 0.5, 0.25)
    rec["warmup"] = np.arange(len(rec)) < 30
    for c, v in (("ttft_s", 0.1), ("queue_s", 0.0), ("prediction_wait_s", 0.0), ("worker", "main"),
                 ("actual_tokens", 10), ("slo_miss", False), ("steps_paused", 0), ("pred_tokens", np.nan)):
        rec[c] = v
    facts = {"busy_s": {"main": 75.0}, "predictor_batches": pd.DataFrame({"dt_s": []})}
    cap = {"capacity_rps": 2.0 / 0.5}  # arrivals at 2/s: rho 0.5
    m = run_metrics(rec, pd.DataFrame({"n_seqs": [1, 1]}), facts, cap, rho=0.5, rate=2.0, ecfg={})
    assert m["realized_arrival_rate_rps"] == pytest.approx(2.0) and m["realized_rho"] == pytest.approx(0.5)
    assert m["realized_rho_within_2pct"] is True and m["stable"] is True
    assert m["window_over_isolated"] == pytest.approx(149.5 / 0.25)
    assert m["completion_ratio_2nd_half"] == pytest.approx(1.0, abs=0.01)
    assert m["rt_drift_last_vs_first_third"] == pytest.approx(1.0)
    json.dumps(m)  # metrics.json can hold them


def test_the_static_paths_metrics_carry_the_load_and_the_protocol_facts():
    from rtlm_lab.scheduler.harness import static_load_facts

    rec = fifo_server(np.arange(101, dtype=float) * 0.5, 0.3)  # 2 arrivals/s x 0.3 s isolated = rho 0.6
    f = static_load_facts(rec, {"kind": "poisson", "rho": 0.6, "rate_rps": 2.0, "mean_isolated_s": 0.3})
    assert f["realized_arrival_rate_rps"] == pytest.approx(2.0) and f["realized_rho"] == pytest.approx(0.6)
    assert f["nominal_rho"] == 0.6 and f["arrival_rate_rps"] == 2.0 and f["realized_rho_within_2pct"] is True
    assert f["stable"] is True and f["window_over_isolated"] == pytest.approx(50.0 / 0.3)
    replay = static_load_facts(rec, {"kind": "replay", "trace": "x.parquet"})
    assert "nominal_rho" not in replay and replay["realized_rho_within_2pct"] is None


# ================================================================================================ arrivals
@pytest.mark.parametrize("kind,params", [("poisson", {}), ("gamma", {"cv": 3.0}), ("gamma", {"cv": 0.5}),
                                         ("mmpp", {})])
def test_arrivals_come_at_the_exact_rate_over_each_trace(kind, params):
    rate, n = 4.0, 200
    errs_raw = []
    for seed in range(5):
        t = arrival_times(kind, rate, n, seed=seed, **params)
        assert abs(realized_arrival_rate(t) / rate - 1) < 0.02  # in fact exact
        assert realized_arrival_rate(t) == pytest.approx(rate, rel=1e-9)
        raw = arrival_times(kind, rate, n, seed=seed, exact_rate=False, **params)
        errs_raw.append(abs(realized_arrival_rate(raw) / rate - 1))
        # one factor for every time: the process's shape (its gaps' cv, its bursts) is the drawn one
        assert np.allclose(t / raw, t[-1] / raw[-1])
    if kind != "gamma" or params["cv"] > 1:  # a draw of 200 misses the rate by more than 2% somewhere
        assert max(errs_raw) > 0.02


def test_gamma_keeps_its_cv_and_cv_1_is_poisson():
    g = np.diff(arrival_times("gamma", 5.0, 20000, seed=1, cv=1.0))
    assert g.std() / g.mean() == pytest.approx(1.0, rel=0.05)  # vLLM's burstiness 1


def test_a_built_trace_has_the_nominal_rho_and_exact_rate_cannot_be_turned_off():
    class Svc:
        def isolated(self, n_in, n_out):
            return 0.01 * n_in + 0.02 * n_out

    reqs = pd.DataFrame({"request_id": [f"q{i}" for i in range(300)], "text": "t", "context": "",
                         "n_input_tokens": np.arange(300) % 50 + 1, "true_tokens": np.arange(300) % 90 + 1})
    trace, info = build_trace(reqs, Svc(), {"kind": "gamma", "cv": 3.0, "rho": 0.7}, seed=4)
    realized_rho = realized_arrival_rate(trace["arrival_s"]) * trace["isolated_s"].mean()
    assert realized_rho == pytest.approx(0.7, rel=1e-9)
    check_workload({"kind": "poisson", "rho": 0.9, "exact_rate": True})
    with pytest.raises(UserError, match="exact_rate"):
        check_workload({"kind": "poisson", "rho": 0.9, "exact_rate": False})


# ================================================================================================ the table
def _run(root, group, policy, seed, rt, *, stable=None, serving=None, mean_rt=None, sub=None):
    """A finished run dir on a controlled clock: arrivals every second, response times ``rt``; ``stable``: a
    recorded verdict in metrics.json (None: leave the protocol facts out, the table recomputes them)."""
    d = root / group / (sub or "") / f"{policy}__s{seed}"
    d.mkdir(parents=True)
    n = len(rt)
    arr = np.arange(n, dtype=float)
    pd.DataFrame({"request_id": [f"r{i}" for i in range(n)], "arrival_s": arr, "finish_s": arr + rt,
                  "response_s": rt, "isolated_s": 0.2, "warmup": False}).to_parquet(d / "requests.parquet")
    m = {"lm": "lmx", "platform": "cuda", "mode": "real", "policy": {"name": policy}, "seed": seed,
         "nominal_rho": 0.9, "realized_rho": 0.9, "engine": "continuous",
         "engine_config": {"backend": "kv", "max_seqs": 64},
         "serving": {"dtype": "bfloat16", "torch_threads": 16, "device_name": "NVIDIA H100", **(serving or {})},
         "mean_rt_s": float(np.mean(rt)) if mean_rt is None else mean_rt, "p99_rt_s": float(np.percentile(rt, 99)),
         "n_requests": n}
    if stable is not None:
        m.update({"realized_rho_rel_error": 0.0, "realized_rho_within_2pct": True, "window_over_isolated": 500.0,
                  "completion_ratio_2nd_half": 0.99 if stable else 0.8, "stable": stable,
                  "rt_drift_last_vs_first_third": 1.0})
    (d / "metrics.json").write_text(json.dumps(m))
    return d


def _group(root, n=200, seeds=(0, 1, 2), fcfs=10.0, oracle=6.0, policy=8.0, noise=None, **kw):
    rng = np.random.default_rng(0)
    dirs = []
    for s in seeds:
        base = rng.uniform(0.5, 1.5, n)
        o = oracle * base * (noise(rng, n) if noise else 1.0)
        dirs += [_run(root, "g", "fcfs", s, fcfs * base, **kw), _run(root, "g", "oracle_srpt", s, o, **kw),
                 _run(root, "g", "pol", s, policy * base, **kw)]
    return dirs


def test_headroom_captured_by_hand():
    f = [np.full(100, 10.0)] * 2
    h = headroom_ci(f, [np.full(100, 8.0)] * 2, [np.full(100, 6.0)] * 2, n_boot=50)
    assert h["headroom_captured"] == pytest.approx(0.5) and h["oracle_mean_rt_vs_fcfs"] == pytest.approx(0.6)
    assert headroom_ci(f, [np.full(100, 12.0)] * 2, [np.full(100, 6.0)] * 2, n_boot=50)["headroom_captured"] \
        == pytest.approx(-0.5)  # worse than FCFS: negative


def test_the_table_reports_headroom_captured_where_the_oracles_headroom_is_significant(tmp_path):
    # FCFS 10 s, oracle 6 s, the policy 8 s (each times the same per-request factor): it captures half
    df = summarize(_group(tmp_path, stable=True), n_boot=200).set_index("policy")
    assert df.loc["pol", "headroom_captured"] == pytest.approx(0.5)
    assert df.loc["pol", "headroom_captured_lo"] == pytest.approx(0.5)  # an exact share in every replicate
    assert df.loc["fcfs", "headroom_captured"] == pytest.approx(0.0)
    assert df.loc["oracle_srpt", "headroom_captured"] == pytest.approx(1.0)
    assert df.loc["pol", "oracle_mean_rt_vs_fcfs"] == pytest.approx(0.6) and df.loc["pol", "headroom_note"] == ""
    # the p99 ratios with their CIs stand beside the mean's
    assert df.loc["pol", "p99_rt_vs_fcfs"] == pytest.approx(0.8)
    assert df.loc["pol", "p99_rt_vs_fcfs_lo"] <= 0.8 <= df.loc["pol", "p99_rt_vs_fcfs_hi"]
    md = format_summary(df.reset_index())
    assert "headroom captured" in md and "0.50 [0.50, 0.50]" in md


def test_no_headroom_captured_where_the_oracles_headroom_is_not_significant(tmp_path):
    # the oracle is FCFS's time times a noise of mean 1 (0.2-1.8 per request): its CI holds 1
    df = summarize(_group(tmp_path, oracle=10.0, noise=lambda rng, n: rng.uniform(0.2, 1.8, n), stable=True),
                   n_boot=200).set_index("policy")
    assert df.loc["pol", "oracle_mean_rt_vs_fcfs_lo"] < 1 < df.loc["pol", "oracle_mean_rt_vs_fcfs_hi"]
    assert np.isnan(df.loc["pol", "headroom_captured"]) and np.isnan(df.loc["pol", "headroom_captured_lo"])
    assert "not significant" in df.loc["pol", "headroom_note"]
    assert "(oracle n.s.)" in format_summary(df.reset_index())


def test_no_headroom_captured_where_the_oracle_is_slower_or_missing(tmp_path):
    df = summarize(_group(tmp_path / "a", oracle=15.0, stable=True), n_boot=100).set_index("policy")
    assert np.isnan(df.loc["pol", "headroom_captured"]) and "slower" in df.loc["pol", "headroom_note"]
    dirs = [d for d in _group(tmp_path / "b", stable=True) if "oracle" not in d.name]
    df = summarize(dirs, n_boot=50).set_index("policy")
    assert np.isnan(df.loc["pol", "headroom_captured"]) and df.loc["pol", "headroom_note"] == "no oracle_srpt run"


def test_a_group_of_mixed_engine_configs_is_refused_in_one_line(tmp_path):
    dirs = _group(tmp_path, seeds=(0, 1), stable=True)
    dirs.append(_run(tmp_path, "g", "fcfs", 2, np.full(200, 10.0), stable=True, serving={"torch_threads": 4}))
    with pytest.raises(UserError) as e:
        summarize(dirs, n_boot=20)
    msg = str(e.value)
    assert "\n" not in msg and "group g" in msg and "torch_threads: 16 (6 runs) / 4 (1 runs)" in msg
    assert "dtype" not in msg  # only what differs
    df = summarize(dirs, n_boot=20, mixed="flag")
    assert df["flags"].str.contains("mixed engine configs").all()
    assert not summarize(dirs[:-1], n_boot=20)["flags"].str.contains("mixed").any()


def test_unstable_runs_are_marked_not_averaged_silently(tmp_path):
    dirs = _group(tmp_path, seeds=(0, 1), stable=True)
    dirs.append(_run(tmp_path, "g", "pol", 2, np.full(200, 8.0), stable=False))
    df = summarize(dirs, n_boot=20).set_index("policy")
    assert df.loc["pol", "n_unstable"] == 1 and "unstable s2 (0.800)" in df.loc["pol", "flags"]
    assert df.loc["fcfs", "n_unstable"] == 0 and df.loc["fcfs", "flags"] == ""
    assert df.loc["pol", "min_completion_ratio_2nd_half"] == pytest.approx(0.8)


def test_older_runs_get_their_protocol_facts_from_their_requests(tmp_path):
    """Runs made before metrics.json recorded the facts: recomputed from requests.parquet (a growing queue is
    unstable and drifts; 200 arrivals 1 s apart over a 0.2 s isolated service: a window of 995x)."""
    grow = 1.0 + np.arange(200, dtype=float)  # request k waits k s more: completions fall behind arrivals
    dirs = [_run(tmp_path, "g", "fcfs", 0, np.full(200, 1.0)), _run(tmp_path, "g", "pol", 0, grow)]
    df = summarize(dirs, n_boot=20).set_index("policy")
    assert df.loc["fcfs", "n_unstable"] == 0 and df.loc["pol", "n_unstable"] == 1
    assert df.loc["pol", "min_completion_ratio_2nd_half"] < 0.95
    assert df.loc["pol", "max_rt_drift_last_vs_first_third"] > 3
    assert df.loc["fcfs", "min_window_over_isolated"] == pytest.approx(199 / 0.2)


def test_a_seed_whose_closing_fcfs_drifted_more_than_10pct_is_flagged(tmp_path):
    dirs = _group(tmp_path, seeds=(0, 1), stable=True)
    # seed 1's closing FCFS run (runs/<group>/fcfs_last/) is 1.15x its first; seed 0's 1.05x (within 10%)
    first = {s: json.loads((tmp_path / "g" / f"fcfs__s{s}" / "metrics.json").read_text())["mean_rt_s"]
             for s in (0, 1)}
    _run(tmp_path, "g", "fcfs", 0, np.full(200, 10.0), stable=True, mean_rt=1.05 * first[0], sub="fcfs_last")
    _run(tmp_path, "g", "fcfs", 1, np.full(200, 10.0), stable=True, mean_rt=1.15 * first[1], sub="fcfs_last")
    df = summarize(dirs, n_boot=20).set_index("policy")
    assert set(df["fcfs_drift_seeds"]) == {"1"}
    assert all("FCFS drift s1 (1.15x)" in f and "s0" not in f for f in df["flags"])
    assert "FCFS drift s1" in format_summary(df.reset_index())


def test_step_cost_ratio_compares_decode_steps_at_the_same_rows():
    """A policy whose decoding steps cost 10% more at every row count gets 1.1, whatever rows it ran; mixed
    steps (prompt tokens) and rare row counts are left out."""
    import pandas as pd

    from rtlm_lab.scheduler.protocol import step_cost_ratio

    fcfs = pd.DataFrame({"n_seqs": [4] * 10 + [8] * 10 + [16] * 2, "dt_s": [1.0] * 10 + [2.0] * 10 + [9.0] * 2})
    fcfs["n_tokens"] = fcfs["n_seqs"]
    pol = pd.DataFrame({"n_seqs": [4] * 30 + [8] * 10 + [8] * 5, "dt_s": [1.1] * 30 + [2.2] * 10 + [50.0] * 5,
                        "n_tokens": [4] * 30 + [8] * 10 + [300] * 5})  # the last 5: mixed steps, not compared
    assert step_cost_ratio(pol, fcfs) == pytest.approx(1.1)
    assert step_cost_ratio(fcfs, fcfs) == pytest.approx(1.0)
    assert math.isnan(step_cost_ratio(pol[pol["n_seqs"] == 4], fcfs[fcfs["n_seqs"] == 8]))


# ====================================================================================== the drift gate (box.sh)
def _seed(root, seed, first, closing, policies=("pol",)):
    """One attempt of a seed in group ``g``: FCFS (mean RT ``first``), the policies, the closing FCFS run."""
    for pol in ("fcfs", *policies):
        _run(root, "g", pol, seed, np.full(50, first if pol == "fcfs" else 1.0))
    _run(root, "g", "fcfs", seed, np.full(50, closing), sub="fcfs_last")


def test_the_drift_gate_reruns_a_drifting_seed_and_records_every_attempt(tmp_path):
    from rtlm_lab.scheduler.analysis import DRIFT_ATTEMPTS, drift_gate

    g = tmp_path / "g"
    _seed(tmp_path, 0, 1.0, 1.05)   # within 10%: kept at once
    _seed(tmp_path, 1, 1.0, 1.30)   # 30% off: dropped while reruns are left
    kept, msg = drift_gate(g, 0, reruns=1)
    assert kept and "1.05x" in msg and msg.endswith("kept")
    kept, msg = drift_gate(g, 1, reruns=1)
    assert not kept and "dropped" in msg
    assert not list(g.glob("*__s1/metrics.json")) and not list((g / "fcfs_last").glob("*__s1/metrics.json"))
    assert (g / "fcfs__s0" / "metrics.json").is_file()  # the other seed's runs stay
    # the seed's second attempt drifts too: no rerun left, so it stands, flagged
    _seed(tmp_path, 1, 1.0, 0.70)
    kept, msg = drift_gate(g, 1, reruns=1)
    assert kept and "drift flagged" in msg and (g / "pol__s1" / "metrics.json").is_file()
    log = pd.read_csv(g / DRIFT_ATTEMPTS)
    assert log[["seed", "attempt"]].values.tolist() == [[0, 1], [1, 1], [1, 2]]
    assert log["kept"].tolist() == [True, False, True]
    assert log["closing_vs_first"].round(2).tolist() == [1.05, 1.3, 0.7]
    # a verdict already given is given again (a cut call resumes), without a new row
    assert drift_gate(g, 0, reruns=1)[0] and len(pd.read_csv(g / DRIFT_ATTEMPTS)) == 3


def test_the_drift_gate_needs_both_fcfs_runs(tmp_path):
    from rtlm_lab.scheduler.analysis import drift_gate

    _run(tmp_path, "g", "fcfs", 0, np.full(50, 1.0))
    with pytest.raises(UserError, match="no first or no closing FCFS run"):
        drift_gate(tmp_path / "g", 0, reruns=2)


def test_the_drift_table_counts_attempts_and_lists_the_dropped_ones(tmp_path):
    from rtlm_lab.scheduler.analysis import drift_attempts, drift_gate, fcfs_drift, format_drift

    root = tmp_path / "ref"
    runs = root / "runs"
    _seed(runs, 0, 1.0, 1.5)
    assert not drift_gate(runs / "g", 0, reruns=2)[0]
    _seed(runs, 0, 1.0, 0.95)
    assert drift_gate(runs / "g", 0, reruns=2)[0]
    df = fcfs_drift(root)
    assert df[["seed", "attempts"]].values.tolist() == [[0, 2]]
    assert df["last_vs_first_mean_rt"].iloc[0] == pytest.approx(0.95)
    att = drift_attempts(root)
    md = format_drift(df, att[~att["kept"]])
    assert "Attempts dropped by the drift rule" in md and "1.5" in md
    assert "dropped" not in format_drift(df, att[att["seed"] < 0])
