"""Overhead of length prediction: microseconds per prompt, and its share of each LM's service time.

``rtlm-bench bench=regressor`` (:func:`bench`) measures, in one process and one run (so the ratios are taken
under the same machine load):

* ``rtlm_ridge``: RT-LM's predictor (uncertainty features with spaCy + ridge), ``features + predict``;
* ``proxy_minilm``: all-MiniLM-L6-v2 embedding + ridge (the SSJF / S3-style proxy), ``embed + predict``;

each at batch 1 (``bench.n_single`` prompts one at a time; median per prompt) and batched (one call over
``bench.batch`` prompts, per prompt; best of ``bench.repeats``). The two methods are timed interleaved, so a burst
of load from other processes hits both. Both models are fitted on a reference profile's requests (texts are the
profile's real CCC requests). The share of service time divides that cost by the mean ``e2e_s`` of every
reference profile (per LM and platform). Wall-clock on this machine's CPU (``machine.loadavg_1m`` in the
provenance says how loaded it was). Writes ``outputs/bench/regressor.json``.
"""

from __future__ import annotations

import statistics
import time
from pathlib import Path

import pandas as pd


def _per_prompt_batched(fn, texts) -> float:
    t0 = time.perf_counter()
    fn(texts)
    return (time.perf_counter() - t0) / len(texts) * 1e6


def run_bench(n_single: int = 32, batch: int = 256, repeats: int = 3, fit_profile: Path | None = None) -> dict:
    from rtlm_lab.errors import UserError
    from rtlm_lab.paths import reference_dir
    from rtlm_lab.regressor import features as F
    from rtlm_lab.regressor.baselines import ProxyMiniLM
    from rtlm_lab.regressor.predictor import LengthPredictor

    profiles = sorted((reference_dir() / "profiles").glob("*__*.parquet"))
    if fit_profile is None:
        if not profiles:
            raise UserError(f"no reference profiles in {reference_dir() / 'profiles'}; run `rtlm-profile` and "
                            f"`rtlm-reference target=profiles target.runs=[<run dir>]` first")
        fit_profile = max(profiles, key=lambda p: len(pd.read_parquet(p, columns=["text"])))
    df = pd.read_parquet(fit_profile)
    texts = df["text"].fillna("").astype(str).tolist()
    y = df["n_output_tokens"].to_numpy(float)
    ours = LengthPredictor(kind="ridge").fit(texts, y)
    proxy = ProxyMiniLM().fit(texts, y)
    F.embed(texts[:8])  # warm both paths
    ours.predict(texts[:8])
    reps = (texts * (batch // max(1, len(texts)) + 1))[:batch]
    single = texts[:n_single]
    methods = {
        "rtlm_ridge": lambda t: ours.predict(t),
        "proxy_minilm": lambda t: proxy.predict(t),
    }
    # interleaved (ours, proxy, ours, proxy...) so both see the same machine load; median / min of repeats
    single_t = {m: [] for m in methods}
    for t in single:
        for m, fn in methods.items():
            t0 = time.perf_counter()
            fn([t])
            single_t[m].append(time.perf_counter() - t0)
    batch_t = {m: [] for m in methods}
    for _ in range(int(repeats)):
        for m, fn in methods.items():
            batch_t[m].append(_per_prompt_batched(fn, reps))
    cost = {m: {"us_per_prompt_batch1": statistics.median(single_t[m]) * 1e6,
                f"us_per_prompt_batch{batch}": min(batch_t[m])} for m in methods}
    service = []
    for p in profiles:
        d = pd.read_parquet(p, columns=["lm", "platform", "e2e_s"])
        lm, plat = p.stem.split("__", 1)
        mean_e2e = float(d["e2e_s"].mean())
        row = {"lm": lm, "platform": plat, "n": int(len(d)), "mean_e2e_s": mean_e2e}
        for m, c in cost.items():
            for k, us in c.items():
                row[f"{m}_share_{k.replace('us_per_prompt_', '')}"] = us * 1e-6 / mean_e2e
        service.append(row)
    return {"fit_profile": str(fit_profile), "n_single": len(single), "batch": batch, "cost": cost,
            "ratio_proxy_over_ours": {k: cost["proxy_minilm"][k] / cost["rtlm_ridge"][k]
                                      for k in cost["rtlm_ridge"]},
            "share_of_service_time": service}


def bench(n_single: int = 32, batch: int = 256, repeats: int = 3, out: str | Path | None = None,
          config=None) -> dict:
    """:func:`run_bench`, written to ``out`` (default outputs/bench/regressor.json) with its provenance."""
    from rtlm_lab.io import provenance, write_json_atomic
    from rtlm_lab.paths import outputs_dir

    res = run_bench(n_single, batch, repeats)
    res["provenance"] = provenance(config)
    out = Path(out) if out else outputs_dir() / "bench" / "regressor.json"
    write_json_atomic(out, res)
    print(pd.DataFrame(res["cost"]).T.round(1).to_string())
    print(pd.DataFrame(res["share_of_service_time"]).round(4).to_string(index=False))
    print(f"wrote {out}")
    return res
