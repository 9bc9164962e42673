"""Engine benchmark: decode tokens/s of plain ``generate`` vs the continuous-batching engine
(:mod:`rtlm_lab.scheduler.engine`) at 1, 8, 64 and 256 concurrent requests, and the identical-token check.

For each decoder-only LM on the platform: ``B`` CCC requests (the same for both paths), greedy, the LM's own
turn end and ``max_new_tokens``; plain ``generate`` runs them as one static batch (left-padded), the engine
serves them all queued at t=0 (FCFS, the platform's budgets, ``max_seqs`` raised to ``B`` where lower).
Both engine backends are timed: ``slots`` (our engine on DynamicCache) and ``paged`` (transformers' own continuous
batching). Tokens/s = generated tokens / wall seconds, all after a warm-up. Identical tokens: the engine's token ids
for each request against batch-1 ``generate`` on a sample. Writes ``outputs/bench/engine.json`` (atomic).

``random_init`` dirs (config + tokenizer, no weights) time an LM's architecture where its weights cannot be
had (the GPU box): speed depends on the kernels, not on the weights; the token check then compares random
weights' greedy tokens, which is just as strict.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any, Mapping, Sequence

log = logging.getLogger("rtlm_lab.bench")


def _load(lm_name: str, platform: Mapping[str, Any], random_init: str | None):
    from rtlm_lab.lm.loader import lm_config, load_lm, resolve_device

    spec = lm_config(lm_name)
    if not random_init:
        return load_lm(spec, platform)
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from rtlm_lab.lm.generation import ChatLM

    dev = resolve_device(platform)
    torch.manual_seed(0)
    cfg = AutoConfig.from_pretrained(random_init)
    model = AutoModelForCausalLM.from_config(cfg, torch_dtype=getattr(torch, str(platform.get("dtype", "float32"))))
    tok = AutoTokenizer.from_pretrained(random_init)
    return ChatLM(model.to(dev), tok, spec, dev)


def _sync(lm) -> None:
    lm._sync()


def bench_engine(lm_names: Sequence[str], platform: Mapping[str, Any], concurrency: Sequence[int] = (1, 8, 64, 256),
                 max_new_tokens: int | None = None, n_check: int = 16, random_init: Mapping[str, str] | None = None,
                 out: Path | None = None, backends: Sequence[str] = ("slots", "paged")) -> dict[str, Any]:
    import pandas as pd

    from rtlm_lab.io import provenance, write_json_atomic
    from rtlm_lab.paths import outputs_dir
    from rtlm_lab.scheduler.continuous import engine_config, make_backend
    from rtlm_lab.scheduler.engine import Engine, PredictorServer, WallClock, serve
    from rtlm_lab.scheduler.policies import Request, make_policy

    random_init = dict(random_init or {})
    from rtlm_lab.paths import reference_dir

    # the committed test-split requests (CCC user turns): the same on every machine, no corpus build needed
    pool = pd.read_parquet(reference_dir() / "profiles" / "dialogpt_ccc__cpu.parquet")["text"].astype(str).tolist()
    need = max(max(concurrency), n_check)
    texts = (pool * (need // len(pool) + 1))[:need]
    res: dict[str, Any] = {"platform": platform["name"], "concurrency": list(concurrency), "lms": {}}
    for name in lm_names:
        lm = _load(name, platform, random_init.get(name))
        if max_new_tokens:
            lm.spec["max_new_tokens"] = int(max_new_tokens)
        ecfg = engine_config(platform)
        row: dict[str, Any] = {"random_init": bool(random_init.get(name)), "max_new_tokens": lm.spec["max_new_tokens"],
                               "plain": {}, **{b: {} for b in backends}}
        lm.generate(texts[:2])  # warm-up of the plain path
        for B in concurrency:
            batch = texts[:B]
            _sync(lm)
            t0 = time.perf_counter()
            gens = lm.generate(batch)
            _sync(lm)
            dt = time.perf_counter() - t0
            ntok = sum(g.n_output_tokens for g in gens)
            row["plain"][str(B)] = {"tok_s": ntok / dt, "tokens": ntok, "wall_s": dt}
            for bk in backends:
                backend = make_backend(lm, {**ecfg, "backend": bk, "max_batch_tokens": max(ecfg["max_batch_tokens"], 64)},
                                       max_seqs=max(B, 1))
                pol = make_policy("fcfs")
                eng = Engine("main", backend, pol, max(B, 1), max(ecfg["max_batch_tokens"], 64))
                reqs = [Request(request_id=f"b{i}", text=t, context="", arrival_s=0.0, n_input_tokens=1,
                                true_tokens=1) for i, t in enumerate(batch)]
                clock = WallClock()
                jobs, facts = serve(reqs, pol, [eng], clock, PredictorServer(reqs, (), clock))  # warm-up off the clock
                wall = max(j.finish_s for j in jobs)
                etok = sum(j.generated for j in jobs)
                steps = facts["steps"]["main"]
                row[bk][str(B)] = {"tok_s": etok / wall, "tokens": etok, "wall_s": wall, "steps": int(len(steps)),
                                   "mean_step_ms": 1e3 * float(steps["dt_s"].mean())}
                backend.close()
                log.info("%s B=%d: plain %.0f tok/s, %s %.0f tok/s", name, B, ntok / dt, bk, etok / wall)
        # identical tokens: each engine (requests arriving together, joining and leaving) vs batch-1 generate
        sample = texts[:n_check]
        ref = [lm.generate([t])[0] for t in sample]
        row["identical_tokens"] = {}
        for bk in backends:
            n_seq = min(n_check, ecfg["max_seqs"])
            backend = make_backend(lm, {**ecfg, "backend": bk}, max_seqs=n_seq)
            pol = make_policy("fcfs")
            eng = Engine("main", backend, pol, n_seq, ecfg["max_batch_tokens"])
            reqs = [Request(request_id=f"c{i}", text=t, context="", arrival_s=0.0, n_input_tokens=1, true_tokens=1)
                    for i, t in enumerate(sample)]
            clock = WallClock()
            jobs, _ = serve(reqs, pol, [eng], clock, PredictorServer(reqs, (), clock))
            got = {j.rid: j for j in jobs}
            same = sum(got[f"c{i}"].output_ids == list(g.output_ids) for i, g in enumerate(ref))
            backend.close()
            row["identical_tokens"][bk] = {"same": int(same), "n": len(ref)}
        row["speedup_vs_plain"] = {bk: {B: row[bk][str(B)]["tok_s"] / row["plain"][str(B)]["tok_s"]
                                        for B in map(str, concurrency)} for bk in backends}
        res["lms"][name] = row
        del lm
    import torch

    res["device_name"] = torch.cuda.get_device_name(0) if str(platform.get("device", "cpu")).startswith("cuda") else "cpu"
    res["provenance"] = provenance({"lms": list(lm_names), "platform": dict(platform), "concurrency": list(concurrency)})
    out = Path(out) if out else outputs_dir() / "bench" / "engine.json"
    write_json_atomic(out, res)
    print(json.dumps({n: {"identical": r["identical_tokens"],
                          **{k: {b: round(v["tok_s"]) for b, v in r[k].items()} for k in ("plain", *backends)}}
                      for n, r in res["lms"].items()}))
    print(f"wrote {out}")
    return res
