"""One report over a sweep dir (``rtlm-sweep``'s output); its CLI is ``rtlm-report`` (:mod:`rtlm_lab.tasks.report`,
``conf/report.yaml``).

Reads ``<sweep>/manifest.json`` (or, without one, every ``<lm>/<platform>/`` that holds the notebooks'
``metrics.json`` files) and writes ``report.md`` and ``report.html`` (self-contained: tables and the headline
figure embedded; per-cell figures linked relatively) plus ``report_figures/headline.png``:

* the headline table, one row per (lm, platform) cell: Spearman of the total input uncertainty with the
  output length (notebook 01, bootstrap 95% CI), Kendall tau of RT-LM's length regressor on held-out
  conversations and of the best baseline (notebook 02), mean / p99 response time of RT-LM, SJF-proxy and
  the oracle normalised to FCFS (notebook 03);
* the same metrics as LM x platform matrices, and the failed cells with their errors;
* per cell: Spearman by uncertainty type, the regressor comparison, the scheduler table.

Timing-dependent columns (prediction microseconds, overhead shares) stay in the cells' ``metrics.json``
so that a report depends only on the results. Files are written atomically.
"""

from __future__ import annotations

import base64
import datetime as _dt
import html
import json
import math
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

NOTEBOOKS = ("01_uncertainty_latency", "02_length_regressor", "03_scheduler")
NB01, NB02, NB03 = NOTEBOOKS

HEADLINE_COLUMNS = [
    ("lm", "lm"), ("platform", "platform"), ("status", "status"), ("n", "n requests"),
    ("spearman_total", "Spearman(total unc., out tokens)"), ("spearman_total_ci", "Spearman 95% CI"),
    ("tau_rtlm", "tau RT-LM"), ("tau_rtlm_ci", "tau 95% CI"), ("best_baseline", "best baseline"),
    ("tau_best_baseline", "tau baseline"), ("scheduler_mode", "sched"), ("measured_on", "real runs on"),
    ("rtlm_mean_rt_vs_fcfs", "RT-LM mean RT / FCFS"), ("rtlm_p99_rt_vs_fcfs", "RT-LM p99 / FCFS"),
    ("sjf_proxy_mean_rt_vs_fcfs", "SJF-proxy mean / FCFS"), ("oracle_mean_rt_vs_fcfs", "oracle mean / FCFS"),
]
MATRICES = [("spearman_total", "Spearman of total input uncertainty with output tokens (notebook 01)"),
            ("tau_rtlm", "Kendall tau of RT-LM's length regressor, held-out conversations (notebook 02)"),
            ("rtlm_mean_rt_vs_fcfs", "RT-LM mean response time / FCFS (notebook 03)")]


# ----------------------------------------------------------------------------------------------- reading
def _read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None


def _num(v) -> float | None:
    try:
        f = float(v)
    except (TypeError, ValueError):
        return None
    return f if math.isfinite(f) else None


def _ci(lo, hi) -> str | None:
    lo, hi = _num(lo), _num(hi)
    return None if lo is None or hi is None else f"[{lo:.3f}, {hi:.3f}]"


def cell_metrics(cell_dir: Path) -> dict[str, dict | None]:
    return {nb: _read_json(Path(cell_dir) / nb / "metrics.json") for nb in NOTEBOOKS}


