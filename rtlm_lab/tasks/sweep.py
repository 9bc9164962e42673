"""``rtlm-sweep``: notebooks 01-03 for every (lm, platform) cell, resumable, then a report.

For each cell of ``sweep.lms`` x ``sweep.platforms`` the three notebooks run under papermill into
``outputs/sweeps/<sweep.name>/<lm>/<platform>/``: the executed notebooks ``01_uncertainty_latency.ipynb``,
``02_length_regressor.ipynb``, ``03_scheduler.ipynb`` and, beside each, a folder of the same stem holding
what that notebook writes (``metrics.json``, figures; notebook 03 also its per-policy run dirs). Every
notebook reads the cell's profile ``<sweep.profile_dir>/<sweep.profile_name>`` (default: the committed
reference profile); notebook 03 runs in ``sweep.scheduler_mode`` (``sim`` by default, or ``real``).
``sweep.by_platform.<platform>`` overrides any of ``scheduler_mode``, ``nb01``, ``nb02``, ``nb03`` for that
platform's cells (the reference sweep, ``sweep_size=reference``, runs notebook 03 in real mode on cuda and
simulates the cpu cells), and ``sweep.by_cell["<lm>/<platform>"]`` the same for one cell, after it (the
reference sweep gives each cuda cell the engine budget of its reference runs: 64 rows, 128 for SmolLM2).

Each finished cell dir gets its own ``manifest.json`` (every artefact with its sha256 and size,
:func:`rtlm_lab.io.write_run_manifest`; the sweep manifest keeps that file's sha256); the executed notebooks
are renamed into place when they end. ``manifest.json`` in the sweep dir (written atomically after every
cell) records each cell's status
(``done`` / ``failed`` / ``interrupted``), the sha256 of its config (lm, platform, profile path and content
hash, notebook parameters, notebook sources; paths inside the repository and the sweep dir are hashed relative
to them, so a sweep dir moved to another machine resumes there), its timing and, for a failure, the error's first line. A rerun
skips ``done`` cells whose hash matches (``sweep.force=true`` reruns them); any other cell is cleared and run
again. A failing cell does not stop the sweep; the exit status is 1 if any cell failed. Ctrl-C / SIGTERM
stop after saving the manifest (finished cells stay finished); rerun the same command to resume.

Examples::

    rtlm-sweep                                                        # quick demo: gemma3_270m on cpu
    rtlm-sweep sweep_size=demo                  # make demo's: its own profile, notebook 03 in real mode
    rtlm-sweep sweep.name=reference sweep_size=full \\
        sweep.lms=[gemma3_270m,smollm2_135m,dialogpt_ccc,blenderbot_ccc,godel_ccc] sweep.platforms=[cpu,cuda]
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import logging
import os
import shutil
import signal
import sys
import time
from pathlib import Path
from typing import Any, Callable

from omegaconf import DictConfig, OmegaConf

from rtlm_lab.errors import UserError
from rtlm_lab.io import provenance, sha256_file, write_json_atomic, write_run_manifest
from rtlm_lab.paths import ROOT, outputs_dir
from rtlm_lab.tasks._cli import group_options, make_main, task_wrapper

log = logging.getLogger("rtlm_lab.sweep")

NOTEBOOKS = ("01_uncertainty_latency", "02_length_regressor", "03_scheduler")
MANIFEST = "manifest.json"
MANIFEST_VERSION = 1


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def _resolve(path: str | os.PathLike) -> Path:
    p = Path(str(path)).expanduser()
    return p if p.is_absolute() else ROOT / p


def sweep_dir_of(name: str) -> Path:
    return outputs_dir() / "sweeps" / name


def profile_path(sweep: dict, lm: str, platform: str) -> Path:
    return _resolve(sweep["profile_dir"]) / str(sweep["profile_name"]).format(lm=lm, platform=platform)


CELL_KEYS = ("scheduler_mode", "nb01", "nb02", "nb03")


def platform_sweep(sweep: dict, platform: str, lm: str | None = None) -> dict:
    """``sweep`` with ``by_platform[platform]`` applied by ``OmegaConf.merge``: ``scheduler_mode`` replaced,
    ``nb01``-``nb03`` merged key by key (a value given there wins over the sweep-wide one; lists are replaced);
    with ``lm``, then ``by_cell["<lm>/<platform>"]`` the same way (one cell's own settings, e.g. the engine
    budget its reference runs used)."""
    out = _merge_cell_keys(sweep, (sweep.get("by_platform") or {}).get(platform), f"sweep.by_platform.{platform}")
    if lm is not None:
        key = f"{lm}/{platform}"
        out = _merge_cell_keys(out, (sweep.get("by_cell") or {}).get(key), f"sweep.by_cell['{key}']")
    return out


def _merge_cell_keys(sweep: dict, over: dict | None, where: str) -> dict:
    from omegaconf import OmegaConf

    over = dict(over or {})
    unknown = sorted(set(over) - set(CELL_KEYS))
    if unknown:
        raise UserError(f"{where} sets {', '.join(unknown)}; it may set only {', '.join(CELL_KEYS)}")
    nb = lambda k, d: (d.get(k) or {}) if k.startswith("nb") else d.get(k)  # noqa: E731 - `nb03: null` = {}
    base = {k: nb(k, sweep) for k in over}
    merged = OmegaConf.to_container(OmegaConf.merge(base, {k: nb(k, over) for k in over}), resolve=False)
    return {**sweep, **merged}


def notebook_parameters(sweep: dict, lm: str, platform: str, cell_dir: Path, profile: Path) -> dict[str, dict]:
    """papermill parameters of the three notebooks of one cell (``output_dir`` / ``out_dir`` = its folder).
    ``sweep`` is the cell's view (:func:`platform_sweep` with ``lm``)."""
    seed = int(sweep.get("seed", 0))
    nb01 = {"lm": lm, "platform": platform, "profile": str(profile), "seed": seed,
            "output_dir": str(cell_dir / NOTEBOOKS[0]), **dict(sweep.get("nb01") or {})}
    nb02 = {"lm": lm, "platform": platform, "profile": str(profile), "seed": seed,
            "output_dir": str(cell_dir / NOTEBOOKS[1]), **dict(sweep.get("nb02") or {})}
    if nb02.get("recal_target") and not nb02.get("recal_target_profile"):
        nb02["recal_target_profile"] = str(profile_path(sweep, nb02["recal_target"], platform))
    nb03 = {"lm": lm, "platform": platform, "profile": str(profile), "seed": seed,
            "mode": str(sweep.get("scheduler_mode", "sim")), "out_dir": str(cell_dir / NOTEBOOKS[2]),
            **dict(sweep.get("nb03") or {})}
    return dict(zip(NOTEBOOKS, (nb01, nb02, nb03)))


