"""Run-time recalibration in the serving loop, on the controlled clock (SimBackend, VirtualClock): ``serve``'s
``on_finish`` hook, and ``scheduler.online_update`` in :func:`~rtlm_lab.scheduler.continuous.run_continuous`
(sim) with a real, deliberately biased :class:`~rtlm_lab.scheduler.predictions.Predictors`."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from rtlm_lab.scheduler.engine import Engine, PredCost, PredictorServer, SimBackend, StepModel, VirtualClock, serve
from rtlm_lab.scheduler.policies import Request, make_policy

UNIT = StepModel(a=1.0)


def _reqs(spec):
    return [Request(request_id=i, text=f"text {i}", context="", arrival_s=t, n_input_tokens=1, true_tokens=n,
                    pred={"pred_rtlm": float(n), "uncertainty": 0.0}) for i, t, n in spec]


def test_on_finish_gets_every_finished_job_once_and_never_early():
    clock = VirtualClock()
    pol = make_policy("fcfs")
    engines = [Engine(f"e{k}", SimBackend(UNIT), pol, 2, 4096, step_model=UNIT) for k in range(2)]
    rs = _reqs([(f"r{i:02d}", 0.3 * i, 1 + i % 5) for i in range(15)])
    calls = []
    jobs, _ = serve(rs, pol, engines, clock, PredictorServer(rs, (), clock),
                    on_finish=lambda js: calls.append((clock.now(), list(js))))
    got = [j for _, js in calls for j in js]
    assert sorted(j.rid for j in got) == sorted(j.rid for j in jobs) == sorted(r.request_id for r in rs)
    assert len({id(j) for j in got}) == len(got) == 15
    assert len(calls) > 3
    for t, js in calls[:-1]:  # handed over once the virtual clock has reached their finish, not at the step's
        assert js and all(j.finish_s <= t for j in js)  # start (the last call: the run's end, nothing left to predict)


def test_sim_predictor_server_calls_predict_at_each_batch_start():
    clock = VirtualClock()
    pol = make_policy("rtlm")
    rs = _reqs([("a", 0.0, 1), ("b", 0.1, 1), ("c", 0.2, 1)])
    for r in rs:
        r.pred.clear()
    seen = []

    def predict(batch):
        seen.append((clock.now(), [r.request_id for r in batch]))
        return [{"pred_rtlm": 7.0, "uncertainty": 0.0} for _ in batch]

    server = PredictorServer(rs, pol.needs, clock, predict=predict, cost=PredCost(a=0.5, b=0.25))
    jobs, facts = serve(rs, pol, [Engine("e0", SimBackend(UNIT), pol, 1, 4096, step_model=UNIT)], clock, server)
    assert [ids for _, ids in seen] == [["a"], ["b", "c"]] and [t for t, _ in seen] == [0.0, 0.75]
    assert facts["predictor_batches"]["n"].tolist() == [1, 2]          # the modelled cost, as without predict
    assert all(j.req.pred["pred_rtlm"] == 7.0 for j in jobs)


# ------------------------------------------------------------------------------------- run_continuous, sim
@pytest.fixture(scope="module")
def biased(ccc_sample):
    """Predictors fitted on lengths ~ words/2; the served LM answers 4x longer (a biased predictor)."""
    from rtlm_lab.scheduler.predictions import Predictors

    texts = [t for t in ccc_sample if t.strip()][:240]
    words = np.array([len(t.split()) for t in texts], float)
    fit_len = np.clip(np.round(words / 2 + 3), 2, 40)
    pred = Predictors(("pred_rtlm", "uncertainty"), seed=0).fit(texts[:120], fit_len[:120])
    held = pd.DataFrame({"request_id": [f"h{i:03d}" for i in range(120)], "text": texts[120:], "context": "",
                         "n_input_tokens": words[120:].astype(int) + 1,
                         "n_output_tokens": (4 * fit_len[120:]).astype(int)})
    p = pred.predict_many(held["text"].tolist())
    held["pred_rtlm"], held["uncertainty"] = p["pred_rtlm"].to_numpy(), p["uncertainty"].to_numpy()
    return pred, held


def _run(tmp_path, pred, held, online_update: bool):
    from rtlm_lab.scheduler.continuous import run_continuous

    cap = tmp_path / "cap.json"
    cap.write_text(json.dumps({"capacity_rps": 1.0, "n_requests": 8, "step_model": {"a": 0.01, "b": 0.001}}))
    cfg = {"mode": "sim", "seed": 0, "lm": {"name": "biased"}, "policy": {"name": "rtlm"},
           "platform": {"name": "cpu", "engine": {"max_seqs": 4, "max_batch_tokens": 1024}},
           "workload": {"kind": "poisson", "rho": 0.7, "n_requests": 120},
           "scheduler": {"capacity": str(cap), "overhead_samples": 0, "online_update": online_update}}
    rec, m, trace = run_continuous(cfg, tmp_path / ("on" if online_update else "off"), None, pred, held,
                                   progress=False)
    return rec.set_index("request_id").loc[trace["request_id"]].reset_index(), m, trace


def test_online_update_moves_biased_predictions_toward_the_truth(tmp_path, biased):
    pred, held = biased
    rec, m, trace = _run(tmp_path, pred, held, online_update=True)
    assert m["online_update"] is True and m["n_online_updates"] == 120
    assert pred.rtlm_.n_updates_ == 0                   # the caller's predictors stay as fitted (a copy learns)
    err_on = (rec["pred_tokens"] - rec["actual_tokens"]).abs().to_numpy()
    err_frozen = (trace["pred_rtlm"] - trace["true_tokens"]).abs().to_numpy()
    late = slice(60, None)
    assert err_on[late].mean() < 0.6 * err_frozen[late].mean()
    assert err_on[late].mean() < err_on[:20].mean()      # it learns along the stream
    # the early requests were predicted before anything finished: the fitted (biased) values
    assert rec["pred_tokens"].iloc[0] == pytest.approx(trace["pred_rtlm"].iloc[0], rel=1e-9)


def test_online_update_off_leaves_predictions_untouched(tmp_path, biased):
    pred, held = biased
    rec, m, trace = _run(tmp_path, pred, held, online_update=False)
    assert m["online_update"] is False and m["n_online_updates"] == 0
    np.testing.assert_array_equal(rec["pred_tokens"].to_numpy(), trace["pred_rtlm"].to_numpy())
    assert pred.rtlm_.n_updates_ == 0
