"""Every console script is a Hydra task whose ``--help`` shows its own examples (not another task's)."""

from __future__ import annotations

import re
import subprocess
import sys
import tomllib

import pytest

from rtlm_lab.paths import ROOT

SCRIPTS = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
TASKS = {name: target.split(":")[0] for name, target in SCRIPTS.items() if target.startswith("rtlm_lab.tasks.")}
NOT_TASKS = {"rtlm-corpus", "rtlm-assets"}  # data preparation (no config, no run dir)


def test_every_console_script_is_a_hydra_task():
    assert set(SCRIPTS) - set(TASKS) == NOT_TASKS
    for target in SCRIPTS.values():
        assert target.endswith(":main"), target
    for path in (ROOT / "rtlm_lab").rglob("*.py"):  # argparse only in the scheduler (being rewritten)
        if "import argparse" in path.read_text():
            assert path.relative_to(ROOT).parts[:2] == ("rtlm_lab", "scheduler"), path


@pytest.mark.parametrize("script", sorted(TASKS))
def test_help_shows_its_own_examples(script):
    res = subprocess.run([sys.executable, "-m", TASKS[script], "--help"], capture_output=True, text=True,
                         cwd=ROOT, timeout=120)
    assert res.returncode == 0, res.stderr
    out = res.stdout
    assert out.startswith(f"{script}"), out[:200]  # the header names the console script
    examples = out[out.index("Examples: "):out.index("Use --cfg job")]
    named = set(re.findall(r"\brtlm-[a-z][a-z-]*[a-z]", examples))
    assert named == {script}, (script, named)
