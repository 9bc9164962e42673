"""Train the three lab LMs (DialoGPT-style GPT-2, BlenderBot-small, GODEL-style T5) on the CCC train split.

One call, :func:`train_lab_lm`, takes the composed ``train_lm`` config (``lm``, ``preset``, ``platform``,
``data``, ``seed``, ``force``) and writes ``data/models/lab/<lm.name>-<preset.name>/``:

1. a byte-level BPE tokenizer trained on CCC train turns (``<pad> <s> </s> <unk> <sep>``), saved as a
   ``PreTrainedTokenizerFast`` (seq2seq tokenizers append ``</s>`` to encoder inputs, like T5/BART);
2. a randomly initialised model built from the preset's per-architecture block, trained with AdamW and a
   warmup + decay schedule on (request, previous turn) -> reply pairs, in the exact prompt format that
   :mod:`rtlm_lab.lm.formatting` renders at inference (loss on the reply tokens only);
3. ``train_config.json`` (resolved config + provenance), ``metrics.json`` (loss curve, validation loss and
   perplexity, greedy sample replies) and ``rtlm_manifest.json`` (sha256 of every file).

The directory is written as ``<dir>.partial`` and renamed at the end, so an interrupted run never leaves
a half-written model behind; a directory with a valid manifest is reused unless ``force=true``.
Everything that shapes the result (sizes, steps, learning rate, lengths) lives in ``conf/preset/*.yaml``.
"""

from __future__ import annotations

import json
import logging
import math
import random
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf

from rtlm_lab.data.ccc import SplitSpec, load_turns
from rtlm_lab.errors import UserError
from rtlm_lab.io import copy_file_atomic, provenance, write_json_atomic
from rtlm_lab.lm.formatting import _clean, format_lab
from rtlm_lab.lm.generation import ChatLM
from rtlm_lab.lm.loader import MANIFEST, _manifest_ok, resolve_device, write_manifest
from rtlm_lab.paths import models_dir

log = logging.getLogger(__name__)

LAB_LMS = ("dialogpt_ccc", "blenderbot_ccc", "godel_ccc")
SPECIAL_TOKENS = ("<pad>", "<s>", "</s>", "<unk>", "<sep>")
IGNORE_INDEX = -100
VERY_LARGE = int(1e9)


# ---------------------------------------------------------------------------------------------- config
def _plain_config(cfg: DictConfig | Mapping[str, Any]) -> dict[str, Any]:
    """The config as a resolved plain dict; ``paths`` entries that need a running Hydra app become null.

    ``conf/paths/default.yaml`` refers to ``${hydra:runtime...}``, which only resolves inside
    ``@hydra.main``; tests compose the config without it.
    """
    if not isinstance(cfg, DictConfig):
        cfg = OmegaConf.create(dict(cfg))
    cfg = cfg.copy()
    if "paths" in cfg and cfg.paths is not None:
        for key in list(cfg.paths.keys()):
            try:
                cfg.paths[key] = cfg.paths[key]  # resolves the interpolation (or raises)
            except Exception:  # noqa: BLE001 - unresolvable outside a Hydra run
                cfg.paths[key] = None
    return OmegaConf.to_container(cfg, resolve=True)


def output_dir_for(lm_name: str, preset_name: str) -> Path:
    """``data/models/lab/<lm>-<preset>/``, where :func:`rtlm_lab.lm.loader.lab_model_dir` looks."""
    return models_dir() / "lab" / f"{lm_name}-{preset_name}"


def _hydra_run_dir() -> Path | None:
    """The Hydra job's output directory when running under ``@hydra.main``, else ``None``."""
    try:
        from hydra.core.hydra_config import HydraConfig

        if HydraConfig.initialized():
            return Path(HydraConfig.get().runtime.output_dir)
    except Exception:  # noqa: BLE001 - no Hydra run (library use, tests)
        pass
    return None


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


# ---------------------------------------------------------------------------------------------- data
@dataclass(frozen=True)
class Pair:
    """One training example: a request, its previous turn (or ""), and the reference reply."""

    text: str
    context: str
    reply: str


