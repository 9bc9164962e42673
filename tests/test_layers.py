"""The package keeps its layers: ``lint-imports`` (import-linter, ``[tool.importlinter]`` in pyproject.toml; see
docs/design.md#layers) finds every contract kept, and a failure names the broken contract and its imports.

Layers, each importing only those below it (imports inside functions count too): ``tasks`` -> ``report`` ->
``scheduler`` -> ``regressor`` -> ``uncertainty`` -> ``profiling`` -> ``viz`` -> ``lm`` -> ``data`` -> the
helpers (``io``, ``paths``, ``errors``, ``bootstrap``, ``metrics``, ``distmetrics``). Besides: no import circle between sibling
modules outside ``rtlm_lab.scheduler``, and no task imports another.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from conftest import ROOT

PYPROJECT = ROOT / "pyproject.toml"


def lint_imports() -> str:
    """The ``lint-imports`` of the Python running the tests (``.venv``), else the one on PATH."""
    exe = Path(sys.executable).parent / "lint-imports"
    found = str(exe) if exe.is_file() else shutil.which("lint-imports")
    if not found:
        pytest.fail("lint-imports is not installed (import-linter, in the dev extra): run `make setup`")
    return found


def lint(config: Path = PYPROJECT, *contracts: str) -> subprocess.CompletedProcess:
    args = [lint_imports(), str(config), "--no-cache", "--no-logo"]
    for c in contracts:
        args += ["--contract", c]
    return subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=300)


def report(res: subprocess.CompletedProcess) -> str:
    """What to show on failure: the 'Broken contracts' part of the output (all of it when there is none)."""
    out = res.stdout + res.stderr
    i = out.find("Broken contracts")
    return out[i:] if i >= 0 else out


def contracts() -> dict[str, dict]:
    return {c["id"]: c for c in tomllib.loads(PYPROJECT.read_text())["tool"]["importlinter"]["contracts"]}


def test_every_contract_is_kept():
    res = lint()
    assert res.returncode == 0, "lint-imports: a contract is broken\n" + report(res)
    assert "0 broken" in res.stdout, res.stdout


def test_a_broken_layer_is_named_with_its_import(tmp_path):
    """The same layers with ``data`` above ``lm``: the loader's import of ``data.assets`` breaks the contract,
    and the output names the layers and the importing line."""
    text = PYPROJECT.read_text()
    swapped = text.replace('    "lm",\n    "data",\n', '    "data",\n    "lm",\n')
    assert swapped != text, "the layers list no longer has lm right above data"
    cfg = tmp_path / "pyproject.toml"
    cfg.write_text(swapped)
    res = lint(cfg, "layers")
    assert res.returncode != 0, res.stdout
    out = report(res)
    assert "rtlm_lab.lm is not allowed to import rtlm_lab.data" in out, out
    assert "rtlm_lab.lm.loader -> rtlm_lab.data" in out, out


def test_the_tasks_contract_lists_every_task():
    listed = set(contracts()["tasks"]["modules"])
    tasks = {f"rtlm_lab.tasks.{p.stem}" for p in (ROOT / "rtlm_lab" / "tasks").glob("*.py")
             if p.stem not in ("__init__", "_cli")}
    assert listed == tasks, f"add to / remove from the 'tasks' contract: {sorted(listed ^ tasks)}"

