"""Known-answer checks that a converted LM computes what it should on this platform.

A broken conversion or library version gives fluent-looking garbage (with transformers 5.17, the Gemma
GGUF answered " is is is ..."), so every cuda run checks these before profiling.
"""

from __future__ import annotations

import torch

from rtlm_lab.errors import UserError

# raw continuation (no chat frame), greedy: prompt -> substring the continuation must contain
SANITY_PROMPTS = {
    "gemma3_270m": ("Question: What is the capital of France?\nAnswer:", "Paris"),
    "smollm2_135m": ("The capital of France is", "Paris"),
}


@torch.inference_mode()
def continuation(lm, prompt: str, max_new_tokens: int = 8) -> str:
    enc = lm.tokenizer(prompt, return_tensors="pt").to(lm.device)
    out = lm.model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False,
                            pad_token_id=lm.tokenizer.pad_token_id, top_p=None, top_k=None, temperature=None)
    return lm.tokenizer.decode(out[0, enc["input_ids"].shape[1]:], skip_special_tokens=True)


def check_sanity(lm, platform_name: str = "") -> dict | None:
    """Run the LM's known-answer prompt; raise :class:`UserError` (one line) if the answer is wrong.

    Returns ``{"prompt", "expected", "got"}``, or ``None`` for LMs without a known answer (lab LMs).
    """
    if lm.name not in SANITY_PROMPTS:
        return None
    prompt, expected = SANITY_PROMPTS[lm.name]
    got = continuation(lm, prompt)
    if expected not in got:
        raise UserError(f"sanity check failed for {lm.name} on {platform_name or lm.device}: {prompt!r} "
                        f"continued as {got!r}, expected {expected!r}; check the pinned transformers/gguf versions")
    return {"prompt": prompt, "expected": expected, "got": got}