def cell_headline(cell_dir: Path, metrics: Mapping[str, dict | None] | None = None) -> dict[str, Any]:
    """The headline numbers of one cell (``None`` where a notebook's metrics are missing)."""
    m = metrics if metrics is not None else cell_metrics(cell_dir)
    out: dict[str, Any] = {}
    m1, m2, m3 = m.get(NB01), m.get(NB02), m.get(NB03)
    if m1:
        out["n"] = m1.get("n")
        tot = next((r for r in m1.get("spearman_table") or [] if r.get("type") == "total"), None)
        if tot:
            out["spearman_total"] = _num(tot.get("spearman"))
            out["spearman_total_ci"] = _ci(tot.get("ci_low"), tot.get("ci_high"))
    if m2:
        methods = m2.get("methods") or []
        ours = next((r for r in methods if str(r.get("method", "")).startswith("rtlm_")), None)
        if ours:
            out["tau_rtlm"] = _num(ours.get("kendall_tau"))
            out["tau_rtlm_ci"] = _ci(ours.get("tau_ci_low"), ours.get("tau_ci_high"))
        base = [r for r in methods if r.get("method") not in ("oracle", "constant")
                and not str(r.get("method", "")).startswith("rtlm_") and _num(r.get("kendall_tau")) is not None]
        if base:
            best = max(base, key=lambda r: _num(r["kendall_tau"]))
            out["best_baseline"], out["tau_best_baseline"] = best["method"], _num(best["kendall_tau"])
    if m3:
        out["scheduler_mode"] = m3.get("mode")
        out["measured_on"] = measured_on(m3)
        norm = {r["policy"]: r for r in (m3.get("normalized") or {}).get("fcfs") or []}
        # the oracle: preemptive SRPT on the continuous engine (the lower bound there), SJF on the static path
        oracle = m3.get("oracle") or ("oracle_srpt" if m3.get("engine") == "continuous" else "oracle_sjf")
        for pol, key in (("rtlm", "rtlm"), ("sjf_proxy", "sjf_proxy"), (oracle, "oracle")):
            if pol in norm:
                out[f"{key}_mean_rt_vs_fcfs"] = _num(norm[pol].get("mean_rt_s_vs_fcfs"))
                if pol == "rtlm":
                    out["rtlm_p99_rt_vs_fcfs"] = _num(norm[pol].get("p99_rt_s_vs_fcfs"))
    return out


def measured_on(m3: Mapping[str, Any]) -> str | None:
    """The hardware a real-mode notebook 03 served its requests on, from its provenance: the GPU's name on
    cuda (an H100 and an H200 give different numbers), the core count on the CPU; ``None`` for a simulation."""
    from rtlm_lab.io import run_gpu

    if m3.get("mode") != "real":
        return None
    if gpu := run_gpu(m3):  # the results table's rule for a run's GPU
        return str(gpu)
    machine = (m3.get("provenance") or {}).get("machine") or {}
    return f"{machine['cpu_count']}-core cpu" if machine.get("cpu_count") else None


def collect(sweep_dir: Path) -> dict[str, Any]:
    """Cells of a sweep dir: from ``manifest.json`` (status, errors) or, without one, from the folders."""
    sweep_dir = Path(sweep_dir)
    manifest = _read_json(sweep_dir / "manifest.json")
    cells = []
    if manifest and isinstance(manifest.get("cells"), dict):
        order = [f"{lm}/{pf}" for lm in manifest.get("lms", []) for pf in manifest.get("platforms", [])]
        keys = [k for k in order if k in manifest["cells"]] + sorted(k for k in manifest["cells"] if k not in order)
        for k in keys:
            c = manifest["cells"][k]
            cells.append({"key": k, "lm": c.get("lm", k.split("/")[0]), "platform": c.get("platform", k.split("/")[-1]),
                          "status": c.get("status", "?"), "error": c.get("error"),
                          "duration_s": c.get("duration_s"), "dir": sweep_dir / c.get("dir", k)})
    else:
        for d in sorted({p.parent.parent for p in sweep_dir.glob(f"*/*/{NB01}/metrics.json")}):
            cells.append({"key": f"{d.parent.name}/{d.name}", "lm": d.parent.name, "platform": d.name,
                          "status": "done", "error": None, "duration_s": None, "dir": d})
    for c in cells:
        c["metrics"] = cell_metrics(c["dir"]) if c["status"] == "done" else {nb: None for nb in NOTEBOOKS}
        c["headline"] = cell_headline(c["dir"], c["metrics"]) if c["status"] == "done" else {}
    return {"name": (manifest or {}).get("name", sweep_dir.name), "manifest": manifest, "cells": cells}


# ------------------------------------------------------------------------------------------------ tables
def _fmt(v) -> str:
    if v is None:
        return "–"
    if isinstance(v, float):
        return "–" if not math.isfinite(v) else f"{v:.3f}"
    return str(v)


