"""The continuous-batching engine and its serving loop: timing logic on a controlled clock (a fake decoder,
no LM), hand-computed response times, and the real engine (transformers' paged continuous batching) on a
tiny random-initialised model against plain ``generate``."""

from __future__ import annotations

import math

import pytest

from conftest import tiny_spec
from rtlm_lab.scheduler.engine import (Engine, PredCost, PredictorServer, SimBackend, StepModel, VirtualClock,
                                       WallClock, serve)
from rtlm_lab.scheduler.policies import POLICIES, Request, make_policy

UNIT = StepModel(a=1.0)   # every step takes 1 s, whatever its size


class StepClock(VirtualClock):
    """A wall-clock-mode clock (the real engine's code path) whose time moves only when a test moves it."""

    virtual = False

    def sleep_until(self, t: float) -> None:
        self.t = max(self.t, float(t))


def step_on(backend, clock: StepClock, dt: float = 1.0) -> None:
    """Move ``clock`` by ``dt`` after each of ``backend``'s real steps."""
    step = backend._step

    def stepped(engine, now, clock_):
        out = step(engine, now, clock_)
        clock.t += dt
        return out

    backend._step = stepped


def reqs(spec):
    """``[(id, arrival_s, true_tokens)]`` -> requests (1 prompt token each; exact predictions, point-mass
    predicted quantiles and true length distributions)."""
    return [Request(request_id=i, text=f"text {i}", context="", arrival_s=t, n_input_tokens=1, true_tokens=n,
                    pred={"pred_rtlm": float(n), "pred_proxy": float(n), "ltr_score": float(n), "uncertainty": 0.0,
                          "pred_quantiles": (float(n),) * 7}, true_dist=(n,))
            for i, t, n in spec]


def run(spec, policy="fcfs", max_seqs=1, model=UNIT, clock=None, cost=None, n_engines=1, backend=SimBackend):
    clock = clock or VirtualClock()
    pol = make_policy(policy)
    engines = [Engine(f"e{k}", backend(model), pol, max_seqs=max_seqs, max_batch_tokens=4096, step_model=model)
               for k in range(n_engines)]
    rs = reqs(spec)
    pred = PredictorServer(rs, pol.needs if cost else (), clock, cost=cost)
    jobs, facts = serve(rs, pol, engines, clock, pred)
    return {j.rid: j for j in jobs}, facts


def test_fcfs_response_times_by_hand():
    jobs, _ = run([("a", 0.0, 3), ("b", 0.0, 1), ("c", 0.0, 2)], "fcfs")
    # one at a time, 1 s a token: a ends at 3, b at 4, c at 6
    assert {k: j.finish_s for k, j in jobs.items()} == {"a": 3.0, "b": 4.0, "c": 6.0}
    assert jobs["c"].admit_s == 4.0 and jobs["c"].first_token_s == 5.0


def test_srpt_response_times_by_hand_and_preemption_resumes_once():
    jobs, _ = run([("a", 0.0, 3), ("b", 0.0, 1), ("c", 0.0, 2)], "oracle_srpt")
    assert {k: j.finish_s for k, j in jobs.items()} == {"b": 1.0, "c": 3.0, "a": 6.0}
    # a long job is paused when a short one arrives, then resumes and finishes once
    jobs, _ = run([("long", 0.0, 5), ("short", 1.5, 1)], "oracle_srpt")
    assert jobs["short"].finish_s == 3.0 and jobs["long"].finish_s == 6.0
    assert jobs["long"].steps_paused == 1 and jobs["long"].generated == 5
    fcfs, _ = run([("long", 0.0, 5), ("short", 1.5, 1)], "fcfs")
    assert fcfs["long"].finish_s == 5.0 and fcfs["short"].finish_s == 6.0 and fcfs["long"].steps_paused == 0


def test_continuous_batching_joins_and_leaves_every_step():
    # two slots: b joins while a runs, c takes b's slot the step after b leaves
    jobs, facts = run([("a", 0.0, 4), ("b", 0.5, 1), ("c", 0.5, 2)], "fcfs", max_seqs=2)
    assert jobs["a"].finish_s == 4.0                       # never waits for the others
    assert jobs["b"].admit_s == 1.0 and jobs["b"].finish_s == 2.0
    assert jobs["c"].admit_s == 2.0 and jobs["c"].finish_s == 4.0
    assert facts["steps"]["e0"]["n_seqs"].tolist() == [1, 2, 2, 2]