def cell_config(sweep: dict, lm: str, platform: str, cell_dir: Path) -> dict[str, Any]:
    """Everything a cell's results depend on (its hash decides whether a rerun may skip it)."""
    sweep = platform_sweep(sweep, platform, lm)
    prof = profile_path(sweep, lm, platform)
    mode = str(sweep.get("scheduler_mode", "sim"))
    cfg = {
        "lm": lm, "platform": platform, "scheduler_mode": mode,
        "profile": str(prof), "profile_sha256": sha256_file(prof) if prof.is_file() else None,
        "parameters": notebook_parameters(sweep, lm, platform, cell_dir, prof),
        "notebooks_sha256": {nb: sha256_file(ROOT / "notebooks" / f"{nb}.ipynb") for nb in NOTEBOOKS},
        # the notebooks are views of these modules: a change there reruns the cell as a notebook change does
        "studies_sha256": {str(p): sha256_file(ROOT / p) for p in STUDIES},
    }
    if mode == "sim":  # on the continuous engine a simulation replays the measured engine capacity file
        cap = _sim_capacity_file(lm, platform, (sweep.get("nb03") or {}).get("overrides") or ())
        if cap is not None:
            committed = cap.resolve().is_relative_to((ROOT / "outputs" / "reference").resolve())
            cfg["engine_capacity"] = {"file": cap.name, "committed": committed, "sha256": sha256_file(cap)}
    if mode == "sim":  # a simulation's results follow its service models: a new calibration reruns the cell
        from rtlm_lab.scheduler.harness import sim_service_path

        cfg["service_models"] = {}
        for role in ("main", "offload"):
            p = sim_service_path(lm, platform, role)
            committed = p is not None and p.resolve().is_relative_to((ROOT / "outputs" / "reference").resolve())
            cfg["service_models"][role] = ({"file": p.name, "committed": committed, "sha256": sha256_file(p)}
                                           if p is not None
                                           else "fit to the batch-1 profile" if role == "main" else None)
    return cfg


STUDIES = ("rtlm_lab/uncertainty/study.py", "rtlm_lab/regressor/study.py", "rtlm_lab/scheduler/study.py")


