"""Reference profile builder and summary helpers on real profiles of a tiny model."""

import pandas as pd

from conftest import tiny_spec
from rtlm_lab.profiling import run_profile
from rtlm_lab.profiling.reference import add_run, build_summary, cross_platform_agreement
from rtlm_lab.profiling.summary import SUMMARY_COLUMNS, format_summary, is_repetition_loop, summarize


def test_repetition_loop_detection():
    assert is_repetition_loop("I'm sorry. " * 20)
    assert not is_repetition_loop("I went to the park with my dog and we played fetch for an hour, then we walked "
                                  "home through the woods and had a nap on the couch together")
    assert not is_repetition_loop("short reply")


def test_reference_summary_and_agreement(tmp_path, tiny_causal_dir):
    spec = tiny_spec(tiny_causal_dir)
    base = {"seed": 0, "lm": spec,
            "data": {"split": "test", "n_prompts": 6, "sample_seed": 0, "with_context": False, "max_chars": 600},
            "profile": {"batch_size": 1, "warmup": 0, "flush_every": 3}}
    for name, n in (("cpu", 6), ("cuda", 8)):  # a second "platform" row, run on the CPU here
        cfg = {**base, "platform": {"name": name, "device": "cpu", "dtype": "float32"},
               "data": {**base["data"], "n_prompts": n}}
        run_profile(cfg, tmp_path / name)
    ref = tmp_path / "ref"
    for name in ("cpu", "cuda"):
        add_run(tmp_path / name, ref)
    table = build_summary(ref)
    assert list(table.columns[:len(SUMMARY_COLUMNS)]) == SUMMARY_COLUMNS
    assert sorted(table["platform"]) == ["cpu", "cuda"] and sorted(table["n"]) == [6, 8]
    agreement = cross_platform_agreement(ref)
    row = agreement.iloc[0]
    assert row["n_common"] == 6 and row["identical_share"] == 1.0  # nested samples, greedy, same device
    df = pd.read_parquet(ref / "tiny_causal__cpu.parquet")
    assert "output-length distribution" in format_summary(df, {**summarize(df), "lm": "x", "platform": "cpu"})
