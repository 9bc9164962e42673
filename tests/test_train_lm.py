"""rtlm-train-lm: the three lab LMs train (tiny preset), save, reload through ``load_lm`` and generate.

Everything is written under one temporary data/output root per test module (RTLM_DATA_DIR /
RTLM_OUTPUT_DIR), so the CCC cache is rebuilt there once (~5 s) and the repository's ``data/`` is untouched.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir

from rtlm_lab.lm import ChatLM, Generation, lm_config, load_lm
from rtlm_lab.lm.loader import MANIFEST, _manifest_ok
from rtlm_lab.lm.train import LAB_LMS, output_dir_for, train_lab_lm
from rtlm_lab.paths import ROOT

CONF_DIR = str(ROOT / "conf")
# The tiny preset shrunk further: a couple of seconds per model on 2 CPU cores. One torch thread: on a
# shared 2-core machine, two OpenMP threads competing with another process run ~100x slower.
FAST = ["preset.max_steps=12", "preset.max_train_pairs=400", "preset.max_val_pairs=64",
        "preset.tokenizer.max_texts=1500", "preset.log_every=4", "preset.sample_max_new_tokens=8",
        "platform.threads=1"]
ENCODER_DECODER = {"dialogpt_ccc": False, "blenderbot_ccc": True, "godel_ccc": True}  # GPT-2; BlenderBot, T5


@pytest.fixture(scope="module")
def lab_env(tmp_path_factory):
    """RTLM_ROOT / RTLM_DATA_DIR / RTLM_OUTPUT_DIR pointed at a module-wide temporary root."""
    root = tmp_path_factory.mktemp("train_lm")
    threads = torch.get_num_threads()  # resolve_device(platform) sets it; restored for later tests
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("RTLM_ROOT", str(ROOT))
        mp.setenv("RTLM_DATA_DIR", str(root / "data"))
        mp.setenv("RTLM_OUTPUT_DIR", str(root / "outputs"))
        yield root
    torch.set_num_threads(threads)


def _cfg(*overrides: str):
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        return compose("train_lm", overrides=[*overrides])


@pytest.fixture(scope="module")
def trained(lab_env):
    """Train each lab LM once with the (shrunk) tiny preset; metrics by LM name."""
    return {name: train_lab_lm(_cfg(f"lm={name}", "preset=tiny", *FAST)) for name in LAB_LMS}


def test_config_composes(lab_env):
    cfg = _cfg("lm=godel_ccc", "preset=standard")
    assert cfg.lm.preset == "standard" and cfg.preset.name == "standard"
    assert cfg.platform.name == "cpu" and cfg.seed == 0 and cfg.force is False
    for name in LAB_LMS:  # every architecture has its block in both presets
        assert name in cfg.preset.model
        assert name in _cfg("preset=tiny").preset.model


@pytest.mark.parametrize("name", LAB_LMS)
def test_train_save_load_generate(trained, name):
    metrics = trained[name]
    d = output_dir_for(name, "tiny")
    assert d.is_dir() and not d.with_name(d.name + ".partial").exists()
    assert _manifest_ok(d)
    files = json.loads((d / MANIFEST).read_text())["files"]
    for f in ("config.json", "model.safetensors", "tokenizer.json", "train_config.json", "metrics.json"):
        assert f in files, f
    assert json.loads((d / "metrics.json").read_text()) == json.loads(json.dumps(metrics))
    prov = json.loads((d / "train_config.json").read_text())
    assert prov["config"]["lm"]["name"] == name and prov["config"]["preset"]["name"] == "tiny"

    assert metrics["train"]["steps"] == 12 and metrics["train"]["curve"]
    assert metrics["val"]["loss"] > 0 and metrics["val"]["perplexity"] > 1
    assert len(metrics["samples"]) == 5

    spec = lm_config(name)
    spec["preset"] = "tiny"
    lm = load_lm(spec, {"name": "cpu", "device": "cpu", "dtype": "float32", "threads": 1})
    assert isinstance(lm, ChatLM)
    tok = lm.tokenizer
    assert tok.eos_token == "</s>" and tok.pad_token == "<pad>" and tok.bos_token == "<s>"
    assert tok.convert_tokens_to_ids("<sep>") != tok.unk_token_id
    gen_cfg = lm.model.generation_config
    assert gen_cfg.eos_token_id == tok.eos_token_id and gen_cfg.pad_token_id == tok.pad_token_id
    # the encoder-decoders start decoding from a token the model config and generation config agree on
    start = getattr(lm.model.config, "decoder_start_token_id", None)  # GPT2Config has no such attribute
    assert lm.is_encoder_decoder is ENCODER_DECODER[name]
    assert (start is not None and start == gen_cfg.decoder_start_token_id) is ENCODER_DECODER[name]
    (g,) = lm.generate(["hey how are you?"], max_new_tokens=8)
    assert isinstance(g, Generation)
    assert 1 <= g.n_output_tokens <= 8
    assert g.stop_reason in ("eos", "max_tokens")


def test_cached_skip_and_determinism(trained, lab_env):
    name = "dialogpt_ccc"
    d = output_dir_for(name, "tiny")
    stamp = (d / MANIFEST).stat().st_mtime_ns
    again = train_lab_lm(_cfg(f"lm={name}", "preset=tiny", *FAST))  # valid manifest: reused, not retrained
    assert (d / MANIFEST).stat().st_mtime_ns == stamp
    assert again["val"] == trained[name]["val"]
    retrained = train_lab_lm(_cfg(f"lm={name}", "preset=tiny", "force=true", *FAST))
    assert (d / MANIFEST).stat().st_mtime_ns != stamp
    assert retrained["val"]["loss"] == trained[name]["val"]["loss"]
    assert retrained["train"]["curve"] == trained[name]["train"]["curve"]
    assert retrained["samples"] == trained[name]["samples"]


def test_corrupt_weights_are_retrained(trained, lab_env):
    name = "blenderbot_ccc"
    d = output_dir_for(name, "tiny")
    with open(d / "model.safetensors", "ab") as f:
        f.write(b"\0")
    assert not _manifest_ok(d)
    train_lab_lm(_cfg(f"lm={name}", "preset=tiny", *FAST))
    assert _manifest_ok(d)


def test_cli_rejects_non_lab_lm(lab_env):
    from conftest import run_task

    proc = run_task("train_lm", ["lm=gemma3_270m"])  # in this process; test_cli_run_dir_manifest runs the real one
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:"), proc.stderr
    assert "dialogpt_ccc" in lines[0]
    assert not Path(os.environ["RTLM_DATA_DIR"], "models", "lab").joinpath("gemma3_270m-tiny").exists()


def test_cli_run_dir_manifest(trained, lab_env):
    """``rtlm-train-lm`` (here reusing the trained model) leaves a run-dir ``manifest.json``: the copied
    ``metrics.json`` with its sha256, and the model dir with the sha256 of the model's own manifest."""
    from rtlm_lab.io import sha256_file, verify_run_manifest

    name = "dialogpt_ccc"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([sys.executable, "-m", "rtlm_lab.tasks.train_lm", f"lm={name}", "preset=tiny", *FAST],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (run_dir,) = (lab_env / "outputs" / "runs" / "train_lm" / f"{name}-tiny").iterdir()
    manifest = json.loads((run_dir / "manifest.json").read_text())
    assert list(manifest["files"]) == ["metrics.json"] and verify_run_manifest(run_dir) == []
    model_dir = output_dir_for(name, "tiny")
    assert manifest["model_dir"] == str(model_dir) and _manifest_ok(model_dir)
    assert manifest["model_manifest_sha256"] == sha256_file(model_dir / MANIFEST)
    assert json.loads((run_dir / "metrics.json").read_text()) == json.loads((model_dir / "metrics.json").read_text())