def _sim_capacity_file(lm: str, platform: str, overrides=()) -> Path | None:
    """The capacity file a continuous-engine simulation of this cell would replay (None: static path, or none);
    ``overrides`` are notebook 03's (``platform.engine.max_seqs=64``, ``platform.offload_workers=0``: the engine
    key follows them as the harness's does)."""
    try:
        from omegaconf import OmegaConf

        from rtlm_lab.scheduler.continuous import capacity_cache, measured_engine_config, reference_capacity

        lm_cfg = OmegaConf.to_container(OmegaConf.load(ROOT / "conf" / "lm" / f"{lm}.yaml"))
        if str(lm_cfg.get("arch", "causal")) == "seq2seq":
            return None
        pf = OmegaConf.load(ROOT / "conf" / "platform" / f"{platform}.yaml")
        dots = [o.removeprefix("platform.") for o in overrides if str(o).startswith("platform.")]
        pf = OmegaConf.to_container(OmegaConf.merge(pf, OmegaConf.from_dotlist(dots)))
        ecfg = measured_engine_config(pf)  # keyed as run_continuous keys its measurement
        name = str(lm_cfg.get("name", lm))
    except Exception:  # noqa: BLE001 - an unknown lm / platform fails in the cell itself, with its message
        return None
    return next((p for p in (capacity_cache(name, platform, ecfg), reference_capacity(name, platform, ecfg))
                 if p.is_file()), None)


def _portable(obj: Any, prefixes: list[tuple[str, str]]) -> Any:
    """``obj`` with every string that starts with one of ``prefixes``' paths rewritten to its placeholder."""
    if isinstance(obj, dict):
        return {k: _portable(v, prefixes) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_portable(v, prefixes) for v in obj]
    if isinstance(obj, str):
        for path, tag in prefixes:
            if obj == path or obj.startswith(path + os.sep):
                return tag + obj[len(path):]
    return obj


def config_sha256(cell_cfg: dict, cell_dir: Path | None = None) -> str:
    """sha256 of a cell's config, with paths under the sweep dir (``cell_dir/../..``) and the repository
    root written relative to them: the same sweep resumed from another checkout or output dir (the GPU box)
    hashes the same."""
    prefixes = []
    if cell_dir is not None:
        prefixes.append((str(Path(cell_dir).parent.parent), "<sweep>"))
    prefixes.append((str(ROOT), "<root>"))
    portable = _portable(json.loads(json.dumps(cell_cfg, default=str)), prefixes)
    return hashlib.sha256(json.dumps(portable, sort_keys=True).encode()).hexdigest()


def load_manifest(path: Path) -> dict[str, Any]:
    if path.is_file():
        try:
            m = json.loads(path.read_text())
            if isinstance(m.get("cells"), dict):
                return m
        except json.JSONDecodeError:
            pass
        log.warning("%s is unreadable: starting a new manifest (cells will be rerun)", path)
    return {"version": MANIFEST_VERSION, "cells": {}}


def _first_line(exc: BaseException) -> str:
    """One line naming the error: papermill's notebook errors carry the kernel's exception name/value."""
    ename, evalue = getattr(exc, "ename", None), getattr(exc, "evalue", None)
    text = f"{ename}: {evalue}" if ename else f"{type(exc).__name__}: {exc}"
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    return lines[0] if lines else type(exc).__name__


def preflight_real(lm: str, platform: str, nb03: dict | None = None) -> None:
    """A cell whose notebook 03 serves real requests fails at once, before any of its notebooks runs, with one
    line naming what this machine lacks: the platform's device (a GPU) or the LM's weights."""
    from rtlm_lab.lm.loader import check_weights, lm_config, resolve_device

    nb03 = nb03 or {}
    try:
        pf = OmegaConf.to_container(OmegaConf.load(ROOT / "conf" / "platform" / f"{platform}.yaml"), resolve=True)
        resolve_device({**pf, "threads": None})  # threads are the kernel's business, not this process's
        over = dict(nb03.get("lm_overrides") or {})
        if nb03.get("lm_dir"):
            over["local_dir"] = str(_resolve(nb03["lm_dir"]))
        check_weights(lm_config(lm, **over))
    except UserError as exc:
        raise UserError(f"notebook 03 in real mode: {exc}") from None


