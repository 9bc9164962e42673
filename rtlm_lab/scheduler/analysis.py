"""Scheduling results as a table: per-run metrics, and ratios to FCFS and to the oracle with 95% CIs.

A *run dir* holds ``requests.parquet`` and ``metrics.json`` (``rtlm-schedule`` on the continuous engine, or
the reference builder's copies). Runs group by LM x platform x engine budgets x nominal rho; inside a group
every policy served the *same traces* (one per seed), so ratios are paired.

Ratio CIs (:func:`ratio_ci`): a paired bootstrap over seeds and over blocks of consecutive requests within a
seed (``block`` requests, at most a tenth of the run) (a moving-block bootstrap: response times of neighbouring requests are correlated through the queue, so
requests are not resampled one by one). Each replicate draws seeds with replacement, then for each drawn seed
the same block starts for both policies (their rows are the same requests, matched by arrival order), and
takes the ratio of the two means (or p99s). ``scipy.stats.bootstrap`` resamples independent observations
only, hence our own resampling here.
"""

from __future__ import annotations

import json
import math
import shutil
import time
from pathlib import Path
from typing import Iterable, Mapping, Sequence

import numpy as np
import pandas as pd

from rtlm_lab.errors import UserError
from rtlm_lab.io import run_gpu
from rtlm_lab.scheduler.protocol import FCFS_DRIFT_TOLERANCE, MIN_WINDOW_OVER_ISOLATED, run_protocol
from rtlm_lab.scheduler.workload import realized_arrival_rate

GROUP = ("group", "lm", "platform", "engine_key", "nominal_rho")  # group: the runs/<group>/ folder, made together


def load_run(run_dir: Path) -> tuple[dict, pd.DataFrame]:
    run_dir = Path(run_dir)
    try:
        m = json.loads((run_dir / "metrics.json").read_text())
        r = pd.read_parquet(run_dir / "requests.parquet")
    except (OSError, json.JSONDecodeError, ValueError) as exc:
        raise UserError(f"{run_dir} is not a finished run ({type(exc).__name__})") from None
    return m, r


def _policy_name(m: dict) -> str:
    """A run's policy name from its ``metrics.json`` (a config mapping, or the name in older runs)."""
    return m["policy"]["name"] if isinstance(m.get("policy"), dict) else str(m.get("policy"))


def _seed_runs(d: Path, seed: int, policy: str | None = None) -> list[tuple[Path, dict]]:
    """The finished runs directly under ``d`` of ``seed`` (and ``policy``, where given), with their metrics, in
    name order."""
    out = []
    for f in sorted(Path(d).glob("*/metrics.json")):
        m, _ = load_run(f.parent)
        if int(m.get("seed", 0)) == int(seed) and policy in (None, _policy_name(m)):
            out.append((f.parent, m))
    return out


def _engine_key(m: dict) -> str:
    if m.get("engine") == "static":  # the paper's path: whole batches of up to max_batch, + CPU offload workers
        # the platform's batch budget (what every policy shares), not a policy's own: rtlm_batch1 is an
        # ablation run beside the others, not another engine
        plat = ((m.get("provenance") or {}).get("config") or {}).get("platform") or {}
        pol = m["policy"] if isinstance(m.get("policy"), dict) else {}
        off = int(m.get("n_offload_workers") or 0)
        return f"static-batch{plat.get('max_batch', pol.get('max_batch', '?'))}" + (f"+{off}cpu" if off else "")
    e = m.get("engine_config") or {}
    return f"{e.get('backend', m.get('engine', 'static'))}-seqs{e.get('max_seqs', '?')}"


def _static_extras(m: dict, r: pd.DataFrame) -> dict:
    """What the static path's metrics.json lacks, from its requests: the realized rho in the path's own
    terms (arrival rate x mean isolated batch-1 service time, as ``build_trace`` sets the rate) and the time to
    first token."""
    out = {}
    if "realized_rho" not in m and "isolated_s" in r:
        out["realized_rho"] = realized_arrival_rate(r["arrival_s"]) * float(r["isolated_s"].mean())
    if "mean_ttft_ms" not in m and "first_token_s" in r:
        ttft = (r["first_token_s"] - r["arrival_s"]).to_numpy(float) * 1e3
        out.update({"mean_ttft_ms": float(np.mean(ttft)), "p99_ttft_ms": float(np.percentile(ttft, 99))})
    if "n_measured" not in m:
        out["n_measured"] = len(measured(r))
    if "prediction_share" not in m and "prediction_s" in m:  # as the continuous engine's: of the workers' busy time
        busy = sum((m.get("worker_utilization") or {}).values()) * float(m.get("makespan_s") or 0.0)
        out["prediction_share"] = float(m["prediction_s"]) / busy if busy > 0 else math.nan
    return out


def prediction_load(m: Mapping, r: pd.DataFrame) -> dict[str, float]:
    """What a run's predictions cost per request and how they were batched: ``prediction_ms_per_request``
    (the predictor's busy time, ``prediction_s``, over the requests; 0 where nothing predicted) and
    ``mean_prediction_batch`` (requests per predictor call, on the continuous engine where a predictor ran: from
    ``n_prediction_calls``, or, in runs made before it was recorded, from the distinct times the requests became
    ready, since a call makes its whole batch ready at once; NaN elsewhere). A predictor that falls behind the
    arrivals gets larger batches: read the two together."""
    n = int(m.get("n_requests") or len(r) or 0)
    pred_s = m.get("prediction_s")
    ms = 1e3 * float(pred_s) / n if pred_s is not None and n else math.nan
    batch = math.nan
    if m.get("n_prediction_calls"):
        batch = n / int(m["n_prediction_calls"])
    elif (m.get("mean_prediction_wait_ms") or 0) > 0 and "ready_s" in r and len(r):
        batch = len(r) / int(r["ready_s"].round(9).nunique())
    return {"prediction_ms_per_request": ms, "mean_prediction_batch": batch}