def load_pairs(data_cfg: Mapping[str, Any], split: str, with_context: bool, max_pairs: int | None,
               seed: int, max_chars: int | None = None) -> list[Pair]:
    """(request, context, reply) pairs of one CCC split: rows whose reply is non-empty.

    ``max_pairs`` draws a seeded sample (stable order); ``with_context=False`` blanks the context;
    ``max_chars`` drops requests or replies longer than that (pasted essays).
    """
    spec = SplitSpec(train_frac=float(data_cfg.get("train_frac", 0.8)),
                     val_frac=float(data_cfg.get("val_frac", 0.1)),
                     seed=int(data_cfg.get("split_seed", 0)))
    df = load_turns(spec)
    df = df[(df["split"] == split) & (df["reply"].str.len() > 0)]
    if max_chars:
        df = df[(df["text"].str.len() <= max_chars) & (df["reply"].str.len() <= max_chars)]
    if max_pairs is not None and int(max_pairs) < len(df):
        df = df.sample(n=int(max_pairs), random_state=seed).sort_index()
    return [Pair(_clean(t), _clean(c) if with_context else "", _clean(r))
            for t, c, r in zip(df["text"], df["context"], df["reply"])]


def tokenizer_texts(data_cfg: Mapping[str, Any], max_texts: int | None, seed: int) -> list[str]:
    """Every CCC train turn (each turn once), or a seeded sample of ``max_texts`` of them."""
    spec = SplitSpec(train_frac=float(data_cfg.get("train_frac", 0.8)),
                     val_frac=float(data_cfg.get("val_frac", 0.1)),
                     seed=int(data_cfg.get("split_seed", 0)))
    df = load_turns(spec)
    df = df[df["split"] == "train"]
    if max_texts is not None and int(max_texts) < len(df):
        df = df.sample(n=int(max_texts), random_state=seed).sort_index()
    return [_clean(t) for t in df["text"]]


