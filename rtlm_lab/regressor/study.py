"""Notebook 02's study: the output-length predictors compared on held-out conversations of one profile.

:func:`run_study` reads the profile and ``conf/regressor/<regressor>.yaml``, runs
:func:`~rtlm_lab.regressor.evaluate.compare`, the p90-quantile coverage on the same test split and (when
``recal_target`` names an LM whose profile exists) the cross-LM recalibration experiment, and writes
``metrics.json`` (what ``rtlm-report`` reads) and ``predictor.joblib`` into ``output_dir``; the notebook shows
the tables and draws the figures, and the committed comparison of the served LM's states (prefill probe,
refinement while decoding) with the baselines, fine-tuned MiniLM included, for all five LMs.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from rtlm_lab.errors import UserError
from rtlm_lab.paths import repo_root, resolve_path


def reference_profile(lm: str, platform: str) -> Path:
    return repo_root() / "outputs" / "reference" / "profiles" / f"{lm}__{platform}.parquet"


def p90_coverage(profile_df: pd.DataFrame, predictor, seed: int, q: float = 0.9) -> float:
    """Share of the held-out requests (``compare``'s conversation split) at or below the predicted q-quantile."""
    from rtlm_lab.metrics import split_by_conversation

    df = profile_df[profile_df["n_output_tokens"].notna()].reset_index(drop=True)
    _tr, te = split_by_conversation(df, 0.3, int(seed))
    test_df = df.iloc[te]
    pq = predictor.predict_quantile(test_df["text"].tolist(), q)
    return float(np.mean(test_df["n_output_tokens"].to_numpy() <= pq))


def run_study(lm: str, platform: str, regressor: str = "ridge", output_dir: str | Path = "outputs/notebooks/02",
              profile: str | Path | None = "", n_bootstrap: int = 1000, seed: int = 0,
              recal_target: str | None = "", recal_target_profile: str | Path | None = "") -> dict[str, Any]:
    """``{"result": compare(...), "recal": ... or None, "recal_note": why it was skipped, "p90_coverage",
    "profile_path", "out_dir", "reg_cfg", "profile_df", "lmstate": the committed five-LM comparison of the
    served LM's states with the baselines (:func:`~rtlm_lab.regressor.reference.lmstate_view`) or None}``."""
    import yaml

    from rtlm_lab.io import provenance, sha256_file, write_json_atomic
    from rtlm_lab.regressor.evaluate import compare, to_jsonable
    from rtlm_lab.regressor.recalibration import run_recalibration
    from rtlm_lab.regressor.recalibration import to_jsonable as recal_jsonable

    os.environ.setdefault("RTLM_ROOT", str(repo_root()))
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    profile_path = resolve_path(profile, reference_profile(lm, platform))
    if not profile_path.is_file():
        raise UserError(f"no profile {profile_path}; run `rtlm-profile lm={lm} platform={platform}` first")
    reg_file = repo_root() / "conf" / "regressor" / f"{regressor}.yaml"
    if not reg_file.is_file():
        raise UserError(f"unknown regressor {regressor!r} (no {reg_file})")
    reg_cfg = yaml.safe_load(reg_file.read_text())
    out_dir = resolve_path(output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    profile_df = pd.read_parquet(profile_path)
    result = compare(profile_df, reg_cfg, seed=int(seed), n_bootstrap=int(n_bootstrap))
    coverage = p90_coverage(profile_df, result["predictor"], int(seed))
    recal, note = None, "recal_target is empty: recalibration skipped"
    if recal_target:
        tp = resolve_path(recal_target_profile, reference_profile(recal_target, platform))
        if tp.is_file():
            recal, note = run_recalibration(profile_df, pd.read_parquet(tp), reg_cfg, window=50), None
        else:
            note = f"no profile for {recal_target} on {platform} ({tp}): recalibration skipped"
    metrics = to_jsonable(result)
    if recal is not None:
        metrics["recalibration"] = {k: v for k, v in recal_jsonable(recal).items() if k != "curves"}
    metrics["provenance"] = provenance(
        {"lm": lm, "platform": platform, "regressor": regressor, "profile": str(profile_path),
         "n_bootstrap": int(n_bootstrap), "seed": int(seed), "recal_target": recal_target,
         "output_dir": str(out_dir), "notebook": "notebooks/02_length_regressor.ipynb"},
        profile=str(profile_path), profile_sha256=sha256_file(profile_path))
    write_json_atomic(out_dir / "metrics.json", metrics)
    result["predictor"].save(out_dir / "predictor.joblib")
    from rtlm_lab.regressor.reference import lmstate_view

    return {"result": result, "recal": recal, "recal_note": note, "p90_coverage": coverage,
            "profile_path": profile_path, "out_dir": out_dir, "reg_cfg": reg_cfg, "profile_df": profile_df,
            "lmstate": lmstate_view(out_dir=out_dir)}
