"""``rtlm-uncertainty``: uncertainty of the requests vs output length and latency, for one profile.

Reads a profile written by ``rtlm-profile`` (``profile=<parquet>``, or by default the run dir of
``rtlm-profile`` with the same ``lm`` / ``platform`` / ``data`` settings), scores every request with
:func:`rtlm_lab.uncertainty.quantify` and runs :func:`rtlm_lab.uncertainty.analysis.analyze`. The run dir
``outputs/uncertainty/<lm>/<platform>/`` receives:

* ``metrics.json``: Spearman per type (+ CI, partial, p-value), output length by uncertainty quartile,
  latency model per platform, the tidy ``spearman_table``, and provenance (config, commit, machine,
  versions, the profile's path and sha256);
* ``scores.parquet``: one row per request, the six scores + total joined with tokens and latencies;
* ``spearman``, ``output_by_uncertainty``, ``latency_fit`` and ``spearman_heatmap`` as PNG + SVG.
* with ``model_side=true`` (:mod:`rtlm_lab.uncertainty.modelside`): ``model_vs_input.csv`` and the
  ``model_vs_input`` heatmap (PNG + SVG): the six input-side scores against the served LM's prefill entropy
  and log P(end of turn), Spearman and partial Spearman | log input tokens with output length
  (conversation-bootstrap CIs); also ``metrics.json["model_vs_input"]``. The LM's prefill states are cached
  under ``data/cache/lmstate/`` (the LM loads on a cache miss);
* with a spread profile (:mod:`rtlm_lab.uncertainty.spread`; ``spread=<spread.parquet>``, or by default the
  committed ``outputs/reference/profiles/spread/<lm>__<platform>__{test,train}.parquet`` when they exist, another
  platform's when this one has none; ``spread=false``: off): ``spread_table.csv`` and the ``spread_table``
  heatmap: do the same measures rank prompts by the sd / IQR of their sampled reply lengths (and, for
  comparison, their mean)? Spearman and partial Spearman | input length, conversation-bootstrap CIs; the
  model-side rows where the LM's prefill states are cached (or computed, with ``model_side=true``); also
  ``metrics.json["spread"]``;
* ``manifest.json`` (last): sha256 and size of each of these files.

Examples::

    rtlm-uncertainty lm=smollm2_135m platform=cpu
    rtlm-uncertainty lm=gemma3_270m data.n_prompts=6
    rtlm-uncertainty profile=outputs/profile/gemma3_270m/cpu/test-n6-s0/profile.parquet n_bootstrap=200
    rtlm-uncertainty lm=dialogpt_ccc profile=outputs/reference/profiles/dialogpt_ccc__cpu.parquet model_side=true
    rtlm-uncertainty data=prompts data.path=my_prompts.jsonl lm=custom lm.local_dir=DIR   # your prompts' profile
    rtlm-uncertainty lm=dialogpt_ccc spread=outputs/spread/dialogpt_ccc/<platform>/<run>/spread.parquet
"""

from __future__ import annotations

import logging
from pathlib import Path

from omegaconf import DictConfig

from rtlm_lab.errors import UserError
from rtlm_lab.tasks._cli import check_data, make_main, profile_hint, resolve_profile, task_wrapper, user_path

log = logging.getLogger("rtlm_lab.uncertainty")


def spread_paths(cfg: DictConfig) -> list[Path]:
    """The spread profile(s) of this run: ``cfg.spread`` (checked now: a missing or foreign file is one
    :class:`UserError` line), ``[]`` with ``spread=false``, else the committed ones of the LM (may be none)."""
    given = cfg.get("spread")
    if given is False or str(given).lower() in ("false", "off", "none"):
        return []
    from rtlm_lab.uncertainty.spread import find_spread, read_spread

    paths = [user_path(given)] if given else find_spread(cfg.lm.name, cfg.platform.name)
    for p in paths:
        read_spread(p)
    return paths


