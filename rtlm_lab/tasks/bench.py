"""``rtlm-bench``: one micro-benchmark, ``bench=uncertainty|regressor|decode|engine|predictor|replicas`` (see
``conf/bench/``).

* ``bench=uncertainty``: :func:`rtlm_lab.uncertainty.bench.bench` -> ``outputs/bench/uncertainty.json``;
* ``bench=regressor``: :func:`rtlm_lab.regressor.bench.bench` -> ``outputs/bench/regressor.json``;
* ``bench=decode``: :func:`rtlm_lab.lm.bench_decode.bench` on ``platform`` -> ``outputs/bench/decode_<platform>.json``;
* ``bench=engine``: :func:`rtlm_lab.scheduler.bench_engine.bench_engine` on ``platform`` -> ``outputs/bench/engine_<platform>.json``;
* ``bench=predictor``: :func:`rtlm_lab.scheduler.bench_predictor.bench` -> ``outputs/bench/predictor_<platform>.json``
  (the predictors in the serving process vs in their own, beside a busy engine);
* ``bench=replicas``: :func:`rtlm_lab.scheduler.bench_replicas.bench` on ``platform`` ->
  ``outputs/bench/replicas_<platform>.json`` (one engine vs replicas with a thread each vs stepped in turn).

Examples::

    rtlm-bench bench=uncertainty bench.n=500
    rtlm-bench bench=decode platform=cuda bench.lms=[gemma3_270m,smollm2_135m]
    rtlm-bench bench=engine platform=cpu bench.lms=[dialogpt_ccc] bench.concurrency=[1,8]
    rtlm-bench bench=replicas platform=cuda 'bench.devices=[cuda:0,cuda:0]'
"""

from __future__ import annotations

from omegaconf import DictConfig, OmegaConf

from rtlm_lab.tasks._cli import make_main, task_wrapper


@task_wrapper
def bench(cfg: DictConfig):
    """Dispatch on ``cfg.bench.name`` (callable without the CLI)."""
    b = cfg.bench
    config = OmegaConf.to_container(b, resolve=True)
    if b.name == "uncertainty":
        from rtlm_lab.uncertainty.bench import bench as run

        return run(int(b.n), int(b.batch_size), int(b.n_process), b.out, config=config)
    if b.name == "regressor":
        from rtlm_lab.regressor.bench import bench as run

        return run(int(b.n_single), int(b.batch), int(b.repeats), b.out, config=config)
    if b.name == "predictor":
        from rtlm_lab.scheduler.bench_predictor import bench as run

        platform = OmegaConf.to_container(cfg.platform, resolve=True)
        return run(int(b.n_single), str(b.lm), b.out, config={**config, "platform": platform["name"]}, platform=platform,
                   process_threads=int(b.process_threads) if b.get("process_threads") else None)
    if b.name == "replicas":
        from rtlm_lab.scheduler.bench_replicas import bench as run

        platform = OmegaConf.to_container(cfg.platform, resolve=True)
        return run(str(b.lm), platform, list(b.devices) if b.get("devices") else None, int(b.n), int(b.max_seqs),
                   b.out, config={**config, "platform": platform["name"]})
    if b.name == "engine":
        from rtlm_lab.scheduler.bench_engine import bench_engine

        platform = OmegaConf.to_container(cfg.platform, resolve=True)
        cap = OmegaConf.to_container(b.capacity, resolve=True) if b.get("capacity") else None
        return bench_engine(list(b.lms), platform, list(b.concurrency), b.max_new_tokens, int(b.n_check),
                            dict(b.random_init or {}), b.out, tuple(b.backends),
                            dtypes=list(b.dtypes) if b.get("dtypes") else None,
                            pinned_tokens=int(b.get("pinned_tokens", 128)), capacity=cap)
    from rtlm_lab.lm.bench_decode import bench as run

    platform = OmegaConf.to_container(cfg.platform, resolve=True)
    return run(platform, list(b.lms), int(b.n), int(b.batch), b.out,
               config={**config, "platform": platform["name"]})


main = make_main("bench", bench)

if __name__ == "__main__":
    main()
