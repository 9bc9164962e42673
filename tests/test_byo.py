"""Bring your own: prompt files (``data=prompts``) and models (``lm=custom``) through the real tasks.

The tasks run as subprocesses (``python -m rtlm_lab.tasks.<task>``) on the tiny random-initialised models of
conftest and the sample prompt files under ``tests/data/``; bad files must give one ``error:`` line and exit 2.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pandas as pd
import pytest

from conftest import CPU_THREADS, ROOT, run_task
from rtlm_lab.data.ccc import load_requests
from rtlm_lab.data.prompts import load_prompts
from rtlm_lab.data.requests import load_data_requests
from rtlm_lab.errors import UserError

DATA = ROOT / "tests" / "data"
JSONL, TXT, CSV = DATA / "my_prompts.jsonl", DATA / "my_prompts.txt", DATA / "my_prompts.csv"
FAST = ["profile.figures=false", "profile.warmup=0", "lm.max_new_tokens=16", "lm.stop_strings=[e]"]


def _run(module: str, args: list[str], out: Path, timeout: int = 300) -> subprocess.CompletedProcess:
    """The task's command line (``python -m rtlm_lab.tasks.<module> *args``), run in this process (run_task)."""
    return run_task(module, args, out)


def _one_error_line(res: subprocess.CompletedProcess) -> str:
    assert res.returncode == 2, (res.returncode, res.stderr[-2000:])
    assert "Traceback" not in res.stderr, res.stderr[-2000:]
    errors = [ln for ln in res.stderr.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1, res.stderr[-2000:]
    return errors[0]


# ------------------------------------------------------------------------------------------ prompt files
def test_three_formats_give_the_columns_of_ccc_requests():
    ccc_cols = list(load_requests("test", n=3).columns)
    frames = {p.suffix: load_prompts(p) for p in (JSONL, TXT, CSV)}
    for ext, df in frames.items():
        assert list(df.columns) == ccc_cols, ext
        assert len(df) == 20 and df["request_id"].is_unique and df["conv_id"].is_unique, ext
        assert (df["turn_idx"] == 0).all() and (df["text"].str.len() > 0).all(), ext
        # generated ids follow the CCC convention: the conversation is what precedes the last "-"
        assert (df["request_id"].str.rsplit("-", n=1).str[0] == df["conv_id"]).all()
    assert list(frames[".jsonl"]["text"]) == list(frames[".txt"]["text"]) == list(frames[".csv"]["text"])
    assert list(frames[".jsonl"]["context"]) == list(frames[".csv"]["context"])
    assert (frames[".txt"]["context"] == "").all() and (frames[".jsonl"]["context"] != "").sum() == 4
    assert (load_prompts(JSONL, with_context=False)["context"] == "").all()
    sample = load_data_requests({"name": "prompts", "path": str(JSONL), "n_prompts": 5, "sample_seed": 1})
    assert len(sample) == 5 and set(sample["request_id"]) <= set(frames[".jsonl"]["request_id"])


def test_jsonl_ids_and_conversations(tmp_path):
    p = tmp_path / "ids.jsonl"
    rows = [{"text": "hi there", "conversation_id": "c1"}, {"text": "how are you?", "conversation_id": "c1"},
            {"text": "what's up", "request_id": "my-own-id"}, {"text": "bye", "request_id": "x", "context": "ok"},
            {"text": "again", "conversation_id": "c1", "request_id": "c1-late"}]
    p.write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")
    df = load_prompts(p)
    assert list(df["request_id"]) == ["c1-000", "c1-001", "my-own-id", "x", "c1-late"]
    assert list(df["conv_id"]) == ["c1", "c1", "my-own-id", "x", "c1"]
    assert list(df["turn_idx"]) == [0, 1, 0, 0, 2] and df.loc[3, "context"] == "ok"
    from rtlm_lab.regressor.evaluate import conversation_ids

    assert list(conversation_ids(df)) == list(df["conv_id"])  # the splits keep c1 together


@pytest.mark.parametrize("name, content, needle", [
    ("missing.jsonl", None, "does not exist"),
    ("empty.jsonl", "\n\n", "holds no prompts"),
    ("empty.txt", "", "holds no prompts"),
    ("bad.jsonl", '{"text": "fine"}\n{"text": "broken"\n', "line 2: invalid JSON"),
    ("notext.jsonl", '{"prompt": "hi"}\n', 'line 1: no "text" field'),
    ("notext.csv", "prompt,context\nhi,\n", "no 'text' column"),
    ("prompts.xlsx", "text\nhi\n", "unknown extension '.xlsx'"),
    ("dup.jsonl", '{"text": "a", "request_id": "r"}\n{"text": "b", "request_id": "r"}\n', "appears twice"),
])
def test_bad_prompt_files_are_user_errors(tmp_path, name, content, needle):
    p = tmp_path / name
    if content is not None:
        p.write_text(content)
    with pytest.raises(UserError, match=needle.replace("(", r"\(")) as exc:
        load_prompts(p)
    assert "\n" not in str(exc.value)


@pytest.mark.parametrize("name, content, needle", [
    ("missing.jsonl", None, "does not exist"),
    ("empty.jsonl", "", "holds no prompts"),
    ("notext.csv", "prompt\nhi\n", "no 'text' column"),
    ("bad.jsonl", '{"text": "ok"}\n\n{oops}\n', "line 3: invalid JSON"),
    ("prompts.md", "hi\n", "unknown extension '.md'"),
])
def test_cli_bad_prompt_file_is_one_line_before_any_work(tmp_path, name, content, needle):
    p = tmp_path / name
    if content is not None:
        p.write_text(content)
    # lm.local_dir points nowhere: the prompt file is checked first, before any model is looked at
    res = _run("profile", ["data=prompts", f"data.path={p}", "lm=custom", f"lm.local_dir={tmp_path}/nope"],
               tmp_path / "out", timeout=120)
    line = _one_error_line(res)
    assert needle in line and str(p) in line, line


def test_cli_without_data_path_is_one_line(tmp_path):
    line = _one_error_line(_run("profile", ["data=prompts", "lm=dialogpt_ccc"], tmp_path, timeout=120))
    assert "data.path=" in line


def test_other_tasks_check_the_prompt_file_first(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text("not json\n")
    for module in ("uncertainty", "train_regressor"):
        line = _one_error_line(_run(module, ["data=prompts", f"data.path={bad}", "lm=dialogpt_ccc"], tmp_path,
                                    timeout=120))
        assert "line 1: invalid JSON" in line, (module, line)


def test_find_profile_ignores_prompt_file_profiles(tmp_path):
    from rtlm_lab.uncertainty.analysis import find_profile

    mine = tmp_path / "profile" / "nope_lm" / "cpu" / "prompts-my_prompts-0123abcd-nNone-s0" / "profile.parquet"
    mine.parent.mkdir(parents=True)
    pd.DataFrame({"request_id": ["p00000-000"]}).to_parquet(mine)
    assert find_profile("nope_lm", "cpu", tmp_path) is None  # notebook 01's default stays on CCC profiles


def test_train_lm_refuses_prompt_files(tmp_path):
    line = _one_error_line(_run("train_lm", ["data=prompts", f"data.path={JSONL}"], tmp_path, timeout=120))
    assert "has no replies" in line


# ------------------------------------------------------------------------------------------ own models
def test_cli_missing_or_unloadable_model_dir_is_one_line(tmp_path):
    junk = tmp_path / "junk"
    junk.mkdir()
    (junk / "config.json").write_text("{not json")
    cases = [([], "needs lm.local_dir"), ([f"lm.local_dir={tmp_path}/nope"], "does not exist"),
             ([f"lm.local_dir={tmp_path}"], "no config.json"), ([f"lm.local_dir={junk}"], "could not")]
    for extra, needle in cases:
        res = _run("profile", ["data=prompts", f"data.path={TXT}", "lm=custom", *extra], tmp_path / "out",
                   timeout=120)
        line = _one_error_line(res)
        assert needle in line, (extra, line)


def test_custom_causal_profile_uncertainty_regressor_schedule(tmp_path, tiny_causal_dir):
    out = tmp_path / "out"
    common = ["data=prompts", f"data.path={JSONL}", "lm=custom", f"lm.local_dir={tiny_causal_dir}", CPU_THREADS]
    res = _run("profile", [*common, *FAST], out)
    assert res.returncode == 0, res.stderr[-3000:]
    runs = list((out / "profile").glob("custom_tiny_gpt2*/cpu/prompts-my_prompts-*-nNone-s0/profile.parquet"))
    assert len(runs) == 1, list((out / "profile").rglob("*.parquet"))
    df = pd.read_parquet(runs[0])
    assert len(df) == 20 and list(df["request_id"]) == list(load_prompts(JSONL)["request_id"])
    assert df["conv_id"].is_unique and (df["n_output_tokens"].between(1, 16)).all()
    decoding = json.loads(df["decoding"].iloc[0])
    assert decoding["chat_format"] == "fewshot" and decoding["stop_strings"] == ["e"]  # auto, resolved
    assert df["context"].str.len().gt(0).sum() == 4  # the file's contexts are used

    res = _run("uncertainty", [*common, "n_bootstrap=0", "figures=false"], out)
    assert res.returncode == 0, res.stderr[-3000:]
    metrics = list((out / "uncertainty").rglob("metrics.json"))
    assert len(metrics) == 1 and "prompts-my_prompts-" in str(metrics[0])
    assert json.loads(metrics[0].read_text())["n"] == 20

    res = _run("train_regressor", [*common, "n_bootstrap=0", "figures=false", "embedding_baselines=false",
                                   "finetuned_proxy.enabled=false", "timing_n=4"], out)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "train 14 / test 6 requests" in res.stdout

    res = _run("schedule", [*common, "mode=sim", "policy=fcfs", "workload.n_requests=12",
                            "scheduler.figures=false", "scheduler.overhead_samples=2"], out)
    assert res.returncode == 0, res.stderr[-3000:]
    m = json.loads(next((out / "schedule").rglob("metrics.json")).read_text())
    assert m["n_completed"] == m["n_requests"] == 12


def test_custom_seq2seq_profile_detects_encoder_decoder(tmp_path, tiny_seq2seq_dir):
    out = tmp_path / "out"
    # lm.arch=causal is wrong on purpose: the model's config.json wins (with a warning)
    res = _run("profile", ["data=prompts", f"data.path={CSV}", "data.n_prompts=6", "lm=custom",
                           f"lm.local_dir={tiny_seq2seq_dir}", "lm.arch=causal", CPU_THREADS, *FAST], out)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "holds a seq2seq model" in res.stderr + res.stdout
    df = pd.read_parquet(next((out / "profile").rglob("profile.parquet")))
    assert len(df) == 6 and (df["n_output_tokens"].between(1, 16)).all()
    assert json.loads(df["decoding"].iloc[0])["chat_format"] == "plain"


def test_load_lm_custom_in_process(tiny_causal_dir, tiny_seq2seq_dir):
    from rtlm_lab.lm import lm_config, load_lm

    spec = lm_config("custom", local_dir=str(tiny_seq2seq_dir), max_new_tokens=8)
    assert spec["name"] == f"custom_{tiny_seq2seq_dir.name}" and spec["chat_format"] == "auto"
    lm = load_lm(spec)
    assert lm.is_encoder_decoder and lm.spec["arch"] == "seq2seq" and lm.spec["stop_strings"] == []
    assert lm.generate(["hello there"], ["hi"])[0].n_output_tokens >= 1
    lm = load_lm(lm_config("custom", local_dir=str(tiny_causal_dir), chat_format="plain", max_new_tokens=8))
    assert not lm.is_encoder_decoder and lm.prompt("how are you", "hi") == "hi\nhow are you"
    with pytest.raises(UserError, match="no chat template"):
        load_lm(lm_config("custom", local_dir=str(tiny_causal_dir), chat_format="chat_template"))


# ~60 s: make test-full. The same prompt file through rtlm-profile stays in the fast suite
# (test_custom_causal_profile_uncertainty_regressor_schedule, on the tiny model).
@pytest.mark.slow
def test_done_when_dialogpt_ccc_on_the_sample_file(tmp_path):
    """The issue's done-when command, on the committed DialoGPT-ccc weights (a few seconds on 2 cores)."""
    res = _run("profile", ["data=prompts", "data.path=tests/data/my_prompts.jsonl", "lm=dialogpt_ccc",
                           "profile.figures=false"], tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "dialogpt_ccc on cpu: 20 requests" in res.stdout
    df = pd.read_parquet(next((tmp_path / "profile" / "dialogpt_ccc" / "cpu").rglob("profile.parquet")))
    assert len(df) == 20 and df["reply"].str.len().gt(0).all()