def test_prediction_cost_delays_its_request():
    cost = PredCost(a=0.5, b=0.25)  # one request: 0.75 s before it is eligible
    jobs, facts = run([("a", 0.0, 2)], "rtlm", cost=cost)
    assert jobs["a"].ready_s == pytest.approx(0.75) and jobs["a"].finish_s == pytest.approx(2.75)
    # arrivals during a prediction wait for it and are predicted together in the next batch
    jobs, facts = run([("a", 0.0, 1), ("b", 0.1, 1), ("c", 0.2, 1)], "rtlm", cost=cost)
    assert facts["predictor_batches"]["n"].tolist() == [1, 2]
    assert jobs["b"].ready_s == pytest.approx(0.75 + 1.0) and jobs["c"].ready_s == jobs["b"].ready_s


class SlowWarmup(SimBackend):
    """A backend whose warm-up takes 100 s of the clock (compilation, graph capture)."""

    clock = None

    def warmup(self):
        self.clock.sleep_until(self.clock.now() + 100.0)


def test_warmup_never_falls_inside_the_clock():
    clock = VirtualClock()
    SlowWarmup.clock = clock
    pol = make_policy("fcfs")
    eng = Engine("e0", SlowWarmup(UNIT), pol, 1, 4096)
    rs = reqs([("a", 0.0, 2)])
    jobs, _ = serve(rs, pol, [eng], clock, PredictorServer(rs, (), clock))
    assert jobs[0].finish_s == 2.0 and jobs[0].finish_s - jobs[0].req.arrival_s == 2.0


@pytest.mark.parametrize("policy", [p for p in POLICIES if not p.startswith("rtlm_")])
def test_wall_clock_fake_decoder_matches_the_simulator(policy):
    """The real loop (wall clock, a fake decoder that really takes its step time) gives the simulator's
    schedule: same order, response times within a few ms."""
    spec = [("a", 0.0, 6), ("b", 0.01, 2), ("c", 0.02, 4), ("d", 0.05, 1), ("e", 0.06, 3), ("f", 0.2, 2)]
    model = StepModel(a=0.04, b=0.004)
    sim, _ = run(spec, policy, max_seqs=2, model=model)
    real, _ = run(spec, policy, max_seqs=2, model=model, clock=WallClock())
    # the same order wherever the simulator separates two finishes by more than a step's sleep overshoot (two
    # requests finishing in one step may swap on a loaded machine)
    for x in sim:
        for y in sim:
            if sim[x].finish_s + 0.02 < sim[y].finish_s:
                assert real[x].finish_s < real[y].finish_s, (x, y)
    for k in sim:  # the wall clock adds sleep overshoot (a loaded 2-core machine): a few ms a step
        assert real[k].finish_s == pytest.approx(sim[k].finish_s, abs=0.05, rel=0.1)
        assert real[k].admit_s == pytest.approx(sim[k].admit_s, abs=0.05, rel=0.1)


def test_every_request_served_once_on_two_engines_and_placement_balances():
    spec = [(f"r{i:02d}", 0.1 * i, 1 + i % 4) for i in range(20)]
    jobs, facts = run(spec, "fcfs", max_seqs=2, n_engines=2)
    assert sorted(jobs) == sorted(s[0] for s in spec)
    per = {e: sum(j.worker == e for j in jobs.values()) for e in ("e0", "e1")}
    assert min(per.values()) >= 5                     # JSQ sends work to both
    for j in jobs.values():
        assert j.req.arrival_s <= j.ready_s <= j.admit_s < j.first_token_s <= j.finish_s
        assert j.generated == j.req.true_tokens


def test_rtlm_places_by_predicted_completion_across_engines():
    """A slow engine (3x the step time) gets a request only when its predicted completion beats the fast
    engine's queue; JSQ weighted by capacity does the same on average, RT-LM per request."""
    fast, slow = StepModel(a=0.1), StepModel(a=0.3)
    pol = make_policy("rtlm")
    clock = VirtualClock()
    engines = [Engine("gpu", SimBackend(fast), pol, 1, 4096, step_model=fast),
               Engine("cpu", SimBackend(slow), pol, 1, 4096, kind="offload", step_model=slow)]
    rs = reqs([(f"r{i}", 0.0, 10) for i in range(4)] + [("tiny", 0.0, 1)])
    jobs, _ = serve(rs, pol, engines, clock, PredictorServer(rs, (), clock))
    where = {j.rid: j.worker for j in jobs}
    assert where["r0"] == "gpu"           # an idle fast engine beats everything
    assert "cpu" in where.values()        # once the fast queue is long enough, the slow engine helps


