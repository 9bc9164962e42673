"""``rtlm-train-regressor``: RT-LM's output-length regressor vs baselines, on one real profile.

Reads a profile (``profile=<parquet>``, by default the committed reference profile
``outputs/reference/profiles/<lm>__<platform>.parquet``, or with ``data=prompts`` the profile that
``rtlm-profile`` wrote for your prompt file), splits it by conversation (seeded) and runs
:func:`rtlm_lab.regressor.evaluate.compare`: ``rtlm_<regressor>`` against ``constant``, ``input_length``,
``proxy_minilm``, ``ltr_minilm``, the fine-tuned ``finetuned_minilm`` / ``finetuned_minilm_rank``
(``finetuned_proxy.enabled``) and ``oracle`` on the held-out conversations. The run dir
``outputs/train_regressor/<lm>/<platform>/<regressor>/`` receives:

* ``predictor.joblib``: the fitted :class:`~rtlm_lab.regressor.LengthPredictor` (training conversations
  only; ``LengthPredictor.load`` checks the library versions);
* ``metrics.json``: the method table (MAE, Spearman, Kendall tau + bootstrap CI, pairwise and bucket
  accuracy, us_per_prompt), the split and provenance (config, commit, machine, versions, profile sha256);
* ``predictions.csv`` (test rows) and ``comparison.png/svg``;
* with ``regressor=quantile`` (``distribution.enabled``): ``distribution.json`` and ``calibration.png``, the
  distributional table of :func:`rtlm_lab.regressor.distribution.evaluate` (pinball loss per level, CRPS,
  coverage of the 50% / 90% central intervals, PIT histogram, Kendall tau of the median; also printed) and,
  with ``distribution.drift_from=<another lm>``, the drift table (fitted on that LM's lengths, serving this
  LM's requests: coverage frozen vs recalibrated at run time);
* ``manifest.json`` (last): sha256 and size of each of these files.

Examples::

    rtlm-train-regressor lm=gemma3_270m platform=cuda regressor=hgb
    rtlm-train-regressor -m regressor=ridge,hgb lm=smollm2_135m,gemma3_270m platform=cuda
    rtlm-train-regressor data=prompts data.path=my_prompts.jsonl lm=custom lm.local_dir=DIR  # your prompts' profile
    rtlm-train-regressor regressor=quantile lm=smollm2_135m distribution.drift_from=dialogpt_ccc
"""

from __future__ import annotations

import logging
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from rtlm_lab.errors import UserError
from rtlm_lab.tasks._cli import check_data, make_main, profile_hint, resolve_profile, task_wrapper

log = logging.getLogger("rtlm_lab.regressor")