def measured(records: pd.DataFrame) -> pd.DataFrame:
    """The rows metrics are computed on: after the warm-up share, in arrival order."""
    r = records[~records["warmup"]] if "warmup" in records else records
    return r.sort_values(["arrival_s", "request_id"]).reset_index(drop=True)


def _stat(x: np.ndarray, stat: str) -> float:
    return float(np.mean(x)) if stat == "mean" else float(np.percentile(x, 99 if stat == "p99" else 50))


def paired_block_bootstrap(runs: Sequence[Sequence[np.ndarray]], statistic, block: int = 50, n_boot: int = 2000,
                           seed: int = 0, level: float = 0.95) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(point, low, high)`` of ``statistic(*pooled)`` (a vector of statistics) over the moving-block bootstrap
    of the module doc. ``runs[j][i]``: policy ``j``'s response times of seed ``i``'s requests in arrival order
    (the same requests for every ``j``); ``statistic`` takes one pooled array per policy. Each replicate draws
    seeds with replacement and, per drawn seed, the same block starts for every policy. Replicates where a
    statistic is undefined (non-finite) are left out of its CI while at least half of them are usable (else NaN),
    as :func:`rtlm_lab.bootstrap.percentile_ci` does."""
    if not runs or not runs[0] or any(len(x) != len(runs[0]) for x in runs):
        raise ValueError("need the same seeds for every policy")
    for per_seed in zip(*runs):
        if any(len(x) != len(per_seed[0]) for x in per_seed):
            raise ValueError("paired runs must hold the same requests")
    with np.errstate(divide="ignore", invalid="ignore"):
        point = np.atleast_1d(np.asarray(statistic(*[np.concatenate(x) for x in runs]), float))
    rng = np.random.default_rng(seed)
    k = len(runs[0])
    reps = np.empty((n_boot, len(point)))
    for t in range(n_boot):
        drawn: list[list[np.ndarray]] = [[] for _ in runs]
        for s in rng.integers(0, k, k):
            n = len(runs[0][s])
            L = max(1, min(block, n // 10))  # at least ~10 blocks a run, so a short run still resamples
            starts = rng.integers(0, n - L + 1, int(math.ceil(n / L)))
            idx = (starts[:, None] + np.arange(L)[None, :]).ravel()[:n]
            for j, x in enumerate(runs):
                drawn[j].append(x[s][idx])
        with np.errstate(divide="ignore", invalid="ignore"):
            reps[t] = statistic(*[np.concatenate(d) for d in drawn])
    alpha = (1 - level) / 2
    lo, hi = np.full(len(point), math.nan), np.full(len(point), math.nan)
    for c in range(len(point)):
        ok = reps[:, c][np.isfinite(reps[:, c])]
        if len(ok) >= max(2, 0.5 * n_boot):
            lo[c], hi[c] = np.quantile(ok, [alpha, 1 - alpha])
    return point, lo, hi


def ratio_ci(a: Sequence[np.ndarray], b: Sequence[np.ndarray], stat: str = "mean", block: int = 50,
             n_boot: int = 2000, seed: int = 0, level: float = 0.95) -> tuple[float, float, float]:
    """``(ratio, low, high)`` of ``stat(a) / stat(b)`` pooled over seeds; ``a[i]``, ``b[i]``: response times of
    seed ``i``'s requests in arrival order (the same requests). See the module doc."""
    if len(a) != len(b) or not a:
        raise ValueError("need the same seeds for both policies")
    p, lo, hi = paired_block_bootstrap([a, b], lambda x, y: _stat(x, stat) / _stat(y, stat), block, n_boot, seed,
                                       level)
    return float(p[0]), float(lo[0]), float(hi[0])


def headroom_ci(fcfs: Sequence[np.ndarray], policy: Sequence[np.ndarray], oracle: Sequence[np.ndarray],
                block: int = 50, n_boot: int = 2000, seed: int = 0, level: float = 0.95) -> dict[str, float]:
    """Headroom captured on mean response time, ``(FCFS - policy) / (FCFS - oracle)`` (0: FCFS's mean; 1: the
    oracle's; < 0: worse than FCFS), and the oracle / FCFS ratio it rests on, both with CIs from the same
    replicates of :func:`paired_block_bootstrap` (the three runs of a seed serve the same requests). Returns
    ``headroom_captured[_lo|_hi]`` and ``oracle_mean_rt_vs_fcfs[_lo|_hi]``."""
    def stat(f, p, o):
        mf, mp, mo = float(np.mean(f)), float(np.mean(p)), float(np.mean(o))
        return np.array([(mf - mp) / (mf - mo) if mf != mo else math.nan, mo / mf])

    p, lo, hi = paired_block_bootstrap([fcfs, policy, oracle], stat, block, n_boot, seed, level)
    out = {}
    for j, name in enumerate(("headroom_captured", "oracle_mean_rt_vs_fcfs")):
        out.update({name: float(p[j]), f"{name}_lo": float(lo[j]), f"{name}_hi": float(hi[j])})
    return out


# A run's metrics that the results table averages over seeds, in summary.csv's column order: read from each
# run's metrics.json by collect(), but for DERIVED_METRICS, which collect() computes from the run's records.
RUN_METRICS = ("n_requests", "n_measured", "mean_rt_s", "p50_rt_s", "p99_rt_s", "mean_ttft_ms", "p99_ttft_ms",
               "throughput_rps", "throughput_tok_s", "slo_miss_rate", "realized_rho", "utilization", "capacity_rps",
               "prediction_share", "prediction_ms_per_request", "mean_prediction_batch", "mean_running_seqs")
