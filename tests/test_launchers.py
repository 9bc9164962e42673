"""Hydra launcher plugins: a real two-job multirun of ``rtlm-schedule`` through joblib (local processes) and
through submitit's local executor (the code path of ``submitit_slurm``, without a SLURM cluster)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from conftest import ROOT
from rtlm_lab.tasks._cli import check_group_choices

PROFILE = ROOT / "outputs" / "reference" / "profiles" / "gemma3_270m__cpu.parquet"
SWEEP = ["policy=fcfs,rtlm", "mode=sim", "lm=gemma3_270m", "platform=cpu", "workload.n_requests=20",
         "scheduler.overhead_samples=2", "scheduler.figures=false"]


def _multirun(launcher_args, out_dir, timeout=300):
    env = {**os.environ, "RTLM_OUTPUT_DIR": str(out_dir)}
    return subprocess.run([sys.executable, "-m", "rtlm_lab.tasks.schedule", "-m", *launcher_args, *SWEEP],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


def test_launcher_overrides_pass_the_group_check():
    # keys with '/' (Hydra's own groups such as hydra/launcher) are left to Hydra; ours are still checked
    check_group_choices(["hydra/launcher=joblib", "hydra/launcher=submitit_slurm", "policy=fcfs,rtlm"])
    with pytest.raises(SystemExit):
        check_group_choices(["hydra/launcher=joblib", "policy=nope"])


@pytest.mark.parametrize("launcher", [
    ["hydra/launcher=joblib", "hydra.launcher.n_jobs=2"],
    # submitit_local pickles each job and starts it in a fresh process: the longer run, in make test-full
    pytest.param(["hydra/launcher=submitit_local", "hydra.launcher.timeout_min=10"], marks=pytest.mark.slow),
], ids=["joblib", "submitit_local"])
def test_multirun_through_launcher(launcher, tmp_path):
    if not PROFILE.is_file():
        pytest.skip("no committed gemma3_270m/cpu profile")
    res = _multirun(launcher, tmp_path)
    assert res.returncode == 0, (res.stdout[-2000:], res.stderr[-3000:])
    name = launcher[0].split("=")[1]
    assert name.split("_")[0].lower() in (res.stdout + res.stderr).lower()  # the plugin really ran the sweep
    found = {p.parent.parent.name: p for p in (tmp_path / "schedule").rglob("metrics.json")}
    assert set(found) == {"fcfs", "rtlm"}, sorted(map(str, found.values()))
    for policy, path in found.items():
        m = json.loads(path.read_text())
        assert m["policy"]["name"] == policy and m["n_completed"] == m["n_unique_completed"] == 20
        assert (path.parent / ".hydra" / "overrides.yaml").is_file()


def _slurm_up() -> bool:
    try:
        res = subprocess.run(["sinfo", "-h", "-o", "%T"], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return res.returncode == 0 and any(s.strip("*") in ("idle", "mixed") for s in res.stdout.split())


def test_multirun_through_submitit_slurm(tmp_path):
    """Real SLURM: sbatch'ed array jobs on a running cluster (start a one-node one on this machine with
    ``sudo bash tests/slurm/local_slurm.sh start``); skipped where ``sinfo`` shows no idle node."""
    if not _slurm_up():
        pytest.skip("no SLURM cluster here (sudo bash tests/slurm/local_slurm.sh start)")
    if not PROFILE.is_file():
        pytest.skip("no committed gemma3_270m/cpu profile")
    partition = subprocess.run(["sinfo", "-h", "-o", "%P"], capture_output=True, text=True).stdout.split()[0]
    res = _multirun(["hydra/launcher=submitit_slurm", f"hydra.launcher.partition={partition.rstrip('*')}",
                     "hydra.launcher.timeout_min=10", "hydra.launcher.cpus_per_task=1", "hydra.launcher.mem_gb=2",
                     "hydra.launcher.name=rtlm-schedule"], tmp_path, timeout=600)
    assert res.returncode == 0, (res.stdout[-2000:], res.stderr[-3000:])
    found = {p.parent.parent.name: p for p in (tmp_path / "schedule").rglob("metrics.json")}
    assert set(found) == {"fcfs", "rtlm"}
    for policy, path in found.items():
        assert json.loads(path.read_text())["n_unique_completed"] == 20
    sub = tmp_path / "schedule" / ".submitit"
    (script,) = sub.glob("*/*_submission.sh")
    assert "#SBATCH --array=0-1" in script.read_text() and "#SBATCH --job-name=rtlm-schedule" in script.read_text()
    logs = sorted(sub.glob("*_*/*_log.out"))
    assert len(logs) == 2 and all("JobEnvironment(job_id=" in p.read_text() for p in logs)  # ran as SLURM tasks
