"""Throughput benchmark of :func:`rtlm_lab.uncertainty.quantify`.

``python -m rtlm_lab.uncertainty.bench [--n 2000] [--batch-size 256] [--out outputs/bench/uncertainty.json]``

Warms up (loads spaCy + WordNet, parses a small batch), then times one ``quantify`` call on N CCC test
requests (falls back to the validation prompts repeated when the corpus is unavailable) and writes
prompts/s, ms/prompt and provenance as JSON.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from rtlm_lab.errors import user_errors
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


@user_errors
def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=2000)
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--n-process", type=int, default=1)
    ap.add_argument("--out", default="outputs/bench/uncertainty.json")
    args = ap.parse_args(argv)

    from rtlm_lab.uncertainty import quantify

    texts, source = _prompts(max(1, args.n))
    quantify(texts[:64], batch_size=args.batch_size)  # warm-up: model + WordNet load, first-call costs
    t0 = time.perf_counter()
    df = quantify(texts, batch_size=args.batch_size, n_process=args.n_process)
    dt = time.perf_counter() - t0
    result = {
        "n": len(texts),
        "source": source,
        "batch_size": args.batch_size,
        "n_process": args.n_process,
        "seconds": dt,
        "prompts_per_s": len(texts) / dt,
        "ms_per_prompt": 1000 * dt / len(texts),
        "mean_tokens": float(df["n_tokens"].mean()),
        "provenance": provenance(),
    }
    write_json_atomic(args.out, result)
    print(f"uncertainty.quantify: {result['prompts_per_s']:.0f} prompts/s "
          f"({result['ms_per_prompt']:.2f} ms/prompt, n={len(texts)}, source={source}) -> {args.out}")
    return result


if __name__ == "__main__":
    main()