DERIVED_METRICS = ("utilization", "prediction_ms_per_request", "mean_prediction_batch")


# The protocol's facts of each run (rtlm_lab.scheduler.protocol) that the table checks; collect() reads them from
# metrics.json, or recomputes them from requests.parquet for runs made before they were recorded.
PROTOCOL_COLUMNS = ("realized_rho_rel_error", "realized_rho_within_2pct", "window_over_isolated",
                    "completion_ratio_2nd_half", "stable", "rt_drift_last_vs_first_third")


def run_protocol_facts(m: Mapping, r: pd.DataFrame) -> dict:
    """A run's protocol facts (:data:`PROTOCOL_COLUMNS`): as its metrics.json recorded them, else recomputed from
    its requests (every request, warm-up included) with the nominal and realized rho its metrics.json holds
    (``None``/NaN where a fact cannot be had: a run without finish times)."""
    if all(k in m for k in PROTOCOL_COLUMNS):
        out = {k: m[k] for k in PROTOCOL_COLUMNS}
    elif {"arrival_s", "finish_s", "response_s"} <= set(r.columns) and len(r):
        nominal = m.get("nominal_rho", m.get("rho"))
        out = run_protocol(r, float(nominal) if nominal is not None else None, m.get("realized_rho"))
    else:
        out = dict.fromkeys(PROTOCOL_COLUMNS)
    return {k: (math.nan if out.get(k) is None and k not in ("stable", "realized_rho_within_2pct") else out.get(k))
            for k in PROTOCOL_COLUMNS}


def engine_fingerprint(m: Mapping) -> str:
    """What a run's engine was, as its metrics.json records it, as one JSON string: the run's engine path and
    budgets (``engine_config``, or the static path's platform batch, offload workers and dtype), the GPU, and on
    real runs the serving facts that change step times (dtype, torch threads, device, torch version, where the
    predictors ran). The runs of one table row must agree on it (:func:`summarize`)."""
    plat = ((m.get("provenance") or {}).get("config") or {}).get("platform") or {}
    serving = m.get("serving") or {}
    fp: dict = {"engine": m.get("engine", "continuous"), "engine_config": m.get("engine_config"),
                "dtype": serving.get("dtype", plat.get("dtype"))}
    if m.get("engine") == "static":
        fp.update({"max_batch": plat.get("max_batch"), "n_offload_workers": int(m.get("n_offload_workers") or 0),
                   "offload_threads": plat.get("offload_threads") if m.get("n_offload_workers") else None})
    if m.get("mode", "real") == "real":
        fp["gpu"] = run_gpu(m)
        fp.update({k: serving[k] for k in ("torch_threads", "device", "device_name", "torch", "predictor_process",
                                           "predictor_threads") if k in serving})
    return json.dumps(fp, sort_keys=True, default=str)


def _mixed_config_error(g: pd.DataFrame, where: str) -> str:
    """One line naming what a row's runs disagree on, with how many runs hold each value."""
    fps = [json.loads(x) for x in g["engine_fingerprint"]]
    keys = sorted({k for fp in fps for k in fp})
    diffs = []
    for k in keys:
        vals = pd.Series([json.dumps(fp.get(k), sort_keys=True) for fp in fps]).value_counts()
        if len(vals) > 1:
            diffs.append(f"{k}: " + " / ".join(f"{v} ({c} runs)" for v, c in vals.items()))
    return (f"{where} mixes engine configs ({'; '.join(diffs)}): a group's runs must share one engine config "
            "(make the group again on one machine, or split it)")


def collect(run_dirs: Iterable[Path], groups: Mapping[str, str] | None = None
            ) -> tuple[pd.DataFrame, dict[str, np.ndarray]]:
    """One row per run: its group keys, policy, seed and headline metrics (units in the names); and each run's
    measured response times in arrival order (run dir as given -> seconds), for the bootstrap, from the same
    read of its files. ``groups``: run dir (as given) -> group name, where the parent folder's name is not the
    group (e.g. the regime map's cells)."""
    rows, rt = [], {}
    for d in run_dirs:
        m, r = load_run(d)
        rt[str(d)] = measured(r)["response_s"].to_numpy(float)
        if m.get("engine") == "static":
            m = {**m, **_static_extras(m, r)}
        util = m.get("worker_utilization") or {}
        proto = run_protocol_facts(m, r)
        rows.append({"run_dir": str(d), "group": (groups or {}).get(str(d), Path(d).parent.name), "lm": m["lm"], "platform": m["platform"], "mode": m.get("mode", "real"),
                     "engine_key": _engine_key(m), "nominal_rho": float(m.get("nominal_rho", m.get("rho", math.nan))),
                     "policy": _policy_name(m),
                     "seed": int(m.get("seed", 0)), "gpu": run_gpu(m),
                     **{k: m.get(k, math.nan) for k in RUN_METRICS if k not in DERIVED_METRICS},
                     **prediction_load(m, r),
                     "utilization": float(np.mean(list(util.values()))) if util else math.nan,
                     **{k: proto[k] for k in PROTOCOL_COLUMNS}, "engine_fingerprint": engine_fingerprint(m)})
    if not rows:
        raise UserError("no finished runs to summarize")
    return pd.DataFrame(rows), rt


ORACLES = ("oracle_srpt", "oracle_sjf")  # the continuous engine's oracle, then the static path's


