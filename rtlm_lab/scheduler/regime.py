"""The regime map (issue 33, in simulation): where order pays, and where it does not
(``rtlm-reference target=regime``).

A sweep of the simulator over the axes that decide how much any ordering can buy over FCFS with continuous
batching (DESIGN 1f):

* **concurrency / KV budget**: ``platform.engine.max_seqs`` (rows in a step; the kv engine's KV slots are
  ``kv_slots``, by default ``2 x max_seqs``: a paused request keeps its KV while slots last, then is evicted and
  recomputed, the same rule for every policy);
* **load**: nominal rho (arrivals rescaled to the exact rate) and one **overload burst of fixed length**
  (``workload.kind=overload``: ``overload_requests`` arrivals at ``overload_rho`` x capacity inside a trace
  whose average load is ``overload.rho``);
* **burstiness**: Poisson, Gamma gaps of coefficient of variation 2 and 4 (vLLM's ``burstiness`` = 1 / cv^2),
  optionally an MMPP;
* **the length tail**: each decoder-only LM's committed cuda profile (its real greedy lengths on CCC).

Every cell runs every policy on the same seeded traces (3 seeds), so each ratio is paired within a seed; the
cells are summarized by :func:`rtlm_lab.scheduler.analysis.summarize` (mean and p99 ratios to FCFS with
block-bootstrap CIs, ``headroom_captured`` only where the oracle's headroom is significant, the protocol's
per-run facts). A cell is ``(lm, max_seqs, arrivals, load)``; its runs are ordinary ``run_experiment`` run
dirs (``metrics.json``, ``requests.parquet``) under ``<root>/<lm>/seqs<max_seqs>/<arrivals>-<load>-n<n>/
<policy>/s<seed>/``, made in this process (a config composed once per LM x policy x workload kind, not one
Hydra call per run: a 1,000-request sim run takes about a second, a fresh ``rtlm-schedule`` process 15).
A run dir that already holds ``metrics.json`` is skipped, so an interrupted sweep resumes where it stopped.

**The step model**: every max_seqs of an LM replays the same committed saturation measurement
(``target.lms[].step_model``: ``outputs/reference/scheduler/engine/<lm>__cuda__<hash>.json``, the *slots*
engine at max_seqs 64 or 128 for the H200 map, the only engine measured there so far: the kv planner then runs
on the slots engine's step times, as ``sim_capacity``'s fallback does, and the table's ``step_model`` column
says so; ``conf/target/regime_sampled.yaml`` replays the kv engine's own CPU measurement). Its step time is
linear in rows and tokens, so a max_seqs below the measured one interpolates and none extrapolates above 128
(the sampled map's 16 rows extrapolate its 4-row CPU measurement). Load is relative to the *simulator's own*
capacity at each max_seqs: a saturation run of the cell's pool on the simulated engine (what
``rtlm-schedule mode=sim`` does itself), computed once per LM x max_seqs x seed and stored beside the runs (``capacity-s<seed>.json``).

Predictions cost nothing on the simulated clock by default (``scheduler.overhead_samples=0`` in
``target.overrides``): the map is about what *order* buys; the real runs carry the predictors' cost.

Outputs (``target.out``, default ``outputs/reference/scheduler/regime/regime.csv``): ``regime.csv`` (one row per
cell x policy), ``regime.md`` (one row per cell), ``regime.png`` / ``.svg`` (heat maps per LM: the oracle's
mean-RT ratio to FCFS and RT-LM's headroom captured), ``regime_cells.csv`` (per LM, the ``pick.top`` cells with
the largest oracle headroom and the ``pick.bottom`` with the smallest, among the cells whose runs meet the
protocol: the cells to run for real) and ``provenance.json``.
"""

from __future__ import annotations

import copy
import json
import logging
import math
import time
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import pandas as pd

from rtlm_lab.errors import UserError

log = logging.getLogger("rtlm_lab.scheduler")

OVERLOAD = "overload"
ORACLE = "oracle_srpt"
BASELINE = "fcfs"
#: the cell's axes, in the table's order
CELL_COLUMNS = ("cell", "lm", "max_seqs", "kv_slots", "arrivals", "cv", "load", "nominal_rho")


# ================================================================================================ the grid
def load_label(load: Any) -> str:
    """``rho0.8`` for a nominal rho, ``overload`` for the fixed-length burst."""
    if str(load) == OVERLOAD:
        return OVERLOAD
    try:
        return f"rho{float(load):g}"
    except (TypeError, ValueError):
        raise UserError(f"target.loads: {load!r} is neither a rho nor '{OVERLOAD}'") from None


