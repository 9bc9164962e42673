"""LM interface on tiny random-initialised models: loading, formatting, stop detection, batching."""

import pytest
import torch

from conftest import tiny_spec
from rtlm_lab.errors import UserError
from rtlm_lab.lm import KNOWN_LMS, load_lm, lm_config
from rtlm_lab.lm.formatting import format_prompt

PROMPTS = ["hey how are you?", "what did you do this weekend and why?", "lol", "",
           "tell me about your favourite food, and maybe a recipe", "🙂🙂", "¿Dónde está la biblioteca?"]


def test_five_lms_are_configured():
    assert set(KNOWN_LMS) == {"gemma3_270m", "smollm2_135m", "dialogpt_ccc", "blenderbot_ccc", "godel_ccc"}
    for name in KNOWN_LMS:
        spec = lm_config(name)
        assert spec["name"] == name and spec["hub_id"] and spec["max_new_tokens"] > 0
    with pytest.raises(UserError, match="unknown lm"):
        lm_config("nope")


def test_hub_id_loads_a_save_pretrained_directory(tiny_causal_dir):
    lm = load_lm(tiny_spec(tiny_causal_dir))
    assert lm.tokenizer.padding_side == "left" and not lm.is_encoder_decoder
    gens = lm.generate(PROMPTS[:2])
    assert len(gens) == 2
    for g in gens:
        assert 1 <= g.n_output_tokens <= 24
        assert g.stop_reason in {"eos", "stop_string", "max_tokens"}
        assert 0 < g.ttft_s <= g.e2e_s
        assert "e" not in g.text  # the reply is cut before its stop string


def test_local_dir_overrides_source(tiny_causal_dir):
    spec = tiny_spec(tiny_causal_dir, source="gguf", hub_id=None, local_dir=str(tiny_causal_dir))
    assert load_lm(spec).generate(["hi"])[0].n_output_tokens >= 1


@pytest.mark.parametrize("arch", ["causal", "seq2seq"])
def test_batched_greedy_gives_batch1_token_counts(arch, tiny_causal_dir, tiny_seq2seq_dir):
    """Batched generation may only supply output lengths because it matches batch 1 exactly."""
    d = tiny_causal_dir if arch == "causal" else tiny_seq2seq_dir
    lm = load_lm(tiny_spec(d, arch=arch))
    single = [lm.generate([p])[0] for p in PROMPTS]
    batched = lm.generate(PROMPTS)
    assert [g.n_output_tokens for g in batched] == [g.n_output_tokens for g in single]
    assert [g.output_ids for g in batched] == [g.output_ids for g in single]
    assert len({g.n_output_tokens for g in single}) > 1, "stop strings should give varied lengths"


def test_formats_are_single_turn_and_keep_context(tiny_causal_dir):
    gemma = lm_config("gemma3_270m")
    p = format_prompt("line one\nline two", "earlier turn", gemma, tokenizer=None)
    assert p.endswith("User: line one line two\nFriend:")
    assert "Friend: earlier turn\nUser:" in p
    lm = load_lm(tiny_spec(tiny_causal_dir))
    assert lm.prompt("hi", "yo") == "yo</s>hi</s>"


def test_cuda_platform_without_gpu_is_one_clear_error(tiny_causal_dir):
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    with pytest.raises(UserError, match="needs a CUDA GPU"):
        load_lm(tiny_spec(tiny_causal_dir), {"name": "cuda", "device": "cuda:0", "dtype": "float32"})


def test_unknown_dtype_and_source_are_user_errors(tiny_causal_dir):
    with pytest.raises(UserError):
        load_lm(tiny_spec(tiny_causal_dir), {"name": "cpu", "device": "cpu", "dtype": "float7"})
    with pytest.raises(UserError):
        load_lm(tiny_spec(tiny_causal_dir, source="ftp", hub_id=None))