def test_round_robin_takes_the_replicas_in_turn_and_leaves_offload_workers_out():
    """policy.placement=round_robin: the main engines (GPU replicas) in turn whatever their load; a CPU
    offload worker beside them gets nothing (round robin knows no service rates)."""
    from rtlm_lab.scheduler.engine import Job

    pol = make_policy("fcfs", {"placement": "round_robin"})
    engines = [Engine(f"e{k}", SimBackend(UNIT), pol, 1, 4096, step_model=UNIT) for k in range(2)]
    engines.append(Engine("cpu0", SimBackend(UNIT), pol, 1, 4096, kind="offload", step_model=UNIT))
    for e in engines:
        e.capacity_rps = 1.0
    engines[0].add(Job(req=reqs([("busy", 0.0, 50)])[0]))  # e0 loaded: JSQ would avoid it, round robin does not
    got = [pol.place(Job(req=r), engines, 0.0) for r in reqs([(f"r{i}", 0.0, 1) for i in range(5)])]
    assert got == ["e0", "e1", "e0", "e1", "e0"]
    jsq = make_policy("fcfs")
    assert jsq.placement == "jsq" and jsq.place(Job(req=reqs([("x", 0.0, 1)])[0]), engines, 0.0) != "e0"
    jobs, _ = run([(f"r{i:02d}", 0.1 * i, 1 + i % 3) for i in range(12)], "fcfs", n_engines=2)
    assert sorted(jobs) == [f"r{i:02d}" for i in range(12)]


def test_bad_placement_is_a_user_error():
    from rtlm_lab.errors import UserError

    with pytest.raises(UserError, match="policy.placement must be one of jsq, round_robin, predicted"):
        make_policy("fcfs", {"placement": "random"})
    assert make_policy("rtlm").placement == "predicted" and make_policy("rtlm_no_offload").placement == "jsq"
    assert make_policy("rtlm", {"placement": "round_robin"}).describe()["placement"] == "round_robin"


def test_predicted_placement_uses_the_policys_own_lengths():
    """RT-LM's predicted completion counts each placed job's *predicted* tokens (its ``pred_rtlm``): one long
    job on e0 weighs more than three short ones on e1. (It once read a column no one wrote and assumed 64
    tokens for every job, which made it a JSQ by count.) The oracle uses the true lengths, FCFS the typical
    reply."""
    from rtlm_lab.scheduler.engine import Job

    model = StepModel(a=0.01)

    def placed(policy):
        pol = make_policy(policy)
        engines = [Engine(f"e{k}", SimBackend(model), pol, 1, 4096, step_model=model) for k in range(2)]
        engines[0].add(Job(req=reqs([("long", 0.0, 100)])[0]))
        for i in range(3):
            engines[1].add(Job(req=reqs([(f"short{i}", 0.0, 2)])[0]))
        return pol, engines

    pol, engines = placed("rtlm")
    new = Job(req=reqs([("new", 0.0, 5)])[0])
    assert engines[0].predicted_completion(new, 0.0) > engines[1].predicted_completion(new, 0.0)
    assert pol.place(new, engines, 0.0) == "e1"
    pol, engines = placed("oracle_srpt")
    assert make_policy("oracle_srpt", {"placement": "predicted"}).place(new, engines, 0.0) == "e1"
    fcfs = make_policy("fcfs", {"placement": "predicted"})  # no length knowledge: four typical replies vs one
    for e in engines:
        e.policy = fcfs
    assert fcfs.place(new, engines, 0.0) == "e0"


class _Boom(SimBackend):
    def step(self, engine, now, clock):
        if engine.n_steps >= 2:
            raise RuntimeError("device lost")
        return super().step(engine, now, clock)


def test_engine_threads_overlap_the_replicas_steps_and_account_every_request():
    """A wall-clock run with two replicas steps each on its own thread (the default there): their steps
    overlap in time, as two GPUs work at once; stepped in turn by one loop they never do. Every request is
    served once either way, with the same tokens."""
    model = StepModel(a=0.02)
    spec = [(f"r{i:02d}", 0.0, 4 + i % 3) for i in range(12)]

    def overlaps(facts):
        a, b = (facts["steps"][e] for e in ("e0", "e1"))
        return sum(((b["t_s"] < t + dt) & (b["t_s"] + b["dt_s"] > t)).sum() for t, dt in zip(a["t_s"], a["dt_s"]))

    for threaded in (True, False):
        pol = make_policy("fcfs")
        engines = [Engine(f"e{k}", SimBackend(model), pol, 2, 4096, step_model=model) for k in range(2)]
        for e in engines:
            e.capacity_rps = 1.0
        clock, rs = WallClock(), reqs(spec)
        jobs, facts = serve(rs, pol, engines, clock, PredictorServer(rs, (), clock),
                            threaded=None if threaded else False)
        assert facts["threaded"] is threaded
        assert sorted(j.rid for j in jobs) == [s[0] for s in spec]
        assert {j.worker for j in jobs} == {"e0", "e1"}
        assert all(j.generated == j.req.true_tokens and j.admit_s < j.first_token_s <= j.finish_s for j in jobs)
        for e in engines:  # one step at a time per engine
            st = facts["steps"][e.id].sort_values("t_s")
            assert (st["t_s"].iloc[1:].to_numpy() >= (st["t_s"] + st["dt_s"]).iloc[:-1].to_numpy() - 1e-9).all()
        if threaded:
            assert overlaps(facts) > 0
        else:
            assert overlaps(facts) == 0
    with pytest.raises(ValueError, match="wall clock"):
        serve(rs, pol, engines, VirtualClock(), PredictorServer(rs, (), VirtualClock()), threaded=True)