# ---------------------------------------------------------------------------------------------- tokenizer
def train_tokenizer(texts: Iterable[str], vocab_size: int, min_frequency: int, seq2seq: bool,
                    model_max_length: int):
    """A byte-level BPE trained on ``texts``, wrapped as a ``PreTrainedTokenizerFast``.

    Special tokens take ids 0..4 in the order of :data:`SPECIAL_TOKENS`. For seq2seq LMs a post-processor
    appends ``</s>`` to every encoded input (``add_special_tokens=True``), as T5 and BART tokenizers do.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=int(vocab_size), min_frequency=int(min_frequency), special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    )
    tok.train_from_iterator(list(texts), trainer=trainer)
    eos_id = tok.token_to_id("</s>")
    if seq2seq:
        tok.post_processor = processors.TemplateProcessing(
            single="$A </s>", pair="$A </s> $B </s>", special_tokens=[("</s>", eos_id)])
    else:
        tok.post_processor = processors.ByteLevel(trim_offsets=False)
    wrapped = PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>", unk_token="<unk>",
        additional_special_tokens=["<sep>"], model_max_length=int(model_max_length),
        padding_side="right",
    )
    return wrapped


# ---------------------------------------------------------------------------------------------- models
def build_model(lm_name: str, model_kwargs: Mapping[str, Any], tokenizer):
    """A randomly initialised model of the LM's architecture; special-token ids follow ``tokenizer``.

    ``model_kwargs`` is the preset's ``model.<lm_name>`` block, passed to the architecture's config class.
    """
    from transformers import (BlenderbotSmallConfig, BlenderbotSmallForConditionalGeneration, GenerationConfig,
                              GPT2Config, GPT2LMHeadModel, T5Config, T5ForConditionalGeneration)

    kw = dict(model_kwargs)
    ids = {"pad_token_id": tokenizer.pad_token_id, "bos_token_id": tokenizer.bos_token_id,
           "eos_token_id": tokenizer.eos_token_id}
    vocab = len(tokenizer)
    if lm_name == "dialogpt_ccc":
        config = GPT2Config(vocab_size=vocab, **ids, **kw)
        model = GPT2LMHeadModel(config)
        decoder_start = None
    elif lm_name == "blenderbot_ccc":
        decoder_start = tokenizer.bos_token_id
        config = BlenderbotSmallConfig(vocab_size=vocab, decoder_start_token_id=decoder_start,
                                       forced_eos_token_id=None, **ids, **kw)
        model = BlenderbotSmallForConditionalGeneration(config)
    elif lm_name == "godel_ccc":
        decoder_start = tokenizer.pad_token_id
        config = T5Config(vocab_size=vocab, decoder_start_token_id=decoder_start, **ids, **kw)
        model = T5ForConditionalGeneration(config)
    else:
        raise UserError(f"rtlm-train-lm trains the lab LMs only: {', '.join(LAB_LMS)}")
    gen = GenerationConfig(**ids, do_sample=False, num_beams=1)
    if decoder_start is not None:
        gen.decoder_start_token_id = decoder_start
    model.generation_config = gen
    return model


# ---------------------------------------------------------------------------------------------- encoding
def encode_pairs(pairs: Sequence[Pair], tokenizer, seq2seq: bool, max_length: int) -> list[dict[str, list[int]]]:
    """Token ids per pair, in the inference prompt format of :func:`rtlm_lab.lm.formatting.format_lab`.

    * causal: ``input_ids = prompt + reply + </s>`` where prompt is ``{context}</s>{text}</s>``; labels are
      ``-100`` on the prompt. Over-long examples lose prompt tokens from the left (keeping at least half the
      budget for the prompt), then reply tokens from the right.
    * seq2seq: encoder ``input_ids`` = the tokenizer's encoding of ``{context} <sep> {text}`` (with ``</s>``,
      truncated like :meth:`ChatLM.encode`), ``labels = reply + </s>``.
    """
    eos = tokenizer.eos_token_id
    prompts = [format_lab(p.text, p.context, tokenizer, seq2seq=seq2seq) for p in pairs]
    replies = tokenizer([p.reply for p in pairs], add_special_tokens=False)["input_ids"]  # batched (Rust)
    out = []
    if seq2seq:
        encoded = tokenizer(prompts, add_special_tokens=True, truncation=True, max_length=max_length)["input_ids"]
        for enc, reply_ids in zip(encoded, replies):
            out.append({"input_ids": enc, "labels": reply_ids[: max_length - 1] + [eos]})
        return out
    for prompt_ids, reply_ids in zip(tokenizer(prompts, add_special_tokens=False)["input_ids"], replies):
        reply_ids = reply_ids + [eos]
        if len(prompt_ids) + len(reply_ids) > max_length:
            keep_prompt = min(len(prompt_ids), max(max_length - len(reply_ids), max_length // 2))
            prompt_ids = prompt_ids[len(prompt_ids) - keep_prompt:]
            reply_ids = reply_ids[: max_length - len(prompt_ids)]
        out.append({"input_ids": prompt_ids + reply_ids, "labels": [IGNORE_INDEX] * len(prompt_ids) + reply_ids})
    return out


def collate(examples: Sequence[Mapping[str, list[int]]], pad_id: int, seq2seq: bool) -> dict[str, torch.Tensor]:
    """Right-pad a batch; padded label positions are ``-100`` (ignored by the loss)."""
    n = max(len(e["input_ids"]) for e in examples)
    input_ids = torch.full((len(examples), n), pad_id, dtype=torch.long)
    attn = torch.zeros((len(examples), n), dtype=torch.long)
    m = max(len(e["labels"]) for e in examples)
    labels = torch.full((len(examples), m), IGNORE_INDEX, dtype=torch.long)
    for i, e in enumerate(examples):
        input_ids[i, : len(e["input_ids"])] = torch.tensor(e["input_ids"])
        attn[i, : len(e["input_ids"])] = 1
        labels[i, : len(e["labels"])] = torch.tensor(e["labels"])
    return {"input_ids": input_ids, "attention_mask": attn, "labels": labels}


def _amp_context(device: torch.device, amp_dtype: str | None):
    """bf16/fp16 autocast on CUDA only (the CPU trains in fp32)."""
    if device.type == "cuda" and amp_dtype:
        return torch.autocast("cuda", dtype=getattr(torch, str(amp_dtype)))
    return torch.autocast(device.type, enabled=False)


def shift_right(labels: torch.Tensor, start_id: int, pad_id: int) -> torch.Tensor:
    """Decoder inputs for teacher forcing: ``[start] + labels[:-1]`` with ignored positions as padding
    (what BlenderBot-small and T5 do internally when given ``labels``)."""
    out = labels.new_full(labels.shape, pad_id)
    out[:, 0] = start_id
    out[:, 1:] = labels[:, :-1].masked_fill(labels[:, :-1] == IGNORE_INDEX, pad_id)
    return out


def _token_loss(model, batch: Mapping[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed cross-entropy over label tokens and their count, both device tensors (exact token-weighted
    means, no host sync)."""
    labels = batch["labels"]
    extra = {}
    if model.config.is_encoder_decoder:  # teacher forcing: labels shifted right after decoder_start_token_id
        extra["decoder_input_ids"] = shift_right(labels, model.config.decoder_start_token_id,
                                                 model.config.pad_token_id)
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], **extra).logits
    if not model.config.is_encoder_decoder:
        logits, labels = logits[:, :-1, :], labels[:, 1:]
    loss = torch.nn.functional.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), labels.reshape(-1),
                                             ignore_index=IGNORE_INDEX, reduction="sum")
    return loss, (labels != IGNORE_INDEX).sum()