def summarize(run_dirs: Sequence[Path], baseline: str = "fcfs", oracle: str | None = None, block: int = 50,
              n_boot: int = 2000, groups: Mapping[str, str] | None = None, progress: bool = False,
              mixed: str = "error") -> pd.DataFrame:
    """The results table: per group x policy, metrics averaged over seeds and the paired ratios (mean and p99
    response time) to ``baseline`` and to the group's oracle with 95% CIs (NaN where that policy was not run).
    ``oracle``: None = the engine's own oracle where the group ran it (``oracle_srpt`` on the continuous engine,
    ``oracle_sjf`` on the static path, where a batch is not preempted; as ``study.run_study`` picks), else the
    other; column ``oracle`` names it. ``groups``: as :func:`collect`; ``progress``: a bar over group x policy
    (the bootstrap takes minutes over the regime map's cells).

    The protocol (docs/scheduling.md#the-protocol), per row: ``headroom_captured`` with its CI (see
    :func:`headroom_ci`), reported only where the oracle's headroom over FCFS is significant (the CI of
    ``oracle_mean_rt_vs_fcfs`` below 1), else NaN with the reason in ``headroom_note``; the runs' protocol facts
    (``n_unstable``, ``n_rho_off``, ``min_completion_ratio_2nd_half``, ``max_rt_drift_last_vs_first_third``,
    ``min_window_over_isolated``); ``fcfs_drift_seeds``, the seeds whose closing FCFS run
    (``<group dir>/fcfs_last/``) is more than 10% off their first; and ``flags``, all of that in words. A row's
    runs must share one engine config (:func:`engine_fingerprint`): ``mixed="error"`` refuses a mixed row with
    one :class:`~rtlm_lab.errors.UserError` line, ``mixed="flag"`` puts it in ``flags``."""
    if mixed not in ("error", "flag"):
        raise ValueError(f"mixed must be 'error' or 'flag' (got {mixed!r})")
    runs, rt = collect(run_dirs, groups)
    from tqdm.auto import tqdm

    out, steps_cache = [], {}
    bar = tqdm(total=int(runs.groupby(list(GROUP) + ["mode", "policy"]).ngroups), desc="ratios (bootstrap)",
               unit="row", disable=not progress, mininterval=2.0)
    for key, g in runs.groupby(list(GROUP) + ["mode"], sort=True):
        keys = dict(zip(list(GROUP) + ["mode"], key))
        where = (f"group {keys['group']} ({keys['lm']}, {keys['platform']}, {keys['mode']}, rho "
                 f"{keys['nominal_rho']})")
        group_flags = []
        if g["engine_fingerprint"].nunique() > 1:
            if mixed == "error":
                raise UserError(_mixed_config_error(g, where))
            group_flags.append("mixed engine configs")
        drift = closing_fcfs_drift(g, baseline)
        drift_seeds = sorted(s for s, v in drift.items() if abs(v - 1) > FCFS_DRIFT_TOLERANCE)
        if drift_seeds:
            group_flags.append("FCFS drift " + ", ".join(f"s{s} ({drift[s]:.2f}x)" for s in drift_seeds))
        ran = set(g["policy"])
        order = ORACLES[::-1] if str(keys["engine_key"]).startswith("static") else ORACLES
        g_oracle = oracle or next((o for o in order if o in ran), order[0])
        for pol, gp in g.groupby("policy", sort=True):
            row = dict(keys)
            row.update({"policy": pol, "oracle": g_oracle if g_oracle in ran else "", "n_seeds": int(gp["seed"].nunique()), "seeds": ",".join(map(str, sorted(gp["seed"]))),
                        "gpu": ",".join(sorted(set(gp["gpu"].astype(str)) - {""}))})
            for c in RUN_METRICS:
                row[c] = float(gp[c].mean())
            for ref, tag in ((baseline, "fcfs"), (g_oracle, "oracle")):
                gr = g[g["policy"] == ref]
                seeds = sorted(set(gp["seed"]) & set(gr["seed"]))
                for stat in ("mean", "p99"):
                    cols = [f"{stat}_rt_vs_{tag}", f"{stat}_rt_vs_{tag}_lo", f"{stat}_rt_vs_{tag}_hi"]
                    if not seeds:
                        row.update(dict.fromkeys(cols, math.nan))
                        continue
                    a = [rt[gp[gp["seed"] == s]["run_dir"].iloc[0]] for s in seeds]
                    b = [rt[gr[gr["seed"] == s]["run_dir"].iloc[0]] for s in seeds]
                    row.update(dict(zip(cols, ratio_ci(a, b, stat, block=block, n_boot=n_boot))))
            row.update(_headroom(g, gp, rt, baseline, g_oracle, block, n_boot))
            row["step_cost_vs_fcfs"] = _step_cost(g, gp, baseline, steps_cache)
            row.update(_protocol_summary(gp, group_flags, drift_seeds))
            out.append(row)
            bar.update(1)
    bar.close()
    return pd.DataFrame(out)


def _first_run(g: pd.DataFrame, policy: str, seed) -> str:
    return g[(g["policy"] == policy) & (g["seed"] == seed)]["run_dir"].iloc[0]