def test_an_engine_threads_error_ends_the_run():
    pol = make_policy("fcfs")
    engines = [Engine("e0", _Boom(StepModel(a=0.001)), pol, 1, 4096), Engine("e1", SimBackend(StepModel(a=0.001)),
                                                                               pol, 1, 4096)]
    rs = reqs([(f"r{i}", 0.0, 5) for i in range(6)])
    clock = WallClock()
    with pytest.raises(RuntimeError, match="device lost"):
        serve(rs, pol, engines, clock, PredictorServer(rs, (), clock))


def test_step_model_fit_recovers_its_parameters():
    import numpy as np
    import pandas as pd

    rng = np.random.default_rng(0)
    n = rng.integers(1, 64, 200)
    tok = n + rng.integers(0, 300, 200)
    dt = 0.01 + 0.0005 * n + 0.00002 * tok + rng.normal(0, 1e-5, 200)
    m = StepModel.fit(pd.DataFrame({"n_seqs": n, "n_tokens": tok, "dt_s": dt}))
    assert m.a == pytest.approx(0.01, rel=0.01) and m.b == pytest.approx(5e-4, rel=0.02)
    assert m.c == pytest.approx(2e-5, rel=0.05)
    assert m.isolated(10, 5) == pytest.approx(m.step_s(1, 10) + 4 * m.step_s(1, 1))


# ---------------------------------------------------------------------------------------------- real engine
@pytest.mark.parametrize("kind", ["paged", "slots"])
def test_real_engine_tokens_equal_generate_and_requests_join_midway(kind, tiny_causal_dir):
    """Both real engines (transformers' paged continuous batching stepped by our loop; our slot engine on
    DynamicCache) give each request the tokens plain batch-1 ``generate`` gives, while requests join at
    different steps, leave when done, and a preemptive policy pauses and resumes them."""
    from rtlm_lab.lm import load_lm
    from rtlm_lab.scheduler.engine import HFBackend, SlotBackend

    lm = load_lm(tiny_spec(tiny_causal_dir, stop_strings=["e"], max_new_tokens=16))
    texts = [f"hello number {i} how are you doing" for i in range(7)]
    ref = {f"q{i}": lm.generate([t])[0] for i, t in enumerate(texts)}
    # longest first, one arrival per engine step (a clock moved by the steps, not the host's speed): the
    # shorter late arrivals make SRPT pause running rows
    order = sorted(ref, key=lambda k: -ref[k].n_output_tokens)
    assert ref[order[0]].n_output_tokens > ref[order[-1]].n_output_tokens + 2
    rs = [Request(request_id=k, text=texts[int(k[1:])], context="", arrival_s=1.0 * i, n_input_tokens=5,
                  true_tokens=ref[k].n_output_tokens) for i, k in enumerate(order)]
    for policy in ("fcfs", "oracle_srpt"):
        for r in rs:
            r.pred = {}
        pol = make_policy(policy)
        backend = (HFBackend(lm, max_seqs=3, max_batch_tokens=256, num_blocks=64, page_size=16) if kind == "paged"
                   else SlotBackend(lm, max_seqs=3, max_batch_tokens=256))
        eng = Engine("cpu0", backend, pol, 3, 256)
        clock = StepClock()
        step_on(backend, clock)
        jobs, facts = serve(rs, pol, [eng], clock, PredictorServer(rs, (), clock))
        assert (sum(j.steps_paused for j in jobs) > 0) == pol.preemptive, policy
        got = {j.rid: j for j in jobs}
        assert sorted(got) == sorted(ref)
        for k, g in ref.items():
            assert got[k].generated == g.n_output_tokens, (policy, k)
            assert got[k].output_ids == list(g.output_ids), (policy, k)
            assert got[k].stop_reason == g.stop_reason, (policy, k)
            assert got[k].first_token_s <= got[k].finish_s
        assert facts["steps"]["cpu0"]["n_seqs"].max() <= 3
        backend.close()


