"""One scheduling experiment on the continuous-batching engine (``scheduler.engine=continuous``, the default
for decoder-only LMs): the fair harness.

Every policy gets the same engine(s), built from the platform config alone (``platform.engine``: concurrency
``max_seqs``, ``max_batch_tokens``, KV pages), the same trace and the same predictor server; policies differ
only in order (and preemption) and placement. Steps of a run:

1. **capacity** (:func:`measure_capacity`): a saturation run of the same engine on the workload's own length
   mix (:func:`capacity_requests` held-out requests, all queued at t=0, FCFS): decode tokens/s while the
   queue is non-empty, divided by the mix's mean output tokens = requests/s. Its steps also fit the engine's
   :class:`~rtlm_lab.scheduler.engine.StepModel` (what the simulator replays). Cached per LM x platform x
   engine config under ``outputs/schedule/capacity/`` (``scheduler.recalibrate=true`` measures again); the
   warm-up (CUDA graphs, kernels) runs before any clock, whatever the cache holds;
2. **trace**: ``workload.n_requests`` held-out requests, Poisson/gamma/MMPP arrivals at
   ``rate = workload.rho x capacity``;
3. **predictions on the clock**: a predictor thread (real) / a modelled predictor with the measured batch cost
   (sim) makes each request eligible only when its prediction is done;
4. **serve** (:func:`~rtlm_lab.scheduler.engine.serve`) and write ``trace.parquet``, ``requests.parquet`` (one
   row per request), ``steps.parquet`` (one row per engine step) and ``metrics.json``
   (:func:`run_metrics`: the first ``scheduler.warmup_frac`` of arrivals are left out of the metrics, and said
   so; realized arrival rate and utilization beside the nominal rho).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import time
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import pandas as pd

from rtlm_lab.errors import UserError
from rtlm_lab.scheduler.engine.build import make_backend  # noqa: F401 - re-exported
from rtlm_lab.scheduler.engine import (Engine, PredCost, PredictorServer, ProcessBackend, SimBackend,
                                       StepModel, VirtualClock, WallClock, serve)
from rtlm_lab.scheduler.policies import Policy, Request, make_policy
from rtlm_lab.scheduler.workload import realized_arrival_rate

log = logging.getLogger("rtlm_lab.scheduler")

ENGINE_DEFAULTS = {"backend": "kv", "max_seqs": 8, "max_batch_tokens": 1024, "cuda_graphs": None}
# each backend's own budgets (only these enter its config, so a measured engine's key never changes when another
# backend gains a setting)
BACKEND_DEFAULTS = {"kv": {"kv_slots": None, "max_len": None},
                    "slots": {"page_size": 64, "num_blocks": None},
                    "paged": {"page_size": 64, "num_blocks": None}}
BACKENDS = tuple(BACKEND_DEFAULTS)


def engine_config(platform: Mapping[str, Any]) -> dict[str, Any]:
    """The platform's engine budgets (the same for every policy): the common ones and the chosen backend's."""
    given = dict(platform.get("engine") or {})
    backend = given.get("backend", ENGINE_DEFAULTS["backend"])
    if backend not in BACKENDS:
        raise UserError(f"unknown platform.engine.backend {backend!r}; choose one of: {', '.join(BACKENDS)}")
    own = BACKEND_DEFAULTS[backend]
    cfg = {**ENGINE_DEFAULTS, **own, **{k: v for k, v in given.items() if k in ENGINE_DEFAULTS or k in own}}
    for k in ("max_seqs", "max_batch_tokens", "page_size", "kv_slots", "max_len"):
        if k not in cfg or (cfg[k] is None and k in ("kv_slots", "max_len")):
            continue
        try:
            cfg[k] = int(cfg[k])
        except (TypeError, ValueError):
            raise UserError(f"platform.engine.{k} must be an integer (got {cfg[k]!r})") from None
        if cfg[k] < 1:
            raise UserError(f"platform.engine.{k} must be >= 1 (got {cfg[k]})")
    if backend == "kv" and cfg["kv_slots"] is not None and cfg["kv_slots"] < cfg["max_seqs"]:
        raise UserError(f"platform.engine.kv_slots ({cfg['kv_slots']}) must be >= max_seqs ({cfg['max_seqs']})")
    return cfg


def sim_kv_slots(ecfg: Mapping[str, Any]) -> int | None:
    """The KV slots the simulator models: the kv engine's (its default ``2 x max_seqs``), else unlimited."""
    if ecfg.get("backend", "kv") != "kv":
        return None
    return int(ecfg.get("kv_slots") or 2 * int(ecfg["max_seqs"]))


