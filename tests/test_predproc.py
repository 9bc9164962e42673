"""scheduler.predictor_process: the fitted predictors served from their own process answer exactly as the
in-process ones, errors come back as one line, and the static executor serves a run through them."""

from __future__ import annotations

import pandas as pd
import pytest

from rtlm_lab.scheduler.predictions import Predictors
from rtlm_lab.scheduler.predproc import PredictorProcess, serving_predictors

COLS = ("pred_rtlm", "uncertainty", "pred_proxy")


@pytest.fixture(scope="module")
def fitted(ccc_sample):
    texts = [t for t in ccc_sample if 10 < len(t) < 300][:60]
    lengths = [len(t.split()) * 2 + (i % 7) for i, t in enumerate(texts)]  # any target: this test checks transport
    return Predictors(columns=COLS, seed=0).fit(texts, lengths), texts


def test_process_answers_as_the_in_process_predictors(fitted):
    pred, texts = fitted
    with PredictorProcess(pred, threads=1) as proc:
        assert proc.proc.is_alive()
        for t in texts[:3]:
            got, sec = proc.predict_one(t, COLS)
            want, _ = pred.predict_one(t, COLS)
            assert got == pytest.approx(want) and sec > 0
        got, want = proc.predict_batch(texts[:5], ["pred_proxy"]), pred.predict_batch(texts[:5], ["pred_proxy"])
        assert [g["pred_proxy"] for g in got] == pytest.approx([w["pred_proxy"] for w in want])
        # the same frame; MiniLM's float32 sums differ in the last bits with the thread count (1 in the child)
        pd.testing.assert_frame_equal(proc.predict_many(texts[:4]), pred.predict_many(texts[:4]), rtol=1e-5)
        # the child updates its own copy: the caller's predictors stay as fitted
        before = pred.predict_one(texts[0], ["pred_rtlm"])[0]
        assert proc.update(texts[:6], [500.0] * 6) == 6
        assert pred.predict_one(texts[0], ["pred_rtlm"])[0] == before
        assert proc.predict_one(texts[0], ["pred_rtlm"])[0]["pred_rtlm"] != before["pred_rtlm"]
        with pytest.raises(RuntimeError, match="predictor process: .*Error"):  # a column never fitted
            proc.predict_batch(texts[:1], ["ltr_score"])
        # still serving (the MiniLM proxy has no update: as fitted)
        assert proc.predict_one(texts[1], ["pred_proxy"])[0] == pytest.approx(pred.predict_one(texts[1], ["pred_proxy"])[0])
    assert not proc.proc.is_alive()


def test_serving_predictors_is_the_object_itself_unless_asked(fitted):
    pred, _ = fitted
    with serving_predictors(pred, {}, COLS) as p:
        assert p is pred
    with serving_predictors(None, {"predictor_process": True}, COLS) as p:
        assert p is None
    with serving_predictors(pred, {"predictor_process": True}, ()) as p:  # a policy that predicts nothing
        assert p is pred
    with serving_predictors(pred, {"predictor_process": True}, COLS) as p:
        assert isinstance(p, PredictorProcess) and p.proc.is_alive()
    assert not p.proc.is_alive()
    with serving_predictors(pred, {"predictor_process": True, "predictor_threads": 1}, COLS) as p:
        assert p.threads == 1 and p.predict_one("hello there", ["pred_rtlm"])[0]


def test_static_executor_serves_a_run_through_the_process(fitted, tiny_lm):
    from rtlm_lab.scheduler.core import WorkerSpec
    from rtlm_lab.scheduler.executor import execute
    from rtlm_lab.scheduler.policies import Request, make_policy
    from rtlm_lab.scheduler.service import ServiceModel

    pred, texts = fitted
    lm = tiny_lm
    svc = ServiceModel(ttft_a=0.05, ttft_b=0.001, step_1=0.01, step_slope=0.002)
    reqs = [Request(request_id=f"p{i}", text=t, context="", arrival_s=0.02 * i, n_input_tokens=10, true_tokens=10,
                    pred={}, isolated_s=svc.isolated(10, 10)) for i, t in enumerate(texts[:6])]
    with PredictorProcess(pred, threads=1) as proc:
        df, m = execute(reqs, make_policy("rtlm", {"max_batch": 2}), lambda ts, cs: lm.generate(ts, cs),
                        [WorkerSpec("main", "main", 2, svc)], predictors=proc, progress=False)
    assert m["n_unique_completed"] == 6 and m["prediction_s"] > 0
    for r in reqs:  # every request was predicted by the child, with the fitted predictor's values
        assert r.pred["pred_rtlm"] == pytest.approx(pred.predict_one(r.text, ["pred_rtlm"])[0]["pred_rtlm"])


@pytest.mark.parametrize("args, msg", [
    (["scheduler.predictor_process=yes"], "scheduler.predictor_process must be true or false"),
    (["scheduler.predictor_threads=2"], "needs scheduler.predictor_process=true"),
    (["scheduler.predictor_process=true", "scheduler.predictor_threads=0"], "must be a positive integer"),
])
def test_cli_bad_predictor_settings_are_one_line(tmp_path, args, msg):
    from conftest import run_task

    res = run_task("schedule", ["mode=sim", "lm=gemma3_270m", "platform=cpu", *args], tmp_path)
    lines = [ln for ln in res.stderr.strip().splitlines() if ln.strip()]
    assert res.returncode == 2 and len(lines) == 1 and msg in lines[0], res.stderr[-2000:]
    assert not list(tmp_path.rglob("metrics.json"))