@task_wrapper
def train_regressor(cfg: DictConfig) -> dict:
    """Compose-and-run body (callable without the CLI)."""
    from hydra.core.hydra_config import HydraConfig

    check_data(cfg)
    path = resolve_profile(cfg, profile_hint(cfg) if cfg.data.get("name") == "prompts"
                           else f"rtlm-profile lm={cfg.lm.name} platform={cfg.platform.name}")

    import matplotlib

    matplotlib.use("Agg")
    import pandas as pd

    from rtlm_lab.io import atomic_path, provenance, sha256_file, write_json_atomic, write_run_manifest
    from rtlm_lab.regressor.evaluate import compare, format_table, plot_comparison, to_jsonable

    run_dir = Path(HydraConfig.get().runtime.output_dir)
    try:
        profile_df = pd.read_parquet(path)
    except Exception as exc:  # noqa: BLE001
        raise UserError(f"cannot read profile {path}: {type(exc).__name__}: {exc}".splitlines()[0]) from exc
    reg = OmegaConf.to_container(cfg.regressor, resolve=True)
    train_path, train_df = None, None
    if cfg.get("train_profile"):
        train_path = Path(str(cfg.train_profile)).expanduser()
        if not train_path.is_absolute():
            train_path = Path(HydraConfig.get().runtime.cwd) / train_path
        if not train_path.is_file():
            raise UserError(f"no train profile at {train_path}; make one with `rtlm-profile lm={cfg.lm.name} "
                            f"data.split=train profile.output_ids=32` (or drop train_profile=)")
        from rtlm_lab.regressor.lmstate import with_texts

        train_df = with_texts(pd.read_parquet(train_path))  # a slim profile (lengths + ids) gets its texts back
    prefill = _prefill(cfg, path, train_path) if reg.get("use_prefill") else None
    result = compare(profile_df, reg, test_size=float(cfg.test_size), seed=int(cfg.seed),
                     n_bootstrap=int(cfg.n_bootstrap), timing_n=int(cfg.timing_n),
                     embedding_baselines=bool(cfg.embedding_baselines), extra_train=train_df,
                     bootstrap_by=str(cfg.get("bootstrap_by", "row")), prefill=prefill,
                     finetuned=OmegaConf.to_container(cfg.finetuned_proxy, resolve=True)
                     if cfg.get("finetuned_proxy") else None)
    if (result["lm"], result["platform"]) != (cfg.lm.name, cfg.platform.name):
        log.warning("profile %s holds lm=%s platform=%s but the config says lm=%s platform=%s", path,
                    result["lm"], result["platform"], cfg.lm.name, cfg.platform.name)
    run_dir.mkdir(parents=True, exist_ok=True)
    result["predictor"].save(run_dir / "predictor.joblib")
    metrics = to_jsonable(result)
    extra = {"train_profile": str(train_path), "train_profile_sha256": sha256_file(train_path)} if train_path else {}
    metrics["provenance"] = provenance(cfg, profile=str(path), profile_sha256=sha256_file(path),
                                       run_dir=str(run_dir), **extra)
    if "lmstate_predictor" in result:
        import joblib

        with atomic_path(run_dir / "lmstate_predictor.joblib") as tmp:
            joblib.dump(result["lmstate_predictor"], tmp)
        if result.get("refine") is not None:
            with atomic_path(run_dir / "refine.csv") as tmp:
                result["refine"].to_csv(tmp, index=False)
    dist = _distribution(cfg, reg, profile_df, train_df, run_dir) if _wants_distribution(cfg) else None
    if dist is not None:
        metrics["distribution"] = dist
    write_json_atomic(run_dir / "metrics.json", metrics)
    with atomic_path(run_dir / "predictions.csv") as tmp:
        result["predictions"].to_csv(tmp, index=False)
    if cfg.get("figures", True):
        plot_comparison(result, run_dir, title=f"{result['lm']} on {result['platform']}: "
                                               f"{result['split']['n_test']} held-out requests")
    write_run_manifest(run_dir, {"task": "train_regressor"})
    print(f"{result['lm']} on {result['platform']}, regressor={cfg.regressor.name}: "
          f"train {result['split']['n_train']} / test {result['split']['n_test']} requests", flush=True)
    print(format_table(result["table"]), flush=True)
    if "lmstate" in result:
        ls = result["lmstate"]
        print(f"lmstate_auto = lmstate_{ls['picked_probe']} (validation tau {ls['val_kendall_tau']}); "
              f"layers {ls['layers']}, {ls['n_features']} features", flush=True)
        if result.get("refine") is not None and len(result["refine"]):
            from rtlm_lab.regressor.evaluate import METRIC_COLUMNS

            cols = ["k"] + [c for c in METRIC_COLUMNS if c != "us_per_prompt"] + ["loop_flagged", "loop_precision"]
            print("remaining length after k decoding steps (test requests still running at k):", flush=True)
            print(format_table(result["refine"][cols]), flush=True)
    if dist is not None:
        _print_distribution(dist)
    print(f"metrics: {run_dir / 'metrics.json'}", flush=True)
    return metrics


def _wants_distribution(cfg: DictConfig) -> bool:
    enabled = (cfg.get("distribution") or {}).get("enabled", "auto")
    if str(enabled) == "auto":
        return str(cfg.regressor.get("kind")) == "quantile"
    return bool(enabled)


