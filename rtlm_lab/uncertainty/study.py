"""Notebook 01's study: how well each input-uncertainty score ranks output lengths, on one profile.

:func:`run_study` finds the profile, runs :func:`~rtlm_lab.uncertainty.analysis.analyze` and writes
``scores.parquet`` and ``metrics.json`` (what ``rtlm-report`` reads) into ``output_dir``; the notebook shows
the tables and draws the figures. ``model_side=True`` also runs
:func:`~rtlm_lab.uncertainty.modelside.model_vs_input` on the profile (the LM's prefill states, cached under
``data/cache/lmstate/``; the LM loads on a miss) and writes ``model_vs_input.csv``; either way
``result["model_vs_input"]`` holds the committed five-LM table (``outputs/reference/uncertainty/
model_vs_input.csv``) with this LM's rows replaced by the fresh ones when computed.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pandas as pd

from rtlm_lab.errors import UserError
from rtlm_lab.paths import repo_root, resolve_path


def run_study(lm: str, platform: str, profile: str | Path | None = "", n_bootstrap: int = 1000, seed: int = 0,
              output_dir: str | Path = "outputs/notebooks/01", model_side: bool = False) -> dict[str, Any]:
    """:func:`analyze`'s result plus ``profile_path`` and ``out_dir``. ``profile`` empty: the largest profile of
    ``lm`` / ``platform`` (:func:`~rtlm_lab.uncertainty.analysis.find_profile`)."""
    from rtlm_lab.io import provenance, sha256_file, write_json_atomic, write_parquet_atomic, write_text_atomic
    from rtlm_lab.uncertainty.analysis import analyze, find_profile, to_jsonable

    os.environ.setdefault("RTLM_ROOT", str(repo_root()))
    profile_path = resolve_path(profile) or find_profile(lm, platform)
    if profile_path is None or not profile_path.is_file():
        raise UserError(f"no profile for lm={lm} platform={platform} ({profile_path}); "
                        f"run `rtlm-profile lm={lm} platform={platform}` first")
    out_dir = resolve_path(output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    result = analyze(pd.read_parquet(profile_path), n_bootstrap=int(n_bootstrap), seed=int(seed))
    metrics = to_jsonable(result)
    from rtlm_lab.uncertainty import modelside

    fresh = pd.DataFrame(columns=modelside.COLUMNS)
    if model_side:
        fresh = modelside.model_vs_input(profile_path, lm=lm, platform=platform, n_bootstrap=int(n_bootstrap),
                                         seed=int(seed), scores=result["scores"])["table"]
        metrics["model_vs_input"] = to_jsonable({"t": fresh})["t"]
        write_text_atomic(out_dir / "model_vs_input.csv", fresh.to_csv(index=False, float_format="%.4f"))
    metrics["provenance"] = provenance(
        {"lm": lm, "platform": platform, "profile": str(profile_path), "n_bootstrap": int(n_bootstrap),
         "seed": int(seed), "output_dir": str(out_dir), "notebook": "notebooks/01_uncertainty_latency.ipynb",
         "model_side": bool(model_side)},
        profile=str(profile_path), profile_sha256=sha256_file(profile_path))
    result["model_vs_input"] = modelside.with_reference(fresh)
    write_parquet_atomic(result["scores"], out_dir / "scores.parquet")
    write_json_atomic(out_dir / "metrics.json", metrics)
    return {**result, "profile_path": profile_path, "out_dir": out_dir}
