"""Spread profiles: each prompt replied ``K`` times under sampled decoding, its length distribution (issue 34).

``rtlm-spread`` (``conf/spread.yaml``) takes CCC user turns (``data``), the LM's chat sampling setting
(``lm.chat_sampling``, or ``lm.sampling`` when set) and draws ``spread.samples`` replies per prompt, sample ``k``
with the request's seed ``request_seed(request_id, k, seed)`` (:mod:`rtlm_lab.lm.sampling`). Sample 0 is the
one the kv engine serves for that request (its seed): ``n_output_tokens`` is sample 0's length, so a schedule
over a spread profile with ``workload.pin_lengths=true`` pins exactly the lengths the engine samples.

Two decoders, the same draws:

* ``spread.engine=kv`` (decoder-only LMs): the serving core itself, every prompt submitted at once, FCFS,
  ``spread.batch_size`` rows (the fast path on cuda);
* ``spread.engine=generate``: ``ChatLM.generate`` with :class:`~rtlm_lab.lm.sampling.SeededSampler`, in
  batches of ``spread.batch_size`` (encoder-decoders, and the reference the tests compare the kv engine with).

One row per prompt (``spread.parquet``, usable as a schedule's workload profile: ``profile=<it>``, where
``oracle_dist`` reads ``lengths``): ``n_input_tokens``, ``lengths`` (K ints), ``eos`` (K bools: the reply ended its turn, not
the cap), and their summary ``len_mean``, ``len_sd``, ``len_q10`` ... ``len_q90``, ``len_iqr``, ``eos_rate``.
Rows are saved every chunk of ``spread.chunk`` prompts; a rerun resumes.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import pandas as pd
from tqdm.auto import tqdm

from rtlm_lab.errors import UserError

log = logging.getLogger("rtlm_lab.spread")

QUANTILES = (0.1, 0.25, 0.5, 0.75, 0.9)


def summarize_lengths(lengths: Sequence[int], eos: Sequence[bool]) -> dict[str, float]:
    """A prompt's length distribution from its ``K`` samples."""
    x = np.asarray(lengths, dtype=float)
    q = np.quantile(x, QUANTILES)
    out = {"len_mean": float(x.mean()), "len_sd": float(x.std(ddof=1)) if len(x) > 1 else 0.0,
           "eos_rate": float(np.mean(np.asarray(eos, dtype=bool)))}
    out.update({f"len_q{int(round(100 * p)):02d}": float(v) for p, v in zip(QUANTILES, q)})
    out["len_iqr"] = out["len_q75"] - out["len_q25"]
    return out


def _kv_samples(backend, texts, contexts, rids, k: int, max_seqs: int, max_batch_tokens: int):
    """Sample ``k`` of every prompt through the kv engine (all submitted at once, FCFS):
    ``[(tokens, ended its turn, prompt tokens)]``."""
    from rtlm_lab.scheduler.engine import Engine, PredictorServer, WallClock, serve
    from rtlm_lab.scheduler.policies import Request, make_policy

    reqs = [Request(request_id=r, text=t, context=c, arrival_s=0.0, n_input_tokens=1, true_tokens=1, sample=k)
            for r, t, c in zip(rids, texts, contexts)]
    pol = make_policy("fcfs")
    eng = Engine("main", backend, pol, max_seqs, max_batch_tokens)
    clock = WallClock()
    jobs, _ = serve(reqs, pol, [eng], clock, PredictorServer(reqs, (), clock))
    by = {j.rid: j for j in jobs}
    return [(len(by[r].output_ids), by[r].stop_reason != "max_tokens", by[r].n_prompt) for r in rids]


def _generate_samples(lm, texts, contexts, rids, k: int, base: int, batch_size: int):
    """Sample ``k`` of every prompt through ``ChatLM.generate``: as :func:`_kv_samples`."""
    from rtlm_lab.lm.sampling import request_seed

    out = []
    for s in range(0, len(texts), batch_size):
        seeds = [request_seed(r, k, base) for r in rids[s:s + batch_size]]
        gens = lm.generate(texts[s:s + batch_size], contexts[s:s + batch_size], seeds=seeds)
        out += [(g.n_output_tokens, g.stop_reason != "max_tokens", g.n_input_tokens) for g in gens]
    return out