def run_cell(cell_cfg: dict, cell_dir: Path, kernel: str) -> None:
    """Run the three notebooks of one cell into ``cell_dir`` (cleared first). Raises on the first failure."""
    import papermill as pm

    logging.getLogger("papermill").setLevel(logging.WARNING)  # its per-notebook INFO lines drown the progress
    if cell_cfg["profile_sha256"] is None:
        raise UserError(f"no profile {cell_cfg['profile']}")
    if cell_cfg["scheduler_mode"] == "real":
        preflight_real(cell_cfg["lm"], cell_cfg["platform"], cell_cfg["parameters"][NOTEBOOKS[2]])
    if cell_dir.exists():
        shutil.rmtree(cell_dir)
    cell_dir.mkdir(parents=True)
    for nb, params in cell_cfg["parameters"].items():
        # papermill saves the executed notebook as it goes: into a hidden file, renamed when the notebook
        # ends (also on a failure, to keep the traceback), so <nb>.ipynb is never a half-written file
        partial, final = cell_dir / f".{nb}.partial.ipynb", cell_dir / f"{nb}.ipynb"
        try:
            pm.execute_notebook(str(ROOT / "notebooks" / f"{nb}.ipynb"), str(partial),
                                parameters=params, cwd=str(ROOT), kernel_name=kernel, progress_bar=False,
                                log_output=False)
        except Exception as exc:  # noqa: BLE001 - recorded with the notebook's name
            if partial.is_file():
                os.replace(partial, final)
            raise RuntimeError(f"{nb}: {_first_line(exc)}") from exc
        os.replace(partial, final)
        if not (Path(params.get("output_dir") or params["out_dir"]) / "metrics.json").is_file():
            raise RuntimeError(f"{nb}: finished without writing metrics.json")


class _Terminate(KeyboardInterrupt):
    """SIGTERM, handled as Ctrl-C."""


def _on_sigterm(signum, frame):  # noqa: ARG001
    raise _Terminate()


def run_sweep(cfg: DictConfig | dict, sweep_dir: Path | None = None,
              on_cell_done: Callable[[str, dict], None] | None = None) -> dict[str, Any]:
    """Run (or resume) a sweep; returns the manifest. ``on_cell_done(key, entry)`` is called after each cell
    is recorded (a hook for callers: progress, notifications)."""
    plain = OmegaConf.to_container(cfg, resolve=True) if isinstance(cfg, DictConfig) else dict(cfg)
    sweep = plain["sweep"]
    lms, platforms = [str(x) for x in sweep["lms"]], [str(x) for x in sweep["platforms"]]
    if not lms or not platforms:
        raise UserError("sweep.lms and sweep.platforms must each name at least one option")
    for group, names in (("lm", lms), ("platform", platforms)):
        for n in names:
            if n not in group_options(group):
                raise UserError(f"unknown {group} {n!r} in sweep.{group}s; choose from: "
                                f"{', '.join(group_options(group))}")
    unknown = sorted(set(sweep.get("by_platform") or {}) - set(platforms))
    if unknown:
        log.debug("sweep.by_platform names platform(s) not in this sweep: %s", ", ".join(unknown))
    for pf in platforms:
        for lm in lms:
            cell = (sweep.get("by_cell") or {}).get(f"{lm}/{pf}") or {}
            own = (sweep.get("by_platform") or {}).get(pf) or {}
            mode = platform_sweep(sweep, pf, lm).get("scheduler_mode", "sim")
            if str(mode) not in ("sim", "real"):
                where = (f"sweep.by_cell['{lm}/{pf}']" if "scheduler_mode" in cell
                         else f"sweep.by_platform.{pf}" if "scheduler_mode" in own else "sweep")
                raise UserError(f"{where}.scheduler_mode must be sim or real (got {mode!r})")
    sweep_dir = Path(sweep_dir) if sweep_dir else sweep_dir_of(str(sweep["name"]))
    sweep_dir.mkdir(parents=True, exist_ok=True)
    for k, v in (("RTLM_ROOT", str(ROOT)), ("HF_HUB_OFFLINE", "1"), ("TOKENIZERS_PARALLELISM", "false")):
        os.environ.setdefault(k, v)  # the kernels inherit them

    mpath = sweep_dir / MANIFEST
    manifest = load_manifest(mpath)
    prov = provenance(plain)
    manifest.update({"version": MANIFEST_VERSION, "name": str(sweep["name"]), "lms": lms, "platforms": platforms,
                     "provenance": prov})
    # one entry per invocation: where and when it ran and which cells it ran (a sweep resumed on another
    # machine, e.g. the GPU box, keeps both machines' records; each cell's metrics.json has its own provenance)
    invocation = {"started_utc": _now(), "machine": prov.get("machine"), "git_commit": prov.get("git_commit"),
                  "ran": [], "skipped": []}
    manifest.setdefault("invocations", []).append(invocation)
    cells = manifest["cells"]
    force, kernel = bool(sweep.get("force", False)), str(sweep.get("kernel", "python3"))
    todo = [(lm, pf) for lm in lms for pf in platforms]

    def save() -> None:
        manifest["updated_utc"] = _now()
        write_json_atomic(mpath, manifest)

    old_term = signal.signal(signal.SIGTERM, _on_sigterm) if _main_thread() else None
    try:
        for i, (lm, pf) in enumerate(todo, 1):
            key = f"{lm}/{pf}"
            cell_dir = sweep_dir / lm / pf
            ccfg = cell_config(sweep, lm, pf, cell_dir)
            digest = config_sha256(ccfg, cell_dir)
            prev = cells.get(key) or {}
            finished = all((cell_dir / nb / "metrics.json").is_file() for nb in NOTEBOOKS)
            if not force and prev.get("status") == "done" and prev.get("config_sha256") == digest and finished:
                print(f"[{i}/{len(todo)}] {key}: done before, skipped (sweep.force=true reruns it)", flush=True)
                invocation["skipped"].append(key)
                continue
            invocation["ran"].append(key)
            print(f"[{i}/{len(todo)}] {key}: running notebooks 01-03 into {cell_dir}", flush=True)
            entry = {"lm": lm, "platform": pf, "status": "running", "config_sha256": digest, "config": ccfg,
                     "dir": str(cell_dir.relative_to(sweep_dir)), "started_utc": _now(), "error": None}
            cells[key] = entry
            save()
            t0 = time.perf_counter()
            try:
                run_cell(ccfg, cell_dir, kernel)
                # every artefact of the cell with its sha256 (rtlm_lab.io.verify_run_manifest checks a cell dir)
                cell_manifest = write_run_manifest(cell_dir, {"cell": key, "config_sha256": digest})
                entry.update(status="done", manifest_sha256=sha256_file(cell_manifest))
            except KeyboardInterrupt:
                entry.update(status="interrupted", error="interrupted", duration_s=round(time.perf_counter() - t0, 1))
                raise
            except Exception as exc:  # noqa: BLE001 - a failing cell is recorded; the others go on
                entry.update(status="failed", error=str(exc).splitlines()[0] if str(exc) else type(exc).__name__)
                print(f"    {key} FAILED: {entry['error']}", flush=True)
            entry.update(finished_utc=_now(), duration_s=round(time.perf_counter() - t0, 1))
            save()
            if entry["status"] == "done":
                print(f"    {key}: done in {entry['duration_s']:.0f} s", flush=True)
            if on_cell_done is not None:
                on_cell_done(key, entry)
    finally:
        save()
        if old_term is not None:
            signal.signal(signal.SIGTERM, old_term)
    return manifest


