"""Run manifests and interrupted profiles.

* every task's run dir ends with ``manifest.json`` listing each artefact with its sha256 and size; a
  flipped byte, a missing file or an unlisted file is reported by :func:`rtlm_lab.io.verify_run_manifest`;
* ``rtlm-profile`` interrupted with SIGINT keeps its finished parts (listed in a ``complete: false``
  manifest); the resumed run's rows (timing columns aside) and summary aggregates (latency fields aside)
  equal those of an uninterrupted run of the same config.

The tasks run as real subprocesses (``python -m rtlm_lab.tasks.<task>``) on a tiny random-initialised GPT-2
(profile) and on rows of the committed Gemma cpu reference profile (uncertainty, train_regressor).
``rtlm-train-lm``'s run-dir manifest is checked in ``test_train_lm.py`` (it reuses that module's models).
"""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
from conftest import CPU_THREADS, ROOT, TEST_THREADS, run_task

from rtlm_lab.io import (
    RUN_MANIFEST,
    verify_run_manifest,
    write_json_atomic,
    write_run_manifest,
)

REF_CPU = ROOT / "outputs" / "reference" / "profiles" / "gemma3_270m__cpu.parquet"
N = 40  # prompts of the profile runs
# summary.json fields that measure time; every other field must be equal after an interruption + resume
TIMING_SUMMARY = {"ttft_ms", "ms_per_token", "mean_e2e_s", "p99_e2e_s", "tokens_per_s", "spearman_latency_tokens",
                  "latency_fit", "wall_s"}
TIMING_COLUMNS = {"ttft_s", "e2e_s", "ms_per_token", "finished_utc", "git_commit"}


def _env(out: Path) -> dict:
    return {**os.environ, "RTLM_OUTPUT_DIR": str(out), "RTLM_ROOT": str(ROOT), "HF_HUB_OFFLINE": "1",
            "MPLBACKEND": "Agg"}


def _task(module: str, args: list[str], out: Path, timeout: int = 300) -> subprocess.CompletedProcess:
    """The task's command line, run in this process (run_task); the interrupted-profile test starts real ones."""
    return run_task(module, args, out, env={"RTLM_ROOT": str(ROOT), "HF_HUB_OFFLINE": "1", "MPLBACKEND": "Agg"})


def _manifest(run_dir: Path) -> dict:
    return json.loads((run_dir / RUN_MANIFEST).read_text())


def _check_manifest(run_dir: Path, must_list: set[str]) -> dict:
    """The manifest lists exactly the run dir's artefacts (``must_list`` among them), checksums match."""
    m = _manifest(run_dir)
    assert verify_run_manifest(run_dir) == []
    assert must_list <= set(m["files"]), sorted(m["files"])
    assert set(m["bytes"]) == set(m["files"]) and m["written_utc"]
    assert not any(f.startswith(".") or "/." in f or f.endswith((".log", ".tmp")) or f == RUN_MANIFEST
                   for f in m["files"]), sorted(m["files"])
    assert (run_dir / ".hydra" / "config.yaml").is_file()  # Hydra's bookkeeping is there, but not listed
    return m


# ----------------------------------------------------------------------------- helper on its own
def test_manifest_detects_flipped_byte_missing_and_unlisted_files(tmp_path):
    d = tmp_path / "run"
    write_json_atomic(d / "metrics.json", {"a": 1})
    (d / "sub").mkdir()
    (d / "sub" / "rows.bin").write_bytes(bytes(range(256)))
    (d / ".hydra").mkdir()
    (d / ".hydra" / "config.yaml").write_text("x: 1\n")
    (d / "task.log").write_text("appended later\n")
    (d / ".metrics.json.abc.tmp").write_text("torn")  # a temporary file of an atomic write
    write_run_manifest(d, {"task": "test"})
    m = _manifest(d)
    assert list(m["files"]) == ["metrics.json", "sub/rows.bin"] and m["bytes"]["sub/rows.bin"] == 256
    assert m["task"] == "test" and verify_run_manifest(d) == []
    (d / "task.log").write_text("more log lines\n")  # logs and hidden files are not artefacts
    assert verify_run_manifest(d) == []

    raw = bytearray((d / "sub" / "rows.bin").read_bytes())
    raw[100] ^= 0xFF
    (d / "sub" / "rows.bin").write_bytes(bytes(raw))  # same size, one byte flipped
    assert verify_run_manifest(d) == ["sub/rows.bin: sha256 differs from the manifest"]
    (d / "sub" / "rows.bin").write_bytes(bytes(raw[:-1]))
    assert verify_run_manifest(d) == ["sub/rows.bin: 255 bytes, manifest says 256"]
    (d / "sub" / "rows.bin").unlink()
    (d / "extra.csv").write_text("a\n")
    assert verify_run_manifest(d) == ["sub/rows.bin: missing", "extra.csv: not in the manifest"]
    (d / RUN_MANIFEST).write_text("{not json")
    assert verify_run_manifest(d) == [f"{RUN_MANIFEST}: unreadable (JSONDecodeError)"]


