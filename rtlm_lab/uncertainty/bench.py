"""Throughput benchmark of :func:`rtlm_lab.uncertainty.quantify`.

``rtlm-bench bench=uncertainty [bench.n=2000] [bench.batch_size=256] [bench.out=outputs/bench/uncertainty.json]``

Warms up (loads spaCy + WordNet, parses a small batch), then times one ``quantify`` call on N CCC test
requests (falls back to the validation prompts repeated when the corpus is unavailable) and writes
prompts/s, ms/prompt and provenance as JSON.
"""

from __future__ import annotations

import time
from pathlib import Path

from rtlm_lab.io import provenance, write_json_atomic

VALIDATION_CSV = Path(__file__).resolve().parents[2] / "tests" / "data" / "uncertainty_validation.csv"


def _prompts(n: int) -> tuple[list[str], str]:
    try:
        from rtlm_lab.data.ccc import load_requests

        texts = load_requests("test", n=n)["text"].tolist()
        if texts:
            return texts, "ccc:test"
    except Exception:  # noqa: BLE001 - ImportError or corpus not built: fall back to our prompts
        pass
    import pandas as pd

    base = pd.read_csv(VALIDATION_CSV)["text"].tolist()
    return (base * (n // len(base) + 1))[:n], "validation_csv_repeated"


def bench(n: int = 2000, batch_size: int = 256, n_process: int = 1, out: str | Path | None = None,
          config=None) -> dict:
    """Time :func:`quantify` on ``n`` prompts; write the JSON to ``out`` (default outputs/bench/uncertainty.json)."""
    from rtlm_lab.paths import outputs_dir
    from rtlm_lab.uncertainty import quantify

    texts, source = _prompts(max(1, n))
    quantify(texts[:64], batch_size=batch_size)  # warm-up: model + WordNet load, first-call costs
    t0 = time.perf_counter()
    df = quantify(texts, batch_size=batch_size, n_process=n_process)
    dt = time.perf_counter() - t0
    result = {
        "n": len(texts),
        "source": source,
        "batch_size": batch_size,
        "n_process": n_process,
        "seconds": dt,
        "prompts_per_s": len(texts) / dt,
        "ms_per_prompt": 1000 * dt / len(texts),
        "mean_tokens": float(df["n_tokens"].mean()),
        "provenance": provenance(config),
    }
    out = Path(out) if out else outputs_dir() / "bench" / "uncertainty.json"
    write_json_atomic(out, result)
    print(f"uncertainty.quantify: {result['prompts_per_s']:.0f} prompts/s "
          f"({result['ms_per_prompt']:.2f} ms/prompt, n={len(texts)}, source={source}) -> {out}")
    return result

