"""Where the length predictors should run: a thread of the serving process, or a process of their own.

``rtlm-bench bench=predictor`` (:func:`bench`) times one prediction per arriving request (``predict_one``, as the
static path's dispatcher calls it) for RT-LM's predictor (spaCy features + ridge) and the MiniLM proxy, in the
serving process (``scheduler.predictor_process=false``, every committed run) and through
:class:`~rtlm_lab.scheduler.predproc.PredictorProcess` (``true``; with ``bench.process_threads``, a third mode:
the process with that many torch threads, ``scheduler.predictor_threads``), under three conditions:

* ``alone``: nothing else runs;
* ``beside_decode``: a thread of the same process decodes with a real LM (``bench.lm``) on ``platform`` (cpu:
  as the CPU platform's engine does; cuda: the host side of a real GPU decode loop);
* ``beside_host_loop``: a thread runs pure-Python work, which holds the GIL between short releases: the host
  side of a GPU decode loop, whose kernels run on the device (emulated: this machine may have no GPU).

Both modes are timed interleaved, request by request, so they see the same machine load. Reported: the median
milliseconds per request and the ratios ``beside / alone`` per mode and ``process / thread`` per condition.
Writes ``outputs/bench/predictor_<platform>.json``.
"""

from __future__ import annotations

import statistics
import threading
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Any, Mapping

import pandas as pd

METHODS = {"rtlm": ("pred_rtlm",), "proxy_minilm": ("pred_proxy",)}


def _host_loop(stop: threading.Event) -> None:
    while not stop.is_set():
        sum(i * i for i in range(200))


def _decode_loop(lm, texts, stop: threading.Event) -> None:
    i = 0
    while not stop.is_set():
        lm.generate([texts[i % len(texts)]], [""])
        i += 1


def run_bench(n_single: int = 24, lm_name: str = "dialogpt_ccc", fit_profile: Path | None = None,
              platform: Mapping[str, Any] | None = None, process_threads: int | None = None) -> dict:
    from rtlm_lab.errors import UserError
    from rtlm_lab.lm.loader import lm_config, load_lm
    from rtlm_lab.paths import reference_dir
    from rtlm_lab.scheduler.predictions import Predictors
    from rtlm_lab.scheduler.predproc import PredictorProcess

    fit_profile = fit_profile or reference_dir() / "profiles" / "gemma3_270m__cpu.parquet"
    if not Path(fit_profile).is_file():
        raise UserError(f"no profile {fit_profile} to fit the predictors on")
    df = pd.read_parquet(fit_profile)
    texts = df["text"].fillna("").astype(str).tolist()
    pred = Predictors(columns=("pred_rtlm", "uncertainty", "pred_proxy")).fit(texts, df["n_output_tokens"])
    import torch

    threads = torch.get_num_threads()  # before the LM loads (a cpu platform's threads would change it)
    platform = dict(platform or {"name": "cpu", "device": "cpu", "dtype": "float32"})
    lm = load_lm(lm_config(lm_name), platform)
    prompts = texts[:n_single]
    res: dict[str, Any] = {"fit_profile": str(fit_profile), "lm": lm_name, "platform": platform.get("name"),
                           "decode_device": str(platform.get("device", "cpu")), "n_single": len(prompts),
                           "torch_threads": threads, "process_threads": process_threads, "ms": {}}
    with PredictorProcess(pred, threads=threads) as proc, \
            (PredictorProcess(pred, threads=process_threads) if process_threads else nullcontext()) as proc_k:
        modes = {"thread": pred, "process": proc}
        if proc_k is not None:  # a third mode: the process with fewer threads (scheduler.predictor_threads)
            modes[f"process_{process_threads}t"] = proc_k
        for p in modes.values():  # warm-up: spaCy and MiniLM load
            p.predict_one(prompts[0], ("pred_rtlm", "pred_proxy"))
        for cond in ("alone", "beside_decode", "beside_host_loop"):
            stop = threading.Event()
            th = None
            if cond == "beside_decode":
                th = threading.Thread(target=_decode_loop, args=(lm, texts[100:140], stop), daemon=True)
            elif cond == "beside_host_loop":
                th = threading.Thread(target=_host_loop, args=(stop,), daemon=True)
            if th is not None:
                th.start()
                time.sleep(0.5)
            t = {(m, mode): [] for m in METHODS for mode in modes}
            try:
                for text in prompts:
                    for m, cols in METHODS.items():
                        for mode, p in modes.items():
                            t[(m, mode)].append(p.predict_one(text, cols)[1])
            finally:
                stop.set()
                if th is not None:
                    th.join(timeout=60)
            res["ms"][cond] = {f"{m}/{mode}": statistics.median(v) * 1e3 for (m, mode), v in t.items()}
    ms = res["ms"]
    res["beside_over_alone"] = {c: {k: v / ms["alone"][k] for k, v in ms[c].items()} for c in ms if c != "alone"}
    res["process_over_thread"] = {c: {f"{m}/{mode}": ms[c][f"{m}/{mode}"] / ms[c][f"{m}/thread"]
                                      for m in METHODS for mode in modes if mode != "thread"} for c in ms}
    return res


def bench(n_single: int = 24, lm_name: str = "dialogpt_ccc", out: str | Path | None = None,
          config: Mapping[str, Any] | None = None, platform: Mapping[str, Any] | None = None,
          process_threads: int | None = None) -> dict:
    """:func:`run_bench`, written to ``out`` (default outputs/bench/predictor_<platform>.json) with its provenance."""
    from rtlm_lab.io import provenance, write_json_atomic
    from rtlm_lab.paths import outputs_dir

    res = run_bench(n_single, lm_name, platform=platform, process_threads=process_threads)
    res["provenance"] = provenance(config)
    out = Path(out) if out else outputs_dir() / "bench" / f"predictor_{res['platform']}.json"
    write_json_atomic(out, res)
    print("median ms per request\n" + pd.DataFrame(res["ms"]).round(2).to_string())
    print("process / thread\n" + pd.DataFrame(res["process_over_thread"]).round(2).to_string())
    print(f"wrote {out}")
    return res