# ----------------------------------------------------------------------------- rtlm-profile
def _profile_args(model_dir: Path) -> list[str]:
    return ["lm=dialogpt_ccc", f"lm.local_dir={model_dir}", "lm.stop_strings=[e]", f"data.n_prompts={N}",
            "profile.flush_every=1", "profile.warmup=0", CPU_THREADS]


def _profile_dir(out: Path) -> Path:
    return out / "profile" / "dialogpt_ccc" / "cpu" / f"test-n{N}-s0"


@pytest.fixture(scope="module")
def straight_profile(tmp_path_factory, tiny_causal_dir) -> Path:
    """An uninterrupted ``rtlm-profile`` run (figures on); its run dir."""
    out = tmp_path_factory.mktemp("straight")
    res = _task("profile", _profile_args(tiny_causal_dir), out)
    assert res.returncode == 0, res.stderr[-3000:]
    return _profile_dir(out)


def test_profile_run_manifest(straight_profile, tmp_path):
    d = straight_profile
    m = _check_manifest(d, {"profile.parquet", "summary.json", "profile.png", "profile.svg",
                            "parts/part-00000.parquet", f"parts/part-{N - 1:05d}.parquet"})
    assert m["task"] == "profile" and m["complete"] is True
    assert len([f for f in m["files"] if f.startswith("parts/")]) == N
    copy = tmp_path / "copy"
    shutil.copytree(d, copy)
    with open(copy / "profile.parquet", "r+b") as f:  # flip one byte in the middle of the file
        f.seek(os.path.getsize(copy / "profile.parquet") // 2)
        b = f.read(1)
        f.seek(-1, os.SEEK_CUR)
        f.write(bytes([b[0] ^ 0xFF]))
    assert verify_run_manifest(copy) == ["profile.parquet: sha256 differs from the manifest"]


SIGINT_AFTER_PARTS = """
import os, signal, sys
# Ctrl-C as in a terminal: a shell starts background jobs (CI under nohup/&) with SIGINT ignored, and then
# Python installs no KeyboardInterrupt handler
signal.signal(signal.SIGINT, signal.default_int_handler)
from rtlm_lab.profiling import profiler
from rtlm_lab.tasks.profile import main
real, written = profiler.ProfileStore.flush, []
def flush(self):
    pending = bool(self._buffer)
    real(self)
    if pending:
        written.append(1)
        if len(written) == {parts}:
            os.kill(os.getpid(), signal.SIGINT)
profiler.ProfileStore.flush = flush
sys.argv = ["rtlm-profile", *sys.argv[1:]]
main()
"""


# ~55 s (two more rtlm-profile processes): make test-full. The fast suite interrupts and resumes a real
# rtlm-profile in test_profiler.py::test_cli_sigterm_then_resume (and in-process in test_profiler.py).
@pytest.mark.slow
def test_interrupted_profile_resumes_to_the_uninterrupted_aggregates(straight_profile, tmp_path, tiny_causal_dir):
    """SIGINT to a real ``rtlm-profile`` after a few rows, then the same command again: the finished parts
    survive the interruption intact (manifest), and the final rows and aggregates equal the straight run's."""
    args = _profile_args(tiny_causal_dir)
    # the tiny model profiles 40 prompts in under a second, faster than a watcher can react; so the process
    # sends itself a real SIGINT right after its 2nd part file is written (the real flush runs unchanged)
    proc = subprocess.Popen([sys.executable, "-c", SIGINT_AFTER_PARTS.format(parts=2), *args], cwd=ROOT,
                            env=_env(tmp_path), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    d = _profile_dir(tmp_path)
    _, err = proc.communicate(timeout=240)
    assert proc.returncode == 130, err[-3000:]
    assert "interrupted: finished work is saved" in err

    m = _manifest(d)
    assert m["complete"] is False and verify_run_manifest(d) == []  # what was finished is intact
    parts = sorted(f for f in m["files"] if f.startswith("parts/"))
    done = pd.concat(pd.read_parquet(d / p) for p in parts)
    k = len(done)
    assert 2 <= k < N and done["request_id"].is_unique and len(parts) == k, k  # one row per part
    assert "profile.parquet" not in m["files"] and not (d / "profile.parquet").exists()

    res = _task("profile", args, tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    assert f"{k} already profiled, {N - k} to go" in res.stderr + res.stdout
    m = _check_manifest(d, {"profile.parquet", "summary.json", *parts})
    assert m["complete"] is True and len([f for f in m["files"] if f.startswith("parts/")]) == N

    resumed, straight = pd.read_parquet(d / "profile.parquet"), pd.read_parquet(straight_profile / "profile.parquet")
    assert len(resumed) == N and resumed["request_id"].is_unique
    keep = [c for c in straight.columns if c not in TIMING_COLUMNS]
    assert {"request_id", "text", "n_input_tokens", "n_output_tokens", "reply", "stop_reason"} <= set(keep)
    pd.testing.assert_frame_equal(resumed[keep], straight[keep])

    def aggregates(run_dir: Path) -> dict:
        s = json.loads((run_dir / "summary.json").read_text())["summary"]
        return {k: v for k, v in s.items() if k not in TIMING_SUMMARY}

    a, b = aggregates(d), aggregates(straight_profile)
    assert {"n", "mean_out_tokens", "p99_out_tokens", "stop_reasons", "capped_share", "mean_in_tokens"} <= set(a)
    assert a["n"] == N and math.isfinite(a["mean_out_tokens"])
    assert json.dumps(a, sort_keys=True) == json.dumps(b, sort_keys=True)  # NaN-safe equality


def test_interrupt_right_after_a_part_is_renamed_keeps_each_row_once(tmp_path, tiny_causal_dir, monkeypatch):
    """Fault injection: KeyboardInterrupt just after the 2nd part file is renamed into place (the real
    atomic write ran). The rows must not be written again by the final flush (they used to be: the same
    request twice in ``parts/``); the rerun profiles only the other requests."""
    from conftest import tiny_spec

    from rtlm_lab.profiling import profiler

    real, calls = profiler.write_parquet_atomic, []

    def write_then_interrupt(df, path):
        out = real(df, path)
        calls.append(Path(path).name)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return out

    cfg = {"seed": 0, "data": {"split": "test", "n_prompts": 5, "sample_seed": 0, "with_context": False,
                               "max_chars": 600},
           "lm": tiny_spec(tiny_causal_dir), "platform": {"name": "cpu", "device": "cpu", "dtype": "float32",
                                                          "threads": TEST_THREADS},
           "profile": {"batch_size": 1, "warmup": 0, "flush_every": 1, "sanity_check": False}}
    monkeypatch.setattr(profiler, "write_parquet_atomic", write_then_interrupt)
    with pytest.raises(KeyboardInterrupt):
        profiler.run_profile(cfg, tmp_path)
    monkeypatch.setattr(profiler, "write_parquet_atomic", real)
    parts = sorted((tmp_path / "parts").glob("part-*.parquet"))
    rows = pd.concat(pd.read_parquet(p) for p in parts)
    assert [p.name for p in parts] == calls == ["part-00000.parquet", "part-00001.parquet"]
    assert len(rows) == 2 and rows["request_id"].is_unique
    profiler.run_profile(cfg, tmp_path)
    rows = pd.concat(pd.read_parquet(p) for p in sorted((tmp_path / "parts").glob("part-*.parquet")))
    assert len(rows) == 5 and rows["request_id"].is_unique
    assert len(pd.read_parquet(tmp_path / "profile.parquet")) == 5


# ----------------------------------------------------------------------------- analysis tasks
@pytest.fixture(scope="module")
def small_ref_profile(tmp_path_factory) -> Path:
    """The first 25 conversations of the committed Gemma cpu reference profile."""
    df = pd.read_parquet(REF_CPU)
    conv = df["request_id"].str.rsplit("-", n=1).str[0]
    p = tmp_path_factory.mktemp("ref") / "profile.parquet"
    df[conv.isin(conv.unique()[:25])].to_parquet(p, index=False)
    return p


def test_uncertainty_run_manifest(tmp_path, small_ref_profile):
    res = _task("uncertainty", [f"profile={small_ref_profile}", "n_bootstrap=20"], tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    d = tmp_path / "uncertainty" / "gemma3_270m" / "cpu"
    figs = {f"{s}.{e}" for s in ("spearman", "output_by_uncertainty", "latency_fit", "spearman_heatmap")
            for e in ("png", "svg")}
    m = _check_manifest(d, {"metrics.json", "scores.parquet", *figs})
    assert m["task"] == "uncertainty"


def test_train_regressor_run_manifest(tmp_path, small_ref_profile):
    res = _task("train_regressor", [f"profile={small_ref_profile}", "n_bootstrap=10", "timing_n=8",
                                    "embedding_baselines=false", "finetuned_proxy.enabled=false"], tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    d = tmp_path / "train_regressor" / "gemma3_270m" / "cpu" / "ridge"
    m = _check_manifest(d, {"metrics.json", "predictor.joblib", "predictions.csv", "comparison.png",
                            "comparison.svg"})
    assert m["task"] == "train_regressor"
