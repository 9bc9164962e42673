"""The simulation grid: every policy and ablation x rho x seed for the five LMs on both platforms, in sim mode,
summarized as one table labelled *sim* (``rtlm-reference target=sim_grid``).

What each cell simulates is the measured engine of that LM x platform (no LM runs):

* decoder-only LMs: the continuous engine with the step model of the committed saturation run
  (``outputs/reference/scheduler/engine/<lm>__<platform>__<engine hash>.json``; the cell's overrides pick the
  engine budgets the real groups ran with, so the hash names that file);
* encoder-decoders: the static path with the committed service models (``outputs/reference/scheduler/service/``).

The runs are ordinary ``rtlm-schedule mode=sim`` runs, one Hydra multirun per cell (``rtlm-schedule -m``), with
``RTLM_OUTPUT_DIR`` set to the grid's own root: this machine's own capacity or service measurements under
``outputs/schedule/`` are not read, only the committed ones, so the grid means the same on any machine. A run
dir that already holds ``metrics.json`` is skipped, so an interrupted grid resumes where it stopped.

Predictions are on the simulated clock at a cost measured on the cell's platform: a cell with
``prediction_cost_from`` (the cuda cells: real H200 runs) is charged the median per-request cost of those real
runs' online predictions (``scheduler.prediction_cost_s``); the others (the cpu cells) time 20 predictions a run
on the machine building the grid, which is the 2-core cpu platform itself, so build it with nothing else
running. The grid's ``overrides`` apply to every cell (``scheduler.overhead_samples=0``: predictions free, the
ordering bound). The table says which engine file each cell used, the provenance which prediction cost.

The LM-state policies read the served LM's hidden states on the real slot engine and have no sim form; they are
in the real groups only.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import pandas as pd

from rtlm_lab.errors import UserError

log = logging.getLogger("rtlm_lab.scheduler")

RUN_RE = re.compile(r"poisson-rho(?P<rho>[0-9.]+)-n(?P<n>\d+)$")


def cell_name(cell: Mapping[str, Any]) -> str:
    """``sim__<platform>__<lm>``, plus ``__<tag>`` for a cell with a ``tag`` (the same LM x platform under
    other overrides, e.g. another placement: its runs live under ``<root>/<tag>``)."""
    return f"sim__{cell['platform']}__{cell['lm']}" + (f"__{cell['tag']}" if cell.get("tag") else "")


def cell_root(root: Path, cell: Mapping[str, Any]) -> Path:
    """Where the cell's runs live: the grid root, or ``<root>/<tag>`` for a tagged cell."""
    return Path(root) / str(cell["tag"]) if cell.get("tag") else Path(root)


COST_COLUMN = {"rtlm": "pred_rtlm", "sjf_proxy": "pred_proxy", "ltr": "ltr_score"}  # what each policy predicts


def measured_prediction_costs(patterns: Sequence[str]) -> tuple[dict[str, float], dict[str, int]]:
    """Per prediction column, the median per-request prediction cost (seconds: ``prediction_s / n_requests``)
    over the real continuous-engine runs matching ``patterns`` that predicted online (RT-LM's runs give
    ``pred_rtlm``, SJF-proxy's ``pred_proxy``, LTR's ``ltr_score``), and how many runs each median is over.
    The cost of a run's predictions at its own arrival rate, batching included, as its predictor thread took
    it on that machine beside the engine."""
    from rtlm_lab.scheduler.replay import _glob

    per: dict[str, list[float]] = {}
    for d in _glob(patterns):
        try:
            m = json.loads((d / "metrics.json").read_text())
        except (OSError, json.JSONDecodeError):
            continue
        pol = m["policy"]["name"] if isinstance(m.get("policy"), dict) else str(m.get("policy"))
        if (pol in COST_COLUMN and m.get("mode") == "real" and m.get("engine") == "continuous"
                and m.get("online_predictions") and m.get("prediction_s") and m.get("n_requests")):
            per.setdefault(COST_COLUMN[pol], []).append(float(m["prediction_s"]) / float(m["n_requests"]))
    return {c: float(np.median(v)) for c, v in per.items()}, {c: len(v) for c, v in per.items()}


def cell_costs(cell: Mapping[str, Any]) -> dict[str, Any] | None:
    """The cell's ``prediction_cost_from`` runs' costs (None: none named, the runs time predictions here)."""
    pats = [str(p) for p in cell.get("prediction_cost_from") or []]
    if not pats:
        return None
    costs, n = measured_prediction_costs(pats)
    missing = sorted(set(COST_COLUMN.values()) - set(costs))
    if missing:
        raise UserError(f"{cell_name(cell)}: no real run under {pats} measured {missing} (prediction_cost_from)")
    return {"costs": costs, "runs": n, "from": pats}


