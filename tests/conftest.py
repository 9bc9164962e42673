"""Shared fixtures: a temporary data/output root, and tiny random-initialised transformers models.

Tiny models are real transformers architectures with a real BPE tokenizer trained on a CCC sample; only
their weights are random. Real LMs (Gemma, SmolLM2) are loaded in the tests that need them.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
os.environ.setdefault("RTLM_ROOT", str(ROOT))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
# One compute thread per process (torch and the OpenMP/BLAS pools of numpy and scikit-learn; OMP_NUM_THREADS
# wins if set), inherited by the tasks the tests start: the tiny models gain nothing from a second thread, and
# on a 2-core machine two threads a process oversubscribe the cores as soon as anything else runs (a subprocess,
# a notebook kernel). Measured: tests/test_lmstate.py took 189 s with two threads and 98 s with one. A
# platform's ``threads`` (resolve_device) still sets torch's count inside a test; the teardown hook puts it back.
TEST_THREADS = int(os.environ.setdefault("OMP_NUM_THREADS", "1"))
for _var in ("MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
    os.environ.setdefault(_var, str(TEST_THREADS))
# The override for commands and composed configs that run a model on platform=cpu (its default is 2 threads):
# measured on the loaded 2-core box, a 40-prompt tiny-GPT-2 rtlm-profile took 47 s of CPU with 2 threads, 19 s
# with 1 (generate itself 51 s -> 6 s).
CPU_THREADS = f"platform.threads={TEST_THREADS}"


def _test_threads():
    torch = sys.modules.get("torch")  # already imported: the variable came too late for it
    if torch is not None and torch.get_num_threads() != TEST_THREADS:
        torch.set_num_threads(TEST_THREADS)


_test_threads()


def pytest_runtest_teardown(item, nextitem):
    _test_threads()


@pytest.fixture(scope="session")
def ccc_sample() -> list[str]:
    from rtlm_lab.data.ccc import load_requests

    return load_requests("train", n=400, seed=1)["text"].tolist()


def _tiny_tokenizer(texts):
    from tokenizers import Tokenizer, models, pre_tokenizers, decoders, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<pad>", "<s>", "</s>", "<unk>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>",
                                   unk_token="<unk>")


@pytest.fixture(scope="session")
def tiny_causal_dir(tmp_path_factory, ccc_sample) -> Path:
    """A random-initialised 2-layer GPT-2 + BPE tokenizer, saved with ``save_pretrained``."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    d = tmp_path_factory.mktemp("tiny_gpt2")
    tok = _tiny_tokenizer(ccc_sample)
    torch.manual_seed(0)
    cfg = GPT2Config(vocab_size=len(tok), n_positions=256, n_embd=32, n_layer=2, n_head=2,
                     bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                     tie_word_embeddings=False, initializer_range=0.3)  # untied + wide init: varied replies
    model = GPT2LMHeadModel(cfg)
    model.save_pretrained(d)
    tok.save_pretrained(d)
    return d


@pytest.fixture(scope="session")
def tiny_seq2seq_dir(tmp_path_factory, ccc_sample) -> Path:
    """A random-initialised 1-layer T5 (encoder-decoder) + BPE tokenizer."""
    import torch
    from transformers import T5Config, T5ForConditionalGeneration

    d = tmp_path_factory.mktemp("tiny_t5")
    tok = _tiny_tokenizer(ccc_sample)
    torch.manual_seed(0)
    cfg = T5Config(vocab_size=len(tok), d_model=32, d_ff=64, num_layers=1, num_heads=2, d_kv=16,
                   pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id,
                   decoder_start_token_id=tok.pad_token_id, tie_word_embeddings=False, initializer_factor=3.0)
    model = T5ForConditionalGeneration(cfg)
    model.save_pretrained(d)
    tok.save_pretrained(d)
    return d


@pytest.fixture(scope="session")
def tiny_lm(tiny_causal_dir):
    """The tiny GPT-2 loaded once per test run (``tiny_spec`` defaults). Shared: tests must not change it."""
    from rtlm_lab.lm import load_lm

    return load_lm(tiny_spec(tiny_causal_dir))


@pytest.fixture(scope="session")
def tiny_profile(tiny_lm, tmp_path_factory):
    """One ``run_profile`` of the tiny GPT-2 per test run: 40 CCC test prompts in batches of 4, the first 4
    reply token ids stored (``output_ids``); the profile's rows as a DataFrame."""
    import pandas as pd

    from rtlm_lab.profiling import run_profile

    cfg = {"seed": 0, "lm": tiny_spec(tiny_lm.source_dir),
           "data": {"split": "test", "n_prompts": 40, "sample_seed": 0, "with_context": False, "max_chars": 600},
           "platform": {"name": "cpu", "device": "cpu", "dtype": "float32", "threads": TEST_THREADS},
           "profile": {"batch_size": 4, "warmup": 0, "flush_every": 8, "sanity_check": False, "output_ids": 4}}
    d = tmp_path_factory.mktemp("tiny_profile")
    run_profile(cfg, d, lm=tiny_lm)
    return pd.read_parquet(d / "profile.parquet")


