"""The engine core in a process of its own (rtlm_lab.scheduler.frontend): a fake decoder on the wall clock
(a step model, the simulator's backend, sleeping its step time) in a spawned process, the predictor server in
the front end. A slow, interpreter-holding prediction delays its own request, not the engine's serving of the
requests it already holds."""

from __future__ import annotations

import time

from rtlm_lab.scheduler.engine import PredictorServer, StepModel, WallClock
from rtlm_lab.scheduler.frontend import engine_spec, serve_processes
from rtlm_lab.scheduler.policies import Request, make_policy

STEP = StepModel(a=0.005)  # 5 ms a step, whatever its size


def _reqs():
    # three long requests at t=0 (40 steps ~ 0.2 s), then "slow" at 0.02 s
    rs = [Request(request_id=f"r{i}", text="t", context="", arrival_s=0.0, n_input_tokens=1, true_tokens=40)
          for i in range(3)]
    rs.append(Request(request_id="slow", text="t", context="", arrival_s=0.02, n_input_tokens=1, true_tokens=2))
    return rs


def _run(slow_s: float):
    rs = _reqs()
    pol = make_policy("fcfs")

    def predict(batch):
        out = []
        for r in batch:
            if r.request_id == "slow" and slow_s:
                t_end = time.perf_counter() + slow_s
                while time.perf_counter() < t_end:  # pure Python: holds the interpreter it runs in
                    pass
            out.append({"pred_rtlm": 1.0})
        return out

    clock = WallClock()
    spec = engine_spec("e0", pol, 4, 4096, {"type": "sim", "step_model": STEP.to_dict(), "kv_slots": 8},
                       step_model=STEP)
    jobs, facts = serve_processes(rs, pol, [spec], PredictorServer(rs, ("pred_rtlm",), clock, predict=predict),
                                  clock=clock)
    return {j.rid: j for j in jobs}, facts


def test_a_slow_prediction_delays_its_own_request_not_the_engine():
    base, _ = _run(0.0)
    slow, facts = _run(0.4)
    assert sorted(slow) == ["r0", "r1", "r2", "slow"] and facts["engine_process"]
    assert len(facts["steps"]["e0"]) > 0
    # its own request waited for its prediction ...
    assert slow["slow"].ready_s - slow["slow"].req.arrival_s >= 0.4
    assert slow["slow"].finish_s >= slow["slow"].ready_s
    # ... while the engine process went on serving the others at its own pace (40 steps of 5 ms)
    for k in ("r0", "r1", "r2"):
        assert slow[k].finish_s - base[k].finish_s < 0.15, (k, slow[k].finish_s, base[k].finish_s)
        assert slow[k].finish_s < 0.4


def test_a_real_kv_engine_in_its_own_process_gives_generates_tokens(tiny_causal_dir):
    """The real path: a tiny GPT-2 loaded in the engine process, the kv engine, requests placed from the front
    end; every request's tokens equal batch-1 generate in this process."""
    from conftest import tiny_spec
    from rtlm_lab.lm import load_lm
    from rtlm_lab.scheduler.continuous import engine_config

    spec = tiny_spec(tiny_causal_dir, stop_strings=["e"], max_new_tokens=12)
    lm = load_lm(spec)
    texts = [f"hello number {i} how are you" for i in range(5)]
    ref = {f"q{i}": lm.generate([t])[0] for i, t in enumerate(texts)}
    rs = [Request(request_id=f"q{i}", text=t, context="", arrival_s=0.01 * i, n_input_tokens=5, true_tokens=1)
          for i, t in enumerate(texts)]
    pol = make_policy("fcfs")
    ecfg = engine_config({"engine": {"max_seqs": 2, "max_batch_tokens": 256}})
    clock = WallClock()
    es = engine_spec("main", pol, 2, 256, {"type": "real", "lm_spec": spec, "platform": {"name": "cpu",
                                                                                         "device": "cpu"}, "ecfg": ecfg})
    jobs, facts = serve_processes(rs, pol, [es], PredictorServer(rs, (), clock), clock=clock)
    got = {j.rid: j for j in jobs}
    assert sorted(got) == sorted(ref)
    for k, g in ref.items():
        assert got[k].output_ids == list(g.output_ids), k
        assert got[k].finish_s >= got[k].first_token_s >= got[k].admit_s >= got[k].req.arrival_s
    assert facts["backend"]["main"]["backend"] == "kv"
