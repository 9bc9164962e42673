"""Sampled decoding, seeded per request (rtlm_lab/lm/sampling.py): the draw rule, its place in ``generate`` and in
the kv engine (the same tokens as batch-1 ``generate`` with the same seeds, through chunked prefill, joins and
SRPT's pauses), on tiny random-initialised models on the CPU in fp32."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from rtlm_lab.errors import UserError
from rtlm_lab.lm.sampling import request_seed, sample, sampling_params, uniform
from test_kvengine import tiny_dirs  # noqa: F401  (the tiny Llama, a module fixture)


def test_uniform_is_a_stable_hash_in_the_open_unit_interval():
    seed = torch.arange(2000, dtype=torch.long) * 7919
    step = torch.arange(2000, dtype=torch.long) % 50
    u = uniform(seed, step)
    assert ((u > 0) & (u < 1)).all()
    assert torch.equal(u, uniform(seed.clone(), step.clone()))        # a function of (seed, step)
    assert abs(float(u.mean()) - 0.5) < 0.02 and abs(float(u.var()) - 1 / 12) < 0.01
    assert uniform(torch.tensor([5]), torch.tensor([0])) != uniform(torch.tensor([5]), torch.tensor([1]))
    assert request_seed("a", 0) == request_seed("a", 0) != request_seed("a", 1)
    assert 0 <= request_seed("x" * 100, 7, 3) < 2 ** 31


def test_sample_follows_the_tempered_distribution_and_the_nucleus():
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0]]).repeat(4000, 1)
    seed = torch.arange(4000, dtype=torch.long)
    step = torch.zeros(4000, dtype=torch.long)
    for T in (1.0, 0.5):
        got = np.bincount(sample(logits, seed, step, T).numpy(), minlength=4) / 4000
        want = torch.softmax(logits[0] / T, -1).numpy()
        assert np.abs(got - want).max() < 0.03, (T, got, want)
    # top_p 0.7 at T=1: probabilities 0.64, 0.24, ... -> the nucleus is the first two tokens, renormalised
    got = np.bincount(sample(logits, seed, step, 1.0, top_p=0.7).numpy(), minlength=4) / 4000
    assert got[2] == got[3] == 0 and abs(got[0] - 0.64 / 0.88) < 0.03
    # a tiny nucleus is greedy; rows do not depend on their neighbours
    assert (sample(logits[:50], seed[:50], step[:50], 1.0, top_p=1e-6) == 0).all()
    mixed = torch.randn(9, 4)
    one = torch.cat([sample(mixed[i:i + 1], seed[i:i + 1], step[i:i + 1], 0.8) for i in range(9)])
    assert torch.equal(one, sample(mixed, seed[:9], step[:9], 0.8))


def test_sampling_config_is_checked():
    assert sampling_params({}) == (0.0, 1.0, 0)
    assert sampling_params({"sampling": None}) == (0.0, 1.0, 0)
    assert sampling_params({"sampling": {"temperature": 0.7, "top_p": 0.9, "seed": 3}}) == (0.7, 0.9, 3)
    for bad in ({"temperature": -1}, {"top_p": 0}, {"temperature": "hot"}):
        with pytest.raises(UserError):
            sampling_params({"sampling": bad})


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_kv_engine_samples_what_generate_samples_with_the_same_seeds(arch, tiny_dirs):
    """Each request's sampled tokens on the kv engine (chunked prefill beside decoding rows, SRPT's pauses, an
    eviction's recompute) equal batch-1 ``generate`` with its seed; seeds change the samples."""
    from test_kvengine import _lm, _serve

    from rtlm_lab.scheduler.policies import Request

    spec = {"temperature": 1.5, "top_p": 0.95, "seed": 11}
    lm = _lm(tiny_dirs[arch], stop_strings=["e"], max_new_tokens=16, sampling=spec)
    texts = [f"hello number {i} how are you doing" + " today" * (i % 3) for i in range(7)]
    rids = [f"q{i}" for i in range(7)]
    ref = {k: lm.generate([t], seeds=[request_seed(k, 0, 11)])[0] for k, t in zip(rids, texts)}
    other = [lm.generate([t], seeds=[request_seed(k, 1, 11)])[0].output_ids for k, t in zip(rids, texts)]
    assert sum(list(ref[k].output_ids) != o for k, o in zip(rids, other)) >= 3  # the seed matters
    order = sorted(rids, key=lambda k: -ref[k].n_output_tokens)
    rs = [Request(request_id=k, text=texts[int(k[1:])], context="", arrival_s=1.0 * i, n_input_tokens=5,
                  true_tokens=ref[k].n_output_tokens) for i, k in enumerate(order)]
    for policy in ("fcfs", "oracle_srpt"):
        got, facts, backend = _serve(lm, rs, policy, max_seqs=3, max_batch_tokens=8, kv_slots=4)
        assert backend.facts()["sampling"] == {"temperature": 1.5, "top_p": 0.95, "seed": 11}
        for k in rids:
            assert got[k].output_ids == list(ref[k].output_ids), (policy, k)