def headline_rows(cells: Sequence[Mapping]) -> list[dict[str, Any]]:
    rows = []
    for c in cells:
        h = c["headline"]
        rows.append({label: (c[k] if k in ("lm", "platform", "status") else h.get(k)) for k, label in HEADLINE_COLUMNS})
    return rows


def _table(rows: Sequence[Mapping], columns: Sequence[str] | None = None) -> tuple[list[str], list[list[str]]]:
    cols = list(columns) if columns else list(dict.fromkeys(k for r in rows for k in r))
    return cols, [[_fmt(r.get(c)) for c in cols] for r in rows]


def _frame(rows: Sequence[Mapping], columns: Sequence[str] | None = None):
    """The formatted cells (:func:`_fmt`) as a DataFrame of strings; None when there are no columns."""
    import pandas as pd

    cols, body = _table(rows, columns)
    return pd.DataFrame(body, columns=cols, dtype=object) if cols else None


def md_table(rows: Sequence[Mapping], columns: Sequence[str] | None = None) -> str:
    """A Markdown (pipe) table, ``DataFrame.to_markdown`` (tabulate); cells are the formatted strings, so
    ``disable_numparse`` keeps them as written (tabulate would re-format numeric-looking text)."""
    df = _frame(rows, columns)
    if df is None:
        return "_(none)_"
    esc = lambda s: str(s).replace("|", "\\|").replace("\n", " ")  # noqa: E731
    return df.rename(columns=esc).map(esc).to_markdown(index=False, disable_numparse=True)


def html_table(rows: Sequence[Mapping], columns: Sequence[str] | None = None) -> str:
    """An HTML table, ``DataFrame.to_html`` (cells escaped)."""
    df = _frame(rows, columns)
    if df is None:
        return "<p><em>(none)</em></p>"
    return df.to_html(index=False, border=0)


def format_plain_table(rows: Sequence[Mapping], columns: Sequence[str] | None = None) -> str:
    """A fixed-width text table (the terminal summaries)."""
    cols, body = _table(rows, columns)
    if not cols:
        return "(no cells)"
    widths = [max(len(c), *(len(r[i]) for r in body)) if body else len(c) for i, c in enumerate(cols)]
    line = lambda vals: "  ".join(v.ljust(w) for v, w in zip(vals, widths)).rstrip()  # noqa: E731
    return "\n".join([line(cols), line(["-" * w for w in widths]), *(line(r) for r in body)])


def matrix_rows(cells: Sequence[Mapping], key: str) -> list[dict[str, Any]]:
    lms = list(dict.fromkeys(c["lm"] for c in cells))
    pfs = list(dict.fromkeys(c["platform"] for c in cells))
    by = {(c["lm"], c["platform"]): c for c in cells}
    rows = []
    for lm in lms:
        row: dict[str, Any] = {"lm": lm}
        for pf in pfs:
            c = by.get((lm, pf))
            row[pf] = None if c is None else (c["headline"].get(key) if c["status"] == "done" else c["status"])
        rows.append(row)
    return rows