def _headroom(g: pd.DataFrame, gp: pd.DataFrame, rt: Mapping[str, np.ndarray], baseline: str, oracle: str,
              block: int, n_boot: int) -> dict:
    """A row's headroom columns (see :func:`summarize`), over the seeds its policy, FCFS and the oracle share."""
    cols = [f"{n}{e}" for n in ("headroom_captured", "oracle_mean_rt_vs_fcfs") for e in ("", "_lo", "_hi")]
    out: dict = dict.fromkeys(cols, math.nan)
    seeds = sorted(set(gp["seed"]) & set(g[g["policy"] == baseline]["seed"]) & set(g[g["policy"] == oracle]["seed"]))
    if not seeds:
        missing = [p for p in (baseline, oracle) if p not in set(g["policy"])]
        out["headroom_note"] = (f"no {' or '.join(missing)} run" if missing
                                else f"no seed run by {gp['policy'].iloc[0]}, {baseline} and {oracle}")
        return out
    runs = [[rt[_first_run(g, p, s)] for s in seeds] for p in (baseline, gp["policy"].iloc[0], oracle)]
    out.update(headroom_ci(*runs, block=block, n_boot=n_boot))
    lo, hi = out["oracle_mean_rt_vs_fcfs_lo"], out["oracle_mean_rt_vs_fcfs_hi"]
    note = ""
    if not (math.isfinite(lo) and math.isfinite(hi)):
        note = f"{oracle} / {baseline} has no CI"
    elif lo > 1:
        note = f"{oracle} slower than {baseline} (CI {lo:.2f}-{hi:.2f})"
    elif hi >= 1:
        note = f"{oracle}'s headroom not significant ({oracle} / {baseline} CI {lo:.2f}-{hi:.2f} holds 1)"
    if note:
        out.update({c: math.nan for c in cols[:3]})
    out["headroom_note"] = note
    return out


def _step_cost(g: pd.DataFrame, gp: pd.DataFrame, baseline: str, cache: dict) -> float:
    """Mean over seeds of :func:`~rtlm_lab.scheduler.protocol.step_cost_ratio` (NaN without steps files);
    ``cache``: run dir -> its steps, so a group's FCFS runs are read once for all its policies."""
    from rtlm_lab.scheduler.protocol import step_cost_ratio

    def _steps(run_dir: str) -> pd.DataFrame:
        if run_dir not in cache:
            cache[run_dir] = pd.read_parquet(Path(run_dir) / "steps.parquet", columns=["dt_s", "n_seqs", "n_tokens"])
        return cache[run_dir]

    vals = []
    for s in sorted(set(gp["seed"]) & set(g[g["policy"] == baseline]["seed"])):
        try:
            a = _steps(_first_run(gp, gp["policy"].iloc[0], s))
            b = _steps(_first_run(g, baseline, s))
        except (OSError, ValueError, KeyError):
            continue
        v = step_cost_ratio(a, b)
        if math.isfinite(v):
            vals.append(v)
    return float(np.mean(vals)) if vals else math.nan


def closing_fcfs_drift(g: pd.DataFrame, baseline: str = "fcfs") -> dict[int, float]:
    """Seed -> the closing FCFS run's mean response time over the seed's first FCFS run's, for the runs of one
    table row (``g``: :func:`collect` rows): closing runs are ``<group dir>/fcfs_last/<run>/`` beside the row's
    runs (``tools/device/box.sh group``), matched by seed, nominal rho and engine."""
    firsts = g[g["policy"] == baseline]
    if firsts.empty:
        return {}
    out = {}
    for gdir in sorted({Path(d).parent for d in g["run_dir"]}):
        for f in sorted(gdir.glob(f"{LAST}/*/metrics.json")):
            try:
                m, _ = load_run(f.parent)
            except UserError:
                continue
            seed = int(m.get("seed", 0))
            rho = float(m.get("nominal_rho", m.get("rho", math.nan)))
            first = firsts[firsts["seed"] == seed]
            if first.empty or _engine_key(m) != first["engine_key"].iloc[0]:
                continue
            rho0 = float(first["nominal_rho"].iloc[0])
            if not (rho == rho0 or (math.isnan(rho) and math.isnan(rho0))):
                continue
            a = float(first["mean_rt_s"].iloc[0])
            if a > 0:
                out[seed] = float(m["mean_rt_s"]) / a
    return out


def _protocol_summary(gp: pd.DataFrame, group_flags: list[str], drift_seeds: list[int]) -> dict:
    """A row's protocol columns (see :func:`summarize`): its runs' worst facts and what breaks the protocol."""
    unstable = gp[gp["stable"].map(lambda v: v is False or v == 0.0)]
    rho_off = gp[gp["realized_rho_within_2pct"].map(lambda v: v is False or v == 0.0)]
    flags = []
    if len(unstable):
        flags.append("unstable " + ", ".join(f"s{s} ({c:.3f})" for s, c in
                                            zip(unstable["seed"], unstable["completion_ratio_2nd_half"])))
    if len(rho_off):
        flags.append("realized rho off " + ", ".join(f"s{s} ({100 * e:+.1f}%)" for s, e in
                                                     zip(rho_off["seed"], rho_off["realized_rho_rel_error"])))
    window = gp["window_over_isolated"].astype(float)
    if window.notna().any() and window.min() < MIN_WINDOW_OVER_ISOLATED:
        flags.append(f"short window ({window.min():.0f}x isolated)")
    flags += group_flags
    nan_min = lambda c: float(gp[c].astype(float).min()) if gp[c].notna().any() else math.nan  # noqa: E731
    return {"n_unstable": int(len(unstable)), "n_rho_off": int(len(rho_off)),
            "min_completion_ratio_2nd_half": nan_min("completion_ratio_2nd_half"),
            "max_rt_drift_last_vs_first_third": (float(gp["rt_drift_last_vs_first_third"].astype(float).max())
                                                 if gp["rt_drift_last_vs_first_third"].notna().any() else math.nan),
            "min_window_over_isolated": nan_min("window_over_isolated"),
            "fcfs_drift_seeds": ",".join(map(str, drift_seeds)), "flags": "; ".join(flags)}


