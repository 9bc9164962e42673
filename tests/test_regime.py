"""The regime map (``rtlm-reference target=regime``) and the fixed-length overload burst it sweeps.

The burst is checked on a controlled clock (exact rates by construction, a single FCFS server of known service
time); the map on a toy regime of two cells over a tiny profile (a slice of the committed DialoGPT-ccc cuda
profile, its committed engine measurement): one cell where requests queue behind a 4-row engine at rho 0.95, one
where nothing ever waits (rho 0.1, 128 rows), so the oracle's headroom is significant in the first and exactly 1
in the second."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
from conftest import ROOT

from rtlm_lab.errors import UserError
from rtlm_lab.scheduler.workload import arrival_times, check_workload, overload_calm_rho, realized_arrival_rate


# ================================================================================================ the burst
def test_overload_burst_has_fixed_length_at_its_load_and_the_trace_keeps_the_average_rate():
    cap, rho, n, b = 10.0, 0.8, 1000, 200  # capacity 10 req/s: a service time of 0.1 s at rho 1
    for seed in range(3):
        t = arrival_times("overload", rho * cap, n, seed=seed, rho=rho, overload_rho=2.0, overload_requests=b,
                          overload_start=0.25)
        assert realized_arrival_rate(t) == pytest.approx(rho * cap, rel=1e-9)  # the exact-rate protocol holds
        burst = t[250:250 + b]  # after 25% of the arrivals, b of them
        assert realized_arrival_rate(burst) == pytest.approx(2.0 * cap, rel=1e-9)
        assert burst[-1] - burst[0] == pytest.approx((b - 1) / (2.0 * cap))  # the same length on every seed
        calm = np.concatenate([np.diff(t[:251]), np.diff(t[249 + b:])])
        assert len(calm) / calm.sum() == pytest.approx(overload_calm_rho(rho, n, 2.0, b) * cap, rel=1e-9)
    # by hand: (n - 1) / ((n - b) / calm + (b - 1) / 2) = rho
    calm = overload_calm_rho(0.8, 1000, 2.0, 200)
    assert 999 / (800 / calm + 199 / 2.0) == pytest.approx(0.8)


def test_a_fifo_server_queues_what_the_burst_brings_and_drains_it():
    cap, b = 10.0, 200
    t = arrival_times("overload", 0.6 * cap, 1000, seed=1, rho=0.6, overload_rho=2.0, overload_requests=b,
                      overload_start=0.3)
    fin = np.empty_like(t)
    free = 0.0
    for i, a in enumerate(t):  # one server, 1 / cap a request
        free = max(free, a) + 1.0 / cap
        fin[i] = free
    wait = fin - t - 1.0 / cap
    end = 300 + b - 1  # the burst's last arrival: about b / 2 requests queued before it
    assert 0.6 * b / 2 < wait[end] * cap < 1.4 * b / 2
    assert wait[:300].max() * cap < 0.5 * b / 2 and wait[-100:].max() < wait[end] / 4  # calm before, drained after


def test_overload_user_errors_are_one_line():
    with pytest.raises(UserError, match="overload_rho"):
        arrival_times("overload", 5.0, 100, rho=2.5, overload_rho=2.0, overload_requests=20)
    with pytest.raises(UserError, match="overload_requests"):
        arrival_times("overload", 5.0, 100, rho=0.8, overload_requests=100)
    with pytest.raises(UserError, match="overload_start"):
        arrival_times("overload", 5.0, 100, rho=0.8, overload_requests=20, overload_start=1.5)
    check_workload({"kind": "overload", "rho": 0.8, "n_requests": 1000})


# ================================================================================================ the toy regime
@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    from omegaconf import OmegaConf

    from rtlm_lab.scheduler.regime import build

    tmp = tmp_path_factory.mktemp("regime")
    prof = pd.read_parquet(ROOT / "outputs" / "reference" / "profiles" / "dialogpt_ccc__cuda.parquet")
    tiny = prof[prof["n_output_tokens"].notna()].head(120)
    tiny.to_parquet(tmp / "tiny.parquet")
    cfg = OmegaConf.load(ROOT / "conf" / "target" / "regime.yaml")
    cfg.root, cfg.out = str(tmp / "runs"), str(tmp / "out" / "regime.csv")
    cfg.policies, cfg.seeds, cfg.n_requests, cfg.n_boot, cfg.jobs = ["fcfs", "oracle_srpt", "sjf_input"], [0], 200, 100, 1
    cfg.lms = [{"lm": "dialogpt_ccc", "platform": "cuda", "profile": str(tmp / "tiny.parquet"),
                "step_model": "outputs/reference/scheduler/engine/dialogpt_ccc__cuda__b3ef326a.2026-12-03.json"}]
    cfg.arrivals = {"poisson": {"kind": "poisson"}}
    cfg.max_seqs, cfg.loads, cfg.progress = [4], [0.95], False  # cell 1
    t1 = build(cfg, command="test")
    cfg.max_seqs, cfg.loads = [4, 128], [0.1, 0.95]  # + cells 2-4: rho 0.1 with 128 rows never queues
    return tmp, cfg, t1, build(cfg, command="test")


def test_the_toy_regime_table_has_the_cells_axes_ratios_and_protocol(toy):
    tmp, cfg, _, table = toy
    for c in ("cell", "lm", "max_seqs", "kv_slots", "arrivals", "load", "nominal_rho", "policy", "oracle_headroom",
              "oracle_headroom_lo", "oracle_headroom_hi", "mean_rt_vs_fcfs", "mean_rt_vs_fcfs_lo", "p99_rt_vs_fcfs",
              "p99_rt_vs_fcfs_hi", "headroom_captured", "headroom_captured_lo", "headroom_captured_hi",
              "realized_rho", "cell_stable", "cell_rho_ok", "flags", "step_model"):
        assert c in table.columns, c
    assert len(table) == 4 * 3 and set(table["kv_slots"]) == {8, 256}
    assert (table[table["policy"] == "fcfs"]["mean_rt_vs_fcfs"] == 1.0).all()
    assert table["realized_rho"].sub(table["nominal_rho"]).abs().max() < 0.02 * 0.95
    assert table["step_model"].str.contains("no kv-engine measurement").all()
    on_disk = pd.read_csv(tmp / "out" / "regime.csv")
    assert list(on_disk.columns) == list(table.columns) and len(on_disk) == len(table)
    for f in ("regime.md", "regime.png", "regime.svg", "regime_cells.csv", "provenance.json"):
        assert (tmp / "out" / f).stat().st_size > 0, f
    assert "sim" in (tmp / "out" / "regime.md").read_text().splitlines()[0]
    prov = json.loads((tmp / "out" / "provenance.json").read_text())
    assert prov["n_runs"] == 4 * 3 and prov["git_commit"] and prov["config"]["n_requests"] == 200


def test_headroom_captured_only_where_the_oracles_headroom_is_significant(toy):
    _, _, _, table = toy
    quiet = table[(table["max_seqs"] == 128) & (table["load"] == "rho0.1")]
    assert (quiet["oracle_headroom"] == 1.0).all()  # nothing waits: every order is the same
    busy = table[(table["max_seqs"] == 4) & (table["load"] == "rho0.95")]
    assert (busy["oracle_headroom_hi"] < 1).all()
    holds_1 = table["oracle_mean_rt_vs_fcfs_hi"] >= 1
    assert holds_1.any() and (~holds_1).any()
    assert table.loc[holds_1, "headroom_captured"].isna().all()
    assert table.loc[~holds_1, "headroom_captured"].notna().all()
    sjf = busy[busy["policy"] == "sjf_input"].iloc[0]
    assert sjf["headroom_captured_lo"] <= sjf["headroom_captured"] <= sjf["headroom_captured_hi"]


def test_the_picked_cells_and_resuming(toy):
    tmp, cfg, first, table = toy
    picks = pd.read_csv(tmp / "out" / "regime_cells.csv")
    # 4 cells, top 3 by headroom and 1 by its lack, among those meeting the protocol
    assert list(picks["pick"]).count("largest headroom") <= 3 and list(picks["pick"]).count("smallest headroom") <= 1
    assert picks["oracle_headroom"].is_monotonic_increasing or picks["pick"].iloc[-1] == "smallest headroom"
    # the first cell's runs were not redone by the second build: the same numbers
    a = first.set_index(["cell", "policy"])["mean_rt_s"]
    b = table.set_index(["cell", "policy"])["mean_rt_s"].loc[a.index]
    pd.testing.assert_series_equal(a, b)
    from rtlm_lab.scheduler.regime import build

    cfg.run = False
    cfg.seeds = [0, 1]
    with pytest.raises(UserError, match=r"regime run\(s\) missing"):
        build(cfg, command="test")


def test_bad_regime_configs_are_one_line(toy):
    from rtlm_lab.scheduler.regime import build

    _, cfg, _, _ = toy
    with pytest.raises(UserError, match="must include oracle_srpt"):
        build({**dict(cfg), "policies": ["fcfs", "rtlm"]})
    with pytest.raises(UserError, match="no sim form"):
        build({**dict(cfg), "policies": ["fcfs", "oracle_srpt", "lmstate"]})
    with pytest.raises(UserError, match="neither a rho"):
        build({**dict(cfg), "loads": ["high"]})