def cell_detail_tables(c: Mapping) -> list[tuple[str, list[dict]]]:
    m1, m2, m3 = (c["metrics"].get(nb) for nb in NOTEBOOKS)
    out = []
    if m1:
        out.append((f"Spearman with output tokens by uncertainty score (n={m1.get('n')}, notebook 01)", [
            {"score": r.get("type"), "spearman": _num(r.get("spearman")), "95% CI": _ci(r.get("ci_low"), r.get("ci_high")),
             "partial (| input tokens)": _num(r.get("partial_spearman")), "p": _num(r.get("p_value"))}
            for r in m1.get("spearman_table") or []]))
    if m2:
        split = m2.get("split") or {}
        out.append((f"Output-length predictors on {split.get('n_test', '?')} held-out requests (notebook 02)", [
            {"method": r.get("method"), "kendall tau": _num(r.get("kendall_tau")),
             "95% CI": _ci(r.get("tau_ci_low"), r.get("tau_ci_high")), "spearman": _num(r.get("spearman")),
             "MAE tokens": _num(r.get("mae")), "pairwise acc": _num(r.get("pairwise_acc")),
             "bucket acc": _num(r.get("bucket_acc"))} for r in m2.get("methods") or []]))
    if m3:
        norm = {r["policy"]: r for r in (m3.get("normalized") or {}).get("fcfs") or []}
        out.append((f"Scheduler, {m3.get('mode')} mode, {m3.get('workload')} rho={m3.get('rho')}, "
                     f"n={m3.get('n_requests')} (notebook 03)", [
            {"policy": r.get("policy"), "mean RT s": _num(r.get("mean_rt_s")), "p50 RT s": _num(r.get("p50_rt_s")),
             "p99 RT s": _num(r.get("p99_rt_s")), "SLO miss": _num(r.get("slo_miss_rate")),
             # static path: mean batch size; continuous engine: mean requests running in a step
             "mean batch": _num(r.get("mean_batch_size", r.get("mean_running_seqs"))),
             "completed": r.get("n_completed"),
             "mean / FCFS": _num(norm.get(r.get("policy"), {}).get("mean_rt_s_vs_fcfs")),
             "p99 / FCFS": _num(norm.get(r.get("policy"), {}).get("p99_rt_s_vs_fcfs"))}
            for r in m3.get("table") or []]))
    return out


# ----------------------------------------------------------------------------------------------- figures
def headline_figure(cells: Sequence[Mapping], path: Path) -> Path | None:
    """Three panels over the finished cells: Spearman (CI), Kendall tau RT-LM vs best baseline (CI),
    mean response time / FCFS per policy."""
    done = [c for c in cells if c["status"] == "done" and c["headline"]]
    if not done:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    from rtlm_lab.io import write_png_atomic

    def label(c):
        mode = c["headline"].get("scheduler_mode")
        return f"{c['lm']}\n{c['platform']}" + (f" ({mode})" if mode else "")

    labels = [label(c) for c in done]
    x = np.arange(len(done))
    # one panel per row: a wide sweep (5 LMs x 2 platforms) stays readable
    fig, axes = plt.subplots(3, 1, figsize=(max(7.0, 1.05 * len(done) + 2), 10.5))

    def err(key_ci, vals):
        lo, hi = [], []
        for c, v in zip(done, vals):
            ci = c["headline"].get(key_ci)
            if ci and v is not None and not math.isnan(v):
                a, b = (float(s) for s in ci.strip("[]").split(","))
                lo.append(max(0.0, v - a)), hi.append(max(0.0, b - v))
            else:
                lo.append(0.0), hi.append(0.0)
        return np.array([lo, hi])

    def vals(key):
        return [c["headline"].get(key) if c["headline"].get(key) is not None else float("nan") for c in done]

    ax = axes[0]
    v = vals("spearman_total")
    ax.bar(x, v, yerr=err("spearman_total_ci", v), capsize=3, color="#4c72b0")
    ax.set_title("Spearman: total input uncertainty vs output tokens", fontsize=9)
    ax = axes[1]
    v1, v2 = vals("tau_rtlm"), vals("tau_best_baseline")
    ax.bar(x - 0.2, v1, 0.4, yerr=err("tau_rtlm_ci", v1), capsize=3, label="RT-LM regressor", color="#dd8452")
    ax.bar(x + 0.2, v2, 0.4, label="best baseline", color="#8c8c8c")
    ax.set_title("Kendall tau, predicted vs true length (held out)", fontsize=9)
    ax.legend(fontsize=7)
    ax = axes[2]
    pols = [("rtlm", "RT-LM", "#c44e52"), ("sjf_proxy", "SJF-proxy", "#55a868"),
            ("oracle", "oracle (SRPT / SJF)", "#8172b2")]
    w = 0.8 / len(pols)
    for i, (k, name, col) in enumerate(pols):
        ax.bar(x - 0.4 + w * (i + 0.5), vals(f"{k}_mean_rt_vs_fcfs"), w, label=name, color=col)
    ax.axhline(1.0, color="k", lw=0.8, ls="--")
    ratios = [r for k, _, _ in pols for r in vals(f"{k}_mean_rt_vs_fcfs") if r is not None and r > 0]
    if ratios and max(ratios) / min(ratios) > 20:
        from matplotlib.ticker import FixedLocator, FuncFormatter, NullFormatter

        ax.set_yscale("log")  # ratios from 0.1x to 10x: equal distances for halving and doubling
        ax.yaxis.set_major_locator(FixedLocator([0.05, 0.1, 0.2, 0.5, 1, 2, 5, 10, 20, 50]))
        ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}x"))
        ax.yaxis.set_minor_formatter(NullFormatter())
    ax.set_title("mean response time / FCFS (notebook 03; below the dashed line = faster than FCFS)", fontsize=9)
    ax.legend(fontsize=7)
    for ax in axes:
        ax.set_xticks(x, labels, fontsize=7)
        if ax.get_yscale() == "linear":
            ax.axhline(0.0, color="k", lw=0.5)
    fig.tight_layout()
    return write_png_atomic(fig, path)


