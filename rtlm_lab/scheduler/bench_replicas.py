"""Replica benchmark: what several engines of one LM give, and what an engine thread each buys (issue 18).

For one decoder-only LM on one platform, a saturation run (``n`` CCC user turns from the LM's committed
reference profile, all queued at t=0, FCFS, the platform's continuous engine with ``max_seqs``) on

* ``one``: one engine;
* ``threaded``: one engine per device in ``devices`` (replicas, each with its own copy of the weights; two on
  one device where the machine has one), each stepped by a thread of its own (``serve(threaded=True)``: what a
  run with ``platform.devices`` of several GPUs does);
* ``serial``: the same replicas stepped in turn by one loop (``threaded=False``: the serving loop before
  engine threads).

Every mode runs in a fresh process (timings from one process are not comparable across modes: caches, the
allocator, compiled kernels). Requests are placed by JSQ; all are queued at t=0, so each replica gets half.
Reported per mode: decode tokens/s (generated tokens / makespan) and its ratio to ``one``, the steps, the
share of each replica's step time that overlapped another replica's step (0 when stepped in turn), and whether
every request's greedy tokens equal the ``one`` run's. Writes ``outputs/bench/replicas_<platform>.json``.

Two replicas on *one* GPU say how far the host side (Python, kernel launches, the GIL) lets two engines
overlap; on two GPUs (``platform=cuda_x2``) the same bench is the two-GPU scaling.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Mapping, Sequence

log = logging.getLogger("rtlm_lab.bench")

MODES = ("one", "threaded", "serial")


def _overlap_share(steps: Mapping[str, Any]) -> float:
    """Share of the replicas' summed step time that overlapped another replica's step."""
    import numpy as np

    ids = list(steps)
    if len(ids) < 2:
        return 0.0
    total, over = 0.0, 0.0
    for i in ids:
        a = steps[i]
        s0, s1 = a["t_s"].to_numpy(float), (a["t_s"] + a["dt_s"]).to_numpy(float)
        total += float((s1 - s0).sum())
        for j in ids:
            if j == i:
                continue
            b = steps[j]
            b0, b1 = b["t_s"].to_numpy(float), (b["t_s"] + b["dt_s"]).to_numpy(float)
            # overlap of each step of i with every step of j (steps of one engine never overlap each other)
            ov = np.clip(np.minimum(s1[:, None], b1[None, :]) - np.maximum(s0[:, None], b0[None, :]), 0.0, None)
            over += float(ov.sum())
    return over / total if total > 0 else 0.0


def run_mode(mode: str, lm_name: str, platform: Mapping[str, Any], devices: Sequence[str], n: int,
             max_seqs: int) -> dict[str, Any]:
    """One mode in this process (the bench calls it in a fresh one): the saturation run and its facts."""
    import pandas as pd

    from rtlm_lab.lm.loader import lm_config, load_lm
    from rtlm_lab.paths import reference_dir
    from rtlm_lab.scheduler.continuous import _close, engine_config, make_backend
    from rtlm_lab.scheduler.engine import Engine, PredictorServer, WallClock, serve
    from rtlm_lab.scheduler.policies import Request, make_policy

    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}")
    spec = lm_config(lm_name)
    devs = [str(devices[0])] if mode == "one" else [str(d) for d in devices]
    lms = [load_lm(spec, {**platform, "device": d}) for d in devs]  # a copy of the weights per replica
    ecfg = {**engine_config(platform), "max_seqs": int(max_seqs)}
    prof = reference_dir() / "profiles" / f"{lm_name}__{platform.get('replica_of') or platform['name']}.parquet"
    texts = pd.read_parquet(prof)["text"].astype(str).tolist()
    texts = (texts * (n // len(texts) + 1))[:n]
    pol = make_policy("fcfs")
    engines = [Engine(f"e{k}", make_backend(lm, ecfg), pol, ecfg["max_seqs"], ecfg["max_batch_tokens"])
               for k, lm in enumerate(lms)]
    for e in engines:
        e.capacity_rps = 1.0
    reqs = [Request(request_id=f"q{i}", text=t, context="", arrival_s=0.0, n_input_tokens=1, true_tokens=1)
            for i, t in enumerate(texts)]
    clock = WallClock()
    try:
        jobs, facts = serve(reqs, pol, engines, clock, PredictorServer(reqs, (), clock),
                            threaded=(mode == "threaded") if len(engines) > 1 else False)
    finally:
        _close(engines)
    wall = max(j.finish_s for j in jobs)
    tokens = sum(j.generated for j in jobs)
    steps = facts["steps"]
    return {"mode": mode, "devices": devs, "n_engines": len(engines), "threaded": bool(facts["threaded"]),
            "tok_s": tokens / wall, "tokens": int(tokens), "makespan_s": wall,
            "steps": {k: int(len(v)) for k, v in steps.items()},
            "mean_step_ms": {k: 1e3 * float(v["dt_s"].mean()) for k, v in steps.items()},
            "overlap_share": _overlap_share(steps),
            "requests_per_engine": {e.id: int(sum(j.worker == e.id for j in jobs)) for e in engines},
            "output_ids": {j.rid: list(map(int, j.output_ids)) for j in jobs}}


def bench(lm_name: str, platform: Mapping[str, Any], devices: Sequence[str] | None = None, n: int = 256,
          max_seqs: int = 64, out: str | Path | None = None, config: Mapping[str, Any] | None = None,
          timeout_s: float = 1800.0) -> dict[str, Any]:
    """Every mode in a fresh process, then the JSON (see the module doc). ``devices``: the replicas' devices
    (default: ``platform.devices``, else the platform's device twice)."""
    from rtlm_lab.errors import UserError
    from rtlm_lab.io import provenance, write_json_atomic
    from rtlm_lab.lm.loader import resolve_device
    from rtlm_lab.paths import outputs_dir

    devs = [str(d) for d in (devices or platform.get("devices") or [platform.get("device", "cpu")] * 2)]
    if len(devs) < 2:
        raise UserError(f"bench=replicas needs two or more devices (got {devs}); bench.devices=[cuda:0,cuda:0] "
                        "puts two replicas on one GPU")
    resolve_device({**platform, "devices": devs})  # a missing GPU is one line, before any process starts
    res: dict[str, Any] = {"lm": lm_name, "platform": platform["name"], "devices": devs, "n_requests": int(n),
                           "max_seqs": int(max_seqs), "modes": {}}
    with tempfile.TemporaryDirectory() as tmp:
        for mode in MODES:
            f = Path(tmp) / f"{mode}.json"
            arg = json.dumps({"mode": mode, "lm": lm_name, "platform": dict(platform), "devices": devs, "n": int(n),
                              "max_seqs": int(max_seqs), "out": str(f)})
            t0 = time.perf_counter()
            p = subprocess.run([sys.executable, "-m", "rtlm_lab.scheduler.bench_replicas", arg],
                               env={**os.environ, "TOKENIZERS_PARALLELISM": "false"}, timeout=timeout_s,
                               capture_output=True, text=True)
            if p.returncode != 0 or not f.is_file():
                tail = (p.stderr or p.stdout).strip().splitlines()[-1:] or ["no output"]
                raise RuntimeError(f"bench=replicas mode {mode} failed (exit {p.returncode}): {tail[0]}")
            r = json.loads(f.read_text())
            r["process_s"] = round(time.perf_counter() - t0, 1)
            res["modes"][mode] = r
            log.info("%s %s: %.0f tok/s, overlap %.0f%%", lm_name, mode, r["tok_s"], 100 * r["overlap_share"])
    ref = res["modes"]["one"]["output_ids"]
    for mode, r in res["modes"].items():
        ids = r.pop("output_ids")
        r["tok_s_vs_one"] = r["tok_s"] / res["modes"]["one"]["tok_s"]
        r["identical_tokens"] = {"same": int(sum(ids.get(k) == v for k, v in ref.items())), "n": len(ref)}
    import torch

    res["device_name"] = (torch.cuda.get_device_name(0) if devs[0].startswith("cuda") else "cpu")
    res["provenance"] = provenance(dict(config or {}), lm=lm_name, platform=platform["name"])
    out = Path(out) if out else outputs_dir() / "bench" / f"replicas_{platform['name']}.json"
    write_json_atomic(out, res)
    print(json.dumps({m: {"tok_s": round(r["tok_s"]), "x_one": round(r["tok_s_vs_one"], 2),
                          "overlap": round(r["overlap_share"], 2), "identical": r["identical_tokens"]}
                      for m, r in res["modes"].items()}))
    print(f"wrote {out}")
    return res


if __name__ == "__main__":  # one mode, in a fresh process (called by bench())
    a = json.loads(sys.argv[1])
    result = run_mode(a["mode"], a["lm"], a["platform"], a["devices"], int(a["n"]), int(a["max_seqs"]))
    Path(a["out"]).write_text(json.dumps(result))