def cell_command(cell: Mapping[str, Any], grid: Mapping[str, Any], root: Path) -> list[str]:
    """The ``rtlm-schedule -m`` command line of one cell (every policy x rho x seed)."""
    exe = Path(sys.executable).with_name("rtlm-schedule")
    prog = [str(exe)] if exe.is_file() else [sys.executable, "-m", "rtlm_lab.tasks.schedule"]
    join = lambda xs: ",".join(str(x) for x in xs)  # noqa: E731
    cost = cell_costs(cell)
    extra = ([] if cost is None else ["scheduler.prediction_cost_s={" + ",".join(
        f"{c}:{v:.6g}" for c, v in sorted(cost["costs"].items())) + ",source:real_runs_median}"])
    return [*prog, "-m", f"lm={cell['lm']}", f"platform={cell['platform']}", "mode=sim",
            f"policy={join(grid['policies'])}", f"workload.rho={join(grid['rhos'])}", f"seed={join(grid['seeds'])}",
            f"workload.n_requests={int(grid['n_requests'])}", "scheduler.figures=false",
            *[str(o) for o in grid.get("overrides") or []], *[str(o) for o in cell.get("overrides") or []], *extra]


def cell_runs(root: Path, cell: Mapping[str, Any], n_requests: int) -> list[Path]:
    """The cell's finished run dirs under ``root`` (``<root>/schedule/<lm>/<platform>/sim/...``)."""
    base = cell_root(root, cell) / "schedule" / str(cell["lm"]) / str(cell["platform"]) / "sim"
    return sorted(p.parent for p in base.glob(f"poisson-rho*-n{int(n_requests)}/*/s*/metrics.json"))


def _expected(grid: Mapping[str, Any]) -> int:
    return len(grid["policies"]) * len(grid["rhos"]) * len(grid["seeds"])


def run_cell(cell: Mapping[str, Any], grid: Mapping[str, Any], root: Path) -> dict[str, Any]:
    """Run the cell's missing runs (a subprocess; its output goes to ``<root>/logs/<cell>.log``)."""
    name = cell_name(cell)
    done = len(cell_runs(root, cell, grid["n_requests"]))
    if done >= _expected(grid):
        return {"cell": name, "ran": False, "rc": 0, "seconds": 0.0}
    logs = Path(root) / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    cmd = cell_command(cell, grid, root)
    t0 = time.perf_counter()
    with open(logs / f"{name}.log", "a") as fh:
        fh.write(f"$ {' '.join(cmd)}\n")
        fh.flush()
        # RTLM_OUTPUT_DIR: the run dirs go under the grid's root, and this machine's own capacity / service
        # measurements (outputs/schedule/) are not found there: only the committed ones are read
        rc = subprocess.run(cmd, stdout=fh, stderr=subprocess.STDOUT,
                            env={**os.environ, "RTLM_OUTPUT_DIR": str(cell_root(root, cell))}).returncode
    return {"cell": name, "ran": True, "rc": rc, "seconds": time.perf_counter() - t0}


def run_grid(grid: Mapping[str, Any], root: Path, jobs: int = 1) -> list[dict[str, Any]]:
    """Every cell's missing runs, ``jobs`` cells side by side (joblib threads, each driving a subprocess)."""
    from joblib import Parallel, delayed
    from tqdm.auto import tqdm

    cells = list(grid["cells"])
    out = []
    bar = tqdm(total=len(cells), desc="sim grid (cells)", unit="cell")
    for res in Parallel(n_jobs=max(1, int(jobs)), backend="threading", return_as="generator")(
            delayed(run_cell)(c, grid, root) for c in cells):
        out.append(res)
        bar.update(1)
        bar.set_postfix_str(f"{res['cell']} rc={res['rc']}")
        if res["rc"] != 0:
            log.error("%s: rtlm-schedule exited %d; see %s", res["cell"], res["rc"],
                      Path(root) / "logs" / f"{res['cell']}.log")
    bar.close()
    return out


def _source(run_dir: Path) -> str:
    """Which committed measurement the run simulated: the capacity file and when it was measured (continuous
    engine), or the service models (static path) and where they live."""
    m = json.loads((run_dir / "metrics.json").read_text())
    cap = m.get("capacity") if isinstance(m.get("capacity"), dict) else None
    if cap and cap.get("source_file"):
        when = str(cap.get("measured_utc", ""))[:10]
        return f"engine/{Path(str(cap['source_file'])).name}" + (f" ({when})" if when else "")
    if m.get("service_model"):
        from rtlm_lab.scheduler.harness import reference_service

        from rtlm_lab.scheduler.service import ServiceModel

        ref = reference_service(str(m["lm"]), str(m["platform"]))
        same = ref.is_file() and ServiceModel.load(ref).to_dict() == m["service_model"]
        name = f"service/{ref.name}" if same else "a service model not committed"
        return name + (" + offload" if m.get("offload_service_model") else "")
    return ""


