"""``rtlm-drift``: run-time recalibration at run time (:func:`rtlm_lab.scheduler.drift.run_drift`).

Example::

    rtlm-drift source_lm=dialogpt_ccc target_lm=smollm2_135m platform=cpu seeds=[0,1,2]

Writes ``drift.csv``, ``summary.csv``, ``drift.json``, ``drift.png/svg`` and ``provenance.json`` into
``outputs/drift/<source_lm>__to__<target_lm>__<platform>/`` (or ``out=``).
"""

from __future__ import annotations

from omegaconf import DictConfig

from rtlm_lab.tasks._cli import make_main, task_wrapper


@task_wrapper
def drift(cfg: DictConfig) -> dict:
    """Compose-and-run body (callable without the CLI)."""
    from rtlm_lab.scheduler.drift import run_drift

    res = run_drift(str(cfg.source_lm), str(cfg.target_lm), str(cfg.platform.name), seeds=list(cfg.seeds),
                    n_requests=int(cfg.n_requests), rho=float(cfg.rho), window=int(cfg.window),
                    workload=str(cfg.workload), out=cfg.out, overrides=list(cfg.overrides))
    for r in res["rows"]:
        print(f"seed {r['seed']} {r['arm']:>13}: MAE {r['mae_tokens']:.1f} tok, tau {r['kendall_tau']:.3f}, "
              f"mean RT {r['mean_rt_s']:.2f} s, updates {r['n_online_updates']}", flush=True)
    return res


main = make_main("drift", drift)

if __name__ == "__main__":
    main()