def cells(grid: Mapping[str, Any]) -> list[dict[str, Any]]:
    """Every cell of the grid: LM x max_seqs x (arrivals x rho, plus the overload burst under Poisson arrivals:
    the burst is an arrival process of its own, so it is not crossed with the Gamma/MMPP ones)."""
    out = []
    arrivals = dict(grid["arrivals"])
    for spec in grid["lms"]:
        for ms in grid["max_seqs"]:
            for load in grid["loads"]:
                label = load_label(load)
                for name, arr in (arrivals.items() if label != OVERLOAD else [(OVERLOAD, {"kind": OVERLOAD})]):
                    kv = grid.get("kv_slots")
                    rho = float(grid["overload"]["rho"]) if label == OVERLOAD else float(load)
                    out.append({"cell": f"{spec['lm']}__seqs{int(ms)}__{name}__{label}", "lm": str(spec["lm"]),
                                "max_seqs": int(ms), "kv_slots": int(kv) if kv else 2 * int(ms),
                                "arrivals": name, "cv": float(arr.get("cv", 1.0)) if arr.get("kind") in
                                ("gamma", "poisson") else math.nan,
                                "load": label, "nominal_rho": rho, "workload": dict(arr)})
    return out


def cell_dir(root: Path, cell: Mapping[str, Any], n: int) -> Path:
    return (Path(root) / cell["lm"] / f"seqs{cell['max_seqs']}"
            / f"{cell['arrivals']}-{cell['load']}-n{int(n)}")


def run_dir(root: Path, cell: Mapping[str, Any], n: int, policy: str, seed: int) -> Path:
    return cell_dir(root, cell, n) / policy / f"s{int(seed)}"


def _lm_spec(grid: Mapping[str, Any], lm: str) -> Mapping[str, Any]:
    return next(s for s in grid["lms"] if s["lm"] == lm)


def check_grid(grid: Mapping[str, Any]) -> None:
    """One line for a grid that cannot run, before any run."""
    from rtlm_lab.paths import config_options, resolve_path

    for k in ("lms", "max_seqs", "loads", "arrivals", "policies", "seeds"):
        if not grid.get(k):
            raise UserError(f"target.{k} must name something")
    for p in (BASELINE, ORACLE):
        if p not in grid["policies"]:
            raise UserError(f"target.policies must include {p} (every ratio is to FCFS, headroom to the oracle)")
    known = set(config_options("policy"))
    bad = [p for p in grid["policies"] if p not in known]
    if bad:
        raise UserError(f"unknown policy {bad[0]!r} in target.policies; choose from: {', '.join(sorted(known))}")
    state = [p for p in grid["policies"] if p.startswith("lmstate")]
    if state:
        raise UserError(f"{state[0]} reads the served LM's states on the real engine: it has no sim form")
    for name, arr in dict(grid["arrivals"]).items():
        if arr.get("kind") not in ("poisson", "gamma", "mmpp"):
            raise UserError(f"target.arrivals.{name}: kind must be poisson, gamma or mmpp (got {arr.get('kind')!r})")
    for spec in grid["lms"]:
        if "lm" not in spec or "step_model" not in spec:
            raise UserError(f"a target.lms entry needs lm and step_model (got {dict(spec)})")
        if not resolve_path(spec["step_model"]).is_file():
            raise UserError(f"{spec['lm']}: no engine measurement at {spec['step_model']}")
        prof = spec.get("profile")
        if prof and not resolve_path(prof).is_file():
            raise UserError(f"{spec['lm']}: no profile at {prof}")
    for load in grid["loads"]:
        load_label(load)
    kv = grid.get("kv_slots")
    if kv and any(int(kv) < int(ms) for ms in grid["max_seqs"]):
        raise UserError(f"target.kv_slots ({kv}) must be >= every max_seqs ({list(grid['max_seqs'])})")
    if int(grid["n_requests"]) < 1000:
        log.warning("target.n_requests=%s: the protocol wants >= 1,000 requests a run on cuda", grid["n_requests"])


def profile_path(spec: Mapping[str, Any]) -> Path:
    from rtlm_lab.paths import reference_dir, resolve_path

    if spec.get("profile"):
        return resolve_path(spec["profile"])
    return reference_dir() / "profiles" / f"{spec['lm']}__{spec.get('platform', 'cuda')}.parquet"


