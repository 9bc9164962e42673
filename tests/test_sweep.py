"""``rtlm-sweep`` + ``rtlm-report``: two tiny cells (Gemma and DialoGPT-ccc on cpu, 30-conversation slices of
the committed reference profiles, tiny notebook sizes, sim mode) plus one cell whose profile does not exist.

* an uninterrupted sweep records the failing cell with its error and exits 1;
* the same sweep sent SIGTERM during its second cell keeps the first in the manifest (the second marked
  interrupted), and the rerun skips the first;
* both sweeps' reports have the same tables.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest

ROOT = Path(__file__).resolve().parent.parent
REF = ROOT / "outputs" / "reference" / "profiles"
LMS = ["gemma3_270m", "dialogpt_ccc"]
needs_profiles = pytest.mark.skipif(not all((REF / f"{lm}__cpu.parquet").is_file() for lm in LMS),
                                    reason="committed cpu reference profiles missing")
TINY = ["sweep.nb01.n_bootstrap=20", "sweep.nb02.n_bootstrap=20", "sweep.nb03.n_requests=12",
        "sweep.nb03.rhos=[0.9]", "sweep.nb03.policies=[fcfs,sjf_proxy,rtlm]",
        'sweep.nb03.overrides=["scheduler.overhead_samples=0"]']
# smollm2_135m has no profile in the tiny profile dir: its cell fails
CELLS = ["sweep.lms=[gemma3_270m,dialogpt_ccc,smollm2_135m]", "sweep.platforms=[cpu]"]


@pytest.fixture(scope="module")
def tiny_profiles(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("profiles")
    for lm in LMS:
        df = pd.read_parquet(REF / f"{lm}__cpu.parquet")
        conv = df["request_id"].str.rsplit("-", n=1).str[0]
        df[conv.isin(conv.unique()[:30])].to_parquet(d / f"{lm}__cpu.parquet", index=False)
    return d


def _env(out: Path) -> dict:
    env = {**os.environ, "RTLM_OUTPUT_DIR": str(out), "RTLM_ROOT": str(ROOT)}
    env.pop("RTLM_DATA_DIR", None)  # the caches in data/ (spaCy scores, MiniLM, predictors) are used
    return env


def _sweep_cli(out: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "rtlm_lab.tasks.sweep", *args], env=_env(out), cwd=ROOT,
                          capture_output=True, text=True, timeout=900)


def _manifest(out: Path, name: str) -> dict:
    return json.loads((out / "sweeps" / name / "manifest.json").read_text())


@pytest.mark.slow  # three sweeps of three cells through papermill (notebooks 01-03 each): the longest test
@needs_profiles
def test_sweep_interrupt_resume_failure_and_report(tmp_path, tiny_profiles):
    from rtlm_lab.report import build_report, report_tables

    out = tmp_path / "outputs"
    common = [f"sweep.profile_dir={tiny_profiles}", *CELLS, *TINY]

    # 1. uninterrupted: two cells done, the third recorded as failed, exit status 1, a report anyway
    res = _sweep_cli(out, "sweep.name=straight", *common)
    assert res.returncode == 1, res.stderr[-3000:]
    assert "smollm2_135m/cpu (no profile" in res.stderr and "1 of 3 cell(s) failed" in res.stderr
    m = _manifest(out, "straight")
    assert {k: c["status"] for k, c in m["cells"].items()} == {
        "gemma3_270m/cpu": "done", "dialogpt_ccc/cpu": "done", "smollm2_135m/cpu": "failed"}
    assert m["cells"]["smollm2_135m/cpu"]["error"].startswith("no profile ")
    cell = out / "sweeps" / "straight" / "gemma3_270m" / "cpu"
    for nb in ("01_uncertainty_latency", "02_length_regressor", "03_scheduler"):
        assert (cell / f"{nb}.ipynb").is_file() and (cell / nb / "metrics.json").is_file()
    # each done cell lists every artefact with its sha256; no half-written notebook is left behind
    from rtlm_lab.io import sha256_file, verify_run_manifest

    assert verify_run_manifest(cell) == [] and not list(cell.glob(".*partial*"))
    cm = json.loads((cell / "manifest.json").read_text())
    assert "03_scheduler/metrics.json" in cm["files"] and "01_uncertainty_latency.ipynb" in cm["files"]
    assert m["cells"]["gemma3_270m/cpu"]["manifest_sha256"] == sha256_file(cell / "manifest.json")
    import shutil

    copy = shutil.copytree(cell, tmp_path / "cell_copy")
    (copy / "02_length_regressor" / "metrics.json").write_text("{}")
    assert verify_run_manifest(copy) == ["02_length_regressor/metrics.json: 2 bytes, manifest says "
                                         f"{cm['bytes']['02_length_regressor/metrics.json']}"]
    assert "gemma3_270m" in res.stdout and "report:" in res.stdout  # the summary table and the report path

    # 2. the same sweep through the CLI, sent SIGTERM while its second cell runs (papermill mid-notebook)
    proc = subprocess.Popen([sys.executable, "-m", "rtlm_lab.tasks.sweep", "sweep.name=resumed", *common],
                            env=_env(out), cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    mpath, deadline = out / "sweeps" / "resumed" / "manifest.json", time.monotonic() + 600
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            cells = json.loads(mpath.read_text())["cells"]
        except (OSError, ValueError, KeyError):
            cells = {}
        if cells.get("dialogpt_ccc/cpu", {}).get("status") == "running":
            time.sleep(3)  # into the cell's first notebook
            break
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err[-3000:]
    m = _manifest(out, "resumed")
    assert m["cells"]["gemma3_270m/cpu"]["status"] == "done"
    assert m["cells"]["dialogpt_ccc/cpu"]["status"] == "interrupted" and "smollm2_135m/cpu" not in m["cells"]
    half = out / "sweeps" / "resumed" / "dialogpt_ccc" / "cpu"
    assert not (half / "manifest.json").exists()  # an interrupted cell is never listed as complete
    first = m["cells"]["gemma3_270m/cpu"]

    # 3. rerun: the finished cell is skipped (same hash, same record), the others run
    res = _sweep_cli(out, "sweep.name=resumed", *common)
    assert res.returncode == 1, res.stderr[-3000:]
    assert "gemma3_270m/cpu: done before, skipped" in res.stdout
    m = _manifest(out, "resumed")
    assert m["cells"]["gemma3_270m/cpu"] == first
    assert m["cells"]["dialogpt_ccc/cpu"]["status"] == "done"
    assert m["cells"]["smollm2_135m/cpu"]["status"] == "failed"

    # 4. the two reports have the same tables (headline, matrices, failures, per-cell)
    a = (out / "sweeps" / "straight" / "report.md").read_text()
    b = (out / "sweeps" / "resumed" / "report.md").read_text()
    ta = report_tables(a)
    assert len(ta) > 30 and ta == report_tables(b)
    cells = " ".join(a.split())  # tabulate pads the cells: compare with runs of spaces collapsed
    assert "| gemma3_270m | cpu | done | 80 |" in cells and "| smollm2_135m | cpu | failed |" in cells
    html = (out / "sweeps" / "resumed" / "report.html").read_text()
    assert "data:image/png;base64," in html and "</table>" in html
    # rtlm-report on a sweep dir, elsewhere
    rep = build_report(out / "sweeps" / "straight", tmp_path / "rep")
    assert report_tables(rep["md"].read_text()) == ta
    assert rep["headline"][0]["tau RT-LM"] is not None and rep["headline"][0]["RT-LM mean RT / FCFS"] is not None


def test_sweep_records_failed_cells_and_still_reports(tmp_path):
    """The fast suite's pass through ``run_sweep`` (the papermill cells are the slow test's): every cell
    lacks its profile, so each is recorded as failed with its reason, the summary and report are written,
    and the exit status is 1."""
    out = tmp_path / "outputs"
    empty = tmp_path / "no_profiles"
    empty.mkdir()
    res = _sweep_cli(out, "sweep.name=empty", f"sweep.profile_dir={empty}",
                     "sweep.lms=[gemma3_270m,dialogpt_ccc]", "sweep.platforms=[cpu]")
    assert res.returncode == 1, res.stderr[-3000:]
    assert "2 of 2 cell(s) failed" in res.stderr, res.stderr[-3000:]
    m = _manifest(out, "empty")
    assert {k: c["status"] for k, c in m["cells"].items()} == {"gemma3_270m/cpu": "failed",
                                                               "dialogpt_ccc/cpu": "failed"}
    assert all(c["error"].startswith("no profile ") for c in m["cells"].values())
    assert len(m["invocations"]) == 1
    assert (out / "sweeps" / "empty" / "report.md").is_file() and "report:" in res.stdout


def test_cell_hash_follows_the_config(tmp_path):
    from rtlm_lab.tasks.sweep import cell_config, config_sha256

    sweep = {"name": "x", "lms": ["gemma3_270m"], "platforms": ["cpu"], "scheduler_mode": "sim",
             "profile_dir": str(REF), "profile_name": "{lm}__{platform}.parquet", "seed": 0,
             "nb01": {"n_bootstrap": 20}, "nb02": {}, "nb03": {"n_requests": 12}}
    base = config_sha256(cell_config(sweep, "gemma3_270m", "cpu", tmp_path))
    assert base == config_sha256(cell_config(sweep, "gemma3_270m", "cpu", tmp_path))
    for change in ({"nb03": {"n_requests": 13}}, {"scheduler_mode": "real"}, {"seed": 1},
                   {"profile_dir": str(tmp_path)}):
        assert config_sha256(cell_config({**sweep, **change}, "gemma3_270m", "cpu", tmp_path)) != base
    missing = cell_config({**sweep, "profile_dir": str(tmp_path)}, "gemma3_270m", "cpu", tmp_path)
    assert missing["profile_sha256"] is None


def test_by_platform_overrides_and_portable_hash(tmp_path):
    from rtlm_lab.errors import UserError
    from rtlm_lab.tasks.sweep import cell_config, config_sha256, platform_sweep

    sweep = {"name": "x", "lms": ["gemma3_270m"], "platforms": ["cpu", "cuda"], "scheduler_mode": "sim",
             "profile_dir": str(REF), "profile_name": "{lm}__{platform}.parquet", "seed": 0,
             "nb01": {"n_bootstrap": 20}, "nb02": {}, "nb03": {"n_requests": 12, "rho": 0.9},
             "by_platform": {"cuda": {"scheduler_mode": "real", "nb03": {"n_requests": 6}}}}
    cuda = platform_sweep(sweep, "cuda")
    assert cuda["scheduler_mode"] == "real" and cuda["nb03"] == {"n_requests": 6, "rho": 0.9}
    assert platform_sweep(sweep, "cpu")["nb03"] == {"n_requests": 12, "rho": 0.9}
    p = cell_config(sweep, "gemma3_270m", "cuda", tmp_path / "sw" / "gemma3_270m" / "cuda")["parameters"]
    assert p["03_scheduler"]["mode"] == "real" and p["03_scheduler"]["n_requests"] == 6
    assert p["01_uncertainty_latency"]["n_bootstrap"] == 20
    with pytest.raises(UserError, match="may set only"):
        platform_sweep({**sweep, "by_platform": {"cuda": {"lms": ["x"]}}}, "cuda")
    # a cpu cell's hash does not depend on cuda's overrides, nor on where the sweep dir lies
    a, b = tmp_path / "a" / "gemma3_270m" / "cpu", tmp_path / "elsewhere" / "b" / "gemma3_270m" / "cpu"
    h = config_sha256(cell_config(sweep, "gemma3_270m", "cpu", a), a)
    assert h == config_sha256(cell_config({**sweep, "by_platform": {}}, "gemma3_270m", "cpu", b), b)
    assert h != config_sha256(cell_config(sweep, "gemma3_270m", "cpu", a))  # absolute paths differ


def test_by_cell_overrides_pick_the_cells_measured_engine(tmp_path):
    """`sweep.by_cell["<lm>/<platform>"]` is merged after by_platform, for that cell alone; notebook 03's
    `platform.*` overrides decide which measured engine a simulation replays (its key, as the harness's)."""
    from rtlm_lab.errors import UserError
    from rtlm_lab.scheduler.continuous import engine_config, engine_key
    from rtlm_lab.tasks.sweep import _sim_capacity_file, cell_config, platform_sweep

    over = ["platform.engine.backend=slots", "platform.engine.max_seqs=64", "platform.offload_workers=0"]
    sweep = {"name": "x", "lms": ["gemma3_270m", "dialogpt_ccc"], "platforms": ["cpu", "cuda"],
             "scheduler_mode": "sim", "profile_dir": str(REF), "profile_name": "{lm}__{platform}.parquet", "seed": 0,
             "nb01": {}, "nb02": {}, "nb03": {"n_requests": 12},
             "by_platform": {"cuda": {"nb03": {"n_requests": 6}}},
             "by_cell": {"gemma3_270m/cuda": {"nb03": {"overrides": over}}}}
    assert platform_sweep(sweep, "cuda", "gemma3_270m")["nb03"] == {"n_requests": 6, "overrides": over}
    assert platform_sweep(sweep, "cuda", "dialogpt_ccc")["nb03"] == {"n_requests": 6}
    assert platform_sweep(sweep, "cpu", "gemma3_270m")["nb03"] == {"n_requests": 12}
    with pytest.raises(UserError, match=r"by_cell\['gemma3_270m/cuda'\] sets lms"):
        platform_sweep({**sweep, "by_cell": {"gemma3_270m/cuda": {"lms": []}}}, "cuda", "gemma3_270m")
    # the engine the overrides name: 64 rows, no CPU workers -> the committed H200 measurement's key
    cap = _sim_capacity_file("gemma3_270m", "cuda", over)
    assert cap is not None and cap.name == "gemma3_270m__cuda__b3ef326a.json"
    want = engine_key("gemma3_270m", "cuda", {**engine_config({"engine": {
        "backend": "slots", "max_seqs": 64, "max_batch_tokens": 8192, "page_size": 256}})})
    assert cap.stem == want
    cfg = cell_config(sweep, "gemma3_270m", "cuda", tmp_path / "c")
    assert cfg["engine_capacity"]["file"] == cap.name and cfg["engine_capacity"]["committed"]
    # without them the platform's default engine (256 rows + its 2 CPU workers) is another key
    assert _sim_capacity_file("gemma3_270m", "cuda") != cap


def test_demo_sweep_reads_the_demo_profile_and_runs_notebook_03_in_real_mode(tmp_path, monkeypatch):
    """`make demo` = `rtlm-profile experiment=demo` then `rtlm-sweep sweep_size=demo`: the sweep reads the profile
    the first command writes (under RTLM_OUTPUT_DIR), and notebook 03 serves a small real run (fcfs vs rtlm on
    fewer requests than the profile's held-out pool); the other sizes keep sim mode on the committed profiles."""
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    from rtlm_lab.tasks._cli import CONF_DIR
    from rtlm_lab.tasks.sweep import cell_config

    monkeypatch.setenv("RTLM_OUTPUT_DIR", str(tmp_path))
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        demo = compose("sweep", overrides=["sweep_size=demo"])
        quick = compose("sweep")
        prof = compose("profile", overrides=["experiment=demo"])
    sweep = OmegaConf.to_container(demo.sweep, resolve=True)
    run_name = str(prof.run_name)  # <lm>/<platform>/<data.tag>: where rtlm-profile writes, under profile/
    cell = cell_config(sweep, "gemma3_270m", "cpu", tmp_path / "sweeps" / "demo" / "gemma3_270m" / "cpu")
    assert cell["profile"] == str(tmp_path / "profile" / run_name / "profile.parquet")
    nb03 = cell["parameters"]["03_scheduler"]
    assert cell["scheduler_mode"] == "real" and nb03["mode"] == "real"
    assert {"fcfs", "rtlm"} <= set(nb03["policies"]) and nb03["rhos"] == [nb03["rho"]]
    assert nb03["n_requests"] <= 0.4 * int(prof.data.n_prompts)  # scheduler.heldout_frac of the profile
    assert sweep["nb01"] == OmegaConf.to_container(quick.sweep.nb01)  # notebooks 01-02: the quick sizes
    assert (quick.sweep.scheduler_mode, quick.sweep.profile_dir) == ("sim", f"{ROOT}/outputs/reference/profiles")


def test_real_cell_fails_at_once_naming_what_is_missing(tmp_path):
    """A real-mode cell on a machine without the LM's weights (or the platform's GPU) is recorded as failed
    with one line, before any of its notebooks runs."""
    from rtlm_lab.errors import UserError
    from rtlm_lab.tasks.sweep import preflight_real, run_sweep

    (tmp_path / "gemma3_270m__cpu.parquet").write_bytes(b"any profile")
    sweep = {"name": "real", "lms": ["gemma3_270m"], "platforms": ["cpu"], "scheduler_mode": "real",
             "profile_dir": str(tmp_path), "profile_name": "{lm}__{platform}.parquet", "seed": 0,
             "nb01": {}, "nb02": {}, "nb03": {"lm_dir": str(tmp_path / "no_model")}, "by_platform": {}}
    m = run_sweep({"sweep": sweep}, tmp_path / "sw")
    c = m["cells"]["gemma3_270m/cpu"]
    assert c["status"] == "failed" and "\n" not in c["error"]
    assert c["error"].startswith("notebook 03 in real mode: lm.local_dir ") and "does not exist" in c["error"]
    assert not list((tmp_path / "sw" / "gemma3_270m" / "cpu").glob("*.ipynb"))
    import torch

    if not torch.cuda.is_available():
        with pytest.raises(UserError, match="^notebook 03 in real mode: platform=cuda needs a CUDA GPU"):
            preflight_real("gemma3_270m", "cuda")


def test_cli_errors_and_help(tmp_path):
    res = _sweep_cli(tmp_path, "sweep.lms=[nope]")
    assert res.returncode == 2 and res.stderr.strip().splitlines()[-1].startswith("error: unknown lm 'nope'")
    res = subprocess.run([sys.executable, "-m", "rtlm_lab.tasks.report", "--help"], capture_output=True, text=True)
    assert res.returncode == 0 and "report.md" in res.stdout and "Examples" in res.stdout
    res = subprocess.run([sys.executable, "-m", "rtlm_lab.tasks.report", "sweep=nope"], env=_env(tmp_path),
                         capture_output=True, text=True)
    assert res.returncode == 2 and "no sweep dir 'nope'" in res.stderr


def _fake_cell(d: Path, spearman: float, tau: float, rtlm_vs_fcfs: float) -> None:
    """The three notebooks' ``metrics.json`` of one finished cell (only the keys the report reads), plus a
    notebook, a figure and a per-request file: what ``copy=true`` must and must not carry."""
    m1 = {"n": 40, "spearman_table": [
        {"type": "total", "spearman": spearman, "ci_low": spearman - 0.1, "ci_high": spearman + 0.1,
         "partial_spearman": spearman / 2, "p_value": 0.01},
        {"type": "aleatoric", "spearman": spearman / 3, "ci_low": -0.2, "ci_high": 0.4}]}
    m2 = {"split": {"n_test": 16}, "methods": [
        {"method": "rtlm_ridge", "kendall_tau": tau, "tau_ci_low": tau - 0.1, "tau_ci_high": tau + 0.1, "mae": 9.0},
        {"method": "proxy_minilm", "kendall_tau": tau - 0.05}, {"method": "input_length", "kendall_tau": 0.01},
        {"method": "oracle", "kendall_tau": 1.0}]}
    table = [{"policy": p, "mean_rt_s": v, "p50_rt_s": v / 2, "p99_rt_s": 3 * v, "n_completed": 12}
             for p, v in (("fcfs", 2.0), ("rtlm", 2.0 * rtlm_vs_fcfs), ("oracle_srpt", 1.0))]
    norm = [{"policy": r["policy"], "mean_rt_s_vs_fcfs": r["mean_rt_s"] / 2.0, "p99_rt_s_vs_fcfs": r["mean_rt_s"] / 2.0}
            for r in table]
    m3 = {"mode": "sim", "engine": "continuous", "workload": "poisson", "rho": 0.9, "n_requests": 12,
          "table": table, "normalized": {"fcfs": norm}}
    for nb, m in (("01_uncertainty_latency", m1), ("02_length_regressor", m2), ("03_scheduler", m3)):
        (d / nb).mkdir(parents=True)
        (d / nb / "metrics.json").write_text(json.dumps(m))
        (d / f"{nb}.ipynb").write_text("{}")
    (d / "03_scheduler" / "response_cdf.png").write_bytes(b"\x89PNG fake")
    (d / "03_scheduler" / "requests.parquet").write_bytes(b"not copied")


def test_report_copy_is_a_sweep_dir_that_rebuilds_the_same_tables(tmp_path):
    """``rtlm-report copy=true`` writes a small copy of a sweep's results (metrics.json and headline figures
    of the done cells, the manifest; no notebooks, no per-request files) laid out as a sweep dir: a report
    rebuilt from that copy has the same tables, and the numbers are the cells' own."""
    from rtlm_lab.report import build_report, report_tables

    sweep = tmp_path / "sweeps" / "fake"
    _fake_cell(sweep / "gemma3_270m" / "cpu", 0.31, 0.42, 0.5)
    _fake_cell(sweep / "dialogpt_ccc" / "cpu", 0.12, 0.25, 1.5)
    manifest = {"name": "fake", "lms": ["gemma3_270m", "dialogpt_ccc", "smollm2_135m"], "platforms": ["cpu"],
                "cells": {"gemma3_270m/cpu": {"lm": "gemma3_270m", "platform": "cpu", "status": "done",
                                              "dir": "gemma3_270m/cpu"},
                          "dialogpt_ccc/cpu": {"lm": "dialogpt_ccc", "platform": "cpu", "status": "done",
                                               "dir": "dialogpt_ccc/cpu"},
                          "smollm2_135m/cpu": {"lm": "smollm2_135m", "platform": "cpu", "status": "failed",
                                               "error": "no profile here"}}}
    (sweep / "manifest.json").write_text(json.dumps(manifest))

    out = tmp_path / "ref"
    rep = build_report(sweep, out, figures=False, copy=True)
    for lm in ("gemma3_270m", "dialogpt_ccc"):
        cell = out / lm / "cpu"
        assert (cell / "03_scheduler" / "metrics.json").is_file() and (cell / "03_scheduler" / "response_cdf.png").is_file()
        assert not (cell / "03_scheduler" / "requests.parquet").exists() and not list(cell.glob("*.ipynb"))
    assert not (out / "smollm2_135m").exists() and (out / "manifest.json").is_file()
    again = build_report(out, tmp_path / "again", figures=False)
    tables = report_tables(rep["md"].read_text())
    assert len(tables) > 5 and report_tables(again["md"].read_text()) == tables
    head = {(r["lm"], r["platform"]): r for r in again["headline"]}
    assert head[("gemma3_270m", "cpu")]["tau RT-LM"] == 0.42
    assert head[("gemma3_270m", "cpu")]["best baseline"] == "proxy_minilm"
    assert head[("dialogpt_ccc", "cpu")]["RT-LM mean RT / FCFS"] == 1.5
    assert head[("dialogpt_ccc", "cpu")]["oracle mean / FCFS"] == 0.5
    assert head[("smollm2_135m", "cpu")]["status"] == "failed"
    md = " ".join(again["md"].read_text().split())
    assert "no profile here" in md and "| gemma3_270m | cpu | done | 40 |" in md


def test_report_names_the_hardware_of_real_cells_only():
    """The headline's "real runs on" column: the GPU's name for a real cuda cell (from notebook 03's
    provenance), the core count for a real cpu cell, nothing for a simulated one."""
    from rtlm_lab.report import cell_headline

    def head(mode, platform, machine):
        m3 = {"mode": mode, "platform": platform, "provenance": {"machine": machine}, "normalized": {}}
        return cell_headline(Path("."), {"03_scheduler": m3})["measured_on"]

    assert head("real", "cuda", {"gpu": "NVIDIA H100 80GB HBM3", "cpu_count": 16}) == "NVIDIA H100 80GB HBM3"
    assert head("real", "cpu", {"gpu": "NVIDIA H200", "cpu_count": 2}) == "2-core cpu"
    assert head("sim", "cuda", {"gpu": "NVIDIA H200", "cpu_count": 16}) is None


def test_report_copy_drops_a_figure_the_rerun_cell_no_longer_makes(tmp_path):
    """A cell rerun in another mode can stop making a figure (notebook 03 real at one rho draws no rt_vs_rho):
    copying it over an earlier copy removes that figure there, so the report does not link the old one."""
    from rtlm_lab.report import build_report

    sweep, out = tmp_path / "sweeps" / "fake", tmp_path / "ref"
    cell = sweep / "gemma3_270m" / "cpu"
    _fake_cell(cell, 0.31, 0.42, 0.5)
    (cell / "03_scheduler" / "rt_vs_rho.png").write_bytes(b"\x89PNG old sim")
    build_report(sweep, out_dir=out, copy=True)
    assert (out / "gemma3_270m" / "cpu" / "03_scheduler" / "rt_vs_rho.png").is_file()
    (cell / "03_scheduler" / "rt_vs_rho.png").unlink()  # the rerun cell's notebook 03 no longer draws it
    again = build_report(sweep, out_dir=out, copy=True)
    assert not (out / "gemma3_270m" / "cpu" / "03_scheduler" / "rt_vs_rho.png").exists()
    assert (out / "gemma3_270m" / "cpu" / "03_scheduler" / "response_cdf.png").is_file()
    assert "rt_vs_rho" not in again["md"].read_text()