@task_wrapper
def uncertainty(cfg: DictConfig) -> dict:
    """Compose-and-run body, callable without the CLI (``uncertainty(cfg)``) in tests and notebooks."""
    from hydra.core.hydra_config import HydraConfig

    # before the heavy imports: a bad prompt file or a missing profile is a quick one-line error
    check_data(cfg)
    path = resolve_profile(cfg, profile_hint(cfg))
    spread = spread_paths(cfg)

    import matplotlib

    matplotlib.use("Agg")
    import pandas as pd

    from rtlm_lab.io import provenance, sha256_file, write_json_atomic, write_parquet_atomic, write_run_manifest
    from rtlm_lab.uncertainty.analysis import analyze, format_table, to_jsonable
    from rtlm_lab.uncertainty.figures import (
        plot_latency_fit, plot_output_by_uncertainty, plot_spearman_bars, plot_spearman_heatmap,
    )

    run_dir = Path(HydraConfig.get().runtime.output_dir)
    try:
        profile_df = pd.read_parquet(path)
    except Exception as exc:  # noqa: BLE001 - a corrupt / non-parquet file is a user mistake
        raise UserError(f"cannot read profile {path}: {type(exc).__name__}: {exc}".splitlines()[0]) from exc
    if len(profile_df) == 0:
        raise UserError(f"profile {path} has no rows; rerun rtlm-profile")
    result = analyze(profile_df, n_bootstrap=int(cfg.n_bootstrap), seed=int(cfg.seed))
    if (result["lm"], result["platform"]) != (cfg.lm.name, cfg.platform.name):
        # labels come from the profile's rows (the truth); the run dir from the config
        log.warning("profile %s holds lm=%s platform=%s but the config says lm=%s platform=%s", path,
                    result["lm"], result["platform"], cfg.lm.name, cfg.platform.name)
    scores = result["scores"]
    metrics = to_jsonable(result)
    metrics["provenance"] = provenance(cfg, profile=str(path), profile_sha256=sha256_file(path),
                                       run_dir=str(run_dir))
    mvi = None

    def loader():
        from omegaconf import OmegaConf

        from rtlm_lab.lm import load_lm

        return load_lm(OmegaConf.to_container(cfg.lm, resolve=True),
                       OmegaConf.to_container(cfg.platform, resolve=True))

    if cfg.get("model_side", False):
        from rtlm_lab.io import write_text_atomic
        from rtlm_lab.uncertainty.modelside import model_vs_input

        mvi = model_vs_input(path, lm=cfg.lm.name, platform=cfg.platform.name, loader=loader,
                             n_bootstrap=int(cfg.n_bootstrap), seed=int(cfg.seed),
                             batch_size=int(cfg.get("model_side_batch_size", 16)), scores=scores)["table"]
        metrics["model_vs_input"] = to_jsonable({"t": mvi})["t"]
        write_text_atomic(run_dir / "model_vs_input.csv", mvi.to_csv(index=False, float_format="%.4f"))
    sp = None
    if spread:
        from rtlm_lab.uncertainty.spread import spread_study

        sp = spread_study(spread, lm=cfg.lm.name, platform=cfg.platform.name,
                          loader=loader if cfg.get("model_side", False) else None,
                          n_bootstrap=int(cfg.n_bootstrap), seed=int(cfg.seed),
                          batch_size=int(cfg.get("model_side_batch_size", 16)), out_dir=run_dir,
                          figure=bool(cfg.get("figures", True)))
        metrics["spread"] = {"profiles": [str(p) for p in spread], "sha256": [sha256_file(p) for p in spread],
                             "n": sp["n"], "model_side": sp["model_side"],
                             "table": to_jsonable({"t": sp["table"]})["t"]}
    elif cfg.get("spread") is None:
        log.info("no committed spread profile of %s (outputs/reference/profiles/spread/); spread section skipped",
                 cfg.lm.name)
    write_parquet_atomic(scores, run_dir / "scores.parquet")
    write_json_atomic(run_dir / "metrics.json", metrics)
    if cfg.get("figures", True):
        title = f"{result['lm']} on {result['platform']} (n={result['n']})"
        table = result["spearman_table"]
        plot_spearman_bars(table, run_dir, title=title)
        plot_output_by_uncertainty(scores, run_dir, title=title)
        plot_latency_fit(scores, result["latency_model"], run_dir, title=f"latency vs output tokens: {title}")
        plot_spearman_heatmap(table, run_dir)
        if mvi is not None:
            from rtlm_lab.uncertainty.modelside import plot_model_vs_input

            plot_model_vs_input(mvi, run_dir)
    write_run_manifest(run_dir, {"task": "uncertainty"})
    print(f"{result['lm']} on {result['platform']}: {result['n']} requests, "
          f"{result['n_bootstrap']} bootstrap resamples", flush=True)
    print(format_table(result["spearman_table"]), flush=True)
    if mvi is not None:
        from rtlm_lab.uncertainty.modelside import to_markdown

        print("model-side vs input-side: partial Spearman | log input tokens [95% CI] (rho)", flush=True)
        print(to_markdown(mvi), flush=True)
    if sp is not None:
        from rtlm_lab.uncertainty.spread import format_spread

        print(f"spread of sampled reply lengths ({sp['n']} prompts of {', '.join(p.name for p in spread)}): "
              "partial Spearman | log input tokens [95% CI] (rho)", flush=True)
        print(format_spread(sp["table"]), flush=True)
        print(f"spread table: {run_dir / 'spread_table.csv'}", flush=True)
    print(f"metrics: {run_dir / 'metrics.json'}", flush=True)
    return metrics


main = make_main("uncertainty", uncertainty)


if __name__ == "__main__":
    main()
