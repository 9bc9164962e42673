"""``rtlm-profile``: profile real generation of one LM on one platform (see ``conf/profile.yaml``).

Examples::

    rtlm-profile lm=smollm2_135m platform=cpu data.n_prompts=50
    rtlm-profile -m lm=smollm2_135m,gemma3_270m platform=cpu data.n_prompts=5
    rtlm-profile --help          # Hydra's help: config groups and the composed config

The run dir ends with ``manifest.json`` (sha256 and size of every artefact, see
:func:`rtlm_lab.io.write_run_manifest`): ``complete: true`` after a full run, ``complete: false`` listing the
finished parts after an interruption.
"""

from __future__ import annotations

import logging

from omegaconf import DictConfig, OmegaConf

from rtlm_lab.errors import UserError
from rtlm_lab.tasks._cli import make_main, task_wrapper

log = logging.getLogger("rtlm_lab.profile")


def check_config(cfg: DictConfig) -> None:
    """Values that would otherwise fail only once the run dir exists: the CLI checks them before Hydra
    creates it (:func:`rtlm_lab.tasks._cli.check_values`), so a bad value leaves nothing behind."""
    from rtlm_lab.data.ccc import SPLITS

    n = cfg.data.get("n_prompts")
    if n is not None and (isinstance(n, bool) or not isinstance(n, int) or n <= 0):
        raise UserError(f"data.n_prompts must be a positive integer or null, got {n!r}")
    if cfg.data.get("name") == "prompts":  # your own file: read it now (one clear line for a bad file)
        from rtlm_lab.data.prompts import read_prompt_file

        read_prompt_file(cfg.data.get("path"))
    elif cfg.data.get("split") not in SPLITS:
        raise UserError(f"unknown data split {cfg.data.get('split')!r}; choose one of {', '.join(SPLITS)}")
    b = cfg.profile.get("batch_size")
    if isinstance(b, bool) or not isinstance(b, int) or b < 1:
        raise UserError(f"profile.batch_size must be >= 1, got {b!r}")


@task_wrapper
def profile(cfg: DictConfig) -> dict:
    """Compose-and-run body, callable without the CLI (``profile(cfg)``) in tests and notebooks."""
    from hydra.core.hydra_config import HydraConfig

    from rtlm_lab.io import write_run_manifest
    from rtlm_lab.profiling.profiler import run_profile
    from rtlm_lab.profiling.summary import format_summary, plot_profile
    import pandas as pd

    run_dir = HydraConfig.get().runtime.output_dir
    container = OmegaConf.to_container(cfg, resolve=True)
    try:
        summary = run_profile(container, run_dir)
    except KeyboardInterrupt:  # Ctrl-C / SIGTERM: the finished parts are flushed; list them with their sha256
        write_run_manifest(run_dir, {"task": "profile", "complete": False})
        raise
    df = pd.read_parquet(f"{run_dir}/profile.parquet")
    if cfg.profile.get("figures", True) and len(df) > 2:
        plot_profile(df, run_dir, title=f"{cfg.lm.name} on {cfg.platform.name}")
    write_run_manifest(run_dir, {"task": "profile", "complete": True})
    print(format_summary(df, summary), flush=True)
    print(f"profile: {run_dir}/profile.parquet", flush=True)
    return summary


main = make_main("profile", profile, validate=check_config)


if __name__ == "__main__":
    main()