# ================================================================================================ running
class _Composer:
    """``conf/schedule.yaml`` composed once per (LM, policy, workload kind), then copied per run with the run's
    seed, rho, engine budgets and capacity set (composing takes ~0.4 s, a run ~1 s)."""

    def __init__(self, grid: Mapping[str, Any]):
        self.grid, self.cache = grid, {}

    def __call__(self, cell: Mapping[str, Any], policy: str, seed: int, rdir: Path, capacity: Path) -> dict:
        from rtlm_lab.scheduler.drift import _compose
        from rtlm_lab.scheduler.study import compose_config

        spec = _lm_spec(self.grid, cell["lm"])
        kind = str(cell["workload"].get("kind", "poisson"))
        key = (cell["lm"], policy, kind)
        if key not in self.cache:
            wl = "poisson" if kind == OVERLOAD else kind
            self.cache[key] = _compose(  # also from inside the running rtlm-reference task
                compose_config, cell["lm"], str(spec.get("platform", "cuda")), policy, wl, 0.9, int(self.grid["n_requests"]), "sim",
                0, "continuous", profile_path(spec), rdir, overrides=[str(o) for o in self.grid.get("overrides") or []])
        cfg = copy.deepcopy(self.cache[key])
        wl = cfg["workload"]
        wl.update({k: v for k, v in cell["workload"].items()})
        if kind == OVERLOAD:
            wl.update({k: v for k, v in self.grid["overload"].items() if k != "rho"})
            wl["name"] = OVERLOAD
        wl["rho"] = float(cell["nominal_rho"])
        wl["n_requests"] = int(self.grid["n_requests"])
        cfg["seed"] = int(seed)
        eng = cfg["platform"].setdefault("engine", {})
        eng.update({"backend": "kv", "max_seqs": int(cell["max_seqs"]), "kv_slots": int(cell["kv_slots"])})
        cfg["scheduler"]["capacity"] = str(capacity)
        cfg["scheduler"]["sim_capacity"] = "given"  # the simulator's own capacity at this max_seqs, computed once
        cfg["scheduler"]["figures"] = False
        cfg["paths"]["run_dir"] = str(rdir)
        return cfg


def capacity_file(root: Path, grid: Mapping[str, Any], cell: Mapping[str, Any], seed: int,
                  composer: _Composer) -> Path:
    """The capacity a cell's runs of ``seed`` load against: the committed step model, with ``capacity_rps`` the
    simulator's own saturation run at the cell's max_seqs on the seed's held-out pool, exactly as
    :func:`~rtlm_lab.scheduler.continuous.run_continuous` computes it in sim mode (``capacity_rps_measured``:
    the committed measurement's, at its own budgets). Computed once, stored beside the runs."""
    from rtlm_lab.io import write_json_atomic
    from rtlm_lab.paths import data_dir, resolve_path
    from rtlm_lab.scheduler.continuous import EngineFactory, _pool, measured_engine_config, saturation
    from rtlm_lab.scheduler.engine.stepmodel import StepModel
    from rtlm_lab.scheduler.predictions import load_or_fit

    path = Path(root) / cell["lm"] / f"seqs{cell['max_seqs']}" / f"capacity-s{int(seed)}.json"
    if path.is_file():
        return path
    spec = _lm_spec(grid, cell["lm"])
    src = resolve_path(spec["step_model"])
    cap = json.loads(src.read_text())
    cfg = composer(cell, BASELINE, seed, path.parent, src)
    prof = profile_path(spec)
    _, _, held = load_or_fit(prof, pd.read_parquet(prof), float(cfg["scheduler"].get("heldout_frac", 0.4)), int(seed),
                             cache_dir=data_dir() / "cache" / "scheduler", need_model=True)
    ecfg = measured_engine_config(cfg["platform"])
    devices = [str(d) for d in (cfg["platform"].get("devices") or [cfg["platform"].get("device", "cpu")])]
    factory = EngineFactory("sim", ecfg, step_model=StepModel.from_dict(cap["step_model"]), devices=devices)
    sim_cap, _ = saturation(factory, _pool(held), int(cap.get("n_requests", 4 * ecfg["max_seqs"])), int(seed))
    out = {**cap, "capacity_rps_measured": cap["capacity_rps"], "capacity_rps": sim_cap["capacity_rps"],
           "simulated_saturation": sim_cap, "sim_engine": ecfg, "step_model_file": str(spec["step_model"]),
           "note": f"step model of {Path(str(spec['step_model'])).name} (the {cap.get('engine', {}).get('backend')} "
                   f"engine at max_seqs {cap.get('engine', {}).get('max_seqs')}{_kv_note(cap)}); "
                   f"capacity_rps: the simulator's saturation run at max_seqs {ecfg['max_seqs']}, seed {seed}"}
    write_json_atomic(path, out)
    return path