def measured_engine_config(platform: Mapping[str, Any]) -> dict[str, Any]:
    """The config a measured capacity is keyed by (:func:`capacity_cache`): the engine budgets, plus the size
    of the measured set: ``n_engines`` for GPU replicas (``platform.devices``), the CPU offload workers (part of
    the set for every policy)."""
    ecfg = engine_config(platform)
    n_dev = len(platform.get("devices") or [None])
    if n_dev > 1:  # replicas: capacity is measured (and cached) for the whole set
        ecfg = {**ecfg, "n_engines": n_dev}
    n_off = int(platform.get("offload_workers", 0) or 0)
    if n_off:
        ecfg = {**ecfg, "offload_workers": n_off, "offload_threads": int(platform.get("offload_threads", 4))}
    return ecfg


def engine_key(lm: str, platform: str, ecfg: Mapping[str, Any]) -> str:
    h = hashlib.sha256(json.dumps(dict(ecfg), sort_keys=True, default=str).encode()).hexdigest()[:8]
    return f"{lm}__{platform}__{h}"


def capacity_cache(lm: str, platform: str, ecfg: Mapping[str, Any]) -> Path:
    from rtlm_lab.paths import outputs_dir

    return outputs_dir() / "schedule" / "capacity" / f"{engine_key(lm, platform, ecfg)}.json"


def reference_capacity(lm: str, platform: str, ecfg: Mapping[str, Any]) -> Path:
    from rtlm_lab.paths import reference_dir

    return reference_dir() / "scheduler" / "engine" / f"{engine_key(lm, platform, ecfg)}.json"


def to_requests(df: pd.DataFrame, keep_predictions: bool) -> list[Request]:
    out = []
    for row in df.itertuples(index=False):
        pred = {}
        if keep_predictions:
            for c in ("pred_rtlm", "uncertainty", "pred_proxy", "ltr_score"):
                v = getattr(row, c, None)
                if v is not None and not (isinstance(v, float) and math.isnan(v)):
                    pred[c] = float(v)
            q = getattr(row, "pred_quantiles", None)  # the distribution-aware policies' predicted quantiles
            if q is not None and not (isinstance(q, float) and math.isnan(q)):
                pred["pred_quantiles"] = tuple(float(x) for x in q)
        lengths = getattr(row, "lengths", None)  # a spread profile: the prompt's sampled lengths (oracle_dist)
        out.append(Request(request_id=str(row.request_id), text=str(row.text),
                           context=str(getattr(row, "context", "") or ""),
                           arrival_s=float(getattr(row, "arrival_s", 0.0)), n_input_tokens=int(row.n_input_tokens),
                           true_tokens=int(row.true_tokens), pred=pred,
                           isolated_s=float(getattr(row, "isolated_s", math.nan)),
                           true_dist=tuple(int(x) for x in lengths) if lengths is not None and not (
                               isinstance(lengths, float) and math.isnan(lengths)) else ()))
    return out


def _pool(held: pd.DataFrame) -> pd.DataFrame:
    pool = held.rename(columns={"n_output_tokens": "true_tokens"})
    cols = [c for c in ("request_id", "text", "context", "n_input_tokens", "true_tokens", "pred_rtlm",
                        "uncertainty", "pred_proxy", "ltr_score", "pred_quantiles", "lengths") if c in pool.columns]
    pool = pool[cols].copy()
    pool["context"] = pool["context"].fillna("").astype(str) if "context" in pool else ""
    return pool


class EngineFactory:
    """Builds the run's engines from the platform config (real: one per device, sharing a loaded LM where
    the device is the same; sim: the step model)."""

    def __init__(self, mode: str, ecfg: Mapping[str, Any], lm=None, step_model: StepModel | None = None,
                 devices: list[str] | None = None, n_offload: int = 0, offload_model: StepModel | None = None,
                 lm_spec: Mapping[str, Any] | None = None, offload_threads: int = 4, mean_mix=(32.0, 64.0)):
        """``lm``: one loaded LM, or ``{device: LM}`` (one replica per device); ``devices``: the engines;
        ``n_offload``: CPU offload workers (processes with their own CPU copy, batch 1), for every policy."""
        self.mode, self.ecfg, self.step_model = mode, dict(ecfg), step_model
        self.devices = list(devices or ["main"])
        self.lms = lm if isinstance(lm, dict) else {d: lm for d in self.devices}
        self.n_offload, self.offload_model = int(n_offload), offload_model
        self.lm_spec, self.offload_threads, self.mean_mix = lm_spec, int(offload_threads), mean_mix

    def build(self, policy: Policy, capacity_rps: float | None = None) -> list[Engine]:
        """One engine per device (the same budgets each); ``capacity_rps``: the measured total, split evenly."""
        engines = []
        n = len(self.devices)
        for k, dev in enumerate(self.devices):
            backend = (SimBackend(self.step_model, kv_slots=sim_kv_slots(self.ecfg)) if self.mode == "sim"
                       else make_backend(self.lms[dev], self.ecfg))
            e = Engine(f"engine{k}:{dev}" if n > 1 else "main", backend, policy, self.ecfg["max_seqs"],
                       self.ecfg["max_batch_tokens"], step_model=self.step_model)
            e.capacity_rps = (capacity_rps / n) if capacity_rps else 1.0
            engines.append(e)
        for k in range(self.n_offload):
            om = self.offload_model
            backend = SimBackend(om) if self.mode == "sim" else ProcessBackend(self.lm_spec, self.offload_threads)
            e = Engine(f"cpu{k}", backend, policy, 1, 1 << 30, kind="offload", step_model=om)
            e.capacity_rps = 1.0 / max(om.isolated(*self.mean_mix), 1e-9)
            engines.append(e)
        return engines


