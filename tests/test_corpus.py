"""CCC corpus: splits by conversation, seeded samples, cached parquet."""

import pytest

from rtlm_lab.data.ccc import SplitSpec, corpus_stats, load_requests, load_turns
from rtlm_lab.errors import UserError


def test_splits_are_disjoint_by_conversation():
    df = load_turns()
    per_conv = df.groupby("conv_id")["split"].nunique()
    assert (per_conv == 1).all()
    assert set(df["split"]) == {"train", "val", "test"}
    stats = corpus_stats()
    assert stats["counts"]["train"]["conversations"] > 5 * stats["counts"]["test"]["conversations"]
    assert sum(c["conversations"] for c in stats["counts"].values()) == 7168


def test_requests_are_seeded_and_context_is_previous_turn():
    a = load_requests("test", n=20, seed=3, with_context=True)
    b = load_requests("test", n=20, seed=3, with_context=True)
    c = load_requests("test", n=20, seed=4)
    assert a.equals(b)
    assert list(a["request_id"]) != list(c["request_id"])
    assert (c["context"] == "").all()
    turns = load_turns().set_index(["conv_id", "turn_idx"])
    row = a[a["turn_idx"] > 0].iloc[0]
    assert row["context"] == turns.loc[(row["conv_id"], row["turn_idx"] - 1), "text"]


def test_bad_requests_config_is_a_user_error():
    with pytest.raises(UserError):
        load_requests("nope")
    with pytest.raises(UserError):
        load_requests("test", n=0)
    with pytest.raises(UserError):
        SplitSpec(train_frac=0.95, val_frac=0.1).validate()


def test_samples_are_nested():
    small, large = load_requests("test", n=30, seed=0), load_requests("test", n=50, seed=0)
    assert list(large["request_id"][:30]) == list(small["request_id"])
