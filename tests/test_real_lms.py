"""Real LMs on the CPU: known answers, chat replies, batched = batch-1 token counts.

Marked ``slow`` (``make test-full``): each loads real Gemma-3-270M / SmolLM2-135M weights and decodes up to
192 tokens a reply on the CPU. The fast suite covers the same code paths with tiny random-initialised LMs.
"""

import pytest

from rtlm_lab.lm import load_lm
from rtlm_lab.lm.sanity import SANITY_PROMPTS, check_sanity, continuation

pytestmark = pytest.mark.slow

# How each LM's reply ends (conf/lm/): Gemma's few-shot frame at the end of the line (its stop string),
# SmolLM2's chat template at <|im_end|> (an extra EOS token) or at the token cap; neither mark stays in the text.
STOP_REASONS = {"gemma3_270m": {"stop_string"}, "smollm2_135m": {"eos", "max_tokens"}}
END_MARK = {"gemma3_270m": "\n", "smollm2_135m": "<|im_end|>"}

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
        assert g.stop_reason in STOP_REASONS[real_lm.name], g.stop_reason
        assert END_MARK[real_lm.name] not in g.text


def test_batched_token_counts_match_batch1(real_lm):
    single = [real_lm.generate([p], max_new_tokens=48)[0].n_output_tokens for p in CHAT]
    batched = [g.n_output_tokens for g in real_lm.generate(CHAT, max_new_tokens=48)]
    assert batched == single