def _close(engines) -> None:
    for e in engines:
        if hasattr(e.backend, "close"):
            e.backend.close()


def capacity_requests(sched: Mapping[str, Any], ecfg: Mapping[str, Any]) -> int:
    """Requests in the saturation run: ``scheduler.capacity_requests``, by default 8 x ``max_seqs`` and at least 64
    (each row serves a run of requests in turn, so the start and the drain weigh little: a 16-request run at 4 rows
    lasted 0.8 s on the CPU and overstated the capacity under arrivals by ~10%); never fewer than 2 x ``max_seqs``."""
    m = int(ecfg["max_seqs"])
    return max(int(sched.get("capacity_requests") or max(8 * m, 64)), 2 * m)


def saturation(factory: EngineFactory, pool: pd.DataFrame, n: int, seed: int, progress: bool = False
               ) -> tuple[dict[str, Any], pd.DataFrame]:
    """A saturation run: ``n`` requests of the pool's mix, all queued at t=0, FCFS. Returns the capacity
    facts and the steps it ran."""
    from rtlm_lab.scheduler.workload import choose_requests

    chosen = choose_requests(pool, n, seed + 7919)
    chosen["arrival_s"] = 0.0
    reqs = to_requests(chosen, keep_predictions=False)
    pol = make_policy("fcfs")
    engines = factory.build(pol)
    clock = VirtualClock() if factory.mode == "sim" else WallClock()
    try:
        jobs, facts = serve(reqs, pol, engines, clock, PredictorServer(reqs, (), clock), progress=progress,
                            desc="capacity (saturation)")
    finally:
        _close(engines)
    steps = pd.concat(facts["steps"].values(), ignore_index=True)
    last_admit = max(j.admit_s for j in jobs)
    sat = steps[steps["t_s"] < last_admit] if last_admit > 0 else steps
    window = float(sat["t_s"].iloc[-1] + sat["dt_s"].iloc[-1]) if len(sat) else float(steps["dt_s"].sum())
    tokens = sum(sum(1 for t in j.token_s if t <= window) for j in jobs)
    tok_s = tokens / window if window > 0 else math.nan
    mean_tokens = float(np.mean([j.generated for j in jobs]))
    return {"capacity_rps": tok_s / max(pool["true_tokens"].mean(), 1.0), "decode_tok_s": tok_s,
            "n_requests": n, "window_s": window, "makespan_s": float(max(j.finish_s for j in jobs)),
            "mean_tokens_run": mean_tokens, "mean_tokens_mix": float(pool["true_tokens"].mean()),
            "n_engines": len(engines), "engine_threads": bool(facts["threaded"])}, steps