# ------------------------------------------------------------------------------------------------ report
CSS = ("body{font-family:system-ui,sans-serif;max-width:1200px;margin:2em auto;padding:0 1em;color:#222}"
       "table{border-collapse:collapse;margin:.5em 0 1.5em;font-size:13px}th,td{border:1px solid #ccc;"
       "padding:3px 7px;text-align:right}th{background:#f3f3f3}td:first-child,th:first-child{text-align:left}"
       "img{max-width:100%}.meta{color:#666;font-size:13px}h3{margin-top:1.6em}")


CELL_FIGURES = ((NB01, ("spearman", "output_by_uncertainty", "latency_fit")), (NB02, ("comparison",)),
                (NB03, ("response_cdf", "rt_vs_rho")))


def copy_cells(cells: Sequence[dict], sweep_dir: Path, out_dir: Path) -> None:
    """Copy each done cell's ``metrics.json`` files and headline figures (not the executed notebooks, not the
    scheduler's per-request files) to ``out_dir/<lm>/<platform>/``, plus the sweep's ``manifest.json``: a
    small copy of a sweep's results (to keep or commit), laid out as a sweep dir, so
    that ``rtlm-report`` rebuilds the same tables from it. Cells' ``dir`` then point at the copies. A file of
    those names that an earlier copy left and the cell no longer has is removed."""
    from rtlm_lab.io import copy_file_atomic

    if (sweep_dir / "manifest.json").is_file():
        copy_file_atomic(sweep_dir / "manifest.json", out_dir / "manifest.json")
    for c in cells:
        if c["status"] != "done":
            continue
        dst = out_dir / c["dir"].relative_to(sweep_dir) if c["dir"].is_relative_to(sweep_dir) else \
            out_dir / c["lm"] / c["platform"]
        for nb, stems in CELL_FIGURES:
            for name in ("metrics.json", *(f"{s}.png" for s in stems)):
                if (c["dir"] / nb / name).is_file():
                    copy_file_atomic(c["dir"] / nb / name, dst / nb / name)
                else:  # a rerun cell that no longer makes it: an earlier copy's file would be linked as its own
                    (dst / nb / name).unlink(missing_ok=True)
        c["dir"] = dst


