"""Every directory the lab uses, named once.

The repository root is found from this file; ``RTLM_DATA_DIR`` and ``RTLM_OUTPUT_DIR`` override the
defaults (``<root>/data`` and ``<root>/outputs``) so that tests and CI can work in temporary folders.
"""

from __future__ import annotations

import os
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


CONF_DIR = str(ROOT / "conf")  # the repository's Hydra configs (absolute: commands work from any directory)


def config_options(group: str) -> list[str]:
    """The choices of a config group (``conf/<group>/*.yaml``)."""
    return sorted(p.stem for p in (Path(CONF_DIR) / group).glob("*.yaml"))


def expand_globs(paths) -> list[str]:
    """Each entry, with shell-style globs expanded (sorted); an entry matching nothing is kept as given, so
    the caller's own error names it."""
    import glob

    out: list[str] = []
    for p in paths or []:
        p = str(Path(str(p)).expanduser())
        out.extend(sorted(glob.glob(p)) or [p])
    return out


def repo_root(start: str | Path | None = None) -> Path:
    """The checkout a notebook runs in: walk up from ``start`` (default: the working directory; papermill runs
    kernels in the notebook's folder unless ``--cwd`` is given) to the folder holding ``pyproject.toml`` and
    ``rtlm_lab/``; outside any checkout, the package's own root (:data:`ROOT`)."""
    p = Path(start or os.getcwd()).resolve()
    for d in (p, *p.parents):
        if (d / "pyproject.toml").is_file() and (d / "rtlm_lab").is_dir():
            return d
    return ROOT


def resolve_path(path: str | Path | None, default: Path | None = None) -> Path | None:
    """A notebook parameter as a path: empty / None gives ``default``; ``~`` expanded; relative paths are taken
    from :func:`repo_root`."""
    if path is None or not str(path).strip():
        return default
    p = Path(str(path)).expanduser()
    return p if p.is_absolute() else repo_root() / p


def data_dir() -> Path:
    """Root of built, git-ignored data (``data/``)."""
    return Path(os.environ.get("RTLM_DATA_DIR", ROOT / "data"))


def raw_dir() -> Path:
    return data_dir() / "raw"


def processed_dir() -> Path:
    return data_dir() / "processed"


def models_dir() -> Path:
    """Cached model conversions and lab-trained LMs (``data/models/``)."""
    return data_dir() / "models"


def outputs_dir() -> Path:
    return Path(os.environ.get("RTLM_OUTPUT_DIR", ROOT / "outputs"))


def reference_dir() -> Path:
    """Committed results from real runs (``outputs/reference/``)."""
    return ROOT / "outputs" / "reference"


def _register_resolvers() -> None:
    """``${rtlm_root:}`` in configs: the repository root, also where Hydra's runtime is not set yet
    (multirun sweep dirs are resolved before any job starts)."""
    try:
        from omegaconf import OmegaConf
    except ImportError:  # pragma: no cover
        return
    if not OmegaConf.has_resolver("rtlm_root"):
        OmegaConf.register_new_resolver("rtlm_root", lambda: str(ROOT))
    if not OmegaConf.has_resolver("rtlm_hash"):
        OmegaConf.register_new_resolver("rtlm_hash", config_hash)
    if not OmegaConf.has_resolver("rtlm_sampling_tag"):
        OmegaConf.register_new_resolver("rtlm_sampling_tag", sampling_tag)
    if not OmegaConf.has_resolver("rtlm_file_tag"):
        OmegaConf.register_new_resolver("rtlm_file_tag", file_tag)
    if not OmegaConf.has_resolver("rtlm_model_name"):
        OmegaConf.register_new_resolver("rtlm_model_name", _model_name)


def _model_name(local_dir, prefix: str = "custom") -> str:
    """``${rtlm_model_name:${lm.local_dir}}``: ``custom_<folder name>`` (``custom`` without a folder), so the
    run dirs of two models of your own stay apart."""
    import re

    if local_dir is None or not str(local_dir).strip():
        return prefix
    base = Path(str(local_dir).rstrip("/\\")).expanduser().name
    base = re.sub(r"[^A-Za-z0-9_.-]+", "_", base).strip("._-")
    return f"{prefix}_{base}" if base else prefix


def file_tag(path) -> str:
    """``${rtlm_file_tag:${data.path}}``: ``<stem>-<sha256[:8]>`` of a prompt file (run-dir names: another file
    or an edit gets its own run dir, so a resumed profile never mixes two files); ``<stem>-missing`` when it
    cannot be read (the task then says why, in one line, from :func:`rtlm_lab.data.prompts.resolve_path`).
    Relative paths are taken from where the command was started."""
    import hashlib

    try:
        if path is None or str(path).strip() in ("", "None", "???"):
            raise FileNotFoundError(path)
        p = Path(str(path)).expanduser().resolve()
        return f"{p.stem}-{hashlib.sha256(p.read_bytes()).hexdigest()[:8]}"
    except OSError:
        return f"{Path(str(path)).stem or 'prompts'}-missing"


def sampling_tag(sampling) -> str:
    """``${rtlm_sampling_tag:${lm.sampling}}`` in run names: ``""`` for greedy decoding (names unchanged),
    ``-T<temperature>p<top_p>s<seed>`` for sampled decoding, so sampled and greedy runs never share a dir."""
    from omegaconf import DictConfig, OmegaConf

    if isinstance(sampling, DictConfig):
        sampling = OmegaConf.to_container(sampling, resolve=True)
    if not sampling or not float(sampling.get("temperature") or 0) > 0:
        return ""
    return f"-T{float(sampling['temperature']):g}p{float(sampling.get('top_p') or 1.0):g}s{int(sampling.get('seed') or 0)}"


def config_hash(*nodes) -> str:
    """Six hex digits naming a config's values (``${rtlm_hash:${policy},${workload}}`` in run names), so that
    runs differing in any parameter land in different run dirs."""
    import hashlib
    import json

    from omegaconf import DictConfig, ListConfig, OmegaConf

    plain = [OmegaConf.to_container(n, resolve=True) if isinstance(n, (DictConfig, ListConfig)) else n for n in nodes]
    return hashlib.sha256(json.dumps(plain, sort_keys=True, default=str).encode()).hexdigest()[:6]


_register_resolvers()
