"""Engine benchmark: the serving core (``kv``) against plain ``generate`` and the earlier engines, per LM and dtype.

For each decoder-only LM (and each dtype in ``dtypes``), on the committed CCC test prompts:

* **throughput** at each concurrency ``B``: ``B`` requests queued at t=0, FCFS, ``max_seqs = B``; plain
  ``generate`` runs them as one left-padded batch; each engine backend serves them (greedy to the end of turn:
  the same work as ``generate``). Tokens/s = generated tokens / wall seconds after the warm-up.
* **lockstep decode** (kv): every request pinned to ``pinned_tokens`` (end of turn ignored), so all rows decode
  together; ``decode_tok_s`` counts only the pure-decode steps (tokens / their seconds), ``step_ms`` their mean.
* **token match**: ``n_check`` requests joining and leaving (``max_seqs`` 4) against batch-1 ``generate``: the
  share identical, and for each mismatch the first token that differs.
* **capacity** (kv, ``capacity.max_seqs`` rows): saturation (``4 x max_seqs`` requests queued at t=0) gives the
  capacity; then Poisson arrivals at ``rho x capacity`` (seeded, rescaled to the exact rate), lengths pinned to
  the LM's profiled replies, FCFS and preemptive SRPT on the same trace: completions against arrivals over the
  second half of the arrival window (stable: >= 0.95), mean step, pauses and evictions.

``random_init`` dirs (config + tokenizer, no weights) time an architecture where its weights cannot be had.
Writes ``outputs/bench/engine[_<platform>].json`` (atomic) with the device's name and the provenance.
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


def _serve(lm, ecfg, backend_name, reqs, max_seqs, policy="fcfs", pin=False):
    from rtlm_lab.scheduler.continuous import make_backend
    from rtlm_lab.scheduler.engine import Engine, PredictorServer, WallClock, serve
    from rtlm_lab.scheduler.policies import make_policy

    mbt = max(int(ecfg["max_batch_tokens"]), 64)
    backend = make_backend(lm, {**ecfg, "backend": backend_name, "max_batch_tokens": mbt, "pin_lengths": pin},
                           max_seqs=max_seqs)
    pol = make_policy(policy)
    eng = Engine("main", backend, pol, max_seqs, mbt)
    clock = WallClock()
    jobs, facts = serve(reqs, pol, [eng], clock, PredictorServer(reqs, (), clock))  # warm-up before the clock
    extra = backend.facts() if hasattr(backend, "facts") else {}
    backend.close()
    return jobs, facts["steps"]["main"], extra


def _reqs(texts, prefix, true_tokens=None, arrivals=None):
    from rtlm_lab.scheduler.policies import Request

    return [Request(request_id=f"{prefix}{i}", text=t, context="", arrival_s=float(arrivals[i]) if arrivals is not None
                    else 0.0, n_input_tokens=1, true_tokens=int(true_tokens[i]) if true_tokens is not None else 1)
            for i, t in enumerate(texts)]


def _first_diff(a: Sequence[int], b: Sequence[int]) -> int:
    for k, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return k
    return min(len(a), len(b))


def _capacity(lm, ecfg, texts, lengths, cap_cfg: Mapping[str, Any], seed: int) -> dict[str, Any]:
    """Saturation, then Poisson at rho x capacity with FCFS and SRPT (pinned lengths); see the module doc."""
    import numpy as np

    from rtlm_lab.scheduler.workload import arrival_times

    m = int(cap_cfg.get("max_seqs", ecfg["max_seqs"]))
    rng = np.random.default_rng(seed)
    n_sat = 4 * m
    idx = rng.integers(0, len(texts), size=n_sat)
    jobs, steps, _ = _serve(lm, ecfg, "kv", _reqs([texts[i] for i in idx], "s", [lengths[i] for i in idx]), m,
                            pin=True)
    cap = n_sat / max(j.finish_s for j in jobs)
    rho = float(cap_cfg.get("rho", 0.9))
    n = int(cap_cfg.get("n_requests", 1000))
    idx = rng.integers(0, len(texts), size=n)
    arr = arrival_times("poisson", rho * cap, n, seed=seed)
    out: dict[str, Any] = {"max_seqs": m, "saturation_requests": n_sat, "capacity_rps": cap, "rho": rho,
                           "n_requests": n, "rate_rps": rho * cap, "arrival_window_s": float(arr.max())}
    for pol in cap_cfg.get("policies", ["fcfs", "oracle_srpt"]):
        rs = _reqs([texts[i] for i in idx], "p", [lengths[i] for i in idx], arr)
        jobs, steps, extra = _serve(lm, ecfg, "kv", rs, m, policy=pol, pin=True)
        fin = np.array([j.finish_s for j in jobs])
        a = np.array([j.req.arrival_s for j in jobs])
        half, end = float(arr.max()) / 2, float(arr.max())
        arrived = int(((a >= half) & (a <= end)).sum())
        completed = int(((fin >= half) & (fin <= end)).sum())
        rt = fin - a
        dec = steps[steps["n_tokens"] == steps["n_seqs"]]
        out[pol] = {"completed_over_arrived_2nd_half": completed / max(1, arrived), "stable": completed >= 0.95 * arrived,
                    "mean_rt_s": float(rt.mean()), "p99_rt_s": float(np.quantile(rt, 0.99)),
                    "mean_step_ms": 1e3 * float(steps["dt_s"].mean()),
                    "mean_decode_step_ms": 1e3 * float(dec["dt_s"].mean()) if len(dec) else None,
                    "mean_rows": float(steps["n_seqs"].mean()), "steps": int(len(steps)),
                    "mixed_step_share": float((steps["n_tokens"] > steps["n_seqs"]).mean()),
                    "steps_paused": int(sum(j.steps_paused for j in jobs)), "evictions": int(extra.get("evictions", 0)),
                    "engine": extra}
        log.info("capacity %s: %.1f req/s, rho %.2f %s: 2nd-half completions/arrivals %.3f, mean RT %.3f s", lm.name,
                 cap, rho, pol, out[pol]["completed_over_arrived_2nd_half"], out[pol]["mean_rt_s"])
    return out


def bench_engine(lm_names: Sequence[str], platform: Mapping[str, Any], concurrency: Sequence[int] = (1, 8, 64, 256),
                 max_new_tokens: int | None = None, n_check: int = 16, random_init: Mapping[str, str] | None = None,
                 out: Path | None = None, backends: Sequence[str] = ("kv", "slots"), dtypes: Sequence[str] | None = None,
                 pinned_tokens: int = 128, capacity: Mapping[str, Any] | None = None, seed: int = 0) -> dict[str, Any]:
    import pandas as pd
    import torch

    from rtlm_lab.io import provenance, write_json_atomic
    from rtlm_lab.paths import outputs_dir, reference_dir
    from rtlm_lab.scheduler.continuous import engine_config

    random_init = dict(random_init or {})
    dtypes = list(dtypes or [str(platform.get("dtype", "float32"))])
    # the committed test-split requests (CCC user turns): the same on every machine, no corpus build needed
    pool = pd.read_parquet(reference_dir() / "profiles" / "dialogpt_ccc__cpu.parquet")["text"].astype(str).tolist()
    need = max(max(concurrency), n_check)
    texts = (pool * (need // len(pool) + 1))[:need]
    res: dict[str, Any] = {"platform": platform["name"], "concurrency": list(concurrency), "dtypes": dtypes,
                           "pinned_tokens": int(pinned_tokens), "lms": {}}
    res["device_name"] = (torch.cuda.get_device_name(0) if str(platform.get("device", "cpu")).startswith("cuda")
                          else f"cpu ({torch.get_num_threads()} threads)")
    out = Path(out) if out else outputs_dir() / "bench" / f"engine_{platform['name']}.json"

    res["provenance"] = provenance({"lms": list(lm_names), "platform": dict(platform), "concurrency": list(concurrency),
                                    "dtypes": dtypes, "backends": list(backends), "capacity": dict(capacity or {})})

    def save(done: bool) -> None:  # after every stage: a long run that is cut short keeps what it measured
        res["complete"] = done
        write_json_atomic(out, res)

    for name in lm_names:
        res["lms"][name] = {}
        for dt in dtypes:
            lm = _load(name, {**platform, "dtype": dt}, random_init.get(name))
            if max_new_tokens:
                lm.spec["max_new_tokens"] = int(max_new_tokens)
            ecfg = engine_config(platform)
            row: dict[str, Any] = {"random_init": bool(random_init.get(name)), "max_new_tokens": lm.spec["max_new_tokens"],
                                   "plain": {}, **{b: {} for b in backends}, "kv_lockstep": {}}
            lm.generate(texts[:2])  # warm-up of the plain path
            for B in concurrency:
                batch = texts[:B]
                lm._sync()
                t0 = time.perf_counter()
                gens = lm.generate(batch)
                lm._sync()
                wall = time.perf_counter() - t0
                ntok = sum(g.n_output_tokens for g in gens)
                row["plain"][str(B)] = {"tok_s": ntok / wall, "tokens": ntok, "wall_s": wall}
                for bk in backends:
                    jobs, steps, extra = _serve(lm, ecfg, bk, _reqs(batch, "b"), max(B, 1))
                    w = max(j.finish_s for j in jobs)
                    etok = sum(j.generated for j in jobs)
                    row[bk][str(B)] = {"tok_s": etok / w, "tokens": etok, "wall_s": w, "steps": int(len(steps)),
                                       "mean_step_ms": 1e3 * float(steps["dt_s"].mean()), **(
                                           {"engine": extra} if extra else {})}
                    log.info("%s %s B=%d: plain %.0f tok/s, %s %.0f tok/s", name, dt, B, ntok / wall, bk, etok / w)
                if "kv" in backends:  # all rows in lockstep: the decode rate
                    jobs, steps, extra = _serve(lm, ecfg, "kv", _reqs(batch, "l", [pinned_tokens] * B), max(B, 1),
                                                pin=True)
                    dec = steps[steps["n_tokens"] == steps["n_seqs"]]
                    w = max(j.finish_s for j in jobs)
                    row["kv_lockstep"][str(B)] = {
                        "decode_tok_s": float(dec["n_seqs"].sum() / dec["dt_s"].sum()) if len(dec) else None,
                        "decode_step_ms": 1e3 * float(dec["dt_s"].mean()) if len(dec) else None,
                        "tok_s": sum(j.generated for j in jobs) / w, "wall_s": w, "steps": int(len(steps)),
                        "graph_steps": extra.get("graph_steps"), "eager_steps": extra.get("eager_steps")}
                    log.info("%s %s B=%d lockstep: decode %.0f tok/s (%.2f ms a step)", name, dt, B,
                             row["kv_lockstep"][str(B)]["decode_tok_s"] or 0, row["kv_lockstep"][str(B)]["decode_step_ms"] or 0)
                res["lms"][name][dt] = row
                save(False)
            sample = texts[:n_check]
            ref = [lm.generate([t])[0] for t in sample]
            row["token_match"] = {}
            for bk in backends:
                jobs, _, _ = _serve(lm, ecfg, bk, _reqs(sample, "c"), min(4, n_check))
                got = {j.rid: j for j in jobs}
                diffs = {}
                for i, g in enumerate(ref):
                    o = got[f"c{i}"].output_ids
                    if o != list(g.output_ids):
                        diffs[f"c{i}"] = {"first_diff": _first_diff(o, list(g.output_ids)), "n_ref": len(g.output_ids),
                                          "n_got": len(o)}
                row["token_match"][bk] = {"same": len(ref) - len(diffs), "n": len(ref),
                                          "rate": (len(ref) - len(diffs)) / len(ref), "mismatches": diffs}
            save(False)
            if capacity and "kv" in backends and dt in (capacity.get("dtypes") or [dt]):
                prof = reference_dir() / "profiles" / f"{name}__{platform['name']}.parquet"
                p = pd.read_parquet(prof) if prof.exists() else None
                if p is not None:
                    row["capacity"] = _capacity(lm, ecfg, p["text"].astype(str).tolist(),
                                                p["n_output_tokens"].clip(lower=1).astype(int).tolist(), capacity, seed)
                    row["capacity"]["lengths_from"] = str(prof.relative_to(reference_dir()))
            res["lms"][name][dt] = row
            del lm
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
    res["torch"] = torch.__version__
    save(True)
    summary = {n: {dt: {"match": {b: r["token_match"][b]["rate"] for b in r["token_match"]},
                        **{k: {b: round(v["tok_s"]) for b, v in r[k].items()} for k in ("plain", *backends)},
                        "lockstep_decode": {b: round(v["decode_tok_s"] or 0) for b, v in r["kv_lockstep"].items()}}
                   for dt, r in d.items()} for n, d in res["lms"].items()}
    print(json.dumps(summary))
    print(f"wrote {out}")
    return res