@torch.no_grad()
def evaluate(model, examples: Sequence[Mapping[str, list[int]]], pad_id: int, seq2seq: bool, batch_size: int,
             device: torch.device, amp_dtype: str | None) -> dict[str, float]:
    """Token-weighted mean loss and perplexity of the reply tokens of ``examples``."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    for i in range(0, len(examples), batch_size):
        batch = {k: v.to(device) for k, v in collate(examples[i:i + batch_size], pad_id, seq2seq).items()}
        with _amp_context(device, amp_dtype):
            loss, n = _token_loss(model, batch)
        total += float(loss)
        count += int(n)
    model.train(was_training)
    mean = total / max(count, 1)
    return {"loss": mean, "perplexity": float(math.exp(min(mean, 50.0))), "n_tokens": count}


# ---------------------------------------------------------------------------------------------- training
def preset_for(preset: DictConfig | Mapping[str, Any], lm_name: str) -> DictConfig:
    """The preset as ``lm_name`` trains with it: ``preset.by_lm.<lm_name>`` (batch size, steps, optimizer, ...)
    merged over the shared values, ``by_lm`` itself dropped."""
    base = preset if isinstance(preset, DictConfig) else OmegaConf.create(dict(preset))
    plain = OmegaConf.to_container(base, resolve=True)
    overrides = (plain.pop("by_lm", None) or {}).get(lm_name) or {}
    return OmegaConf.merge(OmegaConf.create(plain), OmegaConf.create(overrides))


def _num_steps(preset: Mapping[str, Any], n_examples: int) -> int:
    per_epoch = math.ceil(n_examples / int(preset["batch_size"]))
    if preset.get("max_steps"):
        return int(preset["max_steps"])
    if preset.get("epochs"):
        return int(math.ceil(float(preset["epochs"]) * per_epoch))
    raise UserError(f"preset {preset.get('name')!r} needs max_steps or epochs")


def _batches(n: int, batch_size: int, gen: torch.Generator):
    """Endless seeded shuffles of ``range(n)`` cut into batches (last short batch of an epoch dropped
    unless the epoch has a single batch)."""
    while True:
        perm = torch.randperm(n, generator=gen).tolist()
        stop = n - n % batch_size if n >= batch_size else n
        for i in range(0, stop, batch_size):
            yield perm[i:i + batch_size]


def train_loop(model, examples: Sequence[Mapping[str, list[int]]], preset: Mapping[str, Any], pad_id: int,
               seq2seq: bool, device: torch.device, seed: int) -> dict[str, Any]:
    """AdamW + warmup/decay schedule for ``preset.max_steps`` (or ``preset.epochs``); returns the loss curve.

    ``preset`` is one LM's (see :func:`preset_for`). The loss stays on the device between log steps (no
    per-step host sync), so small models on a GPU are not bound by launch latency twice over.
    """
    # Why not transformers.Trainer (weighed for issue 17): the optimizer (AdamW, decay / no-decay groups) and the
    # schedule already come from torch / transformers.get_scheduler, so what is left here is ~40 lines of step
    # loop. Trainer would need a Dataset wrapper, a collator, a compute_loss override (our loss is token-weighted
    # over reply tokens: Trainer averages per-batch means, also in evaluation), report_to="none" and output_dir
    # handling (it writes checkpoints we do not want), a custom sampler for our seeded batch order (last short
    # batch dropped), and a callback for the divergence check; and its own sampler / RNG would change the batch
    # order behind the committed lab models (outputs/reference/models/). Not simpler: kept.
    from tqdm.auto import tqdm
    from transformers import get_scheduler

    steps = _num_steps(preset, len(examples))
    bs = int(preset["batch_size"])
    opt_cfg = preset["optimizer"]
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        (no_decay if p.ndim < 2 or "norm" in name.lower() or name.endswith(".bias") else decay).append(p)
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": float(opt_cfg["weight_decay"])},
         {"params": no_decay, "weight_decay": 0.0}],
        lr=float(opt_cfg["lr"]), betas=tuple(float(b) for b in opt_cfg["betas"]), eps=float(opt_cfg["eps"]))
    warmup = opt_cfg.get("warmup_steps")
    if warmup is None:
        warmup = int(round(float(opt_cfg.get("warmup_ratio", 0.0)) * steps))
    scheduler = get_scheduler(str(opt_cfg["scheduler"]), optimizer, num_warmup_steps=int(warmup),
                              num_training_steps=steps)
    gen = torch.Generator().manual_seed(seed)
    batches = _batches(len(examples), bs, gen)
    log_every = max(1, int(preset["log_every"]))
    amp = preset.get("amp_dtype")
    max_norm = preset.get("max_grad_norm")
    # fp16 autocast needs loss scaling (bf16 does not); a disabled scaler is a no-op
    scaler = torch.amp.GradScaler("cuda", enabled=device.type == "cuda" and str(amp) == "float16")
    model.train()
    curve: list[list[float]] = []
    window_loss = torch.zeros((), device=device, dtype=torch.float64)
    window_tokens = torch.zeros((), device=device, dtype=torch.int64)
    step_losses: list[torch.Tensor] = []  # per-step means, kept on the device until a log step
    losses: list[float] = []
    t0 = time.perf_counter()
    bar = tqdm(range(1, steps + 1), desc=f"train {preset.get('name')}", unit="step", dynamic_ncols=True,
               mininterval=1.0)
    for step in bar:
        idx = next(batches)
        batch = {k: v.to(device, non_blocking=True)
                 for k, v in collate([examples[i] for i in idx], pad_id, seq2seq).items()}
        with _amp_context(device, amp):
            loss_sum, n_tok = _token_loss(model, batch)
        loss = loss_sum / n_tok.clamp(min=1)
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        if max_norm:
            scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(model.parameters(), float(max_norm))
        scaler.step(optimizer)
        scaler.update()
        scheduler.step()
        step_losses.append(loss.detach())
        window_loss += loss_sum.detach().double()
        window_tokens += n_tok
        if step % log_every == 0 or step == steps:
            values = torch.stack(step_losses).float().cpu().tolist()  # the one host sync per log window
            step_losses.clear()
            bad = next((v for v in values if not math.isfinite(v)), None)
            if bad is not None:
                raise RuntimeError(f"training diverged before step {step} (loss {bad}); lower preset.optimizer.lr")
            losses.extend(values)
            mean = float(window_loss) / max(int(window_tokens), 1)
            curve.append([step, round(mean, 4)])
            bar.set_postfix(loss=f"{mean:.3f}", lr=f"{scheduler.get_last_lr()[0]:.2e}")
            log.info("step %d/%d  loss %.4f  lr %.2e  %.1f s", step, steps, mean, scheduler.get_last_lr()[0],
                     time.perf_counter() - t0)
            window_loss.zero_()
            window_tokens.zero_()
    bar.close()
    tail = losses[-max(1, len(losses) // 10):]
    return {
        "steps": steps,
        "epochs": round(steps * bs / max(len(examples), 1), 3),
        "batch_size": bs,
        "warmup_steps": int(warmup),
        "first_loss": round(losses[0], 4),
        "final_loss": round(float(np.mean(tail)), 4),
        "min_loss": round(min(losses), 4),
        "curve": curve,
        "seconds": round(time.perf_counter() - t0, 2),
    }


def sample_replies(model, tokenizer, lm_spec: Mapping[str, Any], device: torch.device, prompts: Sequence[str],
                   max_new_tokens: int) -> list[dict[str, Any]]:
    """Greedy replies to fixed prompts through the inference path (:class:`ChatLM`)."""
    chat = ChatLM(model, tokenizer, lm_spec, device)
    out = []
    for p in prompts:  # one at a time: batch-of-one is how the lab measures requests
        g = chat.generate([p], max_new_tokens=max_new_tokens)[0]
        out.append({"prompt": p, "reply": g.text, "n_output_tokens": g.n_output_tokens,
                    "stop_reason": g.stop_reason})
    tokenizer.padding_side = "right"
    return out


# ---------------------------------------------------------------------------------------------- entry
def _existing_metrics(d: Path) -> dict[str, Any]:
    try:
        return json.loads((d / "metrics.json").read_text())
    except (OSError, ValueError):
        return {}


def _copy_metrics_to_run_dir(metrics_path: Path) -> None:
    run_dir = _hydra_run_dir()
    if run_dir is not None:
        run_dir.mkdir(parents=True, exist_ok=True)
        copy_file_atomic(metrics_path, run_dir / "metrics.json")
        log.info("metrics copied to %s", run_dir / "metrics.json")


def train_lab_lm(cfg: DictConfig) -> dict[str, Any]:
    """Train ``cfg.lm`` with ``cfg.preset`` on CCC and save it for :func:`rtlm_lab.lm.load_lm`; return metrics.

    Reuses an existing output directory whose manifest checks out, unless ``cfg.force``.
    """
    lm = cfg.lm
    preset = preset_for(cfg.preset, lm.name)
    if lm.get("source") != "lab" or lm.name not in LAB_LMS:
        raise UserError(f"rtlm-train-lm trains the lab LMs only: {', '.join(LAB_LMS)}")
    if lm.name not in preset.model:
        raise UserError(f"preset {preset.name!r} has no model block for {lm.name!r} (conf/preset/{preset.name}.yaml)")
    seq2seq = lm.get("arch") == "seq2seq"
    seed = int(cfg.get("seed", 0))
    target = output_dir_for(lm.name, preset.name)

    if target.exists() and not cfg.get("force", False):
        if _manifest_ok(target):
            log.info("%s already trained at %s (valid manifest); skipping (force=true retrains)", lm.name, target)
            metrics = _existing_metrics(target)
            _copy_metrics_to_run_dir(target / "metrics.json")
            return metrics
        log.warning("%s exists but its manifest is missing or does not match; retraining", target)

    device = resolve_device(cfg.platform)
    plain = _plain_config(cfg)
    _seed_everything(seed)
    t_start = time.perf_counter()

    # ---- data + tokenizer
    data_cfg = cfg.data
    pairs = load_pairs(data_cfg, "train", bool(preset.with_context), preset.get("max_train_pairs"), seed,
                       preset.get("max_chars"))
    val_pairs = load_pairs(data_cfg, "val", bool(preset.with_context), preset.get("max_val_pairs"), seed,
                           preset.get("max_chars"))
    if not pairs or not val_pairs:
        raise UserError("no CCC training/validation pairs (check data.train_frac / data.val_frac)")
    tcfg = preset.tokenizer
    texts = tokenizer_texts(data_cfg, tcfg.get("max_texts"), seed)
    tokenizer = train_tokenizer(texts, tcfg.vocab_size, tcfg.min_frequency, seq2seq,
                                model_max_length=VERY_LARGE)  # examples are truncated by encode_pairs
    log.info("tokenizer: byte-level BPE, %d tokens, trained on %d turns", len(tokenizer), len(texts))

    max_len = int(preset.max_length)
    train_ex = encode_pairs(pairs, tokenizer, seq2seq, max_len)
    val_ex = encode_pairs(val_pairs, tokenizer, seq2seq, max_len)
    log.info("%d train pairs, %d val pairs (with_context=%s, max_length=%d)", len(train_ex), len(val_ex),
             bool(preset.with_context), max_len)

    # ---- model
    torch.manual_seed(seed)
    model_kwargs = OmegaConf.to_container(preset.model[lm.name], resolve=True)
    model = build_model(lm.name, model_kwargs, tokenizer).to(device)
    n_params = sum(p.numel() for p in model.parameters())
    log.info("%s: %s, %.2f M parameters, on %s", lm.name, type(model).__name__, n_params / 1e6, device)

    # ---- train + evaluate
    train_metrics = train_loop(model, train_ex, preset, tokenizer.pad_token_id, seq2seq, device, seed)
    val = evaluate(model, val_ex, tokenizer.pad_token_id, seq2seq, int(preset.eval_batch_size), device,
                   preset.get("amp_dtype"))
    log.info("val loss %.4f  perplexity %.1f  (%d reply tokens)", val["loss"], val["perplexity"], val["n_tokens"])
    lm_spec = OmegaConf.to_container(lm, resolve=True)
    samples = sample_replies(model, tokenizer, lm_spec, device, list(cfg.sample_prompts),
                             int(preset.get("sample_max_new_tokens") or lm.get("max_new_tokens", 64)))
    for s in samples:
        log.info("sample  %r -> %r", s["prompt"], s["reply"])

    metrics = {
        "lm": lm.name,
        "preset": preset.name,
        "seed": seed,
        "device": str(device),
        "n_params": int(n_params),
        "vocab_size": len(tokenizer),
        "n_train_pairs": len(train_ex),
        "n_val_pairs": len(val_ex),
        "train": train_metrics,
        "val": {"loss": round(val["loss"], 6), "perplexity": round(val["perplexity"], 4),
                "n_tokens": val["n_tokens"]},
        "samples": samples,
        "save_dtype": str(preset.save_dtype),
        "total_seconds": round(time.perf_counter() - t_start, 2),
    }

    # ---- save (staging dir, then rename)
    staging = target.with_name(target.name + ".partial")
    if staging.exists():
        shutil.rmtree(staging)
    staging.mkdir(parents=True)
    model.eval().to("cpu").to(getattr(torch, str(preset.save_dtype)))
    model.save_pretrained(staging)  # safetensors (the only format transformers 5 writes)
    tokenizer.padding_side = "right"
    tokenizer.model_max_length = int(lm.get("max_input_tokens", max_len))
    tokenizer.save_pretrained(staging)
    write_json_atomic(staging / "train_config.json", provenance(plain, output_dir=str(target)))
    write_json_atomic(staging / "metrics.json", metrics)
    import transformers

    write_manifest(staging, lm=lm.name, preset=preset.name, seed=seed, transformers=transformers.__version__,
                   val_loss=metrics["val"]["loss"])
    if target.exists():
        shutil.rmtree(target)
    staging.rename(target)
    log.info("saved %s (%s) to %s in %.1f s", lm.name, preset.name, target, metrics["total_seconds"])
    _copy_metrics_to_run_dir(target / "metrics.json")
    return metrics


__all__ = ["LAB_LMS", "MANIFEST", "Pair", "build_model", "encode_pairs", "evaluate", "load_pairs",
           "output_dir_for", "preset_for", "train_lab_lm", "train_loop", "train_tokenizer"]
