"""``rtlm-schedule``: a scheduling policy on a workload, served for real or simulated.

Reads the LM/platform's profile (default: the committed reference profile), fits the length predictors
on the profile's training conversations, builds a seeded workload from the held-out ones and serves it
with ``policy`` — ``mode=real``: wall-clock arrivals and real ``generate`` calls on the platform (the
service model is calibrated first, on the platform); ``mode=sim``: the discrete-event simulator with the
committed service model. The run dir ``outputs/schedule/<lm>/<platform>/<mode>/<workload>/<policy>/s<seed>/``
receives ``trace.parquet``, ``requests.parquet``, ``metrics.json`` and ``response_cdf.png``; a run dir that
already holds ``metrics.json`` is skipped unless ``force=true``.

Examples::

    rtlm-schedule lm=smollm2_135m platform=cpu policy=rtlm workload.rho=0.9 workload.n_requests=30 mode=real
    rtlm-schedule -m policy=fcfs,sjf_proxy,oracle_srpt,rtlm workload.rho=0.5,0.7,0.9 mode=sim
    rtlm-schedule data=prompts data.path=my_prompts.jsonl lm=custom lm.local_dir=DIR mode=sim  # your prompts
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from rtlm_lab.tasks._cli import check_data, make_main, profile_hint, resolve_profile, task_wrapper

log = logging.getLogger("rtlm_lab.scheduler")


def format_metrics(m: dict) -> str:
    head = (f"{m['lm']} on {m['platform']} ({m['mode']}, {m.get('engine', 'static')} engine), "
            f"policy={m['policy']['name']}, rho={m['rho']}: {m['n_completed']}/{m['n_requests']} requests, "
            f"mean {m['mean_rt_s']:.3f} s, p50 {m['p50_rt_s']:.3f} s, p99 {m['p99_rt_s']:.3f} s, "
            f"{m['throughput_rps']:.2f} req/s, SLO miss {100 * m['slo_miss_rate']:.1f}%")
    if m.get("engine") == "continuous":
        return (head + f", realized rho {m['realized_rho']:.2f} (capacity {m['capacity_rps']:.2f} req/s), "
                f"{m['n_warmup_excluded']} warm-up arrivals excluded, mean running {m['mean_running_seqs']:.1f}, "
                f"prediction {100 * m['prediction_share']:.2f}% of engine time")
    return head + f", mean batch {m['mean_batch_size']:.2f}, overhead {100 * m['overhead_share']:.2f}%"


@task_wrapper
def schedule(cfg: DictConfig) -> dict:
    """Compose-and-run body (callable without the CLI)."""
    from hydra.core.hydra_config import HydraConfig

    from rtlm_lab.scheduler.harness import run_experiment

    run_dir = Path(HydraConfig.get().runtime.output_dir)
    done = run_dir / "metrics.json"
    if done.is_file() and not cfg.get("force", False):
        try:
            m = json.loads(done.read_text())
            print(f"already done (force=true reruns): {format_metrics(m)}", flush=True)
            return m
        except (json.JSONDecodeError, KeyError):
            log.warning("%s is unreadable; rerunning", done)
    check_data(cfg)  # data=prompts: a bad prompt file is one line, before any work
    path = resolve_profile(cfg, profile_hint(cfg) if cfg.data.get("name") == "prompts"
                           else f"rtlm-profile lm={cfg.lm.name} platform={cfg.platform.name}")
    plain = OmegaConf.to_container(cfg, resolve=True)
    m = run_experiment(plain, run_dir, path)
    print(format_metrics(m), flush=True)
    print(f"metrics: {done}", flush=True)
    return m


main = make_main("schedule", schedule)

if __name__ == "__main__":
    main()