def measure_capacity(factory: EngineFactory, pool: pd.DataFrame, sched: Mapping[str, Any], seed: int,
                     lm: str, platform: str, progress: bool) -> dict[str, Any]:
    """Capacity and step model of the real engine (cached; see the module doc)."""
    from rtlm_lab.io import write_json_atomic, write_parquet_atomic

    cache = capacity_cache(lm, platform, factory.ecfg)
    if cache.is_file() and not sched.get("recalibrate", False):
        try:
            cap = json.loads(cache.read_text())
            StepModel.from_dict(cap["step_model"])
            log.info("capacity: %s (scheduler.recalibrate=true measures again)", cache)
            return cap
        except (json.JSONDecodeError, KeyError, UserError) as exc:
            log.warning("capacity cache %s unreadable (%s); measuring again", cache, exc)
    n = capacity_requests(sched, factory.ecfg)
    cap, steps = saturation(factory, pool, n, seed, progress)
    sm = StepModel.fit(steps, source=f"saturation run of {cap['n_requests']} requests")
    cap["step_model"] = sm.to_dict()
    cap["engine"] = dict(factory.ecfg)
    cap["lm"], cap["platform"] = lm, platform
    cap["measured_utc"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    write_json_atomic(cache, cap)
    # the saturation run's own steps beside it: a later replay can calibrate on the same machine and minutes
    write_parquet_atomic(steps, cache.with_suffix(".steps.parquet"))
    log.info("capacity %.2f req/s (%.0f decode tok/s) on %s/%s", cap["capacity_rps"], cap["decode_tok_s"], lm, platform)
    return cap


def offload_step_model(lm_spec: Mapping[str, Any], platform: Mapping[str, Any], pool: pd.DataFrame,
                       sched: Mapping[str, Any]) -> StepModel:
    """The CPU offload worker's step model: real batch-1 ``generate`` calls on a CPU copy with the workers'
    threads, timed here (``a`` = a decoding step, ``c`` = prompt cost per token)."""
    from rtlm_lab.lm.loader import load_lm
    from rtlm_lab.scheduler.service import calibrate

    threads = int(platform.get("offload_threads", 4))
    cpu_lm = load_lm(lm_spec, {"name": "cpu", "device": "cpu", "dtype": "float32", "threads": threads})
    texts = pool["text"].astype(str).tolist()[:16]
    svc = calibrate(cpu_lm, texts, [1], max_new_tokens=int(sched.get("calibration_tokens", 32)), repeats=3)
    del cpu_lm
    return StepModel(a=float(svc.step_1), b=0.0, c=float(svc.ttft_b), source="calibration (cpu offload, batch 1)",
                     meta={"ttft_a": svc.ttft_a, "threads": threads})


def _platform_paging(platform: str) -> dict[str, Any]:
    """The page settings in ``conf/platform/<platform>.yaml`` (part of a slots-engine measurement's key)."""
    from omegaconf import OmegaConf

    from rtlm_lab.paths import ROOT

    f = ROOT / "conf" / "platform" / f"{platform}.yaml"
    eng = (OmegaConf.to_container(OmegaConf.load(f)).get("engine") or {}) if f.is_file() else {}
    d = BACKEND_DEFAULTS["slots"]
    return {"page_size": int(eng.get("page_size", d["page_size"])), "num_blocks": eng.get("num_blocks", d["num_blocks"])}


def sim_capacity(lm: str, platform: str, ecfg: Mapping[str, Any], given: str | None,
                 profile: pd.DataFrame | None = None, replica_of: str | None = None) -> dict[str, Any]:
    """The measured capacity file a simulation replays: ``given``, this machine's, else the committed one;
    for several engines (``ecfg['n_engines']``) with no measurement of the set, the one-engine measurement
    of ``replica_of`` (the one-device platform each replica is: every replica steps as that engine did, alone
    on its host: the simulator does not model replicas slowing each other, said in ``source_file``); else, on
    the cpu platform with a batch-1 profile, a step model estimated from the profile (said so)."""
    paths = [Path(given)] if given else [capacity_cache(lm, platform, ecfg), reference_capacity(lm, platform, ecfg)]
    n_eng = int(ecfg.get("n_engines", 1))
    if not given and n_eng > 1:
        one = {k: v for k, v in ecfg.items() if k != "n_engines"}
        base = str(replica_of or platform)
        replica = [capacity_cache(lm, base, one), reference_capacity(lm, base, one)]
    else:
        replica = []
    # no kv measurement yet: the slots engine's of the same budgets (what every committed one measured)
    slots_paths: list[Path] = []
    if not given and ecfg.get("backend") == "kv":
        def as_slots(cfg, plat):
            return {**{k: v for k, v in cfg.items() if k not in ("kv_slots", "max_len", "pin_lengths")},
                    "backend": "slots", **_platform_paging(plat)}

        sc = as_slots(ecfg, platform)
        slots_paths = [capacity_cache(lm, platform, sc), reference_capacity(lm, platform, sc)]
        if n_eng > 1:
            one_s = as_slots({k: v for k, v in ecfg.items() if k != "n_engines"}, base)
            slots_replica = [capacity_cache(lm, base, one_s), reference_capacity(lm, base, one_s)]
            replica += slots_replica
            slots_paths += slots_replica
    for p in paths + slots_paths[:2] + replica:
        if p.is_file():
            try:
                cap = json.loads(p.read_text())
                StepModel.from_dict(cap["step_model"])
            except (json.JSONDecodeError, KeyError) as exc:
                raise UserError(f"cannot read engine capacity {p}: {type(exc).__name__}") from None
            cap["source_file"] = str(p)
            if p in slots_paths:
                log.warning("no measured kv engine for %s on %s: simulating the committed slots-engine measurement "
                            "of the same budgets (%s)", lm, platform, p.name)
                cap["source_file"] += " (the slots engine's: no kv measurement of these budgets yet)"
            if p in replica:  # one engine measured: the set of n is n of it
                cap["source_file"] += f" (one engine, x{n_eng} replicas that do not slow each other)"
                cap["capacity_rps"] = n_eng * float(cap["capacity_rps"])
                cap["n_engines"] = n_eng
            return cap
    if (platform == "cpu" and profile is not None and "batch_size" in profile
            and (profile["batch_size"] == 1).all()):
        sm = StepModel.from_profile(profile)
        log.warning("no measured engine for %s on %s: simulating with a step model estimated from the batch-1 "
                    "profile (no batching gain); `rtlm-schedule mode=real` measures one", lm, platform)
        return {"capacity_rps": math.nan, "step_model": sm.to_dict(), "n_requests": 4 * int(ecfg["max_seqs"]),
                "source_file": "estimated from the batch-1 profile"}
    raise UserError(f"no measured engine for {lm} on {platform} with these engine settings: run "
                    f"`rtlm-schedule mode=real lm={lm} platform={platform}` once (it measures capacity) or pass "
                    "scheduler.capacity=<json>")


def _pred_cost(predictors, texts: list[str], needs) -> PredCost:
    """Measured cost of one prediction batch (a + b x n), timed here at 1 and 8 requests after a warm-up."""
    if not needs or predictors is None:
        return PredCost()
    predictors.predict_batch(texts[:2], needs)
    t = {}
    for n in (1, 8):
        t0 = time.perf_counter()
        for _ in range(3):
            predictors.predict_batch(texts[:n], needs)
        t[n] = (time.perf_counter() - t0) / 3
    b = max(0.0, (t[8] - t[1]) / 7)
    return PredCost(a=max(0.0, t[1] - b), b=b)


def attach_state_probe(engines, probe) -> None:
    """Give the LM-state policy's probe to every GPU/CPU engine (offload workers serve unpredicted): the kv
    engine hooks the probe's layers inside its own forward (:meth:`KVBackend.attach_probe`), the slots engine
    asks its forwards for their hidden states."""
    from rtlm_lab.scheduler.engine import SlotBackend
    from rtlm_lab.scheduler.engine.kv import KVBackend

    mains = [e for e in engines if e.kind == "main"]
    if any(not isinstance(e.backend, (SlotBackend, KVBackend)) for e in mains):
        raise UserError("the lmstate policy reads the served LM's own states: use platform.engine.backend=kv "
                        "(or slots)")
    for e in mains:
        if isinstance(e.backend, KVBackend):
            e.backend.attach_probe(probe)
        else:
            e.backend.probe = probe


def run_continuous(cfg: Mapping[str, Any], run_dir: Path, profile: pd.DataFrame, predictors, held: pd.DataFrame,
                   progress: bool = True, state_probe=None) -> tuple[pd.DataFrame, dict[str, Any], pd.DataFrame]:
    """Serve the workload on the continuous engine; returns (records, metrics, trace). ``state_probe``: a
    fitted :class:`~rtlm_lab.scheduler.lmprobe.StateProbe` for the lmstate policy (else loaded/fitted from the
    LM's committed train profile)."""
    from rtlm_lab.scheduler.workload import arrival_params, arrival_times, check_workload, choose_requests

    mode = str(cfg["mode"])
    lm_spec, platform, sched = dict(cfg["lm"]), dict(cfg["platform"]), dict(cfg["scheduler"])
    workload = dict(cfg["workload"])
    seed = int(cfg.get("seed", 0))
    check_workload(workload)
    ecfg = measured_engine_config(platform)
    if workload.get("pin_lengths"):  # each request decodes exactly its profiled length (part of the engine key)
        if ecfg["backend"] != "kv":
            raise UserError("workload.pin_lengths=true needs the kv engine (platform.engine.backend=kv)")
        ecfg = {**ecfg, "pin_lengths": True}
    policy = make_policy(str(cfg["policy"]["name"]), cfg["policy"])
    pool = _pool(held)
    uses_state = bool(getattr(policy, "uses_lm_state", False))
    if uses_state and mode != "real":
        raise UserError(f"policy {policy.name} reads the served LM's own prefill states: it runs in mode=real only")
    devices = [str(d) for d in (platform.get("devices") or [platform.get("device", "cpu")])]
    n_off = int(platform.get("offload_workers", 0) or 0)
    mix = (float(pool["n_input_tokens"].mean()), float(pool["true_tokens"].mean()))
    off_kw = {"n_offload": n_off, "lm_spec": lm_spec, "offload_threads": int(platform.get("offload_threads", 4)),
              "mean_mix": mix}
    if mode == "real":
        from rtlm_lab.lm.loader import load_lm
        from rtlm_lab.lm.sanity import check_sanity

        lms = {d: load_lm(lm_spec, {**platform, "device": d}) for d in devices}  # one replica per device
        if sched.get("sanity_check", True):
            check_sanity(lms[devices[0]], platform["name"])
        off_model = offload_step_model(lm_spec, platform, pool, sched) if n_off else None
        factory = EngineFactory("real", ecfg, lm=lms, devices=devices, offload_model=off_model, **off_kw)
        cap = measure_capacity(factory, pool, sched, seed, lm_spec["name"], platform["name"], progress)
        factory.step_model = StepModel.from_dict(cap["step_model"])
        if off_model is not None:
            cap["offload_step_model"] = off_model.to_dict()
    else:
        cap = sim_capacity(lm_spec["name"], platform["name"], ecfg, sched.get("capacity"), profile,
                           replica_of=platform.get("replica_of"))
        off_model = StepModel.from_dict(cap["offload_step_model"]) if n_off and cap.get("offload_step_model") else None
        if n_off and off_model is None:
            raise UserError(f"the measured engine of {lm_spec['name']} on {platform['name']} has no offload-worker "
                            "model: measure it with a real run (mode=real) of this platform config")
        factory = EngineFactory("sim", ecfg, step_model=StepModel.from_dict(cap["step_model"]), devices=devices,
                                offload_model=off_model, **off_kw)
        if sched.get("sim_capacity", "simulated") == "simulated":
            # the simulator's own capacity for the same saturation run (what rho means on its clock)
            sim_cap, _ = saturation(factory, pool, int(cap.get("n_requests", 4 * ecfg["max_seqs"])), seed)
            cap = {**cap, "capacity_rps_measured": cap["capacity_rps"], "capacity_rps": sim_cap["capacity_rps"]}
    step_model = factory.step_model
    policy.token_s = step_model.step_s(max(1, ecfg["max_seqs"] // 2), max(1, ecfg["max_seqs"] // 2))

    # the trace: the same for every policy (seeded), arrivals at rho x measured capacity
    n = int(workload.get("n_requests", 100))
    kind = str(workload.get("kind", "poisson"))
    rho = float(workload.get("rho", 0.9))
    rate = rho * float(cap["capacity_rps"])  # the measured capacity of all the engines together
    chosen = choose_requests(pool, n, seed)
    chosen.insert(3, "arrival_s", arrival_times(kind, rate, n, seed=seed, **arrival_params(workload)))
    chosen["isolated_s"] = [step_model.isolated(a, b) for a, b in zip(chosen["n_input_tokens"], chosen["true_tokens"])]
    trace = chosen

    online = mode == "real" and predictors is not None
    needs = tuple(policy.needs)
    # scheduler.online_update: finished requests recalibrate the predictor, which predicts at prediction time
    # (sim too: not the precomputed columns); a copy, so the caller's predictors stay as fitted
    online_update = bool(sched.get("online_update", False))
    if online_update and predictors is None:
        raise UserError("scheduler.online_update=true needs the fitted predictors (scheduler.online_predictions=true)")
    from rtlm_lab.scheduler.predproc import PredictorProcess

    if online_update and not isinstance(predictors, PredictorProcess):  # a process serves its own copy already
        import copy

        predictors = copy.deepcopy(predictors)
    live_sim = online_update and mode == "sim" and bool(needs)
    reqs = to_requests(trace, keep_predictions=not (online or live_sim))
    texts = trace["text"].astype(str).tolist()
    # sim with scheduler.overhead_samples=0: predictions cost nothing on the simulated clock (as on the static
    # path), so that a simulation does not depend on this machine's timing (deterministic runs, tests)
    timed = predictors is not None and not (mode == "sim" and int(sched.get("overhead_samples", 20)) <= 0)
    from rtlm_lab.scheduler.predictions import given_prediction_cost

    given = given_prediction_cost(sched, needs) if mode == "sim" and needs else None
    if online and needs:  # measured live by the predictor thread: only load its models before the clock
        predictors.predict_batch(texts[:2], needs)
        cost = PredCost()
    elif given is not None:  # sim: a per-request cost measured elsewhere (scheduler.prediction_cost_s)
        cost = PredCost(a=0.0, b=given[0])
    else:
        cost = _pred_cost(predictors, texts, needs) if timed else PredCost()
    probe_meta = None
    if uses_state:  # fitted before the clock (training, as the regressor's fit); its predictions are on it
        if state_probe is None:
            from rtlm_lab.scheduler.lmprobe import load_state_probe

            state_probe = load_state_probe(lms[devices[0]], platform["name"], policy.probe_params)
        if policy.refine_every != state_probe.refine_every:
            state_probe = _with_refine_every(state_probe, policy.refine_every)
        if hasattr(policy, "attach_probe"):  # gittins_lmstate: the probe's residual quantiles shape its predictions
            policy.attach_probe(state_probe)
        probe_meta = dict(state_probe.meta)
    split = mode == "real" and bool(sched.get("engine_process", False))
    if split and (uses_state or n_off):
        raise UserError("scheduler.engine_process=true serves the kv/slots engines without CPU offload workers or "
                        "the LM-state probe (platform.offload_workers=0; another policy)")
    engines = [] if split else factory.build(policy, capacity_rps=float(cap["capacity_rps"]))
    if uses_state:
        attach_state_probe(engines, state_probe)
    clock = VirtualClock() if mode == "sim" else WallClock()
    if online and needs:
        predict = lambda batch: predictors.predict_batch([r.text for r in batch], needs)  # noqa: E731
        server = PredictorServer(reqs, needs, clock, predict=predict)
    elif live_sim:  # the modelled cost on the virtual clock, the (recalibrating) predictor at each batch's start
        predict = lambda batch: predictors.predict_batch([r.text for r in batch], needs)  # noqa: E731
        server = PredictorServer(reqs, needs, clock, predict=predict, cost=cost)
    else:
        server = PredictorServer(reqs, needs, clock, cost=cost)
    n_updates = [0]

    def on_finish(done_jobs) -> None:
        n_updates[0] += predictors.update([j.req.text for j in done_jobs], [j.generated for j in done_jobs])

    try:
        if split:  # each engine core in a process of its own; this process keeps the clock and the predictors
            from rtlm_lab.scheduler.frontend import engine_spec, serve_processes

            lms.clear()  # the engine processes load their own copies; this one's (capacity measured) goes
            factory.lms = {}
            specs = [engine_spec(f"engine{k}:{d}" if len(devices) > 1 else "main", policy, ecfg["max_seqs"],
                                 ecfg["max_batch_tokens"], {"type": "real", "lm_spec": lm_spec,
                                                            "platform": {**platform, "device": d}, "ecfg": ecfg},
                                 step_model=step_model) for k, d in enumerate(devices)]
            jobs, facts = serve_processes(reqs, policy, specs, server, [float(cap["capacity_rps"]) / len(devices)]
                                          * len(devices), progress=progress, desc=f"{policy.name} (real, processes)",
                                          on_finish=on_finish if online_update else None, clock=clock)
        else:
            jobs, facts = serve(reqs, policy, engines, clock, server, progress=progress,
                                desc=f"{policy.name} ({mode})", on_finish=on_finish if online_update else None)
    finally:
        _close(engines)
    records = job_records(jobs, policy, float(sched.get("slo_k", 5.0)), float(sched.get("warmup_frac", 0.1)))
    steps = pd.concat([df.assign(engine=e) for e, df in facts["steps"].items()], ignore_index=True)
    from rtlm_lab.io import write_parquet_atomic

    run_dir.mkdir(parents=True, exist_ok=True)
    write_parquet_atomic(steps, run_dir / "steps.parquet")
    m = run_metrics(records, steps, facts, cap, rho, rate, ecfg)
    m.update({"engine": "continuous", "engine_config": ecfg, "step_model": step_model.to_dict(),
              "capacity": cap, "prediction_cost": cost.to_dict() if not online else "measured online",
              "prediction_cost_timed": bool((timed and given is None) or online),
              "prediction_cost_source": (given[1] if given is not None
                                         else "timed here" if timed or online else "free"),
              "online_predictions": online or uses_state, "n_engines": len(engines),
              "engine_threads": bool(facts["threaded"]),
              "online_update": online_update, "n_online_updates": int(n_updates[0]),
              "serving": serving_facts(platform, sched, facts), "engine_process": bool(split)})
    if probe_meta is not None:
        m["lm_state_probe"] = {**probe_meta, "refine_every": policy.refine_every}
    info = {"kind": kind, "rho": rho, "rate_rps": rate, "n_requests": n,
            "duration_s": float(trace["arrival_s"].max()), "heldout_pool": len(held), "repeats": bool(n > len(held))}
    m["workload"] = info
    return records, m, trace


def serving_facts(platform: Mapping[str, Any], sched: Mapping[str, Any], facts: Mapping[str, Any]) -> dict[str, Any]:
    """What a run's engine ran on, beside its budgets: dtype, torch threads, the GPU's name, the predictors'
    place and threads, and each engine's own facts (the kv engine: slots, KV bytes, graph and eager steps,
    evictions). A run group's runs must agree on these (``rtlm_lab.scheduler.analysis``)."""
    import torch

    dev = str(platform.get("device", "cpu"))
    return {"dtype": str(platform.get("dtype", "float32")), "torch_threads": int(torch.get_num_threads()),
            "device": dev, "device_name": (torch.cuda.get_device_name(torch.device(dev)) if dev.startswith("cuda")
                                           and torch.cuda.is_available() else "cpu"),
            "torch": torch.__version__, "predictor_process": bool(sched.get("predictor_process", False)),
            "predictor_threads": sched.get("predictor_threads"), "engines": dict(facts.get("backend") or {})}


def _with_refine_every(probe, every: int):
    """The same fitted probe with another refinement period (0: prefill only)."""
    import copy

    p = copy.copy(probe)
    p.refine_every = int(every) if p.refine is not None else 0
    return p


RECORDS = ("request_id", "arrival_s", "ready_s", "admit_s", "first_token_s", "finish_s", "response_s", "ttft_s",
           "queue_s", "prediction_wait_s", "worker", "pred_tokens", "true_tokens", "actual_tokens", "uncertainty",
           "n_input_tokens", "isolated_s", "slo_s", "slo_miss", "steps_paused", "stop_reason", "warmup",
           "token_times_s")


def job_records(jobs, policy: Policy, slo_k: float, warmup_frac: float) -> pd.DataFrame:
    """One row per request (:data:`RECORDS`); ``warmup`` marks the first ``warmup_frac`` of arrivals."""
    rows = []
    for j in jobs:
        r = j.req
        iso = float(getattr(r, "isolated_s", math.nan))
        rows.append({
            "request_id": r.request_id, "arrival_s": r.arrival_s, "ready_s": j.ready_s, "admit_s": j.admit_s,
            "first_token_s": j.first_token_s, "finish_s": j.finish_s, "response_s": j.finish_s - r.arrival_s,
            "ttft_s": j.first_token_s - r.arrival_s, "queue_s": j.admit_s - r.arrival_s,
            "prediction_wait_s": j.ready_s - r.arrival_s, "worker": j.worker,
            "pred_tokens": float(r.pred.get(policy.pred_column, math.nan)) if policy.pred_column else
            (float(r.true_tokens) if policy.name.startswith("oracle") else math.nan),
            "true_tokens": r.true_tokens, "actual_tokens": j.generated, "uncertainty": r.uncertainty,
            "n_input_tokens": r.n_input_tokens, "isolated_s": iso, "slo_s": slo_k * iso,
            "slo_miss": bool(j.finish_s - r.arrival_s > slo_k * iso) if math.isfinite(iso) else False,
            "steps_paused": j.steps_paused, "stop_reason": j.stop_reason,
            "token_times_s": [t - j.admit_s for t in j.token_s]})
    df = pd.DataFrame(rows).sort_values(["arrival_s", "request_id"]).reset_index(drop=True)
    df["warmup"] = np.arange(len(df)) < int(math.floor(warmup_frac * len(df)))
    return df[list(RECORDS)]


def run_metrics(records: pd.DataFrame, steps: pd.DataFrame, facts: Mapping[str, Any], cap: Mapping[str, Any],
                rho: float, rate: float, ecfg: Mapping[str, Any]) -> dict[str, Any]:
    """Headline numbers (units in the names), over the requests after the warm-up share; and the protocol's
    facts of the whole run (:func:`rtlm_lab.scheduler.protocol.run_protocol`: realized rho against the nominal,
    stability over the second half of the arrival window, response-time drift, window / isolated service)."""
    from rtlm_lab.scheduler.protocol import run_protocol

    r = records[~records["warmup"]]
    rt = r["response_s"].to_numpy(float)
    ttft = r["ttft_s"].to_numpy(float)
    t0, t1 = float(records["arrival_s"].min()), float(records["finish_s"].max())
    makespan = max(t1 - t0, 1e-9)
    realized_rate = realized_arrival_rate(records["arrival_s"])
    busy = dict(facts["busy_s"])
    pred_busy = float(facts["predictor_batches"]["dt_s"].sum()) if len(facts["predictor_batches"]) else 0.0
    pred_busy += float(sum((facts.get("probe_s") or {}).values()))  # the LM-state probe, inside engine steps
    q = lambda a, p: float(np.percentile(a, p)) if len(a) else math.nan  # noqa: E731
    realized_rho = realized_rate / float(cap["capacity_rps"]) if math.isfinite(realized_rate) else math.nan
    return {
        "n_requests": int(len(records)), "n_completed": int(records["finish_s"].notna().sum()),
        "n_unique_completed": int(records["request_id"].nunique()),
        "n_measured": int(len(r)), "n_warmup_excluded": int(records["warmup"].sum()),
        "mean_rt_s": float(rt.mean()) if len(rt) else math.nan, "p50_rt_s": q(rt, 50), "p95_rt_s": q(rt, 95),
        "p99_rt_s": q(rt, 99), "max_rt_s": float(rt.max()) if len(rt) else math.nan,
        "mean_ttft_ms": 1e3 * float(ttft.mean()) if len(ttft) else math.nan, "p50_ttft_ms": 1e3 * q(ttft, 50),
        "p99_ttft_ms": 1e3 * q(ttft, 99),
        "mean_queue_s": float(r["queue_s"].mean()) if len(r) else math.nan,
        "mean_prediction_wait_ms": 1e3 * float(r["prediction_wait_s"].mean()) if len(r) else math.nan,
        "throughput_rps": len(records) / makespan,
        "throughput_tok_s": float(records["actual_tokens"].sum()) / makespan,
        "slo_miss_rate": float(r["slo_miss"].mean()) if len(r) else math.nan,
        "makespan_s": makespan,
        "nominal_rho": rho, "arrival_rate_rps": rate, "realized_arrival_rate_rps": realized_rate,
        "capacity_rps": float(cap["capacity_rps"]),
        "realized_rho": realized_rho, **run_protocol(records, rho, realized_rho),
        "worker_utilization": {w: b / makespan for w, b in busy.items()},
        "mean_running_seqs": float(steps["n_seqs"].mean()) if len(steps) else math.nan,
        "n_steps": int(len(steps)),
        "prediction_s": pred_busy, "prediction_share": pred_busy / max(sum(busy.values()), 1e-9),
        "n_prediction_calls": int(len(facts["predictor_batches"])),  # the predictor's batched calls
        "n_preempted": int((records["steps_paused"] > 0).sum()),
        "pred_mae_tokens": float((r["pred_tokens"] - r["actual_tokens"]).abs().mean())
        if r["pred_tokens"].notna().any() else math.nan,
        "requests_per_worker": {str(k): int(v) for k, v in records["worker"].value_counts().items()},
    }
