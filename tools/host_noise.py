"""How far this machine's speed moves on its own: back-to-back saturation runs of the kv engine.

    .venv/bin/python tools/host_noise.py --seconds 240 --out /tmp/host_noise.csv

Each run queues ``--requests`` requests of DialoGPT-ccc's CPU profile at t=0 (FCFS, 4 rows, 8 KV slots,
pinned lengths: :func:`rtlm_lab.scheduler.continuous.saturation`) and records the capacity it measured and
its median 4-row decoding step, alternating ``--threads`` between runs. Run it with nothing else on the
machine. The committed measurement: ``outputs/reference/protocol/cpu_host_noise_2026-12-08.csv`` (capacity
CV 7-8% between 6-second runs on the shared 2-core box, one thread no steadier than two), the reason
``box.sh group`` reruns drifted seeds there (``DRIFT_RERUNS``)."""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seconds", type=float, default=240.0, help="how long to keep running (default 240)")
    ap.add_argument("--requests", type=int, default=64, help="requests a saturation run (default 64)")
    ap.add_argument("--threads", default="1,2", help="torch threads to alternate (default 1,2)")
    ap.add_argument("--out", default="host_noise.csv", help="csv written at the end (default host_noise.csv)")
    a = ap.parse_args(argv)
    import pandas as pd
    import torch

    from rtlm_lab.lm.loader import lm_config, load_lm
    from rtlm_lab.paths import ROOT
    from rtlm_lab.scheduler.continuous import EngineFactory, _pool, engine_config, saturation

    logging.disable(logging.WARNING)
    threads = [int(t) for t in a.threads.split(",")]
    lm = load_lm(lm_config("dialogpt_ccc"), {"name": "cpu", "device": "cpu", "dtype": "float32",
                                             "threads": threads[0]})
    pool = _pool(pd.read_parquet(ROOT / "outputs/reference/profiles/dialogpt_ccc__cpu.parquet"))
    ecfg = engine_config({"engine": {"backend": "kv", "max_seqs": 4, "kv_slots": 8, "max_batch_tokens": 1024,
                                     "page_size": 64, "num_blocks": 256, "cuda_graphs": False},
                          "device": "cpu", "dtype": "float32"})
    fac = EngineFactory("real", {**ecfg, "pin_lengths": True}, lm=lm)
    rows, t0, i = [], time.time(), 0
    while time.time() - t0 < a.seconds:
        th = threads[i % len(threads)]
        torch.set_num_threads(th)
        cap, steps = saturation(fac, pool, a.requests, 0)
        four = steps[(steps["n_seqs"] == 4) & (steps["n_tokens"] == 4)]
        rows.append({"i": i, "threads": th, "t": time.time() - t0, "cap": cap["capacity_rps"],
                     "med_ms": 1e3 * float(four["dt_s"].median())})
        print(rows[-1], flush=True)
        i += 1
    d = pd.DataFrame(rows)
    print(d.groupby("threads").agg(cap_mean=("cap", "mean"), cap_cv=("cap", lambda x: x.std() / x.mean()),
                                   cap_max_over_min=("cap", lambda x: x.max() / x.min()),
                                   median_step_ms=("med_ms", "median")))
    d.to_csv(a.out, index=False)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
