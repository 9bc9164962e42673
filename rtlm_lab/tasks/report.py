"""``rtlm-report``: one report over a sweep dir (``rtlm-sweep``'s output), see :mod:`rtlm_lab.report`.

Examples::

    rtlm-report                                   # outputs/sweeps/demo
    rtlm-report sweep=reference out=/tmp/ref_report copy=true           # a self-contained copy (metrics + figures)
"""

from __future__ import annotations

from omegaconf import DictConfig

from rtlm_lab.errors import UserError
from rtlm_lab.tasks._cli import make_main, task_wrapper


@task_wrapper
def report(cfg: DictConfig) -> dict:
    """Build the report of ``cfg.sweep`` (callable without the CLI); print the headline table and paths."""
    from rtlm_lab.report import build_report, format_plain_table, resolve_sweep_dir

    copy = bool(cfg["copy"])  # not cfg.copy: that is DictConfig.copy, a method
    if copy and not cfg.out:
        raise UserError("copy=true needs out=<folder> (the folder to copy the cells' results into)")
    res = build_report(resolve_sweep_dir(str(cfg.sweep)), cfg.out, figures=bool(cfg.figures), copy=copy)
    print(format_plain_table(res["headline"]))
    print(f"report: {res['md']}\n        {res['html']}")
    return res


main = make_main("report", report)

if __name__ == "__main__":
    main()
