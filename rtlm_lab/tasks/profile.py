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

from rtlm_lab.tasks._cli import make_main, task_wrapper

log = logging.getLogger("rtlm_lab.profile")


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


main = make_main("profile", profile)


if __name__ == "__main__":
    main()