def ordered_cells(grid: Mapping[str, Any]) -> list[dict[str, Any]]:
    """The cells in run order: those whose ``<arrivals>-<load>`` is in ``target.first`` first, in that order
    (every LM and max_seqs of one before the next: a sweep stopped early covers the map's corners), then the
    rest in grid order."""
    first = [str(x) for x in grid.get("first") or []]
    rank = {k: i for i, k in enumerate(first)}
    cs = cells(grid)
    return sorted(cs, key=lambda c: rank.get(f"{c['arrivals']}-{c['load']}", len(first)))


def planned_runs(grid: Mapping[str, Any]) -> list[tuple[dict, str, int]]:
    """(cell, policy, seed) in run order: cell by cell (:func:`ordered_cells`), seed by seed, the policies of a
    seed together."""
    return [(c, p, int(s)) for c in ordered_cells(grid) for s in grid["seeds"] for p in grid["policies"]]


def _run_some(grid: Mapping[str, Any], root: Path, todo: Sequence[tuple[dict, str, int]], desc: str,
              position: int = 0, initial: int = 0, total: int | None = None, progress: bool = True) -> int:
    """Run ``todo`` in this process (a bar named ``desc``); returns how many ran."""
    from tqdm.auto import tqdm

    from rtlm_lab.scheduler.harness import run_experiment

    composer = _Composer(grid)
    n = int(grid["n_requests"])
    bar = tqdm(total=total if total is not None else len(todo), initial=initial, desc=desc, unit="run",
               disable=not progress, mininterval=2.0, position=position)
    quiet = [logging.getLogger(n_) for n_ in ("rtlm_lab", "rtlm_lab.scheduler")]
    levels = [lg.level for lg in quiet]
    for lg in quiet:  # one capacity warning per run otherwise; errors still show
        lg.setLevel(logging.ERROR)
    try:
        for cell, pol, seed in todo:
            cap = capacity_file(root, grid, cell, seed, composer)
            rdir = run_dir(root, cell, n, pol, seed)
            cfg = composer(cell, pol, seed, rdir, cap)
            run_experiment(cfg, rdir, profile_path(_lm_spec(grid, cell["lm"])), progress=False)
            bar.update(1)
            bar.set_postfix_str(f"{cell['cell']} {pol} s{seed}", refresh=False)
    finally:
        for lg, lv in zip(quiet, levels):
            lg.setLevel(lv)
        bar.close()
    return len(todo)


def run_grid(grid: Mapping[str, Any], root: Path, progress: bool = True, jobs: int = 1) -> dict[str, Any]:
    """Every missing run; ``jobs`` > 1: the LMs' runs in that many processes (one bar each). Returns counts and
    seconds."""
    plan = planned_runs(grid)
    n = int(grid["n_requests"])
    todo = [(c, p, s) for c, p, s in plan if not (run_dir(root, c, n, p, s) / "metrics.json").is_file()]
    t0 = time.perf_counter()
    if int(jobs) <= 1 or len({c["lm"] for c, _, _ in todo}) <= 1:
        _run_some(grid, root, todo, "regime (sim runs)", initial=len(plan) - len(todo), total=len(plan),
                  progress=progress)
    else:
        from joblib import Parallel, delayed

        # whole cells dealt out in run order, each to the worker with the least work so far (weighted by the
        # LM's mean reply length: the simulator's cost is its steps)
        by_cell: dict[str, list] = {}
        for t in todo:
            by_cell.setdefault(t[0]["cell"], []).append(t)
        parts: list[list] = [[] for _ in range(int(jobs))]
        load = [0.0] * int(jobs)
        w = {lm: _weight(grid, lm) for lm in {c["lm"] for c, _, _ in todo}}
        for runs in by_cell.values():
            c = runs[0][0]
            k = int(np.argmin(load))
            parts[k] += runs
            load[k] += len(runs) * w[c["lm"]] * (16.0 / max(c["max_seqs"], 16) + 1.0)
        Parallel(n_jobs=int(jobs), backend="loky")(
            delayed(_run_some)(grid, root, part, f"regime (worker {i})", position=i, progress=progress)
            for i, part in enumerate(parts) if part)
    return {"planned": len(plan), "ran": len(todo), "seconds": time.perf_counter() - t0}


def _weight(grid: Mapping[str, Any], lm: str) -> float:
    """Relative cost of an LM's runs: its mean reply length (steps per request)."""
    try:
        return float(pd.read_parquet(profile_path(_lm_spec(grid, lm)), columns=["n_output_tokens"]).mean().iloc[0])
    except Exception:  # noqa: BLE001 - only an ordering hint
        return 1.0


