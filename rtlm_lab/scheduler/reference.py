"""Reference scheduler results: real runs, their simulations (the simulator's error) and the sim grid.

``python -m rtlm_lab.scheduler.reference add <run dir roots...>`` copies the real runs' small results
(``metrics.json``, ``requests.parquet``, ``trace.parquet``) under ``outputs/reference/scheduler/runs/`` and
their calibrations under ``service/``; ``python -m rtlm_lab.scheduler.reference build`` then

* replays every real run's trace in the simulator with the same policy and the run's own calibrated service
  model -> ``sim_error.csv`` (mean response time, sim vs real);
* runs the sim grid (every policy and ablation x rho in {0.5, 0.7, 0.8, 0.9, 0.95} x 3 seeds) for each
  LM/platform with real runs, fed by a service model fit to the batches those runs served
  (``service/<lm>__<platform>.measured.json``) -> rows with ``mode=sim``;
* writes ``summary.csv`` (one row per run: lm, platform, mode, rho, policy, seed, n_requests, n_completed,
  mean_rt_s, p50_rt_s, p99_rt_s, throughput_rps, overhead_share, ...), ``summary.md`` (normalized to FCFS and to
  oracle SJF) and figures (response-time CDFs of the real runs, mean response time against rho).
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from rtlm_lab.scheduler.harness import reference_service

log = logging.getLogger("rtlm_lab.scheduler")

SUMMARY_COLUMNS = ["lm", "platform", "mode", "rho", "policy", "seed", "n_requests", "n_completed", "mean_rt_s",
                   "p50_rt_s", "p95_rt_s", "p99_rt_s", "throughput_rps", "throughput_tok_s", "slo_miss_rate",
                   "mean_batch_size", "max_batch", "overhead_share", "offload_share"]
RHOS = (0.5, 0.7, 0.8, 0.9, 0.95)
SEEDS = (0, 1, 2)


def ref_dir() -> Path:
    from rtlm_lab.paths import reference_dir

    return reference_dir() / "scheduler"


def _row(m: dict, mode: str | None = None) -> dict[str, Any]:
    per_worker = m.get("requests_per_worker") or {}
    n = max(1, int(m.get("n_completed", 0)))
    return {"lm": m["lm"], "platform": m["platform"], "mode": mode or m["mode"], "rho": m["rho"],
            "policy": m["policy"]["name"], "seed": m["seed"], "n_requests": m["n_requests"],
            "n_completed": m["n_completed"], "mean_rt_s": m["mean_rt_s"], "p50_rt_s": m["p50_rt_s"],
            "p95_rt_s": m["p95_rt_s"], "p99_rt_s": m["p99_rt_s"], "throughput_rps": m["throughput_rps"],
            "throughput_tok_s": m["throughput_tok_s"], "slo_miss_rate": m["slo_miss_rate"],
            "mean_batch_size": m["mean_batch_size"], "max_batch": m["policy"].get("max_batch"),
            "overhead_share": m["overhead_share"],
            "offload_share": sum(v for k, v in per_worker.items() if k != "main") / n}


def add_runs(roots: list[Path]) -> list[Path]:
    """Copy real runs found under ``roots`` into the reference tree (one dir per lm/platform/policy/seed; where
    several runs map to one, the newest wins)."""
    out = []
    found = sorted((p for root in roots for p in Path(root).rglob("metrics.json")), key=lambda p: p.stat().st_mtime)
    for mpath in found:
        m = json.loads(mpath.read_text())
        if m.get("mode") != "real" or "policy" not in m:
            continue
        dst = ref_dir() / "runs" / m["lm"] / m["platform"] / f"rho{m['rho']}-n{m['n_requests']}" / \
            m["policy"]["name"] / f"s{m['seed']}"
        dst.mkdir(parents=True, exist_ok=True)
        for f in ("metrics.json", "requests.parquet", "trace.parquet"):
            shutil.copy2(mpath.parent / f, dst / f)
        svc = reference_service(m["lm"], m["platform"])
        svc.parent.mkdir(parents=True, exist_ok=True)
        svc.write_text(json.dumps(m["service_model"], indent=1))
        if m.get("offload_service_model"):
            reference_service(m["lm"], m["platform"], "offload").write_text(
                json.dumps(m["offload_service_model"], indent=1))
        out.append(dst)
        log.info("added %s", dst)
    return out


def _composed(platform: str, policy: str = "fcfs") -> tuple[dict, dict]:
    """(platform, policy) configs exactly as ``rtlm-schedule platform=<platform> policy=<policy>`` composes them
    (Hydra's compose API: the ablation files' ``defaults`` and the ``${platform.max_batch}`` interpolation)."""
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    from rtlm_lab.tasks._cli import CONF_DIR

    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose("schedule", overrides=[f"platform={platform}", f"policy={policy}"])
    return (OmegaConf.to_container(cfg.platform, resolve=True), OmegaConf.to_container(cfg.policy, resolve=True))


def replay(run: Path) -> dict:
    """Simulate a real run's trace with its policy and calibrated service model(s)."""
    from rtlm_lab.scheduler.harness import to_requests, workers_for
    from rtlm_lab.scheduler.policies import make_policy
    from rtlm_lab.scheduler.service import ServiceModel
    from rtlm_lab.scheduler.sim import simulate
    from rtlm_lab.scheduler.workload import load_trace

    m = json.loads((run / "metrics.json").read_text())
    platform, _ = _composed(m["platform"])
    policy = make_policy(m["policy"]["name"], m["policy"])
    main = ServiceModel.from_dict(m["service_model"])
    off = ServiceModel.from_dict(m["offload_service_model"]) if m.get("offload_service_model") else None
    trace = load_trace(run / "trace.parquet")
    reqs = to_requests(trace, main, keep_predictions=True)
    workers = workers_for(policy, platform, main, off, int(m.get("n_offload_workers", 0)))
    slo_k = float(m["provenance"]["config"]["scheduler"].get("slo_k", 5.0))
    _, sm = simulate(reqs, policy, workers, slo_k=slo_k)
    # the same, with a service model fit to the batches this run actually served (ex post): how much of the
    # error is the calibration's, how much the simulator's
    rec = pd.read_parquet(run / "requests.parquet")
    main_rec = rec[rec["worker"] == "main"]
    refit = ServiceModel.from_records(main_rec)
    reqs2 = to_requests(trace, refit, keep_predictions=True)
    _, sm2 = simulate(reqs2, policy, workers_for(policy, platform, refit, off, int(m.get("n_offload_workers", 0))),
                      slo_k=slo_k)
    return {"lm": m["lm"], "platform": m["platform"], "policy": m["policy"]["name"], "rho": m["rho"],
            "seed": m["seed"], "n_requests": m["n_requests"], "real_mean_rt_s": m["mean_rt_s"],
            "sim_mean_rt_s": sm["mean_rt_s"], "real_p99_rt_s": m["p99_rt_s"], "sim_p99_rt_s": sm["p99_rt_s"],
            "error_mean": (sm["mean_rt_s"] - m["mean_rt_s"]) / m["mean_rt_s"],
            "sim_refit_mean_rt_s": sm2["mean_rt_s"],
            "error_mean_refit": (sm2["mean_rt_s"] - m["mean_rt_s"]) / m["mean_rt_s"],
            "main_utilization": m["worker_utilization"].get("main")}


