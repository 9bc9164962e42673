"""Profiler on a tiny random-initialised model: rows, atomic parts, resume after interruption, CLI."""

import os
import signal
import subprocess
import sys
import time

import pandas as pd
import pytest

from conftest import CPU_THREADS, ROOT, TEST_THREADS, run_task, tiny_spec
from rtlm_lab.lm import load_lm
from rtlm_lab.profiling import PROFILE_COLUMNS, run_profile


def _cfg(spec, n=8, **profile):
    return {
        "seed": 0,
        "data": {"split": "test", "n_prompts": n, "sample_seed": 0, "with_context": False, "max_chars": 600},
        "lm": spec,
        "platform": {"name": "cpu", "device": "cpu", "dtype": "float32", "threads": TEST_THREADS},
        "profile": {"batch_size": 1, "warmup": 0, "flush_every": 2, "sanity_check": True, **profile},
    }


class _InterruptAfter:
    """Fault injection: delegates to the real LM, raises KeyboardInterrupt on the k-th call."""

    def __init__(self, lm, k):
        self.lm, self.k, self.calls = lm, k, 0
        self.device, self.name = lm.device, lm.name

    def generate(self, *a, **kw):
        self.calls += 1
        if self.calls == self.k:
            raise KeyboardInterrupt
        return self.lm.generate(*a, **kw)


def test_profile_rows_and_summary(tmp_path, tiny_causal_dir):
    spec = tiny_spec(tiny_causal_dir)
    summary = run_profile(_cfg(spec), tmp_path)
    df = pd.read_parquet(tmp_path / "profile.parquet")
    assert list(df.columns) == PROFILE_COLUMNS
    assert len(df) == 8 and df["request_id"].is_unique
    assert (df["n_output_tokens"] >= 1).all() and (df["n_output_tokens"] <= 24).all()
    assert (df["e2e_s"] >= df["ttft_s"]).all()
    assert set(df["stop_reason"]) <= {"eos", "stop_string", "max_tokens"}
    assert summary["n"] == 8 and (tmp_path / "summary.json").exists()


def test_interrupted_profile_resumes_without_redoing(tmp_path, tiny_causal_dir):
    spec = tiny_spec(tiny_causal_dir)
    lm = load_lm(spec)
    flaky = _InterruptAfter(lm, k=6)  # 5 requests finish, the 6th is interrupted
    with pytest.raises(KeyboardInterrupt):
        run_profile(_cfg(spec), tmp_path, lm=flaky)
    partial = pd.concat(pd.read_parquet(p) for p in (tmp_path / "parts").glob("*.parquet"))
    assert len(partial) == 5
    counting = _InterruptAfter(lm, k=10**9)
    run_profile(_cfg(spec), tmp_path, lm=counting)
    assert counting.calls == 3  # only the unfinished requests (plus no warmup)
    resumed = pd.read_parquet(tmp_path / "profile.parquet")
    fresh_dir = tmp_path / "fresh"
    run_profile(_cfg(spec), fresh_dir, lm=lm)
    fresh = pd.read_parquet(fresh_dir / "profile.parquet")
    assert list(resumed["request_id"]) == list(fresh["request_id"])
    assert list(resumed["n_output_tokens"]) == list(fresh["n_output_tokens"])


def test_corrupt_part_is_redone(tmp_path, tiny_causal_dir):
    spec = tiny_spec(tiny_causal_dir)
    run_profile(_cfg(spec, n=4), tmp_path)
    part = sorted((tmp_path / "parts").glob("*.parquet"))[0]
    part.write_bytes(b"not parquet")
    run_profile(_cfg(spec, n=4), tmp_path)
    assert len(pd.read_parquet(tmp_path / "profile.parquet")) == 4


def _cli(args, env_extra, **kw):
    """rtlm-profile as its command line runs it, in this process (test_cli_sigterm_then_resume starts the real
    process)."""
    return run_task("profile", args, env=env_extra)


def test_cli_user_errors_are_one_line(tmp_path):
    env = {"RTLM_OUTPUT_DIR": str(tmp_path)}
    for args, needle in ((["lm=nope"], "unknown lm 'nope'"),
                         (["-m", "lm=gemma3_270m,nope"], "unknown lm 'nope'"),
                         (["platform=tpu"], "unknown platform 'tpu'")):
        res = _cli(args, env, timeout=120)
        assert res.returncode == 2, res.stderr
        lines = [ln for ln in res.stderr.strip().splitlines() if ln.strip()]
        assert len(lines) == 1 and lines[0].startswith("error:") and needle in lines[0], res.stderr


