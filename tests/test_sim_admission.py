"""The step model's admission term and the replay of real runs (``rtlm_lab.scheduler.replay``), on a controlled
clock and fake data: admissions that cost extra time are recovered by the fit, charged by the simulator, and
a replay with the model that made a run reproduces it exactly, while the model without the term is faster."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from rtlm_lab.errors import UserError
from rtlm_lab.scheduler.engine import Engine, PredictorServer, SimBackend, StepModel, VirtualClock, serve
from rtlm_lab.scheduler.policies import Request, make_policy

TRUE = StepModel(a=0.004, b=5e-5, c=2e-6, d=4e-4, e=0.005)   # an admitting step costs ~5 ms more
NO_ADMIT = StepModel(a=TRUE.a, b=TRUE.b, c=TRUE.c)


def synthetic_steps(n: int = 400, seed: int = 0, noise: float = 2e-5) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    rows = rng.integers(1, 64, n)
    adm = np.where(rng.random(n) < 0.6, rng.integers(1, 4, n), 0)
    tok = rows - adm + adm * rng.integers(5, 60, n)
    dt = (TRUE.a + TRUE.b * rows + TRUE.c * tok + TRUE.d * adm + TRUE.e * (adm > 0) + rng.normal(0, noise, n))
    return pd.DataFrame({"t_s": np.cumsum(dt) - dt, "dt_s": dt, "n_seqs": rows, "n_tokens": tok, "n_admit": adm})


def test_fit_recovers_the_admission_terms():
    steps = synthetic_steps()
    m = StepModel.fit(steps)
    assert m.meta["admission"]
    assert m.e == pytest.approx(TRUE.e, rel=0.02) and m.d == pytest.approx(TRUE.d, rel=0.1)
    assert m.a == pytest.approx(TRUE.a, rel=0.05) and m.b == pytest.approx(TRUE.b, rel=0.05)
    # without the term the fit cannot explain the admitting steps
    blind = StepModel.fit(steps, admission=False)
    assert blind.d == blind.e == 0.0 and blind.meta["rmse_s"] > 20 * m.meta["rmse_s"]
    with pytest.raises(UserError):
        StepModel.fit(steps.drop(columns="n_admit"), admission=True)
    # every step admitting (a saturation run's start): e cannot be told from a, and is not fitted
    every = steps[steps["n_admit"] > 0]
    m = StepModel.fit(every)
    assert m.e == 0.0 and m.a == pytest.approx(TRUE.a + TRUE.e, rel=0.05) and m.d == pytest.approx(TRUE.d, rel=0.1)


def test_step_model_files_without_admission_terms_read_as_zero():
    old = {"a": 0.0025, "b": 7.7e-05, "c": 3.7e-06, "source": "saturation run"}
    m = StepModel.from_dict(old)
    assert m.d == m.e == 0.0 and not m.has_admission
    assert StepModel.from_dict(TRUE.to_dict()) == TRUE
    assert TRUE.step_s(10, 10) == pytest.approx(NO_ADMIT.step_s(10, 10))
    assert TRUE.step_s(10, 40, 2) == pytest.approx(NO_ADMIT.step_s(10, 40) + 2 * TRUE.d + TRUE.e)
    assert TRUE.isolated(20, 3) == pytest.approx(TRUE.step_s(1, 20, 1) + 2 * TRUE.step_s(1, 1))


def _serve(model: StepModel, spec, max_seqs: int = 4):
    reqs = [Request(request_id=i, text="", context="", arrival_s=t, n_input_tokens=p, true_tokens=n)
            for i, t, p, n in spec]
    pol = make_policy("fcfs")
    eng = Engine("main", SimBackend(model), pol, max_seqs=max_seqs, max_batch_tokens=4096, step_model=model)
    clock = VirtualClock()
    jobs, facts = serve(reqs, pol, [eng], clock, PredictorServer(reqs, (), clock))
    return {j.rid: j for j in jobs}, facts["steps"]["main"]


def test_the_simulator_charges_admissions_by_hand():
    unit = StepModel(a=1.0, e=0.5)  # 1 s a step, +0.5 s when a request joins
    jobs, steps = _serve(unit, [("a", 0.0, 1, 3), ("b", 1.2, 1, 2)])
    # a joins at 0 (1.5 s); b, arrived at 1.2, joins the step at 1.5 (1.5 s); the last step at 3.0 admits none
    assert steps["n_admit"].tolist() == [1, 1, 0]
    assert jobs["a"].finish_s == pytest.approx(1.5 + 1.5 + 1.0)
    assert jobs["b"].admit_s == pytest.approx(1.5) and jobs["b"].finish_s == pytest.approx(4.0)
    plain, _ = _serve(StepModel(a=1.0), [("a", 0.0, 1, 3), ("b", 1.2, 1, 2)])
    assert plain["a"].finish_s == pytest.approx(3.0)


def _fake_run(tmp_path, model: StepModel, policy: str = "fcfs", n: int = 120, seed: int = 0, record_admit=True):
    """A 'real' run made by the simulator with ``model`` (its steps have no gaps: period = dt)."""
    from rtlm_lab.scheduler.continuous import job_records

    rng = np.random.default_rng(seed)
    arr = np.cumsum(rng.exponential(0.004, n))
    spec = [(f"r{i:03d}", float(t), int(p), int(k)) for i, (t, p, k) in
            enumerate(zip(arr, rng.integers(4, 40, n), rng.integers(1, 40, n)))]
    jobs, steps = _serve(model, spec, max_seqs=8)
    d = tmp_path / f"{policy}__s{seed}"
    d.mkdir()
    records = job_records(list(jobs.values()), make_policy(policy), 5.0, 0.1)
    records.drop(columns=["token_times_s"]).to_parquet(d / "requests.parquet")
    (steps if record_admit else steps.drop(columns="n_admit")).to_parquet(d / "steps.parquet")
    pd.DataFrame({"request_id": [s[0] for s in spec], "arrival_s": [s[1] for s in spec],
                  "n_input_tokens": [s[2] for s in spec], "true_tokens": [s[3] for s in spec]}
                 ).to_parquet(d / "trace.parquet")
    rt = records.loc[~records["warmup"], "response_s"]
    (d / "metrics.json").write_text(json.dumps({
        "policy": {"name": policy}, "seed": seed, "engine_config": {"max_seqs": 8, "max_batch_tokens": 4096},
        "capacity_rps": 100.0, "n_requests": n, "n_warmup_excluded": int(records["warmup"].sum()),
        "mean_rt_s": float(rt.mean()), "step_model": NO_ADMIT.to_dict(), "n_engines": 1}))
    return d, steps


def test_step_log_counts_admissions_from_the_requests(tmp_path):
    from rtlm_lab.scheduler.replay import step_log

    d, steps = _fake_run(tmp_path, TRUE, record_admit=False)
    log = step_log(d)
    assert log["n_admit"].tolist() == steps["n_admit"].tolist()
    assert log["n_admit"].sum() == 120
    busy = log["busy_after"].to_numpy()
    assert np.allclose(log["period_s"][busy], log["dt_s"][busy])  # the simulator leaves no gap between steps


def test_calibrated_replay_reproduces_the_run_and_the_blind_model_is_faster(tmp_path):
    from rtlm_lab.scheduler.replay import fit_step_model, sim_error

    cal = [_fake_run(tmp_path, TRUE, seed=s)[0] for s in (1, 2)]
    val, _ = _fake_run(tmp_path, TRUE, seed=0)
    new = fit_step_model(cal)
    assert new.e == pytest.approx(TRUE.e, rel=0.05) and new.a == pytest.approx(TRUE.a, rel=0.1)
    table = sim_error([val], {"old_saturation": None, "new_admission": new}).set_index("model")
    assert table["same_trace"].all()
    assert abs(table.loc["new_admission", "mean_err"]) < 0.05
    assert table.loc["old_saturation", "mean_err"] < -0.2   # admissions ignored: far too fast
    assert table.loc["old_saturation", "sim_mean_s"] < table.loc["new_admission", "sim_mean_s"]


def _saturation_steps(tmp_path, model: StepModel, n: int = 80, gap: float = 0.0, name: str = "sat.steps.parquet"):
    """A fake saturation run's steps parquet: every request queued at t=0 on an 8-slot engine (the first step
    admits 8, later ones refill freed slots), served by the simulator with ``model``; ``gap`` seconds of host
    work are put between consecutive steps, as the real loop has."""
    rng = np.random.default_rng(7)
    spec = [(f"q{i:03d}", 0.0, int(p), int(k)) for i, (p, k) in
            enumerate(zip(rng.integers(4, 40, n), rng.integers(1, 30, n)))]
    _, steps = _serve(model, spec, max_seqs=8)
    steps = steps[["t_s", "dt_s", "n_seqs", "n_tokens", "n_admit"]].sort_values("t_s").reset_index(drop=True)
    steps["t_s"] = steps["t_s"] + gap * np.arange(len(steps))
    f = tmp_path / name
    steps.to_parquet(f)
    return f, steps


def test_saturation_steps_calibrate_the_step_model(tmp_path):
    from rtlm_lab.scheduler.replay import fit_step_model, saturation_step_log

    f, steps = _saturation_steps(tmp_path, TRUE, gap=0.001)
    log = saturation_step_log(f)
    assert log["n_admit"].iloc[0] == 8 and log["n_admit"].iloc[1:].max() < 8 and (log["n_admit"] == 0).any()
    # every request is ready at t=0: busy after every step but the last; the period holds the loop's gap
    assert log["busy_after"].tolist() == [True] * (len(log) - 1) + [False]
    assert np.allclose(log["period_s"].iloc[:-1], log["dt_s"].iloc[:-1] + 0.001)
    assert log["period_s"].iloc[-1] == log["dt_s"].iloc[-1]
    # the first step's 8 admissions and the refills after it identify d and e (noise-free: exactly)
    m = fit_step_model([], target="dt_s", steps_files=[f])
    for k in "abcde":
        assert getattr(m, k) == pytest.approx(getattr(TRUE, k), rel=1e-3, abs=1e-9)
    assert m.meta["saturation_steps"] == [f.name] and "1 saturation run" in m.source
    per = fit_step_model([], target="period_s", steps_files=[f])
    assert per.e == pytest.approx(TRUE.e, rel=0.05) and per.a > TRUE.a   # the gap lands in a
    assert fit_step_model([], admission=False, steps_files=[f]).d == 0.0
    with pytest.raises(UserError):
        fit_step_model([], steps_files=[])
    # what is not a saturation run's steps file
    steps.drop(columns="n_admit").to_parquet(tmp_path / "no_admit.parquet")
    steps.assign(n_admit=np.where(np.arange(len(steps)) == 0, 0, steps["n_admit"])).to_parquet(tmp_path / "late.parquet")
    steps.assign(t_s=steps["t_s"] * 0.5).to_parquet(tmp_path / "overlap.parquet")
    for bad in ("no_admit.parquet", "late.parquet", "overlap.parquet", "missing.parquet"):
        with pytest.raises(UserError):
            saturation_step_log(tmp_path / bad)


def test_build_with_saturation_steps_as_calibration(tmp_path):
    from rtlm_lab.scheduler.replay import build

    f, _ = _saturation_steps(tmp_path, TRUE)
    val, _ = _fake_run(tmp_path, TRUE, seed=0)
    out = tmp_path / "sim_error_fake.csv"
    cfg = {"name": "sim_error", "calibration": [], "calibration_steps": [str(tmp_path / "sat.*.parquet")],
           "runs": [str(val)], "fit_target": "period_s", "out": str(out)}
    table = build(cfg).set_index("model")
    assert abs(table.loc["new_admission", "mean_err"]) < 0.02   # the saturation steps' model reproduces the run
    assert table.loc["old_saturation", "mean_err"] < -0.2        # the run's own model has no admission term
    prov = json.loads(out.with_suffix(".provenance.json").read_text())
    assert prov["calibration_steps"] == [str(f)] and prov["calibration_runs"] == []
    assert prov["models"]["new_admission"]["meta"]["saturation_steps"] == [f.name]
    with pytest.raises(UserError):
        build({**cfg, "calibration_steps": [str(tmp_path / "nothing.parquet")]})
    # every table beside it in one summary: what each model was fitted on and how far it is off
    summary = pd.read_csv(tmp_path / "sim_error_summary.csv")
    assert list(summary["table"]) == [out.name] * 3
    assert set(summary["model"]) == {"old_saturation", "new_no_admission", "new_admission"}
    new = summary.set_index("model").loc["new_admission"]
    assert new["calibration"] == f"saturation steps {f.name}" and new["runs"] == 1
    assert new["runs_mean_within_15pct"] == 1 and abs(new["step_err_max"]) < 0.02
    md = (tmp_path / "sim_error_summary.md").read_text()
    assert out.name in md and "new_no_admission" not in md  # the ablation stays in the csv


def test_the_summary_covers_every_table_beside_it_and_none_stale(tmp_path):
    """Two sim-error tables in one folder (one calibrated on real runs, one on a saturation run's steps): each build
    rewrites ``sim_error_summary.csv`` from every table beside it, so after the second build the summary holds both
    tables and equals a fresh :func:`summary_all` of the folder (no table left out, none stale)."""
    from rtlm_lab.scheduler.replay import build, summary_all

    out_dir = tmp_path / "ref"
    runs = tmp_path / "runs"
    runs.mkdir()
    cal = [_fake_run(runs, TRUE, seed=s)[0] for s in (1, 2)]
    val = _fake_run(runs, TRUE, seed=0)[0]
    _saturation_steps(tmp_path, TRUE)
    build({"calibration": [str(d) for d in cal], "runs": [str(val)], "out": str(out_dir / "sim_error_a.csv")})
    first = pd.read_csv(out_dir / "sim_error_summary.csv")
    assert set(first["table"]) == {"sim_error_a.csv"}
    assert set(first["calibration"]) == {"each run's own saturation run (served with)",
                                         f"2 real run(s): {cal[0].name} + 1 more"}
    build({"calibration_steps": [str(tmp_path / "sat.steps.parquet")], "runs": [str(val)],
           "out": str(out_dir / "sim_error_b.csv")})
    committed = pd.read_csv(out_dir / "sim_error_summary.csv")
    fresh = summary_all(out_dir)
    assert sorted(set(fresh["table"])) == ["sim_error_a.csv", "sim_error_b.csv"]
    assert len(fresh) == 6  # three models a table
    pd.testing.assert_frame_equal(committed, fresh.round(4), check_dtype=False)
    md = (out_dir / "sim_error_summary.md").read_text()
    assert "sim_error_a.csv" in md and "sim_error_b.csv" in md


def test_the_committed_config_rebuilds_the_committed_table_and_bad_configs_say_so_in_one_line(tmp_path):
    """conf/target/sim_error.yaml names the committed CPU group's runs: rebuilding gives the committed
    sim_error.csv (the replay is deterministic); a config naming no calibration or no validation runs stops
    with one UserError line, before touching any file."""
    from omegaconf import OmegaConf

    from conftest import ROOT
    from rtlm_lab.scheduler.replay import build

    cfg = OmegaConf.to_container(OmegaConf.load(ROOT / "conf" / "target" / "sim_error.yaml"))
    assert cfg["calibration"] and cfg["runs"] and not cfg["calibration_steps"]
    out = tmp_path / "sim_error.csv"
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(ROOT)  # the globs are relative to the checkout
        build({**cfg, "out": str(out)})
    got, want = pd.read_csv(out), pd.read_csv(ROOT / "outputs/reference/scheduler/sim_error.csv")
    pd.testing.assert_frame_equal(got, want)
    cfg = {**cfg, "calibration": [], "runs": []}
    with pytest.raises(UserError, match="^no calibration runs: ") as exc:
        build(cfg)
    assert "\n" not in str(exc.value)
    with pytest.raises(UserError, match="^no validation runs: "):
        build({**cfg, "calibration_steps": [str(_saturation_steps(tmp_path, TRUE)[0])]})
