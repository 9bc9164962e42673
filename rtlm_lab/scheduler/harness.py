"""One scheduling experiment end to end: profile -> predictors -> service model -> trace -> run -> results.

:func:`run_experiment` is what ``rtlm-schedule`` (and notebook 03, and the reference builder) call. Inputs
are plain dicts (a composed Hydra config works too); outputs go to ``run_dir``:

* ``trace.parquet``: the workload (replay it with ``workload.trace=<path>``);
* ``requests.parquet``: one record per request (:data:`~rtlm_lab.scheduler.core.RECORD_COLUMNS`);
* ``metrics.json``: the headline numbers, the service model, the policy's parameters and provenance;
* ``response_cdf.png/svg``: the response-time CDF of the run.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import pandas as pd

from rtlm_lab.errors import UserError
from rtlm_lab.scheduler.core import WorkerSpec
from rtlm_lab.scheduler.policies import Policy, Request, make_policy
from rtlm_lab.scheduler.predictions import given_prediction_cost
from rtlm_lab.scheduler.service import ServiceModel

log = logging.getLogger("rtlm_lab.scheduler")
MODES = ("real", "sim")


def service_dir() -> Path:
    from rtlm_lab.paths import reference_dir

    return reference_dir() / "scheduler" / "service"


def reference_service(lm: str, platform: str, role: str = "main") -> Path:
    suffix = "" if role == "main" else f"__{role}"
    return service_dir() / f"{lm}__{platform}{suffix}.json"


def calibration_cache(lm: str, platform: str, role: str = "main") -> Path:
    """Where a real run keeps its calibration, reused by every later run of the LM on the platform (so that
    all policies see the same service model, hence the same trace)."""
    from rtlm_lab.paths import outputs_dir

    suffix = "" if role == "main" else f"__{role}"
    return outputs_dir() / "schedule" / "service" / f"{lm}__{platform}{suffix}.json"


def sim_service_path(lm: str, platform: str, role: str = "main") -> Path | None:
    """The service-model file a simulation of ``lm`` on ``platform`` reads (no ``given`` path): this
    machine's calibration, else the committed one; ``None`` where neither exists (then the main worker's
    model is fitted to the batch-1 profile)."""
    for p in (calibration_cache(lm, platform, role), reference_service(lm, platform, role)):
        if p.is_file():
            return p
    return None


def sim_service(lm: str, platform: str, profile: pd.DataFrame, given: str | None = None,
                role: str = "main") -> ServiceModel | None:
    """Service model for a simulation: ``given`` path, else this machine's calibration, else the committed
    one, else (main worker, batch-1 profile) a fit to the profile."""
    if given:
        return ServiceModel.load(given)
    p = sim_service_path(lm, platform, role)
    if p is not None:
        return ServiceModel.load(p)
    if role != "main":
        return None
    if "batch_size" in profile.columns and (profile["batch_size"] == 1).all():
        log.info("no calibrated service model for %s on %s: fitting one to the batch-1 profile", lm, platform)
        return ServiceModel.from_profile(profile)
    raise UserError(f"no service model for {lm} on {platform}: run `rtlm-schedule mode=real lm={lm} "
                    f"platform={platform}` once (it calibrates) or pass scheduler.service=<json>")


def to_requests(trace: pd.DataFrame, service: ServiceModel, keep_predictions: bool) -> list[Request]:
    """The static path's requests: :func:`rtlm_lab.scheduler.continuous.to_requests` with the isolated
    latency from the static service model."""
    from rtlm_lab.scheduler.continuous import to_requests as base

    reqs = base(trace, keep_predictions)
    quant = trace["pred_quantiles"].tolist() if keep_predictions and "pred_quantiles" in trace.columns else None
    for k, r in enumerate(reqs):
        r.isolated_s = service.isolated(r.n_input_tokens, r.true_tokens)
        if quant is not None and quant[k] is not None:  # the distributional policies' predicted quantiles
            r.pred["pred_quantiles"] = tuple(float(v) for v in quant[k])
    return reqs


def make_trace(held: pd.DataFrame, service: ServiceModel, workload: Mapping[str, Any], seed: int) -> tuple[pd.DataFrame, dict]:
    from rtlm_lab.scheduler.workload import build_trace, choose_requests, load_trace

    if workload.get("trace"):
        trace = load_trace(workload["trace"])
        info = {"kind": "replay", "trace": str(workload["trace"]), "n_requests": len(trace),
                "duration_s": float(trace["arrival_s"].max())}
        return trace, info
    n = int(workload.get("n_requests", 100))
    pool = held.rename(columns={"n_output_tokens": "true_tokens"})
    cols = [c for c in ("request_id", "text", "context", "n_input_tokens", "true_tokens", "pred_rtlm",
                        "uncertainty", "pred_proxy", "ltr_score", "pred_quantiles") if c in pool.columns]
    chosen = choose_requests(pool[cols].copy(), n, seed)
    chosen["context"] = chosen["context"].fillna("").astype(str) if "context" in chosen else ""
    trace, info = build_trace(chosen, service, workload, seed=seed)
    info["heldout_pool"] = len(held)
    info["repeats"] = bool(n > len(held))
    return trace, info


ENGINES = ("auto", "continuous", "static")


def resolve_engine(name: str, lm_spec: Mapping[str, Any]) -> str:
    """``auto``: continuous batching for decoder-only LMs, the static-batch path for encoder-decoders
    (transformers' continuous batching serves decoder-only models)."""
    name = str(name)
    if name not in ENGINES:
        raise UserError(f"unknown scheduler.engine {name!r}; choose one of: {', '.join(ENGINES)}")
    seq2seq = str(lm_spec.get("arch", "causal")) == "seq2seq"
    if name == "continuous" and seq2seq:
        raise UserError(f"{lm_spec.get('name')} is an encoder-decoder: scheduler.engine=continuous serves "
                        "decoder-only LMs; use scheduler.engine=static (or auto)")
    if name == "auto":
        return "static" if seq2seq else "continuous"
    return name


def workers_for(policy: Policy, platform: Mapping[str, Any], main_service: ServiceModel,
                offload_service: ServiceModel | None, n_offload: int) -> list[WorkerSpec]:
    """The static path's workers: the same for every policy (the platform's batch size on the main worker;
    the CPU offload workers, which RT-LM's placement uses and the baselines' FIFO placement leaves idle)."""
    cap = int(platform.get("max_batch", 1))
    specs = [WorkerSpec("main", "main", max(1, cap), main_service)]
    if n_offload > 0 and offload_service is not None:
        specs += [WorkerSpec(f"cpu{i}", "offload", 1, offload_service) for i in range(n_offload)]
    return specs


def run_experiment(cfg: Mapping[str, Any], run_dir: Path, profile_path: Path, progress: bool = True) -> dict:
    """See the module doc. ``cfg`` keys: lm, platform, policy, workload, scheduler, mode, seed."""
    from rtlm_lab.io import provenance, sha256_file, write_json_atomic, write_parquet_atomic, write_run_manifest
    from rtlm_lab.paths import data_dir
    from rtlm_lab.scheduler.predictions import columns_for, load_or_fit

    mode = str(cfg["mode"])
    if mode not in MODES:
        raise UserError(f"unknown mode {mode!r}; choose one of: {', '.join(MODES)}")
    lm_spec, platform, sched = dict(cfg["lm"]), dict(cfg["platform"]), dict(cfg["scheduler"])
    workload = dict(cfg["workload"])
    seed = int(cfg.get("seed", 0))
    policy = make_policy(str(cfg["policy"]["name"]), cfg["policy"])
    try:
        profile = pd.read_parquet(profile_path)
    except Exception as exc:  # noqa: BLE001
        raise UserError(f"cannot read profile {profile_path}: {type(exc).__name__}: {exc}".splitlines()[0]) from None
    slo_k = float(sched.get("slo_k", 5.0))
    from rtlm_lab.scheduler.predproc import check_settings, predictor_threads, serving_predictors

    check_settings(sched)
    if not slo_k > 0:
        raise UserError(f"scheduler.slo_k must be > 0 (got {slo_k})")
    from rtlm_lab.scheduler.workload import check_workload

    check_workload(workload)
    engine = resolve_engine(sched.get("engine", "auto"), lm_spec)
    if getattr(policy, "uses_lm_state", False) and (engine != "continuous" or mode != "real"):
        raise UserError(f"policy {policy.name} reads the served LM's prefill states on the continuous slot engine: "
                        "it needs mode=real and a decoder-only LM (scheduler.engine=continuous)")
    n_devices = len(platform.get("devices") or [None])  # GPU replicas (platform.devices), else one
    if n_devices > 1 and engine != "continuous":
        raise UserError(f"platform {platform.get('name')} has {n_devices} devices: GPU replicas are "
                        f"served by the continuous engine only, and {lm_spec.get('name')} runs on the static path "
                        "(scheduler.engine=static, or an encoder-decoder)")
    if engine == "continuous":
        from rtlm_lab.scheduler.continuous import engine_config

        engine_config(platform)  # bad budgets fail before any fitting
    if mode == "real":  # a missing GPU is a user error before anything is fitted
        from rtlm_lab.lm.loader import resolve_device

        resolve_device(platform)
    if sched.get("online_update", False) and engine != "continuous":
        raise UserError("scheduler.online_update=true is for the continuous engine (scheduler.engine=continuous)")
    online = bool(sched.get("online_predictions", True))
    pred_profile = sched.get("predictor_profile")
    if pred_profile:  # drift: predictors fitted on another profile (another LM) serve this profile's requests
        predictors, held = _foreign_predictors(Path(str(pred_profile)).expanduser().resolve(), profile,
                                               float(sched.get("heldout_frac", 0.4)), seed,
                                               columns=columns_for(policy.needs))
        train = None
    else:
        predictors, train, held = load_or_fit(profile_path, profile, float(sched.get("heldout_frac", 0.4)), seed,
                                              cache_dir=data_dir() / "cache" / "scheduler",
                                              need_model=online or mode == "sim",
                                              columns=columns_for(policy.needs))
    # the reply length a policy without a length prediction assumes when it places a request on one of
    # several workers (main, CPU offload, GPU replicas): what an operator knows from past traffic, the train
    # pool's mean
    if train is not None and "n_output_tokens" in train and len(train):
        policy.typical_tokens = float(train["n_output_tokens"].mean())
    run_dir.mkdir(parents=True, exist_ok=True)
    n_offload = int(platform.get("offload_workers", 0))  # the same workers for every policy
    extra: dict[str, Any] = {}
    if n_offload or n_devices > 1:
        extra["placement_typical_tokens"] = float(policy.typical_tokens)

    # real runs that predict: scheduler.predictor_process puts the predictors in their own process (predproc.py)
    live_needs = tuple(policy.needs) if mode == "real" and predictors is not None else ()
    if live_needs:
        extra["predictor_process"] = bool(sched.get("predictor_process", False))
        if extra["predictor_process"]:
            extra["predictor_threads"] = predictor_threads(sched)
    if engine == "continuous":
        from rtlm_lab.scheduler.continuous import run_continuous

        with serving_predictors(predictors, sched, live_needs) as served:
            records, m, trace = run_continuous(cfg, run_dir, profile, served, held, progress)
        info = m.pop("workload")
        main_service, offload_service = None, None
    elif mode == "sim":
        main_service = sim_service(lm_spec["name"], platform["name"], profile, sched.get("service"))
        offload_service = sim_service(lm_spec["name"], platform["name"], profile, sched.get("offload_service"),
                                      role="offload") if n_offload else None
        trace, info = make_trace(held, main_service, workload, seed)
        reqs = to_requests(trace, main_service, keep_predictions=True)
        given = given_prediction_cost(sched, policy.needs)
        per_req = (given[0] if given is not None
                   else _prediction_cost(predictors, trace, policy.needs, int(sched.get("overhead_samples", 20))))
        from rtlm_lab.scheduler.sim import simulate

        workers = workers_for(policy, platform, main_service, offload_service, n_offload)
        records, m = simulate(reqs, policy, workers, slo_k=slo_k, prediction_s_per_request=per_req)
        extra["prediction_s_per_request"] = per_req
        if given is not None:
            extra["prediction_cost_source"] = given[1]
    else:
        with serving_predictors(predictors, sched, live_needs) as served:
            records, m, main_service, offload_service, trace, info = _run_real(
                cfg, lm_spec, platform, sched, workload, seed, policy, held, served, slo_k, n_offload, progress)
    missing = set(trace["request_id"].astype(str)) - set(records["request_id"].astype(str)) if len(records) else set(trace["request_id"])
    if missing or m["n_unique_completed"] != len(trace):
        raise RuntimeError(f"{len(missing)} request(s) not accounted for: {sorted(missing)[:5]}")
    write_parquet_atomic(trace, run_dir / "trace.parquet")
    write_parquet_atomic(records, run_dir / "requests.parquet")
    m.update(extra)
    if engine != "continuous":  # the continuous engine's run_metrics has them
        m.update(static_load_facts(records, info))
    out = {
        "lm": lm_spec["name"], "platform": platform["name"], "mode": mode, "policy": policy.describe(),
        "workload": info, "rho": float(workload.get("rho", math.nan)), "seed": seed,
        "service_model": main_service.to_dict() if main_service is not None else None,
        "offload_service_model": offload_service.to_dict() if offload_service is not None else None,
        "n_offload_workers": n_offload if offload_service is not None else 0,
        "engine": engine,
        **m,
        "provenance": provenance(cfg, profile=str(profile_path), profile_sha256=sha256_file(profile_path),
                                 run_dir=str(run_dir)),
    }
    if sched.get("figures", True):
        from rtlm_lab.viz.scheduler import plot_cdf

        plot_cdf({policy.name: records["response_s"].to_numpy(float)}, run_dir,
                 title=f"{lm_spec['name']} on {platform['name']} ({mode}), rho={workload.get('rho')}")
    # metrics.json last: its presence marks a finished run (reruns skip it); the manifest lists every artefact
    write_json_atomic(run_dir / "metrics.json", out)
    write_run_manifest(run_dir, {"task": "schedule"})
    return out


def static_load_facts(records: pd.DataFrame, info: Mapping[str, Any]) -> dict[str, Any]:
    """The static path's load in its own terms and the protocol's facts of the run
    (:func:`rtlm_lab.scheduler.protocol.run_protocol`): the nominal and realized arrival rate, and rho = arrival
    rate x the trace's mean isolated (batch-1) service time, as :func:`~rtlm_lab.scheduler.workload.build_trace`
    sets the rate. A replayed trace has no nominal rate or rho."""
    from rtlm_lab.scheduler.protocol import run_protocol
    from rtlm_lab.scheduler.workload import realized_arrival_rate

    rate = realized_arrival_rate(records["arrival_s"]) if len(records) else math.nan
    iso = float(records["isolated_s"].mean()) if "isolated_s" in records and len(records) else math.nan
    realized_rho = rate * iso if math.isfinite(rate) and math.isfinite(iso) else math.nan
    nominal = info.get("rho") if info.get("kind") not in ("replay", "burst") and info.get("rate_rps") else None
    out: dict[str, Any] = {"realized_arrival_rate_rps": rate, "realized_rho": realized_rho}
    if nominal is not None:
        out.update({"nominal_rho": float(nominal), "arrival_rate_rps": float(info["rate_rps"])})
    out.update(run_protocol(records, nominal, realized_rho))
    return out


def _foreign_predictors(path: Path, profile: pd.DataFrame, heldout_frac: float, seed: int, columns=None):
    """``scheduler.predictor_profile``: the predictors fitted on ``path``'s training conversations (cached as
    usual) and this profile's held-out pool, predicted by them (what a predictor fitted on another LM says)."""
    from rtlm_lab.paths import data_dir
    from rtlm_lab.scheduler.predictions import ALL_COLUMNS, load_or_fit, split_pool

    try:
        other = pd.read_parquet(path)
    except Exception as exc:  # noqa: BLE001
        raise UserError(f"cannot read scheduler.predictor_profile {path}: {type(exc).__name__}") from None
    predictors, _train, _ = load_or_fit(path, other, heldout_frac, seed, columns=columns or ALL_COLUMNS,
                                        cache_dir=data_dir() / "cache" / "scheduler")
    _, held = split_pool(profile, heldout_frac, seed)
    held = held.copy()
    held["request_id"] = held["request_id"].astype(str)
    p = predictors.predict_many(held["text"].fillna("").tolist())
    for c in p.columns:
        held[c] = p[c].to_numpy()
    return predictors, held


def _prediction_cost(predictors, trace: pd.DataFrame, needs, n: int) -> float:
    """Mean seconds of the policy's per-arrival predictions, timed on ``n`` single requests."""
    if not needs or n <= 0:
        return 0.0
    texts = trace["text"].astype(str).tolist()[:n]
    predictors.predict_one(texts[0], needs)  # warm-up (model loads)
    secs = [predictors.predict_one(t, needs)[1] for t in texts]
    return float(np.mean(secs))


def _run_real(cfg, lm_spec, platform, sched, workload, seed, policy, held, predictors, slo_k, n_offload, progress):
    from rtlm_lab.io import write_json_atomic
    from rtlm_lab.lm.fastdecode import make_decoder
    from rtlm_lab.lm.loader import load_lm
    from rtlm_lab.lm.sanity import check_sanity
    from rtlm_lab.scheduler.executor import execute
    from rtlm_lab.scheduler.service import calibrate

    lm = load_lm(lm_spec, platform)
    sanity = check_sanity(lm, platform["name"]) if sched.get("sanity_check", True) else None  # raises if wrong
    cap = int(platform.get("max_batch", 1))
    decode = make_decoder(lm, bool(platform.get("fast_decode", False)), max_batch=cap,
                          max_len=int(sched.get("fast_max_len", 512)))
    calib_texts = held["text"].astype(str).tolist()[:64]
    cache = calibration_cache(lm_spec["name"], platform["name"])
    if sched.get("service"):
        main_service = ServiceModel.load(sched["service"])
    elif cache.is_file() and not sched.get("recalibrate", False):
        main_service = ServiceModel.load(cache)
        log.info("service model: %s (recalibrate with scheduler.recalibrate=true)", cache)
    else:
        sizes = sorted({b for b in (1, 2, 4, 8, 16, 32, 64) if b <= cap} | {cap})
        main_service = calibrate(lm, calib_texts, sizes, max_new_tokens=int(sched.get("calibration_tokens", 32)),
                                 repeats=int(sched.get("calibration_repeats", 2)),
                                 generate=lambda t, m: decode(t, None, m))
        main_service.meta["decoder"] = type(getattr(decode, "__self__", None)).__name__
        write_json_atomic(cache, main_service.to_dict())
    offload_service = None
    if n_offload:
        off = sched.get("offload_service")
        off_cache = calibration_cache(lm_spec["name"], platform["name"], "offload")
        if off:
            offload_service = ServiceModel.load(off)
        elif off_cache.is_file() and not sched.get("recalibrate", False):
            offload_service = ServiceModel.load(off_cache)
        else:  # time the CPU path in this process at batch 1 (threads as the offload workers get)
            cpu_lm = load_lm(lm_spec, {"name": "cpu", "device": "cpu", "dtype": "float32",
                                       "threads": int(platform.get("offload_threads", 4))})
            offload_service = calibrate(cpu_lm, calib_texts, [1], max_new_tokens=int(sched.get("calibration_tokens", 32)),
                                        repeats=3)
            offload_service.source = "calibration (cpu offload)"
            write_json_atomic(off_cache, offload_service.to_dict())
            del cpu_lm
    trace, info = make_trace(held, main_service, workload, seed)
    online = predictors is not None
    reqs = to_requests(trace, main_service, keep_predictions=not online)
    workers = workers_for(policy, platform, main_service, offload_service, n_offload)
    records, m = execute(reqs, policy, lambda t, c: decode(t, c), workers, predictors=predictors, slo_k=slo_k,
                         offload_spec=lm_spec, offload_threads=int(platform.get("offload_threads", 4)),
                         progress=progress)
    if not online:  # predictions were computed ahead (no quantifier here): their cost measured elsewhere
        cost = dict(sched.get("prediction_cost_s") or {})
        per_req = sum(float(cost.get(c, 0.0)) for c in policy.needs if c != "uncertainty")
        m["prediction_s"] = per_req * len(reqs)
        m["overhead_s"] = m["prediction_s"] + m["decision_s"]
        busy = sum(m["worker_utilization"].values()) * m["makespan_s"]
        m["overhead_share"] = m["overhead_s"] / busy if busy > 0 else math.nan
        m["prediction_cost_source"] = cost.get("source", "not given: decisions only")
    m["decoder"] = type(getattr(decode, "__self__", None)).__name__
    m["sanity"] = sanity
    return records, m, main_service, offload_service, trace, info