def profile_for(lm: str, platform: str) -> Path:
    from rtlm_lab.paths import reference_dir

    return reference_dir() / "profiles" / f"{lm}__{platform}.parquet"


def measured_service(lm: str, platform: str) -> Path:
    """Fit one service model to every batch the main worker served in the cell's real reference runs
    (``service/<lm>__<platform>.measured.json``): the simulator's input for the grid."""
    from rtlm_lab.scheduler.service import ServiceModel

    runs = sorted((ref_dir() / "runs" / lm / platform).rglob("requests.parquet"))
    parts = []
    for i, r in enumerate(runs):
        d = pd.read_parquet(r)
        d = d[d["worker"] == "main"].copy()
        d["batch_id"] = d["batch_id"].astype(str) + f"-{i}"  # batch ids are per run
        parts.append(d)
    model = ServiceModel.from_records(pd.concat(parts, ignore_index=True), source=f"{len(runs)} real runs' batches")
    out = reference_service(lm, platform).with_suffix(".measured.json")
    out.write_text(json.dumps(model.to_dict(), indent=1))
    return out


def prediction_costs() -> dict[str, float]:
    """Seconds per request of each policy's prediction at batch 1, from the committed predictor benchmark
    (``outputs/reference/bench/regressor.json``, this project's 2-core CPU)."""
    from rtlm_lab.paths import reference_dir

    d = json.loads((reference_dir() / "bench" / "regressor.json").read_text())["cost"]
    proxy = d["proxy_minilm"]["us_per_prompt_batch1"] * 1e-6
    return {"pred_rtlm": d["rtlm_ridge"]["us_per_prompt_batch1"] * 1e-6, "pred_proxy": proxy, "ltr_score": proxy}


