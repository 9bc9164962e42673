"""Generation (greedy, or sampled per request: :mod:`rtlm_lab.lm.sampling`) that stops at the end of a turn and
times every request.

One :class:`ChatLM` wraps a transformers model + tokenizer + the LM's config. :meth:`ChatLM.generate`
runs one real ``model.generate`` call over a batch (left-padded for decoder-only models) and returns a
:class:`Generation` per request with:

* ``n_output_tokens``: decoding steps the reply needed, up to and including the token that ended the
  turn (end-of-sequence, or the token completing a stop string such as the newline of a line-based frame),
  or ``max_new_tokens`` when the cap was hit;
* ``stop_reason``: ``eos`` | ``stop_string`` | ``max_tokens``;
* ``ttft_s``: time to first token (prefill + first decoding step) and ``e2e_s``: time until the request's
  last token, both measured on the host clock around the real ``generate`` call (CUDA is synchronised).
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from typing import Any, Mapping, Sequence

import torch
from transformers import StoppingCriteria, StoppingCriteriaList

from rtlm_lab.lm.formatting import _clean, format_prompt


@dataclass
class Generation:
    """One request's reply and its measured cost."""

    text: str
    n_input_tokens: int
    n_output_tokens: int
    stop_reason: str
    ttft_s: float
    e2e_s: float
    batch_size: int = 1
    output_ids: list[int] = field(default_factory=list, repr=False)

    @property
    def ms_per_token(self) -> float:
        """Mean inter-token latency after the first token (ms); 0 for one-token replies."""
        if self.n_output_tokens <= 1:
            return 0.0
        return 1000.0 * (self.e2e_s - self.ttft_s) / (self.n_output_tokens - 1)

    def as_row(self) -> dict[str, Any]:
        row = asdict(self)
        row.pop("output_ids")
        row["ms_per_token"] = self.ms_per_token
        return row


class _TurnStopper(StoppingCriteria):
    """Per-row end-of-turn detection and timing, called by ``generate`` after every new token."""

    def __init__(self, tokenizer, stop_strings: Sequence[str], prompt_len: int, batch: int, sync,
                 eos_ids: Sequence[int] = ()):
        self.tok = tokenizer
        self.eos = set(eos_ids)
        self.t_eos: list[float | None] = [None] * batch
        self.stops = [s for s in stop_strings if s]
        self.prompt_len = prompt_len
        self.t_first: float | None = None
        self.t_done: list[float | None] = [None] * batch
        self.stop_hit = [False] * batch
        self.sync = sync

    def __call__(self, input_ids: torch.LongTensor, scores=None, **kwargs) -> torch.BoolTensor:
        self.sync()
        now = time.perf_counter()
        if self.t_first is None:
            self.t_first = now
        done = torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
        if self.eos and input_ids.shape[0] > 1 and input_ids.shape[1] > self.prompt_len:
            for i, t in enumerate(input_ids[:, -1].tolist()):  # when each row emitted its end-of-sequence
                if self.t_eos[i] is None and t in self.eos:
                    self.t_eos[i] = now
        if not self.stops:
            return done
        new = input_ids[:, self.prompt_len:].tolist()
        for i, ids in enumerate(new):
            if self.stop_hit[i]:
                done[i] = True
                continue
            tail = self.tok.decode(ids[-8:], skip_special_tokens=True)
            if any(s in tail for s in self.stops):
                self.stop_hit[i] = True
                self.t_done[i] = now
                done[i] = True
        return done