def format_summary(df: pd.DataFrame) -> str:
    """The table as markdown (what docs/results.md shows); :data:`NO_GROUPS` for an empty table."""
    if df.empty:
        return NO_GROUPS

    def ci(r, c):
        v = r[c]
        if not math.isfinite(v):
            return ""
        return f"{v:.2f} [{r[c + '_lo']:.2f}, {r[c + '_hi']:.2f}]"

    rows = []
    for _, r in df.iterrows():
        rows.append({"group": r["group"], "LM": r["lm"],
                     "platform": r["platform"] + (f" ({r['gpu']})" if r.get("gpu") else ""),
                     "mode": r["mode"], "engine": r["engine_key"], "rho": r["nominal_rho"],
                     "realized rho": round(r["realized_rho"], 2), "policy": r["policy"], "seeds": r["n_seeds"],
                     "mean RT s": round(r["mean_rt_s"], 3), "p99 RT s": round(r["p99_rt_s"], 3),
                     "p99 TTFT ms": round(r["p99_ttft_ms"], 1), "req/s": round(r["throughput_rps"], 1),
                     "SLO miss": f"{100 * r['slo_miss_rate']:.1f}%",
                     "mean / FCFS": ci(r, "mean_rt_vs_fcfs"), "p99 / FCFS": ci(r, "p99_rt_vs_fcfs"),
                     "mean / oracle": ci(r, "mean_rt_vs_oracle") + (f" ({r['oracle']})" if r.get("oracle") else ""),
                     "prediction share": (f"{100 * r['prediction_share']:.2f}%"
                                          if math.isfinite(r["prediction_share"]) else ""),
                     "prediction ms/req": (round(r["prediction_ms_per_request"], 2)
                                           if math.isfinite(r["prediction_ms_per_request"]) else ""),
                     "req/prediction call": (round(r["mean_prediction_batch"], 1)
                                             if math.isfinite(r["mean_prediction_batch"]) else "")})
        if "headroom_captured" in df:  # tables made before the protocol columns (summary.csv as committed) lack them
            rows[-1]["headroom captured"] = ci(r, "headroom_captured") or _short_note(_text(r.get("headroom_note")))
        if "flags" in df:
            rows[-1]["flags"] = _text(r.get("flags"))
    return pd.DataFrame(rows).to_markdown(index=False)


def _short_note(note: str) -> str:
    """``headroom_note`` in a few words, for the markdown table (summary.csv keeps the whole reason)."""
    if not note:
        return ""
    if "not significant" in note:
        return "(oracle n.s.)"
    if "slower" in note:
        return "(oracle slower)"
    return f"({note})"


def _text(v) -> str:
    """A text cell, empty for a missing one (summary.csv reads empty text back as NaN)."""
    return "" if v is None or (isinstance(v, float) and math.isnan(v)) else str(v)


# ---------------------------------------------------------------------------------------------- reference
def reference_root() -> Path:
    from rtlm_lab.paths import reference_dir

    return reference_dir() / "scheduler"


KEEP = ("metrics.json", "requests.parquet", "steps.parquet", "trace.parquet")


def add_runs(run_dirs: Sequence[Path], group: str, root: Path | None = None, note: str = "") -> list[Path]:
    """Copy finished runs (their four files; a trace's request texts dropped: the profile has them; the
    requests' per-token times dropped: steps.parquet has every step, and the copies stay small) into
    ``<root>/runs/<group>/<run>/`` atomically, with the group's provenance."""
    from rtlm_lab.io import copy_file_atomic, provenance, write_json_atomic, write_parquet_atomic

    root = Path(root) if root else reference_root()
    dest = root / "runs" / group
    out = []
    for d in map(Path, run_dirs):
        m, _ = load_run(d)
        pol = _policy_name(m)
        name = d.name if d.name.startswith(f"{m['lm']}__") else f"{m['lm']}__{m['platform']}__{m.get('mode', 'real')}__{pol}__{d.name}"
        t = dest / name
        t.mkdir(parents=True, exist_ok=True)
        for f in KEEP:
            src = d / f
            if not src.is_file():
                continue
            if f == "trace.parquet":
                tr = pd.read_parquet(src)
                write_parquet_atomic(tr.drop(columns=[c for c in ("text", "context") if c in tr]), t / f)
            elif f == "requests.parquet":  # per-token times stay in the run dir (steps.parquet has every step)
                rq = pd.read_parquet(src)
                write_parquet_atomic(rq.drop(columns=[c for c in ("token_times_s",) if c in rq]), t / f)
            else:
                copy_file_atomic(src, t / f)
        out.append(t)
    # a group filled over several sessions keeps what each addition said: the earlier provenance (its note,
    # its "added" and its own "earlier") goes under "earlier", newest last; n_runs counts the whole group
    prov_path = dest / "provenance.json"
    earlier: list[dict] = []
    if prov_path.is_file():
        try:
            old = json.loads(prov_path.read_text())
        except json.JSONDecodeError:
            raise UserError(f"{prov_path} is not JSON: fix or remove it before adding runs to {group}") from None
        earlier = list(old.pop("earlier", [])) + [old]
    n_group = sum(1 for p in dest.glob("*/metrics.json"))
    prov = {"note": note, "n_runs": n_group, "n_added": len(out),
            "added": provenance({"group": group, "runs": [str(d) for d in run_dirs]})}
    if earlier:
        prov["earlier"] = earlier
    write_json_atomic(prov_path, prov)
    return out


NO_GROUPS = "no conforming groups: no run group under outputs/reference/scheduler/runs/ yet, so no table"


def has_groups(root: Path | None = None) -> bool:
    """Whether ``<root>/runs/`` holds any finished run of a group (the table has rows)."""
    root = Path(root) if root else reference_root()
    return any(root.glob("runs/*/*/metrics.json"))


TABLE_FILES = ("summary.csv", "summary.md", "headroom.png", "headroom.svg")


