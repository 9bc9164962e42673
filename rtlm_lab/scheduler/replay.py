"""The simulator against real runs: replay a real continuous-engine run's exact trace in the simulator, and
fit the engine's step model, with its admission term, on *other* real runs (calibration runs).

Why an admission term: the step model of a saturation run (every request queued at t=0) predicts a step
from its rows and tokens; under arrivals a step that admits requests also runs their prefill forward and
merges their KV into the running cache (:class:`~rtlm_lab.scheduler.engine.SlotBackend`), which the
saturation run hardly separates from the fixed cost. :func:`fit_step_model` fits
``a + b x n_seqs + c x n_tokens + d x n_admit + e x [n_admit > 0]`` to the steps of the calibration runs.

The per-step record (:func:`step_log`):

* ``n_admit``: the step's column where the run recorded it; in runs made before it was recorded, the
  requests whose ``admit_s`` equals the step's start (the engine stamps admissions with it; checked: every
  request is matched to one step, else :class:`~rtlm_lab.errors.UserError`);
* ``period_s``: the time from the step's start to the next step's start when the engine still had work
  (a row running on, or a request ready and waiting), else the step's own ``dt_s``. On the real engine the
  loop's host-side work between steps (policy ordering, bookkeeping, hand-over) is a share of a step
  (docs/scheduling.md); the simulator has no such gap, so the step model is fitted to the period (``target``).

:func:`replay` rebuilds the requests from the run's ``trace.parquet`` (the same request ids, arrival times,
prompt and output lengths: checked against the run's ``requests.parquet``), serves them with the run's
policy and engine budgets on the simulator's virtual clock, and leaves out the same warm-up share.
:func:`sim_error` tabulates mean and p99 response-time errors per run and model; :func:`build` writes the
table and its provenance (``rtlm-reference target=sim_error``).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import pandas as pd

from rtlm_lab.errors import UserError
from rtlm_lab.scheduler.engine import STEP_COLUMNS, StepModel

log = logging.getLogger("rtlm_lab.scheduler")

COLUMNS = ("model", "policy", "seed", "real_mean_s", "sim_mean_s", "mean_err", "real_p99_s", "sim_p99_s",
           "p99_err", "real_running", "sim_running", "step_err", "same_trace", "run")


def _read(run_dir: Path) -> tuple[dict, pd.DataFrame, pd.DataFrame]:
    from rtlm_lab.scheduler.analysis import load_run

    m, req = load_run(run_dir)
    try:
        steps = pd.read_parquet(Path(run_dir) / "steps.parquet")
    except (OSError, ValueError) as exc:
        raise UserError(f"{run_dir} has no readable steps.parquet ({type(exc).__name__}): a continuous-engine "
                        "run is needed") from None
    return m, req, steps


def step_log(run_dir: str | Path) -> pd.DataFrame:
    """The run's steps (``steps.parquet``, its main engine) with ``n_admit`` and ``period_s`` (module doc)."""
    run_dir = Path(run_dir)
    _, req, steps = _read(run_dir)
    if "engine" in steps.columns and steps["engine"].nunique() > 1:
        raise UserError(f"{run_dir}: {steps['engine'].nunique()} engines; the step log reads one-engine runs")
    s = steps.sort_values("t_s").reset_index(drop=True)
    t = s["t_s"].to_numpy(float)
    if "n_admit" not in s.columns:
        idx = np.searchsorted(t, req["admit_s"].to_numpy(float))
        ok = (idx < len(t)) & np.isclose(t[np.minimum(idx, len(t) - 1)], req["admit_s"].to_numpy(float),
                                         rtol=0.0, atol=1e-9)
        if not ok.all():
            raise UserError(f"{run_dir}: {int((~ok).sum())} request(s) admitted at no step start; cannot count "
                            "admissions per step")
        s["n_admit"] = np.bincount(idx, minlength=len(t))
    t_end = t + s["dt_s"].to_numpy(float)
    t_next = np.append(t[1:], np.inf)
    adm, fin = req["admit_s"].to_numpy(float), req["finish_s"].to_numpy(float)
    ready = req["ready_s"].to_numpy(float) if "ready_s" in req else req["arrival_s"].to_numpy(float)
    busy = np.zeros(len(s), bool)
    for lo in range(0, len(s), 256):  # chunks of steps x requests
        sl = slice(lo, lo + 256)
        running_on = (adm[None, :] <= t[sl, None]) & (fin[None, :] >= t_next[sl, None])
        waiting = (ready[None, :] <= t_end[sl, None]) & (adm[None, :] >= t_next[sl, None])
        busy[sl] = (running_on | waiting).any(1)
    busy &= np.isfinite(t_next)
    s["period_s"] = np.where(busy, t_next - t, s["dt_s"].to_numpy(float))
    s["busy_after"] = busy
    return s