def sim_grid(lm: str, platform: str, policies, rhos=RHOS, seeds=SEEDS, n_requests: int = 200,
             service: Path | None = None) -> list[dict]:
    """Every policy x rho x seed in the simulator, with ``service`` (default: the committed calibration of
    ``lm`` on ``platform``)."""
    from rtlm_lab.paths import data_dir
    from rtlm_lab.scheduler.harness import make_trace, to_requests, workers_for
    from rtlm_lab.scheduler.policies import make_policy
    from rtlm_lab.scheduler.predictions import load_or_fit
    from rtlm_lab.scheduler.service import ServiceModel
    from rtlm_lab.scheduler.sim import simulate

    main = ServiceModel.load(service or reference_service(lm, platform))
    offp = reference_service(lm, platform, "offload")
    off = ServiceModel.load(offp) if offp.is_file() else None
    prof = profile_for(lm, platform)
    cost = prediction_costs()
    rows = []
    for seed in seeds:
        _, _, held = load_or_fit(prof, pd.read_parquet(prof), 0.4, seed, cache_dir=data_dir() / "cache" / "scheduler")
        for rho in rhos:
            trace, info = make_trace(held, main, {"kind": "poisson", "rho": rho, "n_requests": n_requests}, seed)
            for name in policies:
                plat, pcfg = _composed(platform, name)
                policy = make_policy(name, pcfg)
                n_off = int(plat.get("offload_workers", 0)) if getattr(policy, "offload", False) else 0
                reqs = to_requests(trace, main, keep_predictions=True)
                per_req = sum(cost.get(c, 0.0) for c in policy.needs)
                _, sm = simulate(reqs, policy, workers_for(policy, plat, main, off, n_off), slo_k=5.0,
                                 prediction_s_per_request=per_req)
                sm.update({"lm": lm, "platform": platform, "mode": "sim", "rho": rho, "seed": seed,
                           "policy": policy.describe()})
                rows.append(_row(sm, "sim"))
    return rows


def normalized_table(df: pd.DataFrame, mode: str = "real", rho: float = 0.9) -> pd.DataFrame:
    """Mean response time per lm/platform/policy divided by FCFS's and oracle SJF's (mean over seeds)."""
    d = df[(df["mode"] == mode) & np.isclose(df["rho"], rho)]
    g = d.groupby(["lm", "platform", "policy"])[["mean_rt_s", "p99_rt_s", "throughput_rps", "overhead_share"]].mean()
    out = []
    for (lm, plat), sub in g.groupby(level=[0, 1]):
        sub = sub.droplevel([0, 1])
        f = sub["mean_rt_s"].get("fcfs", np.nan)
        o = sub["mean_rt_s"].get("oracle_sjf", np.nan)
        fp = sub["p99_rt_s"].get("fcfs", np.nan)
        for pol, r in sub.iterrows():
            out.append({"lm": lm, "platform": plat, "policy": pol, "mean_rt_s": r["mean_rt_s"],
                        "vs_fcfs": r["mean_rt_s"] / f, "vs_oracle": r["mean_rt_s"] / o,
                        "p99_vs_fcfs": r["p99_rt_s"] / fp, "overhead_share": r["overhead_share"]})
    return pd.DataFrame(out)


def build(grid: bool = True, n_sim: int = 200) -> dict:
    from rtlm_lab.io import provenance, write_json_atomic
    from rtlm_lab.scheduler.policies import POLICIES
    from rtlm_lab.viz.scheduler import plot_cdf, plot_rt_vs_rho

    root = ref_dir()
    runs = sorted(p.parent for p in (root / "runs").rglob("metrics.json"))
    real_rows = [_row(json.loads((r / "metrics.json").read_text())) for r in runs]
    err = pd.DataFrame([replay(r) for r in runs])
    err.to_csv(root / "sim_error.csv", index=False)
    rows = list(real_rows)
    cells = sorted({(r["lm"], r["platform"]) for r in real_rows})
    if grid:
        for lm, plat in cells:
            log.info("sim grid %s on %s", lm, plat)
            rows += sim_grid(lm, plat, POLICIES, n_requests=n_sim, service=measured_service(lm, plat))
    df = pd.DataFrame(rows)[SUMMARY_COLUMNS]
    df.to_csv(root / "summary.csv", index=False)
    figs = root / "figures"
    for lm, plat in cells:
        sub = [r for r in runs if r.parts[-5] == lm and r.parts[-4] == plat]
        rts = {r.parts[-2]: pd.read_parquet(r / "requests.parquet")["response_s"].to_numpy() for r in sub}
        plot_cdf(rts, figs, title=f"{lm} on {plat}: real runs, rho 0.9", stem=f"cdf_{lm}__{plat}")
        if grid:
            g = df[(df["mode"] == "sim") & (df["lm"] == lm) & (df["platform"] == plat)]
            plot_rt_vs_rho(g, figs, title=f"{lm} on {plat}: simulated, 3 seeds", stem=f"rt_vs_rho_{lm}__{plat}")
    norm_real = normalized_table(df, "real")
    norm_sim = normalized_table(df, "sim") if grid else pd.DataFrame()
    norm_real.to_csv(root / "normalized_real.csv", index=False)
    if grid:
        norm_sim.to_csv(root / "normalized_sim_rho0.9.csv", index=False)
    write_json_atomic(root / "provenance.json", provenance(
        {"runs": [str(r.relative_to(root)) for r in runs], "grid": grid, "rhos": list(RHOS), "seeds": list(SEEDS),
         "n_sim": n_sim}))
    return {"runs": len(runs), "rows": len(df), "sim_error": err}