# ================================================================================================ the table
def collect_runs(grid: Mapping[str, Any], root: Path, partial: bool = False
                 ) -> tuple[list[Path], dict[str, str], list[str]]:
    """The grid's run dirs, their cell, and the cells left out. A missing run is a one-line error, or with
    ``partial`` its whole cell is left out (named in the outputs): a sweep stopped early still gives a table of
    the cells it finished."""
    n = int(grid["n_requests"])
    dirs, groups, missing, incomplete = [], {}, [], []
    for cell in ordered_cells(grid):
        runs = [run_dir(root, cell, n, p, s) for s in grid["seeds"] for p in grid["policies"]]
        lack = [d for d in runs if not (d / "metrics.json").is_file()]
        if lack:
            missing += [f"{cell['cell']} {d.parent.name} {d.name}" for d in lack]
            incomplete.append(cell["cell"])
            continue
        dirs += runs
        groups.update({str(d): cell["cell"] for d in runs})
    if missing and not partial:
        raise UserError(f"{len(missing)} regime run(s) missing under {root}, e.g. {missing[0]}: run with "
                        "target.run=true (or target.partial=true: a table of the finished cells)")
    if not dirs:
        raise UserError(f"no finished regime cell under {root}: run with target.run=true")
    return dirs, groups, incomplete


def summarize_cells(dirs: Sequence[Path], groups: Mapping[str, str], n_boot: int, jobs: int = 1,
                    progress: bool = True) -> pd.DataFrame:
    """:func:`~rtlm_lab.scheduler.analysis.summarize` over the cells (each cell its own group); ``jobs`` > 1 splits
    the cells over that many processes (the block bootstrap is the slow part: ~1 s a row at 400 replicates)."""
    from rtlm_lab.scheduler.analysis import summarize

    if int(jobs) <= 1:
        return summarize(dirs, n_boot=n_boot, groups=groups, progress=progress)
    from joblib import Parallel, delayed

    names = sorted(set(groups.values()))
    parts = [set(names[i::int(jobs)]) for i in range(int(jobs))]
    chunks = [[d for d in dirs if groups[str(d)] in part] for part in parts]
    tables = Parallel(n_jobs=int(jobs), backend="loky")(
        delayed(summarize)(c, n_boot=n_boot, groups={str(d): groups[str(d)] for d in c}, progress=progress and i == 0)
        for i, c in enumerate(chunks) if c)
    return pd.concat(tables, ignore_index=True)


def tabulate(summary: pd.DataFrame, grid: Mapping[str, Any]) -> pd.DataFrame:
    """:func:`~rtlm_lab.scheduler.analysis.summarize`'s rows with the cell's axes in front and the cell's oracle
    headroom (the oracle's own mean ratio to FCFS with its CI) on every row of the cell."""
    axes = pd.DataFrame([{k: c[k] for k in CELL_COLUMNS} for c in cells(grid) if c["cell"] in set(summary["group"])])
    t = summary.drop(columns=["lm", "nominal_rho"]).rename(columns={"group": "cell"}).merge(axes, on="cell")
    orc = t[t["policy"] == ORACLE].set_index("cell")
    for src, dst in (("mean_rt_vs_fcfs", "oracle_headroom"), ("mean_rt_vs_fcfs_lo", "oracle_headroom_lo"),
                     ("mean_rt_vs_fcfs_hi", "oracle_headroom_hi")):
        t[dst] = t["cell"].map(orc[src])
    t["oracle_headroom_significant"] = t["oracle_headroom_hi"] < 1
    fc = t[t["policy"] == BASELINE].set_index("cell")
    t["fcfs_mean_rt_s"] = t["cell"].map(fc["mean_rt_s"])
    t["cell_stable"] = t["cell"].map(summary.groupby("group")["n_unstable"].sum() == 0)
    t["cell_rho_ok"] = t["cell"].map(summary.groupby("group")["n_rho_off"].sum() == 0)
    t["step_model"] = t["lm"].map({s["lm"]: _step_model_note(s) for s in grid["lms"]})
    order = {c["cell"]: i for i, c in enumerate(cells(grid))}
    pol_order = {p: i for i, p in enumerate(grid["policies"])}
    t = t.sort_values(["cell", "policy"], key=lambda s: s.map(order if s.name == "cell" else pol_order))
    first = [*CELL_COLUMNS, "policy", "oracle_headroom", "oracle_headroom_lo", "oracle_headroom_hi",
             "oracle_headroom_significant", "mean_rt_vs_fcfs", "mean_rt_vs_fcfs_lo", "mean_rt_vs_fcfs_hi",
             "p99_rt_vs_fcfs", "p99_rt_vs_fcfs_lo", "p99_rt_vs_fcfs_hi", "headroom_captured", "headroom_captured_lo",
             "headroom_captured_hi", "headroom_note", "fcfs_mean_rt_s", "mean_rt_s", "p99_rt_s", "realized_rho",
             "capacity_rps", "cell_stable", "cell_rho_ok", "n_unstable", "n_rho_off", "min_completion_ratio_2nd_half",
             "max_rt_drift_last_vs_first_third", "min_window_over_isolated", "flags", "step_model"]
    return t[first + [c for c in t.columns if c not in first]].reset_index(drop=True)


