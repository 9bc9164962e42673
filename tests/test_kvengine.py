"""The serving core (``backend=kv``): per-slot KV, mixed prefill+decode steps, chunked prefill, pauses,
evictions with recompute, pinned lengths, and the simulator planning the same steps as the real engine.

Tiny random-initialised models of the three decoder architectures we serve (GPT-2 = DialoGPT-ccc, Llama =
SmolLM2, Gemma-3 with a sliding window shorter than the replies), against plain batch-1 ``generate`` on the CPU
in fp32."""

from __future__ import annotations

import pytest

from conftest import _tiny_tokenizer, tiny_spec
from rtlm_lab.scheduler.engine import Engine, PredictorServer, SimBackend, StepModel, VirtualClock, serve
from rtlm_lab.scheduler.engine.kv import KVBackend
from rtlm_lab.scheduler.engine.planner import SlotTable, plan_engine_step
from rtlm_lab.scheduler.policies import Request, make_policy
from test_engine import StepClock, step_on


@pytest.fixture(scope="module")
def tiny_dirs(tmp_path_factory, tiny_causal_dir, ccc_sample):
    """``{"gpt2": dir, "llama": dir, "gemma3": dir}``: random-initialised, saved with ``save_pretrained``."""
    import torch
    from transformers import Gemma3TextConfig, Gemma3ForCausalLM, LlamaConfig, LlamaForCausalLM

    tok = _tiny_tokenizer(ccc_sample)
    out = {"gpt2": tiny_causal_dir}
    common = dict(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                  bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    for name, cfg, cls in (
            ("llama", LlamaConfig(**common), LlamaForCausalLM),
            # sliding window 6 < prompt + reply: the windowed layers must mask by each row's own position
            ("gemma3", Gemma3TextConfig(**common, head_dim=16, sliding_window=6,
                                        layer_types=["sliding_attention", "full_attention"]), Gemma3ForCausalLM)):
        torch.manual_seed(0)
        d = tmp_path_factory.mktemp(f"tiny_{name}")
        cls(cfg).save_pretrained(d)
        tok.save_pretrained(d)
        out[name] = d
    return out


def _lm(d, **kw):
    from rtlm_lab.lm import load_lm

    # stop strings on frequent letters: varied reply lengths from random weights
    kw = {"stop_strings": ["e"], "max_new_tokens": 16, **kw}
    return load_lm(tiny_spec(d, **kw))


def _requests(lm, n=7, gap=1.0):
    texts = [f"hello number {i} how are you doing" + " today" * (i % 3) for i in range(n)]
    ref = {f"q{i}": lm.generate([t])[0] for i, t in enumerate(texts)}
    order = sorted(ref, key=lambda k: -ref[k].n_output_tokens)  # longest first: SRPT pauses them
    rs = [Request(request_id=k, text=texts[int(k[1:])], context="", arrival_s=gap * i, n_input_tokens=5,
                  true_tokens=ref[k].n_output_tokens) for i, k in enumerate(order)]
    return ref, rs


def _serve(lm, rs, policy, max_seqs=3, max_batch_tokens=256, **kw):
    for r in rs:
        r.pred = {}
    pol = make_policy(policy)
    backend = KVBackend(lm, max_seqs=max_seqs, max_batch_tokens=max_batch_tokens, **kw)
    eng = Engine("cpu0", backend, pol, max_seqs, max_batch_tokens)
    clock = StepClock()
    step_on(backend, clock)
    jobs, facts = serve(rs, pol, [eng], clock, PredictorServer(rs, (), clock))
    backend.close()
    return {j.rid: j for j in jobs}, facts, backend


@pytest.mark.parametrize("arch", ["gpt2", "llama", "gemma3"])
def test_kv_engine_tokens_equal_generate_through_joins_leaves_and_pauses(arch, tiny_dirs):
    """Pinned lengths of 3..15 tokens (random weights rarely end a turn early), requests arriving one a step:
    every request's tokens are batch-1 greedy ``generate``'s, under FCFS and under SRPT's pauses."""
    lm = _lm(tiny_dirs[arch], stop_strings=[], max_new_tokens=16)
    ref, rs = _requests(lm)
    want = {r.request_id: 15 - 2 * i for i, r in enumerate(rs)}  # longest first: SRPT pauses them
    for r in rs:
        r.true_tokens = want[r.request_id]
    compared = 0
    for policy in ("fcfs", "oracle_srpt"):
        got, facts, be = _serve(lm, rs, policy, pin_lengths=True, kv_slots=len(rs))
        pol = make_policy(policy)
        assert (sum(j.steps_paused for j in got.values()) > 0) == pol.preemptive, policy
        assert sorted(got) == sorted(ref)
        for k, g in ref.items():
            n = min(want[k], len(g.output_ids))  # generate stops at EOS; a pinned request decodes past it
            assert got[k].output_ids[:n] == list(g.output_ids)[:n], (arch, policy, k)
            compared += n
            assert got[k].generated == want[k] and got[k].stop_reason == "pinned"
        assert facts["steps"]["cpu0"]["n_seqs"].max() <= 3
        assert be.slots.n_evicted == 0  # a slot for every request: pauses keep their KV in place
        # rows moved to the lowest slots (SRPT's below its paused rows: two rows' KV swapped) keep their tokens
        assert be.slots.n_moves > 0, policy
    assert compared >= sum(want.values())  # most tokens were compared (generate ran past EOS rarely)


def test_kv_engine_stops_at_the_end_of_turn_as_generate_does(tiny_dirs):
    """Unpinned: a reply ends at the LM's end of turn (a stop-string token) with generate's stop reason."""
    lm = _lm(tiny_dirs["gpt2"], stop_strings=["e"])
    ref, rs = _requests(lm)
    lens = [g.n_output_tokens for g in ref.values()]
    assert max(lens) > min(lens) + 2
    got, _, _ = _serve(lm, rs, "oracle_srpt")
    for k, g in ref.items():
        assert got[k].output_ids == list(g.output_ids), k
        assert got[k].stop_reason == g.stop_reason, k


@pytest.mark.parametrize("arch", ["gpt2", "gemma3"])
def test_evicted_rows_recompute_and_keep_their_tokens(arch, tiny_dirs):
    """With no spare slot, a pause evicts (KV dropped) and the resume re-prefills prompt + generated tokens:
    tokens still equal batch-1 generate."""
    lm = _lm(tiny_dirs[arch], stop_strings=[], max_new_tokens=12)
    ref, rs = _requests(lm)
    for i, r in enumerate(rs):
        r.true_tokens = max(1, 12 - 2 * i)  # later arrivals shorter: SRPT pauses, and a pause must evict
    got, _, be = _serve(lm, rs, "oracle_srpt", max_seqs=2, kv_slots=2, pin_lengths=True)
    assert be.slots.n_evicted > 0
    assert sum(j.evictions for j in got.values()) == be.slots.n_evicted
    for k, g in ref.items():
        n = min(got[k].generated, len(g.output_ids))
        assert got[k].output_ids[:n] == list(g.output_ids)[:n], (arch, k)


def test_chunked_prefill_splits_long_prompts_and_mixes_with_decode(tiny_dirs):
    """A token budget smaller than a prompt: the prompt is prefilled over several steps, each beside the
    running rows' decode (one forward), and the tokens are unchanged."""
    lm = _lm(tiny_dirs["llama"], stop_strings=[], max_new_tokens=10)
    ref, rs = _requests(lm)
    for i, r in enumerate(rs):
        r.true_tokens = 10 - i
    n_prompt = max(len(lm.encode([r.text])["input_ids"][0]) for r in rs)
    got, facts, be = _serve(lm, rs, "fcfs", max_batch_tokens=8, pin_lengths=True)
    assert n_prompt > 8
    steps = facts["steps"]["cpu0"]
    assert steps["n_tokens"].max() <= 8
    # steps that carried a prompt chunk and decoding rows together
    assert ((steps["n_tokens"] > steps["n_seqs"]) & (steps["n_seqs"] > 1)).any()
    for k, g in ref.items():
        n = min(got[k].generated, len(g.output_ids))
        assert got[k].output_ids[:n] == list(g.output_ids)[:n], k


def test_pinned_lengths_decode_exactly_the_profiled_length(tiny_dirs):
    lm = _lm(tiny_dirs["gpt2"], max_new_tokens=20)
    ref, rs = _requests(lm)
    want = {r.request_id: (3 + 2 * i) for i, r in enumerate(rs)}  # not the EOS lengths
    for r in rs:
        r.true_tokens = want[r.request_id]
    got, _, _ = _serve(lm, rs, "fcfs", pin_lengths=True)
    for k, j in got.items():
        assert j.generated == want[k] and len(j.output_ids) == want[k]
        assert j.stop_reason == "pinned"
        n = min(want[k], len(ref[k].output_ids))
        assert j.output_ids[:n] == list(ref[k].output_ids)[:n]  # the same greedy prefix


def test_sim_and_engine_plan_the_same_steps(tiny_dirs):
    """The simulator (a step model) and the real kv engine, on the same trace with pinned lengths and a clock
    moved one unit per step, run the same steps: rows, tokens and admissions step by step."""
    lm = _lm(tiny_dirs["llama"])
    _, rs = _requests(lm, n=8, gap=1.0)
    for r in rs:
        r.n_input_tokens = len(lm.encode([r.text])["input_ids"][0])
    for policy in ("fcfs", "oracle_srpt"):
        real, rf, _ = _serve(lm, rs, policy, max_seqs=3, max_batch_tokens=12, kv_slots=4, pin_lengths=True)
        for r in rs:
            r.pred = {}
        pol = make_policy(policy)
        clock = VirtualClock()
        eng = Engine("cpu0", SimBackend(StepModel(a=1.0), kv_slots=4), pol, 3, 12)
        sim_jobs, sf = serve(rs, pol, [eng], clock, PredictorServer(rs, (), clock))
        a = rf["steps"]["cpu0"][["n_seqs", "n_tokens", "n_admit"]].reset_index(drop=True)
        b = sf["steps"]["cpu0"][["n_seqs", "n_tokens", "n_admit"]].reset_index(drop=True)
        assert a.equals(b), policy
        sim = {j.rid: j for j in sim_jobs}
        for k, j in real.items():
            assert (j.finish_s, j.evictions) == (sim[k].finish_s, sim[k].evictions), (policy, k)


def test_slot_table_evicts_the_last_ranked_paused_request():
    from rtlm_lab.scheduler.engine.jobs import Job

    class Eng:
        max_seqs, max_batch_tokens = 2, 100
        policy = make_policy("oracle_srpt")

    def job(rid, tokens, gen, slot=None):
        r = Request(request_id=rid, text="", context="", arrival_s=0.0, n_input_tokens=4, true_tokens=tokens)
        return Job(req=r, generated=gen, n_prompt=4, running=slot is not None, admit_s=0.0 if slot is not None
                   else float("nan"), slot=slot, prefill_left=0 if slot is not None else 4)

    e = Eng()
    slots = SlotTable(2)
    a, b = job("a", 10, 2), job("b", 20, 3)
    slots.take(a), slots.take(b)
    c = job("c", 1, 0)
    e.running, e.waiting = [a, b], [c]
    plan, evicted = plan_engine_step(e, 0.0, slots)
    assert [j.rid for j, _ in plan] == ["c", "a"]
    assert evicted == [b] and b.slot is None and b.prefill_left == 4 + 3 and b.evictions == 1
    assert c.slot == 1


def test_compact_moves_decoding_rows_into_the_lowest_slots():
    """Decoding rows in slots >= T (their number rounded up to a power of two) trade places with the lowest
    slot below T that no decoding row holds: a free slot (the table's free list follows) or a paused row's."""
    from rtlm_lab.scheduler.engine.jobs import Job

    def job(rid):
        r = Request(request_id=rid, text="", context="", arrival_s=0.0, n_input_tokens=4, true_tokens=5)
        return Job(req=r, n_prompt=4)

    slots = SlotTable(8)
    jobs = [job(f"j{i}") for i in range(6)]
    for j in jobs:
        slots.take(j)                                  # slots 0..5
    p0, p1, d2, _, d4, d5 = jobs
    slots.release(jobs[3])                             # slot 3 free
    # decoding: j2, j4, j5 (T = 4); paused: j0, j1. j4 -> slot 0 (j0's), j5 -> slot 1 (j1's)
    moves = slots.compact([d2, d4, d5])
    assert moves == [(4, 0), (5, 1)]
    assert (d4.slot, d5.slot, d2.slot, p0.slot, p1.slot) == (0, 1, 2, 4, 5)
    assert {s: j.rid for s, j in slots.holder.items()} == {0: "j4", 1: "j5", 2: "j2", 4: "j0", 5: "j1"}
    assert sorted(slots.free) == [3, 6, 7]
    assert slots.compact([d2, d4, d5]) == []          # already low: nothing moves
    # one decoding row high with a free slot below T: it moves there, its old slot is freed
    slots.release(d4), slots.release(d5)               # slots 0, 1 free
    moves = slots.compact([p1])                        # j0/j1 resume alone: T = 1
    assert moves == [(5, 0)] and p1.slot == 0 and 5 in slots.free and 0 not in slots.free
    assert slots.n_moves == 3
