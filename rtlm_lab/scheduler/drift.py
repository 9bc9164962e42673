"""Run-time recalibration at run time: a predictor fitted on one LM's profile serving another LM's requests.

:func:`run_drift` runs ``rtlm-schedule mode=sim policy=rtlm lm=<target_lm>
scheduler.predictor_profile=<source profile>`` (composed as the CLI composes it,
:func:`~rtlm_lab.scheduler.study.compose_config`) with ``scheduler.online_update`` off and on, for each seed,
and scores the predictions each request got at prediction time (``requests.parquet``: ``pred_tokens`` vs the
generated ``actual_tokens``) over the stream in arrival order: overall MAE and Kendall tau, rolling ones
(``window`` requests), and the mean response time. Writes ``drift.csv`` (one row per seed x arm),
``summary.csv`` (mean and std over seeds), ``drift.json``, ``drift.png/svg`` (rolling curves) and
``provenance.json`` into ``out``; the run dirs go to ``outputs/drift/<source>__to__<target>__<platform>/runs/``.

CLI (``conf/drift.yaml``)::

    rtlm-drift source_lm=dialogpt_ccc target_lm=smollm2_135m platform=cpu seeds=[0,1,2]
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import pandas as pd

from rtlm_lab.regressor.evaluate import _kendall
from rtlm_lab.regressor.recalibration import _rolling, _rolling_tau

ARMS = {"frozen": "false", "online_update": "true"}


def _score(rec: pd.DataFrame, window: int) -> tuple[dict[str, float], pd.DataFrame]:
    rec = rec.sort_values(["arrival_s", "request_id"]).reset_index(drop=True)
    p, y = rec["pred_tokens"].to_numpy(float), rec["actual_tokens"].to_numpy(float)
    err = np.abs(p - y)
    half = len(y) // 2
    curves = pd.DataFrame({"request": np.arange(len(y)), "rolling_mae": _rolling(err, window),
                           "rolling_tau": _rolling_tau(p, y, window)})
    meas = rec[~rec["warmup"]]
    return {"mae_tokens": float(err.mean()), "kendall_tau": _kendall(p, y),
            "mae_second_half": float(err[half:].mean()), "kendall_tau_second_half": _kendall(p[half:], y[half:]),
            "mean_rt_s": float(meas["response_s"].mean()), "p99_rt_s": float(np.percentile(meas["response_s"], 99)),
            "mean_pred_tokens": float(p.mean()), "mean_true_tokens": float(y.mean())}, curves


def run_drift(source_lm: str = "dialogpt_ccc", target_lm: str = "smollm2_135m", platform: str = "cpu",
              seeds: Sequence[int] = (0, 1, 2), n_requests: int = 300, rho: float = 0.9, window: int = 50,
              workload: str = "poisson", out: str | Path | None = None, overrides: Sequence[str] = (),
              progress: bool = False) -> dict[str, Any]:
    from rtlm_lab.io import provenance, write_json_atomic
    from rtlm_lab.paths import outputs_dir
    from rtlm_lab.scheduler.harness import run_experiment
    from rtlm_lab.scheduler.study import compose_config, default_profile

    name = f"{source_lm}__to__{target_lm}__{platform}"
    out = Path(out) if out else outputs_dir() / "drift" / name
    runs = outputs_dir() / "drift" / name / "runs"   # the per-run dirs (parquet): never under the tables' folder
    src, tgt = default_profile(source_lm, platform), default_profile(target_lm, platform)
    rows, curves = [], {}
    for seed in seeds:
        for arm, flag in ARMS.items():
            run_dir = runs / f"{arm}-s{seed}"
            cfg = _compose(compose_config, target_lm, platform, "rtlm", workload, rho, n_requests, "sim", int(seed), "auto",
                                 tgt, run_dir, overrides=[f"scheduler.predictor_profile={src}",
                                                          f"scheduler.online_update={flag}",
                                                          "scheduler.figures=false", *overrides])
            m = run_experiment(cfg, run_dir, tgt, progress=progress)
            score, c = _score(pd.read_parquet(run_dir / "requests.parquet"), window)
            rows.append({"seed": int(seed), "arm": arm, **score, "n_online_updates": m["n_online_updates"],
                         "n_requests": m["n_requests"]})
            curves[arm, int(seed)] = c
    table = pd.DataFrame(rows)
    summary = table.drop(columns=["seed"]).groupby("arm", sort=False).agg(["mean", "std"])
    summary.columns = [f"{a}_{b}" for a, b in summary.columns]
    out.mkdir(parents=True, exist_ok=True)
    table.to_csv(out / "drift.csv", index=False, float_format="%.4f")
    summary.to_csv(out / "summary.csv", float_format="%.4f")
    _figure(curves, out, f"predictor fitted on {source_lm}, serving {target_lm} ({platform}, sim, rtlm, "
                         f"rho={rho}, {n_requests} req, window {window})")
    res = {"source_lm": source_lm, "target_lm": target_lm, "platform": platform, "seeds": list(map(int, seeds)),
           "n_requests": n_requests, "rho": rho, "window": window, "rows": rows,
           "summary": json.loads(summary.to_json())}
    write_json_atomic(out / "drift.json", res)
    write_json_atomic(out / "provenance.json", provenance({"source_lm": source_lm, "target_lm": target_lm,
                                                          "platform": platform, "seeds": list(map(int, seeds)),
                                                          "n_requests": n_requests, "rho": rho, "window": window,
                                                          "overrides": list(overrides)}, out=str(out),
                                                         runs=str(runs), command=" ".join(["rtlm-drift", *sys.argv[1:]])))
    return res


def _compose(fn, *args, **kw):
    """``fn`` (Hydra's compose API) also from inside a running Hydra task (``rtlm-drift``): the task's global
    Hydra is set aside for the compose and put back."""
    from hydra.core.global_hydra import GlobalHydra

    gh = GlobalHydra.instance()
    saved = gh.hydra if gh.is_initialized() else None
    gh.clear()
    try:
        return fn(*args, **kw)
    finally:
        if saved is not None:
            GlobalHydra.instance().initialize(saved)


def _figure(curves, out: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 3.8))
    colors = {"frozen": "tab:red", "online_update": "tab:blue"}
    for (arm, seed), c in curves.items():
        kw = {"color": colors[arm], "alpha": 0.8, "lw": 1.2, "label": arm if seed == min(s for _, s in curves) else None}
        axes[0].plot(c["request"], c["rolling_mae"], **kw)
        axes[1].plot(c["request"], c["rolling_tau"], **kw)
    axes[0].set(xlabel="request (arrival order)", ylabel="rolling MAE (tokens)")
    axes[1].set(xlabel="request (arrival order)", ylabel="rolling Kendall tau")
    axes[0].legend()
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    for ext in ("png", "svg"):
        fig.savefig(out / f"drift.{ext}", dpi=120)
    plt.close(fig)