def run_spread(cfg: Mapping[str, Any], run_dir: str | Path, lm=None) -> dict[str, Any]:
    """Replies ``K`` times per prompt (see the module doc); returns the summary."""
    from rtlm_lab.io import git_commit, provenance, write_json_atomic, write_parquet_atomic
    from rtlm_lab.lm import load_lm
    from rtlm_lab.lm.sampling import sampling_params
    from rtlm_lab.profiling.profiler import ProfileStore, select_requests

    run_dir = Path(run_dir)
    sp = dict(cfg.get("spread") or {})
    K, engine = int(sp.get("samples", 8)), str(sp.get("engine", "kv"))
    batch, chunk = int(sp.get("batch_size", 256)), int(sp.get("chunk", 512))
    if K < 2:
        raise UserError(f"spread.samples must be >= 2, got {K}")
    if engine not in ("kv", "generate"):
        raise UserError(f"spread.engine must be kv or generate, got {engine!r}")
    lm_cfg, platform = dict(cfg["lm"]), dict(cfg["platform"])
    temperature, top_p, base = sampling_params(lm_cfg)
    if temperature <= 0:
        raise UserError("rtlm-spread needs sampled decoding: lm.sampling (default: the LM's chat_sampling) has "
                        "temperature 0")
    requests = select_requests(cfg)
    store = ProfileStore(run_dir, columns=None)  # one part per chunk (atomic): a rerun resumes after the last
    done = set(store.load()["request_id"])
    todo = requests[~requests["request_id"].isin(done)].reset_index(drop=True)
    log.info("%d prompts x %d samples: %d done, %d to go", len(requests), K, len(requests) - len(todo), len(todo))
    backend = None
    t0 = time.perf_counter()
    if len(todo):
        lm = lm or load_lm(lm_cfg, platform)
        if engine == "kv":
            from rtlm_lab.scheduler.engine.kv import KVBackend

            ecfg = dict(platform.get("engine") or {})
            mbt = max(int(ecfg.get("max_batch_tokens", 8192)), 64)
            backend = KVBackend(lm, max_seqs=batch, max_batch_tokens=mbt, kv_slots=batch,
                                max_len=ecfg.get("max_len"))
    commit = git_commit()
    decoding = json.dumps({"temperature": temperature, "top_p": top_p, "seed": base, "samples": K,
                           "engine": engine, "max_new_tokens": int(lm_cfg.get("max_new_tokens", 64))})
    bar = tqdm(total=len(todo) * K, desc=f"spread {lm_cfg['name']} x{K}", unit="reply")
    try:
        for s in range(0, len(todo), chunk):
            part = todo.iloc[s:s + chunk]
            texts, ctx = part["text"].astype(str).tolist(), part["context"].fillna("").astype(str).tolist()
            rids = part["request_id"].astype(str).tolist()
            per_k = []
            for k in range(K):
                if engine == "kv":
                    per_k.append(_kv_samples(backend, texts, ctx, rids, k, batch, backend.max_batch_tokens))
                else:
                    per_k.append(_generate_samples(lm, texts, ctx, rids, k, base, batch))
                bar.update(len(rids))
            rows = []
            for i, (_, req) in enumerate(part.iterrows()):
                lens = [int(per_k[k][i][0]) for k in range(K)]
                eos = [bool(per_k[k][i][1]) for k in range(K)]
                rows.append({"request_id": req["request_id"], "conv_id": req.get("conv_id"), "text": req["text"],
                             "context": req["context"], "n_input_tokens": int(per_k[0][i][2]),
                             "n_output_tokens": lens[0], "lengths": lens, "eos": eos,
                             **summarize_lengths(lens, eos), "lm": lm_cfg["name"],
                             "platform": platform.get("name"), "decoding": decoding, "git_commit": commit})
            store.add(rows, flush_every=1)
    finally:
        bar.close()
        store.flush()
        if backend is not None:
            backend.close()
    df = store.load()
    order = {rid: i for i, rid in enumerate(requests["request_id"])}
    df = df[df["request_id"].isin(order)].sort_values("request_id", key=lambda x: x.map(order)).reset_index(drop=True)
    write_parquet_atomic(df, run_dir / "spread.parquet")
    summary = {"lm": lm_cfg["name"], "platform": platform.get("name"), "n_prompts": int(len(df)), "samples": K,
               "engine": engine, "temperature": temperature, "top_p": top_p, "seed": base,
               "mean_len": float(df["len_mean"].mean()), "mean_sd": float(df["len_sd"].mean()),
               "median_iqr": float(df["len_iqr"].median()), "eos_rate": float(df["eos_rate"].mean()),
               # how much of the length variance is between prompts (the rest: the sampling itself)
               "between_prompt_share": float(df["len_mean"].var() / max(1e-9, df["len_mean"].var()
                                                                           + (df["len_sd"] ** 2).mean())),
               "wall_s": round(time.perf_counter() - t0, 1)}
    write_json_atomic(run_dir / "summary.json", {"summary": summary, "provenance": provenance(cfg)})
    return summary


def import_spread(src: str | Path, dst: str | Path | None = None, platform: str = "cuda") -> list[Path]:
    """Copy finished spread runs into the reference: every ``<src>/<lm>__<split>/spread.parquet`` (``box.sh
    spread``'s layout; the split is the prompt file's stem) becomes ``<dst>/<lm>__<platform>__<split>.parquet``
    (default ``dst``: ``outputs/reference/profiles/spread``) with its summary and provenance (config, commit,
    date, machine, GPU) in ``<lm>__<platform>__<split>.provenance.json``."""
    from rtlm_lab.io import sha256_file, write_json_atomic, write_parquet_atomic
    from rtlm_lab.paths import reference_dir

    dst = Path(dst) if dst else reference_dir() / "profiles" / "spread"
    out = []
    for f in sorted(Path(src).glob("*__*/spread.parquet")):
        lm, split = f.parent.name.split("__", 1)
        stem = f"{lm}__{platform}__{split}"
        df = pd.read_parquet(f)
        write_parquet_atomic(df, dst / f"{stem}.parquet")
        summ = f.parent / "summary.json"
        meta = json.loads(summ.read_text()) if summ.is_file() else {}
        write_json_atomic(dst / f"{stem}.provenance.json",
                          {"source_run": str(f.parent), "n": int(len(df)), "sha256": sha256_file(dst / f"{stem}.parquet"),
                           **meta})
        out.append(dst / f"{stem}.parquet")
    if not out:
        raise UserError(f"no <lm>__<split>/spread.parquet under {src}")
    return out
