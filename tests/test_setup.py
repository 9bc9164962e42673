"""The two dependency lists (pyproject for pip, environment.yml for conda) stay in step."""

import re
import tomllib

import yaml

from conftest import ROOT


def _norm(req: str) -> str:
    name, rest = re.match(r"^\s*([A-Za-z0-9_.\-]+)(.*)$", req).groups()
    return re.sub(r"[-_.]+", "-", name).lower() + rest.replace(" ", "")


def test_environment_yml_mirrors_pyproject():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    pip_deps = set(map(_norm, project["dependencies"] + project["optional-dependencies"]["dev"]))
    env = yaml.safe_load((ROOT / "environment.yml").read_text())
    conda_pip = next(d["pip"] for d in env["dependencies"] if isinstance(d, dict) and "pip" in d)
    assert set(map(_norm, conda_pip)) == pip_deps


def test_inference_versions_are_pinned():
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    pinned = {_norm(d).split("==")[0] for d in deps if "==" in d}
    assert {"transformers", "tokenizers", "gguf"} <= pinned


def test_layout():
    for d in ("notebooks", "rtlm_lab", "conf", "data", "outputs", "tests"):
        assert (ROOT / d).is_dir(), d
    for f in ("environment.yml", "pyproject.toml", "Makefile", "README.md", ".ci/run", "data/README.md"):
        assert (ROOT / f).is_file(), f
    for lm in ("gemma3_270m", "smollm2_135m", "dialogpt_ccc", "blenderbot_ccc", "godel_ccc"):
        assert (ROOT / "conf" / "lm" / f"{lm}.yaml").is_file()