def saturation_step_log(path: str | Path) -> pd.DataFrame:
    """A saturation run's steps (the ``<lm>__<platform>__<commit>.steps.parquet`` a capacity measurement keeps
    beside its json) in :func:`step_log`'s form, without its requests.

    The file must carry ``t_s, dt_s, n_seqs, n_tokens, n_admit`` (the engine records ``n_admit`` per step; the
    requests are not kept, so it cannot be rebuilt from ``admit_s`` here). Every request of a saturation run is
    ready at t=0, so the engine has work until its last step: ``period_s`` is the time to the next step's start
    for every step but the last (its own ``dt_s``), ``busy_after`` is true for all but the last.

    What identifies the admission terms: the first step admits ``max_seqs`` requests at once (a large prefill),
    the later ones refill the slots freed by finished requests (0 to a few a step) until the queue is empty,
    then the batch drains without admissions. So ``n_admit`` and ``[n_admit > 0]`` do vary, and
    :meth:`StepModel.fit` fits ``d`` and ``e``; but on a few dozen to a few hundred steps, with the admitting
    steps mostly at full batch and one step of 64 admissions carrying most of the prompt tokens, they are
    weakly identified (``d`` trades against ``c``, ``e`` against ``b`` and ``a``): read them as the saturation
    run's estimate, not as a measurement of an admission under arrivals."""
    path = Path(path)
    try:
        s = pd.read_parquet(path)
    except (OSError, ValueError) as exc:
        raise UserError(f"{path}: no readable saturation steps parquet ({type(exc).__name__})") from None
    missing = [c for c in STEP_COLUMNS if c not in s.columns]
    if missing:
        raise UserError(f"{path}: saturation steps lack {missing} (need {list(STEP_COLUMNS)}; n_admit is "
                        "recorded by engines since the admission term)")
    if "engine" in s.columns and s["engine"].nunique() > 1:
        raise UserError(f"{path}: {s['engine'].nunique()} engines; the step log reads one-engine runs")
    s = s.sort_values("t_s").reset_index(drop=True)
    if len(s) < 3:
        raise UserError(f"{path}: {len(s)} step(s); a saturation run has more")
    t, dt = s["t_s"].to_numpy(float), s["dt_s"].to_numpy(float)
    if (t[1:] < t[:-1] + dt[:-1] - 1e-6).any():
        raise UserError(f"{path}: steps overlap (a step starts before the previous one ended)")
    if int(s["n_admit"].iloc[0]) <= 0:
        raise UserError(f"{path}: the first step admits nothing; not a saturation run (everything queued at t=0)")
    s["period_s"] = np.append(t[1:] - t[:-1], dt[-1])
    s["busy_after"] = np.arange(len(s)) < len(s) - 1
    return s