def collect_grid(grid: Mapping[str, Any], root: Path) -> tuple[list[Path], dict[str, str]]:
    """The grid's run dirs and their group (the cell name); one run per (cell, policy, rho, seed), else an
    error naming the duplicates (runs of an earlier grid config under the same root)."""
    dirs, groups, missing = [], {}, []
    for cell in grid["cells"]:
        runs = cell_runs(root, cell, grid["n_requests"])
        seen: dict[tuple, Path] = {}
        for d in runs:
            m = RUN_RE.match(d.parent.parent.name)
            key = (d.parent.name, float(m["rho"]) if m else math.nan, d.name.split("-")[0])
            if key in seen:
                raise UserError(f"two runs of {cell_name(cell)} {key}: {seen[key]} and {d} (an earlier grid config "
                                f"under {root}: remove the stale one)")
            seen[key] = d
        want = {(p, float(r), f"s{s}") for p in grid["policies"] for r in grid["rhos"] for s in grid["seeds"]}
        missing += [f"{cell_name(cell)} {k}" for k in sorted(want - set(seen))]
        for k, d in seen.items():
            if k in want:
                dirs.append(d)
                groups[str(d)] = cell_name(cell)
    if missing:
        raise UserError(f"{len(missing)} grid run(s) missing, e.g. {missing[0]}: run with target.run=true "
                        "(see the cell logs under the grid root)")
    return dirs, groups


def _tag(group: str, lm: str, platform: str) -> str:
    """`` [<tag>]`` for a tagged cell's group (see :func:`cell_name`), else empty."""
    base = f"sim__{platform}__{lm}"
    return f" [{group[len(base) + 2:]}]" if group.startswith(base + "__") else ""


def headline(table: pd.DataFrame, rho: float = 0.9,
             policies: Sequence[str] = ("rtlm", "sjf_proxy", "ltr", "sjf_input", "oracle_srpt", "oracle_sjf")
             ) -> pd.DataFrame:
    """Mean response time / FCFS (95% CI) at ``rho``: one row per cell, one column per policy."""
    t = table[np.isclose(table["nominal_rho"], rho)]
    rows = []
    for (lm, platform, eng, group), g in t.groupby(["lm", "platform", "engine_key", "group"], sort=True):
        row = {"LM": lm + _tag(group, lm, platform), "platform": platform, "engine": eng}
        for p in policies:
            r = g[g["policy"] == p]
            row[p] = ("" if r.empty else
                      f"{r['mean_rt_vs_fcfs'].iloc[0]:.2f} [{r['mean_rt_vs_fcfs_lo'].iloc[0]:.2f}, "
                      f"{r['mean_rt_vs_fcfs_hi'].iloc[0]:.2f}]")
        fc = g[g["policy"] == "fcfs"]
        row["FCFS mean s"] = "" if fc.empty else f"{fc['mean_rt_s'].iloc[0]:.3f}"
        rows.append(row)
    return pd.DataFrame(rows)