def tiny_spec(model_dir: Path, arch: str = "causal", **kw) -> dict:
    """An LM config for a tiny model; ``stop_strings`` on a frequent letter give varied reply lengths."""
    spec = {
        "name": f"tiny_{arch}", "arch": arch, "source": "hub", "hub_id": str(model_dir), "local_dir": None,
        "chat_format": "lab_seq2seq" if arch == "seq2seq" else "lab_causal", "stop_strings": ["e"],
        "extra_eos_tokens": [], "max_new_tokens": 24, "max_input_tokens": 128,
    }
    spec.update(kw)
    return spec


@pytest.fixture
def tmp_roots(tmp_path, monkeypatch):
    """Point RTLM_OUTPUT_DIR at a temporary folder (data stays shared: the corpus cache is read-only)."""
    out = tmp_path / "outputs"
    monkeypatch.setenv("RTLM_OUTPUT_DIR", str(out))
    return out


def task_process(module: str, args, out_dir, timeout=600) -> subprocess.CompletedProcess:
    """``rtlm-<module>`` in a fresh process (``python -m rtlm_lab.tasks.<module>``), its outputs under ``out_dir``:
    for the few tests that keep the real command line (one per CLI); the others use :func:`run_task`."""
    env = {**os.environ, "RTLM_OUTPUT_DIR": str(out_dir)}
    return subprocess.run([sys.executable, "-m", f"rtlm_lab.tasks.{module}", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)


def schedule_cli(args, out_dir, timeout=600) -> subprocess.CompletedProcess:
    """``rtlm-schedule`` as its command line runs it (:func:`run_task`: in this process), outputs under ``out_dir``."""
    return run_task("schedule", args, out_dir)


def _show_warning(message):  # what an uncaught warning prints in a fresh interpreter
    import warnings

    sys.stderr.write(warnings._formatwarnmsg(message))


def run_task(module: str, args, out_dir=None, env: dict | None = None, timeout=None) -> subprocess.CompletedProcess:
    """``rtlm-<module>`` (``rtlm_lab.tasks.<module>``'s console-script ``main``) run in this process, as the
    command line ``python -m rtlm_lab.tasks.<module> *args`` would run it: the same argv parsing, checks, Hydra
    composition, run dir and log file, ``RTLM_OUTPUT_DIR=out_dir`` (and ``env``) set for the call; its stdout and
    stderr (prints, Hydra's console log, warnings) captured, and the exit status as a subprocess's: 0, the
    ``SystemExit`` code (2 for a user error), or 1 and the traceback for an uncaught exception.

    A subprocess pays ~6 s of CPU (torch, transformers, scikit-learn...) before the task starts; this pays it
    once per test run. Tests about the process itself (signals, the console script, ``--help``) keep
    ``subprocess``; ``timeout`` is accepted for the same signature and not enforced."""
    import contextlib
    import importlib
    import io
    import logging
    import traceback
    import warnings

    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.hydra_config import HydraConfig

    main = importlib.import_module(f"rtlm_lab.tasks.{module}").main
    argv = [f"rtlm_lab.tasks.{module}", *map(str, args)]
    sets = {**({"RTLM_OUTPUT_DIR": str(out_dir)} if out_dir is not None else {}), **(env or {})}
    saved_env = {k: os.environ.get(k) for k in sets}
    saved_argv, root = sys.argv, logging.getLogger()
    saved_log = {name: (lg.handlers[:], lg.level, lg.propagate, lg.disabled)
                 for name, lg in [("", root), *logging.Logger.manager.loggerDict.items()]
                 if isinstance(lg, logging.Logger)}
    out, err = io.StringIO(), io.StringIO()
    code = 0
    try:
        os.environ.update(sets)
        sys.argv = argv
        GlobalHydra.instance().clear()
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err), warnings.catch_warnings():
            warnings.resetwarnings()  # a fresh interpreter's filters: the default ones, shown on stderr
            for cat in (DeprecationWarning, PendingDeprecationWarning, ImportWarning, ResourceWarning):
                warnings.simplefilter("ignore", cat)
            warnings._showwarnmsg_impl = _show_warning
            warnings.showwarning = warnings._showwarning_orig
            try:
                main()
            except SystemExit as exc:
                if exc.code is None or isinstance(exc.code, int):
                    code = exc.code or 0
                else:
                    print(exc.code, file=sys.stderr)
                    code = 1
            except Exception:  # noqa: BLE001 - an uncaught exception: traceback and status 1, as the process
                traceback.print_exc()
                code = 1
    finally:
        sys.argv = saved_argv
        for k, v in saved_env.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        GlobalHydra.instance().clear()
        HydraConfig.instance().cfg = None
        keep = {id(h) for handlers, *_ in saved_log.values() for h in handlers}
        for lg in [root, *logging.Logger.manager.loggerDict.values()]:
            if not isinstance(lg, logging.Logger):
                continue
            for h in lg.handlers:
                if id(h) not in keep:
                    h.close()  # Hydra's console handler (our buffer) and the run dir's log file
            handlers, level, propagate, disabled = saved_log.get(lg.name if lg is not root else "",
                                                                 ([], logging.NOTSET, True, False))
            lg.handlers[:] = handlers
            lg.setLevel(level)
            lg.propagate, lg.disabled = propagate, disabled
        _test_threads()
    return subprocess.CompletedProcess(argv, code, out.getvalue(), err.getvalue())
