"""``rtlm-recalibration``: run-time recalibration across LMs (:func:`rtlm_lab.regressor.recalibration.recalibrate`).

Examples::

    rtlm-recalibration source_lm=gemma3_270m target_lm=smollm2_135m platform=cuda
    rtlm-recalibration source_lm=gemma3_270m target_lm=dialogpt_ccc platform=cpu kind=hgb window=100

Writes ``recalibration.json`` and ``recalibration.png/svg`` into the run dir
``outputs/recalibration/<source_lm>__to__<target_lm>__<platform>/`` (or ``out=``).
"""

from __future__ import annotations

from omegaconf import DictConfig

from rtlm_lab.tasks._cli import make_main, task_wrapper


@task_wrapper
def recalibration(cfg: DictConfig) -> dict:
    """Compose-and-run body (callable without the CLI)."""
    from hydra.core.hydra_config import HydraConfig

    from rtlm_lab.regressor.recalibration import recalibrate

    out = cfg.out
    if not out:
        try:
            out = HydraConfig.get().runtime.output_dir
        except ValueError:  # called without Hydra: recalibrate's default folder
            out = None
    return recalibrate(str(cfg.source_lm), str(cfg.target_lm), str(cfg.platform.name), kind=str(cfg.kind),
                       window=int(cfg.window), tolerance=float(cfg.tolerance), source_profile=cfg.source_profile,
                       target_profile=cfg.target_profile, out=out, config=cfg)


main = make_main("recalibration", recalibration)

if __name__ == "__main__":
    main()