def _step_model_note(spec: Mapping[str, Any]) -> str:
    from rtlm_lab.paths import resolve_path

    cap = json.loads(resolve_path(spec["step_model"]).read_text())
    eng = cap.get("engine") or {}
    return (f"engine/{Path(str(spec['step_model'])).name} ({eng.get('backend')} engine, max_seqs "
            f"{eng.get('max_seqs')}, {str(cap.get('measured_utc', ''))[:10]}{_kv_note(cap)})")


def _rel_profile(spec: Mapping[str, Any]) -> str:
    """The workload profile of an LM entry, relative to the repository where it lies inside it."""
    from rtlm_lab.paths import ROOT

    p = profile_path(spec)
    return str(p.relative_to(ROOT)) if p.is_relative_to(ROOT) else str(p)


def _kv_note(cap: Mapping[str, Any]) -> str:
    """What a step model that is not the kv engine's own measurement means for the kv planner."""
    if (cap.get("engine") or {}).get("backend") == "kv":
        return ""
    return "; no kv-engine measurement: the kv planner on the slots engine's step times"


def pick_cells(table: pd.DataFrame, top: int = 3, bottom: int = 1) -> pd.DataFrame:
    """Per LM, the ``top`` cells with the largest oracle headroom (lowest oracle / FCFS) and the ``bottom`` with
    the smallest (highest), among cells whose runs all meet the protocol (stable where rho < 1, realized rho
    within 2%): the cells to run for real."""
    cell_rows = table[table["policy"] == ORACLE].copy()
    ok = cell_rows[cell_rows["cell_stable"] & cell_rows["cell_rho_ok"] & cell_rows["oracle_headroom"].notna()]
    out = []
    for lm, g in ok.groupby("lm", sort=True):
        g = g.sort_values(["oracle_headroom", "cell"])
        hi = g.head(top).assign(pick="largest headroom")
        lo = g[~g["cell"].isin(hi["cell"])].tail(bottom).iloc[::-1].assign(pick="smallest headroom")
        out += [hi, lo]
    if not out:
        return pd.DataFrame(columns=[*CELL_COLUMNS, "pick"])
    cols = [*CELL_COLUMNS, "pick", "oracle_headroom", "oracle_headroom_lo", "oracle_headroom_hi", "fcfs_mean_rt_s",
            "realized_rho", "min_completion_ratio_2nd_half", "max_rt_drift_last_vs_first_third"]
    return pd.concat(out, ignore_index=True)[cols]


def _ci(v, lo, hi, pct: bool = False) -> str:
    if not (isinstance(v, (int, float)) and math.isfinite(v)):
        return ""
    if pct:
        return f"{100 * v:.0f}% [{100 * lo:.0f}, {100 * hi:.0f}]"
    return f"{v:.2f} [{lo:.2f}, {hi:.2f}]"


def cell_table(table: pd.DataFrame, policies: Sequence[str]) -> pd.DataFrame:
    """One row per cell (the .md): the oracle's headroom, then per policy its mean ratio to FCFS [CI], p99 ratio
    and headroom captured [CI] (blank where the oracle's headroom is not significant)."""
    rows = []
    for cell, g in table.groupby("cell", sort=False):
        r0 = g.iloc[0]
        fc = g[g["policy"] == BASELINE].iloc[0]
        row = {"LM": r0["lm"], "max_seqs": r0["max_seqs"], "arrivals": r0["arrivals"], "load": r0["load"],
               "realized rho": f"{fc['realized_rho']:.2f}",
               "protocol": "ok" if r0["cell_stable"] and r0["cell_rho_ok"] else (r0["flags"] or "off"),
               "FCFS mean s": f"{fc['mean_rt_s']:.3g}",
               "oracle / FCFS": _ci(r0["oracle_headroom"], r0["oracle_headroom_lo"], r0["oracle_headroom_hi"])}
        for p in policies:
            if p in (BASELINE, ORACLE):
                continue
            r = g[g["policy"] == p]
            if r.empty:
                continue
            r = r.iloc[0]
            cap = _ci(r["headroom_captured"], r["headroom_captured_lo"], r["headroom_captured_hi"], pct=True)
            row[p] = (f"{_ci(r['mean_rt_vs_fcfs'], r['mean_rt_vs_fcfs_lo'], r['mean_rt_vs_fcfs_hi'])}; "
                      f"p99 {r['p99_rt_vs_fcfs']:.2f}" + (f"; captured {cap}" if cap else ""))
        rows.append(row)
    return pd.DataFrame(rows)


