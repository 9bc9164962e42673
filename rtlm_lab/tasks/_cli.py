"""Shared plumbing for the ``@hydra.main`` entry points.

* :data:`CONF_DIR`: the repository's ``conf/`` (absolute, so commands work from any directory);
* :func:`check_group_choices`: ``lm=nope`` gives one clear line (Hydra's own message spans a screen);
* :func:`check_values`: ``data.n_prompts=abc`` gives one clear line *before* Hydra creates the run dir (an
  override must keep its default's type; a task may add its own checks of the composed config);
* :func:`task_wrapper`: user mistakes -> one line + exit 2; always say where the run dir is.
"""

from __future__ import annotations

import functools
import logging
import sys
from pathlib import Path
from typing import Any, Callable

from rtlm_lab.errors import UserError, fail
from rtlm_lab.paths import CONF_DIR, config_options

log = logging.getLogger("rtlm_lab")


group_options = config_options


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


def _compose(config_name: str, overrides: list[str]):
    """The task's config as the command would compose it (without Hydra's own node)."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
            return compose(config_name=config_name, overrides=overrides)
    finally:
        GlobalHydra.instance().clear()


def _type_error(key: str, default: Any, value: Any) -> str | None:
    """Why ``value`` cannot replace ``default`` (a bool, an integer or a number), or ``None`` if it can."""
    if value is None or isinstance(value, str) and "${" in value:
        return None  # null, or an interpolation: checked where it is used
    if isinstance(default, bool):
        ok, want = isinstance(value, bool), "true or false"
    elif isinstance(default, int):
        ok = isinstance(value, int) and not isinstance(value, bool) or isinstance(value, float) and value.is_integer()
        want = "an integer"
    elif isinstance(default, float):
        ok, want = isinstance(value, (int, float)) and not isinstance(value, bool), "a number"
    else:
        return None
    shown = str(default).lower() if isinstance(default, bool) else repr(default)
    return None if ok else f"{key} must be {want} (default {shown}), got {value!r}"


def check_values(config_name: str, argv: list[str] | None = None,
                 validate: Callable[[Any], None] | None = None) -> None:
    """Check ``key=value`` overrides before Hydra runs (and so before it creates the run dir).

    Each value (each element of a ``-m`` sweep) must keep the type of the key's default when that is a bool,
    an integer or a number; ``null`` and interpolations pass. Then, for a single run, ``validate(cfg)`` (a
    task's own checks) sees the composed config and raises :class:`UserError` for a bad value. Overrides
    Hydra itself cannot parse or compose are left to Hydra's own error.
    """
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from omegaconf import OmegaConf

    argv = sys.argv[1:] if argv is None else argv
    if any(a in ("--help", "-h", "--hydra-help", "--info", "-i")
           or a.startswith(("--cfg", "-c", "--info", "--config")) for a in argv):
        return  # Hydra prints help or the config (nothing is created), or composes another primary config
    multirun = any(a in ("-m", "--multirun") for a in argv)
    args = [a for a in argv if "=" in a and not a.startswith("-") and not a.lstrip("+~").startswith("hydra")]
    try:
        overrides = OverridesParser.create().parse_overrides(args)
    except Exception:  # noqa: BLE001 - Hydra reports its own syntax errors
        return
    groups, values = [], []
    for arg, ov in zip(args, overrides):
        key = ov.key_or_group
        if ov.is_delete():
            continue
        if "." not in key and "/" not in key and (Path(CONF_DIR) / key).is_dir():
            groups.append(arg.split(",")[0] if multirun else arg)  # the first choice: its type is the same
        else:
            values.append(ov)
    try:
        base = _compose(config_name, groups)
    except Exception:  # noqa: BLE001 - unknown keys, bad groups: Hydra's own error
        return
    raw = OmegaConf.to_container(base, resolve=False)
    for ov in values:
        cur: Any = raw
        for part in ov.key_or_group.split("."):
            cur = cur.get(part) if isinstance(cur, dict) else None
        if cur is None or isinstance(cur, (dict, list)):
            continue
        try:
            choices = list(ov.sweep_iterator()) if ov.is_sweep_override() else [ov.value()]
        except Exception:  # noqa: BLE001 - interval sweeps (a sweeper's business) have no list of values
            continue
        for value in choices:
            why = _type_error(ov.key_or_group, cur, value)
            if why:
                fail(why)
    if validate is not None and not multirun:
        try:
            cfg = _compose(config_name, args)
        except Exception:  # noqa: BLE001
            return
        try:
            validate(cfg)
        except UserError as exc:
            fail(str(exc))


def task_wrapper(task: Callable[..., Any]) -> Callable[..., Any]:
    """Run a task function: one-line user errors (exit 2), and always log the run dir."""

    @functools.wraps(task)
    def wrapped(cfg, *args, **kwargs):
        run_dir = None
        try:
            from hydra.core.hydra_config import HydraConfig

            hc = HydraConfig.get()
            if hc.output_subdir is not None:  # tools over existing results (rtlm-report, ...) have no run dir
                run_dir = hc.runtime.output_dir
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


def user_path(given: Any) -> Path:
    """A path given on the command line: ``~`` expanded, a relative one taken from where the command was
    started (Hydra's ``runtime.cwd``; the current directory without Hydra)."""
    path = Path(str(given)).expanduser()
    if not path.is_absolute():
        from hydra.core.hydra_config import HydraConfig

        try:
            path = Path(HydraConfig.get().runtime.cwd) / path
        except ValueError:  # called without Hydra
            path = path.resolve()
    return path


def resolve_profile(cfg, hint: str) -> Path:
    """The profile parquet a task reads: ``cfg.profile`` or ``cfg.profile_default``; relative paths are
    taken from where the command was started. A missing file is a :class:`UserError` naming ``hint``."""
    given = cfg.get("profile")
    path = user_path(given if given else cfg.profile_default)
    if not path.is_file():
        raise UserError(f"no profile at {path}; run `{hint}` first (or pass profile=<path/to/profile.parquet>)")
    return path


def make_main(config_name: str, task: Callable[..., Any],
              validate: Callable[[Any], None] | None = None) -> Callable[[], None]:
    """The console-script ``main`` of a task: validate group choices and values (:func:`check_values`, with
    the task's own ``validate(cfg)``), then run it under ``@hydra.main``. A bad value stops before Hydra
    creates the run dir, so it leaves nothing behind."""
    import hydra

    @hydra.main(version_base="1.3", config_path=CONF_DIR, config_name=config_name)
    def _hydra_main(cfg) -> None:
        task(cfg)

    def main() -> None:
        check_group_choices()
        check_values(config_name, validate=validate)
        _hydra_main()

    main.__doc__ = f"Console script for the ``{config_name}`` task (see ``conf/{config_name}.yaml``)."
    return main