def markdown() -> str:
    """The README tables from the committed reference files."""
    root = ref_dir()
    df = pd.read_csv(root / "summary.csv")
    err = pd.read_csv(root / "sim_error.csv")
    lines = ["Real runs, rho 0.9 (nominal: from the calibrated batch-1 service time; `main util` is the main "
             "worker's realized busy share):", "",
             "| lm | platform | policy | n | mean RT s | vs FCFS | vs oracle | p99 vs FCFS | mean batch | offloaded | "
             "overhead | main util |", "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    real = df[df["mode"] == "real"]
    util = {(r.lm, r.platform, r.policy): r.main_utilization for r in err.itertuples()}
    for (lm, plat), g in real.groupby(["lm", "platform"]):
        f = g[g["policy"] == "fcfs"]
        o = g[g["policy"] == "oracle_sjf"]
        fm, fp = (f["mean_rt_s"].mean(), f["p99_rt_s"].mean()) if len(f) else (np.nan, np.nan)
        om = o["mean_rt_s"].mean() if len(o) else np.nan
        for r in g.sort_values("policy").itertuples():
            def ratio(a, b):
                return f"{a / b:.2f}" if np.isfinite(b) and b > 0 else "-"
            lines.append(f"| {lm} | {plat} | {r.policy} | {r.n_completed} | {r.mean_rt_s:.3f} | {ratio(r.mean_rt_s, fm)} | "
                         f"{ratio(r.mean_rt_s, om)} | {ratio(r.p99_rt_s, fp)} | {r.mean_batch_size:.2f} | "
                         f"{100 * r.offload_share:.0f}% | {100 * r.overhead_share:.1f}% | "
                         f"{util.get((lm, plat, r.policy), np.nan):.2f} |")
    lines += ["", "Simulator error on the real runs' own traces (mean response time, (sim - real) / real): fed by "
              "the calibration the run used, and by a service model fit to the batches the run served:", "",
              "| lm | platform | policy | real mean s | sim (calibration) | error | sim (served batches) | error |",
              "|---|---|---|---|---|---|---|---|"]
    for r in err.sort_values(["platform", "lm", "policy"]).itertuples():
        lines.append(f"| {r.lm} | {r.platform} | {r.policy} | {r.real_mean_rt_s:.3f} | {r.sim_mean_rt_s:.3f} | "
                     f"{100 * r.error_mean:+.0f}% | {r.sim_refit_mean_rt_s:.3f} | {100 * r.error_mean_refit:+.0f}% |")
    sim = df[(df["mode"] == "sim") & np.isclose(df["rho"], 0.9)]
    for plat, gp in sim.groupby("platform"):
        m = gp.groupby(["policy", "lm"])["mean_rt_s"].mean().unstack()
        p99 = gp.groupby(["policy", "lm"])["p99_rt_s"].mean().unstack()
        rel, relo, relp = m / m.loc["fcfs"], m / m.loc["oracle_sjf"], p99 / p99.loc["fcfs"]
        lms = list(m.columns)
        lines += ["", f"Simulated, {plat}, rho 0.9, 200 requests, mean of 3 seeds: mean response time vs FCFS "
                  "(vs oracle SJF; p99 vs FCFS's):", "",
                  "| policy | " + " | ".join(lms) + " |", "|---" * (len(lms) + 1) + "|"]
        for pol in rel.index:
            lines.append(f"| {pol} | " + " | ".join(f"{rel.loc[pol, l]:.2f} ({relo.loc[pol, l]:.2f}; {relp.loc[pol, l]:.2f})"
                                                  for l in lms) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