def build_report(sweep_dir: str | Path, out_dir: str | Path | None = None, figures: bool = True,
                 copy: bool = False) -> dict[str, Any]:
    """Write ``report.md``, ``report.html`` (and ``report_figures/headline.png``); returns their paths, the
    headline rows and the cells. ``copy=True`` (``rtlm-report copy=true``) also copies the cells' metrics and
    figures next to the report (:func:`copy_cells`) and links those."""
    from rtlm_lab.io import write_text_atomic

    sweep_dir = Path(sweep_dir).resolve()
    out_dir = Path(out_dir).resolve() if out_dir else sweep_dir
    data = collect(sweep_dir)
    cells = data["cells"]
    if copy and out_dir != sweep_dir:
        copy_cells(cells, sweep_dir, out_dir)
    if not cells:
        from rtlm_lab.errors import UserError

        raise UserError(f"{sweep_dir} holds no sweep cells (no manifest.json, no <lm>/<platform>/{NB01}/metrics.json)")
    n_done = sum(c["status"] == "done" for c in cells)
    failed = [c for c in cells if c["status"] != "done"]
    head = headline_rows(cells)
    fig = headline_figure(cells, out_dir / "report_figures" / "headline.png") if figures else None
    now = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")

    def rel(p: Path) -> str:
        try:
            return str(Path(p).resolve().relative_to(out_dir))
        except ValueError:
            return str(Path(p).resolve())

    # sections: (kind, payload); kind in h1 h2 h3 p meta table img link
    S: list[tuple[str, Any]] = [("h1", f"Sweep report: {data['name']}"),
                                ("meta", f"Generated {now} from {sweep_dir}"),
                                ("p", f"{len(cells)} cell(s): {n_done} done, {len(failed)} not done. Metrics from each "
                                      f"cell's notebooks 01-03 (metrics.json); timing-dependent columns (prediction "
                                      f"cost, overhead share) are left in those files."),
                                ("h2", "Headline"), ("table", head)]
    if fig:
        S.append(("img", fig))
    S.append(("h2", "LM x platform"))
    for key, title in MATRICES:
        S += [("h3", title), ("table", matrix_rows(cells, key))]
    if failed:
        S += [("h2", "Cells not done"),
              ("table", [{"lm": c["lm"], "platform": c["platform"], "status": c["status"], "error": c["error"]}
                         for c in failed])]
    S.append(("h2", "Cells"))
    for c in cells:
        if c["status"] != "done":
            continue
        S.append(("h3", f"{c['lm']} on {c['platform']}"))
        for title, rows in cell_detail_tables(c):
            S += [("p", title), ("table", rows)]
        links = [(f"{nb} notebook", c["dir"] / f"{nb}.ipynb") for nb in NOTEBOOKS
                 if (c["dir"] / f"{nb}.ipynb").is_file()]
        links += [(p.stem, p) for nb, stems in CELL_FIGURES
                  for p in (c["dir"] / nb / f"{s}.png" for s in stems) if p.is_file()]
        S.append(("links", links))

    md, body = [], []
    for kind, x in S:
        if kind in ("h1", "h2", "h3"):
            lvl = int(kind[1])
            md.append("#" * lvl + " " + x)
            body.append(f"<{kind}>{html.escape(x)}</{kind}>")
        elif kind in ("p", "meta"):
            md.append(f"_{x}_" if kind == "meta" else x)
            body.append(f"<p class='{kind}'>{html.escape(x)}</p>")
        elif kind == "table":
            md.append(md_table(x))
            body.append(html_table(x))
        elif kind == "img":
            md.append(f"![headline]({rel(x)})")
            b64 = base64.b64encode(Path(x).read_bytes()).decode()
            body.append(f"<p><img alt='headline' src='data:image/png;base64,{b64}'></p>")
        elif kind == "links":
            md.append("Files: " + ", ".join(f"[{name}]({rel(p)})" for name, p in x))
            body.append("<p>Files: " + ", ".join(f"<a href='{html.escape(rel(p))}'>{html.escape(name)}</a>"
                                                  for name, p in x) + "</p>")
        md.append("")
    md_path = write_text_atomic(out_dir / "report.md", "\n".join(md))
    page = (f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>Sweep report: {html.escape(data['name'])}"
            f"</title><style>{CSS}</style></head><body>\n" + "\n".join(body) + "\n</body></html>\n")
    html_path = write_text_atomic(out_dir / "report.html", page)
    return {"md": md_path, "html": html_path, "figure": fig, "headline": head, "cells": cells}


def report_tables(md_text: str) -> list[str]:
    """The table lines of a report.md (what stays equal between two runs of the same sweep)."""
    return [ln for ln in md_text.splitlines() if ln.startswith("|")]