def plot(table: pd.DataFrame, path: Path,
         policies: Sequence[str] = ("rtlm", "sjf_proxy", "ltr", "sjf_input", "oracle_srpt", "oracle_sjf")) -> Path:
    """One panel per cell: mean response time / FCFS against rho (log scale), the CI as a band."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter

    cells = sorted(table.groupby(["platform", "lm", "group"]).groups)
    ncol = 5
    nrow = int(math.ceil(len(cells) / ncol))
    fig, axes = plt.subplots(nrow, ncol, figsize=(3.2 * ncol, 2.8 * nrow), sharex=True, squeeze=False)
    for ax, (platform, lm, group) in zip(axes.ravel(), cells):
        g = table[table["group"] == group]
        for p in policies:
            r = g[g["policy"] == p].sort_values("nominal_rho")
            if r.empty:
                continue
            line, = ax.plot(r["nominal_rho"], r["mean_rt_vs_fcfs"], marker="o", ms=3, label=p)
            ax.fill_between(r["nominal_rho"], r["mean_rt_vs_fcfs_lo"], r["mean_rt_vs_fcfs_hi"],
                            color=line.get_color(), alpha=0.15, lw=0)
        ax.axhline(1.0, color="k", lw=0.8, ls="--")
        ax.set_yscale("log")
        ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
        ax.yaxis.set_minor_formatter(FuncFormatter(lambda v, _: f"{v:g}"))  # the ratios span < 1 decade mostly
        ax.set_title(f"{lm}{_tag(group, lm, platform)} / {platform}", fontsize=9)
        ax.grid(alpha=0.3, which="both")
    for ax in axes.ravel()[len(cells):]:
        ax.axis("off")
    for ax in axes[-1]:
        ax.set_xlabel("nominal rho")
    for ax in axes[:, 0]:
        ax.set_ylabel("mean RT / FCFS")
    axes.ravel()[0].legend(fontsize=7, loc="best")
    seeds = int(table["n_seeds"].max()) if len(table) else 0
    fig.suptitle(f"Simulated (sim grid, not real runs): mean response time / FCFS, {seeds} seeds, 95% CI",
                 fontsize=10)
    fig.tight_layout()
    from rtlm_lab.io import write_png_atomic

    return write_png_atomic(fig, path)


def build(cfg: Mapping[str, Any], command: str = "") -> pd.DataFrame:
    """``target=sim_grid``: run the grid's missing runs (``cfg.run``), then summarize every cell (ratios to FCFS
    and to the cell's oracle with CIs, as the real table) into ``cfg.out`` (csv) with ``.md`` (headline at
    rho 0.9 + the full table), ``.png`` and ``.provenance.json`` beside it."""
    from rtlm_lab.io import atomic_path, provenance, write_json_atomic, write_text_atomic
    from rtlm_lab.paths import resolve_path
    from rtlm_lab.scheduler.analysis import format_summary, summarize

    grid = {k: (list(cfg[k]) if k in ("policies", "rhos", "seeds", "cells") else cfg[k])
            for k in ("policies", "rhos", "seeds", "cells", "n_requests")}
    grid["overrides"] = [str(o) for o in cfg.get("overrides") or []]
    for c in grid["cells"]:
        cell_costs(c)  # a cost source that measured nothing fails before any run
    if not grid["cells"] or not grid["policies"] or not grid["rhos"] or not grid["seeds"]:
        raise UserError("target.cells, target.policies, target.rhos and target.seeds must each name something")
    if "fcfs" not in grid["policies"]:
        raise UserError("target.policies must include fcfs (every ratio is to it)")
    for c in grid["cells"]:
        if "lm" not in c or "platform" not in c:
            raise UserError(f"a grid cell needs lm and platform (got {dict(c)})")
    root = resolve_path(cfg["root"])
    t0 = time.perf_counter()
    ran = run_grid(grid, root, int(cfg.get("jobs", 1))) if cfg.get("run", True) else []
    failed = [r for r in ran if r["rc"] != 0]
    if failed:
        raise UserError(f"{len(failed)} cell(s) failed ({', '.join(r['cell'] for r in failed)}); their logs are "
                        f"under {root / 'logs'}")
    dirs, groups = collect_grid(grid, root)
    table = summarize(dirs, n_boot=int(cfg.get("n_boot", 1000)), groups=groups, progress=True)
    table["source"] = table["group"].map({g: _source(Path(d)) for d, g in groups.items()})
    out = resolve_path(cfg["out"])
    out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(out) as tmp:
        table.round(4).to_csv(tmp, index=False)
    rho = float(cfg.get("headline_rho", 0.9))
    md = (f"# Simulation grid (sim, not real runs)\n\nBuilt by `{command or 'rtlm-reference target=sim_grid'}`; "
          f"{len(dirs)} sim runs, {grid['n_requests']} requests each, seeds {grid['seeds']}, overrides "
          f"{grid['overrides'] or 'none'}"
          + (" (predictions cost nothing on the simulated clock: what order and placement buy, not the "
             "predictors' cost, which the real groups carry)" if "scheduler.overhead_samples=0" in grid["overrides"]
             else " (predictions on the simulated clock: cuda cells at the median per-request cost of the real H200 "
                  "runs named in the provenance, cpu cells timed on the 2-core machine that built the grid)")
          + f". Mean response time / FCFS at nominal rho {rho} [95% CI]:\n\n"
          + headline(table, rho).to_markdown(index=False)
          + "\n\n## Every policy and rho\n\n" + format_summary(table) + "\n")
    write_text_atomic(out.with_suffix(".md"), md)
    plot(table, out.with_suffix(".png"))
    write_json_atomic(out.with_suffix(".provenance.json"), provenance(
        cfg, command=command, n_runs=len(dirs), seconds=round(time.perf_counter() - t0, 1),
        cells={cell_name(c): {"overrides": list(c.get("overrides") or []),
                              "source": table.loc[table["group"] == cell_name(c), "source"].iloc[0],
                              "prediction_cost": cell_costs(c) or "timed on this machine (20 requests a run)"}
               for c in grid["cells"]},
        overrides=grid["overrides"],
        note="sim mode: the committed engine measurements (saturation-run step models, static-path service "
             "models) on a virtual clock; predictions on that clock at the cost each cell names (prediction_cost: "
             "the median per-request cost of the real runs named, or timed on this machine)"))
    return table