def build(root: Path | None = None, n_boot: int = 2000) -> pd.DataFrame:
    """``summary.csv``, ``summary.md`` and the figure ``headroom.png`` / ``.svg``
    (:func:`rtlm_lab.viz.scheduler.plot_headroom`) of every committed run under ``<root>/runs/<group>/<run>/``;
    returns the table. The pages that show it (README.md, docs/results.md) are written by the report side:
    :func:`rtlm_lab.report.write_scheduler_docs`. With no group under ``runs/`` there is no table: an empty
    frame is returned and stale :data:`TABLE_FILES` are removed, not rewritten."""
    from rtlm_lab.io import atomic_path, write_text_atomic
    from rtlm_lab.viz.scheduler import plot_headroom

    root = Path(root) if root else reference_root()
    dirs = sorted(p.parent for p in root.glob("runs/*/*/metrics.json"))
    if not dirs:
        for stale in TABLE_FILES:
            (root / stale).unlink(missing_ok=True)
        return pd.DataFrame()
    df = summarize(dirs, n_boot=n_boot)
    with atomic_path(root / "summary.csv") as tmp:
        df.to_csv(tmp, index=False)
    write_text_atomic(root / "summary.md", format_summary(df) + "\n")
    real = (df["mode"] == "real").any()  # the figure shows real runs where there are any, as the README's table
    plot_headroom(df[df["mode"] == "real"] if real else df, out_dir=root,
                  title=f"{'Real' if real else 'Simulated'} runs: mean response time over FCFS and the share of the "
                        "oracle's headroom captured")
    return df


def format_headline(df: pd.DataFrame) -> str:
    """README's table: real runs only, one row per group, each policy's mean response time / FCFS [95% CI];
    :data:`NO_GROUPS` for an empty table."""
    if df.empty:
        return NO_GROUPS
    real = df[df["mode"] == "real"]
    pols = [p for p in ("sjf_input", "sjf_proxy", "ltr", "rtlm", "lmstate", "oracle_sjf", "oracle_srpt") if p in set(real["policy"])]
    rows = []
    for key, g in real.groupby(list(GROUP), sort=True):
        by = g.set_index("policy")
        f = by.loc["fcfs"] if "fcfs" in by.index else None
        gpu = (f["gpu"] if f is not None else "") or ""
        row = {"runs": key[0], "LM": key[1], "platform": key[2] + (f" ({gpu.replace('NVIDIA ', '')})" if gpu else ""),
               "engine": key[3], "rho (realized)": f"{key[4]} ({g['realized_rho'].mean():.2f})",
               "seeds x requests": f"{int(g['n_seeds'].max())} x {int(g['n_requests'].max())}",
               "FCFS mean RT s": round(float(f["mean_rt_s"]), 3) if f is not None else math.nan}
        for p in pols:
            if p in by.index and math.isfinite(by.loc[p, "mean_rt_vs_fcfs"]):
                r = by.loc[p]
                row[p] = f"{r['mean_rt_vs_fcfs']:.2f} [{r['mean_rt_vs_fcfs_lo']:.2f}, {r['mean_rt_vs_fcfs_hi']:.2f}]"
                if int(r["n_seeds"]) < int(g["n_seeds"].max()):  # a policy with fewer seeds than its group says so
                    row[p] += f" ({int(r['n_seeds'])} seeds)"
            else:
                row[p] = "not run"
        rows.append(row)
    return pd.DataFrame(rows).to_markdown(index=False)


# A group's closing FCFS runs (tools/device/box.sh group: FCFS first and again last in every seed) sit in
# runs/<group>/fcfs_last/, outside the table: they measure how far the machine moved while a seed's runs ran.
LAST = "fcfs_last"


def _step_ms(run_dir: Path, stat: str = "mean") -> float:
    """A run's engine step (``stat``: ``mean`` or ``median`` of ``steps.parquet``'s ``dt_s``), ms; NaN without steps."""
    try:
        steps = pd.read_parquet(Path(run_dir) / "steps.parquet", columns=["dt_s"])
    except (OSError, ValueError, KeyError):
        return math.nan
    return 1e3 * float(getattr(steps["dt_s"], stat)()) if len(steps) else math.nan


def fcfs_drift(root: Path | None = None) -> pd.DataFrame:
    """One row per group x seed that has a closing FCFS run (``runs/<group>/fcfs_last/``): the seed's first and
    closing FCFS runs' mean response time and mean engine step (same trace, same machine, minutes apart),
    and their ratios. Empty (with the columns) where no group has one."""
    root = Path(root) if root else reference_root()
    cols = ["group", "seed", "first_mean_rt_s", "last_mean_rt_s", "last_vs_first_mean_rt", "first_step_ms",
            "last_step_ms", "last_vs_first_step", "attempts"]
    tried = drift_attempts(root).groupby(["group", "seed"]).size().to_dict()
    rows = []
    for f in sorted(root.glob(f"runs/*/{LAST}/*/metrics.json")):
        last_dir, gdir = f.parent, f.parent.parent.parent
        m_last, _ = load_run(last_dir)
        seed = int(m_last.get("seed", 0))
        firsts = _seed_runs(gdir, seed, "fcfs")
        if not firsts:
            continue
        first = firsts[0]
        a, b = float(first[1]["mean_rt_s"]), float(m_last["mean_rt_s"])
        sa, sb = _step_ms(first[0]), _step_ms(last_dir)
        rows.append({"group": gdir.name, "seed": seed, "first_mean_rt_s": a, "last_mean_rt_s": b,
                     "last_vs_first_mean_rt": b / a if a > 0 else math.nan, "first_step_ms": sa,
                     "last_step_ms": sb, "last_vs_first_step": sb / sa if sa > 0 else math.nan,
                     "attempts": int(tried.get((gdir.name, seed), 1))})
    return pd.DataFrame(rows, columns=cols)


