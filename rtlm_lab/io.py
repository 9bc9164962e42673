"""Atomic writes and provenance shared by every artefact the lab produces."""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import os
import platform as _platform
import socket
import subprocess
import tempfile
from contextlib import contextmanager
from importlib import metadata
from pathlib import Path
from typing import Any, Iterator

from rtlm_lab.paths import ROOT

TRACKED_PACKAGES = (
    "torch", "transformers", "tokenizers", "gguf", "datasets", "spacy", "scikit-learn",
    "numpy", "pandas", "hydra-core",
)


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; rename it over ``path`` only if the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        os.replace(tmp_path, path)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def write_text_atomic(path: str | os.PathLike, text: str) -> Path:
    with atomic_path(path) as tmp:
        tmp.write_text(text)
    return Path(path)


def copy_file_atomic(src: str | os.PathLike, dst: str | os.PathLike) -> Path:
    """Copy ``src`` to ``dst`` through a temporary file + rename (``dst``'s folder is created)."""
    import shutil

    with atomic_path(dst) as tmp:
        shutil.copyfile(src, tmp)
    return Path(dst)


def write_png_atomic(fig, path: str | os.PathLike, dpi: int = 110) -> Path:
    """Save a matplotlib figure as ``path`` (png; its folder created) through a temporary file + rename, then
    close it."""
    import matplotlib.pyplot as plt

    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=dpi, format="png")
    plt.close(fig)
    return Path(path)


def write_json_atomic(path: str | os.PathLike, obj: Any) -> Path:
    return write_text_atomic(path, json.dumps(obj, indent=2, sort_keys=False, default=str) + "\n")


def write_parquet_atomic(df, path: str | os.PathLike) -> Path:
    """Write a pandas DataFrame as parquet through a temporary file + rename."""
    with atomic_path(path) as tmp:
        df.to_parquet(tmp, index=False)
    return Path(path)


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def git_commit() -> str:
    """Current commit of the lab's checkout (``+dirty`` when the tree has changes), or ``unknown``.

    ``RTLM_GIT_COMMIT`` overrides it (copies of the tree without ``.git``, e.g. on a remote GPU box).
    """
    if os.environ.get("RTLM_GIT_COMMIT"):
        return os.environ["RTLM_GIT_COMMIT"]
    try:
        res = subprocess.run(["git", "rev-parse", "--verify", "-q", "HEAD"], cwd=ROOT, capture_output=True,
                             text=True, timeout=10)
        sha = res.stdout.strip()
        if res.returncode != 0 or not sha:
            return "unknown"
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return sha + ("+dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def package_versions(names=TRACKED_PACKAGES) -> dict[str, str]:
    out = {}
    for name in names:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = "absent"
    return out


def machine_info() -> dict[str, Any]:
    info = {
        "hostname": socket.gethostname(),
        "platform": _platform.platform(),
        "python": _platform.python_version(),
        "cpu_count": os.cpu_count(),
        "loadavg_1m": round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None,
    }
    try:
        import torch

        info["torch_threads"] = torch.get_num_threads()
        if torch.cuda.is_available():
            info["gpu"] = torch.cuda.get_device_name(0)
    except ImportError:  # pragma: no cover
        pass
    return info


def run_gpu(m: Any) -> str:
    """The GPU a real cuda run ran on, from its metrics: the continuous engine names it there, the static path
    (and a sweep's notebook 03) only in its provenance's machine facts. Sim runs and CPU runs name none ("")."""
    if m.get("mode", "real") != "real" or m.get("platform") == "cpu":
        return ""
    return m.get("gpu") or ((m.get("provenance") or {}).get("machine") or {}).get("gpu", "") or ""


def provenance(config: Any = None, **extra: Any) -> dict[str, Any]:
    """Provenance block stored beside every artefact: config, commit, date, machine, versions."""
    if config is not None and not isinstance(config, dict):
        try:
            from omegaconf import OmegaConf

            config = OmegaConf.to_container(config, resolve=True)
        except Exception:  # noqa: BLE001 - best effort for odd objects
            config = str(config)
    return {
        "created_utc": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "git_commit": git_commit(),
        "machine": machine_info(),
        "versions": package_versions(),
        "config": config,
        **extra,
    }


RUN_MANIFEST = "manifest.json"


def _run_files(run_dir: Path) -> list[Path]:
    """The artefacts of a run dir: every regular file below it, except the manifest, hidden files/dirs
    (Hydra's ``.hydra/`` bookkeeping and the ``.<name>.*.tmp`` files of :func:`atomic_path`) and ``*.log``
    files (Hydra's job log is still appended to after the manifest is written)."""
    out = []
    for p in run_dir.rglob("*"):
        rel = p.relative_to(run_dir)
        if rel.as_posix() == RUN_MANIFEST or p.suffix == ".log" or any(s.startswith(".") for s in rel.parts):
            continue
        if p.is_file() and not p.is_symlink():
            out.append(p)
    return sorted(out, key=lambda p: p.relative_to(run_dir).as_posix())


def write_run_manifest(run_dir: str | os.PathLike, extra: dict[str, Any] | None = None) -> Path:
    """Write ``<run_dir>/manifest.json`` (atomically): ``files`` (relative posix path -> sha256) and ``bytes``
    (path -> size) for every artefact of the run dir (see :func:`_run_files`), ``written_utc`` and ``extra``."""
    run_dir = Path(run_dir)
    files = _run_files(run_dir)
    manifest = {
        "files": {p.relative_to(run_dir).as_posix(): sha256_file(p) for p in files},
        "bytes": {p.relative_to(run_dir).as_posix(): p.stat().st_size for p in files},
        "written_utc": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        **(extra or {}),
    }
    return write_json_atomic(run_dir / RUN_MANIFEST, manifest)


def verify_run_manifest(run_dir: str | os.PathLike) -> list[str]:
    """Compare a run dir with its ``manifest.json``; one line per problem (``[]``: every artefact matches).

    Reports a missing or unreadable manifest, listed files that are missing or whose size or sha256 differ,
    and artefacts the manifest does not list.
    """
    run_dir = Path(run_dir)
    try:
        manifest = json.loads((run_dir / RUN_MANIFEST).read_text())
        files, sizes = dict(manifest["files"]), dict(manifest.get("bytes", {}))
    except (OSError, ValueError, KeyError, TypeError) as exc:
        return [f"{RUN_MANIFEST}: unreadable ({type(exc).__name__})"]
    problems = []
    for rel, digest in sorted(files.items()):
        p = run_dir / rel
        if not p.is_file():
            problems.append(f"{rel}: missing")
        elif rel in sizes and p.stat().st_size != sizes[rel]:
            problems.append(f"{rel}: {p.stat().st_size} bytes, manifest says {sizes[rel]}")
        elif sha256_file(p) != digest:
            problems.append(f"{rel}: sha256 differs from the manifest")
    for p in _run_files(run_dir):
        rel = p.relative_to(run_dir).as_posix()
        if rel not in files:
            problems.append(f"{rel}: not in the manifest")
    return problems