def fit_step_model(run_dirs: Sequence[str | Path], admission: bool = True, target: str = "period_s",
                   steps_files: Sequence[str | Path] = ()) -> StepModel:
    """Fit the step model on the steps of ``run_dirs`` (calibration runs, :func:`step_log`) and of
    ``steps_files`` (saturation runs' steps, :func:`saturation_step_log`), pooled."""
    if not run_dirs and not steps_files:
        raise UserError("no calibration runs or saturation steps to fit a step model on (target.calibration, "
                        "target.calibration_steps)")
    logs = [step_log(d) for d in run_dirs] + [saturation_step_log(f) for f in steps_files]
    steps = pd.concat(logs, ignore_index=True)
    what = " and ".join(x for x in (f"{len(run_dirs)} real run(s)" if run_dirs else "",
                                    f"{len(steps_files)} saturation run(s)" if steps_files else "") if x)
    src = (f"{'admission-aware ' if admission else ''}fit to the step {'periods' if target == 'period_s' else 'times'}"
           f" of {what}")
    m = StepModel.fit(steps, source=src, admission=admission, target=target)
    m.meta["runs"] = [Path(d).name for d in run_dirs]
    if steps_files:
        m.meta["saturation_steps"] = [Path(f).name for f in steps_files]
    return m


def _requests(trace: pd.DataFrame):
    from rtlm_lab.scheduler.continuous import to_requests

    tr = trace.copy()
    for c in ("text", "context"):
        if c not in tr.columns:
            tr[c] = ""  # committed traces drop the texts; the simulator does not read them
    return to_requests(tr, keep_predictions=True)


def same_trace(trace: pd.DataFrame, real: pd.DataFrame) -> bool:
    """Whether the trace holds exactly the real run's requests: ids, arrival times, prompt and output lengths."""
    cols = ["request_id", "arrival_s", "n_input_tokens", "true_tokens"]
    if len(trace) != len(real) or any(c not in trace or c not in real for c in cols):
        return False
    a = trace[cols].sort_values(["arrival_s", "request_id"]).reset_index(drop=True)
    b = real[cols].sort_values(["arrival_s", "request_id"]).reset_index(drop=True)
    return bool((a["request_id"].astype(str) == b["request_id"].astype(str)).all()
                and np.allclose(a["arrival_s"], b["arrival_s"], rtol=0, atol=1e-9)
                and (a[cols[2:]].to_numpy() == b[cols[2:]].to_numpy()).all())