def test_two_real_engines_share_the_load_and_keep_tokens(tiny_causal_dir):
    """Two replicas (engines) of a tiny LM on the CPU: JSQ placement uses both, every request is served once
    with its batch-1 greedy tokens; RT-LM's predicted-completion placement does too."""
    from rtlm_lab.lm import load_lm
    from rtlm_lab.scheduler.engine import SlotBackend

    spec = tiny_spec(tiny_causal_dir, stop_strings=["e"], max_new_tokens=12)
    lms = [load_lm(spec), load_lm(spec)]
    texts = [f"request {i} about the weather today" for i in range(10)]
    ref = {f"q{i}": lms[0].generate([t])[0] for i, t in enumerate(texts)}
    model = StepModel(a=0.01)
    for policy in ("fcfs", "rtlm"):
        rs = [Request(request_id=f"q{i}", text=t, context="", arrival_s=0.0, n_input_tokens=5,
                      true_tokens=ref[f"q{i}"].n_output_tokens, pred={"pred_rtlm": 6.0, "uncertainty": 0.1})
              for i, t in enumerate(texts)]
        pol = make_policy(policy)
        engines = [Engine(f"e{k}", SlotBackend(lm, 2, 256), pol, 2, 256, step_model=model) for k, lm in enumerate(lms)]
        clock = WallClock()
        jobs, _ = serve(rs, pol, engines, clock, PredictorServer(rs, (), clock))
        got = {j.rid: j for j in jobs}
        assert sorted(got) == sorted(ref)
        assert {j.worker for j in jobs} == {"e0", "e1"}, policy
        for k, g in ref.items():
            assert got[k].output_ids == list(g.output_ids), (policy, k)


def test_cpu_offload_worker_is_an_engine_every_policy_can_use(tiny_causal_dir):
    """A CPU offload worker (its own process and model copy) beside the main engine: with a main engine that
    is slow per step, RT-LM's predicted-completion placement sends work to it, FCFS's shortest expected delay
    too once the main queue is long; every request is served once with its batch-1 token count."""
    from rtlm_lab.lm import load_lm
    from rtlm_lab.scheduler.engine import ProcessBackend, SlotBackend

    spec = tiny_spec(tiny_causal_dir, stop_strings=["e"], max_new_tokens=12)
    lm = load_lm(spec)
    texts = [f"offload me {i} please" for i in range(8)]
    ref = {f"q{i}": lm.generate([t])[0].n_output_tokens for i, t in enumerate(texts)}
    main_model, cpu_model = StepModel(a=0.5), StepModel(a=0.05)  # the placement estimates: the worker looks fast
    off = ProcessBackend(spec, threads=1)
    try:
        for policy in ("rtlm", "fcfs"):
            rs = [Request(request_id=f"q{i}", text=t, context="", arrival_s=0.0, n_input_tokens=5,
                          true_tokens=ref[f"q{i}"], pred={"pred_rtlm": 6.0, "uncertainty": 0.0})
                  for i, t in enumerate(texts)]
            pol = make_policy(policy)
            main = Engine("main", SlotBackend(lm, 1, 256), pol, 1, 256, step_model=main_model)
            cpu = Engine("cpu0", off, pol, 1, 1 << 30, kind="offload", step_model=cpu_model)
            main.capacity_rps, cpu.capacity_rps = 1.0, 1.0  # equal: JSQ alternates
            clock = WallClock()
            jobs, facts = serve(rs, pol, [main, cpu], clock, PredictorServer(rs, (), clock))
            got = {j.rid: j for j in jobs}
            assert sorted(got) == sorted(ref)
            assert any(j.worker == "cpu0" for j in jobs), policy
            for k, n in ref.items():
                j = got[k]
                assert j.generated == n and j.admit_s <= j.first_token_s <= j.finish_s, (policy, k)
    finally:
        off.close()


def _tiny_probe(tiny_causal_dir, ccc_sample, probe_name: str):
    """A tiny real LM and an LM-state probe fitted on its greedy replies to 80 CCC turns (refinement at 2 and 4
    tokens, every 2 steps)."""
    import pandas as pd

    from rtlm_lab.lm import load_lm
    from rtlm_lab.scheduler.lmprobe import fit_state_probe

    lm = load_lm(tiny_spec(tiny_causal_dir, stop_strings=["e"], max_new_tokens=16))
    train_texts = ccc_sample[:80]
    gens = [lm.generate([t])[0] for t in train_texts]
    train = pd.DataFrame({"request_id": [f"c{i // 2}-{i}" for i in range(len(gens))], "text": train_texts,
                          "context": "", "n_output_tokens": [g.n_output_tokens for g in gens],
                          "output_ids": [list(g.output_ids) for g in gens]})
    return lm, fit_state_probe(lm, train, refine_ks=(2, 4), refine_every=2, probe=probe_name)


