"""The simulation grid (``rtlm-reference target=sim_grid``): real ``rtlm-schedule mode=sim`` runs over a small
grid on the committed DialoGPT-ccc CPU engine, summarized as the real table is; resumable; stale or missing
runs are a clear error."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pandas as pd
import pytest
from conftest import ROOT
from omegaconf import OmegaConf

from rtlm_lab.errors import UserError
from rtlm_lab.scheduler.simgrid import build, cell_runs


def _cfg(tmp_path, **kw):
    base = OmegaConf.load(ROOT / "conf" / "target" / "sim_grid.yaml")
    base.root = str(tmp_path / "grid")
    base.out = str(tmp_path / "out" / "grid.csv")
    base.policies = ["fcfs", "oracle_srpt", "rtlm"]
    base.rhos = [0.9]
    base.seeds = [0, 1]
    base.n_requests = 60
    base.n_boot = 200
    # the engine the committed measurement is of (every one predates the kv core)
    base.cells = [{"lm": "dialogpt_ccc", "platform": "cpu", "overrides": ["platform.engine.backend=slots"]}]
    for k, v in kw.items():
        base[k] = v
    return base


@pytest.fixture(scope="module")
def grid(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("simgrid")
    cfg = _cfg(tmp)
    return tmp, cfg, build(cfg, command="test")


def test_grid_runs_every_policy_rho_seed_and_summarizes_them_as_sim(grid):
    tmp, cfg, table = grid
    assert set(table["policy"]) == {"fcfs", "oracle_srpt", "rtlm"}
    assert (table["mode"] == "sim").all() and (table["group"] == "sim__cpu__dialogpt_ccc").all()
    assert (table["n_seeds"] == 2).all() and (table["engine_key"] == "slots-seqs8").all()
    fc = table[table["policy"] == "fcfs"].iloc[0]
    assert fc["mean_rt_vs_fcfs"] == pytest.approx(1.0)
    r = table[table["policy"] == "rtlm"].iloc[0]
    assert r["mean_rt_vs_fcfs_lo"] <= r["mean_rt_vs_fcfs"] <= r["mean_rt_vs_fcfs_hi"]
    assert r["mean_rt_vs_oracle"] > 0 and r["oracle"] == "oracle_srpt"
    # the committed engine measurement, not this machine's outputs/schedule/ capacity
    assert (table["source"] == "engine/dialogpt_ccc__cpu__1da42fe5.json (2026-12-01)").all()
    out = tmp / "out"
    on_disk = pd.read_csv(out / "grid.csv")
    assert len(on_disk) == len(table)
    md = (out / "grid.md").read_text()
    assert md.startswith("# Simulation grid (sim, not real runs)") and "dialogpt_ccc" in md
    assert (out / "grid.png").stat().st_size > 10_000
    prov = json.loads((out / "grid.provenance.json").read_text())
    assert prov["n_runs"] == 6 and "sim__cpu__dialogpt_ccc" in prov["cells"]


def test_grid_resumes_and_rejects_stale_or_missing_runs(grid):
    tmp, cfg, table = grid
    runs = cell_runs(tmp / "grid", cfg.cells[0], cfg.n_requests)
    assert len(runs) == 6
    stamp = {d: (d / "metrics.json").stat().st_mtime_ns for d in runs}
    again = build(cfg, command="test")  # nothing left to run: the same runs, the same table
    assert {d: (d / "metrics.json").stat().st_mtime_ns for d in runs} == stamp
    pd.testing.assert_frame_equal(again.drop(columns=["source"]), table.drop(columns=["source"]))
    # a run of another config beside one of this grid's (same policy, rho, seed): which is meant is unclear
    stale = runs[0].with_name(runs[0].name.split("-")[0] + "-ffffff")
    shutil.copytree(runs[0], stale)
    with pytest.raises(UserError, match="two runs of sim__cpu__dialogpt_ccc"):
        build(cfg, command="test")
    shutil.rmtree(stale)
    # a grid asking for runs that were not made, without running them
    with pytest.raises(UserError, match=r"grid run\(s\) missing"):
        build(_cfg(tmp, run=False, root=cfg.root, rhos=[0.9, 0.5]), command="test")


def test_grid_config_errors_are_user_errors(tmp_path):
    with pytest.raises(UserError, match="must include fcfs"):
        build(_cfg(tmp_path, policies=["rtlm"], run=False))
    with pytest.raises(UserError, match="needs lm and platform"):
        build(_cfg(tmp_path, cells=[{"lm": "dialogpt_ccc"}], run=False))


def test_cuda_cells_are_charged_the_real_h200_runs_prediction_cost():
    """A cell with prediction_cost_from gets the median per-request cost of those real runs' online
    predictions (recomputed here from their metrics.json) on its command line; one whose runs measured
    nothing is an error before anything runs."""
    import glob

    import numpy as np

    from rtlm_lab.scheduler.simgrid import cell_command, cell_costs

    cfg = OmegaConf.load(ROOT / "conf" / "target" / "sim_grid.yaml")
    cell = next(c for c in cfg.cells if c.lm == "gemma3_270m" and c.platform == "cuda")
    runs = sorted(glob.glob(str(ROOT / "outputs/reference/scheduler/runs/h200__gemma3_270m__seqs64/*__rtlm__s*")))
    assert len(runs) == 3
    want = np.median([json.loads((Path(r) / "metrics.json").read_text())["prediction_s"] / 1000
                      for r in runs])
    cost = cell_costs(cell)
    assert cost["costs"]["pred_rtlm"] == pytest.approx(want) and cost["runs"]["pred_rtlm"] == 3
    cmd = cell_command(cell, cfg, ROOT / "outputs" / "sim_grid")
    assert cmd[-1].startswith("scheduler.prediction_cost_s={") and f"pred_rtlm:{want:.6g}" in cmd[-1]
    assert cell_costs(next(c for c in cfg.cells if c.platform == "cpu")) is None  # timed on the cpu itself
    with pytest.raises(UserError, match="measured"):
        cell_costs({"lm": "x", "platform": "cuda", "prediction_cost_from": ["outputs/reference/scheduler/runs/cpu__*static/*"]})
