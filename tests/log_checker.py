"""An independent check of a scheduling run's log: it imports nothing of ``rtlm_lab``.

From ``requests.parquet`` (and ``steps.parquet`` where present) it recomputes what ``metrics.json`` claims and
checks the log's own consistency:

* accounting: every request of the trace exactly once, every one finished with at least one token;
* causality: arrival <= eligible (prediction done) <= admitted < first token <= finish, response = finish - arrival;
* one engine step at a time per engine (steps do not overlap), never more running rows than ``max_seqs``;
* the headline numbers (mean / p50 / p99 response time over the measured rows, warm-up share left out,
  throughput, realized arrival rate and rho) within rounding of ``metrics.json``.

Usage: ``python tests/log_checker.py RUN_DIR [RUN_DIR ...]`` (exit 1 with one line per problem).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pandas as pd

EPS = 1e-6


def check(run_dir: Path) -> list[str]:
    run_dir = Path(run_dir)
    m = json.loads((run_dir / "metrics.json").read_text())
    r = pd.read_parquet(run_dir / "requests.parquet")
    bad: list[str] = []
    if r["request_id"].duplicated().any():
        bad.append("a request is recorded twice")
    trace = run_dir / "trace.parquet"
    if trace.is_file():
        t = pd.read_parquet(trace)
        if set(t["request_id"].astype(str)) != set(r["request_id"].astype(str)):
            bad.append("requests do not match the trace")
    if r["finish_s"].isna().any() or (r["actual_tokens"] < 1).any():
        bad.append("an unfinished request or one without tokens")
    order = [("arrival_s", "ready_s"), ("ready_s", "admit_s"), ("admit_s", "first_token_s"),
             ("first_token_s", "finish_s")]
    if "ready_s" not in r:  # the static-batch path: a request starts with its batch (start_s)
        order = [("arrival_s", "start_s"), ("start_s", "first_token_s"), ("first_token_s", "finish_s")]
    for a, b in order:
        strict = (a, b) in (("admit_s", "first_token_s"), ("start_s", "first_token_s"))  # out of a step, after it starts
        viol = (r[b] < r[a] + EPS) if strict else (r[b] < r[a] - EPS)
        if viol.any():
            bad.append(f"{int(viol.sum())} request(s) with {b} {'<=' if strict else '<'} {a}")
    if not np.allclose(r["response_s"], r["finish_s"] - r["arrival_s"], atol=1e-6):
        bad.append("response_s != finish_s - arrival_s")
    steps = run_dir / "steps.parquet"
    if steps.is_file():
        s = pd.read_parquet(steps)
        for eng, g in s.groupby("engine") if "engine" in s else [("main", s)]:
            g = g.sort_values("t_s")
            if (g["t_s"].to_numpy()[1:] < (g["t_s"] + g["dt_s"]).to_numpy()[:-1] - 1e-4).any():
                bad.append(f"engine {eng}: overlapping steps")
        cap = (m.get("engine_config") or {}).get("max_seqs")
        if cap and (s["n_seqs"] > int(cap)).any():
            bad.append(f"a step ran more than max_seqs={cap} rows")
    w = r[~r["warmup"]] if "warmup" in r else r
    rt = w["response_s"].to_numpy(float)
    claims = {"mean_rt_s": rt.mean(), "p50_rt_s": np.percentile(rt, 50), "p99_rt_s": np.percentile(rt, 99)}
    makespan = r["finish_s"].max() - r["arrival_s"].min()
    claims["throughput_rps"] = len(r) / makespan
    arr = np.sort(r["arrival_s"].to_numpy(float))
    if len(arr) > 1 and arr[-1] > arr[0]:
        claims["realized_arrival_rate_rps"] = (len(arr) - 1) / (arr[-1] - arr[0])
        if m.get("capacity_rps"):
            claims["realized_rho"] = claims["realized_arrival_rate_rps"] / float(m["capacity_rps"])
    if m.get("n_warmup_excluded") is not None and int(m["n_warmup_excluded"]) != int(len(r) - len(w)):
        bad.append("warm-up exclusion count differs")
    for k, v in claims.items():
        if k in m and m[k] is not None and not np.isclose(float(m[k]), float(v), rtol=1e-6, atol=1e-9):
            bad.append(f"{k}: metrics.json says {m[k]}, the log gives {v}")
    return bad


def main(argv: list[str]) -> int:
    problems = 0
    for d in argv:
        for p in check(Path(d)):
            print(f"{d}: {p}")
            problems += 1
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