def _main_thread() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()


def summary_table(manifest: dict, sweep_dir: Path) -> str:
    from rtlm_lab.report import cell_headline, format_plain_table

    rows = []
    for key in _ordered_keys(manifest):
        c = manifest["cells"][key]
        h = cell_headline(sweep_dir / c.get("dir", key)) if c.get("status") == "done" else {}
        secs = c.get("duration_s")
        rows.append({"lm": c["lm"], "platform": c["platform"], "status": c["status"],
                     "time_s": None if secs is None else int(round(secs)),
                     **{k: h.get(k) for k in ("spearman_total", "tau_rtlm", "rtlm_mean_rt_vs_fcfs")},
                     "error": c.get("error") or ""})
    return format_plain_table(rows)


def _ordered_keys(manifest: dict) -> list[str]:
    """Cells of the last run in its order (lm-major), then any older cells still in the manifest."""
    cur = [f"{lm}/{pf}" for lm in manifest.get("lms", []) for pf in manifest.get("platforms", [])]
    return [k for k in cur if k in manifest["cells"]] + sorted(k for k in manifest["cells"] if k not in cur)


@task_wrapper
def sweep_task(cfg: DictConfig) -> dict:
    """The body of ``rtlm-sweep`` (callable without the CLI, given a composed config)."""
    sweep_dir = sweep_dir_of(str(cfg.sweep.name))
    manifest = run_sweep(cfg, sweep_dir)
    current = [f"{lm}/{pf}" for lm in manifest["lms"] for pf in manifest["platforms"]]
    print(f"\nsweep {manifest['name']}: {sweep_dir}", flush=True)
    print(summary_table(manifest, sweep_dir), flush=True)
    if cfg.sweep.get("report", True):
        from rtlm_lab.report import build_report

        paths = build_report(sweep_dir)
        print(f"report: {paths['md']}\n        {paths['html']}", flush=True)
    failed = [k for k in current if manifest["cells"][k]["status"] != "done"]
    if failed:
        print(f"{len(failed)} of {len(current)} cell(s) failed: " +
              "; ".join(f"{k} ({manifest['cells'][k]['error']})" for k in failed), file=sys.stderr, flush=True)
        raise SystemExit(1)
    return manifest


main = make_main("sweep", sweep_task)

if __name__ == "__main__":
    main()
