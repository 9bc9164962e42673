"""Real LMs on the CPU: known answers, chat replies, batched = batch-1 token counts (CI runs these)."""

import pytest

from rtlm_lab.lm import load_lm
from rtlm_lab.lm.sanity import SANITY_PROMPTS, check_sanity, continuation

CHAT = ["hey! how was your weekend?", "do you like pizza?", "what do you think about the meaning of life?"]


@pytest.fixture(scope="module", params=["gemma3_270m", "smollm2_135m"])
def real_lm(request):
    return load_lm(request.param)


def test_known_answer(real_lm):
    prompt, expected = SANITY_PROMPTS[real_lm.name]
    assert "Paris" in continuation(real_lm, prompt)
    assert check_sanity(real_lm)["expected"] == expected


def test_chat_replies_end_at_turn(real_lm):
    gens = real_lm.generate(CHAT[:2])
    for g in gens:
        assert g.text and g.n_output_tokens >= 2
        assert "User:" not in g.text
    if real_lm.name == "gemma3_270m":
        assert all(g.stop_reason == "stop_string" and "\n" not in g.text for g in gens)


def test_batched_token_counts_match_batch1(real_lm):
    single = [real_lm.generate([p], max_new_tokens=48)[0].n_output_tokens for p in CHAT]
    batched = [g.n_output_tokens for g in real_lm.generate(CHAT, max_new_tokens=48)]
    assert batched == single