@pytest.mark.parametrize("args,needle", [
    (["data.n_prompts=abc"], "data.n_prompts must be an integer (default 300), got 'abc'"),
    (["data.n_prompts=0"], "data.n_prompts must be a positive integer or null, got 0"),
    (["-m", "data.n_prompts=5,abc"], "data.n_prompts must be an integer"),
    (["experiment=demo", "profile.batch_size=0"], "profile.batch_size must be >= 1, got 0"),
    (["profile.figures=maybe"], "profile.figures must be true or false"),
    (["data.split=nope"], "unknown data split 'nope'"),
])
def test_cli_bad_value_fails_before_the_run_dir_exists(tmp_path, args, needle):
    """A bad value is one error line and exit 2, and Hydra never creates the run dir (it used to leave
    ``profile/gemma3_270m/cpu/test-nabc-s0/`` with its ``.hydra/`` and a log behind)."""
    out = tmp_path / "outputs"
    res = _cli(args, {"RTLM_OUTPUT_DIR": str(out)}, timeout=120)
    assert res.returncode == 2, res.stderr
    lines = [ln for ln in res.stderr.strip().splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:") and needle in lines[0], res.stderr
    assert not out.exists() or not any(out.iterdir()), sorted(map(str, out.rglob("*")))


def test_check_values_keeps_good_values_and_names_the_bad_one():
    """The pre-Hydra check itself: good values (also sweeps, null, interpolations) pass; a bad one fails."""
    from rtlm_lab.tasks._cli import check_values
    from rtlm_lab.tasks.profile import check_config

    for argv in (["data.n_prompts=5"], ["data.n_prompts=null"], ["-m", "data.n_prompts=5,10", "lm=gemma3_270m"],
                 ["experiment=demo"], ["profile.figures=false", "platform.threads=1", "seed=3"],
                 ["seed=3", "data.n_prompts=${seed}"]):
        check_values("profile", argv, validate=check_config)
    with pytest.raises(SystemExit) as exc:
        check_values("profile", ["platform.threads=two"])
    assert exc.value.code == 2


def test_cli_cuda_without_gpu_is_one_line(tmp_path, tiny_causal_dir):
    import torch

    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    res = _cli(["platform=cuda", "data.n_prompts=2", f"lm.local_dir={tiny_causal_dir}"],
               {"RTLM_OUTPUT_DIR": str(tmp_path)}, timeout=300)
    assert res.returncode == 2
    err = [ln for ln in res.stderr.splitlines() if ln.startswith("error:")]
    assert len(err) == 1 and "needs a CUDA GPU" in err[0]
    assert "Traceback" not in res.stderr


def test_cli_sigterm_then_resume(tmp_path, tiny_causal_dir):
    """A real process killed with SIGTERM keeps its finished rows; the rerun finishes the rest."""
    args = ["lm=dialogpt_ccc", f"lm.local_dir={tiny_causal_dir}", "lm.stop_strings=[e]", "data.n_prompts=30",
            "profile.flush_every=1", "profile.figures=false", "profile.warmup=0", CPU_THREADS]
    env = {**os.environ, "RTLM_OUTPUT_DIR": str(tmp_path)}
    proc = subprocess.Popen([sys.executable, "-m", "rtlm_lab.tasks.profile", *args], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    run_dir = tmp_path / "profile" / "dialogpt_ccc" / "cpu" / "test-n30-s0"
    deadline = time.time() + 240
    while time.time() < deadline and len(list((run_dir / "parts").glob("part-*.parquet"))) < 3:
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    done = pd.concat(pd.read_parquet(p) for p in (run_dir / "parts").glob("part-*.parquet"))
    assert 3 <= len(done) < 30
    res = _cli(args, {"RTLM_OUTPUT_DIR": str(tmp_path)}, timeout=300)
    assert res.returncode == 0, res.stderr
    assert f"{len(done)} already profiled" in res.stderr + res.stdout
    final = pd.read_parquet(run_dir / "profile.parquet")
    assert len(final) == 30 and final["request_id"].is_unique


def test_batched_profile_reports_batch1_agreement(tmp_path, tiny_causal_dir):
    spec = tiny_spec(tiny_causal_dir)
    summary = run_profile(_cfg(spec, n=8, batch_size=4, check_batch1=8), tmp_path)
    df = pd.read_parquet(tmp_path / "profile.parquet")
    assert (df["batch_size"] == 4).all() and len(df) == 8
    assert summary["batch1_check"]["n"] == 8
    assert summary["batch1_check"]["identical"] == 8, summary["batch1_check"]["mismatches"]