def _distribution(cfg: DictConfig, reg: dict, profile_df, train_df, run_dir: Path) -> dict:
    """The distributional table (and the drift table) of :mod:`rtlm_lab.regressor.distribution`; writes
    ``distribution.json`` and ``calibration.png`` into ``run_dir`` and returns the JSON."""
    import pandas as pd

    from rtlm_lab.io import write_json_atomic
    from rtlm_lab.paths import reference_dir
    from rtlm_lab.regressor import distribution as D

    dcfg = OmegaConf.to_container(cfg.distribution, resolve=True) if cfg.get("distribution") else {}
    params = D.predictor_params(reg, dcfg)
    res = D.evaluate(profile_df, params, test_size=float(cfg.test_size), seed=int(cfg.seed), extra_train=train_df)
    out = {"levels": res["levels"], "params": res["predictor"].get_params(), "split": res["split"],
           "methods": res["rows"]}
    if cfg.get("figures", True):
        D.plot_calibration(res, run_dir, title=f"{cfg.lm.name} on {cfg.platform.name}: "
                                               f"{res['split']['n_test']} held-out requests")
    src_lm = dcfg.get("drift_from")
    if src_lm:
        src_path = reference_dir() / "profiles" / f"{src_lm}__{cfg.platform.name}.parquet"
        if not src_path.is_file():
            raise UserError(f"distribution.drift_from={src_lm}: no reference profile {src_path}")
        src_train = None
        if dcfg.get("drift_train_profile"):
            from rtlm_lab.regressor.lmstate import with_texts

            from hydra.core.hydra_config import HydraConfig

            tp = Path(str(dcfg["drift_train_profile"])).expanduser()
            if not tp.is_absolute():
                tp = Path(HydraConfig.get().runtime.cwd) / tp
            if not tp.is_file():
                raise UserError(f"no drift_train_profile at {tp}")
            src_train = with_texts(pd.read_parquet(tp))
        dr = D.drift(pd.read_parquet(src_path), profile_df, params, test_size=float(cfg.test_size),
                     seed=int(cfg.seed), source_train=src_train)
        out["drift"] = {"source_lm": str(src_lm), "source_profile": str(src_path),
                        "source_train_profile": str(dcfg.get("drift_train_profile") or ""),
                        "n_train": dr["n_train"], "n_stream": dr["n_stream"],
                        "rows": dr["table"].to_dict(orient="records")}
    from rtlm_lab.regressor.evaluate import _clean

    out = _clean(out)
    write_json_atomic(run_dir / "distribution.json", out)
    return out


def _print_distribution(dist: dict) -> None:
    import pandas as pd

    from rtlm_lab.regressor.distribution import TABLE_COLUMNS, format_table

    lv = dist["levels"]
    print(f"output-length distribution (quantiles at {lv}; held-out conversations):", flush=True)
    t = pd.DataFrame(dist["methods"])
    print(format_table(t[[c for c in TABLE_COLUMNS if c in t] + [f"pinball_{l:g}" for l in lv]]), flush=True)
    print("PIT histogram (10 bins, 0.1 each when calibrated):", flush=True)
    for r in dist["methods"]:
        print(f"  {r['method']:>18}: " + " ".join(f"{v:.2f}" for v in r["pit_hist"]), flush=True)
    if "drift" in dist:
        d = dist["drift"]
        print(f"drift: fitted on {d['source_lm']} ({d['n_train']} requests), serving {d['n_stream']} of this LM's "
              "held-out requests in order (recalibrated: each request predicted, then its length taken):", flush=True)
        print(format_table(pd.DataFrame(d["rows"])), flush=True)


def _prefill(cfg: DictConfig, profile_path: Path, train_path: Path | None) -> dict:
    """Callbacks giving :func:`~rtlm_lab.regressor.evaluate.compare` the served LM's states, cached under
    ``data/cache/lmstate/`` per (LM + platform, profile sha256, layers, step); the LM loads on the first miss."""
    import time

    from rtlm_lab.io import sha256_file
    from rtlm_lab.lm import load_lm
    from rtlm_lab.regressor import lmstate as LS

    ls = OmegaConf.to_container(cfg.lmstate, resolve=True)
    layers, bs = list(ls.get("layers") or LS.DEFAULT_LAYERS), int(ls.get("batch_size", 16))
    shas = {"main": sha256_file(profile_path)}
    if train_path is not None:
        shas["extra"] = sha256_file(train_path)
    key = f"{cfg.lm.name}__{cfg.platform.name}"
    holder: dict = {}

    def get_lm():
        if "lm" not in holder:
            holder["lm"] = load_lm(OmegaConf.to_container(cfg.lm, resolve=True),
                                   OmegaConf.to_container(cfg.platform, resolve=True))
        return holder["lm"]

    def states(src, frame, step, prefix):
        return LS.cached_states(get_lm, frame, shas[src], key, layers, step, prefix, bs)

    def prefix(src, frame, k):
        return LS.reply_prefix_ids(get_lm, frame, k, bs, shas[src], key)

    def timer(texts):
        lm = get_lm()
        LS.extract_states(lm, texts[:2], layers=layers, batch_size=bs)  # warm
        t0 = time.perf_counter()
        LS.extract_states(lm, texts, layers=layers, batch_size=bs)
        return time.perf_counter() - t0

    return {"states": states, "prefix": prefix, "time": timer, "max_new_tokens": int(cfg.lm.max_new_tokens),
            "probes": ls.get("probes"), "which": ls.get("which"), "refine_k": ls.get("refine_k") or [],
            "loop_n": int(ls.get("loop_n", 3))}


main = make_main("train_regressor", train_regressor)


if __name__ == "__main__":
    main()
