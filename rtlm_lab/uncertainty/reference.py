"""Committed reference of the uncertainty analysis: ``outputs/reference/uncertainty/``.

Gathers the ``metrics.json`` of several ``rtlm-uncertainty`` runs (one per LM x platform) into

* ``summary.csv``: columns :data:`SUMMARY_COLUMNS` (one row per lm x platform x type; input length is
  the ``n_input_tokens`` baseline row), sorted by lm, platform and the type order of
  :data:`rtlm_lab.uncertainty.analysis.FEATURES`;
* ``spearman_heatmap.png`` / ``.svg``: type x LM heatmap of rho (columns are ``lm / platform`` when
  several platforms are present);
* ``provenance.json``: creation date, commit, machine, versions, and per source run its metrics path,
  sha256, n, n_bootstrap and the profile it came from.

Usage::

    rtlm-reference target=uncertainty target.runs=[outputs/uncertainty/gemma3_270m/cpu,outputs/uncertainty/smollm2_135m/cpu]
    rtlm-reference target=uncertainty            # every outputs/uncertainty/*/*/metrics.json
    rtlm-reference target=uncertainty target.runs=[RUN,...] target.out=DIR

Runs may be run dirs or ``metrics.json`` files. When two sources carry the same (lm, platform),
the later argument wins (a warning is logged), so a summary never double-counts a model.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Iterable

import pandas as pd

from rtlm_lab.errors import UserError

log = logging.getLogger(__name__)

SUMMARY_COLUMNS = ["lm", "platform", "type", "spearman", "ci_low", "ci_high", "partial_spearman"]


def _metrics_path(p: str | Path) -> Path:
    p = Path(p)
    if p.is_dir():
        p = p / "metrics.json"
    if not p.is_file():
        raise UserError(f"no metrics.json at {p}; run `rtlm-uncertainty lm=.. platform=..` first")
    return p


def default_sources() -> list[Path]:
    """Every ``<outputs>/uncertainty/<lm>/<platform>/metrics.json``."""
    from rtlm_lab.paths import outputs_dir

    return sorted((outputs_dir() / "uncertainty").glob("*/*/metrics.json"))


def build_reference(metrics_paths: Iterable[str | Path], out_dir: str | Path | None = None) -> pd.DataFrame:
    """Write ``summary.csv``, the heatmap and ``provenance.json`` into ``out_dir``; return the summary.

    ``out_dir`` defaults to ``outputs/reference/uncertainty`` of the repository.
    """
    from rtlm_lab.io import provenance, sha256_file, write_json_atomic, write_text_atomic
    from rtlm_lab.paths import reference_dir
    from rtlm_lab.uncertainty.analysis import FEATURES, table_from_metrics

    out_dir = Path(out_dir) if out_dir else reference_dir() / "uncertainty"
    paths = [_metrics_path(p) for p in metrics_paths]
    if not paths:
        raise UserError("no metrics.json given or found under outputs/uncertainty/; run rtlm-uncertainty first")
    tables: dict[tuple[str, str], pd.DataFrame] = {}
    sources = []
    for p in paths:
        try:
            metrics = json.loads(p.read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise UserError(f"cannot read {p}: {exc}") from exc
        table = table_from_metrics(metrics)
        if table.empty:
            raise UserError(f"{p} has no spearman_table; rerun rtlm-uncertainty")
        key = (str(metrics.get("lm")), str(metrics.get("platform")))
        if key in tables:
            log.warning("%s / %s given twice; keeping %s", *key, p)
        tables[key] = table
        prov = metrics.get("provenance") or {}
        sources.append({"metrics": str(p), "sha256": sha256_file(p), "lm": key[0], "platform": key[1],
                        "n": metrics.get("n"), "n_bootstrap": metrics.get("n_bootstrap"),
                        "profile": prov.get("profile"), "profile_sha256": prov.get("profile_sha256"),
                        "git_commit": prov.get("git_commit")})
    full = pd.concat(tables.values(), ignore_index=True)
    order = {t: i for i, t in enumerate(FEATURES)}
    full = (full.assign(_o=full["type"].map(order).fillna(len(order)))
            .sort_values(["lm", "platform", "_o"], kind="stable").drop(columns="_o").reset_index(drop=True))
    summary = full[SUMMARY_COLUMNS]
    out_dir.mkdir(parents=True, exist_ok=True)
    write_text_atomic(out_dir / "summary.csv", summary.to_csv(index=False, float_format="%.4f"))

    import matplotlib

    matplotlib.use("Agg")
    from rtlm_lab.uncertainty.figures import plot_spearman_heatmap

    plot_spearman_heatmap(full, out_dir)
    write_json_atomic(out_dir / "provenance.json",
                      provenance(None, sources=sources, files=["summary.csv", "spearman_heatmap.png",
                                                               "spearman_heatmap.svg"]))
    return summary
