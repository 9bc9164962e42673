"""Per-LM prompt formats: how a user turn (and optionally the previous turn) becomes model input.

* ``fewshot`` (Gemma-3-270M, a *base* model): a short conversational frame with two example exchanges,
  then ``User: <text>\\nFriend:``; the reply ends at the first newline (end of turn). Under a bare
  ``User:/Assistant:`` frame the base model echoes the user, hence the examples.
* ``chat_template`` (SmolLM2-135M-Instruct): the tokenizer's own chat template with a short system prompt;
  the reply ends at the model's end-of-turn token.
* ``lab_causal`` (DialoGPT-style GPT-2 trained here): ``<context><eos><text><eos>``; the reply ends at ``<eos>``.
* ``lab_seq2seq`` (BlenderBot-small / GODEL-style T5 trained here): encoder input ``<context> <sep> <text>``;
  the decoder reply ends at ``</s>``.
* ``plain`` (your own model, ``lm=custom``; the default for an encoder-decoder without a chat template): the
  turn as it is, the context (if any) on the line before; the tokenizer adds its own special tokens.
"""

from __future__ import annotations

from typing import Any, Mapping

FORMATS = ("fewshot", "chat_template", "lab_causal", "lab_seq2seq", "plain")

LAB_SEP = " <sep> "


def _clean(text: Any) -> str:
    """Any input becomes a single-line string (newlines would end the turn in line-based frames); lone
    surrogates (not encodable: the tokenizers reject them) become ``?``."""
    if text is None:
        return ""
    text = str(text).encode("utf-8", "replace").decode("utf-8", "replace")
    return " ".join(text.replace("\x00", " ").split())


def format_fewshot(text: str, context: str, spec: Mapping) -> str:
    lines = [spec.get("preamble", "").strip(), ""]
    for ex in spec.get("fewshot", []):
        lines.append(f"{spec['user_tag']}: {ex['user']}")
        lines.append(f"{spec['bot_tag']}: {ex['bot']}")
    if context:
        lines.append(f"{spec['bot_tag']}: {_clean(context)}")
    lines.append(f"{spec['user_tag']}: {_clean(text)}")
    lines.append(f"{spec['bot_tag']}:")
    return "\n".join(lines)


def format_chat_template(text: str, context: str, spec: Mapping, tokenizer) -> str:
    messages = []
    if spec.get("system_prompt"):
        messages.append({"role": "system", "content": spec["system_prompt"]})
    if context:
        messages.append({"role": "assistant", "content": _clean(context)})
    messages.append({"role": "user", "content": _clean(text)})
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def format_lab(text: str, context: str, tokenizer, seq2seq: bool) -> str:
    text, context = _clean(text), _clean(context)
    if seq2seq:
        return f"{context}{LAB_SEP}{text}" if context else text
    eos = tokenizer.eos_token
    return f"{context}{eos}{text}{eos}" if context else f"{text}{eos}"


def format_plain(text: str, context: str) -> str:
    text, context = _clean(text), _clean(context)
    return f"{context}\n{text}" if context else text


def format_prompt(text: str, context: str, spec: Mapping, tokenizer) -> str:
    """Render one request for the LM described by ``spec`` (its ``lm`` config)."""
    fmt = spec["chat_format"]
    if fmt == "fewshot":
        return format_fewshot(text, context, spec)
    if fmt == "chat_template":
        return format_chat_template(text, context, spec, tokenizer)
    if fmt == "lab_causal":
        return format_lab(text, context, tokenizer, seq2seq=False)
    if fmt == "lab_seq2seq":
        return format_lab(text, context, tokenizer, seq2seq=True)
    if fmt == "plain":
        return format_plain(text, context)
    raise ValueError(f"unknown chat_format {fmt!r}; choose one of {FORMATS}")
