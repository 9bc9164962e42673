"""The README is a front door and the docs stay true: its length, every relative link (and anchor) in
README.md and docs/*.md, every ``rtlm-*`` console script and every ``make`` target they name, and an honest
``make test`` / ``make test-full`` split (at least one test is marked ``slow``).

Each check is a small helper tested on a string first, so a broken link or a wrong name can be seen failing.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from conftest import ROOT

README_MAX_LINES = 250
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]

_FENCE = re.compile(r"^```.*?^```", re.S | re.M)
_CODE_SPAN = re.compile(r"`[^`\n]+`")
_LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")
_SCRIPT = re.compile(r"(?<![\w./-])rtlm-[a-z][a-z-]*[a-z]")
_MAKE = re.compile(r"\bmake ([a-z][\w-]*)")


def links(markdown: str) -> list[str]:
    """Link and image targets outside code (fenced blocks and inline code spans are not rendered as links)."""
    text = _CODE_SPAN.sub("", _FENCE.sub("", markdown))
    return _LINK.findall(text)


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = heading.strip().lower().replace("`", "")
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def anchors(markdown: str) -> set[str]:
    text = _FENCE.sub("", markdown)
    return {slug(m) for m in re.findall(r"^#{1,6} (.+)$", text, re.M)}


def broken_links(markdown: str, source: Path) -> list[str]:
    """Relative links of ``markdown`` (a file at ``source``) whose file, or whose ``#anchor`` in a Markdown
    file, does not exist. Web and mail links are not checked."""
    bad = []
    for target in links(markdown):
        if re.match(r"^[a-z][a-z0-9+.-]*:", target, re.I):  # https:, mailto:
            continue
        path, _, anchor = target.partition("#")
        dest = (source.parent / path).resolve() if path else source
        if not dest.exists():
            bad.append(f"{target} (no file {dest})")
        elif anchor and dest.suffix == ".md" and anchor not in anchors(dest.read_text()):
            bad.append(f"{target} (no heading #{anchor} in {dest.name})")
    return bad


def scripts_named(markdown: str) -> set[str]:
    return set(_SCRIPT.findall(markdown))


def make_targets_named(markdown: str) -> set[str]:
    """``make X`` inside code (fenced blocks and inline spans): prose such as "a make variable" is not a target."""
    code = "\n".join(_FENCE.findall(markdown) + _CODE_SPAN.findall(markdown))
    return set(_MAKE.findall(code))


def console_scripts() -> set[str]:
    return set(tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"])


def makefile_targets() -> set[str]:
    return set(re.findall(r"^([A-Za-z][\w-]*):(?!=)", (ROOT / "Makefile").read_text(), re.M))


# ------------------------------------------------------------------ the helpers can fail

def test_helpers_find_broken_links_and_unknown_names(tmp_path):
    (tmp_path / "docs").mkdir()
    page = tmp_path / "docs" / "page.md"
    (tmp_path / "docs" / "other.md").write_text("# Other page\n\n## A `code` section: x (y/)\n")
    page.write_text("# Page\n")
    md = ("See [other](other.md), [its section](other.md#a-code-section-x-y), [top](#page), [web](https://x.org),\n"
          "[gone](missing.md), [bad anchor](other.md#nope), ![figure](../fig.png) and `[not a link](nowhere.md)`.\n"
          "```bash\nmake nothing  # [in code](nowhere.md)\n```\n")
    assert broken_links(md, page) == [
        f"missing.md (no file {tmp_path / 'docs' / 'missing.md'})",
        "other.md#nope (no heading #nope in other.md)",
        f"../fig.png (no file {tmp_path / 'fig.png'})",
    ]
    assert slug("Which uncertainty lengthens which LM's answers (`outputs/reference/uncertainty/`)") == \
        "which-uncertainty-lengthens-which-lms-answers-outputsreferenceuncertainty"
    md = "Run `rtlm-profile` or `rtlm-nope --help`, `make test` or `make nope`; a make variable; rtlm_lab.\n"
    assert scripts_named(md) == {"rtlm-profile", "rtlm-nope"}
    assert scripts_named(md) - console_scripts() == {"rtlm-nope"}
    assert make_targets_named(md) == {"test", "nope"}
    assert make_targets_named(md) - makefile_targets() == {"nope"}


# ------------------------------------------------------------------ the real docs

def test_readme_is_a_front_door():
    lines = (ROOT / "README.md").read_text().splitlines()
    assert len(lines) <= README_MAX_LINES, f"README.md has {len(lines)} lines (at most {README_MAX_LINES})"
    text = "\n".join(lines)
    assert "make demo" in text and "make test" in text
    for page in ("profiling", "uncertainty", "predictor", "scheduling", "sweeps", "jupyterlab", "cuda",
                 "results", "reliability", "design"):
        assert f"(docs/{page}.md" in text, page  # linked from the front door
        assert (ROOT / "docs" / f"{page}.md").is_file(), page


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_relative_links_resolve(doc):
    assert broken_links(doc.read_text(), doc) == []


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_named_scripts_and_make_targets_exist(doc):
    text = doc.read_text()
    assert scripts_named(text) - console_scripts() == set(), "not in pyproject's [project.scripts]"
    assert make_targets_named(text) - makefile_targets() == set(), "not a Makefile target"


def test_every_docs_page_is_reachable_from_the_readme():
    reached, todo = set(), [ROOT / "README.md"]
    while todo:
        doc = todo.pop()
        for target in links(doc.read_text()):
            path = target.partition("#")[0]
            if not path or re.match(r"^[a-z][a-z0-9+.-]*:", path, re.I):
                continue
            dest = (doc.parent / path).resolve()
            if dest.suffix == ".md" and dest.is_file() and dest not in reached:
                reached.add(dest)
                todo.append(dest)
    assert {p.resolve() for p in DOCS[1:]} <= reached


# ------------------------------------------------------------------ make test / make test-full

def test_make_test_full_runs_more_than_make_test():
    """``make test`` deselects ``-m slow``; ``make test-full`` runs everything: there must be slow tests,
    and fewer of them than tests."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    res = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q", "-m", "slow", "-p",
                          "no:cacheprovider", str(ROOT / "tests")], cwd=ROOT, env=env, capture_output=True,
                         text=True, timeout=300)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    m = re.search(r"(\d+)/(\d+) tests? collected \((\d+) deselected\)", res.stdout)
    assert m, res.stdout[-2000:]
    slow, total, fast = map(int, m.groups())
    assert slow >= 1 and fast >= 1 and slow + fast == total
    slow_ids = [ln for ln in res.stdout.splitlines() if "::" in ln]
    assert any(ln.startswith("tests/test_real_lms.py::") for ln in slow_ids), slow_ids
    makefile = (ROOT / "Makefile").read_text()
    assert re.search(r'^test: .*\n\t.*pytest -m "not slow" -q \$\(XDIST\)$', makefile, re.M)
    assert re.search(r"^test-full: .*\n\t.*pytest -q \$\(XDIST\)$", makefile, re.M)
    assert re.search(r"^XDIST = .*-n \$\(TEST_WORKERS\) --dist loadfile", makefile, re.M)  # no -m in it