def _probe_requests(lm, ccc_sample):
    """Nine held-out CCC turns arriving 3 ms apart: their texts, batch-1 ``generate`` replies and requests."""
    texts = ccc_sample[200:209]
    ref = {f"q{i}": lm.generate([t])[0] for i, t in enumerate(texts)}
    rs = [Request(request_id=f"q{i}", text=t, context="", arrival_s=0.003 * i, n_input_tokens=5,
                  true_tokens=ref[f"q{i}"].n_output_tokens) for i, t in enumerate(texts)]
    return texts, ref, rs


# the device path (a dot product) and the host path; the kv engine (hooks in its forward, prompts prefilled in
# chunks of 4 tokens beside decoding rows) and the slots engine (output_hidden_states)
@pytest.mark.parametrize("backend_name,probe_name", [("kv", "ridge"), ("kv", "mlp"), ("slots", "ridge")])
def test_lmstate_policy_reads_the_engines_own_prefill_and_refines_while_decoding(tiny_causal_dir, ccc_sample,
                                                                                backend_name, probe_name):
    """The LM-state policy on a real engine: its prefill prediction equals the offline probe's on the
    same prompts (the engine's forward gives the same states as a separate pass), each refinement equals the
    offline refinement after teacher-forcing the same tokens, prefill comes first, and every request still gets
    batch-1 ``generate``'s tokens under preemption."""
    from rtlm_lab.scheduler.engine import SlotBackend

    lm, probe = _tiny_probe(tiny_causal_dir, ccc_sample, probe_name)
    assert probe.refine_every == 2 and probe.meta["probe"] == probe_name
    assert probe.on_device() == (probe_name == "ridge")

    texts, ref, rs = _probe_requests(lm, ccc_sample)
    pol = make_policy("lmstate", {"refine_every": 2})
    pol.token_s = 0.01
    from rtlm_lab.scheduler.continuous import attach_state_probe
    from rtlm_lab.scheduler.engine.kv import KVBackend

    budget = 512 if backend_name == "slots" else 6  # kv: chunked prefill, 3 decode rows + a 3-token chunk
    backend = SlotBackend(lm, max_seqs=3, max_batch_tokens=budget) if backend_name == "slots" else \
        KVBackend(lm, max_seqs=3, max_batch_tokens=budget, kv_slots=4)
    eng = Engine("cpu0", backend, pol, 3, budget)
    attach_state_probe([eng], probe)
    clock = StepClock()  # the schedule follows the steps, not the host's speed
    step_on(backend, clock)
    jobs, facts = serve(rs, pol, [eng], clock, PredictorServer(rs, (), clock))
    got = {j.rid: j for j in jobs}
    assert sorted(got) == sorted(ref)
    offline = probe.prefill.predict_texts(lm, texts)
    for i, (k, g) in enumerate(ref.items()):
        j = got[k]
        assert j.output_ids == list(g.output_ids), k
        assert j.req.pred["pred_lmstate"] == pytest.approx(max(1.0, offline[i]), rel=1e-4, abs=1e-4), k
        # refinements (every 2nd engine step, once 2 tokens are out) at increasing steps, each equal to the
        # offline one after teacher-forcing the same tokens
        ts = [t for t, _ in j.refines]
        assert ts == sorted(set(ts)) and all(2 <= t < g.n_output_tokens for t in ts), k
        if g.n_output_tokens >= 6:
            assert ts, k
        for t, rem in j.refines:
            want = probe.refine.refine_texts(lm, [texts[i]], [list(g.output_ids)[:t]])[0]
            assert rem == pytest.approx(max(0.0, want), rel=1e-4, abs=1e-3), (k, t)
    assert backend.probe_s > 0
    backend.close()


def test_lmstate_prefills_first_and_orders_by_predicted_remaining():
    """The LM-state key: an unpredicted job ranks first (its prefill gives the prediction); then shortest
    predicted remaining, with aging."""
    from rtlm_lab.scheduler.engine import Job

    pol = make_policy("lmstate", {"aging": 0.5})
    pol.token_s = 0.1
    r = reqs([("a", 0.0, 5), ("b", 0.0, 5), ("c", 9.0, 5)])
    a, b, c = (Job(req=x) for x in r)
    a.rem_pred, a.rem_at, a.generated = 10.0, 0, 4      # 6 predicted left
    b.rem_pred, b.rem_at, b.generated = 3.0, 2, 2       # 3 left
    assert pol.key(c, 10.0) == -math.inf
    assert pol.key(b, 10.0) < pol.key(a, 10.0)
    assert pol.key(a, 10.0) == pytest.approx(6 * 0.1 - 0.5 * 10.0)
    assert pol.preemptive


