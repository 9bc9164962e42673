"""Tests of rtlm_lab.uncertainty: validation-set precision/recall, minimal pairs, robustness."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from rtlm_lab.uncertainty import THRESHOLDS, UNCERTAINTY_TYPES, explain, quantify

VALIDATION = Path(__file__).parent / "data" / "uncertainty_validation.csv"
COLUMNS = [*UNCERTAINTY_TYPES, "total", "n_tokens"]
MIN_PRECISION, MIN_RECALL = 0.8, 0.7


@pytest.fixture(scope="module")
def validation():
    df = pd.read_csv(VALIDATION)
    return df, quantify(df["text"].tolist())


def test_validation_set_shape(validation):
    df, _ = validation
    assert len(df) >= 130
    for k in UNCERTAINTY_TYPES:
        assert set(df[k].unique()) <= {0, 1}
        assert df[k].sum() >= 15, k
    assert (df[list(UNCERTAINTY_TYPES)].sum(axis=1) == 0).sum() >= 20


def test_precision_recall(validation):
    df, q = validation
    lines = [f"{'type':15s} {'thr':>5s} {'prec':>5s} {'rec':>5s} {'tp':>3s} {'fp':>3s} {'fn':>3s}"]
    failures = []
    for k in UNCERTAINTY_TYPES:
        pred = q[k].to_numpy() >= THRESHOLDS[k]
        gold = df[k].to_numpy() == 1
        tp, fp, fn = int((pred & gold).sum()), int((pred & ~gold).sum()), int((~pred & gold).sum())
        prec = tp / max(1, tp + fp)
        rec = tp / max(1, tp + fn)
        lines.append(f"{k:15s} {THRESHOLDS[k]:5.2f} {prec:5.2f} {rec:5.2f} {tp:3d} {fp:3d} {fn:3d}")
        if prec < MIN_PRECISION or rec < MIN_RECALL:
            failures.append(k)
    print("\n" + "\n".join(lines))
    assert not failures, "\n".join(lines)


MINIMAL_PAIRS = [
    ("structural", "I saw the man with the telescope.", "I saw the man."),
    ("structural", "I love old men and women.", "I love men."),
    ("structural", "He hit the boy with the umbrella.", "He hit the boy."),
    ("syntactic", "Fruit flies like a banana.", "Fruit is like a banana."),
    ("syntactic", "I saw her duck.", "I saw her."),
    ("syntactic", "Visiting relatives can be boring.", "Relatives can be boring."),
    ("semantic", "Did you see the bat?", "Did you see the baseball player swing the bat and hit a home run?"),
    ("semantic", "Let's meet at the bank.", "Let's meet at the cafe."),
    ("semantic", "I need a new mouse.", "I need a new keyboard."),
    ("vagueness", "I kind of want some stuff.", "I want a sandwich."),
    ("vagueness", "Maybe we could meet later.", "We could meet at five."),
    ("vagueness", "There were a lot of people.", "There were ten people."),
    ("open_endedness", "Tell me about your weekend.", "Did you have a good weekend?"),
    ("open_endedness", "Why do you like jazz?", "Do you like jazz?"),
    ("open_endedness", "What do you think about Paris?", "What is the capital of France?"),
    ("multi_part", "What's your name and where do you live and what do you do?", "What's your name?"),
    ("multi_part", "How are you? What are you up to?", "How are you?"),
    ("multi_part", "Set an alarm for 7 and remind me to call mom.", "Set an alarm for 7."),
]


def test_minimal_pairs():
    texts = [t for _, a, b in MINIMAL_PAIRS for t in (a, b)]
    q = quantify(texts)
    bad = []
    for j, (k, a, b) in enumerate(MINIMAL_PAIRS):
        sa, sb = q[k].iloc[2 * j], q[k].iloc[2 * j + 1]
        if not sa > sb:
            bad.append(f"{k}: {a!r} {sa:.3f} <= {b!r} {sb:.3f}")
    assert not bad, "\n".join(bad)
    for k in UNCERTAINTY_TYPES:
        assert sum(1 for p in MINIMAL_PAIRS if p[0] == k) >= 2


def _check(q: pd.DataFrame, n: int) -> None:
    assert list(q.columns) == COLUMNS
    assert len(q) == n
    vals = q[[*UNCERTAINTY_TYPES, "total"]].to_numpy(dtype=float)
    assert np.isfinite(vals).all()
    assert (vals >= 0).all() and (vals <= 1).all()
    assert q["n_tokens"].dtype.kind == "i"
    assert (q["n_tokens"] >= 0).all()


NASTY = ["", "   ", "🙂🙂🙂", "¿Dónde está la biblioteca?", "这是什么", "x" * 100_000,
         "\x00\xff binary", "word " * 20_000, "\n\n\t", "???", "and and and or or", "\ud800 lone surrogate"]


def test_robustness():
    for t in NASTY:
        _check(quantify([t]), 1)
    mixed = [*NASTY, None, 42, 3.5, float("nan"), b"bytes"]
    _check(quantify(mixed), len(mixed))
    _check(quantify([]), 0)
    for t in NASTY[:7]:
        ex = explain(t)
        assert set(UNCERTAINTY_TYPES) <= set(ex)
        assert all(math.isfinite(ex[k]["score"]) for k in UNCERTAINTY_TYPES)


def test_order_and_batching():
    texts = ["Tell me about your weekend.", "What is 2 plus 2?", "I kind of maybe want some stuff."] * 5
    a = quantify(texts, batch_size=2)
    b = quantify(texts, batch_size=256)
    pd.testing.assert_frame_equal(a, b)
    assert a["open_endedness"].iloc[0] > a["open_endedness"].iloc[1]


@settings(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.text(max_size=300), min_size=1, max_size=4))
def test_property_arbitrary_text(texts):
    _check(quantify(texts), len(texts))


def test_explain_vagueness_evidence():
    ex = explain("I kind of maybe want some stuff")
    ev = ex["vagueness"]["evidence"]
    assert any(e in ("kind of", "maybe") for e in ev), ev
    assert ex["vagueness"]["score"] > 0.5
    assert set(ex["vagueness"]) == {"score", "evidence"}


def test_graded_scores():
    q = quantify(["I kind of like it.", "I kind of maybe like some stuff, more or less, I guess."])
    assert q["vagueness"].iloc[1] > q["vagueness"].iloc[0]
    total_weights_ok = q["total"].between(0, 1).all()
    assert total_weights_ok