class ChatLM:
    """A loaded LM: formatting, greedy generation to the end of the turn, token counts and timings."""

    def __init__(self, model, tokenizer, spec: Mapping[str, Any], device: torch.device):
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.spec = dict(spec)
        self.device = device
        self.name = self.spec.get("name", "lm")
        self.is_encoder_decoder = bool(getattr(model.config, "is_encoder_decoder", False))
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
        tokenizer.padding_side = "right" if self.is_encoder_decoder else "left"
        tokenizer.truncation_side = "left"  # keep the end of the prompt: the turn and the reply cue
        self.eos_ids = self._eos_ids()

    def _eos_ids(self) -> list[int]:
        ids = set()
        for src in (self.model.generation_config.eos_token_id, self.tokenizer.eos_token_id):
            if isinstance(src, int):
                ids.add(src)
            elif src:
                ids.update(int(x) for x in src)
        for tok in self.spec.get("extra_eos_tokens", []) or []:
            tid = self.tokenizer.convert_tokens_to_ids(tok)
            if isinstance(tid, int) and tid != self.tokenizer.unk_token_id:
                ids.add(tid)
        return sorted(ids)

    # ------------------------------------------------------------------ formatting
    def prompt(self, text: Any, context: Any = "") -> str:
        return format_prompt(_clean(text), _clean(context), self.spec, self.tokenizer)

    def max_input_tokens(self, max_new_tokens: int) -> int:
        """Prompt budget: the LM's ``max_input_tokens``, leaving room for the reply in the positions."""
        limit = int(self.spec.get("max_input_tokens", 1024))
        cfg = self.model.config
        n_pos = getattr(cfg, "max_position_embeddings", None) or getattr(cfg, "n_positions", None)
        if n_pos and not self.is_encoder_decoder:
            limit = min(limit, int(n_pos) - max_new_tokens)
        return max(8, limit)

    def encode(self, texts: Sequence[Any], contexts: Sequence[Any] | None = None, max_new_tokens: int = 64):
        contexts = contexts if contexts is not None else [""] * len(texts)
        prompts = [self.prompt(t, c) for t, c in zip(texts, contexts)]
        if self.is_encoder_decoder:  # an empty encoder input is degenerate: give it one end-of-text token
            prompts = [p if p.strip() else (self.tokenizer.eos_token or " ") for p in prompts]
        add_special = self.spec["chat_format"] in ("fewshot", "plain") or self.is_encoder_decoder
        max_len = self.max_input_tokens(max_new_tokens)
        enc = self.tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=add_special,
                             truncation=True, max_length=max_len)
        return enc

    def _sync(self) -> None:
        if self.device.type == "cuda":
            stream = torch.cuda.current_stream(self.device)
            if stream == torch.cuda.default_stream(self.device):
                torch.cuda.synchronize(self.device)
            else:  # an engine thread's own stream (serve(threaded=True)): this engine's kernels, not a replica's
                stream.synchronize()

    # ------------------------------------------------------------------ generation
    @torch.inference_mode()
    def generate(self, texts: Sequence[Any], contexts: Sequence[Any] | None = None,
                 max_new_tokens: int | None = None, seeds: Sequence[int] | None = None) -> list[Generation]:
        """Replies for a batch of user turns (one real ``generate`` call): greedy, or sampled when the LM's
        ``sampling.temperature`` > 0, each row with its own seed (``seeds``; default: from the text,
        :func:`rtlm_lab.lm.sampling.request_seed`), as :mod:`rtlm_lab.lm.sampling` describes."""
        from transformers import LogitsProcessorList

        from rtlm_lab.lm.sampling import SeededSampler, request_seed, sampling_params

        max_new = int(max_new_tokens or self.spec.get("max_new_tokens", 64))
        enc = self.encode(texts, contexts, max_new).to(self.device)
        batch = enc["input_ids"].shape[0]
        prompt_len = 0 if self.is_encoder_decoder else enc["input_ids"].shape[1]
        # where the reply starts in the output ids: encoder-decoder outputs start with the decoder start token
        start = prompt_len + (1 if self.is_encoder_decoder else 0)
        temperature, top_p, base = sampling_params(self.spec)
        procs = None
        if temperature > 0:
            if seeds is None:
                seeds = [request_seed(str(t), 0, base) for t in texts]
            procs = LogitsProcessorList([SeededSampler(seeds, start, temperature, top_p)])
        stopper = _TurnStopper(self.tokenizer, self.spec.get("stop_strings", []) or [], start, batch, self._sync,
                               self.eos_ids)
        self._sync()
        t0 = time.perf_counter()
        out = self.model.generate(
            **enc, max_new_tokens=max_new, do_sample=False, num_beams=1,
            eos_token_id=self.eos_ids or None, pad_token_id=self.tokenizer.pad_token_id,
            stopping_criteria=StoppingCriteriaList([stopper]), return_dict_in_generate=False,
            top_p=None, top_k=None, temperature=None, logits_processor=procs,
        )
        self._sync()
        t_end = time.perf_counter()
        results = []
        n_in = enc["attention_mask"].sum(dim=1).tolist()
        stops = self.spec.get("stop_strings", []) or []
        for i in range(batch):
            ids = out[i, start:].tolist()
            n, reason = self._turn_length(ids, stops)
            reply_ids = ids[:n]
            text = self.tokenizer.decode(reply_ids, skip_special_tokens=True)
            for s in stops:
                if s and s in text:
                    text = text[: text.index(s)]
            t_first = stopper.t_first if stopper.t_first is not None else t_end
            # when this row's last token came out: its stop string, its EOS, else the end of the call
            t_done = t_end
            if reason == "stop_string" and stopper.t_done[i]:
                t_done = stopper.t_done[i]
            elif reason == "eos" and stopper.t_eos[i]:
                t_done = stopper.t_eos[i]
            results.append(Generation(
                text=text.strip(), n_input_tokens=int(n_in[i]), n_output_tokens=n, stop_reason=reason,
                ttft_s=t_first - t0, e2e_s=max(t_done, t_first) - t0, batch_size=batch, output_ids=reply_ids,
            ))
        return results

    def _turn_length(self, ids: list[int], stops: Sequence[str]) -> tuple[int, str]:
        """Tokens the turn took (inclusive of its terminator) and why it ended."""
        pad = self.tokenizer.pad_token_id
        eos = set(self.eos_ids)
        end = len(ids)
        for k, t in enumerate(ids):
            if t in eos:
                return self._first_stop(ids[:k], stops) or (k + 1, "eos")
        # strip right padding (rows that finished early inside a batch are padded with pad_token_id)
        while end > 0 and ids[end - 1] == pad and pad not in eos:
            end -= 1
        hit = self._first_stop(ids[:end], stops)
        if hit:
            return hit
        return end, "max_tokens" if end >= 1 else "eos"

    def _first_stop(self, ids: list[int], stops: Sequence[str]) -> tuple[int, str] | None:
        if not stops:
            return None
        full = self.tokenizer.decode(ids, skip_special_tokens=True)
        if not any(s in full for s in stops if s):
            return None
        lo, hi = 1, len(ids)  # smallest prefix whose text contains a stop string
        while lo < hi:
            mid = (lo + hi) // 2
            if any(s in self.tokenizer.decode(ids[:mid], skip_special_tokens=True) for s in stops if s):
                hi = mid
            else:
                lo = mid + 1
        return lo, "stop_string"