def findings(table: pd.DataFrame, small: float = 0.10) -> list[str]:
    """Plain statements computed from the table: per LM where the oracle's headroom is largest, and which cells
    have less than ``small`` headroom (oracle within 10% of FCFS)."""
    out = []
    cell_rows = table[table["policy"] == ORACLE]
    for lm, g in cell_rows.groupby("lm", sort=True):
        g = g.sort_values("oracle_headroom")
        best = g.iloc[0]
        n_small = int((g["oracle_headroom"] > 1 - small).sum())
        small_at = g[g["oracle_headroom"] > 1 - small]
        out.append(
            f"{lm}: the oracle reaches {best['oracle_headroom']:.2f}x FCFS at best ({best['arrivals']}, "
            f"{best['load']}, max_seqs {best['max_seqs']}); {n_small} of {len(g)} cells have under "
            f"{100 * small:.0f}% headroom" + (f" (max_seqs {sorted(set(small_at['max_seqs']))}, loads "
                                               f"{sorted(set(small_at['load']))})" if n_small else ""))
    return out


# ================================================================================================ the figure
def plot(table: pd.DataFrame, grid: Mapping[str, Any], out_dir: Path, stem: str = "regime",
         policy: str = "rtlm") -> list[Path]:
    """Per LM, two heat maps over (arrivals x load) x max_seqs: the oracle's mean RT / FCFS (its value written in,
    grey where its CI holds 1) and ``policy``'s headroom captured (blank where not reported)."""
    from matplotlib.colors import LogNorm, Normalize

    from rtlm_lab.viz.common import pyplot, save_figure

    plt = pyplot()
    c = table[table["policy"] == ORACLE]
    cols = list(dict.fromkeys(zip(c["arrivals"], c["load"])))
    lms = list(dict.fromkeys(c["lm"]))
    ms = sorted(set(c["max_seqs"]))
    has_pol = policy in set(table["policy"])
    ncol = 2 if has_pol else 1
    fig, axes = plt.subplots(len(lms), ncol, figsize=(0.75 * len(cols) * ncol + 2.5, 1.9 + 0.45 * len(ms) * len(lms)),
                             squeeze=False)
    for i, lm in enumerate(lms):
        for j, (pol, col, norm, cmap, title) in enumerate(
                [(ORACLE, "oracle_headroom", LogNorm(0.1, 1.0), "viridis", "oracle / FCFS (mean RT)"),
                 (policy, "headroom_captured", Normalize(0, 1), "magma", f"{policy}: headroom captured")][:ncol]):
            ax = axes[i, j]
            g = table[(table["lm"] == lm) & (table["policy"] == pol)]
            M = np.full((len(ms), len(cols)), np.nan)
            sig = np.ones_like(M, bool)
            for _, r in g.iterrows():
                a, b = ms.index(r["max_seqs"]), cols.index((r["arrivals"], r["load"]))
                M[a, b] = r[col]
                sig[a, b] = bool(r["oracle_headroom_significant"])
            vals = np.clip(M, 0.1, 1.0) if col == "oracle_headroom" else np.clip(M, 0, 1)
            ax.imshow(np.ma.masked_invalid(vals), norm=norm, cmap=cmap, aspect="auto")
            for a in range(len(ms)):
                for b in range(len(cols)):
                    if math.isfinite(M[a, b]):
                        txt = f"{M[a, b]:.2f}" if col == "oracle_headroom" else f"{100 * M[a, b]:.0f}%"
                        ax.text(b, a, txt, ha="center", va="center", fontsize=6,
                                color="0.6" if not sig[a, b] else ("w" if vals[a, b] < 0.5 else "k"))
            ax.set_yticks(range(len(ms)), [str(m) for m in ms], fontsize=7)
            ax.set_xticks(range(len(cols)), [b if b == OVERLOAD else f"{a}\n{b}" for a, b in cols], fontsize=6,
                          rotation=90)
            ax.set_ylabel(f"{lm}\nmax_seqs", fontsize=8)
            ax.set_title(title, fontsize=8)
    fig.suptitle(f"Regime map (simulated, {int(grid['n_requests'])} requests x {len(grid['seeds'])} seeds a cell): "
                 "where order pays; grey = oracle's headroom not significant", fontsize=9)
    fig.tight_layout()
    paths = save_figure(fig, out_dir, stem)
    plt.close(fig)
    return paths