def test_slot_engine_parks_a_preempted_rows_kv_in_its_own_storage(tiny_causal_dir):
    """A paused row's KV is copied out of the running cache, not kept as a view: a view keeps the whole
    cache of the step it was paused in alive while the row waits (SmolLM2 at 128 rows ran out of the H200's
    memory that way), and the row still resumes with batch-1 ``generate``'s tokens."""
    from rtlm_lab.lm import load_lm
    from rtlm_lab.scheduler.engine import SlotBackend

    lm = load_lm(tiny_spec(tiny_causal_dir, stop_strings=["e"], max_new_tokens=16))
    texts = [f"hello number {i} how are you doing" for i in range(7)]
    ref = {f"q{i}": lm.generate([t])[0] for i, t in enumerate(texts)}
    # the first arrivals are long, the later ones short: SRPT pauses the long ones
    order = sorted(ref, key=lambda k: -ref[k].n_output_tokens)
    # arrivals one per engine step, on a clock that moves one unit per real step: the pauses happen whatever
    # the machine's speed (with arrivals 2 ms apart on the wall clock, a slow CI host had all 7 in before the
    # first step, so SRPT never paused anyone)
    rs = [Request(request_id=k, text=texts[int(k[1:])], context="", arrival_s=1.0 * i, n_input_tokens=5,
                  true_tokens=ref[k].n_output_tokens) for i, k in enumerate(order)]
    assert ref[order[0]].n_output_tokens > ref[order[-1]].n_output_tokens + 2  # something to preempt for
    pol = make_policy("oracle_srpt")
    backend = SlotBackend(lm, max_seqs=2, max_batch_tokens=256)
    parked_seen = []
    clock = StepClock()
    step_on(backend, clock)
    step = backend._step

    def checked(engine, now, clock_):
        out = step(engine, now, clock_)
        for kvs, last in backend.parked.values():  # a view's storage is the whole cache's (no _base under
            tensors = [t for kv in kvs for t in kv] + [last]  # inference_mode: compare storage sizes)
            parked_seen.append(all(t.untyped_storage().nbytes() == t.numel() * t.element_size() for t in tensors))
        return out

    backend._step = checked
    eng = Engine("cpu0", backend, pol, 2, 256)
    jobs, _ = serve(rs, pol, [eng], clock, PredictorServer(rs, (), clock))
    assert parked_seen and all(parked_seen)
    for j in jobs:
        assert j.output_ids == list(ref[j.rid].output_ids), j.rid
    backend.close()


def _synthetic_probe(resid_q, cap: int = 64):
    """A real :class:`StateProbe` around a real ridge probe fitted on synthetic states (no LM): what
    ``gittins_lmstate`` reads is the probe's residual quantiles and cap, set here by hand."""
    import numpy as np

    from rtlm_lab.lm.states import LMStates
    from rtlm_lab.regressor.lmstate import LMStatePredictor
    from rtlm_lab.scheduler.lmprobe import StateProbe

    rng = np.random.default_rng(0)
    n = 40
    st = LMStates({0: rng.normal(size=(n, 3))}, {0: rng.normal(size=(n, 3))}, rng.random(n), rng.random(n),
                  rng.integers(2, 9, n).astype(float), (0,))
    pre = LMStatePredictor(probe="ridge").fit(st, rng.integers(1, cap, n), max_new_tokens=cap)
    return StateProbe(pre, None, 0, [], {}, resid_q=resid_q)