DRIFT_ATTEMPTS = "drift_attempts.csv"
DRIFT_COLUMNS = ("seed", "attempt", "first_run", "closing_run", "closing_sha", "first_mean_rt_s", "closing_mean_rt_s",
                 "closing_vs_first", "first_step_ms", "closing_step_ms", "kept", "utc")


def drift_gate(gdir: Path, seed: int, reruns: int) -> tuple[bool, str]:
    """The protocol's drift rule for one seed of a group (``tools/device/box.sh group``, after the seed's closing
    FCFS run): the attempt stands where the closing FCFS run's mean response time is within
    ``FCFS_DRIFT_TOLERANCE`` of the first's, or where ``reruns`` reruns are spent (the table then flags the
    seed); otherwise its runs are deleted, to be run again. Every gated attempt is a row of
    ``<gdir>/drift_attempts.csv`` (the report counts them). Idempotent: an attempt already gated keeps its
    verdict (a call cut after the verdict deletes what is left). Returns (kept, one line)."""
    from rtlm_lab.io import sha256_file, write_text_atomic

    gdir, seed = Path(gdir), int(seed)

    firsts, lasts = _seed_runs(gdir, seed, "fcfs"), _seed_runs(gdir / LAST, seed, "fcfs")
    if not firsts or not lasts:
        raise UserError(f"seed {seed} has no first or no closing FCFS run in {gdir}")
    path = gdir / DRIFT_ATTEMPTS
    log = pd.read_csv(path) if path.is_file() else pd.DataFrame(columns=list(DRIFT_COLUMNS))
    mine = log[log["seed"].astype(int) == seed]
    # a rerun's runs get the same names (the config's hash): an attempt is known by its closing run's metrics
    (first, m_first), (last, m_last) = firsts[0], lasts[0]
    sha = sha256_file(last / "metrics.json")[:16]
    row = mine[mine["closing_sha"].astype(str) == sha]
    if row.empty:
        a, b = float(m_first["mean_rt_s"]), float(m_last["mean_rt_s"])
        ratio = b / a if a > 0 else math.nan
        ok = bool(abs(ratio - 1) <= FCFS_DRIFT_TOLERANCE)
        attempt = len(mine) + 1
        row = pd.DataFrame([{"seed": seed, "attempt": attempt, "first_run": first.name,
                             "closing_run": last.name, "closing_sha": sha, "first_mean_rt_s": a, "closing_mean_rt_s": b,
                             "closing_vs_first": ratio, "first_step_ms": _step_ms(first, "median"),
                             "closing_step_ms": _step_ms(last, "median"), "kept": bool(ok or attempt > reruns),
                             "utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}])
        log = pd.concat([log, row], ignore_index=True) if len(log) else row
        write_text_atomic(path, log[list(DRIFT_COLUMNS)].to_csv(index=False))
    r = row.iloc[0]
    kept = str(r["kept"]) == "True"
    ratio = float(r["closing_vs_first"])
    ok = abs(ratio - 1) <= FCFS_DRIFT_TOLERANCE
    msg = (f"seed {seed} attempt {int(r['attempt'])}: closing / first FCFS mean RT {ratio:.2f}x (median step "
           f"{float(r['closing_step_ms']):.1f} / {float(r['first_step_ms']):.1f} ms): "
           + ("kept" if ok else f"kept, drift flagged (no rerun left of {reruns})" if kept
              else "dropped, the seed runs again"))
    if not kept:
        for run, _ in _seed_runs(gdir, seed) + _seed_runs(gdir / LAST, seed):
            shutil.rmtree(run)
    return kept, msg


def drift_attempts(root: Path | None = None) -> pd.DataFrame:
    """Every group's gated attempts (``runs/<group>/drift_attempts.csv``, :func:`drift_gate`), with the group."""
    root = Path(root) if root else reference_root()
    frames = [pd.read_csv(f).assign(group=f.parent.name) for f in sorted(root.glob(f"runs/*/{DRIFT_ATTEMPTS}"))]
    df = (pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=["group", *DRIFT_COLUMNS]))
    df["kept"] = df["kept"].map(lambda v: str(v) == "True").astype(bool)
    return df


def format_drift(df: pd.DataFrame, dropped: pd.DataFrame | None = None) -> str:
    """:func:`fcfs_drift` as markdown; ``dropped``: :func:`drift_attempts` rows the rule dropped, listed below."""
    if df.empty:
        return "No group has closing FCFS runs yet (`tools/device/box.sh group` makes them)."
    out = df.rename(columns={"first_mean_rt_s": "first FCFS mean RT s", "last_mean_rt_s": "closing FCFS mean RT s",
                             "last_vs_first_mean_rt": "closing / first", "first_step_ms": "first step ms",
                             "last_step_ms": "closing step ms", "last_vs_first_step": "step closing / first",
                             "attempts": "attempts (the last kept)"})
    md = out.round(3).to_markdown(index=False)
    if dropped is not None and len(dropped):
        d = dropped[["group", "seed", "attempt", "closing_vs_first", "first_step_ms", "closing_step_ms", "utc"]]
        md += ("\n\nAttempts dropped by the drift rule (`box.sh group` with `DRIFT_RERUNS`: their runs were deleted "
               "and the seed ran again; `runs/<group>/drift_attempts.csv`):\n\n"
               + d.rename(columns={"closing_vs_first": "closing / first", "first_step_ms": "first median step ms",
                                   "closing_step_ms": "closing median step ms"}).round(3).to_markdown(index=False))
    return md