# ================================================================================================ build
def _grid(cfg: Mapping[str, Any]) -> dict[str, Any]:
    from omegaconf import OmegaConf

    plain = OmegaConf.to_container(cfg, resolve=True) if not isinstance(cfg, dict) else copy.deepcopy(dict(cfg))
    plain.setdefault("overload", {"rho": 0.8, "overload_rho": 2.0, "overload_requests": 200, "overload_start": 0.25})
    return plain


def build(cfg: Mapping[str, Any], command: str = "") -> pd.DataFrame:
    """``target=regime``: run the missing runs (``cfg.run``), summarize every cell, write the outputs (module
    doc). Returns the long table."""
    from rtlm_lab.io import atomic_path, provenance, write_json_atomic, write_text_atomic
    from rtlm_lab.paths import resolve_path
    grid = _grid(cfg)
    check_grid(grid)
    root = resolve_path(grid["root"])
    t0 = time.perf_counter()
    jobs = int(grid.get("jobs", 1))
    ran = (run_grid(grid, root, progress=bool(grid.get("progress", True)), jobs=jobs)
           if grid.get("run", True) else {})
    dirs, groups, left_out = collect_runs(grid, root, partial=bool(grid.get("partial", False)))
    summary = summarize_cells(dirs, groups, n_boot=int(grid.get("n_boot", 1000)), jobs=jobs,
                              progress=bool(grid.get("progress", True)))
    table = tabulate(summary, grid)
    out = resolve_path(grid["out"])
    out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(out) as tmp:
        table.round(4).to_csv(tmp, index=False)
    pick = pick_cells(table, int((grid.get("pick") or {}).get("top", 3)), int((grid.get("pick") or {}).get("bottom", 1)))
    with atomic_path(out.with_name(out.stem + "_cells.csv")) as tmp:
        pick.round(4).to_csv(tmp, index=False)
    lines = findings(table)
    ov = grid["overload"]
    md = (f"# The regime map (simulated, not real runs)\n\nBuilt by `{command or 'rtlm-reference target=regime'}`: "
          f"{len(dirs)} sim runs, {grid['n_requests']} requests each, seeds {grid['seeds']}, the kv planner with "
          f"kv_slots = {grid.get('kv_slots') or '2 x max_seqs'}, overrides {grid.get('overrides') or 'none'}. "
          f"Load is rho x the simulator's own capacity at each max_seqs; `overload` is Poisson at an average rho "
          f"{ov['rho']} with one burst of {ov['overload_requests']} arrivals at {ov['overload_rho']}x capacity "
          f"(after {ov['overload_start']:.0%} of the arrivals). Step models: "
          + "; ".join(f"{s['lm']}: {_step_model_note(s)}" for s in grid["lms"])
          + ". Workloads: " + "; ".join(f"{s['lm']}: {_rel_profile(s)}" for s in grid["lms"])
          + ".\n\nEach policy column: mean RT / FCFS [95% CI]; p99 RT / FCFS; headroom captured [95% CI] = (FCFS - "
            "policy) / (FCFS - oracle), only where the oracle's headroom is significant (its CI excludes 1). "
            "`protocol`: ok where every run is stable (completions >= 0.95x arrivals over the second half of the "
            "arrival window) and its realized rho is within 2% of the nominal.\n\n"
          + "\n".join(f"- {x}" for x in lines) + "\n\n"
          + (f"**Partial**: {len(left_out)} of {len(cells(grid))} cells not finished yet and left out ("
             + ", ".join(left_out[:12]) + (", ..." if len(left_out) > 12 else "")
             + "); `rtlm-reference target=regime` resumes the sweep.\n\n" if left_out else "")
          + cell_table(table, grid["policies"]).to_markdown(index=False)
          + "\n\n## The cells to run for real (`regime_cells.csv`)\n\n"
          + (pick.round(3).to_markdown(index=False) if len(pick) else "(none meets the protocol)") + "\n")
    write_text_atomic(out.with_suffix(".md"), md)
    plot(table, grid, out.parent, out.stem)
    write_json_atomic(out.parent / "provenance.json", provenance(
        grid, command=command, n_runs=len(dirs), run=ran, cells_left_out=left_out, seconds=round(time.perf_counter() - t0, 1),
        findings=lines, note="sim mode: the committed engine measurements' step models on a virtual clock; load "
                             "relative to the simulator's capacity at each max_seqs (capacity-s<seed>.json under the "
                             "root); predictions as target.overrides say (default: free)"))
    return table
