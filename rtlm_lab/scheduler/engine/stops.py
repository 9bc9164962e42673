"""End-of-turn token ids from an LM's one-character stop strings."""

from __future__ import annotations

from rtlm_lab.errors import UserError


def stop_string_ids(chat_lm) -> set[int]:
    """Token ids whose text contains one of the LM's one-character stop strings (cached on the LM)."""
    cached = getattr(chat_lm, "_stop_ids", None)
    if cached is not None:
        return cached
    stops = [s for s in (chat_lm.spec.get("stop_strings") or []) if s]
    if any(len(s) != 1 for s in stops):
        raise UserError(f"{chat_lm.name}: the continuous engine supports one-character stop strings only "
                        f"(got {stops}); use scheduler.engine=static")
    ids: set[int] = set()
    if stops:
        tok = chat_lm.tokenizer
        vocab = tok.get_vocab()
        for tid in vocab.values():
            text = tok.decode([tid], skip_special_tokens=True)
            if any(s in text for s in stops):
                ids.add(int(tid))
    chat_lm._stop_ids = ids
    return ids


_SCHED_NAME = "rtlm_policy"