def test_spread_profile_kv_engine_and_generate_draw_the_same_lengths(tiny_dirs, tmp_path):
    """rtlm-spread's two decoders give every prompt the same K sampled lengths (the same seeds), sample 0 is
    ``n_output_tokens``, the summary columns follow from the samples, and a rerun resumes from the parts."""
    import pandas as pd

    from test_kvengine import _lm

    from rtlm_lab.scheduler.spread import run_spread

    spec = {"temperature": 1.2, "top_p": 0.95, "seed": 5}
    lm = _lm(tiny_dirs["gpt2"], stop_strings=["e"], max_new_tokens=12, sampling=spec)
    data = {"name": "prompts", "path": "tests/data/my_prompts.jsonl", "n_prompts": 6, "sample_seed": 0,
            "with_context": False, "max_chars": None, "split": "prompts"}
    out = {}
    for engine in ("kv", "generate"):
        cfg = {"lm": lm.spec, "platform": {"name": "cpu", "device": "cpu", "engine": {"max_batch_tokens": 64}},
               "data": data, "spread": {"samples": 3, "engine": engine, "batch_size": 4, "chunk": 4}}
        s = run_spread(cfg, tmp_path / engine, lm=lm)
        assert s["n_prompts"] == 6 and s["samples"] == 3
        out[engine] = pd.read_parquet(tmp_path / engine / "spread.parquet")
    a, b = out["kv"], out["generate"]
    assert a["request_id"].tolist() == b["request_id"].tolist()
    assert [list(x) for x in a["lengths"]] == [list(x) for x in b["lengths"]]
    assert (a["n_output_tokens"] == [x[0] for x in a["lengths"]]).all()
    assert a["len_mean"].tolist() == pytest.approx([float(np.mean(x)) for x in a["lengths"]])
    assert any(len(set(x)) > 1 for x in a["lengths"])  # the samples differ: a spread to measure
    assert len(list((tmp_path / "kv" / "parts").glob("part-*.parquet"))) == 2
    again = run_spread(cfg, tmp_path / "generate", lm=None)  # everything done: no LM is even loaded
    assert again["n_prompts"] == 6


def test_the_cpu_nucleus_shortcut_draws_what_a_full_sort_draws(monkeypatch):
    """On the CPU the nucleus comes from the top 128 tokens where they hold top_p of the mass (a full sort per
    row cost more than the LM step); flat rows need more and get the full sort: the draws are the same."""
    import rtlm_lab.lm.sampling as S

    torch.manual_seed(0)
    logits = torch.randn(300, 5000) * 3
    logits[:5] = 0.0  # flat rows: a nucleus of 4,500 tokens
    seed, step = torch.arange(300), torch.zeros(300, dtype=torch.long)
    fast = sample(logits, seed, step, 0.7, 0.9)
    monkeypatch.setattr(S, "_sorted_head", lambda p, top_p, k=128: torch.sort(p, dim=-1, descending=True))
    assert torch.equal(fast, sample(logits, seed, step, 0.7, 0.9))
