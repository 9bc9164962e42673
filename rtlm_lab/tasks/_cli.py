"""Shared plumbing for the ``@hydra.main`` entry points.

* :data:`CONF_DIR`: the repository's ``conf/`` (absolute, so commands work from any directory);
* :func:`check_group_choices`: ``lm=nope`` gives one clear line (Hydra's own message spans a screen);
* :func:`task_wrapper`: user mistakes -> one line + exit 2; always say where the run dir is.
"""

from __future__ import annotations

import functools
import logging
import sys
from pathlib import Path
from typing import Any, Callable

from rtlm_lab.errors import UserError, fail
from rtlm_lab.paths import ROOT

CONF_DIR = str(ROOT / "conf")
log = logging.getLogger("rtlm_lab")


def group_options(group: str) -> list[str]:
    d = Path(CONF_DIR) / group
    return sorted(p.stem for p in d.glob("*.yaml"))


def check_group_choices(argv: list[str] | None = None) -> None:
    """Validate ``group=choice`` overrides (also comma lists of ``--multirun``) before Hydra composes."""
    argv = sys.argv[1:] if argv is None else argv
    for arg in argv:
        if "=" not in arg or arg.startswith("-"):
            continue
        key, value = arg.split("=", 1)
        key = key.lstrip("+~")
        if "." in key or "/" in key or not (Path(CONF_DIR) / key).is_dir():
            continue
        options = group_options(key)
        for choice in value.split(","):
            choice = choice.strip()
            if choice in ("", "null") or choice.startswith(("glob(", "range(", "choice(")):
                continue
            if choice not in options:
                fail(f"unknown {key} {choice!r}; choose one of: {', '.join(options)}")


def task_wrapper(task: Callable[..., Any]) -> Callable[..., Any]:
    """Run a task function: one-line user errors (exit 2), and always log the run dir."""

    @functools.wraps(task)
    def wrapped(cfg, *args, **kwargs):
        run_dir = None
        try:
            from hydra.core.hydra_config import HydraConfig

            run_dir = HydraConfig.get().runtime.output_dir
        except Exception:  # noqa: BLE001 - called without Hydra (tests)
            pass
        try:
            return task(cfg, *args, **kwargs)
        except UserError as exc:
            fail(str(exc))
        except KeyboardInterrupt:
            print(f"interrupted: finished work is saved in {run_dir}; rerun the same command to resume",
                  file=sys.stderr)
            raise SystemExit(130)
        finally:
            if run_dir:
                log.info("run dir: %s", run_dir)

    return wrapped


def check_data(cfg) -> None:
    """``data=prompts``: read the prompt file now, so a bad one is one clear line before any work."""
    data = cfg.get("data")
    if data is not None and data.get("name") == "prompts":
        from rtlm_lab.data.requests import load_data_requests

        load_data_requests(data)


def profile_hint(cfg) -> str:
    """The ``rtlm-profile`` command that writes the profile a task reads by default."""
    parts = [f"rtlm-profile lm={cfg.lm.name} platform={cfg.platform.name}"]
    data = cfg.get("data")
    if data is not None and data.get("name") == "prompts":
        parts.append(f"data=prompts data.path={data.get('path')}")
        if data.get("n_prompts") is not None:
            parts.append(f"data.n_prompts={data.n_prompts}")
    elif data is not None:
        parts.append(f"data.n_prompts={data.get('n_prompts')}")
    if cfg.lm.get("local_dir"):
        parts.append(f"lm.local_dir={cfg.lm.local_dir}")
    return " ".join(parts)


def resolve_profile(cfg, hint: str) -> Path:
    """The profile parquet a task reads: ``cfg.profile`` or ``cfg.profile_default``; relative paths are
    taken from where the command was started. A missing file is a :class:`UserError` naming ``hint``."""
    given = cfg.get("profile")
    path = Path(str(given) if given else str(cfg.profile_default)).expanduser()
    if not path.is_absolute():
        from hydra.core.hydra_config import HydraConfig

        try:
            path = Path(HydraConfig.get().runtime.cwd) / path
        except ValueError:  # called without Hydra
            path = path.resolve()
    if not path.is_file():
        raise UserError(f"no profile at {path}; run `{hint}` first (or pass profile=<path/to/profile.parquet>)")
    return path


def make_main(config_name: str, task: Callable[..., Any]) -> Callable[[], None]:
    """The console-script ``main`` of a task: validate group choices, then run it under ``@hydra.main``."""
    import hydra

    @hydra.main(version_base="1.3", config_path=CONF_DIR, config_name=config_name)
    def _hydra_main(cfg) -> None:
        task(cfg)

    def main() -> None:
        check_group_choices()
        _hydra_main()

    main.__doc__ = f"Console script for the ``{config_name}`` task (see ``conf/{config_name}.yaml``)."
    return main
