"""Does input uncertainty predict the *spread* of a prompt's reply lengths rather than their mean? (issue 34)

Under sampled decoding a prompt has a length *distribution*: ``rtlm-spread`` (``spread.parquet``, one row per
prompt) replies each prompt ``K`` times under the LM's chat sampling and records ``len_mean``, ``len_sd``,
``len_iqr`` (q75 - q25), quantiles and the EOS rate. :func:`spread_table` asks, for each uncertainty measure,
whether it ranks the prompts by the **spread** of their lengths (``len_sd``, ``len_iqr``) and, for comparison,
by their **mean** (``len_mean``):

* the measures are those of :mod:`rtlm_lab.uncertainty.modelside`: the six linguistic types of
  :func:`rtlm_lab.uncertainty.quantify` and their ``total`` (input side), the served LM's prefill entropy and
  log P(end of turn) where its prefill states are available (model side), and ``log_input_tokens`` (baseline);
* the statistics are :func:`~rtlm_lab.uncertainty.modelside.model_input_table`'s, once per target: Spearman
  rho, the partial Spearman controlling for (the rank of) input length, and 95% percentile CIs from a
  cluster bootstrap over conversations (the same seeded resamples for every measure and target).

A measure whose partial rho with ``len_sd`` is ~0 carries nothing about the spread beyond input length; the
``len_mean`` rows say whether it does better for the mean, where the greedy analysis found partial rho ~0.

Inputs: one or more spread parquet files (the committed ones: ``outputs/reference/profiles/spread/
<lm>__<platform>__<split>.parquet``, found by :func:`find_spread`; several are concatenated, e.g. the train and
test turns). Model-side states come from the shared ``data/cache/lmstate`` cache (key: the spread file's
sha256); with ``loader=None`` they are used only when cached (no LM is loaded), given a loader they are
computed on a miss.

Outputs: :data:`COLUMNS` (``spread_table.csv``), :func:`plot_spread` (``spread_table.png`` / ``.svg``, a
measure x target heatmap of the partial rho) and :func:`format_spread` (console).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import pandas as pd

from rtlm_lab.errors import UserError
from rtlm_lab.uncertainty import modelside

log = logging.getLogger("rtlm_lab.uncertainty")

#: The per-prompt statistics of the sampled lengths the measures are ranked against (spread first). Lengths are
#: positive, so a prompt with a longer mean tends to have a larger sd too: ``len_cv`` (sd / mean, computed here)
#: asks for spread *relative to* the mean, which a measure that only ranks means does not predict.
TARGETS: tuple[str, ...] = ("len_sd", "len_iqr", "len_cv", "len_mean")
#: ``spread_table.csv``: modelside's columns with ``target`` after ``platform``.
COLUMNS = ["lm", "platform", "target", *modelside.COLUMNS[2:]]
#: A spread profile must have these (``rtlm-spread`` writes them; ``n_input_tokens`` since commit 2b8aef8).
REQUIRED = ("text", "n_input_tokens", "len_sd", "len_iqr", "len_mean")
SPLITS = ("test", "train")
FILE_NAME = "spread_table"


# ------------------------------------------------------------------------------------------------ input
def spread_dir(root: str | Path | None = None) -> Path:
    """Where the committed spread profiles live: ``<reference>/profiles/spread``."""
    from rtlm_lab.paths import reference_dir

    return (Path(root) if root else reference_dir()) / "profiles" / "spread"


def find_spread(lm: str, platform: str, root: str | Path | None = None) -> list[Path]:
    """The committed spread profiles of ``lm``: ``<lm>__<platform>__<split>.parquet`` for each split present
    (test first); when ``platform`` has none, those of another platform (a length distribution is the LM's
    sampling, not the device's: the committed ones are cuda). ``[]`` when there is none."""
    d = spread_dir(root)
    mine = [d / f"{lm}__{platform}__{s}.parquet" for s in SPLITS]
    if any(p.is_file() for p in mine):
        return [p for p in mine if p.is_file()]
    for plat in sorted({p.name.split("__")[1] for p in d.glob(f"{lm}__*__*.parquet")}):
        found = [d / f"{lm}__{plat}__{s}.parquet" for s in SPLITS if (d / f"{lm}__{plat}__{s}.parquet").is_file()]
        if found:
            return found
    return []


def read_spread(path: str | Path) -> pd.DataFrame:
    """One spread profile; a missing, unreadable or foreign file is a one-line :class:`UserError`."""
    p = Path(path)
    if not p.is_file():
        raise UserError(f"no spread profile at {p}; run `rtlm-spread lm=.. data.split=..` first")
    try:
        df = pd.read_parquet(p)
    except Exception as exc:  # noqa: BLE001 - a corrupt / non-parquet file is a user mistake
        raise UserError(f"cannot read spread profile {p}: {type(exc).__name__}: {exc}".splitlines()[0]) from exc
    missing = [c for c in REQUIRED if c not in df.columns]
    if missing:
        raise UserError(f"{p} is not a spread profile (rtlm-spread's spread.parquet): missing column(s) "
                        f"{', '.join(missing)}")
    if len(df) == 0:
        raise UserError(f"spread profile {p} has no rows")
    return df


# -------------------------------------------------------------------------------------------- statistics
def spread_frame(spread_df: pd.DataFrame, states=None, scores: pd.DataFrame | None = None) -> pd.DataFrame:
    """:func:`~rtlm_lab.uncertainty.modelside.measure_frame` of the prompts (model-side columns only with
    ``states``) plus ``conv_id`` and the :data:`TARGETS`."""
    df = spread_df.reset_index(drop=True)
    frame = modelside.measure_frame(df, states, scores)
    for c in TARGETS:
        if c in df.columns:
            frame[c] = df[c].astype(float).to_numpy()
    return _with_cv(frame)


def _with_cv(frame: pd.DataFrame) -> pd.DataFrame:
    """``len_cv`` = ``len_sd`` / ``len_mean`` (0 where the mean is 0), added when missing."""
    if "len_cv" not in frame.columns:
        mean = frame["len_mean"].astype(float).to_numpy()
        frame = frame.assign(len_cv=np.where(mean > 0, frame["len_sd"].astype(float).to_numpy()
                                             / np.where(mean > 0, mean, 1.0), 0.0))
    return frame


def spread_table(frame: pd.DataFrame, groups: Sequence[Any] | None = None, n_bootstrap: int = 1000,
                 seed: int = 0, lm: str = "?", platform: str = "?") -> pd.DataFrame:
    """:data:`COLUMNS`: per target of :data:`TARGETS` and measure, Spearman and partial Spearman | input length
    with cluster-bootstrap CIs (``groups``: conversation of each row; ``None``: rows)."""
    parts = []
    frame = _with_cv(frame)
    for target in TARGETS:
        t = modelside.model_input_table(frame, n_bootstrap=n_bootstrap, seed=seed, lm=lm, platform=platform,
                                        groups=groups, target=target)
        parts.append(t.assign(target=target))
    return pd.concat(parts, ignore_index=True)[COLUMNS]


class _NotCached(Exception):
    pass


def _cache_only():
    raise _NotCached


def spread_study(paths: str | Path | Sequence[str | Path], lm: str | None = None, platform: str | None = None,
                 loader: Callable[[], Any] | Any = None, n_bootstrap: int = 1000, seed: int = 0,
                 batch_size: int = 16, out_dir: str | Path | None = None, figure: bool = True) -> dict[str, Any]:
    """The spread table of one LM's spread profile(s): ``{"table", "frame", "paths", "lm", "platform", "n",
    "model_side"}``; ``out_dir``: also ``spread_table.csv`` and (``figure``) the heatmap there.

    ``lm`` / ``platform``: whose prefill states are looked up (computed by ``loader`` on a cache miss; default:
    the profile's ``lm`` / ``platform`` columns). The table is labelled with the profile's own ``lm`` and
    ``platform`` (where the lengths were sampled); a profile of another LM than ``lm`` is analysed as that LM's,
    without ``loader`` (a warning). ``loader=None``: model-side measures only when every file's states are
    cached."""
    from rtlm_lab.metrics import conversation_ids

    paths = [Path(paths)] if isinstance(paths, (str, Path)) else [Path(p) for p in paths]
    if not paths:
        raise UserError("no spread profile given")
    dfs = [read_spread(p) for p in paths]
    df = pd.concat(dfs, ignore_index=True)
    lm_label, plat_label = (("+".join(sorted(df[c].astype(str).unique())) if c in df.columns else None)
                            for c in ("lm", "platform"))
    if lm and lm_label and lm_label != lm:
        log.warning("spread profile %s holds lm=%s, not %s: labelled %s, model-side measures only from %s's "
                    "cached states", paths[0], lm_label, lm, lm_label, lm_label)
        loader = None
    lm = lm_label or lm or "?"
    platform = platform or plat_label or "cpu"
    states = []
    for p, d in zip(paths, dfs):
        try:
            states.append(modelside.profile_states(d, p, lm, platform, loader or _cache_only, batch_size))
        except _NotCached:
            states = None
            break
    from rtlm_lab.uncertainty import quantify

    scores = quantify(df["text"].fillna("").astype(str).tolist())
    bounds = np.cumsum([0, *map(len, dfs)])
    frame = pd.concat([spread_frame(d, None if states is None else states[i],
                                    scores.iloc[bounds[i]:bounds[i + 1]].reset_index(drop=True))
                       for i, d in enumerate(dfs)], ignore_index=True)
    table = spread_table(frame, conversation_ids(df), n_bootstrap=n_bootstrap, seed=seed, lm=lm,
                         platform=plat_label or platform)
    fig = None
    if out_dir is not None:
        from rtlm_lab.io import write_text_atomic

        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        write_text_atomic(out_dir / f"{FILE_NAME}.csv", table.to_csv(index=False, float_format="%.4f"))
        if figure:
            fig = plot_spread(table, out_dir, title=f"{lm}: uncertainty vs the spread of sampled reply lengths "
                                                    f"(n={len(df)} prompts)")
    return {"table": table, "frame": frame, "paths": paths, "lm": lm, "platform": platform, "n": int(len(df)),
            "model_side": states is not None, "figure": fig}


def spread_or_none(lm: str, platform: str, spread: str | Path | None = "", **kwargs) -> dict[str, Any] | None:
    """:func:`spread_study` of ``spread`` (a path; a relative one from the repository root, as notebook
    parameters are), or when it is empty of :func:`find_spread`'s committed profiles; ``None`` when it is empty
    and none is committed (the caller says so and skips)."""
    from rtlm_lab.paths import resolve_path

    paths = [resolve_path(spread)] if spread else find_spread(lm, platform)
    return spread_study(paths, lm=lm, platform=platform, **kwargs) if paths else None


# ----------------------------------------------------------------------------------------- presentation
def plot_spread(table: pd.DataFrame, out_dir: str | Path | None = None, title: str = "", stem: str = FILE_NAME,
                by: str = "target"):
    """Measure x target heatmap of the partial rho | input length (input length's own rho on its row), ``*``
    where the conversation-bootstrap 95% CI excludes 0 (one LM's table; ``by``: the column giving the heatmap's
    columns, e.g. lm and target for several LMs)."""
    return modelside.plot_model_vs_input(
        table, out_dir, stem=stem, by=by, label="partial ρ | log input tokens",
        title=(title or "Uncertainty vs the spread of sampled reply lengths")
        + "\npartial ρ with per-prompt sd / IQR / mean of lengths | input length (* = 95% CI excludes 0)")


def format_spread(table: pd.DataFrame) -> str:
    """Measures x targets, ``partial [CI] (rho)`` per cell (Markdown)."""
    return modelside.to_markdown(table, by="target")


def spread_note(result: dict[str, Any] | None, lm: str, platform: str) -> str:
    """One line on what the spread section shows (or why it is skipped)."""
    if result is None:
        return (f"No spread profile of {lm} (none committed under {spread_dir()} for any platform, and none given): "
                f"this section is skipped. Make one with `rtlm-spread lm={lm} platform={platform}` and pass its "
                "spread.parquet as `spread`.")
    side = "with" if result["model_side"] else "without"
    return (f"{result['lm']}: {result['n']} prompts of {', '.join(p.name for p in result['paths'])} (lengths "
            f"sampled on {result['table']['platform'].iloc[0]}), {side} the model-side measures; "
            f"{int(result['table']['n_bootstrap'].iloc[0])} conversation-bootstrap resamples")


def spread_view(result: dict[str, Any] | None) -> tuple:
    """What notebook 01 displays: the measure x target text grid (``partial [CI] (rho)``) and the heatmap;
    ``()`` without a spread profile."""
    if result is None:
        return ()
    fig = result.get("figure") or plot_spread(result["table"])
    return modelside.text_grid(result["table"], by="target"), fig


# ------------------------------------------------------------------------------------------- reference
def build_reference(lms: Sequence[str] = modelside.REFERENCE_LMS, platform: str = "cuda",
                    out_dir: str | Path | None = None, n_bootstrap: int = 1000, seed: int = 0,
                    model_side: bool = False, batch_size: int = 16, root: str | Path | None = None) -> pd.DataFrame:
    """``spread_table.csv`` / ``.md`` / ``.provenance.json`` and the heatmap in ``out_dir`` (default
    ``outputs/reference/uncertainty``) for each LM of ``lms`` with committed spread profiles
    (:func:`find_spread`: ``<lm>__<platform>__{test,train}``, pooled). Model-side rows where the LM's cpu prefill
    states are cached, or (``model_side``) computed on the CPU. LMs without a spread profile are skipped (said).
    ``root``: the reference dir holding ``profiles/spread`` (default ``outputs/reference``)."""
    from rtlm_lab.io import provenance, sha256_file, write_json_atomic, write_text_atomic
    from rtlm_lab.paths import ROOT, reference_dir

    out_dir = Path(out_dir) if out_dir else reference_dir() / "uncertainty"
    tables, sources = [], []
    for lm in lms:
        paths = find_spread(lm, platform, root)
        if not paths:
            print(f"{lm}: no spread profile under {spread_dir(root)}; skipped", flush=True)
            continue
        res = spread_study(paths, lm=lm, platform="cpu", loader=modelside._default_loader(lm, "cpu") if model_side
                           else None, n_bootstrap=n_bootstrap, seed=seed, batch_size=batch_size)
        tables.append(res["table"])
        sources.append({"lm": lm, "profiles": [str(p.relative_to(ROOT) if p.is_relative_to(ROOT) else p) for p in paths],
                        "sha256": [sha256_file(p) for p in paths], "n": res["n"],
                        "n_conversations": int(res["table"]["n_groups"].iloc[0]), "model_side": res["model_side"]})
        print(f"{lm}: {res['n']} prompts of {len(paths)} spread profile(s)", flush=True)
    if not tables:
        raise UserError(f"no spread profile of {', '.join(lms)} on {platform} under {spread_dir(root)}; "
                        "run rtlm-spread first")
    table = pd.concat(tables, ignore_index=True)
    out_dir.mkdir(parents=True, exist_ok=True)
    write_text_atomic(out_dir / f"{FILE_NAME}.csv", table.to_csv(index=False, float_format="%.4f"))
    md = ["# Uncertainty vs the spread of sampled reply lengths\n",
          "Partial Spearman with each prompt's sd / IQR / mean of its K sampled reply lengths, controlling for log "
          f"input tokens, cluster-bootstrap 95% CI over conversations ({n_bootstrap} resamples, seed {seed}); "
          "Spearman rho in parentheses. Made by `rtlm_lab.uncertainty.spread.build_reference`; see "
          "docs/uncertainty.md.\n"]
    md += [f"## `{t}`\n\n{modelside.to_markdown(table[table['target'] == t])}\n" for t in TARGETS]
    write_text_atomic(out_dir / f"{FILE_NAME}.md", "\n".join(md))

    import matplotlib

    matplotlib.use("Agg")
    plot_spread(table.assign(column=table["lm"] + "\n" + table["target"]), out_dir, by="column")
    write_json_atomic(out_dir / f"{FILE_NAME}.provenance.json",
                      provenance({"lms": list(lms), "platform": platform, "n_bootstrap": int(n_bootstrap),
                                  "seed": int(seed), "model_side": bool(model_side)},
                                 command="rtlm_lab.uncertainty.spread.build_reference", sources=sources,
                                 files=[f"{FILE_NAME}.{e}" for e in ("csv", "md", "png", "svg")]))
    return table
