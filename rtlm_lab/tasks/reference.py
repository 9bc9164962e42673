"""``rtlm-reference``: rebuild one committed reference folder under ``outputs/reference/`` (``target=``).

* ``target=profiles``: :func:`rtlm_lab.profiling.reference.rebuild` (copy run dirs in, ``summary.csv``);
* ``target=uncertainty``: :func:`rtlm_lab.uncertainty.reference.build_reference`;
* ``target=model_vs_input``: :func:`rtlm_lab.uncertainty.modelside.build_reference` (input-side scores vs the
  LM's prefill entropy / end-of-turn probability, partial Spearman | input length, for each reference LM);
* ``target=regressor``: :func:`rtlm_lab.regressor.reference.build_reference` (``target.lmstate_only=true``:
  only refresh the LM-state rows from ``outputs/reference/regressor/lmstate/``);
* ``target=distribution``: :func:`rtlm_lab.regressor.distref.build` (the distributional length predictors of
  the five LMs: quantile heads over RT-LM's features and the LM state, baselines, refinement after k tokens,
  drift with run-time recalibration -> ``outputs/reference/regressor/distribution/``);
* ``target=scheduler``: :func:`rtlm_lab.scheduler.analysis.add_runs` then
  :func:`~rtlm_lab.scheduler.analysis.build` (the continuous-engine results table with CIs);
* ``target=sim_error``: :func:`rtlm_lab.scheduler.replay.build` (the step model, with its admission term, fitted
  on calibration runs or a saturation run's steps; the validation runs' exact traces replayed in the simulator;
  ``conf/target/sim_error.yaml`` names no runs until a kv-engine group is committed: pass them as overrides);
* ``target=regime``: :func:`rtlm_lab.scheduler.regime.build` (the regime map in simulation: max_seqs x load,
  overload burst included, x burstiness x each decoder-only LM, every policy paired per seed; oracle headroom and
  headroom captured with CIs -> ``outputs/reference/scheduler/regime/``, resumable).

Examples::

    rtlm-reference target=profiles target.runs=[outputs/profile/*/cuda/test-n500-s0]
    rtlm-reference target=uncertainty
    rtlm-reference target=model_vs_input target.lms=[dialogpt_ccc,smollm2_135m]
    rtlm-reference target=regressor target.profiles=[gemma3_270m__cuda] target.kinds=[ridge]
    rtlm-reference target=distribution target.lms=[gemma3_270m] target.lmstate_lms=[]
    rtlm-reference target=scheduler 'target.runs=[outputs/schedule/dialogpt_ccc/cpu/real/*/*/*]' target.group=cpu__dialogpt
    rtlm-reference target=sim_error 'target.calibration=[...]' 'target.runs=[...]' target.out=/tmp/sim_error.csv
    rtlm-reference target=regime      # regime/regime.csv: where order pays, in sim (resumable)
"""

from __future__ import annotations

from pathlib import Path

from omegaconf import DictConfig

from rtlm_lab.paths import expand_globs
from rtlm_lab.tasks._cli import make_main, task_wrapper


expand = expand_globs  # kept: targets and tests call it by this name


@task_wrapper
def reference(cfg: DictConfig):
    """Dispatch on ``cfg.target.name`` (callable without the CLI)."""
    t = cfg.target
    if t.name == "profiles":
        from rtlm_lab.profiling.reference import rebuild

        text = rebuild(expand(t.runs))
        print(text)
        return text
    if t.name == "uncertainty":
        from rtlm_lab.uncertainty.reference import build_reference, default_sources

        summary = build_reference(expand(t.runs) or default_sources(), t.out)
        print(summary.to_string(index=False, float_format=lambda v: f"{v:+.3f}"))
        return summary
    if t.name == "model_vs_input":
        import sys

        from rtlm_lab.uncertainty.modelside import build_reference as build_mvi, to_markdown

        table = build_mvi(list(t.lms), str(t.platform), t.out, n_bootstrap=int(t.n_bootstrap), seed=int(t.seed),
                          batch_size=int(t.batch_size), verify_states=bool(t.get("verify_states", False)),
                          command=" ".join(["rtlm-reference", *sys.argv[1:]]))
        print(to_markdown(table))
        return table
    if t.name == "train_profile":
        from rtlm_lab.errors import UserError
        from rtlm_lab.regressor.lmstate import slim

        if not t.src or not t.dst:
            raise UserError("target=train_profile needs target.src=<run dir or parquet> and target.dst=<parquet>")
        return slim(t.src, t.dst)
    if t.name == "scheduler":
        from rtlm_lab.errors import UserError
        from rtlm_lab.report import write_scheduler_docs
        from rtlm_lab.scheduler.analysis import add_runs, build, format_summary

        runs = expand(t.runs)
        if runs:
            if not t.group:
                raise UserError("target.group names the group the runs are added as "
                                "(e.g. h100__dialogpt_ccc__kv4_rho095_pinned)")
            add_runs([Path(r) for r in runs], str(t.group), note=str(t.note))
        df = build(n_boot=int(t.n_boot))
        write_scheduler_docs(df)  # the report builder writes the pages (README, docs/results.md), not the analysis
        print(format_summary(df))
        return df
    if t.name == "sim_error":
        import sys

        from rtlm_lab.scheduler.replay import build as build_sim_error, summarize

        table = build_sim_error(t, command=" ".join(["rtlm-reference", *sys.argv[1:]]))
        print(summarize(table).to_string(index=False, float_format=lambda v: f"{v:+.3f}"))
        return table
    if t.name == "distribution":
        import sys

        from omegaconf import OmegaConf

        from rtlm_lab.regressor.distref import build as build_dist

        return build_dist(OmegaConf.to_container(t, resolve=True),
                          command=" ".join(["rtlm-reference", *sys.argv[1:]]))
    if t.name == "regime":
        import sys

        from rtlm_lab.scheduler.regime import build as build_regime, findings

        table = build_regime(t, command=" ".join(["rtlm-reference", *sys.argv[1:]]))
        print("\n".join(findings(table)))
        return table
    from rtlm_lab.regressor.reference import build_reference, merge_lmstate

    if t.get("lmstate_only", False):
        return merge_lmstate(t.out)
    return build_reference(list(t.profiles), list(t.kinds), n_bootstrap=int(t.n_bootstrap), seed=int(t.seed),
                           profiles_dir=t.profiles_dir, out=t.out)


main = make_main("reference", reference)

if __name__ == "__main__":
    main()