def resolve_sweep_dir(arg: str) -> Path:
    from rtlm_lab.paths import outputs_dir

    p = Path(arg).expanduser()
    if p.is_dir():
        return p
    named = outputs_dir() / "sweeps" / arg
    if "/" not in arg and named.is_dir():
        return named
    from rtlm_lab.errors import UserError

    raise UserError(f"no sweep dir {arg!r} (neither a folder nor {named}); run `rtlm-sweep sweep.name={arg}` first")


# ------------------------------------------------------------------------ the scheduler tables in the pages
# The analysis builds tables (rtlm_lab.scheduler.analysis); only this side writes them into the pages, between
# `<!-- NAME:begin -->` and `<!-- NAME:end -->` markers that a page may hold or not.
def markers(name: str) -> tuple[str, str]:
    return f"<!-- {name}:begin -->", f"<!-- {name}:end -->"


def fill_markers(doc: str | Path, name: str, body: str) -> bool:
    """Put ``body`` between ``name``'s markers in ``doc`` (atomically); ``False`` (nothing written) where the file
    or either marker is missing."""
    from rtlm_lab.io import write_text_atomic

    doc = Path(doc)
    if not doc.is_file():
        return False
    text = doc.read_text()
    begin, end = markers(name)
    if begin not in text or end not in text or text.index(begin) > text.index(end):
        return False
    a, b = text.index(begin) + len(begin), text.index(end)
    write_text_atomic(doc, text[:a] + "\n" + body.strip("\n") + "\n" + text[b:])
    return True


# What the pages say where outputs/reference/scheduler/runs/ holds no group (each relative to its own page).
NO_GROUPS_README = ("No real run group meets the protocol yet, so there is no table: the earlier groups failed it and "
                    "were removed ([docs/results.md](docs/results.md#removed-groups)).")
NO_GROUPS_RESULTS = ("No run group meets the protocol yet, so there is no table: the earlier groups failed it and "
                     "were removed ([removed groups](#removed-groups)).")


def write_scheduler_docs(df=None, root: str | Path | None = None, repo: str | Path | None = None) -> list[Path]:
    """The committed scheduler results in the pages: the results table (``df``, as
    :func:`rtlm_lab.scheduler.analysis.build` returns it; ``None``: read from ``root``'s ``summary.csv``) in full in
    ``docs/results.md`` and as the headline in ``README.md`` (markers ``scheduler-summary``), and the closing-FCFS
    drift of ``root``'s groups in ``docs/results.md`` (markers ``fcfs-drift``). An empty table (no group under
    ``root/runs/``) puts one line in both pages saying so. ``root``: default ``outputs/reference/scheduler``;
    ``repo``: the checkout whose pages are written (default: this one). Returns the pages written. From a shell:
    ``python -c "from rtlm_lab.report import write_scheduler_docs; write_scheduler_docs()"`` after
    ``rtlm-reference target=scheduler``."""
    import pandas as pd

    from rtlm_lab.paths import ROOT
    from rtlm_lab.scheduler.analysis import (drift_attempts, fcfs_drift, format_drift, format_headline,
                                             format_summary, has_groups, reference_root)

    root = Path(root) if root else reference_root()
    if df is None:
        from rtlm_lab.errors import UserError

        if (root / "summary.csv").is_file():
            df = pd.read_csv(root / "summary.csv")
            for c in ("gpu", "oracle", "seeds"):  # empty text columns read back as NaN
                if c in df:
                    df[c] = df[c].fillna("").astype(str)
        elif has_groups(root):
            raise UserError(f"no {root / 'summary.csv'}: run `rtlm-reference target=scheduler` first")
        else:
            df = pd.DataFrame()
    repo = Path(repo) if repo else ROOT
    results, readme = repo / "docs" / "results.md", repo / "README.md"
    done = []
    if fill_markers(results, "scheduler-summary", NO_GROUPS_RESULTS if df.empty else format_summary(df)):
        done.append(results)
    att = drift_attempts(root)
    if fill_markers(results, "fcfs-drift", format_drift(fcfs_drift(root), att[~att["kept"]])) and results not in done:
        done.append(results)
    if fill_markers(readme, "scheduler-summary", NO_GROUPS_README if df.empty else format_headline(df)):
        done.append(readme)
    return done
