"""``rtlm-spread``: each prompt replied ``K`` times under sampled decoding; per-prompt length distributions
(see ``conf/spread.yaml`` and :mod:`rtlm_lab.scheduler.spread`).

Examples::

    rtlm-spread lm=dialogpt_ccc data.split=test data.n_prompts=500
    rtlm-spread lm=godel_ccc spread.engine=generate data.n_prompts=50
"""

from __future__ import annotations

from omegaconf import DictConfig, OmegaConf

from rtlm_lab.errors import UserError
from rtlm_lab.tasks._cli import make_main, task_wrapper


def check_config(cfg: DictConfig) -> None:
    """Bad values stop before Hydra creates the run dir."""
    k = cfg.spread.get("samples")
    if isinstance(k, bool) or not isinstance(k, int) or k < 2:
        raise UserError(f"spread.samples must be an integer >= 2, got {k!r}")
    if cfg.spread.get("engine") not in ("kv", "generate"):
        raise UserError(f"spread.engine must be kv or generate, got {cfg.spread.get('engine')!r}")
    if cfg.spread.get("engine") == "kv" and cfg.lm.get("arch") == "seq2seq":
        raise UserError(f"{cfg.lm.name} is an encoder-decoder: use spread.engine=generate")
    for key in ("batch_size", "chunk"):
        v = cfg.spread.get(key)
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise UserError(f"spread.{key} must be a positive integer, got {v!r}")


@task_wrapper
def spread(cfg: DictConfig) -> dict:
    """Compose-and-run body, callable without the CLI (``spread(cfg)``)."""
    from hydra.core.hydra_config import HydraConfig

    from rtlm_lab.io import write_run_manifest
    from rtlm_lab.scheduler.spread import run_spread

    run_dir = HydraConfig.get().runtime.output_dir
    summary = run_spread(OmegaConf.to_container(cfg, resolve=True), run_dir)
    write_run_manifest(run_dir, {"task": "spread", "complete": True})
    print(" ".join(f"{k}={round(v, 3) if isinstance(v, float) else v}" for k, v in summary.items()), flush=True)
    print(f"spread: {run_dir}/spread.parquet", flush=True)
    return summary


main = make_main("spread", spread, validate=check_config)


if __name__ == "__main__":
    main()
