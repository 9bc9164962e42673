"""Notebook 03's study: several policies on the same seeded workloads of one LM on one platform.

:func:`run_study` composes ``conf/schedule.yaml`` for every (policy, rho, seed) exactly as the CLI
``rtlm-schedule lm=… platform=… policy=… workload=… …`` composes it (Hydra's compose API), runs
:func:`~rtlm_lab.scheduler.harness.run_experiment` for each, and returns a :class:`Study`: the headline table at
``rho``, the ratios to FCFS and to the oracle with paired block-bootstrap 95% CIs
(:func:`rtlm_lab.scheduler.analysis.summarize`), the load sweep (sim mode), the prediction quality, the figures,
and the ``metrics.json`` that ``rtlm-report`` and ``rtlm-sweep`` read (written into ``out_dir``).

The oracle of the ratio table is ``oracle_srpt`` (the preemptive lower bound) on the continuous engine and
``oracle_sjf`` on the static-batch path (where no policy preempts), whichever of the two was run.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import pandas as pd

from rtlm_lab.errors import UserError
from rtlm_lab.paths import repo_root, resolve_path

MODES = ("sim", "real")
ENGINE_CHOICES = ("auto", "continuous", "static")
HEADLINE = ["mean_rt_s", "p50_rt_s", "p99_rt_s", "mean_ttft_ms", "p99_ttft_ms", "throughput_rps", "slo_miss_rate",
            "realized_rho", "prediction_share", "overhead_share", "mean_running_seqs", "mean_batch_size"]
NORM = ["mean_rt_s", "p50_rt_s", "p99_rt_s", "throughput_rps", "slo_miss_rate"]
FIGURES = ("response_cdf", "rt_vs_rho", "p99_vs_rho", "batches_predictions")


def default_profile(lm: str, platform: str) -> Path:
    return repo_root() / "outputs" / "reference" / "profiles" / f"{lm}__{platform}.parquet"


def default_out_dir(lm: str, platform: str) -> Path:
    return repo_root() / "outputs" / "notebooks" / "03_scheduler" / lm / platform


def compose_config(lm: str, platform: str, policy: str, workload: str, rho: float, n_requests: int, mode: str,
                   seed: int, engine: str, profile_path: Path, run_dir: Path, overrides: Sequence[str] = (),
                   lm_dir: str | None = None, lm_overrides: Mapping[str, Any] | None = None) -> dict:
    """``conf/schedule.yaml`` composed as the CLI would, with the run dir and the profile set; a plain dict.
    ``lm_dir`` serves a save_pretrained folder as ``lm`` under the name ``<lm>-<folder>`` (its own caches)."""
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf, open_dict

    from rtlm_lab.paths import CONF_DIR

    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose("schedule", overrides=[
            f"lm={lm}", f"platform={platform}", f"policy={policy}", f"workload={workload}",
            f"workload.rho={rho}", f"workload.n_requests={n_requests}", f"mode={mode}", f"seed={seed}",
            f"scheduler.engine={engine}", *overrides])
    cfg.paths.run_dir = str(run_dir)  # the CLI's ${hydra:runtime.output_dir}
    cfg.profile = str(profile_path)
    with open_dict(cfg):
        if lm_dir:
            cfg.lm.local_dir = str(Path(lm_dir).expanduser().resolve())
            cfg.lm.name = f"{lm}-{Path(lm_dir).name}"
        for k, v in dict(lm_overrides or {}).items():
            cfg.lm[k] = v
    return OmegaConf.to_container(cfg, resolve=True)


def check_choices(lm: str, platform: str, workload: str, policies: Sequence[str], mode: str, engine: str) -> None:
    from rtlm_lab.paths import config_options as group_options

    choices = [("lm", lm), ("platform", platform), ("workload", workload), *(("policy", p) for p in policies)]
    for group, choice in choices:
        if choice not in group_options(group):
            raise UserError(f"unknown {group} {choice!r}; choose one of: {', '.join(group_options(group))}")
    if mode not in MODES:
        raise UserError(f"mode must be 'sim' or 'real' (got {mode!r})")
    if engine not in ENGINE_CHOICES:
        raise UserError(f"engine must be one of {', '.join(ENGINE_CHOICES)} (got {engine!r})")
    if not policies:
        raise UserError("no policies to compare")


def preflight(cfg: Mapping[str, Any]) -> str:
    """The engine a config runs on; in sim mode on the continuous engine, fails at once (one UserError line)
    without a measured capacity file, before any predictor is fitted."""
    from rtlm_lab.scheduler.harness import resolve_engine

    engine = resolve_engine(cfg["scheduler"].get("engine", "auto"), cfg["lm"])
    if engine == "continuous" and cfg["mode"] == "sim":
        from rtlm_lab.scheduler.continuous import engine_config, sim_capacity

        sim_capacity(cfg["lm"]["name"], cfg["platform"]["name"], engine_config(cfg["platform"]),
                     cfg["scheduler"].get("capacity"))
    return engine


@dataclass
class Study:
    """What :func:`run_study` returns (DataFrames indexed as the notebook shows them)."""

    params: dict
    profile_path: Path
    out_dir: Path
    engine: str
    oracle: str | None
    table: pd.DataFrame                    # per policy at rho, means over seeds
    ratios: pd.DataFrame                   # analysis.summarize rows at rho (ratios to fcfs / oracle, CIs)
    normalized: dict[str, pd.DataFrame]    # tag -> per policy ratios at rho (<metric>_vs_<tag>)
    sweep: pd.DataFrame | None             # per policy x rho x seed (sim mode)
    predictions: dict[str, dict]
    run_dirs: dict[tuple[str, float, int], Path]
    metrics: dict[tuple[str, float, int], dict] = field(repr=False)
    figures: dict[str, Any] = field(default_factory=dict, repr=False)
    summary: dict = field(default_factory=dict, repr=False)

    def records(self, policy: str, rho: float | None = None) -> pd.DataFrame:
        """``requests.parquet`` of a policy at ``rho`` (default: the headline rho), all seeds."""
        rho = float(self.params["rho"] if rho is None else rho)
        return pd.concat([pd.read_parquet(d / "requests.parquet").assign(seed=s)
                          for (p, r, s), d in self.run_dirs.items() if p == policy and r == rho], ignore_index=True)

    @property
    def headline(self) -> str:
        m0 = next(iter(self.metrics.values()))
        w = m0["workload"]
        extra = (f"engine: continuous, capacity {m0['capacity_rps']:.2f} req/s "
                 f"({(m0.get('capacity') or {}).get('source_file') or 'measured now'})" if self.engine == "continuous"
                 else f"engine: static, service model {m0['service_model']['source']}")
        return (f"{m0['lm']} on {m0['platform']} ({self.params['mode']}), workload={self.params['workload']} "
                f"rho={self.params['rho']}: {w['n_requests']} requests over {w.get('duration_s', math.nan):.1f} s, "
                f"seeds {self.params['seeds']}; {extra}")


def _jsonable(df: pd.DataFrame | None, index: bool = True):
    if df is None:
        return None
    out = df.reset_index() if index else df
    return out.astype(object).where(out.notna(), None).to_dict(orient="records")


def _prediction_stats(rec: pd.DataFrame) -> dict:
    from scipy.stats import spearmanr

    ok = rec["pred_tokens"].notna()
    x, y = rec.loc[ok, "actual_tokens"].to_numpy(float), rec.loc[ok, "pred_tokens"].to_numpy(float)
    rho_s = float(spearmanr(x, y).statistic) if len(x) > 2 and np.ptp(x) > 0 and np.ptp(y) > 0 else math.nan
    return {"n": int(len(x)), "mae_tokens": float(np.mean(np.abs(y - x))) if len(x) else math.nan,
            "spearman": rho_s}


def _batch_hist(m: dict, run_dir: Path) -> dict[int, int]:
    """Static path: batches started per size; continuous engine: engine steps per number of running rows."""
    if "batch_size_hist" in m:
        return {int(k): int(v) for k, v in m["batch_size_hist"].items()}
    steps = run_dir / "steps.parquet"
    if not steps.is_file():
        return {}
    return {int(k): int(v) for k, v in pd.read_parquet(steps)["n_seqs"].value_counts().sort_index().items()}


def run_study(lm: str = "gemma3_270m", platform: str = "cpu", policies: Sequence[str] = ("fcfs", "rtlm"),
              rho: float = 0.9, rhos: Sequence[float] = (), n_requests: int = 100, mode: str = "sim",
              seeds: Sequence[int] = (0,), workload: str = "poisson", engine: str = "auto",
              profile: str | Path | None = None, out_dir: str | Path | None = None, lm_dir: str | None = None,
              lm_overrides: Mapping[str, Any] | None = None, overrides: Sequence[str] = (),
              n_boot: int = 1000, figures: bool = True, progress: bool = False) -> Study:
    """See the module doc. ``rhos``: the load sweep (sim mode only; the headline ``rho`` is always run)."""
    os.environ.setdefault("RTLM_ROOT", str(repo_root()))
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from rtlm_lab.io import provenance, sha256_file, write_json_atomic
    from rtlm_lab.scheduler import analysis
    from rtlm_lab.scheduler.harness import run_experiment

    policies = list(dict.fromkeys(policies))
    seeds = [int(s) for s in dict.fromkeys(seeds)]
    check_choices(lm, platform, workload, policies, mode, engine)
    if not seeds:
        raise UserError("no seeds")
    profile_path = resolve_path(profile, default_profile(lm, platform))
    if not profile_path.is_file():
        raise UserError(f"no profile {profile_path}; run `rtlm-profile lm={lm} platform={platform}` first")
    out_dir = resolve_path(out_dir, default_out_dir(lm, platform))
    out_dir.mkdir(parents=True, exist_ok=True)
    rho = float(rho)
    grid = sorted(set(map(float, rhos)) | {rho}) if mode == "sim" else [rho]
    params = {"lm": lm, "platform": platform, "policies": policies, "rho": rho, "rhos": [float(r) for r in rhos],
              "n_requests": int(n_requests), "mode": mode, "seeds": seeds, "workload": workload, "engine": engine,
              "profile": str(profile_path), "out_dir": str(out_dir), "lm_dir": str(lm_dir) if lm_dir else None,
              "lm_overrides": dict(lm_overrides or {}), "overrides": list(overrides), "n_boot": int(n_boot)}

    def config(policy, r, s):
        run_dir = out_dir / "runs" / f"{mode}-{engine}-{workload}-rho{r}-n{n_requests}-s{s}" / policy
        return compose_config(lm, platform, policy, workload, r, n_requests, mode, s, engine, profile_path,
                              run_dir, overrides, lm_dir, lm_overrides), run_dir

    resolved = preflight(config(policies[0], rho, seeds[0])[0])
    run_dirs, metrics = {}, {}
    for r in grid:
        for s in seeds:
            for p in policies:
                plain, run_dir = config(p, r, s)
                metrics[p, r, s] = run_experiment(plain, run_dir, profile_path, progress=progress)
                run_dirs[p, r, s] = run_dir
    n_total = {k: m["n_unique_completed"] for k, m in metrics.items()}
    if any(v != int(n_requests) for v in n_total.values()):
        raise RuntimeError(f"requests not accounted for: {n_total}")

    oracle = next((o for o in (("oracle_srpt", "oracle_sjf") if resolved == "continuous" else
                               ("oracle_sjf", "oracle_srpt")) if o in policies), None)
    summ = analysis.summarize(list(run_dirs.values()), baseline="fcfs", oracle=oracle or "oracle_srpt",
                              n_boot=int(n_boot))
    summ = summ.set_index(["policy", "nominal_rho"])
    at = summ.xs(rho, level="nominal_rho").reindex(policies)

    rows = []
    for p in policies:
        ms = [metrics[p, rho, s] for s in seeds]
        row = {"policy": p}
        for k in HEADLINE:
            vals = [float(m[k]) for m in ms if isinstance(m.get(k), (int, float))]
            if vals:
                row[k] = float(np.mean(vals))
        row["n_completed"] = int(sum(m["n_completed"] for m in ms) / len(ms))
        row["n_measured"] = int(sum(m.get("n_measured", m["n_completed"]) for m in ms) / len(ms))
        rows.append(row)
    table = pd.DataFrame(rows).set_index("policy")

    normalized = {}
    for ref, tag in (("fcfs", "fcfs"), (oracle, "oracle")):
        if ref not in policies:
            continue
        df = (table[NORM] / table.loc[ref, NORM].replace(0, np.nan)).add_suffix(f"_vs_{tag}")
        for stat in ("mean", "p99"):  # pooled over seeds and the same measured requests, with the bootstrap CI
            for suf in ("", "_lo", "_hi"):
                df[f"{stat}_rt_s_vs_{tag}{suf}"] = at[f"{stat}_rt_vs_{tag}{suf}"]
        normalized[tag] = df

    sweep = None
    if mode == "sim":
        sweep = pd.DataFrame([{"policy": p, "rho": r, "seed": s, **{k: metrics[p, r, s].get(k, math.nan) for k in (
            "mean_rt_s", "p99_rt_s", "slo_miss_rate", "throughput_rps", "realized_rho")}}
            for (p, r, s) in run_dirs])
    pred_policies = [p for p in policies if p.startswith("rtlm") or p == "sjf_proxy"]
    recs = {p: pd.concat([pd.read_parquet(run_dirs[p, rho, s] / "requests.parquet") for s in seeds],
                         ignore_index=True) for p in policies}
    predictions = {p: _prediction_stats(recs[p]) for p in pred_policies}
    hist = {p: _batch_hist(metrics[p, rho, seeds[0]], run_dirs[p, rho, seeds[0]]) for p in policies}

    study = Study(params=params, profile_path=profile_path, out_dir=out_dir, engine=resolved, oracle=oracle,
                  table=table, ratios=at.reset_index(), normalized=normalized, sweep=sweep,
                  predictions=predictions, run_dirs=run_dirs, metrics=metrics)
    if figures:
        study.figures = make_figures(study, recs, hist, pred_policies)

    m0 = metrics[policies[0], rho, seeds[0]]
    summary = {
        "lm": m0["lm"], "platform": m0["platform"], "mode": mode, "engine": resolved, "oracle": oracle,
        "workload": workload, "rho": rho, "n_requests": int(n_requests), "seed": seeds[0], "seeds": seeds,
        "policies": policies, "service_model": m0.get("service_model"), "capacity": m0.get("capacity"),
        "trace": m0["workload"],
        "table": _jsonable(table),
        "normalized": {tag: _jsonable(df) for tag, df in normalized.items()},
        "ratios": _jsonable(study.ratios, index=False),
        "sweep": _jsonable(sweep, index=False),
        "batch_size_hist" if resolved == "static" else "running_seqs_hist": hist,
        "predictions": predictions,
        "runs": {f"{p}@rho{r}" + (f"@s{s}" if len(seeds) > 1 else ""): str(d) for (p, r, s), d in run_dirs.items()},
        "figures": sorted(p.name for stem in study.figures for p in out_dir.glob(f"{stem}.*")),
    }
    summary["provenance"] = provenance({**params, "notebook": "notebooks/03_scheduler.ipynb"},
                                       profile=str(profile_path), profile_sha256=sha256_file(profile_path))
    write_json_atomic(out_dir / "metrics.json", summary)
    study.summary = summary
    return study


def make_figures(study: Study, recs: Mapping[str, pd.DataFrame], hist: Mapping[str, Mapping[int, int]],
                 pred_policies: Sequence[str]) -> dict[str, Any]:
    """The notebook's figures (PNG + SVG in ``out_dir``): response-time CDFs, the load sweep (sim), and running
    rows (continuous) or batch sizes (static) beside predicted vs actual tokens."""
    from rtlm_lab.viz.scheduler import COLORS, plot_cdf, plot_rt_vs_rho
    from rtlm_lab.viz.uncertainty import _plt, save_figure

    p = study.params
    m0 = next(iter(study.metrics.values()))
    where = f"{m0['lm']} on {m0['platform']} ({p['mode']}, {study.engine})"
    out = {"response_cdf": plot_cdf({k: v["response_s"].to_numpy(float) for k, v in recs.items()}, study.out_dir,
                                    title=f"{where}, {p['workload']} rho={p['rho']}, n={p['n_requests']}")}
    if study.sweep is not None:
        title = f"{where}, {p['workload']}, n={p['n_requests']}"
        out["rt_vs_rho"] = plot_rt_vs_rho(study.sweep, study.out_dir, title=title)
        out["p99_vs_rho"] = plot_rt_vs_rho(study.sweep, study.out_dir, title=title, stem="p99_vs_rho",
                                           value="p99_rt_s")
    plt = _plt()
    policies = list(recs)
    h = pd.DataFrame({k: pd.Series(v, dtype=float) for k, v in hist.items()}).fillna(0).sort_index()
    fig, axes = plt.subplots(1, 1 + len(pred_policies), figsize=(4.2 * (1 + len(pred_policies)), 3.6), squeeze=False)
    ax = axes[0, 0]
    w = 0.8 / max(1, len(policies))
    for i, pol in enumerate(policies):
        if pol in h:
            ax.bar(np.arange(len(h)) + i * w - 0.4 + w / 2, h[pol], width=w, label=pol, color=COLORS.get(pol))
    ax.set_xticks(np.arange(len(h)), [str(int(v)) for v in h.index], fontsize=7)
    ax.set_xlabel("running requests in a step" if study.engine == "continuous" else "batch size")
    ax.set_ylabel("engine steps" if study.engine == "continuous" else "batches")
    ax.legend(fontsize=7)
    ax.set_title(f"rho={p['rho']}, seed {p['seeds'][0]}", fontsize=9)
    for ax, pol in zip(axes[0, 1:], pred_policies):
        rec = recs[pol]
        ok = rec["pred_tokens"].notna()
        x, y = rec.loc[ok, "actual_tokens"].to_numpy(float), rec.loc[ok, "pred_tokens"].to_numpy(float)
        ax.scatter(x, y, s=10, alpha=0.6, color=COLORS.get(pol))
        hi = max([1.0, *x, *y])
        ax.plot([0, hi], [0, hi], "k--", lw=0.8)
        st = study.predictions[pol]
        ax.set_title(f"{pol}: MAE {st['mae_tokens']:.1f} tok, Spearman {st['spearman']:.2f}", fontsize=9)
        ax.set_xlabel("actual output tokens")
        ax.set_ylabel("predicted output tokens")
    fig.tight_layout()
    save_figure(fig, study.out_dir, "batches_predictions")
    plt.close(fig)
    out["batches_predictions"] = fig
    return out