def replay(run_dir: str | Path, model: StepModel) -> tuple[pd.DataFrame, pd.DataFrame, dict[str, Any]]:
    """Serve the real run's trace in the simulator with ``model``; returns (records, steps, facts) where
    facts carry ``same_trace`` and the warm-up share used."""
    from rtlm_lab.scheduler.continuous import EngineFactory, engine_config, job_records
    from rtlm_lab.scheduler.engine import PredictorServer, VirtualClock, serve
    from rtlm_lab.scheduler.policies import make_policy

    run_dir = Path(run_dir)
    m, real, _ = _read(run_dir)
    try:
        trace = pd.read_parquet(run_dir / "trace.parquet")
    except (OSError, ValueError) as exc:
        raise UserError(f"{run_dir} has no readable trace.parquet ({type(exc).__name__})") from None
    pol_cfg = m["policy"] if isinstance(m["policy"], dict) else {"name": str(m["policy"])}
    policy = make_policy(str(pol_cfg["name"]), pol_cfg)
    if getattr(policy, "uses_lm_state", False) or policy.needs:
        raise UserError(f"{run_dir.name}: policy {policy.name} predicts online in the real run; the replay serves "
                        "policies without a predictor (fcfs, sjf_input, oracle_*)")
    ecfg = engine_config({"engine": m["engine_config"]})
    if int(m.get("n_engines", 1)) != 1:
        raise UserError(f"{run_dir.name}: {m.get('n_engines')} engines; the replay serves one-engine runs")
    reqs = _requests(trace)
    policy.token_s = model.step_s(max(1, ecfg["max_seqs"] // 2), max(1, ecfg["max_seqs"] // 2))
    engines = EngineFactory("sim", ecfg, step_model=model).build(policy, capacity_rps=float(m["capacity_rps"]))
    clock = VirtualClock()
    jobs, facts = serve(reqs, policy, engines, clock, PredictorServer(reqs, (), clock))
    n = max(1, int(m.get("n_requests", len(real))))
    warmup_frac = int(m.get("n_warmup_excluded", 0)) / n
    slo_k = float(m.get("slo_k", 5.0))
    records = job_records(jobs, policy, slo_k, warmup_frac)
    steps = pd.concat(facts["steps"].values(), ignore_index=True)
    return records, steps, {"same_trace": same_trace(trace, real), "warmup_frac": warmup_frac}


def _rt(records: pd.DataFrame) -> np.ndarray:
    from rtlm_lab.scheduler.analysis import measured

    return measured(records)["response_s"].to_numpy(float)


def sim_error(run_dirs: Sequence[str | Path], models: Mapping[str, StepModel | None]) -> pd.DataFrame:
    """One row per run x model (:data:`COLUMNS`): real vs simulated mean and p99 response time over the
    measured requests, mean running rows, and ``step_err``: the model's step periods summed over the real
    run's own steps vs the real sum (how far the model is off before any queueing). A model ``None``: the
    step model the real run itself was served with (its saturation run's)."""
    rows = []
    for d in map(Path, run_dirs):
        m, real, _ = _read(d)
        sl = step_log(d)
        for name, model in models.items():
            sm = model if model is not None else StepModel.from_dict(m["step_model"])
            rec, steps, facts = replay(d, sm)
            r_rt, s_rt = _rt(real), _rt(rec)
            pred = np.array([sm.step_s(a, b, c) for a, b, c in
                             zip(sl["n_seqs"], sl["n_tokens"], sl["n_admit"])])
            p99 = lambda x: float(np.percentile(x, 99))  # noqa: E731
            rows.append({
                "model": name, "policy": m["policy"]["name"] if isinstance(m["policy"], dict) else str(m["policy"]),
                "seed": int(m.get("seed", 0)), "real_mean_s": float(r_rt.mean()), "sim_mean_s": float(s_rt.mean()),
                "mean_err": float(s_rt.mean() / r_rt.mean() - 1.0), "real_p99_s": p99(r_rt), "sim_p99_s": p99(s_rt),
                "p99_err": p99(s_rt) / p99(r_rt) - 1.0, "real_running": float(sl["n_seqs"].mean()),
                "sim_running": float(steps["n_seqs"].mean()),
                "step_err": float(pred.sum() / sl["period_s"].sum() - 1.0),
                "same_trace": bool(facts["same_trace"]), "run": d.name})
    return pd.DataFrame(rows, columns=list(COLUMNS))


def summarize(table: pd.DataFrame) -> pd.DataFrame:
    """Per model: the range and mean of |error| of the mean and p99 response time, how many runs meet 15%, and
    the range of ``step_err`` (the model's steps against the real ones, before any queueing)."""
    g = table.assign(abs_mean=table["mean_err"].abs(), abs_p99=table["p99_err"].abs()).groupby("model", sort=False)
    return pd.DataFrame({"runs": g.size(), "mean_err_min": g["mean_err"].min(), "mean_err_max": g["mean_err"].max(),
                         "mean_abs_mean_err": g["abs_mean"].mean(), "p99_err_min": g["p99_err"].min(),
                         "p99_err_max": g["p99_err"].max(), "mean_abs_p99_err": g["abs_p99"].mean(),
                         "runs_mean_within_15pct": g["abs_mean"].apply(lambda x: int((x <= 0.15).sum())),
                         "step_err_min": g["step_err"].min(), "step_err_max": g["step_err"].max()}
                        ).reset_index()


SUMMARY = "sim_error_summary"


def _root(root: Path | None) -> Path:
    """``root``, or the committed scheduler reference folder."""
    if root is not None:
        return Path(root)
    from rtlm_lab.scheduler.analysis import reference_root

    return Path(reference_root())


def summary_all(root: Path | None = None) -> pd.DataFrame:
    """Every committed sim-error table (``sim_error*.csv`` under ``root``) in one: per table and model, the LM
    and platform of its runs, what the model was fitted on (``calibration``), and :func:`summarize`'s error
    columns. Written as ``sim_error_summary.csv`` / ``.md`` by :func:`build`."""
    root = _root(root)
    rows = []
    for f in sorted(Path(root).glob("sim_error*.csv")):
        if f.stem == SUMMARY:
            continue
        t = pd.read_csv(f)
        try:
            prov = json.loads(f.with_suffix(".provenance.json").read_text())
        except (OSError, json.JSONDecodeError):
            prov = {}
        cal = [Path(p).name for p in prov.get("calibration_runs", [])]
        steps = [Path(p).name for p in prov.get("calibration_steps", [])]
        fitted = "; ".join(x for x in (f"{len(cal)} real run(s): {cal[0]}" + (f" + {len(cal) - 1} more" if len(cal) > 1
                                                                              else "") if cal else "",
                                       f"saturation steps {', '.join(steps)}" if steps else "") if x)
        parts = str(t["run"].iloc[0]).split("__") if len(t) else ["?", "?"]
        for _, r in summarize(t).iterrows():
            rows.append({"table": f.name, "lm": parts[0], "platform": parts[1],
                         "model": r["model"], "calibration": ("each run's own saturation run (served with)"
                                                              if r["model"] == "old_saturation" else fitted),
                         **{k: r[k] for k in r.index if k != "model"}})
    return pd.DataFrame(rows)


def write_summary(root: Path | None = None) -> pd.DataFrame:
    from rtlm_lab.io import atomic_path, write_text_atomic

    root = _root(root)
    df = summary_all(root)
    with atomic_path(Path(root) / f"{SUMMARY}.csv") as tmp:
        df.round(4).to_csv(tmp, index=False)
    show = df[df["model"] != "new_no_admission"].copy()
    show["mean error range"] = [f"{a:+.0%} to {b:+.0%}" for a, b in zip(show["mean_err_min"], show["mean_err_max"])]
    show["mean abs error"] = [f"{v:.0%}" for v in show["mean_abs_mean_err"]]
    show["p99 abs error"] = [f"{v:.0%}" for v in show["mean_abs_p99_err"]]
    show["within 15%"] = [f"{a} of {b}" for a, b in zip(show["runs_mean_within_15pct"], show["runs"])]
    show["step error range"] = [f"{a:+.0%} to {b:+.0%}" for a, b in zip(show["step_err_min"], show["step_err_max"])]
    md = ("# The simulator against real runs (out of sample)\n\nBuilt by `rtlm-reference target=sim_error*` "
          "(each table's own provenance names its runs). Mean response time of each replayed real run, "
          "simulated vs real; new_admission: the step model fitted on the calibration named, with the admission "
          "terms; old_saturation: the model each run was served with.\n\n"
          + show[["table", "lm", "platform", "model", "calibration", "runs", "mean error range", "mean abs error",
                  "p99 abs error", "within 15%", "step error range"]].to_markdown(index=False)
          + "\n\nstep error: the model's step periods summed over the real run's own steps against the real sum "
          "(how far the model is off before any queueing; a run on a machine slower than at calibration shows "
          "it first).\n")
    write_text_atomic(Path(root) / f"{SUMMARY}.md", md)
    return df


def _glob(paths: Sequence[str]) -> list[Path]:
    from rtlm_lab.paths import expand_globs, resolve_path

    return [Path(p) for p in expand_globs([str(resolve_path(p)) for p in paths])]


def _expand(paths: Sequence[str]) -> list[Path]:
    return [p for p in _glob(paths) if p.is_dir() or not p.exists()]


def _expand_files(paths: Sequence[str]) -> list[Path]:
    out = _glob(paths)
    for p in out:
        if not p.is_file():
            raise UserError(f"{p}: no such saturation steps file (target.calibration_steps)")
    return out


def _rel(p: Path) -> str:
    """A path relative to the checkout where it lies inside it (provenance that reads the same anywhere)."""
    from rtlm_lab.paths import repo_root

    try:
        return Path(p).resolve().relative_to(repo_root()).as_posix()
    except ValueError:
        return str(p)


def build(cfg: Mapping[str, Any], command: str = "") -> pd.DataFrame:
    """``target=sim_error``: fit the step model on ``cfg.calibration`` runs and/or ``cfg.calibration_steps``
    (saturation runs' steps parquets, :func:`saturation_step_log`), replay every ``cfg.runs`` run with the old
    (saturation-run) model, the new one without and with the admission terms, and write ``cfg.out`` (csv) and
    ``<out stem>.provenance.json`` beside it."""
    from rtlm_lab.io import atomic_path, provenance, write_json_atomic
    from rtlm_lab.paths import resolve_path

    cal, val = _expand(cfg.get("calibration") or []), _expand(cfg.get("runs") or [])
    cal_steps = _expand_files(cfg.get("calibration_steps") or [])
    if not cal and not cal_steps:
        raise UserError("no calibration runs: target.calibration and target.calibration_steps name none (no "
                        "committed group to validate against yet: conf/target/sim_error.yaml, docs/results.md)")
    if not val:
        raise UserError("no validation runs: target.runs names no run dirs to replay")
    overlap = {p.resolve() for p in cal} & {p.resolve() for p in val}
    if overlap:
        raise UserError(f"{len(overlap)} run(s) are both calibration and validation runs, e.g. "
                        f"{sorted(overlap)[0].name}")
    for p in [*cal, *val]:
        if not (p / "metrics.json").is_file():
            raise UserError(f"{p} is not a finished run (no metrics.json)")
    target = str(cfg.get("fit_target", "period_s"))
    if target not in ("period_s", "dt_s"):
        raise UserError(f"target.fit_target must be period_s or dt_s (got {target!r})")
    new = fit_step_model(cal, admission=True, target=target, steps_files=cal_steps)
    ablation = fit_step_model(cal, admission=False, target=target, steps_files=cal_steps)
    log.info("step model (new): a %.3f ms, b %.4f ms/row, c %.5f ms/token, d %.3f ms/admitted, e %.3f ms/admitting "
             "step (rmse %.2f ms over %d steps)", 1e3 * new.a, 1e3 * new.b, 1e3 * new.c, 1e3 * new.d, 1e3 * new.e,
             1e3 * new.meta["rmse_s"], new.meta["n_steps"])
    models: dict[str, StepModel | None] = {"old_saturation": None, "new_no_admission": ablation,
                                           "new_admission": new}
    table = sim_error(val, models)
    out = resolve_path(cfg.get("out")) if cfg.get("out") else None
    if out is None:
        from rtlm_lab.scheduler.analysis import reference_root

        out = reference_root() / "sim_error.csv"
    out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(out) as tmp:
        table.round(4).to_csv(tmp, index=False)
    old_models = {json.dumps(json.loads((p / "metrics.json").read_text())["step_model"], sort_keys=True) for p in val}
    extra = {"calibration_steps": [_rel(p) for p in cal_steps]} if cal_steps else {}
    write_json_atomic(out.with_suffix(".provenance.json"), provenance(
        cfg, command=command, calibration_runs=[_rel(p) for p in cal], **extra, validation_runs=[_rel(p) for p in val],
        models={"old_saturation": [json.loads(s) for s in old_models], "new_no_admission": ablation.to_dict(),
                "new_admission": new.to_dict()},
        summary=summarize(table).round(4).to_dict(orient="records"),
        note="old_saturation: the step model each real run was served with (its saturation run, dt only); "
             "new_admission: fitted on the calibration runs only, with the admission terms d (per admitted "
             "request) and e (per admitting step), to fit_target (period_s: dt + the loop's gap to the next "
             "step while busy); new_no_admission: the same fit without d and e (ablation)"
             + ("; calibration_steps: saturation runs' steps (every request queued at t=0, so the period is the "
                "time to the next step for all steps but the last; the admission terms are identified only by "
                "the first step's max_seqs admissions and the slot refills after it)" if cal_steps else "")))
    write_summary(out.parent)
    return table