def test_gittins_lmstate_index_by_hand_and_point_masses_give_srpt():
    """``gittins_lmstate``: the probe's residual quantiles turn a point prediction into the total length's
    quantiles (``rem_at + expm1(log1p(pred) + r)``, within ``[rem_at + 1, cap]``); the key is minus the Gittins
    index of that distribution at the job's attained service; with zero residuals (a point mass) it ranks as
    SRPT on the predicted remaining tokens; an unpredicted job ranks first."""
    from rtlm_lab.distmetrics import DEFAULT_LEVELS
    from rtlm_lab.errors import UserError
    from rtlm_lab.scheduler.engine import Job
    from rtlm_lab.scheduler.gittins import DiscreteSize

    r = [math.log(0.5), math.log(0.5), 0.0, 0.0, 0.0, math.log(3.0), math.log(3.0)]  # x0.5 / x1 / x3 in 1+n
    probe = _synthetic_probe({0: r, 8: [0.0] * 7})
    # prefill prediction 9 tokens: 1 + total = 10 x {0.5, 1, 3} -> totals {4, 9, 29}
    assert probe.quantiles(9.0, 0) == pytest.approx((4, 4, 9, 9, 9, 29, 29))
    # after a refinement at 8 tokens (zero residuals): a point mass at 8 + 5 = 13; the cap bounds it
    assert probe.quantiles(5.0, 8) == pytest.approx((13,) * 7)
    assert probe.quantiles(500.0, 8) == pytest.approx((64,) * 7)
    # before step 8 a refinement would use the prefill residuals (the largest step <= rem_at with residuals)
    assert probe.quantiles(9.0, 3)[0] == pytest.approx(3 + 4)

    pol = make_policy("gittins_lmstate", {})
    pol.attach_probe(probe)
    a, b, c = (Job(req=x) for x in reqs([("a", 0.0, 5), ("b", 0.0, 5), ("c", 1.0, 5)]))
    assert pol.key(c, 2.0) == -math.inf  # no prediction yet: prefill first
    a.rem_pred, a.rem_at, a.generated = 9.0, 0, 0
    # the index of the midpoint-rule distribution of those quantiles (support {4, 9, 29}; the index itself is
    # checked by hand in tests/test_gittins.py)
    d = DiscreteSize.from_quantiles(DEFAULT_LEVELS, (4, 4, 9, 9, 9, 29, 29))
    assert pol.key(a, 2.0) == pytest.approx(-d.index(0))
    a.generated = 5  # past the short outcome, 4 tokens from the likely one (9): the index rises
    assert pol.key(a, 2.0) == pytest.approx(-d.index(5)) and d.index(5) > d.index(0)
    # point masses (refinement residuals 0): SRPT on the predicted remaining tokens
    a.rem_pred, a.rem_at, a.generated = 6.0, 8, 9    # 8 + 6 = 14 total, 5 left
    b.rem_pred, b.rem_at, b.generated = 3.0, 8, 8    # 8 + 3 = 11 total, 3 left
    assert pol.key(a, 2.0) == pytest.approx(-1 / 5) and pol.key(b, 2.0) == pytest.approx(-1 / 3)
    assert pol.key(b, 2.0) < pol.key(a, 2.0) and pol.preemptive and pol.uses_lm_state
    with pytest.raises(UserError):
        make_policy("gittins_lmstate", {"overrun_mean": -1})


def test_gittins_lmstate_on_the_kv_engine_keeps_tokens_and_reads_the_probes_distribution(tiny_causal_dir,
                                                                                          ccc_sample):
    """The real kv engine with a probe fitted on a tiny LM: the probe carries held-out residual quantiles for
    its prefill and refinement probes, every request gets batch-1 ``generate``'s tokens under the policy's
    preemptions, and the policy ranks each job by the distribution the probe gives its latest prediction."""
    from rtlm_lab.scheduler.continuous import attach_state_probe
    from rtlm_lab.scheduler.engine.kv import KVBackend
    from rtlm_lab.scheduler.gittins import DiscreteSize

    lm, probe = _tiny_probe(tiny_causal_dir, ccc_sample, "ridge")
    assert 0 in probe.resid_q and len(probe.resid_q[0]) == len(probe.levels)
    assert list(probe.resid_q[0]) == sorted(probe.resid_q[0]) and probe.resid_q[0][0] < probe.resid_q[0][-1]
    assert probe.meta["resid_q"]

    texts, ref, rs = _probe_requests(lm, ccc_sample)
    pol = make_policy("gittins_lmstate", {"refine_every": 2})
    pol.token_s = 0.01
    pol.attach_probe(probe)
    backend = KVBackend(lm, max_seqs=3, max_batch_tokens=6, kv_slots=4)
    eng = Engine("cpu0", backend, pol, 3, 6)
    attach_state_probe([eng], probe)
    clock = StepClock()
    step_on(backend, clock)
    jobs, _ = serve(rs, pol, [eng], clock, PredictorServer(rs, (), clock))
    got = {j.rid: j for j in jobs}
    assert sorted(got) == sorted(ref)
    for k, g in ref.items():
        j = got[k]
        assert j.output_ids == list(g.output_ids), k
        assert math.isfinite(j.rem_pred), k
        q = probe.quantiles(j.rem_pred, j.rem_at)
        assert list(q) == sorted(q) and q[0] >= j.rem_at + 1 and q[-1] <= 16
        assert pol.dist(j).mean == pytest.approx(DiscreteSize.from_quantiles(probe.levels, q).mean)
    backend.close()
