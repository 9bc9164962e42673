"""Commit-ready reference profiles: ``outputs/reference/profiles/``.

``rtlm-reference target=profiles target.runs=[RUN_DIR,...]`` (:func:`rebuild`) copies each run's ``profile.parquet`` to
``<lm>__<platform>.parquet`` with a ``<lm>__<platform>.provenance.json`` (the run's config, commit, date,
machine, versions and summary), then rebuilds ``summary.csv`` (one row per LM x platform) and prints it
as a Markdown table for the README. With no run dirs it just rebuilds the summary.
"""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd

from rtlm_lab.io import atomic_path, copy_file_atomic, sha256_file, write_json_atomic
from rtlm_lab.paths import reference_dir
from rtlm_lab.profiling.summary import SUMMARY_COLUMNS, summarize, summary_row

EXTRA_COLUMNS = ["capped_share", "capped_loop_share", "mean_e2e_s", "latency_r2", "batch_size"]


def ref_profiles_dir() -> Path:
    return reference_dir() / "profiles"


def add_run(run_dir: str | Path, out_dir: Path | None = None) -> Path:
    """Copy one finished run into the reference folder (atomically), with its provenance."""
    run_dir = Path(run_dir)
    out_dir = out_dir or ref_profiles_dir()
    df = pd.read_parquet(run_dir / "profile.parquet")
    meta = json.loads((run_dir / "summary.json").read_text())
    lm, platform = df["lm"].iloc[0], df["platform"].iloc[0]
    target = out_dir / f"{lm}__{platform}.parquet"
    copy_file_atomic(run_dir / "profile.parquet", target)
    write_json_atomic(out_dir / f"{lm}__{platform}.provenance.json", {
        "source_run": str(run_dir), "sha256": sha256_file(target), "n": int(len(df)), **meta})
    return target


def build_summary(out_dir: Path | None = None) -> pd.DataFrame:
    """``summary.csv`` over every reference profile (columns: SUMMARY_COLUMNS + a few extras)."""
    out_dir = out_dir or ref_profiles_dir()
    rows = []
    for path in sorted(out_dir.glob("*__*.parquet")):
        df = pd.read_parquet(path)
        s = {**summarize(df), "lm": df["lm"].iloc[0], "platform": df["platform"].iloc[0]}
        rows.append({**summary_row(s), "capped_share": s["capped_share"], "capped_loop_share": s["capped_loop_share"],
                     "mean_e2e_s": s["mean_e2e_s"], "latency_r2": s["latency_fit"]["r2"],
                     "batch_size": int(df["batch_size"].max())})
    table = pd.DataFrame(rows, columns=SUMMARY_COLUMNS + EXTRA_COLUMNS)
    with atomic_path(out_dir / "summary.csv") as tmp:
        table.round(4).to_csv(tmp, index=False)
    return table


def cross_platform_agreement(out_dir: Path | None = None) -> pd.DataFrame:
    """Greedy output lengths of the same requests on cpu and cuda (``agreement.csv``)."""
    out_dir = out_dir or ref_profiles_dir()
    rows = []
    for cpu_path in sorted(out_dir.glob("*__cpu.parquet")):
        cuda_path = cpu_path.with_name(cpu_path.name.replace("__cpu", "__cuda"))
        if not cuda_path.exists():
            continue
        a, b = pd.read_parquet(cpu_path), pd.read_parquet(cuda_path)
        m = a.merge(b, on="request_id", suffixes=("_cpu", "_cuda"))
        diff = (m["n_output_tokens_cpu"] - m["n_output_tokens_cuda"]).abs()
        rows.append({"lm": a["lm"].iloc[0], "n_common": int(len(m)), "identical_share": float((diff == 0).mean()),
                     "mean_abs_diff_tokens": float(diff.mean()), "max_abs_diff_tokens": int(diff.max()),
                     "same_reply_share": float((m["reply_cpu"] == m["reply_cuda"]).mean())})
    table = pd.DataFrame(rows)
    if len(table):
        with atomic_path(out_dir / "agreement.csv") as tmp:
            table.round(4).to_csv(tmp, index=False)
    return table


def markdown(table: pd.DataFrame) -> str:
    """The README table: LMs as rows, platforms side by side (``DataFrame.to_markdown``)."""
    rows = [{"lm": r["lm"], "platform": r["platform"], "n": int(r["n"]), "batch": int(r["batch_size"]),
             "mean out tok": f"{r['mean_out_tokens']:.1f}", "p50": f"{r['p50_out_tokens']:.0f}",
             "p99": f"{r['p99_out_tokens']:.0f}",
             "capped (loops)": f"{100 * r['capped_share']:.1f}% ({100 * r['capped_loop_share']:.0f}%)",
             "TTFT ms": f"{r['ttft_ms']:.0f}", "ms/token": f"{r['ms_per_token']:.1f}"}
            for _, r in table.sort_values(["lm", "platform"]).iterrows()]
    cols = ["lm", "platform", "n", "batch", "mean out tok", "p50", "p99", "capped (loops)", "TTFT ms", "ms/token"]
    return pd.DataFrame(rows, columns=cols).to_markdown(index=False, disable_numparse=True)


def agreement_markdown(agreement: pd.DataFrame) -> str:
    """The cpu/cuda agreement table of the README (``DataFrame.to_markdown``)."""
    rows = [{"lm": r["lm"], "common requests": int(r["n_common"]),
             "identical length": f"{100 * r['identical_share']:.1f}%",
             "identical reply": f"{100 * r['same_reply_share']:.1f}%",
             "mean abs diff (tokens)": f"{r['mean_abs_diff_tokens']:.2f}"} for _, r in agreement.iterrows()]
    return pd.DataFrame(rows).to_markdown(index=False, disable_numparse=True)


def rebuild(run_dirs: list[str | Path] = ()) -> str:
    """Add each finished ``rtlm-profile`` run dir, rebuild ``summary.csv`` (and ``agreement.csv``); return the
    README tables (summary, then the cpu/cuda agreement when both platforms are present) as Markdown."""
    for d in run_dirs:
        print("added", add_run(d))
    text = markdown(build_summary())
    agreement = cross_platform_agreement()
    if len(agreement):
        text += "\n\n" + agreement_markdown(agreement)
    return text
