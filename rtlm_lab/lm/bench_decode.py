"""Decoding speed: plain ``generate`` vs the static-cache / CUDA-graph decoder, same requests, same run.

``rtlm-bench bench=decode platform=cuda bench.lms=[gemma3_270m,smollm2_135m]`` (:func:`bench`) loads each LM on the
platform, takes ``bench.n`` real CCC requests from its reference profile and decodes them

* at batch 1 with plain ``ChatLM.generate`` and with :class:`~rtlm_lab.lm.fastdecode.StaticDecoder`
  (interleaved request by request, so machine load hits both alike): output tokens per second of decoding
  time, and whether the token ids are identical;
* in batches of ``bench.batch`` with both (throughput of consolidation: tokens/s at batch B over batch 1).

Writes ``outputs/bench/decode_<platform>.json`` (ratios are the result; absolute numbers depend on the machine
and its load, recorded in the provenance).
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import pandas as pd

log = logging.getLogger("rtlm_lab.lm")


def _timed(fn, texts, ctxs):
    t0 = time.perf_counter()
    out = fn(texts, ctxs)
    return out, time.perf_counter() - t0


def bench_lm(lm_name: str, platform: dict, n: int, batch: int, max_len: int = 512) -> dict:
    from rtlm_lab.lm.fastdecode import StaticDecoder
    from rtlm_lab.lm.loader import load_lm
    from rtlm_lab.paths import reference_dir

    lm = load_lm(lm_name, platform)
    prof = reference_dir() / "profiles" / f"{lm_name}__{platform['name']}.parquet"
    if not prof.is_file():
        prof = reference_dir() / "profiles" / f"{lm_name}__cpu.parquet"
    df = pd.read_parquet(prof).head(n)
    texts, ctxs = df["text"].astype(str).tolist(), df["context"].fillna("").astype(str).tolist()
    plain = lambda t, c: lm.generate(t, c)  # noqa: E731
    out: dict = {"lm": lm_name, "platform": platform["name"], "n": len(texts), "profile": str(prof)}
    if lm.is_encoder_decoder:
        out["static_decoder"] = "n/a (encoder-decoder: plain generate)"
        fast = None
    else:
        dec = StaticDecoder(lm, max_batch=batch, max_len=max_len)
        fast = dec.generate
        t0 = time.perf_counter()
        fast(texts[:1], ctxs[:1])
        fast(texts[:batch], ctxs[:batch])  # captures the buckets used below
        out["warmup_s"] = time.perf_counter() - t0
        out["graphs"] = dec.graphs and all(b.graph is not None for b in dec.buckets.values())
        out["capture_errors"] = dec.capture_errors
    plain(texts[:1], ctxs[:1])
    tok_p = tok_f = sec_p = sec_f = 0.0
    same = 0
    for i in range(len(texts)):
        gp, sp = _timed(plain, texts[i:i + 1], ctxs[i:i + 1])
        tok_p += gp[0].n_output_tokens
        sec_p += sp
        if fast is not None:
            gf, sf = _timed(fast, texts[i:i + 1], ctxs[i:i + 1])
            tok_f += gf[0].n_output_tokens
            sec_f += sf
            same += int(gf[0].output_ids == gp[0].output_ids)
    out["batch1"] = {"plain_tok_s": tok_p / sec_p, "plain_s_per_request": sec_p / len(texts)}
    if fast is not None:
        out["batch1"].update({"static_tok_s": tok_f / sec_f, "static_s_per_request": sec_f / len(texts),
                              "speedup": (tok_f / sec_f) / (tok_p / sec_p), "identical_tokens": same,
                              "n_fallback": dec.n_fallback})
    bt: dict = {}
    for name, fn in (("plain", plain), ("static", fast)):
        if fn is None:
            continue
        toks = secs = 0.0
        for i in range(0, len(texts) - batch + 1, batch):
            g, s = _timed(fn, texts[i:i + batch], ctxs[i:i + batch])
            toks += sum(x.n_output_tokens for x in g)
            secs += s
        if secs:
            bt[f"{name}_tok_s"] = toks / secs
    out[f"batch{batch}"] = bt
    if bt.get("static_tok_s") and out["batch1"].get("static_tok_s"):
        out["consolidation_gain_static"] = bt["static_tok_s"] / out["batch1"]["static_tok_s"]
    if bt.get("plain_tok_s"):
        out["consolidation_gain_plain"] = bt["plain_tok_s"] / out["batch1"]["plain_tok_s"]
    log.info("%s", out)
    return out


def bench(platform: dict, lms: list[str] = ("gemma3_270m",), n: int = 16, batch: int = 8,
          out: str | Path | None = None, config=None) -> list[dict]:
    """:func:`bench_lm` for each LM on ``platform`` (a ``conf/platform/*.yaml`` dict), written to ``out``
    (default ``outputs/bench/decode_<platform>.json``) with its provenance."""
    from rtlm_lab.io import provenance, write_json_atomic
    from rtlm_lab.paths import outputs_dir

    results = [bench_lm(name, platform, n, batch) for name in lms]
    out = Path(out) if out else outputs_dir() / "bench" / f"decode_{platform['name']}.json"
    write_json_atomic(out, {"results": results, "provenance": provenance(config)})
    for r in results:
        b1 = r["batch1"]
        print(f"{r['lm']} on {r['platform']}: plain {b1['plain_tok_s']:.1f} tok/s"
              + (f", static {b1['static_tok_s']:.1f} tok/s ({b1['speedup']:.1f}x), identical tokens "
                 f"{b1['identical_tokens']}/{r['n']}" if "static_tok_s" in b1 else ""), flush=True)
    print(f"wrote {out}")
    return results
